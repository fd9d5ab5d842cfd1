"""The worked example of docs/extending.md: a new task is its two files and a preset, and nothing else.

The test takes the project without them (the task is then unknown), adds exactly those three files, and trains
the preset to solved: no other file can be what makes it work, whatever any file says.
"""
import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, clean_env

EXAMPLE = ["datamodules/majority_config.py", "datamodules/majority.py", "configs/experiment/majority_mlp.yaml"]


def project_without_the_example(tmp_path: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert set(EXAMPLE) <= set(files)
    for name in set(files) - set(EXAMPLE):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    return tmp_path


def train(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**clean_env(), "PYTHONPATH": str(root)}  # this tree, not the installed one
    return subprocess.run([sys.executable, str(root / "train.py"), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_new_task_is_its_files_and_they_train_to_solved(tmp_path):
    root = project_without_the_example(tmp_path / "project")
    before = train(root, "data.task=majority")
    assert before.returncode == 2 and before.stderr.startswith("error: data.task: unknown task 'majority'")
    for name in EXAMPLE:
        (root / name).write_bytes((ROOT / name).read_bytes())
    run_dir = tmp_path / "run"
    done = train(root, "experiment=majority_mlp", "trainer=cpu", f"run_dir={run_dir}", "trainer.progress_bar=false",
                 "trainer.max_steps=1000")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "majority" and summary["final_accuracy"] == 1.0
    assert summary["solved_step"] is not None and summary["solved_step"] <= 1000
    refused = train(root, "experiment=majority_mlp", "data.noise=0.1")
    assert refused.stderr.strip() == "error: data.noise: does not apply to the majority task with model mlp"
