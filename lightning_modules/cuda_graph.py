"""The ensemble's plain-SGD step as a CUDA graph: a Lightning batch's SGD steps captured once, then replayed.

On a GPU, ``ParityMLP.plain_sgd_steps`` launches a dozen small kernels per SGD step (~5 us each), so an
ensemble trains at the launch rate long before the arithmetic rate. Here that very call is captured into a
``torch.cuda.CUDAGraph`` over static copies of the batch and replayed: a batch of 100 steps is one launch
plus two copies. A graph replays the kernels the eager call launches, in the same order, with the same
arguments, on the same parameter memory, so the weights are those of the eager step bit for bit.

A graph bakes in the batch's shapes and dtypes, the learning rate and the addresses of the parameters, so
it is kept per such key; ``first_layer()`` rebinding w1 and b1 (after a device move) makes a new key and
drops the graphs of the old memory. The first batch of a key runs eagerly (it trains like any other batch
and warms up what a capture must not initialise: cuBLAS handles, the allocator); the second captures.
Lightning's step counters are host code, outside any graph: ``count_steps`` calls them after a replay.
The batch's data is generated outside the graph: the Triton kernel takes the sample index and the seed as
launch arguments (a captured launch would replay the first batch's data) and copies the secret and the
stream ids to the device (a host-to-device copy, which a capture refuses).
"""
import torch

from lightning_modules import stopping
from lightning_modules.lightning_adapter import UNCOUNTED, StepCounter, count_steps

ENABLED = True  # the CUDA-graph path for CUDA tensors; False: the eager step everywhere
MAX_GRAPHS = 4  # keys kept per model: a run sees one or two (full batches, a shorter last one)


def uses_graph(device: torch.device) -> bool:
    """Whether plain-SGD steps on ``device`` run as a CUDA graph."""
    return ENABLED and device.type == "cuda"


def _parameters(model) -> tuple[torch.Tensor, ...]:
    """The tensors the step updates in place: [w1^T; b1], w2, b2."""
    return model.first_layer(), model.net.w2.detach(), model.net.b2.detach()


def graph_key(model, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> tuple:
    """Everything a captured step bakes in: inputs' layout, learning rate, parameters' addresses and strides."""
    layout = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in _parameters(model))
    return tuple(xs.shape), xs.dtype, tuple(ys.shape), ys.dtype, xs.device, lr, layout


class StepGraph:
    """``model.plain_sgd_steps`` over static batch buffers, captured as one CUDA graph."""

    def __init__(self, model, xs: torch.Tensor, ys: torch.Tensor, lr: float):
        self.xs, self.ys = torch.empty_like(xs), torch.empty_like(ys)
        self.parameters = _parameters(model)  # held, so that their memory stays theirs while the graph lives
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them: the weights stay put
            self.losses = model.plain_sgd_steps(self.xs, self.ys, lr, UNCOUNTED)
        self.complete = self.losses.shape[0] == xs.shape[1]  # False: a stop signal cut the captured loop short
        self.replays = 0

    def replay(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The SGD steps over the batch (xs, ys); returns their losses (steps, E)."""
        self.xs.copy_(xs)
        self.ys.copy_(ys)
        self.graph.replay()
        self.replays += 1
        return self.losses.clone()


def _graphs(model, key: tuple) -> dict:
    """The model's graphs, without those of parameter memory it no longer uses, at most MAX_GRAPHS - 1 old."""
    graphs = {k: g for k, g in getattr(model, "_step_graphs", {}).items() if k[-1] == key[-1]}
    while len(graphs) >= MAX_GRAPHS and key not in graphs:
        graphs.pop(next(iter(graphs)))
    model._step_graphs = graphs
    return graphs


def plain_sgd_steps(model, xs: torch.Tensor, ys: torch.Tensor, lr: float, count: StepCounter) -> torch.Tensor:
    """``model.plain_sgd_steps(xs, ys, lr, count)``, for CUDA tensors as a replayed CUDA graph (the same bits)."""
    if not uses_graph(xs.device) or stopping.requested():  # a stop cuts the eager loop at a step
        return model.plain_sgd_steps(xs, ys, lr, count)
    key = graph_key(model, xs, ys, lr)
    graphs = _graphs(model, key)
    if key not in graphs:  # a key's first batch: eager
        graphs[key] = None
        return model.plain_sgd_steps(xs, ys, lr, count)
    if graphs[key] is None:
        graphs[key] = StepGraph(model, xs, ys, lr)
        if not graphs[key].complete:  # nothing ran during the capture: the eager loop stops at its first step
            del graphs[key]
            return model.plain_sgd_steps(xs, ys, lr, count)
    losses = graphs[key].replay(xs, ys)
    count_steps(count, xs.shape[1])
    return losses
