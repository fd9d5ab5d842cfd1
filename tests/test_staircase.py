"""The staircase regression task: its target, its solved rule, its refusals, and SGD climbing it."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from config import ConfigError, compose
from datamodules.staircase import SOLVED_RELATIVE_MSE, StaircaseTask, staircase
from datamodules.stream import Ticket
from lightning_modules.parity_mlp import ParityMLP

ROOT = Path(__file__).resolve().parents[1]


def small(*overrides: str):
    return compose(["experiment=staircase_mlp", "data.n=10", "data.k=4", "model.ensemble=2", "model.width=16",
                    "eval.size=256", *overrides])


def test_target_is_the_sum_of_prefix_monomials():
    secret = [3, 0, 5]
    cube = torch.tensor(list(itertools.product([1.0, -1.0], repeat=6)))
    expected = torch.tensor([x[3] + x[3] * x[0] + x[3] * x[0] * x[5] for x in cube.tolist()])
    f = staircase(cube, secret)
    assert torch.equal(f, expected)
    assert f.mean().item() == 0.0 and f.var(unbiased=False).item() == 3.0  # Var f = k: the solved rule's scale


def test_batches_carry_the_target_of_their_inputs():
    cfg = small()
    task = StaircaseTask(cfg)
    batch = task.generate(Ticket(step=0, steps=3, rank=0, world_size=1), torch.device("cpu"))
    assert batch.x.shape == (2, 3, 32, 10) and batch.y.shape == (2, 3, 32)
    assert torch.equal(batch.y, staircase(batch.x, task.secret))
    x, y = task.eval_set(torch.device("cpu"))
    assert torch.equal(y, staircase(x, task.secret)) and not torch.equal(x[:, :32], batch.x[:, 0])


def test_solved_is_two_percent_of_the_variance():
    task = StaircaseTask(small())
    y = torch.randn(2, 1000)
    k = task.cfg.data.k
    off = torch.full_like(y, (SOLVED_RELATIVE_MSE * k) ** 0.5)  # MSE exactly at the threshold
    score, solved = task.score(torch.stack([y[0] + off[0] * 0.99, y[1] + off[1] * 1.01]), y)
    assert solved.tolist() == [True, False]
    assert score[0].item() == pytest.approx(SOLVED_RELATIVE_MSE * 0.99 ** 2, rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["model.loss=hinge"], "model.loss: the staircase task is a regression target: it needs square, got hinge"),
    (["data.noise=0.1"], "data.noise: does not apply to the staircase task with model mlp"),
    (["data.k=11"], "data.k: must be in [1, data.n (10)], got 11"),
])
def test_refusals(args, message):
    with pytest.raises(ConfigError) as err:
        small(*args)
    assert str(err.value) == message


def fit(*overrides: str) -> tuple[ParityMLP, StaircaseTask]:
    cfg = small("eval.hidden_progress=false", "trainer.steps_per_batch=100", *overrides)
    model, task = ParityMLP(cfg), StaircaseTask(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=task)
    return model, task


def test_the_fused_step_trains_autograds_weights_on_real_targets():
    (fast, _), (auto, _) = (fit("trainer.max_steps=300", "eval.every_n_steps=300", f"model.grad={grad}")
                            for grad in ("auto", "autograd"))
    assert (fast.train_path, auto.train_path) == ("fused", "autograd")
    for a, b in zip(fast.net.parameters(), auto.net.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=2e-5)
    assert not torch.equal(fast.net.w1.detach(), fast.w1_init)


def test_sgd_climbs_the_staircase():
    model, task = fit("trainer.max_steps=1500", "eval.every_n_steps=100")
    assert (model.solved_step > 0).all(), model.solved_step
    score, solved, _ = model.held_out(task)
    assert model.metrics(score) == {"final_relative_mse": score.tolist()}
    assert torch.equal(solved, score <= SOLVED_RELATIVE_MSE)


def test_train_py_records_the_relative_mse(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "experiment=staircase_mlp", "data.n=20", "data.k=3",
                           "model.ensemble=2", "eval.every_n_steps=100", "trainer.max_steps=3000",
                           "trainer.progress_bar=false", f"run_dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "staircase" and "final_accuracy" not in summary
    assert all(s is not None for s in summary["solved_step"]), summary
    assert "final_relative_mse: [" in proc.stdout
