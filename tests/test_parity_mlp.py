"""The parity classifier: its network, every accelerated step against autograd, ensembles, convergence."""
import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import checkpoint, train
from config import CHOICES as CONFIG_CHOICES, OPTIMIZERS, compose
from datamodules.parity import ParityTask, secret_for
from datamodules.stream import Ticket, pm1
from kernels import mlp_step_graph
from kernels.mlp_step import UNCOUNTED
from lightning_modules.mlp_config import CHOICES
from lightning_modules.parity_mlp import PATHS, ParityMLP
from networks.mlp import MLPEnsemble

PARAMS = ("w1", "b1", "w2", "b2")


def weights(model: ParityMLP) -> list[torch.Tensor]:
    return [getattr(model.net, name).detach() for name in PARAMS]


def fit(args: list[str], module: type[ParityMLP] = ParityMLP, steps: int = 300) -> ParityMLP:
    """A model trained under Lightning on a small parity problem, evaluated at the end."""
    cfg = compose(["experiment=parity_mlp", "data.n=16", "model.width=32", f"trainer.max_steps={steps}",
                   f"eval.every_n_steps={steps}", "eval.hidden_progress=false", "eval.size=512", *args])
    model = module(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=ParityTask(cfg))
    assert trainer.global_step == steps
    return model


# --- the hand-written gradient ------------------------------------------------------------------
@pytest.mark.parametrize("activation,loss", itertools.product(CHOICES["activation"], CHOICES["loss"]))
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
    for p, g in zip(model.net.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-12), p.shape


@pytest.mark.parametrize("activation", CHOICES["activation"])
def test_the_activation_derivative_is_autograds(activation):
    net = MLPEnsemble(2, 5, 3, activation=activation, power=3).double()
    z = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(2, 4, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad(net.act(z.clone()), z, dz)
    with torch.no_grad():
        h = net.act(z.detach().clone())  # ReLU overwrites its input: act_backward_ reads h alone
        assert torch.allclose(net.act_backward_(dz.clone(), z.detach(), h), expected, rtol=1e-12, atol=0)


def test_an_unknown_activation_is_an_error_not_poly():
    with pytest.raises(ValueError, match="activation 'tanh' is not one of relu, sin, poly"):
        MLPEnsemble(2, 5, 3, activation="tanh")
    net = MLPEnsemble(2, 5, 3)
    net.activation = "tanh"  # set past the constructor: the forward and the derivative refuse it too
    z = torch.ones(2, 4, 3)
    with pytest.raises(ValueError, match="'tanh'"):
        net(torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="'tanh'"):
        net.act_backward_(z.clone(), z, z)


# --- every train path against autograd, from the config's own choices ---------------------------
def cases() -> list[tuple[str, list[str]]]:
    """(the path model.grad=auto takes, overrides): each activation x loss on the fused plain-SGD step, each
    optimizer and optimizer option on the hand-written gradient, and the C++ step."""
    found = [("fused", [f"model.activation={a}", f"model.loss={loss}", *(["optim.lr=0.01"] if a == "poly" else [])])
             for a, loss in itertools.product(CHOICES["activation"], CHOICES["loss"])]  # poly diverges at lr 0.1
    found += [("gradient", [f"optim.name={name}", "optim.lr=0.003"]) for name in OPTIMIZERS if name != "sgd"]
    found += [("gradient", ["optim.momentum=0.9"]), ("gradient", ["optim.weight_decay=0.001"]),
              ("gradient", ["optim.grad_clip=0.05"]), ("gradient", ["optim.warmup_steps=50"])]
    found += [("gradient", [f"optim.schedule={s}", "optim.warmup_steps=10"])
              for s in CONFIG_CHOICES["optim.schedule"] if s != "constant"]
    return found + [("cpp", ["kernels.compile=true"])]


@pytest.mark.parametrize("path, overrides", cases(), ids=[" ".join(o) for _, o in cases()])
def test_each_accelerated_path_trains_autograds_weights(path, overrides):
    if path == "cpp":
        from kernels import cpp
        if cpp.cxx() is None:
            pytest.skip("no C++ compiler: kernels.compile=true falls back to the eager fused step")
    common = ["model.ensemble=3", "trainer.steps_per_batch=100", *overrides]
    # ReLU's kink: once one pre-activation rounds to the other side of zero on one path (after ~150 steps
    # with logistic loss here), that hidden unit's weights part ways by ~1e-4; compare before it.
    steps = 100 if "model.activation=relu" in overrides else 300
    fast, auto = fit(common, steps=steps), fit([*common, "model.grad=autograd"], steps=steps)
    assert (fast.train_path, auto.train_path) == (path, "autograd")
    for name, a, b in zip(PARAMS, weights(fast), weights(auto)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(weights(fast)[0], fast.w1_init)  # it trained


class ScaledOutput(ParityMLP):
    """A researcher's variant: the same network, its output doubled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.net(x)


def test_a_subclass_that_changes_forward_trains_that_forward():
    base, scaled = fit(["model.ensemble=2"]), fit(["model.ensemble=2"], module=ScaledOutput)
    assert (base.train_path, scaled.train_path) == ("fused", "autograd")
    assert not torch.allclose(weights(base)[0], weights(scaled)[0])
    reference = fit(["model.ensemble=2", "model.grad=autograd"], module=ScaledOutput)
    for a, b in zip(weights(scaled), weights(reference)):
        assert torch.equal(a, b)


def test_the_fused_step_is_the_plain_sgd_update_on_bits_and_on_pm1():
    """Inputs as bits (a CPU ticket) or as +/-1 floats (what the GPU kernel writes): the same update."""
    cfg = compose(["experiment=parity_mlp", "data.n=20", "model.ensemble=3", "model.width=32", "optim.lr=0.05"])
    bits, signs = ParityMLP(cfg), ParityMLP(cfg)
    batch = ParityTask(cfg).generate(Ticket(0, 60, 0, 1), torch.device("cpu"))
    assert batch.x.dtype == torch.uint8  # CPU tickets carry bits
    losses = bits.plain_sgd_steps(batch.x, batch.y, 0.05, UNCOUNTED)
    assert torch.equal(losses, signs.plain_sgd_steps(pm1(batch.x), batch.y, 0.05, UNCOUNTED))
    for a, b in zip(weights(bits), weights(signs)):
        assert torch.equal(a, b)
    first = bits.first_layer()  # w1 and b1 stay views of the one tensor the fused step updates
    assert bits.net.w1.data_ptr() == first.data_ptr() and torch.equal(bits.net.b1, first[:, -1])


# --- ensembles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["uniform", "gaussian", "sign", "sparse"])
def test_member_init_depends_only_on_seed_and_member(init):
    group = ParityMLP(compose([f"model.init={init}", "model.ensemble=4"])).net
    alone = ParityMLP(compose([f"model.init={init}", "model.ensemble=1", "model.member_offset=2"])).net
    assert torch.equal(group.w1[2], alone.w1[0]) and torch.equal(group.w2[2], alone.w2[0])
    assert not torch.equal(group.w1[0], group.w1[1])
    if init == "sparse":
        assert ((group.w1 != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("path", ["fused", "cpp", "autograd"])
def test_ensemble_members_equal_separate_runs_bit_for_bit(path):
    options = {"fused": [], "cpp": ["kernels.compile=true"], "autograd": ["model.grad=autograd"]}[path]
    ensemble = fit(["model.ensemble=3", *options])
    assert ensemble.train_path == path or (path == "cpp" and ensemble.train_path == "fused")
    for member in (0, 2):
        alone = fit(["model.ensemble=1", f"model.member_offset={member}", *options])
        for name, a, b in zip(PARAMS, weights(ensemble), weights(alone)):
            assert torch.equal(a[member], b[0]), (member, name)
        assert ensemble.solved_step[member] == alone.solved_step[0]


def run(tmp: Path, name: str, *overrides: str) -> tuple[dict, dict, str]:
    """train.py in a subprocess; returns its summary, final checkpoint state_dict and stdout."""
    run_dir = tmp / name
    done = train(tmp, f"run_dir={run_dir}", "trainer.accelerator=cpu", "trainer.progress_bar=false", *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((run_dir / "summary.json").read_text()), checkpoint(run_dir)["state_dict"], done.stdout


@pytest.mark.parametrize("optim", ["optim.name=sgd optim.momentum=0.9 optim.weight_decay=1e-3",
                                   "optim.name=adam optim.lr=0.003"])
def test_member_in_an_ensemble_ends_with_the_weights_it_has_alone(tmp_path, optim):
    # one evaluation, at the end: a lone member stops once solved, a group only when all are
    common = ["trainer.max_steps=600", "eval.every_n_steps=600", "data.n=30", *optim.split()]
    _, group, _ = run(tmp_path, "group", "model.ensemble=4", *common)
    _, alone, _ = run(tmp_path, "alone", "model.ensemble=1", "model.member_offset=2", *common)
    for name in PARAMS:
        assert torch.allclose(group[f"net.{name}"][2], alone[f"net.{name}"][0], rtol=1e-5, atol=1e-6), name
    assert not torch.allclose(group["net.w1"][1], alone["net.w1"][0])


def test_default_experiment_solves_50_3_and_names_its_train_path(tmp_path):
    summary, _, stdout = run(tmp_path, "default", "trainer.max_steps=30000")
    assert summary["solved_step"] is not None and summary["final_accuracy"] == 1.0
    assert summary["steps"] == summary["solved_step"]  # a run stops once every member is solved
    assert summary["secret"] == secret_for(0, 50, 3)
    assert summary["train_path"] == "fused" and f"train path: fused ({PATHS['fused']})" in stdout.splitlines()
    for key in ("experiment", "seed", "secret", "steps", "solved_step", "final_accuracy", "samples_per_s",
                "train_wall_s", "world_size"):
        assert key in summary


def test_the_graph_path_is_taken_only_where_a_graph_can_run():
    cfg = compose(["experiment=parity_mlp"])
    model = ParityMLP(cfg)
    assert model.choose_train_path(torch.device("cpu"), 1) == "fused"
    assert model.choose_train_path(torch.device("cuda"), 1) == ("cuda_graph" if mlp_step_graph.ENABLED else "fused")
    assert model.choose_train_path(torch.device("cpu"), 2) == "autograd"  # DDP averages autograd's gradients
