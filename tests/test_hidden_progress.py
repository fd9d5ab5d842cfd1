"""Hidden-progress measures against their brute-force definitions, and logged by a real run."""
import itertools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import compose
from datamodules.parity import ParityTask
from metrics.hidden_progress import (FourierGap, RelevantWeightMargin, WeightDrift, boolean_cube,
                                               column_norm_image, k_subsets, member_stats, walsh_hadamard)
from lightning_modules.parity_mlp import ParityMLP


def brute_coefficient(f: torch.Tensor, x: torch.Tensor, subset) -> torch.Tensor:
    """f^(S) = mean over samples of f(x) prod_{i in S} x_i, one sample at a time in float64."""
    f, x = f.double(), x.double()
    chi = torch.ones(x.shape[0], dtype=torch.float64)
    for i in subset:
        chi = chi * x[:, i]
    return (f * chi).mean(-1)


def brute_gap(f: torch.Tensor, x: torch.Tensor, secret, k: int) -> torch.Tensor:
    others = [s for s in itertools.combinations(range(x.shape[1]), k) if set(s) != set(secret)]
    best = torch.stack([brute_coefficient(f, x, s).abs() for s in others]).amax(0)
    return brute_coefficient(f, x, secret).abs() - best


def test_boolean_cube_enumerates_every_input_once():
    cube = boolean_cube(5)
    assert cube.shape == (32, 5)
    assert len({tuple(r) for r in cube.tolist()}) == 32
    assert cube[0].eq(1).all() and cube[0b10010].tolist() == [1, -1, 1, 1, -1]


def test_walsh_hadamard_equals_the_definition_for_every_subset():
    n = 6
    cube, f = boolean_cube(n), torch.randn(3, 2**n, generator=torch.Generator().manual_seed(0))
    coeffs = walsh_hadamard(f)
    for mask in range(2**n):
        subset = [i for i in range(n) if mask >> i & 1]
        torch.testing.assert_close(coeffs[:, mask].double(), brute_coefficient(f, cube, subset),
                                   rtol=0, atol=1e-6)


def test_fourier_gap_exact_recovers_a_known_spectrum():
    n, k, secret = 10, 3, [7, 1, 4]
    x = boolean_cube(n)
    chi = lambda s: x[:, s].prod(1)  # noqa: E731
    f = torch.stack([0.9 * chi(secret) + 0.3 * chi([0, 2, 3]) - 0.5 * chi([5, 6]) + 0.2,  # gap 0.6
                     0.1 * chi(secret) - 0.4 * chi([2, 8, 9])])  # gap -0.3: another subset dominates
    gap = FourierGap(n, k)
    gap.update(f, secret)
    torch.testing.assert_close(gap.compute(), torch.tensor([0.6, -0.3]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n, k", [(8, 3), (9, 2)])
def test_fourier_gap_exact_and_sampled_paths_agree_on_the_full_cube(n, k):
    x, f = boolean_cube(n), torch.randn(4, 2**n, generator=torch.Generator().manual_seed(n))
    secret = [n - 1, 0, 2][:k]
    exact, sampled = FourierGap(n, k), FourierGap(n, k)
    exact.update(f, secret)
    sampled.update(f, secret, x)
    torch.testing.assert_close(exact.compute(), sampled.compute(), rtol=0, atol=1e-5)
    torch.testing.assert_close(exact.compute().double(), brute_gap(f, x, secret, k), rtol=0, atol=1e-5)


def test_fourier_gap_estimate_on_held_out_samples_equals_the_definition():
    n, k, secret = 20, 2, [13, 5]
    g = torch.Generator().manual_seed(1)
    x = 1.0 - 2.0 * torch.randint(0, 2, (500, n), generator=g).float()
    f = torch.randn(3, 500, generator=g) + x[:, secret].prod(1)
    gap = FourierGap(n, k)  # C(20, 2) = 190 subsets: all of them, in uneven chunks of 32
    gap.update(f, secret, x)
    torch.testing.assert_close(gap.compute().double(), brute_gap(f, x, secret, k), rtol=0, atol=1e-5)
    later = f.roll(1, dims=1)  # a later evaluation on the same samples: the kept characters serve it
    gap.update(later, secret, x)
    torch.testing.assert_close(gap.compute().double(), brute_gap(later, x, secret, k), rtol=0, atol=1e-5)
    other = x.flip(0)  # other samples: their own characters
    gap.update(f, secret, other)
    torch.testing.assert_close(gap.compute().double(), brute_gap(f, other, secret, k), rtol=0, atol=1e-5)


def test_k_subsets_all_when_few_else_a_distinct_sample():
    assert k_subsets(7, 3).tolist() == [list(s) for s in itertools.combinations(range(7), 3)]
    sample = k_subsets(60, 4, limit=500)
    assert math.comb(60, 4) > 500 and sample.shape == (500, 4)
    assert (sample[:, 1:] > sample[:, :-1]).all() and sample.max() < 60
    assert len({tuple(s) for s in sample.tolist()}) == 500


def test_margin_is_the_column_norm_gap_and_flips_sign_when_the_secret_dominates():
    n, width, secret = 12, 8, [3, 9, 0]
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(2, width, n, generator=g) * 0.1
    w1[:, :, 5] *= 10  # a non-secret input dominates
    margin = RelevantWeightMargin()
    margin.update(w1, secret)
    norms = [[math.sqrt(sum(w1[e, h, i].item() ** 2 for h in range(width))) for i in range(n)] for e in range(2)]
    expected = [min(r[i] for i in secret) - max(r[i] for i in range(n) if i not in secret) for r in norms]
    torch.testing.assert_close(margin.compute(), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert (margin.compute() < 0).all()
    w1[:, :, secret] *= 100  # now every secret column outweighs every other one
    margin.reset()
    margin.update(w1, secret)
    assert (margin.compute() > 0).all()


def test_weight_drift_is_the_largest_entry_change():
    w0 = torch.zeros(2, 3, 4)
    w1 = w0.clone()
    w1[0, 1, 2], w1[1, 0, 0], w1[1, 2, 3] = -0.7, 0.2, 0.5
    drift = WeightDrift()
    drift.update(w1, w0)
    assert drift.compute().tolist() == pytest.approx([0.7, 0.5])


def test_member_stats_and_image_layout():
    stats = member_stats("m", torch.tensor([1.0, 4.0, 2.0, 3.0]))
    assert stats["m_mean"] == 2.5 and stats["m_median"] == 2.5 and stats["m_min"] == 1.0
    norms = torch.ones(5, 6)  # 5 evaluations, 6 inputs
    norms[:, 0] = 1.1  # the noisiest non-secret input: 10% above the median
    norms[:, [4, 1]] = torch.tensor([[1.0, 1.0], [1.05, 1.0], [1.2, 1.0], [2.0, 1.0], [3.0, 1.0]])
    image = column_norm_image(norms, [4, 1], pixel=2).int()
    assert image.shape == (12, 2 + 10, 3)
    assert image[0, 0].tolist() == [0, 0, 0] and image[7, 0].tolist() == [255, 255, 255]  # secret rows marked
    assert image[4].eq(0).all()  # black line under the secret rows
    input4 = [image[0, 2 + 2 * t] for t in range(5)]  # first secret row, one pixel per evaluation
    assert (input4[0] - image[9, 2]).abs().max() <= 1  # at the median: the colour of a median input
    assert input4[1][0] > input4[1][2] and input4[1][1] > 100  # 5% above: light red, not saturated
    assert input4[2].tolist() == input4[4].tolist()  # beyond every non-secret deviation: saturated red
    assert input4[2][0] > 2 * input4[2][2]


def test_image_colours_are_matplotlibs_diverging_map_of_each_shade():
    from matplotlib import colormaps
    norms = torch.rand(7, 9, generator=torch.Generator().manual_seed(3)) + 0.5
    norms[2] = 1.0  # every input at the median: the centre of the map
    secret = [6, 2]
    image = column_norm_image(norms, secret, pixel=1)[:, 1:]  # past the marker column
    order = secret + [i for i in range(9) if i not in secret]
    relative = (norms[:, order] / norms.median(dim=1, keepdim=True).values - 1).T
    shade = (relative / (2 * relative[len(secret):].abs().max()) + 0.5).clamp(0, 1)
    expected = torch.from_numpy(colormaps["RdBu_r"](shade.numpy())[..., :3]).float().mul(255).round().to(torch.uint8)
    expected[len(secret)] = 0  # the black line under the secret rows
    assert torch.equal(image, expected)


def test_a_run_logs_hidden_progress_that_ends_positive_when_solved(tmp_path):
    cfg = compose(["experiment=parity_mlp", "data.n=12", "data.k=3", "model.ensemble=3", "trainer.max_steps=1500",
                   "eval.every_n_steps=100", "checkpoint.every_n_steps=500", "trainer.progress_bar=false"])
    torch.manual_seed(0)
    dm, model = ParityTask(cfg), ParityMLP(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, max_epochs=-1,
                        logger=TensorBoardLogger(tmp_path, name="", version="tb"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert (model.solved_step > 0).all(), "n=12, k=3 should be solved by every member"
    assert (model.hidden_progress.margin.compute() > 0).all()
    assert (model.hidden_progress.fourier.compute() > 0).all()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    margin, gap = events.Scalars("hidden/margin_min"), events.Scalars("hidden/fourier_gap_min")
    assert margin[0].value < 0 < margin[-1].value  # some other input outweighs S at first, none at the end
    assert gap[-1].value > gap[0].value + 0.5  # f^(S) grows to dominate every other k-subset
    assert [e.step for e in gap] == [im.step for im in events.Images("hidden/column_norms/member_0")]
    images = events.Images("hidden/column_norms/member_0")
    assert [im.step for im in images] == list(range(100, int(model.solved_step.max()) + 1, 100))
    assert images[-1].height == 12 * 4 and images[-1].width == 4 + len(images) * 4
