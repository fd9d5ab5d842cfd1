"""The experiment scripts of docs/results.md, each run end to end on a grid small enough to solve in seconds."""
import csv
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, at_once, clean_env, early

TIMEOUT = 600


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


GRIDS = {  # each script's grid, small enough to solve in seconds
    "cot_vs_k.py": ["--k", "2", "--budget", "300", "--chains", "gates"],
    "chain_stride.py": ["--kinds", "mlp", "--n", "8", "--k", "4", "--strides", "1", "4", "--budget", "300"],
    "staircase_vs_parity.py": ["--k", "1", "--n", "4", "--at-n", "4", "--at-k", "1", "--budget", "500", "--jobs", "2"],
    "circuits.py": ["--circuits", "c17", "--kinds", "linear", "--chains", "gates", "--budget", "400"],
    "sample_complexity.py": ["--n", "8", "--k", "2", "--sizes", "128", "--widths", "16", "--inits", "sparse",
                             "--members", "2", "--weight-decay", "0.01", "--budget", "400", "--every", "100"],
    "grokking.py": ["--n", "8", "--k", "2", "--size", "128", "--weight-decays", "0.01", "--budget", "400",
                    "--every", "100"],
    "cot_vs_samples.py": ["--kinds", "mlp", "--chains", "sequential", "--sizes", "64", "--budget", "200",
                          "--set", "data.n=8", "data.k=2", "eval.size=64", "eval.every_n_steps=50"],
}


@early
def grids(tmp: Path, jobs: int) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Each script run on its grid: script -> (its --out, its result)."""
    outs = {script: tmp / script.removesuffix(".py") for script in GRIDS}
    done = at_once({script: functools.partial(run, script, "--out", str(outs[script]), *args)
                    for script, args in GRIDS.items()}, jobs)
    return {script: (outs[script], done[script]) for script in GRIDS}


def test_cot_vs_k_solves_k_2_with_the_gate_chain(grids):
    out, done = grids["cot_vs_k.py"]
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "cot_vs_k.csv")))
    assert [(r["chain"], r["k"]) for r in rows] == [("gates", "2")] and int(rows[0]["solved_step"]) <= 300
    assert (out / "cot_vs_k.png").stat().st_size > 0


def test_chain_stride_runs_its_grid_and_stops_after_unsolved_strides(grids):
    out, done = grids["chain_stride.py"]
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["stride"]: r for r in csv.DictReader(open(out / "chain_stride.csv"))}
    assert set(rows) == {"1", "4"} and rows["1"]["solved_step"] != ""  # stride 1: the sequential chain
    assert "| 1 |" in (out / "chain_stride.md").read_text()


def test_staircase_vs_parity_tabulates_both_tasks(grids):
    out, done = grids["staircase_vs_parity.py"]
    assert done.returncode == 0, done.stderr[-2000:]
    table = (out / "staircase_vs_parity.md").read_text()
    assert "staircase" in table and "parity" in table and "(16/16)" in table, table  # k = 1: a copy, every member


def test_circuits_learns_c17_with_its_gates_and_scores_the_trivial_predictor(grids):
    out, done = grids["circuits.py"]
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = list(csv.DictReader(open(out / "circuits.csv")))
    assert (row["circuit"], row["inputs"], row["cone_gates"], row["seq_len"]) == ("c17", "5", "6", "14")
    assert float(row["final_accuracy"]) == 1.0 and float(row["beyond_trivial"]) == 1.0
    assert 0.0 < float(row["trivial_exact"]) < 1.0  # c17's outputs are no constant or copied input
    assert "| c17 |" in (out / "circuits.md").read_text() and (out / "circuits.png").stat().st_size > 0


def test_circuits_refuses_an_unknown_circuit_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main("circuits.py")(["--out", str(tmp_path / "out"), "--circuits", "c9999", "--kinds", "linear"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: c9999-linear-gates: data.netlist: 'c9999' is not a "
                                                      "readable .v or .bench file"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def main(script: str):
    """The script's main, imported here (scripts/ is no package: its cli.py comes from sys.path)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def finished(grids, script: str) -> tuple[Path, list[dict]]:
    """The script's --out and the rows of its CSV, after checking it exited 0."""
    out, done = grids[script]
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / script.replace(".py", ".csv")) as f:
        return out, list(csv.DictReader(f))


def test_sample_complexity_tabulates_members_solved_and_fit_against_n(grids):
    out, rows = finished(grids, "sample_complexity.py")
    assert len(rows) == 2 * 2 and {r["train_size"] for r in rows} == {"128", "0"}  # a size and online
    assert all(r["fit_step"] for r in rows if r["train_size"] == "128")  # 128 samples of (8, 2) parity: fit
    markdown = (out / "sample_complexity.md").read_text()
    assert "| sparse | 16 |" in markdown and "Smallest N at which at least half the members solve" in markdown
    assert (out / "sample_complexity.png").stat().st_size > 0


def test_grokking_reports_fit_and_solve_steps(grids):
    out, done = grids["grokking.py"]
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in (out / "grokking.md").read_text().splitlines() if line.startswith("| 0.01 |"))
    fit, solved = (int(cell) for cell in row.split("|")[2:4])
    assert fit <= solved and (out / "grokking.png").stat().st_size > 0


def test_cot_vs_samples_tabulates_the_chain_against_n(grids):
    out, rows = finished(grids, "cot_vs_samples.py")
    assert [(r["kind"], r["chain"], r["train_size"]) for r in rows] == [("mlp", "sequential", "64"),
                                                                        ("mlp", "sequential", "0")]
    assert rows[0]["fit_step"] and 0 < float(rows[0]["final_train_accuracy"]) <= 1  # the next-token fit
    assert "Smallest N at which the run solves" in (out / "cot_vs_samples.md").read_text()


@pytest.mark.parametrize("script", ["cot_vs_k.py", "chain_stride.py", "staircase_vs_parity.py", "sample_complexity.py",
                                    "grokking.py"])
def test_a_bad_option_is_one_line_and_exit_2(tmp_path, capsys, script):
    with pytest.raises(SystemExit) as exited:
        main(script)(["--out", str(tmp_path / "out"), "--k", "0"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --k: ") and not (tmp_path / "out").exists()


def test_a_script_refuses_a_bad_option_in_one_line_with_exit_2(tmp_path):
    done = run("chain_stride.py", "--out", str(tmp_path / "out"), "--k", "0")
    assert (done.returncode, done.stdout) == (2, "") and done.stderr.startswith("error: --k: "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_train_py_refusal_is_one_line_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main("cot_vs_k.py")(["--out", str(tmp_path / "out"), "--k", "2", "--set", "model.heads=5"])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err == "error: none-k2-seed0: model.heads: must divide model.d_model (64), got 5\n"
    assert not (tmp_path / "out").exists()
