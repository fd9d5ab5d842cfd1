"""The parity MLP: hand-written gradients, ensemble independence, convergence."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import compose
from datamodules.parity import secret_for
from lightning_modules.parity_mlp import ParityMLP

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("activation,loss", itertools.product(["relu", "sin", "poly"], ["hinge", "square", "logistic"]))
def test_hand_written_gradients_equal_autograd(activation, loss):
    cfg = compose(["data.n=12", "model.width=16", "model.ensemble=3", f"model.activation={activation}",
                   f"model.loss={loss}", *(["model.power=3"] if activation == "poly" else []), "model.init=gaussian"])
    model = ParityMLP(cfg).double()
    x = torch.randint(0, 2, (3, 40, 12), dtype=torch.float64) * 2 - 1
    y = x[..., :3].prod(-1)
    losses, grads = model.loss_and_grads(x, y)
    auto = model.losses(model(x), y)
    auto.sum().backward()
    assert torch.allclose(losses, auto.detach())
    for p, g in zip([model.w1, model.b1, model.w2, model.b2], grads):
        assert torch.allclose(p.grad, g, atol=1e-12), p.shape


@pytest.mark.parametrize("init", ["uniform", "gaussian", "sign", "sparse"])
def test_member_init_depends_only_on_seed_and_member(init):
    group = ParityMLP(compose([f"model.init={init}", "model.ensemble=4"]))
    alone = ParityMLP(compose([f"model.init={init}", "model.ensemble=1", "model.member_offset=2"]))
    assert torch.equal(group.w1[2], alone.w1[0]) and torch.equal(group.w2[2], alone.w2[0])
    assert not torch.equal(group.w1[0], group.w1[1])
    if init == "sparse":
        assert ((group.w1 != 0).sum(-1) == 2).all()


def run(tmp: Path, name: str, *overrides: str) -> tuple[dict, dict]:
    """train.py in a subprocess; returns its summary and final checkpoint state_dict."""
    run_dir = tmp / name
    cmd = [sys.executable, str(ROOT / "train.py"), f"run_dir={run_dir}", "trainer.accelerator=cpu",
           "trainer.progress_bar=false", *overrides]
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return summary, state["state_dict"]


@pytest.mark.parametrize("optim", ["optim.name=sgd optim.momentum=0.9 optim.weight_decay=1e-3",
                                   "optim.name=adam optim.lr=0.003"])
def test_member_in_an_ensemble_ends_with_the_weights_it_has_alone(tmp_path, optim):
    # one evaluation, at the end: a lone member stops once solved, a group only when all are
    common = ["trainer.max_steps=600", "eval.every_n_steps=600", "data.n=30", *optim.split()]
    _, group = run(tmp_path, "group", "model.ensemble=4", *common)
    _, alone = run(tmp_path, "alone", "model.ensemble=1", "model.member_offset=2", *common)
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.allclose(group[name][2], alone[name][0], rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(group["w1"][1], alone["w1"][0])


def test_default_experiment_solves_50_3(tmp_path):
    summary, _ = run(tmp_path, "default", "trainer.max_steps=30000")
    assert summary["solved_step"] is not None and summary["final_accuracy"] == 1.0
    assert summary["steps"] == summary["solved_step"]  # a run stops once every member is solved
    assert summary["secret"] == secret_for(0, 50, 3)
    for key in ("experiment", "seed", "secret", "steps", "solved_step", "final_accuracy", "samples_per_s",
                "train_wall_s", "world_size"):
        assert key in summary
