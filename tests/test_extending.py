"""The worked example of docs/extending.md: a new task is one file and one preset, and it trains."""
import json
import subprocess
import sys
from pathlib import Path

from config import compose

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {Path("datamodules/majority.py"), Path("configs/experiment/majority_mlp.yaml")}


def test_the_new_task_is_named_only_in_its_file_and_preset():
    code = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".yaml") and ".venv" not in p.parts
            and "tests" not in p.relative_to(ROOT).parts and p.is_file()]
    naming = {p.relative_to(ROOT) for p in code if "majority" in p.read_text().lower()}
    assert naming == EXAMPLE


def test_the_new_task_composes_with_its_own_keys():
    cfg = compose(["experiment=majority_mlp"], machine=False)
    assert (cfg.data.task, cfg.data.n, cfg.data.k) == ("majority", 30, 5) and not hasattr(cfg.data, "noise")


def test_the_worked_example_trains_to_solved(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "experiment=majority_mlp", "trainer=cpu", f"run_dir={run_dir}",
                           "trainer.progress_bar=false", "trainer.max_steps=1000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "majority" and summary["final_accuracy"] == 1.0
    assert summary["solved_step"] is not None and summary["solved_step"] <= 1000
