"""Hidden-progress measures of a parity MLP ensemble (Barak et al. 2022), one value per member.

While the loss sits on its plateau, SGD is already finding the secret S. Three measures show it:

* relevant-weight margin: min over i in S of the first-layer column norm ||W[:, i]|| minus the max
  over i not in S (positive once every secret input outweighs every other input);
* Fourier gap: |f^(S)| minus the largest |f^(S')| over other k-subsets S' of the network output f,
  where f^(S) = E_x[f(x) chi_S(x)] and chi_S(x) = prod_{i in S} x_i; exact over all 2^n inputs
  (fast Walsh-Hadamard transform) when n <= EXACT_MAX_N, otherwise estimated on held-out samples;
* weight drift: ||W_t - W_0||_inf of the first layer.

Each is a torchmetrics ``Metric`` whose ``compute()`` is a tensor (members,). Every rank holds the
same weights and held-out set, so the metrics never synchronise.
"""
import functools
import itertools
import math
from collections.abc import Callable

import numpy
import torch
from torch import nn
from torchmetrics import Metric

EXACT_MAX_N = 16  # up to here the Fourier gap uses every one of the 2^n inputs
MAX_SUBSETS = 2048  # competing k-subsets S' scored (all of them when C(n, k) is at most this)


def column_norms(w1: torch.Tensor) -> torch.Tensor:
    """||W[:, i]||_2 of every input i: (members, n) from first-layer weights (members, width, n)."""
    return w1.norm(dim=1)


def boolean_cube(n: int, device: torch.device | None = None) -> torch.Tensor:
    """All 2^n inputs in {+1, -1}^n, (2^n, n); row j has x_i = -1 exactly where bit i of j is set."""
    j = torch.arange(2**n, device=device)
    return 1.0 - 2.0 * ((j[:, None] >> torch.arange(n, device=device)) & 1).float()


def walsh_hadamard(f: torch.Tensor) -> torch.Tensor:
    """Fourier coefficients of f (..., 2^n) on the cube: out[..., m] = mean_j f[..., j] chi_m(x_j).

    The coefficient of subset S sits at index m = sum of 2^i over i in S (rows as in boolean_cube).
    """
    size = f.shape[-1]
    h = f.reshape(-1, size)
    for i in range(size.bit_length() - 1):
        pairs = h.view(h.shape[0], -1, 2, 2**i)
        low, high = pairs[:, :, 0], pairs[:, :, 1]
        h = torch.stack((low + high, low - high), dim=2).view(h.shape[0], size)
    return (h / size).view(f.shape)


def k_subsets(n: int, k: int, limit: int = MAX_SUBSETS, seed: int = 0) -> torch.Tensor:
    """Sorted k-subsets of range(n), (count, k): all C(n, k) if at most ``limit``, else a random sample."""
    if math.comb(n, k) <= limit:
        return torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long).view(-1, k)
    g = torch.Generator().manual_seed(seed)
    draws = torch.rand(2 * limit, n, generator=g).argsort(dim=1)[:, :k].sort(dim=1).values.unique(dim=0)
    return draws[torch.randperm(draws.shape[0], generator=g)[:limit]]


def characters(xt: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """chi_S'(x) for every subset and sample: (subsets, samples) from xt (n, samples) in {+1, -1}."""
    chi = xt.index_select(0, subsets[:, 0])
    for j in range(1, subsets.shape[1]):
        chi.mul_(xt.index_select(0, subsets[:, j]))  # whole rows: far faster than gathering columns
    return chi


class MemberMeasure(Metric):
    """The latest value of a measure for every member; compute() -> (members,)."""
    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False)
        self.add_state("value", default=torch.zeros(0), dist_reduce_fx=None)

    def compute(self) -> torch.Tensor:
        return self.value


class RelevantWeightMargin(MemberMeasure):
    """min_{i in S} ||W[:, i]|| - max_{i not in S} ||W[:, i]|| of the first layer."""

    def update(self, w1: torch.Tensor, secret: list[int]) -> None:
        norms = column_norms(w1)
        inside = torch.zeros(norms.shape[1], dtype=torch.bool, device=norms.device)
        inside[secret] = True
        outside = norms[:, ~inside].amax(dim=1) if not inside.all() else torch.zeros_like(norms[:, 0])
        self.value = norms[:, inside].amin(dim=1) - outside


class WeightDrift(MemberMeasure):
    """||W_t - W_0||_inf: the largest change of any first-layer weight since initialisation."""

    def update(self, w1: torch.Tensor, w1_init: torch.Tensor) -> None:
        self.value = (w1 - w1_init).abs().flatten(1).amax(dim=1)


class FourierGap(MemberMeasure):
    """|f^(S)| - max over other k-subsets S' of |f^(S')| for the network output f."""

    def __init__(self, n: int, k: int, limit: int = MAX_SUBSETS) -> None:
        super().__init__()
        self.n, self.k = n, k
        self.subsets = k_subsets(n, k, limit)
        self._characters = None  # (held-out samples, secret, their characters): the samples are fixed

    def update(self, f: torch.Tensor, secret: list[int], x: torch.Tensor | None = None) -> None:
        """f (members, samples): outputs on ``x`` (samples, n), or on boolean_cube(n) when x is None."""
        if x is None:
            self.value = self._exact(f, secret)
            return
        coefficients = self.characters(x, secret) @ f.T / x.shape[0]  # (1 + others, members)
        own, others = coefficients[0], coefficients[1:]
        self.value = own.abs() - (others.abs().amax(dim=0) if others.shape[0] else torch.zeros_like(own))

    def characters(self, x: torch.Tensor, secret: list[int]) -> torch.Tensor:
        """chi_S(x) of the secret, then chi_S'(x) of every scored subset S' other than it, (1 + subsets, samples):
        made at the first evaluation and kept, since every evaluation scores the same held-out samples (counted
        by the memory check). One matrix, so one product gives every coefficient."""
        held = self._characters  # it holds on to its samples: no other tensor can take their memory
        same = held is not None and (held[0].data_ptr(), held[0].shape, held[0].stride(), held[0].device) == \
            (x.data_ptr(), x.shape, x.stride(), x.device)
        if not same or held[1] != list(secret):
            s = torch.tensor(sorted(secret), device=x.device)
            subsets = self.subsets.to(x.device)
            scored = torch.cat([s[None], subsets[(subsets != s).any(dim=1)]])
            xt = x.T.contiguous()
            chi = torch.cat([characters(xt, part) for part in scored.split(32)])  # 32 rows at a time stay in cache
            self._characters = held = (x, list(secret), chi)
        return held[2]

    def _exact(self, f: torch.Tensor, secret: list[int]) -> torch.Tensor:
        coeffs = walsh_hadamard(f).abs()
        masks = torch.arange(2**self.n, device=f.device)
        popcount = ((masks[:, None] >> torch.arange(self.n, device=f.device)) & 1).sum(dim=1)
        own = sum(1 << i for i in secret)
        others = (popcount == self.k) & (masks != own)
        best = coeffs[:, others].amax(dim=1) if others.any() else torch.zeros_like(coeffs[:, own])
        return coeffs[:, own] - best


def member_stats(name: str, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name_mean, name_median, name_min} over members."""
    return {f"{name}_mean": values.mean(), f"{name}_median": values.quantile(0.5), f"{name}_min": values.min()}


@functools.cache
def diverging_colors() -> torch.Tensor:
    """matplotlib's RdBu_r colour table, (256, 3) RGB in [0, 1] (looked up once: the colormap call costs more than
    the rest of an image)."""
    from matplotlib import colormaps
    return torch.from_numpy(colormaps["RdBu_r"](numpy.arange(256))[:, :3]).float()


def column_norm_image(norms: torch.Tensor, secret: list[int], pixel: int = 4) -> torch.Tensor:
    """An RGB uint8 image (H, W, 3): rows = inputs (secret first, marked black on the left, then a black
    line), columns = evaluations. ``norms`` is (evaluations, n).

    Each column norm is shown relative to the median column at the same evaluation, on a diverging
    scale (blue below, white at, red above the median) that saturates at the largest deviation any
    non-secret input ever shows: a secret row turns full red once it stands out beyond that noise."""
    order = list(secret) + [i for i in range(norms.shape[1]) if i not in set(secret)]
    relative = (norms[:, order] / norms.median(dim=1, keepdim=True).values.clamp_min(1e-12) - 1).T.float()
    spread = relative[len(secret):].abs().max().clamp_min(1e-6) if len(order) > len(secret) else 1.0
    shade = (relative / (2 * spread) + 0.5).clamp(0, 1)
    rgb = diverging_colors()[(shade.cpu() * 256).long().clamp_(max=255)]  # as matplotlib maps floats to its table
    rgb = rgb.repeat_interleave(pixel, 0).repeat_interleave(pixel, 1)
    marker = torch.ones(rgb.shape[0], pixel, 3)
    marker[: len(secret) * pixel] = 0.0
    rgb = torch.cat([marker, rgb], dim=1)
    if len(order) > len(secret):  # k < n: a black line under the secret rows
        rgb[len(secret) * pixel] = 0.0
    return (rgb * 255).round().to(torch.uint8)


class HiddenProgress(nn.Module):
    """All measures of an ensemble plus the column-norm history of its first ``imaged`` members."""

    def __init__(self, n: int, k: int, imaged: int = 4) -> None:
        super().__init__()
        self.n, self.imaged = n, imaged
        self.margin, self.drift, self.fourier = RelevantWeightMargin(), WeightDrift(), FourierGap(n, k)
        self.steps: list[int] = []
        self.norms: list[torch.Tensor] = []  # per evaluation: (imaged members, n) on the CPU

    @torch.no_grad()
    def measure(self, forward: Callable[[torch.Tensor], torch.Tensor], w1: torch.Tensor,
                w1_init: torch.Tensor, held_out: torch.Tensor, secret: list[int], step: int,
                outputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Update every measure; returns the logged stats. ``forward``: x (members, N, n) -> f (members, N);
        ``held_out``: samples (N, n) in {+1, -1} that no member trained on; ``outputs``: forward's on them, where
        the caller has them already."""
        members = w1.shape[0]
        for metric in (self.margin, self.drift, self.fourier):
            metric.reset()
        self.margin.update(w1, secret)
        self.drift.update(w1, w1_init)
        exact = self.n <= EXACT_MAX_N
        x = boolean_cube(self.n, w1.device) if exact else held_out
        f = outputs if outputs is not None and not exact else forward(x.expand(members, -1, -1))
        self.fourier.update(f, secret, None if exact else x)
        self.steps.append(step)
        self.norms.append(column_norms(w1[: self.imaged]).cpu())
        return {**member_stats("hidden/margin", self.margin.compute()),
                **member_stats("hidden/fourier_gap", self.fourier.compute()),
                **member_stats("hidden/weight_drift", self.drift.compute())}

    def images(self, secret: list[int]) -> list[torch.Tensor]:
        """One column-norm image (H, W, 3) per imaged member, over every evaluation so far."""
        history = torch.stack(self.norms, dim=1)  # (imaged, evaluations, n)
        return [column_norm_image(h, secret) for h in history]
