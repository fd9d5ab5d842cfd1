"""The threshold-gate chain (data.chain=gates) and the sequential chain's stride (data.chain_stride)."""
import math

import lightning as L
import pytest
import torch

from config import ConfigError, compose
from datamodules.parity_config import chain_len
from datamodules.parity import ParityTask
from kernels import sparse_parity
from runtime.experiment import build

SEP = 2
CPU = torch.device("cpu")


def chain_config(n: int, k: int, *overrides: str):
    return compose(["experiment=cot_parity", f"data.n={n}", f"data.k={k}", "data.batch_size=8", "model.d_model=32",
                    "model.heads=2", "eval.size=64", "seed=5", *overrides])


def parity(bits: list[int]) -> int:
    return sum(bits) % 2


def reference_gates(picked: list[int]) -> list[int]:
    """Brute force: x_s1, then AND, OR, XOR of the running parity with each further secret bit."""
    out = [picked[0]]
    for i in range(1, len(picked)):
        before, bit = parity(picked[:i]), picked[i]
        out += [before * bit, max(before, bit), parity(picked[:i + 1])]
    return out


def reference_stride(picked: list[int], b: int) -> list[int]:
    """Brute force: the parities of the first b, 2b, ... secret bits, then of all of them if k is no multiple of b."""
    k = len(picked)
    return [parity(picked[:min(j * b, k)]) for j in range(1, math.ceil(k / b) + 1)]


def rows(dm: ParityTask, count: int = 200) -> tuple[list[list[int]], list[list[int]]]:
    """Sequences 7 .. 7 + count of training stream 0, and the input bits they were made from."""
    d = dm.cfg.data
    tokens = dm.sequences(7, count, stream=0, noise=0.0, device=CPU)
    bits, _, _ = sparse_parity(dm.cfg.seed, 7, count, d.n, dm.secret, stream=0, backend="torch")
    assert tokens.dtype == torch.int64 and tokens.shape == (count, dm.seq_len)
    return tokens.tolist(), bits.tolist()


@pytest.mark.parametrize("n,k", [(6, 1), (6, 2), (12, 3), (12, 5), (30, 8), (40, 13)])
def test_gates_tokens_match_brute_force(n, k):
    dm = ParityTask(chain_config(n, k, "data.chain=gates"))
    assert dm.prompt_len == n + 1 and dm.seq_len == n + 1 + 1 + 3 * (k - 1) == n + 1 + chain_len("gates", k)
    tokens, bits = rows(dm)
    for row, x in zip(tokens, bits):
        picked = [x[i] for i in dm.secret]
        assert row == x + [SEP] + reference_gates(picked)
        assert row[-1] == parity(picked)


def threshold_holds(tokens: torch.Tensor, position: int, weights: dict[int, int], threshold: int) -> bool:
    """Whether token ``position`` is [sum of weight x token over earlier positions >= threshold] in every row."""
    assert all(p < position for p in weights)
    total = sum(w * tokens[:, p] for p, w in weights.items())
    return torch.equal(tokens[:, position], (total >= threshold).long())


@pytest.mark.parametrize("k", [2, 4, 9])
def test_every_gate_token_is_a_threshold_of_earlier_tokens(k):
    """Token by token, with the operands located in the sequence itself (prompt bit, previous XOR or x_s1)."""
    n = 16
    dm = ParityTask(chain_config(n, k, "data.chain=gates"))
    tokens = dm.sequences(0, 2000, stream=0, noise=0.0, device=CPU)
    P = dm.prompt_len
    assert torch.equal(tokens[:, P], tokens[:, dm.secret[0]])  # x_s1, copied from the prompt
    carry = P
    for i in range(1, k):
        both, either, xor, bit = P + 3 * i - 2, P + 3 * i - 1, P + 3 * i, dm.secret[i]
        assert threshold_holds(tokens, both, {carry: 1, bit: 1}, 2)  # AND
        assert threshold_holds(tokens, either, {carry: 1, bit: 1}, 1)  # OR
        assert threshold_holds(tokens, xor, {either: 1, both: -1}, 1)  # XOR = [OR - AND >= 1]
        assert not threshold_holds(tokens, xor, {carry: 1, bit: 1}, 1)  # the XOR is no threshold of its operands
        carry = xor
    assert carry == dm.seq_len - 1


def test_gates_noise_flips_only_the_answer():
    dm = ParityTask(chain_config(12, 4, "data.chain=gates", "data.noise=0.3"))
    clean = dm.sequences(0, 2000, 0, 0.0, CPU)
    noisy = dm.sequences(0, 2000, 0, 0.3, CPU)
    assert torch.equal(clean[:, :-1], noisy[:, :-1])
    assert 0.25 < (clean[:, -1] != noisy[:, -1]).float().mean() < 0.35


@pytest.mark.parametrize("k", [1, 5, 8])
def test_stride_tokens_match_brute_force(k):
    for b in range(1, k + 2):
        dm = ParityTask(chain_config(12, k, "data.chain=sequential", f"data.chain_stride={b}"))
        assert dm.seq_len == 13 + math.ceil(k / b) == 13 + chain_len("sequential", k, b)
        tokens, bits = rows(dm, 100)
        for row, x in zip(tokens, bits):
            assert row == x + [SEP] + reference_stride([x[i] for i in dm.secret], b), (k, b)


def test_stride_one_is_the_sequential_chain_and_stride_k_the_answer_alone():
    stride_one = ParityTask(chain_config(30, 8, "data.chain_stride=1"))
    plain = ParityTask(chain_config(30, 8))
    assert torch.equal(stride_one.sequences(0, 500, 0, 0.2, CPU), plain.sequences(0, 500, 0, 0.2, CPU))
    answer_only = ParityTask(chain_config(30, 8, "data.chain=none"))
    for b in (8, 9):
        strided = ParityTask(chain_config(30, 8, f"data.chain_stride={b}"))
        assert torch.equal(strided.sequences(0, 500, 0, 0.2, CPU), answer_only.sequences(0, 500, 0, 0.2, CPU))
        assert torch.equal(strided.eval_set(CPU), answer_only.eval_set(CPU))


@pytest.mark.parametrize("overrides,message", [
    (["data.chain_stride=0"], "data.chain_stride: must be >= 1, got 0"),
    (["data.chain_stride=-2"], "data.chain_stride: must be >= 1, got -2"),
    (["data.chain=tree", "data.chain_stride=2"], "data.chain_stride: applies to data.chain=sequential only"),
    (["data.chain=gates", "data.chain_stride=3"], "data.chain_stride: applies to data.chain=sequential only"),
    (["data.chain=none", "data.chain_stride=2"], "data.chain_stride: applies to data.chain=sequential only"),
    (["data.chain=xor"], "data.chain: 'xor' is not one of none, sequential, tree, gates"),
])
def test_bad_chain_keys_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        chain_config(12, 4, *overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def train_linear(chain: str) -> dict:
    """A linear next-token model trained in-process on (n = 10, k = 3) parity with ``chain``; its results."""
    cfg = compose(["experiment=cot_parity", "model.kind=linear", f"data.chain={chain}", "data.n=10", "data.k=3",
                   "trainer.max_steps=150", "eval.every_n_steps=50", "eval.size=512", "optim.lr=0.01",
                   "trainer.accelerator=cpu"])
    dm, model = build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=cfg.trainer.max_steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return model.results()


def test_a_linear_model_learns_the_gates_chain_but_not_the_sequential_one():
    """Malach 2024: every gate token is linearly computable, the sequential chain's XOR tokens are not."""
    gates, sequential = train_linear("gates"), train_linear("sequential")
    assert gates["solved_step"] is not None and gates["chain_accuracy"] == 1.0
    assert sequential["solved_step"] is None and sequential["greedy_accuracy"] < 0.6
