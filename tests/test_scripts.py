"""The experiment scripts of docs/results.md, each run end to end on a grid small enough to solve in seconds."""
import csv
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

TIMEOUT = 600


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_cot_vs_k_solves_k_2_with_the_gate_chain(tmp_path):
    done = run("cot_vs_k.py", "--out", str(tmp_path / "out"), "--k", "2", "--budget", "300", "--chains", "gates")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "cot_vs_k.csv")))
    assert [(r["chain"], r["k"]) for r in rows] == [("gates", "2")] and int(rows[0]["solved_step"]) <= 300
    assert (tmp_path / "out" / "cot_vs_k.png").stat().st_size > 0


def test_chain_stride_runs_its_grid_and_stops_after_unsolved_strides(tmp_path):
    done = run("chain_stride.py", "--out", str(tmp_path / "out"), "--kinds", "mlp", "--n", "8", "--k", "4",
               "--strides", "1", "4", "--budget", "300")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["stride"]: r for r in csv.DictReader(open(tmp_path / "out" / "chain_stride.csv"))}
    assert set(rows) == {"1", "4"} and rows["1"]["solved_step"] != ""  # stride 1: the sequential chain
    assert "| 1 |" in (tmp_path / "out" / "chain_stride.md").read_text()


def test_staircase_vs_parity_tabulates_both_tasks(tmp_path):
    done = run("staircase_vs_parity.py", "--out", str(tmp_path / "out"), "--k", "1", "--n", "4", "--at-n", "4",
               "--at-k", "1", "--budget", "500")
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "out" / "staircase_vs_parity.md").read_text()
    assert "staircase" in table and "parity" in table and "(16/16)" in table, table  # k = 1: a copy, every member


@pytest.mark.parametrize("script", ["cot_vs_k.py", "chain_stride.py", "staircase_vs_parity.py"])
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, script):
    done = run(script, "--out", str(tmp_path / "out"), "--k", "0")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and not (tmp_path / "out").exists()
