"""eval.py and load_run: a finished run evaluated again reproduces its summary exactly; what they refuse and write."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from config import CONFIG_DIR, ConfigError, compose, to_yaml
from conftest import checkpoint, early, eval_py, one_error_line, train
from runtime.experiment import evaluate_run, load_run

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
METRICS = ("final_accuracy", "greedy_accuracy", "token_accuracy", "chain_accuracy")
SCORES = ("score", "accuracy")  # the held-out score a module records: the MLP's (its task's measure), next-token's
TINY = ("trainer=cpu", "trainer.progress_bar=false", "trainer.max_steps=20", "eval.every_n_steps=10",
        "checkpoint.every_n_steps=10", "eval.size=256")


def trained(run_dir: Path, *args: str) -> dict:
    """The summary of a tiny train.py run into ``run_dir``."""
    done = train(run_dir.parent, f"run_dir={run_dir}", *TINY, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((run_dir / "summary.json").read_text())


def spoil_recorded_accuracy(run_dir: Path) -> None:
    """Overwrite the score the checkpoint recorded at its last evaluation: an evaluation must measure."""
    state = checkpoint(run_dir)
    next(state["state_dict"][name] for name in SCORES if name in state["state_dict"]).fill_(-1.0)
    torch.save(state, run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_reproduces_the_summary_of_every_preset(tmp_path, preset_runs, preset):
    trained_run, done = preset_runs[preset]
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    spoil_recorded_accuracy(run_dir)
    threads = torch.get_num_threads()
    try:
        path, record, written = evaluate_run(run_dir)  # what eval.py runs and prints (test_eval_py_...)
    finally:
        torch.set_num_threads(threads)
    assert (path, written) == (run_dir / "eval.json", True) and json.loads(path.read_text()) == record
    metrics = [key for key in summary if key in METRICS or key.startswith("final_")]
    final = "final_relative_mse" if summary["task"] == "staircase" else "final_accuracy"
    assert metrics == (list(METRICS) if "greedy_accuracy" in summary else [final])
    assert {key: record[key] for key in metrics} == {key: summary[key] for key in metrics}
    assert (record["step"], record["eval_size"], record["overrides"]) == (summary["steps"], 64, {})
    assert record["members"] == summary["members"] and record["device"] == "cpu"


@early
def run(tmp: Path, jobs: int) -> tuple[Path, dict]:
    """A finished two-member parity run and its summary (copy it before changing it)."""
    return tmp / "run", trained(tmp / "run", "experiment=parity_mlp_ensemble", "model.ensemble=2", "data.n=30")


def copied(run: tuple[Path, dict], where: Path) -> Path:
    shutil.copytree(run[0], where / "run")
    return where / "run"


def test_eval_py_writes_eval_json_and_says_so_in_one_line(run, tmp_path):
    run_dir = copied(run, tmp_path)
    spoil_recorded_accuracy(run_dir)
    done = eval_py(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1 and str(run_dir / "eval.json") in done.stdout
    assert json.loads((run_dir / "eval.json").read_text())["final_accuracy"] == run[1]["final_accuracy"]


def test_load_run_rebuilds_the_trained_module(run):
    run_dir, summary = run
    cfg, dm, module = load_run(run_dir)
    assert (cfg.experiment, cfg.data.n, cfg.model.ensemble) == ("parity_mlp_ensemble", 30, 2)
    stored = checkpoint(run_dir)["state_dict"]
    assert all(torch.equal(tensor, stored[name]) for name, tensor in module.state_dict().items())
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.trainer.cpu_threads)  # as training ran
    try:
        assert module.metrics(module.measure(dm)) == {"final_accuracy": summary["final_accuracy"]}
    finally:
        torch.set_num_threads(threads)
    cfg, dm, module = load_run(run_dir, ["eval.size=512"])
    assert cfg.eval.size == 512 and dm.eval_set(module.device)[0].shape == (2, 512, 30)


def test_overrides_get_their_own_file_and_an_existing_other_evaluation_is_never_overwritten(run, tmp_path):
    run_dir = copied(run, tmp_path)
    path, record, written = evaluate_run(run_dir)
    assert path == run_dir / "eval.json" and written
    own = path.read_bytes()
    assert evaluate_run(run_dir, ["eval.size=256", "trainer.accelerator=cpu"]) == (path, record, False)  # the run's own
    larger, bigger, written = evaluate_run(run_dir, ["eval.size=2048"])
    assert larger == run_dir / "eval-eval.size=2048.json" and written
    assert (bigger["eval_size"], bigger["overrides"], bigger["step"]) == (2048, {"eval.size": 2048}, record["step"])
    assert json.loads(larger.read_text()) == bigger and path.read_bytes() == own
    path.write_text(json.dumps({**record, "step": record["step"] - 10}))  # an evaluation of an earlier checkpoint
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^run_dir: .*eval.json holds another evaluation \(differs in step\)"):
        evaluate_run(run_dir)
    assert path.read_bytes() == before


REFUSED = {  # overrides that would change what was trained, or that are no key of the run
    "data.n=20": "data.n: fixed by what the run trained",
    "seed=1": "seed: fixed by what the run trained",
    "model.width=10": "model.width: fixed by what the run trained",
    "optim.lr=0.5": "optim.lr: fixed by what the run trained",
    "trainer.max_steps=40": "trainer.max_steps: fixed by what the run trained",
    "eval.size=0": "eval.size: must be >= 1",
    "eval.size=abc": "eval.size: ",
    "kernels.backend=cuda": "kernels.backend: 'cuda' is not one of",
    "eval.size": "argument 'eval.size': expected key=value",
}


@pytest.mark.parametrize("arg", REFUSED)
def test_overrides_that_change_what_was_trained_are_refused(run, arg):
    with pytest.raises(ConfigError, match=f"^{REFUSED[arg]}"):
        load_run(run[0], [arg])


def test_an_option_of_another_model_family_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text(to_yaml(compose(["experiment=cot_parity"])))
    with pytest.raises(ConfigError, match="^kernels.compile: does not apply to model next_token/transformer"):
        load_run(tmp_path, ["kernels.compile=true"])


def test_a_checkpoint_of_another_problem_or_shape_is_refused(run, tmp_path):
    run_dir = copied(run, tmp_path)
    cfg = compose(["experiment=parity_mlp_ensemble", "model.ensemble=2", "data.n=30", *TINY, "seed=1"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ConfigError, match=r"does not match .*config.yaml \(identity: seed 0 in the checkpoint, 1"):
        load_run(run_dir)
    cfg = compose(["experiment=parity_mlp_ensemble", "model.ensemble=2", "data.n=30", *TINY, "model.width=7"])
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ConfigError, match=r"\(settings: model.width 100 in the checkpoint, 7 in the config\)"):
        load_run(run_dir)
    assert not list(run_dir.glob("eval*.json"))


def test_evaluation_refusals_are_one_line_and_write_nothing(run, tmp_path):
    (tmp_path / "no_checkpoint").mkdir()
    shutil.copy(run[0] / "config.yaml", tmp_path / "no_checkpoint")
    (tmp_path / "no_config").mkdir()
    cases = {(tmp_path / "missing",): "run_dir: ", (tmp_path / "no_config",): "run_dir: ",
             (tmp_path / "no_checkpoint",): "run_dir: ", (run[0], "data.k=2"): "data.k: fixed by what the run trained"}
    for (run_dir, *overrides), prefix in cases.items():
        with pytest.raises(ConfigError, match=f"^{prefix}") as refused:  # eval.py prints it (test_eval_py_...)
            evaluate_run(run_dir, overrides)
        line = str(refused.value)
        assert "\n" not in line and (str(run_dir) in line or overrides), line
    assert not list(tmp_path.rglob("eval*.json")) and not list(run[0].glob("eval*.json"))


def test_eval_py_refuses_in_one_line_with_exit_2_and_writes_nothing(run):
    one_error_line(eval_py(run[0], "data.k=2"), "data.k: fixed by what the run trained")
    assert not list(run[0].glob("eval*.json"))
