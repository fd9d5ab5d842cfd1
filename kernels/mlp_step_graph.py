"""The MLP ensemble's plain-SGD step as a CUDA graph: a Lightning batch's SGD steps captured once, then replayed.

On a GPU, the eager fused step (kernels/mlp_step.py) launches a dozen small kernels per SGD step (~5 us each),
so an ensemble trains at the launch rate long before the arithmetic rate. Here that very call is captured into
a ``torch.cuda.CUDAGraph`` over static copies of the batch and replayed: a batch of 100 steps is one launch
plus two copies. A graph replays the kernels the eager call launches, in the same order, with the same
arguments, on the same parameter memory, so the weights are those of the eager step bit for bit.

A graph bakes in the batch's shapes and dtypes, the learning rate and the addresses of the parameters, so
it is kept per such key; new parameter memory (after a device move) makes a new key and drops the graphs of
the old memory. The first batch of a key runs eagerly (it trains like any other batch and warms up what a
capture must not initialise: cuBLAS handles, the allocator); the second captures. The step counter's calls
are host code, outside any graph: they are made after a replay, once per step it ran.
The batch's data is generated outside the graph: the Triton kernel takes the sample index and the seed as
launch arguments (a captured launch would replay the first batch's data) and copies the secret and the
stream ids to the device (a host-to-device copy, which a capture refuses).
"""
from typing import Callable

import torch

from kernels.mlp_step import UNCOUNTED, Counter, Params, never

ENABLED = True  # the CUDA-graph path for CUDA tensors; False: the eager step everywhere
MAX_GRAPHS = 4  # keys kept: a run sees one or two (full batches, a shorter last one)


def uses_graph(device: torch.device) -> bool:
    """Whether plain-SGD steps on ``device`` run as a CUDA graph."""
    return ENABLED and device.type == "cuda"


def graph_key(params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> tuple:
    """Everything a captured step bakes in: inputs' layout, learning rate, parameters' addresses and strides."""
    layout = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in params)
    return tuple(xs.shape), xs.dtype, tuple(ys.shape), ys.dtype, xs.device, lr, layout


class StepGraph:
    """``eager(params, xs, ys, lr)`` over static batch buffers, captured as one CUDA graph."""

    def __init__(self, eager: Callable, params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float,
                 stop: Callable[[], bool] = never):
        self.xs, self.ys = torch.empty_like(xs), torch.empty_like(ys)
        self.params = params  # held, so that their memory stays theirs while the graph lives
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them: the weights stay put
            self.losses = eager(params, self.xs, self.ys, lr, UNCOUNTED, stop)
        self.complete = self.losses.shape[0] == xs.shape[1]  # False: a stop signal cut the captured loop short
        self.replays = 0

    def replay(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """The SGD steps over the batch (xs, ys); returns their losses (steps, E)."""
        self.xs.copy_(xs)
        self.ys.copy_(ys)
        self.graph.replay()
        self.replays += 1
        return self.losses.clone()


class StepGraphs:
    """The step ``eager`` (kernels.mlp_step.PlainSGD.eager), for CUDA tensors as replayed CUDA graphs."""

    def __init__(self, eager: Callable):
        self.eager, self.graphs = eager, {}

    def current(self, key: tuple) -> dict:
        """The graphs, without those of parameter memory no longer in use, at most MAX_GRAPHS - 1 old."""
        graphs = {k: g for k, g in self.graphs.items() if k[-1] == key[-1]}
        while len(graphs) >= MAX_GRAPHS and key not in graphs:
            graphs.pop(next(iter(graphs)))
        self.graphs = graphs
        return graphs

    def __call__(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float, count: Counter = UNCOUNTED,
                 stop: Callable[[], bool] = never) -> torch.Tensor:
        """``eager(params, xs, ys, lr, count, stop)``, for CUDA tensors as a replayed CUDA graph (the same bits)."""
        if not uses_graph(xs.device) or stop():  # a stop cuts the eager loop at a step
            return self.eager(params, xs, ys, lr, count, stop)
        key = graph_key(params, xs, ys, lr)
        graphs = self.current(key)
        if key not in graphs:  # a key's first batch: eager
            graphs[key] = None
            return self.eager(params, xs, ys, lr, count, stop)
        if graphs[key] is None:
            graphs[key] = StepGraph(self.eager, params, xs, ys, lr, stop)
            if not graphs[key].complete:  # nothing ran during the capture: the eager loop stops at its first step
                del graphs[key]
                return self.eager(params, xs, ys, lr, count, stop)
        losses = graphs[key].replay(xs, ys)
        for _ in range(xs.shape[1]):  # the steps the replay ran, counted outside the graph
            count.before()
            count.after()
        return losses
