"""sweep.py end to end (bad input, SLURM array, censoring, the fit) and the ensemble it relies on."""
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from config import compose, to_yaml
from datamodules.parity import ParityDataModule, Ticket, pm1
from lightning_modules.parity_mlp import ParityMLP

ROOT = Path(__file__).resolve().parents[1]


def sweep(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


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
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args):
    out = tmp_path / "sweep"
    result = sweep(*(a.format(out=out) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_tiny_grid_slurm_task_then_local_run_writes_results_with_censored_members(tmp_path):
    out = tmp_path / "sweep"
    args = ["experiment=parity_mlp", "--grid", "data.n=10,12", "data.k=3", "model.ensemble=4",
            "--with", "eval.every_n_steps=100,50", "trainer.max_steps=300", "eval.hidden_progress=false",
            "--out", str(out)]
    slurm = sweep(*args, "--slurm")
    assert slurm.returncode == 0, slurm.stderr
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-1\n" in script and len((out / "cells.txt").read_text().splitlines()) == 2
    assert not list((out / "runs").iterdir())  # --slurm only writes the job
    task = subprocess.run(["bash", str(out / "sweep.sbatch")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLURM_ARRAY_TASK_ID": "0"})  # what array task 0 would run
    assert task.returncode == 0, task.stderr
    first = sorted(cell_args(out))[0]
    assert (out / "runs" / first / "summary.json").is_file()

    local = sweep(*args)  # reuses the cell the array task trained, trains the other one
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


def test_fit_recovers_a_known_exponent_from_synthetic_runs(tmp_path):
    """Cells whose summaries follow median ~ c n^(alpha k) with noise and censoring: the fit finds alpha."""
    out = tmp_path / "sweep"
    ns, alpha, members, budget = [16, 24, 32, 48, 64, 96], 0.8, 31, 200_000
    args = ["experiment=parity_mlp", "--grid", f"data.n={','.join(map(str, ns))}", "--grid", "data.k=2,3",
            f"model.ensemble={members}", f"trainer.max_steps={budget}", "--out", str(out)]
    assert sweep(*args, "--slurm").returncode == 0
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
    result = sweep(*args)
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


# --- the ensemble whose members a sweep counts as seeds ------------------------------------------
def stub_optimizer(model: ParityMLP, lr: float) -> SimpleNamespace:
    """What plain_sgd_steps needs of Lightning's optimizer wrapper."""
    return SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                           _on_before_step=lambda: None, _on_after_step=lambda: None)


@pytest.mark.parametrize("activation, loss, layout, compiled", [
    ("relu", "hinge", "bits", False), ("relu", "square", "pm1", False), ("sin", "logistic", "bits", False),
    ("relu", "hinge", "bits", True)])  # the last: the C++ step of kernels.compile=true
def test_fused_sgd_matches_torch_optim_sgd(activation, loss, layout, compiled):
    """Inputs as bits (a CPU ticket) or as +/-1 floats (what the GPU kernel writes)."""
    if compiled:
        from lightning_modules import fused_cpu
        from kernels import cpp
        if cpp.cxx() is None:
            pytest.skip("no C++ compiler: kernels.compile stays eager")
        assert fused_cpu.extension() is not None, "the C++ step did not build"
    cfg = compose(["experiment=parity_mlp", "data.n=20", "model.ensemble=3", f"model.activation={activation}",
                   f"model.loss={loss}", "model.width=32", "optim.lr=0.05", f"kernels.compile={compiled}"])
    fused, reference = ParityMLP(cfg), ParityMLP(cfg)
    batch = ParityDataModule(cfg).generate(Ticket(0, 60, 0, 1), torch.device("cpu"))
    assert batch.x.dtype == torch.uint8  # CPU tickets carry bits
    xs = batch.x if layout == "bits" else pm1(batch.x)
    losses = fused.plain_sgd_steps(xs, batch.y, stub_optimizer(fused, 0.05))
    opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    params = [reference.w1, reference.b1, reference.w2, reference.b2]
    for j in range(60):
        loss_j, grads = reference.loss_and_grads(pm1(batch.x[:, j]), batch.y[:, j])
        torch.testing.assert_close(losses[j], loss_j, rtol=1e-4, atol=1e-5)
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    for name in ("w1", "b1", "w2", "b2"):
        torch.testing.assert_close(getattr(fused, name), getattr(reference, name), rtol=1e-4, atol=1e-5)
    first = fused.first_layer()  # w1 and b1 stay views of the one tensor the fused step updates
    assert fused.w1.data_ptr() == first.data_ptr() and torch.equal(fused.b1, first[:, -1])


def fit(args: list[str]) -> ParityMLP:
    cfg = compose(["experiment=parity_mlp", "data.n=16", "trainer.max_steps=300", "eval.every_n_steps=100",
                   "eval.hidden_progress=false", *args])
    model = ParityMLP(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=300, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=ParityDataModule(cfg))
    return model


@pytest.mark.parametrize("compiled", [False, True])
def test_ensemble_members_equal_separate_runs_bit_for_bit(compiled):
    ensemble = fit(["model.ensemble=3", f"kernels.compile={compiled}"])
    for member in (0, 2):
        alone = fit(["model.ensemble=1", f"model.member_offset={member}", f"kernels.compile={compiled}"])
        for name in ("w1", "b1", "w2", "b2"):
            assert torch.equal(getattr(ensemble, name)[member], getattr(alone, name)[0]), (member, name)
        assert ensemble.solved_step[member] == alone.solved_step[0]
