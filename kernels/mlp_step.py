"""The MLP ensemble's plain-SGD step, fused: the hand-written gradient applied by the matmuls that compute it.

A step of SGD without momentum or weight decay on f = w2 . act(w1 x + b1) + b2 is torch.optim.SGD's update
p <- p - lr * grad, each applied by the batched matmul that computes grad (``baddbmm_`` with ``alpha=-lr``).
The step takes plain tensors, updated in place: ``first`` = [w1^T; b1] (E, n + 1, W), of which the network's
w1 and b1 are views, so that one matmul with inputs [x, 1] computes w1 x + b1; w2 (E, W); b2 (E,). What it
computes comes from the network and the loss as plain callables (``Arithmetic``), so the activation and its
derivative are written once, in networks/mlp.py.

``PlainSGD(path, arithmetic)`` is the one interface: "fused" (eager, any device), "cpp" (ReLU and hinge loss
as C++ on a CPU, kernels/mlp_step_cpu.py) or "cuda_graph" (the eager step replayed as a CUDA graph,
kernels/mlp_step_graph.py). A step is counted by ``count.before()`` / ``count.after()`` around its update,
and ``stop()``, asked after each step, cuts the batch short. Each path is tested against autograd
(tests/test_parity_mlp.py), and a run checks its path against autograd through the current forward before
it trains (lightning_modules/parity_mlp.py).
"""
import functools
from typing import Callable, NamedTuple, Protocol

import torch

WHOLE_BATCH_BYTES = 2**22  # inputs converted to +/-1 in one call for the whole batch up to this size, else by step
Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # first = [w1^T; b1], w2, b2, updated in place


class Counter(Protocol):
    """Calls around one SGD step's update (the trainer counts the step)."""

    def before(self) -> None: ...

    def after(self) -> None: ...


class Uncounted:
    """A step nobody counts (a test, a benchmark, a CUDA graph's capture)."""

    def before(self) -> None:
        pass

    def after(self) -> None:
        pass


UNCOUNTED = Uncounted()


def never() -> bool:
    """No stop asked for."""
    return False


class Arithmetic(NamedTuple):
    """What a step computes. act(z) is h (it may overwrite z); act_backward_(dz, z, h) multiplies dz by act'(z) in
    place; loss_grad(f, y) is (per-member losses (E,), d(their sum)/df (E, B)); hinge: the loss is the hinge
    loss, whose gradient the step takes as one threshold op (loss_grad unused)."""
    act: Callable[[torch.Tensor], torch.Tensor]
    act_backward_: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    loss_grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hinge: bool


def to_pm1(xs: torch.Tensor, out: torch.Tensor) -> None:
    """Inputs as +/-1 floats into ``out``: bits b as 1 - 2b, floats (already +/-1) as they are."""
    if xs.is_floating_point():
        out.copy_(xs)
    else:
        torch.mul(xs, -2.0, out=out).add_(1.0)


@torch.no_grad()
def fused_sgd_steps(params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float, arith: Arithmetic,
                    count: Counter = UNCOUNTED, stop: Callable[[], bool] = never) -> torch.Tensor:
    """SGD steps over xs (E, steps, B, n), +/-1 floats or bits, and ys (E, steps, B); returns losses (steps, E).

    Every buffer and view is made once per call, so that a step is a dozen ATen calls into fixed memory.
    """
    first, w2, b2 = params
    members, steps, batch, n = xs.shape
    whole = members * steps * batch * (n + 1) * 4 <= WHOLE_BATCH_BYTES
    x = ys.new_ones(members, steps if whole else 1, batch, n + 1)  # [x, 1]: its product with first adds b1
    if whole:
        to_pm1(xs, x[..., :n])
    z, dz = ys.new_empty(members, batch, first.shape[2]), ys.new_empty(members, batch, first.shape[2])
    f, g = ys.new_empty(members, 1, batch), ys.new_empty(members, batch)
    w2, b2 = w2.unsqueeze(1), b2.view(-1, 1, 1)
    z_t, f_row, g_col, g_row = z.transpose(1, 2), f.squeeze(1), g.unsqueeze(-1), g.unsqueeze(1)
    act, act_backward_, hinge = arith.act, arith.act_backward_, arith.hinge
    if hinge:  # the hinge gradient is -y / B where the slack 1 - y f is positive: one threshold op a step
        slack, one = ys.new_empty(steps, members, batch), ys.new_ones(())
        scaled_y = (ys * (-1 / batch)).unbind(1)
    else:
        losses = ys.new_empty(steps, members)
    steps_x, steps_x_t = x.unbind(1), x.transpose(2, 3).unbind(1)
    if not whole:  # one buffer, filled at each step
        steps_x, steps_x_t = steps_x * steps, steps_x_t * steps
    for j, y_j in enumerate(ys.unbind(1)):  # no allocation of batch x width tensors
        if not whole:
            to_pm1(xs[:, j], steps_x[j][..., :n])
        torch.bmm(steps_x[j], first, out=z)
        h = act(z)
        torch.baddbmm(b2, w2, z_t if h is z else h.transpose(1, 2), out=f)  # w2 h^T: a row per member
        if hinge:
            torch.addcmul(one, y_j, f_row, value=-1, out=slack[j])
            torch.ops.aten.threshold_backward.grad_input(scaled_y[j], slack[j], 0, grad_input=g)
        else:
            losses[j], grad = arith.loss_grad(f_row, y_j)
            g.copy_(grad)
        torch.mul(g_col, w2, out=dz)  # (E, B, width)
        act_backward_(dz, z, h)
        count.before()
        w2.baddbmm_(g_row, h, alpha=-lr)
        b2.sub_(g.sum(1).view_as(b2), alpha=lr)
        first.baddbmm_(steps_x_t[j], dz, alpha=-lr)
        count.after()
        if stop():  # cut the batch short at this step
            break
    return slack[:j + 1].clamp_min_(0).mean(2) if hinge else losses[:j + 1]


class PlainSGD:
    """The accelerated plain-SGD step of ``path`` (fused | cpp | cuda_graph) computing ``arith``. A CUDA graph's
    captures live in ``graphs`` (kernels/mlp_step_graph.py)."""

    def __init__(self, path: str, arith: Arithmetic):
        self.path, self.arith, self.graphs = path, arith, None
        if path == "cpp":  # ReLU and hinge, whatever arith says: a run checks that they are its forward and loss
            from kernels.mlp_step_cpu import extension, hinge_relu_sgd_steps
            if extension() is None:
                raise RuntimeError("the C++ step could not be built (see the warning above)")
            self.step = functools.partial(hinge_relu_sgd_steps, extension())
        elif path == "cuda_graph":
            from kernels.mlp_step_graph import StepGraphs
            self.step = self.graphs = StepGraphs(self.eager)
        elif path == "fused":
            self.step = self.eager
        else:
            raise ValueError(f"plain-SGD path {path!r} is not one of fused, cpp, cuda_graph")

    def eager(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float, count: Counter = UNCOUNTED,
              stop: Callable[[], bool] = never) -> torch.Tensor:
        """The fused step in PyTorch (what a CUDA graph captures)."""
        return fused_sgd_steps(params, xs, ys, lr, self.arith, count, stop)

    def __call__(self, params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float, count: Counter = UNCOUNTED,
                 stop: Callable[[], bool] = never) -> torch.Tensor:
        """SGD steps over xs (E, steps, B, n) and ys (E, steps, B), updating ``params`` in place; losses (steps, E)."""
        return self.step(params, xs, ys, lr, count, stop)
