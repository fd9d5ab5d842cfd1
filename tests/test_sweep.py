"""sweep.py end to end: bad input, SLURM array, censoring, the fit, failing and stopped cells."""
import csv
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sweep as sweep_py
from config import compose, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep(capsys, *args: str) -> subprocess.CompletedProcess:
    """sweep.py's main in this process, as a finished process (test_sweep_py_* run the script itself)."""
    status = sweep_py.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["sweep.py", *args], status, out, err)


def cell_args(out: Path) -> dict[str, list[str]]:
    """The train.py arguments of every cell, as sweep.py --slurm wrote them to DIR/cells.txt."""
    commands = [shlex.split(line) for line in (out / "cells.txt").read_text().splitlines()]
    return {Path(next(a for a in c if a.startswith("run_dir="))[8:]).name: c[2:] for c in commands}


@pytest.mark.parametrize("args", [
    ["--grid", "data.n=20,30"],  # no --out
    ["--grid", "data.n=20,abc", "--out", "{out}"],  # a value that is not an int
    ["--grid", "data.n=20", "--grid", "data.k=25", "--out", "{out}"],  # k > n
    ["--grid", "data.nn=20", "--out", "{out}"],  # unknown key
    ["--grid", "data.n=20,", "--out", "{out}"],  # empty value
    ["--grid", "data.n=20,20", "--out", "{out}"],  # repeated value
    ["--grid", "data.k=2,3", "--with", "trainer.max_steps=100", "--out", "{out}"],  # --with length
    ["--with", "trainer.max_steps=100", "--grid", "data.k=2", "--out", "{out}"],  # --with before any --grid
    ["data.n=30", "--grid", "data.n=20,40", "--out", "{out}"],  # swept and fixed
    ["--grid", "data.n=20", "run_dir=x", "--out", "{out}"],
    ["--grid", "data.n=20", "--jobs", "0", "--out", "{out}"],
    ["--out", "{out}"],  # no grid
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args):
    out = tmp_path / "sweep"
    result = sweep(capsys, *(a.format(out=out) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_sweep_py_refuses_bad_input_with_exit_2_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "sweep.py", "--grid", "data.n=20", "--grid", "data.k=25", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == "error: cell data.n=20_data.k=25: data.k: must be <= data.n (20), got 25\n"
    assert not out.exists()


def test_tiny_grid_slurm_task_then_local_run_writes_results_with_censored_members(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["experiment=parity_mlp", "--grid", "data.n=10,12", "data.k=3", "model.ensemble=4",
            "--with", "eval.every_n_steps=100,50", "trainer.max_steps=300", "eval.hidden_progress=false",
            "--out", str(out)]
    slurm = sweep(capsys, *args, "--slurm")
    assert slurm.returncode == 0, slurm.stderr
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1\n" in script and len((out / "cells.txt").read_text().splitlines()) == 2
    assert not list((out / "runs").iterdir())  # --slurm only writes the job
    task = subprocess.run(["bash", str(out / "sweep.sbatch")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})  # what array task 0 would run
    assert task.returncode == 0, task.stderr
    first = sorted(cell_args(out))[0]
    assert (out / "runs" / first / "summary.json").is_file()

    local = sweep(capsys, *args)  # reuses the cell the array task trained, trains the other one
    assert local.returncode == 0, local.stderr
    assert f"{first}: reused" in local.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["data.n"] for r in rows} == {"10", "12"}
    assert all(r["budget"] == "300" and r["seed"] == "0" for r in rows)
    censored = [r for r in rows if r["censored"] == "1"]
    assert censored and all(r["solved_step"] == "" for r in censored)  # counted, not dropped
    results = json.loads((out / "results.json").read_text())
    by_n = {c["n"]: c for c in results["cells"]}
    for n in (10, 12):
        steps = sorted(float(r["solved_step"] or "inf") for r in rows if r["data.n"] == str(n))
        median = (steps[1] + steps[2]) / 2
        assert by_n[n]["median_censored"] == (median == float("inf"))
        assert by_n[n]["success_probability"] == sum(s < float("inf") for s in steps) / 4
    assert by_n[12]["median_censored"], "the budget is chosen so that n=12 is censored"
    fit = results["fits"][0]
    assert fit["excluded_censored"] == ["data.n=12"] and fit["exponent"] is None  # one point: no fit
    assert (out / "scaling.png").stat().st_size > 1000


def test_fit_recovers_a_known_exponent_from_synthetic_runs(tmp_path, capsys):
    """Cells whose summaries follow median ~ c n^(alpha k) with noise and censoring: the fit finds alpha."""
    out = tmp_path / "sweep"
    ns, alpha, members, budget = [16, 24, 32, 48, 64, 96], 0.8, 31, 200_000
    args = ["experiment=parity_mlp", "--grid", f"data.n={','.join(map(str, ns))}", "--grid", "data.k=2,3",
            f"model.ensemble={members}", f"trainer.max_steps={budget}", "--out", str(out)]
    assert sweep(capsys, *args, "--slurm").returncode == 0
    rng = np.random.default_rng(1)
    for name, train_args in cell_args(out).items():
        cfg = compose(train_args)
        n, k = cfg.data.n, cfg.data.k
        steps = 3.0 * n ** (alpha * k) * rng.lognormal(0.0, 0.3, members)
        solved = [int(s) if s <= budget else None for s in steps]
        if (n, k) == (96, 3):  # a cell mostly beyond the budget: its median is censored
            solved = [None] * 20 + solved[:11]
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "summary.json").write_text(json.dumps({
            "solved_step": solved, "final_accuracy": [1.0 if s else 0.5 for s in solved],
            "members": list(range(members))}))
    result = sweep(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("reused") == 12  # nothing was trained
    fits = {f["k"]: f for f in json.loads((out / "results.json").read_text())["fits"]}
    for k in (2, 3):
        fit = fits[k]
        assert fit["exponent"] == pytest.approx(alpha * k, abs=0.12)
        lo, hi = fit["exponent_ci95"]
        assert lo < alpha * k < hi and hi - lo < 0.5
        assert fit["alpha"] == pytest.approx(fit["exponent"] / k)
    assert fits[3]["excluded_censored"] == ["data.n=96_data.k=3"] and len(fits[3]["cells"]) == 5
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 12 * members and sum(r["censored"] == "1" for r in rows) >= 20


@pytest.mark.parametrize("successes, trials, interval", [
    (0, 16, (0.0, 0.2059)), (16, 16, (0.7941, 1.0)), (8, 16, (0.2465, 0.7535)),  # 1 - 0.025**(1/16) = 0.2059
    (1, 10, (0.00253, 0.4450)), (5, 10, (0.1871, 0.8129)), (0, 1, (0.0, 0.975)), (1, 1, (0.025, 1.0)),
])
def test_clopper_pearson_interval_matches_known_values(successes, trials, interval):
    from metrics.scaling import binomial_cdf, clopper_pearson
    lower, upper = clopper_pearson(successes, trials)
    assert (lower, upper) == pytest.approx(interval, abs=6e-5)
    if 0 < successes < trials:  # each bound puts exactly 2.5% in its tail
        assert 1 - binomial_cdf(successes - 1, trials, lower) == pytest.approx(0.025, abs=1e-12)
        assert binomial_cdf(successes, trials, upper) == pytest.approx(0.025, abs=1e-12)


def test_next_token_cells_give_per_member_rows_and_an_exact_interval(tmp_path, capsys):
    """Next-token cells, an ensemble (lists per member) and a single model (plain values), from synthetic
    summaries: every member's row, its token and chain accuracy, and the printed success interval."""
    out = tmp_path / "sweep"
    args = ["experiment=tree_cot_parity", "--grid", "model.ensemble=1,4", "--out", str(out)]
    assert sweep(capsys, *args, "--slurm").returncode == 0
    solved = {1: None, 4: [300, None, 1100, 900]}
    for name, train_args in cell_args(out).items():
        cfg = compose(train_args)
        e, steps = cfg.model.ensemble, solved[cfg.model.ensemble]
        per_member = (lambda values: values) if e > 1 else (lambda values: values[0])
        greedy = [1.0 if s else 0.5 for s in (steps if e > 1 else [steps])]
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "summary.json").write_text(json.dumps({
            "solved_step": steps, "final_accuracy": per_member(greedy), "greedy_accuracy": per_member(greedy),
            "token_accuracy": per_member([0.9 + i / 100 for i in range(e)]),
            "chain_accuracy": per_member([g - 0.5 for g in greedy]), "members": list(range(e)), "steps": 3000}))
    result = sweep(capsys, *args)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    ensemble = [r for r in rows if r["model.ensemble"] == "4"]
    assert [r["solved_step"] for r in ensemble] == ["300", "", "1100", "900"]
    assert [r["token_accuracy"] for r in ensemble] == ["0.9", "0.91", "0.92", "0.93"]
    assert [r["chain_accuracy"] for r in ensemble] == ["0.5", "0.0", "0.5", "0.5"]
    cells = {c["cell"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["model.ensemble=4"]["solved"] == 3 and cells["model.ensemble=4"]["median_solved_step"] == 1000
    assert cells["model.ensemble=4"]["success_ci95"] == pytest.approx([0.1941, 0.9937], abs=1e-4)
    assert cells["model.ensemble=1"]["success_ci95"] == pytest.approx([0.0, 0.975])
    table = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("model.ensemble=")}
    assert "3/4" in table["model.ensemble=4"] and "[0.194, 0.994]" in table["model.ensemble=4"]
    assert "0/1" in table["model.ensemble=1"] and "> 3000 (censored)" in table["model.ensemble=1"]


# --- cells that fail, stop or leave a broken summary ----------------------------------------------
FAKE_TRAIN = """
import json, signal, sys, time
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:])
run_dir, n = Path(args["run_dir"]), int(args["data.n"])
summary = {"solved_step": [100, None], "final_accuracy": [1.0, 0.5], "members": [0, 1], "steps": 200}
if n in (10, 20):  # finishes
    (run_dir / "summary.json").write_text(json.dumps(summary))
elif n == 11:  # stopped: a checkpoint, no summary, 128 + SIGTERM
    sys.exit(143)
elif n == 12:  # exit 0 and no summary
    pass
elif n == 13:  # exit 0 and a truncated summary
    (run_dir / "summary.json").write_text(json.dumps(summary)[:20])
elif n == 14:  # killed by a signal
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGTERM)
else:  # runs until a signal, then saves a checkpoint and exits 128 + signal
    def stop(signum, frame):
        (run_dir / "got_signal").write_text(str(signum))
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    (run_dir / "started").write_text("")
    time.sleep(60)
    sys.exit(1)
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """The runner runs FAKE_TRAIN, which does what data.n says, in place of train.py."""
    import runtime.cells
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(runtime.cells, "train_command", lambda cell: [sys.executable, str(script), *cell.args])
    return sweep_py


def test_failed_cells_are_reported_and_the_finished_ones_written(tmp_path, fake_train, capsys):
    out = tmp_path / "sweep"
    status = fake_train.main(["experiment=parity_mlp", "--grid", "data.n=10,11,12,13,14", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 1
    lines = {line.split(": ", 1)[0].split("] ")[-1]: line for line in printed.out.splitlines()}
    assert "exit 143 (SIGTERM)" in lines["data.n=11"] and "train.log" in lines["data.n=11"]
    assert "exit 0 but" in lines["data.n=12"] and "summary.json: missing" in lines["data.n=12"]
    assert "exit 0 but" in lines["data.n=13"] and "unreadable" in lines["data.n=13"]
    assert "killed by SIGTERM" in lines["data.n=14"]
    assert printed.err.startswith("error: 4 of 5 cells failed") and len(printed.err.splitlines()) == 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["data.n"] for r in rows} == {"10"} and len(rows) == 2
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["failed"]) == ["data.n=11", "data.n=12", "data.n=13", "data.n=14"]


def test_no_finished_cell_is_one_line_and_no_results(tmp_path, fake_train, capsys):
    out = tmp_path / "sweep"
    assert fake_train.main(["experiment=parity_mlp", "--grid", "data.n=11,12", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == "error: 2 of 2 cells failed (data.n=12, data.n=11); no results written\n"
    assert not (out / "results.csv").exists() and not (out / "results.json").exists()


def test_an_unreadable_summary_of_a_reused_cell_is_one_line_and_trained_again(tmp_path, fake_train, capsys):
    out = tmp_path / "sweep"
    args = ["experiment=parity_mlp", "--grid", "data.n=10,20", "--out", str(out)]
    assert fake_train.main(args) == 0
    assert capsys.readouterr().out.count(": reused") == 0
    for cell in fake_train.make_cells(["experiment=parity_mlp"], {"data.n": ["10", "20"]}, {}, out):
        (cell.run_dir / "config.yaml").write_text(to_yaml(cell.cfg))  # as train.py would have written it
    broken = out / "runs" / "data.n=20" / "summary.json"
    broken.write_text(broken.read_text()[:25])
    assert fake_train.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    again = [line for line in printed if line.endswith("; training it again")]
    assert len(again) == 1 and again[0].startswith(f"data.n=20: {broken}: unreadable (JSONDecodeError: ")
    assert any(line.endswith("data.n=10: reused") for line in printed)
    assert json.loads(broken.read_text())["members"] == [0, 1]  # trained again: whole


@pytest.mark.parametrize("where", ["file", "missing", "unwritable"])
def test_out_that_cannot_be_written_is_one_line_exit_2_before_any_cell(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir(mode=0o555)
    unwritable = Path("/sys/paritylab-sweep") if os.geteuid() == 0 else tmp_path / "ro" / "sweep"  # root: sysfs
    out = {"file": tmp_path / "file" / "sweep", "missing": Path("/proc/nonexistent/sweep"),
           "unwritable": unwritable}[where]
    result = sweep(capsys, "experiment=parity_mlp", "--grid", "data.n=10", "--out", str(out))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: --out {out}: cannot write there") and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_reaches_the_running_cells_and_the_finished_results_are_written(tmp_path, signum):
    """Four cells, two at a time, most expensive first: n=23 finishes, n=22 and n=21 run until the signal
    (passed on by the sweep), n=20 never starts."""
    out = tmp_path / "sweep"
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN.replace("n in (10, 20)", "n == 23"))
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import runtime.cells, sweep; "
            f"runtime.cells.train_command = lambda cell: [sys.executable, {str(tmp_path / 'fake_train.py')!r}, "
            "*cell.args]; "
            "sys.exit(sweep.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "experiment=parity_mlp", "--grid", "data.n=20,21,22,23",
                             "--jobs", "2", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = out / "runs"
    deadline = time.monotonic() + 60
    while not all((runs / f"data.n={n}" / "started").exists() for n in (21, 22)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"error: stopped by {signum.name}: 2 cells "
                                                               "stopped or failed, 1 not run; results of the 1 "
                                                               "finished written"), stderr
    for n in (21, 22):  # each got the signal once, from the sweep, and saved its checkpoint
        assert (runs / f"data.n={n}" / "got_signal").read_text() == str(int(signum))
        assert f"data.n={n}: stopped (exit {128 + signum} ({signum.name})" in stdout
    assert "data.n=20: not run" in stdout and not (runs / "data.n=20").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["data.n"] for r in rows} == {"23"}
    assert json.loads((out / "results.json").read_text())["not_run"] == ["data.n=20"]


def test_a_sweep_stopped_by_sigterm_continues_its_cell_from_the_checkpoint(tmp_path, capsys):
    """The real train.py: SIGTERM to the sweep stops the cell at a step with a checkpoint; the same sweep
    command again continues that cell (resume=auto) to its budget and writes the results."""
    out = tmp_path / "sweep"
    # batches of 16384 samples: 300 steps take seconds, so the signal lands before the budget is spent
    command = [sys.executable, "sweep.py", "trainer.accelerator=cpu", "data.k=6", "data.batch_size=16384",
               "eval.size=64", "eval.every_n_steps=300", "checkpoint.every_n_steps=300", "trainer.max_steps=300",
               "--grid", "data.n=40", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cell = out / "runs" / "data.n=40"
    deadline = time.monotonic() + 120
    while not (cell / "tb").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    stopped = torch.load(cell / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped < 300 and not (cell / "summary.json").exists()
    again = sweep(capsys, *command[2:])  # the same command, run here
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((cell / "summary.json").read_text())["steps"] == 300
    assert [r["cell"] for r in json.loads((out / "results.json").read_text())["cells"]] == ["data.n=40"]


GPU_TRAIN = """
import os, sys, time
from pathlib import Path
run_dir = Path(dict(a.split("=", 1) for a in sys.argv[1:])["run_dir"])
(run_dir / "gpus").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "none") + " " + str(time.monotonic()))
time.sleep(1.0)
(run_dir / "gpus").write_text((run_dir / "gpus").read_text() + " " + str(time.monotonic()))
"""


def test_cells_running_at_once_get_gpus_of_their_own(tmp_path, monkeypatch):
    import runtime.cells
    script = tmp_path / "gpu_train.py"
    script.write_text(GPU_TRAIN)
    monkeypatch.setattr(runtime.cells, "train_command", lambda cell: [sys.executable, str(script), *cell.args])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cells = sweep_py.make_cells(["experiment=parity_mlp", "trainer.devices=2"], {"data.n": ["30", "31", "32"]}, {},
                                tmp_path / "sweep", machine=False)
    with pytest.raises(sweep_py.SweepError, match="--jobs 3: 3 cells of 2 GPU"):
        sweep_py.assigned_gpus(cells, 3)
    gpus, per_cell = sweep_py.assigned_gpus(cells, 2)
    assert (gpus, per_cell) == (("0", "1", "2", "3"), 2)
    runtime.cells.run_all(cells, 2, runtime.cells.Runner(gpus, per_cell))
    seen = [(cell.run_dir / "gpus").read_text().split() for cell in cells]
    assert all(len(ids.split(",")) == 2 for ids, _, _ in seen), seen
    overlapping = [(ids, other) for (ids, start, end), (other, other_start, other_end) in itertools.combinations(seen, 2)
                   if float(start) < float(other_end) and float(other_start) < float(end)]
    assert overlapping, seen  # two cells ran at once ...
    assert all(not set(ids.split(",")) & set(other.split(",")) for ids, other in overlapping), seen  # ... on own GPUs
