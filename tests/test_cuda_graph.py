"""The plain-SGD step as a CUDA graph: chosen only for CUDA tensors, and bit-identical to the eager step."""
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from config import compose
from datamodules.parity import ParityTask
from datamodules.stream import Ticket
from kernels import mlp_step_graph
from kernels.mlp_step import UNCOUNTED, never
from lightning_modules.parity_mlp import ParityMLP

PARAMS = ("w1", "b1", "w2", "b2")


def config(*overrides: str):
    return compose(["experiment=parity_mlp", "data.n=20", "model.width=32", "eval.hidden_progress=false",
                    *overrides])


def batches(cfg, device: torch.device, steps: list[int]):
    """The DataModule's batches of ``steps[0]``, ``steps[1]``, ... SGD steps, one after the other."""
    data, start = ParityTask(cfg), 0
    for count in steps:
        yield data.generate(Ticket(start, count, 0, 1), device)
        start += count


def fit(cfg, accelerator: str, max_steps: int) -> tuple[ParityMLP, L.Trainer]:
    model = ParityMLP(cfg)
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=ParityTask(cfg))
    return model, trainer


def eager_reference(cfg, device: torch.device, steps: list[int]) -> ParityMLP:
    """A model trained by calling plain_sgd_steps itself on each batch."""
    model = ParityMLP(cfg).to(device)
    for batch in batches(cfg, device, steps):
        model.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED)
    return model


def params(model: ParityMLP) -> tuple[torch.Tensor, ...]:
    """What the step updates in place: [w1^T; b1], w2, b2."""
    return model.first_layer(), model.net.w2.detach(), model.net.b2.detach()


def graphs(model: ParityMLP) -> dict:
    """The model's CUDA graphs by key (None: a key seen once, its batch run eagerly)."""
    return model.plain_sgd("cuda_graph").graphs.graphs


def assert_same_weights(a: ParityMLP, b: ParityMLP) -> None:
    for name in PARAMS:
        assert torch.equal(getattr(a.net, name), getattr(b.net, name)), name


# --- CPU: the selection, the keys, and the eager path left as it was ------------------------------------
def test_graph_path_is_chosen_only_for_cuda(monkeypatch):
    assert mlp_step_graph.uses_graph(torch.device("cuda")) and mlp_step_graph.uses_graph(torch.device("cuda", 1))
    assert not mlp_step_graph.uses_graph(torch.device("cpu")) and not mlp_step_graph.uses_graph(torch.device("meta"))
    monkeypatch.setattr(mlp_step_graph, "ENABLED", False)
    assert not mlp_step_graph.uses_graph(torch.device("cuda"))


def test_cpu_training_runs_the_eager_step_unchanged():
    """train.py's step on a CPU is plain_sgd_steps itself: the same weights, bit for bit, and the same step count."""
    cfg = config("model.ensemble=3", "trainer.max_steps=300", "eval.every_n_steps=300", "trainer.steps_per_batch=100")
    trained, trainer = fit(cfg, "cpu", 300)
    assert trainer.global_step == 300
    assert_same_weights(trained, eager_reference(cfg, torch.device("cpu"), [100] * 3))
    assert set(trained._plain_sgd) == {"fused"}  # no graph bookkeeping off CUDA
    assert trained.train_path == "fused"


def test_a_graph_key_changes_with_what_a_capture_bakes_in():
    cfg = config("model.ensemble=2")
    model = ParityMLP(cfg)
    batch = next(batches(cfg, torch.device("cpu"), [10]))
    key = mlp_step_graph.graph_key(params(model), batch.x, batch.y, 0.1)
    assert mlp_step_graph.graph_key(params(model), batch.x, batch.y, 0.1) == key
    assert mlp_step_graph.graph_key(params(model), batch.x, batch.y, 0.05) != key
    assert mlp_step_graph.graph_key(params(model), batch.x[:, :5], batch.y[:, :5], 0.1) != key
    model.net.w1.data = model.net.w1.data.clone()  # first_layer() rebinds w1 and b1 into new memory
    moved = mlp_step_graph.graph_key(params(model), batch.x, batch.y, 0.1)
    assert moved != key and moved[-1] != key[-1]


def test_graphs_of_old_parameter_memory_are_dropped_and_the_cache_is_bounded():
    cfg = config("model.ensemble=2")
    model = ParityMLP(cfg)
    batch = next(batches(cfg, torch.device("cpu"), [10]))
    keys = [mlp_step_graph.graph_key(params(model), batch.x, batch.y, lr) for lr in (0.1, 0.2, 0.3, 0.4, 0.5)]
    step_graphs = model.plain_sgd("cuda_graph").graphs
    for key in keys:
        step_graphs.current(key)[key] = None
    assert list(graphs(model)) == keys[-mlp_step_graph.MAX_GRAPHS:]
    model.net.w1.data = model.net.w1.data.clone()
    moved = mlp_step_graph.graph_key(params(model), batch.x, batch.y, 0.1)
    assert step_graphs.current(moved) == {}


class EagerStandIn(mlp_step_graph.StepGraph):
    """A StepGraph whose "replay" runs the eager step on the static buffers: the graph path's bookkeeping on a CPU."""

    def __init__(self, eager, params, xs, ys, lr, stop=never):
        self.xs, self.ys, self.replays, self.complete = torch.empty_like(xs), torch.empty_like(ys), 0, True
        self.losses = ys.new_empty(xs.shape[1], xs.shape[0])
        self.graph = SimpleNamespace(replay=lambda: self.losses.copy_(eager(params, self.xs, self.ys, lr)))


def test_the_graph_paths_bookkeeping_under_lightning(monkeypatch):
    """Eager first batch, capture on the second, replays with Lightning's counters called outside: every step counted."""
    monkeypatch.setattr(mlp_step_graph, "uses_graph", lambda device: True)
    monkeypatch.setattr(mlp_step_graph, "StepGraph", EagerStandIn)
    cfg = config("model.ensemble=3", "trainer.max_steps=300", "eval.every_n_steps=300", "trainer.steps_per_batch=100")
    trained, trainer = fit(cfg, "cpu", 300)
    assert trainer.global_step == 300 and trained.train_path == "cuda_graph"
    assert [g.replays for g in graphs(trained).values()] == [2]
    assert_same_weights(trained, eager_reference(cfg, torch.device("cpu"), [100] * 3))


# --- CUDA: graph replays equal the eager step bit for bit ---------------------------------------------
CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("ensemble, activation, loss", [(1, "relu", "hinge"), (64, "relu", "hinge"),
                                                        (64, "sin", "logistic")])
def test_graph_replays_equal_the_eager_step_bitwise(ensemble, activation, loss):
    cfg = config(f"model.ensemble={ensemble}", f"model.activation={activation}", f"model.loss={loss}")
    steps = [100, 100, 100, 100, 37, 37]  # a key's first batch is eager, its second captures
    eager, graphed = ParityMLP(cfg).to(CUDA), ParityMLP(cfg).to(CUDA)
    for batch in batches(cfg, CUDA, steps):
        expected = eager.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED)
        assert torch.equal(graphed.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED, "cuda_graph"), expected)
    assert_same_weights(graphed, eager)
    replays = sorted(g.replays for g in graphs(graphed).values())
    assert replays == [1, 3]  # 37 steps: captured on its second batch; 100 steps: batches 2-4


@pytest.mark.gpu
def test_a_graph_is_captured_again_when_the_parameters_move():
    cfg = config("model.ensemble=8")
    eager, graphed = ParityMLP(cfg).to(CUDA), ParityMLP(cfg).to(CUDA)
    for j, batch in enumerate(batches(cfg, CUDA, [50] * 6)):
        if j == 3:  # new parameter memory (as after a device move): the old graph must not write to the old one
            old = graphs(graphed)
            for model in (eager, graphed):
                model.net.w1.data = model.net.w1.data.clone()
        expected = eager.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED)
        assert torch.equal(graphed.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED, "cuda_graph"), expected)
    assert_same_weights(graphed, eager)
    (graph,), (stale,) = graphs(graphed).values(), old.values()
    assert graph is not stale and graph.replays == stale.replays == 2  # batches 1-2, then 4-5


@pytest.mark.gpu
def test_lightning_training_on_a_gpu_replays_graphs_and_counts_every_step():
    cfg = config("model.ensemble=64", "trainer.max_steps=400", "eval.every_n_steps=400",
                 "trainer.steps_per_batch=100")
    trained, trainer = fit(cfg, "gpu", 400)
    assert trainer.global_step == 400 and trained.train_path == "cuda_graph"
    assert [g.replays for g in graphs(trained).values()] == [3]
    assert_same_weights(trained, eager_reference(cfg, CUDA, [100] * 4))


class CutCapture(EagerStandIn):
    """A capture a stop signal cut short: nothing ran, the graph holds fewer steps than the batch."""

    def __init__(self, eager, params, xs, ys, lr, stop=never):
        super().__init__(eager, params, xs, ys, lr, stop)
        self.complete = False


def test_a_capture_cut_by_a_stop_signal_falls_back_to_the_eager_step(monkeypatch):
    monkeypatch.setattr(mlp_step_graph, "uses_graph", lambda device: True)
    monkeypatch.setattr(mlp_step_graph, "StepGraph", CutCapture)
    cfg = config("model.ensemble=2")
    model, reference = ParityMLP(cfg), ParityMLP(cfg)
    for batch in batches(cfg, torch.device("cpu"), [50, 50]):
        model.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED, "cuda_graph")
        reference.plain_sgd_steps(batch.x, batch.y, cfg.optim.lr, UNCOUNTED)
    assert_same_weights(model, reference)
    assert not graphs(model)  # the cut capture was dropped, never replayed
