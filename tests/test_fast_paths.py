"""Fast paths verified where they run: the start-of-fit check keeps an accelerated step only where it takes
autograd's step through the current forward and losses (that the steps live in kernels/, below everything else,
is tests/test_layers.py's contract)."""
import itertools

import lightning as L
import pytest
import torch

from config import compose
from datamodules.parity import ParityTask
from datamodules.stream import ClassifierBatch, Ticket
from lightning_modules.mlp_config import CHOICES
from lightning_modules.parity_mlp import PATHS, ParityMLP
from networks.mlp import MLPEnsemble

PARAMS = ("w1", "b1", "w2", "b2")
FORWARD = MLPEnsemble.forward


def halved(net: MLPEnsemble, x: torch.Tensor) -> torch.Tensor:
    """An edit of MLPEnsemble.forward in place: its output halved."""
    return 0.5 * FORWARD(net, x)


def weights(model: ParityMLP) -> list[torch.Tensor]:
    return [getattr(model.net, name).detach() for name in PARAMS]


def fit(*args: str, steps: int = 200) -> ParityMLP:
    cfg = compose(["experiment=parity_mlp", "data.n=16", "model.width=32", "model.ensemble=2",
                   f"trainer.max_steps={steps}", f"eval.every_n_steps={steps}", "eval.hidden_progress=false",
                   "eval.size=512", *args])
    model = ParityMLP(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=ParityTask(cfg))
    return model


def probe(*args: str) -> tuple[ParityMLP, ClassifierBatch]:
    """A model and the first training step's batch, as on_fit_start checks them."""
    cfg = compose(["experiment=parity_mlp", "data.n=20", "model.width=24", "model.ensemble=3", *args])
    return ParityMLP(cfg), ParityTask(cfg).generate(Ticket(0, 1, 0, 1), torch.device("cpu"))


def train_path_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("train path:")]


# --- an edited forward trains by autograd, and says why ------------------------------------------
def test_an_edited_forward_trains_by_autograd_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(MLPEnsemble, "forward", halved)
    edited = fit()
    (line,) = train_path_lines(capsys.readouterr().out)
    assert edited.train_path == "autograd"
    assert line.startswith("train path: autograd (the fused step differs from autograd through the current "
                           "forward and losses: max |dw| = "), line
    reference = fit("model.grad=autograd")
    assert train_path_lines(capsys.readouterr().out) == [f"train path: autograd ({PATHS['autograd']})"]
    for name, a, b in zip(PARAMS, weights(edited), weights(reference)):
        assert torch.equal(a, b), name


# Options that lead model.grad=auto to each path. The gradient path's is Adam, whose first step is about
# lr sign(grad) whatever the gradient's scale: there the check compares gradients. A CUDA graph replays the
# eager step's kernels: the cuda_graph path is checked through the eager step, here on a CPU.
PATH_OPTIONS = {"gradient": ["optim.name=adam", "optim.lr=0.003"], "fused": [], "cpp": ["kernels.compile=true"],
                "cuda_graph": []}


@pytest.mark.parametrize("path", list(PATH_OPTIONS))
def test_the_check_catches_an_edited_forward_or_activation_on_every_path(monkeypatch, path):
    if path == "cpp":
        from kernels import cpp
        if cpp.cxx() is None:
            pytest.skip("no C++ compiler: kernels.compile=true falls back to the eager fused step")
    model, batch = probe(*PATH_OPTIONS[path])
    assert model.check_train_path(path, batch) is None
    with monkeypatch.context() as patch:
        patch.setattr(MLPEnsemble, "forward", halved)
        why = model.check_train_path(path, batch)
        assert why.startswith(f"the {path} step differs from autograd through the current forward and losses")
    relu = MLPEnsemble.act
    monkeypatch.setattr(MLPEnsemble, "act", lambda net, z: relu(net, z) * 0.9)  # act_backward_ not edited
    assert ParityMLP(model.cfg).check_train_path(path, batch) is not None


@pytest.mark.parametrize("activation,loss", itertools.product(CHOICES["activation"], CHOICES["loss"]))
@pytest.mark.parametrize("path", ["gradient", "fused"])
def test_the_check_keeps_every_unedited_step_and_leaves_the_weights_alone(activation, loss, path):
    model, batch = probe(f"model.activation={activation}", f"model.loss={loss}",
                         *(["optim.momentum=0.9"] if path == "gradient" else []))
    before = [w.clone() for w in weights(model)]
    assert model.check_train_path(path, batch) is None
    for name, a, b in zip(PARAMS, weights(model), before):
        assert torch.equal(a, b), name


def test_the_checked_run_is_bitwise_the_unchecked_run(monkeypatch, capsys):
    checked = fit()
    assert train_path_lines(capsys.readouterr().out) == [f"train path: fused ({PATHS['fused']})"]
    monkeypatch.setattr(ParityMLP, "check_train_path", lambda self, path, batch: None)
    unchecked = fit()
    assert checked.train_path == unchecked.train_path == "fused"
    for name, a, b in zip(PARAMS, weights(checked), weights(unchecked)):
        assert torch.equal(a, b), name

