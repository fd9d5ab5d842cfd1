"""A run the fork server starts (conftest.start) is the run a fresh interpreter makes: the same exit status,
output, files and weights; else every test that uses it would be testing something else."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

import forkserver
from conftest import FORK, ROOT, checkpoint, clean_env, finish, start

TIMING = ("samples_per_s", "train_wall_s", "peak_rss_mib")  # what differs between any two runs
ARGS = ["trainer=cpu", "trainer.progress_bar=false", "trainer.max_steps=20", "eval.every_n_steps=10",
        "checkpoint.every_n_steps=10", "data.n=20"]


def both(tmp_path, *args: str) -> dict[str, subprocess.CompletedProcess]:
    """train.py with ``args`` (``{run_dir}`` filled in), from the server and as a fresh process."""
    served = start([sys.executable, str(ROOT / "train.py"), *(a.format(run_dir=tmp_path / "served") for a in args)],
                   tmp_path)
    assert isinstance(served, forkserver.Child)
    fresh = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                              *(a.format(run_dir=tmp_path / "fresh") for a in args)],
                             cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return dict(zip(("served", "fresh"), finish(served, fresh)))


def masked(text: str, tmp_path) -> list[str]:
    """The output with each run's directory and its rate and wall time taken out."""
    return [line.split("  samples/s")[0].replace(str(tmp_path / "served"), "RUN").replace(str(tmp_path / "fresh"), "RUN")
            for line in text.splitlines()]


pytestmark = pytest.mark.skipif(not FORK, reason="the fork server is not used on a machine with a GPU")


def test_a_served_run_equals_a_fresh_one(tmp_path):
    done = both(tmp_path, "run_dir={run_dir}", *ARGS)
    assert done["served"].returncode == done["fresh"].returncode == 0, done["served"].stderr[-2000:]
    assert masked(done["served"].stdout, tmp_path) == masked(done["fresh"].stdout, tmp_path)
    assert done["served"].stderr == done["fresh"].stderr
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in done]
    assert [{k: v for k, v in s.items() if k not in TIMING} for s in summaries] == [
        {k: v for k, v in summaries[1].items() if k not in TIMING}] * 2
    configs = [yaml.safe_load((tmp_path / name / "config.yaml").read_text()) for name in done]
    assert [{**c, "run_dir": None} for c in configs] == [{**configs[1], "run_dir": None}] * 2
    weights = [checkpoint(tmp_path / name)["state_dict"] for name in done]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    events = [sorted(p.name.split(".")[-1] for p in (tmp_path / name / "tb").iterdir()) for name in done]
    assert events[0] == events[1]


@pytest.mark.parametrize("args", [["data.nn=3"], ["run_dir={run_dir}", "eval.size=0"], ["--help"]])
def test_a_served_refusal_equals_a_fresh_one(tmp_path, args):
    done = both(tmp_path, *args)
    assert done["served"].returncode == done["fresh"].returncode == 2
    assert masked(done["served"].stderr, tmp_path) == masked(done["fresh"].stderr, tmp_path)
    assert done["served"].stdout == done["fresh"].stdout == ""
    assert not (tmp_path / "served").exists() and not (tmp_path / "fresh").exists()
