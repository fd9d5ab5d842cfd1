"""train.py end to end: bad input, run directories, TensorBoard, one smoke run per experiment preset."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import CONFIG_DIR, ConfigError, compose
import conftest
from conftest import clean_env, one_error_line

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return conftest.train(cwd, "trainer.accelerator=cpu", "trainer.progress_bar=false", *args, timeout=timeout)


BAD = {
    "data.kk=3": "data.kk",
    "data.n=abc": "data.n",
    "experiment=nope": "experiment",
    "data.k=60": "data.k",
    "data.k=0": "data.k",
    "data.n=0": "data.n",
    "data.batch_size=0": "data.batch_size",
    "optim.lr=0": "optim.lr",
    "optim.lr=-1": "optim.lr",
    "data.noise=0.5": "data.noise",
    "data.noise=-0.1": "data.noise",
    "model.loss=mse": "model.loss",
    "trainer.devices=3 trainer.strategy=ddp data.batch_size=32": "data.batch_size",
}


@pytest.mark.parametrize("args", BAD)
def test_bad_input_is_refused_with_one_line_naming_the_key(args):
    with pytest.raises(ConfigError) as err:
        compose(["trainer.accelerator=cpu", *args.split()])  # what train.py composes first, printing the error
    assert str(err.value).startswith(f"{BAD[args]}: ") and "\n" not in str(err.value), str(err.value)


def test_train_py_prints_a_bad_input_in_one_line_exits_2_and_writes_nothing(tmp_path):
    one_error_line(train(tmp_path, "data.k=60", timeout=120), "data.k: must be <= data.n (50), got 60")
    assert not list(tmp_path.iterdir())


def test_compose_rejects_what_train_rejects():
    with pytest.raises(ConfigError, match="data.k"):
        compose(["data.k=51"])
    cfg = compose(["experiment=parity_mlp_ensemble", "data.n=40", "model.ensemble=5"])
    assert (cfg.data.n, cfg.model.ensemble, cfg.experiment) == (40, 5, "parity_mlp_ensemble")


def test_two_runs_started_together_get_distinct_run_dirs(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "trainer.accelerator=cpu", "trainer.progress_bar=false",
            "trainer.max_steps=100", "eval.every_n_steps=100"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
             for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    dirs = sorted((tmp_path / "runs" / "parity_mlp").iterdir())
    assert len(dirs) == 2 and all((d / "summary.json").exists() for d in dirs)


def test_run_dir_layout_and_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    done = train(tmp_path, f"run_dir={run_dir}", "experiment=parity_mlp_ensemble", "model.ensemble=3",
                 "data.n=30", "data.k=3", "trainer.max_steps=20000", "eval.every_n_steps=200")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["solved_step"]) == 3 and all(s is not None for s in summary["solved_step"])
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "eval/accuracy_mean", "eval/accuracy_min", "eval/members_solved",
                "perf/samples_per_s", "hparams/solved_step"):
        assert tag in scalars, (tag, scalars)
    solved = [e.value for e in events.Scalars("eval/members_solved")]
    assert solved[-1] == 3 and solved == sorted(solved)
    evaluated = [e.step for e in events.Scalars("eval/accuracy_mean")]  # once per evaluation, on the SGD step axis
    assert evaluated == list(range(200, evaluated[-1] + 1, 200)), evaluated
    assert events.Scalars("hparams/solved_step")[-1].value == sorted(summary["solved_step"])[1]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_runs(preset_runs, preset):
    run_dir, done = preset_runs[preset]  # 20 steps, an evaluation every 10 (conftest.PRESET_RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"] == preset and summary["steps"] <= 20
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    score = next(key for key in summary if key.startswith("final_"))[len("final_"):]  # accuracy, relative_mse
    tag = next(t for t in (f"eval/{score}_mean", "eval/greedy_accuracy") if t in events.Tags()["scalars"])
    evaluated = [e.step for e in events.Scalars(tag)]  # SGD steps, each evaluation written once
    assert evaluated == list(range(10, summary["steps"] + 1, 10)), evaluated
    assert [e.step for e in events.Scalars("train/loss")][-1] == summary["steps"]


MACHINE = {  # requests this machine cannot meet: refused before Lightning or a run directory sees them
    "trainer.accelerator=tpu": "trainer.accelerator: 'tpu' is not one of auto, cpu, gpu, cuda",
    "trainer.devices=[0,0] trainer.accelerator=cpu": "trainer.devices: [0, 0] names a device more than once",
    "trainer.num_nodes=2 trainer.accelerator=cpu": "trainer.num_nodes: 2 nodes need a cluster launcher",
    "trainer.strategy=fsdp trainer.accelerator=cpu": "trainer.strategy: 'fsdp' is not one of auto, ddp,",
    "trainer.devices=[0] trainer.accelerator=cpu": "trainer.devices: a CPU run takes a count of processes",
}
if not torch.cuda.is_available():
    MACHINE.update({"trainer=gpu": "trainer.accelerator: 'gpu' needs a CUDA GPU",
                    "trainer.accelerator=gpu": "trainer.accelerator: 'gpu' needs a CUDA GPU"})


@conftest.early
def machine_refusals(tmp: Path, jobs: int) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """train.py given each MACHINE request in a directory of its own: request -> (that directory, result)."""
    cwds = {args: tmp / str(i) for i, args in enumerate(MACHINE)}
    for cwd in cwds.values():
        cwd.mkdir()
    done = conftest.at_once({args: functools.partial(conftest.train, cwds[args], "trainer.progress_bar=false",
                                                     *args.split(), timeout=120) for args in MACHINE}, jobs)
    return {args: (cwds[args], done[args]) for args in MACHINE}


@pytest.mark.parametrize("args", MACHINE)
def test_requests_the_machine_cannot_meet_are_one_line_and_write_nothing(machine_refusals, args):
    cwd, done = machine_refusals[args]
    one_error_line(done, MACHINE[args])
    assert not list(cwd.iterdir())


def test_a_run_that_ends_in_its_first_batch_reports_its_rate(tmp_path):
    done = train(tmp_path, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1", "eval.every_n_steps=1",
                 "checkpoint.every_n_steps=1", "eval.size=64")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples_per_s"] > 0


def test_ddp_spawn_workers_are_quiet_and_their_figures_reach_the_summary(tmp_path):
    done = train(tmp_path, f"run_dir={tmp_path / 'run'}", "trainer.devices=2", "trainer.strategy=ddp_spawn",
                 "trainer.max_steps=100", "eval.every_n_steps=50", "checkpoint.every_n_steps=50", "eval.size=64")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.strip() == "", done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_per_s"] > 0 and summary["train_wall_s"] > 0 and summary["world_size"] == 2


# --- steps per Lightning batch: a speed choice that changes nothing else --------------------------------
def test_steps_per_batch_grows_only_where_a_step_s_data_is_small():
    from config import task_class
    from datamodules.stream import batch_sizes
    from datamodules.stream import steps_per_batch

    def chosen(*overrides: str) -> int:
        cfg = compose(list(overrides))
        steps = steps_per_batch(cfg, 1, task_class(cfg.data.task).step_bytes(cfg))
        assert batch_sizes(cfg)[0][1] == min(steps, cfg.trainer.max_steps)  # the memory check counts the same batch
        return steps

    assert chosen() == 500  # the default run: 32 x 50 inputs a step
    assert chosen("eval.every_n_steps=700", "checkpoint.every_n_steps=7000") == 350  # largest divisor of the schedule
    assert chosen("model.ensemble=64") == 100  # 64 members' data a step: the usual 100
    assert chosen("experiment=cot_parity", "eval.every_n_steps=500", "data.batch_size=1024") == 100  # int64 tokens
    assert chosen("trainer.steps_per_batch=250") == 250


def test_a_long_batch_trains_and_logs_what_short_ones_do(tmp_path):
    """The default run's 500-step batches against 100-step ones: the same weights, bit for bit, and train/loss
    at the same steps (every 100) with the same values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = ["trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.max_steps=1000",
           "eval.hidden_progress=false"]
    done = conftest.train_all(tmp_path, {steps: [f"run_dir={tmp_path / steps}", *run,  # the two at once
                                                 f"trainer.steps_per_batch={steps}"] for steps in ("0", "100")})
    runs = {}
    for steps, result in done.items():
        assert result.returncode == 0, result.stderr[-2000:]
        events = EventAccumulator(str(tmp_path / steps / "tb"), size_guidance={"scalars": 0}).Reload()
        runs[steps] = (conftest.checkpoint(tmp_path / steps)["state_dict"],
                       [(e.step, e.value) for e in events.Scalars("train/loss")])
    (long_weights, long_losses), (short_weights, short_losses) = runs["0"], runs["100"]
    for name in ("net.w1", "net.b1", "net.w2", "net.b2"):
        assert torch.equal(long_weights[name], short_weights[name]), name
    assert [step for step, _ in long_losses] == list(range(100, 1001, 100))
    assert long_losses == short_losses
