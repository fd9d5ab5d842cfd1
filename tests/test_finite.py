"""A finite training set (data.train_size): each epoch's order is a pure function of (seed, member, epoch), so the
stream rule's guarantees hold in this regime too: resume mid-epoch, rank slices, members alone, held-out sets
apart from training sets, and the endless stream unchanged without the key."""
import json
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import ConfigError, compose
from datamodules.stream import Ticket, eval_stream, pm1, train_stream
from datamodules.task import Task
from kernels.permutation import epoch_order
from runtime.checkpointing import KILL_AT_STEP_ENV
from runtime.experiment import build, evaluate_run, load_run
from conftest import checkpoint, clean_env, one_error_line, train, train_all

CPU = torch.device("cpu")
FINITE = {  # preset -> a small finite config of it (both formats, every task, a batch that straddles epochs)
    "parity_mlp": ["data.n=20", "model.ensemble=3"],
    "cot_parity": ["data.n=12", "data.k=4", "data.noise=0.1"],
    "tree_cot_parity": ["data.n=12", "data.k=4"],
    "multiply_cot": [],
    "rule110_cot": [],
    "majority_mlp": [],
    "staircase_mlp": [],
}

SHORT = ["trainer=cpu", "trainer.progress_bar=false", "data.batch_size=32", "data.train_size=64", "eval.size=64",
         "eval.every_n_steps=30", "checkpoint.every_n_steps=30", "trainer.max_steps=60"]
RUN_SHORT = {"parity_mlp": [*SHORT, "data.n=12", "data.k=2", "model.ensemble=2"],
             "cot_parity": [*SHORT, "data.n=8", "data.k=2"]}


def task(preset: str, *extra: str) -> Task:
    cfg = compose([f"experiment={preset}", "data.batch_size=8", "data.train_size=20", "eval.size=64",
                   *FINITE[preset], *extra])
    return build(cfg)[0]


def tensors(batch) -> list[torch.Tensor]:
    return [t for t in batch if isinstance(t, torch.Tensor)]


# --- the epoch order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 100, 1000, 4097])
def test_each_epoch_visits_every_training_sample_once_in_its_own_order(size):
    order = epoch_order(7, [4], 0, 3 * size, size, CPU).view(3, size)
    for epoch in order:
        assert sorted(epoch.tolist()) == list(range(size))
    assert not torch.equal(order[0], order[1]) and not torch.equal(order[1], order[2])
    both = epoch_order(7, [6, 4], 0, size, size, CPU)  # streams permuted together: each its own order
    assert torch.equal(both[1], order[0]) and not torch.equal(both[0], order[0])
    assert not torch.equal(order[0], epoch_order(8, [4], 0, size, size, CPU)[0])  # another seed
    cuts = [0, 5, size + 3, 3 * size]  # positions cut anywhere give the same indices
    parts = torch.cat([epoch_order(7, [4], a, b - a, size, CPU)[0] for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(parts, order.flatten())


def test_positions_near_the_end_of_the_stream_and_the_largest_set_stay_in_range():
    for size in (2**62, 3 * 2**40 + 1):
        index = epoch_order(1, [0], 2**64 - 1000, 1000, size, CPU)
        assert index.min() >= 0 and index.max() < size and index.unique().numel() == 1000


# --- samples at indices are the stream's samples ------------------------------------------------------
@pytest.mark.parametrize("preset", FINITE)
def test_a_batch_holds_the_training_streams_samples_in_the_epochs_order(preset):
    dm = task(preset)
    ticket = Ticket(step=2, steps=3, rank=0, world_size=1)  # positions 16..40 of a 20-sample set: 3 epochs
    batch = dm.generate(ticket, CPU)
    for i, member in enumerate(dm.members):
        index = dm.train_order(16, 24, CPU)[i]
        assert index.max() < 20
        if dm.format == "sequence":
            expected = torch.cat([dm.sample(g, 1, train_stream(member), CPU) for g in index.tolist()])
            assert torch.equal(batch.tokens[i].reshape(24, -1), expected)
        else:
            one = [dm.samples(g, 1, [train_stream(member)], CPU) for g in index.tolist()]
            assert torch.equal(pm1(batch.x[i].reshape(24, -1)), torch.cat([x[0] for x, _ in one]))
            assert torch.equal(batch.y[i].reshape(24), torch.cat([y[0] for _, y in one]))
    if dm.format == "classifier":  # the base class's one-at-a-time samples_at is the task's own
        index = dm.train_order(16, 24, CPU)
        streams = [train_stream(m) for m in dm.members]
        for mine, base in zip(dm.samples_at(index, streams), Task.samples_at(dm, index, streams)):
            assert torch.equal(mine, base)


@pytest.mark.parametrize("preset", ["parity_mlp", "cot_parity", "multiply_cot"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_partition_the_global_batch_of_a_finite_set(preset, world_size):
    dm = task(preset)
    whole = dm.generate(Ticket(step=5, steps=3, rank=0, world_size=1), CPU)
    parts = [dm.generate(Ticket(step=5 + t, steps=1, rank=r, world_size=world_size), CPU)
             for t in range(3) for r in range(world_size)]
    for i, expected in enumerate(tensors(whole)):
        joined = torch.cat([tensors(p)[i] for p in parts], dim=2).view(expected.shape)
        assert torch.equal(joined, expected)


@pytest.mark.parametrize("preset", ["parity_mlp", "cot_parity"])
def test_a_member_sees_in_an_ensemble_the_training_set_it_sees_alone(preset):
    group = task(preset, "model.ensemble=3")
    alone = task(preset, "model.ensemble=1", "model.member_offset=2")
    ticket = Ticket(step=1, steps=4, rank=0, world_size=1)
    for a, b in zip(tensors(group.generate(ticket, CPU)), tensors(alone.generate(ticket, CPU))):
        assert torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    fixed = (lambda dm: dm.train_subset(CPU)) if group.format == "classifier" else (lambda dm: [dm.train_subset(CPU)])
    for a, b in zip(fixed(group), fixed(alone)):
        assert torch.equal(a[2], b[0])


def test_a_finite_member_ends_with_the_weights_it_has_alone():
    def fitted(*args: str):
        cfg = compose(["experiment=parity_mlp", "data.n=12", "data.k=3", "model.width=32", "data.train_size=96",
                       "trainer.max_steps=300", "eval.every_n_steps=100", "eval.size=256", *args])
        dm, model = build(cfg)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=300, max_epochs=-1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
        return model

    group, alone = fitted("model.ensemble=3"), fitted("model.ensemble=1", "model.member_offset=2")
    for a, b in zip(group.net.parameters(), alone.net.parameters()):
        assert torch.equal(a[2], b[0])
    assert group.fit_step[2] == alone.fit_step[0] and group.solved_step[2] == alone.solved_step[0]
    assert group.results()["final_train_accuracy"][2] == alone.results()["final_train_accuracy"]


# --- held-out sets apart, the endless stream unchanged ---------------------------------------------------
def test_held_out_samples_are_never_training_samples():
    dm = task("multiply_cot", "data.train_size=4000")  # the operand split holds: no held-out pair is trained on
    train_pairs = {tuple(row) for row in dm.sample_at(torch.arange(4000), train_stream(0))[:, :5].tolist()}
    held_pairs = {tuple(row) for row in dm.eval_set(CPU)[0, :, :5].tolist()}
    assert train_pairs and held_pairs and not train_pairs & held_pairs
    dm = task("parity_mlp", "data.n=64", "data.train_size=4096")  # parity: other streams, so other inputs
    x, _ = dm.samples_at(torch.arange(4096).expand(3, -1), [train_stream(m) for m in dm.members])
    held, _ = dm.eval_set(CPU)
    for m in range(3):
        assert not {tuple(r) for r in x[m].tolist()} & {tuple(r) for r in held[m].tolist()}
    assert dm.train_subset(CPU)[0].shape == (3, 64, 64)  # min(train_size, eval.size) training samples


@pytest.mark.parametrize("preset", ["parity_mlp", "cot_parity"])
def test_eval_measures_the_fit_of_a_finite_run_again(tmp_path, preset):
    """The fit eval.py records is the one the run's last evaluation recorded (summary.json), by both families."""
    run_dir = tmp_path / "run"
    done = train(tmp_path, f"experiment={preset}", f"run_dir={run_dir}", *RUN_SHORT[preset])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    _, record, _ = evaluate_run(run_dir)
    assert record["final_train_accuracy"] == summary["final_train_accuracy"] and record["step"] == summary["steps"]
    _, dm, module = load_run(run_dir)
    assert module.fit_metrics(dm) == {"final_train_accuracy": summary["final_train_accuracy"]}


@pytest.mark.parametrize("preset", ["parity_mlp", "cot_parity"])
def test_without_train_size_the_stream_and_the_state_dict_are_unchanged(preset):
    cfg = compose([f"experiment={preset}", "data.batch_size=8"])
    dm, model = build(cfg)
    assert cfg.data.train_size is None
    assert not any(key.startswith(("fit_step", "train_score")) for key in model.state_dict())
    batch = tensors(dm.generate(Ticket(step=3, steps=2, rank=0, world_size=1), CPU))
    if dm.format == "sequence":
        assert torch.equal(batch[0][0].reshape(16, -1), dm.sample(24, 16, train_stream(0), CPU))
    else:
        x, y = dm.samples(24, 16, [train_stream(0)], CPU)
        assert torch.equal(pm1(batch[0][0].reshape(16, -1)), x[0]) and torch.equal(batch[1][0].reshape(16), y[0])
    assert eval_stream(0) != train_stream(0)


REFUSED = [("data.train_size=16", "data.train_size: 16 is smaller than data.batch_size 32"),
           ("data.n=10 data.train_size=2000",
            "data.train_size: 2000 exceeds the 1024 distinct inputs of the parity task with data.n=10"),
           ("data.train_size=4611686018427387905", "data.train_size: 4611686018427387905 is beyond the 2**62 samples"),
           ("experiment=multiply_cot data.digits=1 data.batch_size=8 data.train_size=100",
            "data.train_size: 100 exceeds the 81 distinct inputs of the multiply task")]


@pytest.mark.parametrize("args, message", REFUSED, ids=[a for a, _ in REFUSED])
def test_an_impossible_training_set_is_refused_in_one_line(args, message):
    with pytest.raises(ConfigError) as err:
        compose(args.split())
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


# --- whole runs: fit beside held-out accuracy, resume mid-epoch ------------------------------------------
RUN = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "data.n=12", "data.k=3", "data.train_size=224",
       "optim.momentum=0.9", "trainer.max_steps=400", "eval.every_n_steps=50", "checkpoint.every_n_steps=150",
       "eval.size=512", "eval.hidden_progress=true"]  # a checkpoint at step 150: sample 4800 of 224-sample epochs


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


DDP = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "data.n=20", "model.ensemble=2", "data.train_size=80",
       "trainer.max_steps=50", "eval.every_n_steps=50", "checkpoint.every_n_steps=50", "eval.size=256"]


def test_whole_runs_resume_mid_epoch_shard_over_ranks_and_record_their_fit(tmp_path):
    """One batch of runs: killed mid-epoch and resumed against uninterrupted (bitwise); 2 DDP ranks against one
    process (float summation apart); the fit the MLP records (the next-token model's: tests/test_scripts.py's
    cot_vs_samples run); a refusal."""
    done = train_all(tmp_path, {"whole": [f"run_dir={tmp_path / 'whole'}", *RUN],
                                "killed": [f"run_dir={tmp_path / 'killed'}", *RUN],
                                "one": [f"run_dir={tmp_path / 'one'}", *DDP],
                                "ddp": [f"run_dir={tmp_path / 'ddp'}", *DDP, "trainer.devices=2", "trainer.strategy=ddp"],
                                "refused": ["data.train_size=8", f"run_dir={tmp_path / 'refused'}"]},
                     envs={"killed": {**clean_env(), KILL_AT_STEP_ENV: "230"}})
    for name in ("one", "ddp"):
        assert done[name].returncode == 0, done[name].stderr[-2000:]
    one, ddp = checkpoint(tmp_path / "one")["state_dict"], checkpoint(tmp_path / "ddp")["state_dict"]
    for name, tensor in one.items():
        scale = tensor.double().abs().max().item()
        assert torch.allclose(ddp[name].double(), tensor.double(), rtol=1e-5, atol=1e-5 * scale), name
    assert done["whole"].returncode == 0, done["whole"].stderr[-2000:]
    assert done["killed"].returncode == -signal.SIGKILL and checkpoint(tmp_path / "killed")["global_step"] == 150
    one_error_line(done["refused"], "data.train_size: 8 is smaller than data.batch_size 32")
    assert not (tmp_path / "refused").exists()
    resumed = train(tmp_path, f"run_dir={tmp_path / 'killed'}", *RUN, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    mine, reference = checkpoint(tmp_path / "killed"), checkpoint(tmp_path / "whole")
    assert mine["global_step"] == reference["global_step"] == 400
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(mine["state_dict"][name], tensor), name  # bitwise, fit_step included

    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["train_size"] == 224 and summary["final_train_accuracy"] == 1.0
    assert isinstance(summary["fit_step"], int) and summary["fit_step"] % 50 == 0
    curves = scalars(tmp_path / "whole")
    fit = [step for step, value in curves["train_set/accuracy"] if value == 1.0]
    assert fit[0] == summary["fit_step"] and {"eval/accuracy_mean", "hidden/fourier_gap_mean"} <= curves.keys()
    assert scalars(tmp_path / "killed")["train_set/accuracy"] == curves["train_set/accuracy"]
    _, record, _ = evaluate_run(tmp_path / "whole")  # eval.py measures the fit again
    assert {key: record[key] for key in ("final_accuracy", "final_train_accuracy")} == {
        key: summary[key] for key in ("final_accuracy", "final_train_accuracy")}
