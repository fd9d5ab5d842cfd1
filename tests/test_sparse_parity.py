"""The stream rule (docs/design.md, 1) on the PyTorch reference path (eager, and its C++ twin for CPUs)."""
from pathlib import Path

import pytest
import torch

from config import compose
from datamodules.parity import ParityTask, secret_for
from runtime.experiment import build
from datamodules.stream import Ticket, eval_stream, pm1, train_stream
from kernels import cpp, philox4x32, sparse_parity
from kernels.sparse_parity import on_device
from kernels import sparse_parity_cpu as sp_cpu

KAT = Path(__file__).resolve().parent / "data" / "philox4x32_10_kat.txt"  # Random123's known answers


def kat_vectors() -> list[list[int]]:
    rows = [line.split() for line in KAT.read_text().splitlines() if line and not line.startswith("#")]
    return [[int(v, 16) for v in row[2:]] for row in rows]


def test_philox_reproduces_random123_known_answers():
    for *counter_key, r0, r1, r2, r3 in kat_vectors():
        c0, c1, c2, c3, key0, key1 = counter_key
        out = philox4x32(*(torch.tensor([c], dtype=torch.int64) for c in (c0, c1, c2, c3)), key0, key1)
        assert [int(o) for o in out] == [r0, r1, r2, r3]


@pytest.mark.parametrize("start", [0, 5, 2**32 - 3, 2**40 + 11, 2**64 - 9])
def test_index_shift_consistency(start):
    secret = [3, 17, 40, 8]
    x, y, cot = sparse_parity(7, start, 8, 45, secret, stream=[0, 9], noise=0.2)
    for i in range(8):
        xi, yi, coti = sparse_parity(7, start + i, 1, 45, secret, stream=[0, 9], noise=0.2)
        assert torch.equal(xi[:, 0], x[:, i]) and torch.equal(yi[:, 0], y[:, i])
        assert torch.equal(coti[:, 0], cot[:, i])


def test_labels_are_xor_of_secret_and_chain_is_prefix_parities():
    secret = [12, 0, 99, 31, 64]
    x, y, cot = sparse_parity(3, 1000, 512, 100, secret)
    for j in range(len(secret)):
        expected = x[:, secret[: j + 1]].sum(1) % 2
        assert torch.equal(cot[:, j], expected.to(torch.uint8))
    assert torch.equal(y, cot[:, -1])
    # encodings (docs/design.md, 4): 1 - 2 * parity equals the product of the secret coordinates of 1 - 2b
    xp, yp, _ = sparse_parity(3, 1000, 512, 100, secret, layout="pm1")
    assert torch.equal(xp, 1 - 2 * x.float()) and torch.equal(yp, xp[:, secret].prod(1))


def test_tokens_layout_is_bits_separator_chain():
    x, y, cot = sparse_parity(1, 0, 64, 20, [4, 2, 9])
    tokens, y2, cot2 = sparse_parity(1, 0, 64, 20, [4, 2, 9], layout="tokens")
    assert tokens.dtype == torch.int64 and tokens.shape == (64, 20 + 1 + 3)
    assert torch.equal(tokens[:, :20], x.long()) and (tokens[:, 20] == 2).all()
    assert torch.equal(tokens[:, 21:], cot.long()) and torch.equal(y2, y) and torch.equal(cot2, cot)


def test_noise_flips_labels_at_the_requested_rate():
    _, y, cot = sparse_parity(11, 0, 200_000, 10, [1, 2], noise=0.1)
    rate = (y != cot[:, -1]).float().mean().item()
    assert abs(rate - 0.1) < 5 * (0.1 * 0.9 / 200_000) ** 0.5
    _, y0, cot0 = sparse_parity(11, 0, 1000, 10, [1, 2])
    assert torch.equal(y0, cot0[:, -1])


def test_seed_high_word_and_streams_change_the_samples():
    a = sparse_parity(5, 0, 64, 64, [0])[0]
    assert not torch.equal(a, sparse_parity(5 + 2**32, 0, 64, 64, [0])[0])
    assert not torch.equal(a, sparse_parity(5, 0, 64, 64, [0], stream=1)[0])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="secret"):
        sparse_parity(0, 0, 4, 5, [5])
    with pytest.raises(ValueError, match="noise"):
        sparse_parity(0, 0, 4, 5, [1], noise=0.5)
    with pytest.raises(ValueError, match="sample range"):
        sparse_parity(0, 2**64 - 2, 4, 5, [1])


def test_on_device_validates_once_and_gives_the_same_samples():
    with pytest.raises(ValueError, match="secret"):
        on_device([2, 2], 0, 5, "cpu")
    with pytest.raises(ValueError, match="stream"):
        on_device([1], [2**32], 5, "cpu")
    secret, streams = on_device([4, 0], [1, 3], 5, "cpu")
    want = sparse_parity(3, 7, 9, 5, [4, 0], stream=[1, 3])
    assert all(torch.equal(a, b) for a, b in zip(sparse_parity(3, 7, 9, 5, secret, stream=streams), want))
    secret, stream = on_device([4, 0], 3, 5, "cpu")
    assert stream.dim() == 0 and sparse_parity(3, 7, 9, 5, secret, stream=stream)[0].shape == (9, 5)


class FakeTrainer:
    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size, self.global_step = rank, world, 0


def datamodule(*args: str) -> ParityTask:
    """The parity datamodule as a run builds it (the MLP family hands it kernels.compile)."""
    return build(compose(["data.n=30", "data.k=3", "data.batch_size=8", *args]))[0]


def test_rank_slices_union_to_the_global_batch():
    dm = datamodule("model.ensemble=3")
    whole = dm.generate(Ticket(step=40, steps=5, rank=0, world_size=1), torch.device("cpu"))
    for world in (2, 4):
        parts = [dm.generate(Ticket(40, 5, rank, world), torch.device("cpu")) for rank in range(world)]
        assert torch.equal(torch.cat([p.x for p in parts], dim=2), whole.x)
        assert torch.equal(torch.cat([p.y for p in parts], dim=2), whole.y)


def test_ticket_stream_resumes_from_the_trainer_step():
    dm = datamodule()
    dm.trainer = FakeTrainer(0, 1)
    dm.trainer.global_step = 300
    tickets = list(dm.train_dataloader())
    assert tickets[0].step == 300 and sum(t.steps for t in tickets) == dm.cfg.trainer.max_steps - 300
    assert all(b.step == a.step + a.steps for a, b in zip(tickets, tickets[1:]))


def test_eval_stream_is_disjoint_from_every_training_stream():
    members = range(64)
    train, held_out = {train_stream(m) for m in members}, {eval_stream(m) for m in members}
    assert not train & held_out and len(train) == len(held_out) == 64
    dm = datamodule("model.ensemble=2", "data.n=64")
    x_eval, _ = dm.eval_set(torch.device("cpu"))
    x_train = pm1(dm.generate(Ticket(0, 100, 0, 1), torch.device("cpu")).x).flatten(1, 2)
    for member in range(2):
        seen = {tuple(row.tolist()) for row in x_train[member]}
        assert not any(tuple(row.tolist()) in seen for row in x_eval[member])


def test_secret_is_a_function_of_the_seed():
    assert secret_for(4, 50, 3) == secret_for(4, 50, 3)
    assert len(set(secret_for(4, 50, 50))) == 50
    assert datamodule("data.secret=[1,2,3]").secret == [1, 2, 3]


COMPILED_CASES = [  # seed, start, count, n, secret, streams, noise, layout
    (0, 2**32 - 100, 300, 50, [1, 5, 49], list(range(0, 16, 2)), 0.0, "bits"),  # counter low word wraps
    (2**64 - 1, 2**64 - 40, 40, 33, [32, 1], [2**32 - 1], 0.2, "pm1"),  # last samples, top seed and stream
    (7, 5, 33, 200, list(range(199, 99, -1)), [3], 0.1, "tokens"),  # k = 100, several Philox calls a sample
    (1, 0, 17, 4096, [4095, 0, 2048], [0, 1], 0.0, "bits"),  # 32 calls, a partial block of samples
]


@pytest.mark.parametrize("seed, start, count, n, secret, streams, noise, layout", COMPILED_CASES)
def test_cpp_cpu_generation_is_bit_exact(seed, start, count, n, secret, streams, noise, layout):
    """compile=True (the C++ loop nest of kernels/sparse_parity_cpu.py) gives the eager reference's samples."""
    if cpp.cxx() is None:
        pytest.skip("no C++ compiler: kernels.compile stays eager (test_cpp_build_failure_falls_back_to_eager_once)")
    assert sp_cpu.extension() is not None, "the C++ generator did not build"
    args = (seed, start, count, n, secret)
    want = sparse_parity(*args, stream=streams, noise=noise, layout=layout)
    got = sparse_parity(*args, stream=streams, noise=noise, layout=layout, compile=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_cpp_build_failure_falls_back_to_eager_once(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", broken)
    cpp.build.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="paritylab.kernels"):
            got = [sparse_parity(3, 10, 64, 20, [4, 2], stream=[0, 1], layout="pm1", compile=True) for _ in range(2)]
    finally:
        cpp.build.cache_clear()  # later tests build (load) the real extension again
    want = sparse_parity(3, 10, 64, 20, [4, 2], stream=[0, 1], layout="pm1")
    assert all(torch.equal(g, w) for run in got for g, w in zip(run, want))
    warnings = [r.getMessage() for r in caplog.records if "building the C++ extension failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "second line" not in warnings[0]


def test_datamodule_tickets_are_bits_on_cpu_and_equal_with_kernels_compile():
    plain, compiled = datamodule("model.ensemble=2"), datamodule("model.ensemble=2", "kernels.compile=true")
    assert (plain.compiled, compiled.compiled) == (False, True)
    ticket = Ticket(step=3, steps=4, rank=0, world_size=1)
    want, got = plain.generate(ticket, torch.device("cpu")), compiled.generate(ticket, torch.device("cpu"))
    assert want.x.dtype == torch.uint8 and want.y.dtype == torch.float32
    assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    x, y, _ = sparse_parity(0, 3 * 8, 4 * 8, 30, plain.secret, stream=[0, 2], layout="pm1")
    assert torch.equal(pm1(want.x), x.view(2, 4, 8, 30)) and torch.equal(want.y, y.view(2, 4, 8))
