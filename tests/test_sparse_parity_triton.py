"""kernels.sparse_parity: the fused Triton kernel against the PyTorch reference, bit for bit.

CPU tests run the kernel under the Triton interpreter (TRITON_INTERPRET=1 before triton is
imported); with compiled Triton they run on CUDA instead. The statistical tests check the stream
itself on the reference path; the KAT test checks ``tl.philox`` (uint32 counters) and the
PyTorch Philox against Random123's known answers.
GPU tests (``-m gpu``) need compiled Triton: run them with ``TRITON_INTERPRET=0``.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels.sparse_parity_triton as spt  # noqa: E402
from kernels import philox4x32, sparse_parity  # noqa: E402
from kernels.sparse_parity import SEPARATOR, on_device  # noqa: E402

INTERPRETED = type(spt._sparse_parity_kernel).__name__ == "InterpretedFunction"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"
KAT = Path(__file__).resolve().parent / "data" / "philox4x32_10_kat.txt"  # Random123's known answers
Z_MAX = 5.0  # |z| bound of the statistical checks: P(|N(0,1)| > 5) ~ 6e-7 per statistic

needs_triton = pytest.mark.skipif(
    not INTERPRETED and not HAS_CUDA,
    reason="Triton kernels need TRITON_INTERPRET=1 set before triton is first imported (CPU) or CUDA")


def gpu(fn):
    """A GPU test: selected by ``-m gpu``; skipped without CUDA or under the interpreter."""
    fn = pytest.mark.skipif(INTERPRETED, reason="GPU tests need compiled Triton (TRITON_INTERPRET=0)")(fn)
    fn = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")(fn)
    return pytest.mark.gpu(fn)


def _secret(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


def _assert_same(seed, start, count, n, secret, stream, noise, layout, device=DEVICE):
    args = (seed, start, count, n, secret)
    kw = dict(stream=stream, noise=noise, layout=layout, device=device)
    got = sparse_parity(*args, backend="triton", **kw)
    want = sparse_parity(*args, backend="torch", **kw)
    where = f"(n={n}, k={len(secret)}, count={count}, start={start}, stream={stream}, noise={noise}, {layout})"
    for name, a, b in zip(("x", "y", "cot"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name} {where}: {a.dtype}{tuple(a.shape)} != " \
                                                          f"{b.dtype}{tuple(b.shape)}"
        assert a.device.type == torch.device(device).type
        assert torch.equal(a, b), f"{name} {where}: {(a != b).sum().item()} entries differ"


# ---------------------------------------------------------------- 1. exact equality with the reference

STREAMS = [0, 3, 2**32 - 1]
COUNTS = [1, 7, 65, 200]
LAYOUTS = ["bits", "pm1", "tokens"]
SEEDS = [0, 12345, 2**64 - 1, 2**63 + 77]


def _starts(count):
    return [0, 2**32 - 3, 2**40 + 123, 2**64 - count]  # carry into g_hi inside a block; the very end


def _cases():
    """A representative slice of n x k x count x start x seed x noise x layout (not the full product)."""
    cases, i = [], 0
    for n in [1, 5, 31, 32, 33, 100, 127, 128, 129, 300]:
        for k in sorted({1, n, max(1, (n // 3) | 1)}):  # k = 1, k = n, k odd in between
            count = COUNTS[i % 4]
            cases.append((SEEDS[i % 4], _starts(count)[(i // 2) % 4], count, n, k,
                          STREAMS if i % 2 == 0 else STREAMS[i % 3], (0.0, 0.1, 0.3)[i % 3], LAYOUTS[i % 3]))
            i += 1
    return cases


@needs_triton
@pytest.mark.parametrize("seed,start,count,n,k,stream,noise,layout", _cases())
def test_matches_reference(seed, start, count, n, k, stream, noise, layout):
    _assert_same(seed, start, count, n, _secret(n, k, n * 1000 + k), stream, noise, layout)


@needs_triton
@pytest.mark.parametrize("k,layout", [(4096, "tokens"), (33, "bits"), (1, "pm1")])
def test_matches_reference_n4096(k, layout):
    """Many chunks per row, the secret recomputed outside the tile, k up to n."""
    _assert_same(7, 2**64 - 3, 3 if k < 4096 else 2, 4096, _secret(4096, k, k), [0, 2**32 - 1], 0.2, layout)


@needs_triton
@pytest.mark.parametrize("n", [130, 513])
def test_matches_reference_large_k_counts(n):
    """Odd shapes around the chunk sizes: rows not a multiple of BLOCK_R, n just past 128 / 512."""
    _assert_same(99, 2**33 + 5, 37, n, _secret(n, n // 2 + 1, n), 5, 0.25, "pm1")


@needs_triton
@pytest.mark.parametrize("n,layout", [(50, "bits"), (513, "pm1"), (33, "tokens"), (4096, "bits")])
def test_matches_reference_across_2_63(n, layout):
    """Sample indices crossing 2**63 (the sign bit of an int64 index): still bit-exact."""
    _assert_same(2**63 + 1, 2**63 - 37, 75 if n < 4096 else 5, n, _secret(n, 5, n), [1, 2**32 - 2], 0.2, layout)


@needs_triton
def test_single_stream_and_empty():
    x, y, cot = sparse_parity(1, 5, 9, 40, [3, 0, 39], stream=2**32 - 1, backend="triton", device=DEVICE)
    assert x.shape == (9, 40) and y.shape == (9,) and cot.shape == (9, 3)
    for count, stream in [(0, [0, 1]), (4, [])]:
        got = sparse_parity(1, 0, count, 10, [1, 2], stream=stream, layout="tokens", backend="triton",
                            device=DEVICE)
        want = sparse_parity(1, 0, count, 10, [1, 2], stream=stream, layout="tokens", backend="torch",
                             device=DEVICE)
        assert [t.shape for t in got] == [t.shape for t in want]
        assert [t.dtype for t in got] == [t.dtype for t in want]


@needs_triton
def test_stream_axis_split(monkeypatch):
    """More streams than one launch's grid axis takes (65535 on CUDA): split across launches."""
    monkeypatch.setattr(spt, "MAX_GRID_Y", 2)
    _assert_same(3, 11, 5, 70, [69, 1, 64], [4, 0, 9, 2**32 - 1, 1], 0.1, "tokens")


@needs_triton
def test_tokens_layout_structure():
    x, y, cot = sparse_parity(5, 0, 30, 20, [7, 2, 19], stream=[0, 1], layout="tokens", backend="triton",
                              device=DEVICE)
    assert x.dtype == torch.int64 and x.shape == (2, 30, 24)
    assert (x[..., 20] == SEPARATOR).all() and torch.equal(x[..., 21:], cot.long())
    assert torch.equal(cot[..., -1], y)  # noiseless: the label is the last chain entry


# ---------------------------------------------------------------- 2. statistics of the stream (reference)

N_STAT = 16384  # samples per stream
N_BITS = 260  # crosses word (32) and philox-call (128) boundaries


@pytest.fixture(scope="module")
def stat_stream():
    secret = _secret(N_BITS, 5, 0)
    x, y, cot = sparse_parity(2024, 2**32 - N_STAT // 2, N_STAT, N_BITS, secret, stream=[0, 1],
                              noise=0.0, backend="torch", layout="pm1")
    return x.double(), y.double(), cot, secret


def _z_mean_pm1(v, dim):
    """z-scores of the means of +-1 variables along ``dim`` (variance 1 each under the null)."""
    return v.mean(dim) * math.sqrt(v.shape[dim])


def test_bit_means(stat_stream):
    x = stat_stream[0]
    per_column = _z_mean_pm1(x.flatten(0, 1), 0)  # (n,)
    assert per_column.abs().max() < Z_MAX, per_column.abs().max()
    overall = x.mean() * math.sqrt(x.numel())
    assert abs(overall) < Z_MAX


def test_label_balance_and_parity(stat_stream):
    x, y, _, secret = stat_stream
    assert _z_mean_pm1(y.flatten(), 0).abs() < Z_MAX
    assert torch.equal(y, x[..., secret].prod(-1))  # encodings: 1 - 2 parity = product of +-1 bits


def test_noise_rate():
    noise, count = 0.2, 20000
    x, y, cot = sparse_parity(7, 2**50, count, 8, [1, 6], stream=3, noise=noise, backend="torch")
    flips = (y != cot[:, -1]).double()
    z = (flips.mean() - noise) / math.sqrt(noise * (1 - noise) / count)
    assert abs(z) < Z_MAX, (flips.mean(), z)
    # flips are independent of the noiseless label
    lab = 1 - 2 * cot[:, -1].double()
    z_corr = (lab * (flips - noise)).mean() / math.sqrt(noise * (1 - noise) / count)
    assert abs(z_corr) < Z_MAX, z_corr
    # noise 0: never flipped; the same samples with noise: the same x and cot
    x0, y0, cot0 = sparse_parity(7, 2**50, count, 8, [1, 6], stream=3, noise=0.0, backend="torch")
    assert torch.equal(y0, cot0[:, -1]) and torch.equal(x0, x) and torch.equal(cot0, cot)


def test_no_correlation_neighbouring_columns(stat_stream):
    x = stat_stream[0].flatten(0, 1)
    z = _z_mean_pm1(x[:, 1:] * x[:, :-1], 0)  # includes bits 31|32, 127|128, 255|256
    assert z.abs().max() < Z_MAX, z.abs().argmax()
    z_word = _z_mean_pm1(x[:, 32:] * x[:, :-32], 0)  # same bit of consecutive words
    assert z_word.abs().max() < Z_MAX
    z_call = _z_mean_pm1(x[:, 128:] * x[:, :-128], 0)  # same bit of consecutive philox calls
    assert z_call.abs().max() < Z_MAX


def test_no_correlation_neighbouring_rows(stat_stream):
    x = stat_stream[0]
    z = _z_mean_pm1(x[:, 1:] * x[:, :-1], 1)  # (streams, n); rows cross g = 2**32 (g_hi carry)
    assert z.abs().max() < Z_MAX


def test_no_correlation_between_streams(stat_stream):
    x = stat_stream[0]
    z = _z_mean_pm1(x[0] * x[1], 0)
    assert z.abs().max() < Z_MAX
    assert (x[0] != x[1]).any(-1).all()  # no sample repeats across streams


def test_no_correlation_between_seeds():
    a = sparse_parity(1, 0, 8192, 64, [0], backend="torch", layout="pm1")[0].double()
    b = sparse_parity(2, 0, 8192, 64, [0], backend="torch", layout="pm1")[0].double()
    assert _z_mean_pm1(a * b, 0).abs().max() < Z_MAX


# ---------------------------------------------------------------- 3. Philox known answers

@triton.jit
def _philox_kernel(c_ptr, out_ptr, seed, N: tl.constexpr):
    i = tl.arange(0, N)
    c0 = tl.load(c_ptr + 4 * i).to(tl.uint32)  # uint32 counters: int64 would select Philox4x64
    c1 = tl.load(c_ptr + 4 * i + 1).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * i + 2).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * i + 3).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    tl.store(out_ptr + 4 * i, r0.to(tl.int64))
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64))
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64))
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64))


def _tl_philox(counters: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """tl.philox over rows of an int64 (N, 4) tensor of uint32 counters (N a power of two)."""
    c = counters.to(DEVICE).contiguous()
    out = torch.empty_like(c)
    _philox_kernel[(1,)](c, out, key0 | key1 << 32, N=c.shape[0])
    return out.cpu()


def _kat_vectors():
    rows = []
    for line in KAT.read_text().splitlines():
        f = line.split()
        if len(f) == 12 and f[0] == "philox4x32" and f[1] == "10":
            rows.append([int(v, 16) for v in f[2:]])
    assert len(rows) == 3, f"{KAT}: expected Random123's three philox4x32-10 vectors"
    return rows


def test_kat_torch_philox():
    vectors = _kat_vectors()
    for v in vectors:
        c = [torch.tensor([w], dtype=torch.int64) for w in v[:4]]
        got = [int(w) for w in philox4x32(*c, v[4], v[5])]
        assert got == v[6:], f"counter {v[:4]} key {v[4:6]}"


@needs_triton
def test_kat_tl_philox():
    vectors = _kat_vectors()
    for v in vectors:
        counters = torch.tensor([v[:4]] * 2, dtype=torch.int64)  # N = 2: tl.arange needs >= 1, pow2
        got = _tl_philox(counters, v[4], v[5])
        assert got[0].tolist() == v[6:], f"counter {v[:4]} key {v[4:6]}"


@needs_triton
@pytest.mark.parametrize("key0,key1", [(0, 0), (0xDEADBEEF, 1), (2**32 - 1, 2**31 + 5), (123, 2**32 - 1)])
def test_tl_philox_matches_torch_philox(key0, key1):
    g = torch.Generator().manual_seed(key0 ^ key1)
    counters = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    counters[0] = 0
    counters[1] = 2**32 - 1
    got = _tl_philox(counters, key0, key1)
    want = torch.stack(philox4x32(*counters.unbind(1), key0, key1), dim=1)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- 3b. no host traffic in the data path

class HostTraffic(TorchDispatchMode):
    """Records every op that copies between devices or reads a value back to the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            self.seen.append("item()")
        elif func is aten._to_copy.default and kwargs.get("device") not in (None, args[0].device):
            self.seen.append(f"to {args[0].device} -> {kwargs['device']}")
        elif func in (aten.copy_.default, aten._copy_from.default) and args[0].device != args[1].device:
            self.seen.append(f"copy {args[1].device} -> {args[0].device}")
        return func(*args, **kwargs)


class _LaunchRecorder:
    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_device_tensors_make_no_host_copy(backend, layout, monkeypatch):
    """secret and streams from on_device: a call on a (meta) device moves nothing to or from the host."""
    recorder = _LaunchRecorder()
    monkeypatch.setattr(spt, "_sparse_parity_kernel", recorder)  # the host side of the Triton path only
    secret, streams = on_device([3, 0, 49], [0, 7], 50, "meta")
    with HostTraffic() as traffic:
        x, y, cot = sparse_parity(5, 2**40, 300, 50, secret, stream=streams, noise=0.1, layout=layout,
                                  backend=backend, device="meta")
        one = sparse_parity(5, 0, 3, 50, secret, stream=streams[1], layout=layout, backend=backend, device="meta")
    assert traffic.seen == []
    assert x.device.type == "meta" and x.shape[:2] == (2, 300) and cot.shape == (2, 300, 3)
    assert one[1].shape == (3,)
    assert recorder.launches == (2 if backend == "triton" else 0)
    with HostTraffic() as traffic:  # the check can fail: a Python list is copied to the device every call
        sparse_parity(5, 0, 3, 50, [3, 0, 49], layout=layout, backend=backend, device="meta")
    assert traffic.seen


# ---------------------------------------------------------------- 4. GPU: large shapes, compiled kernel

@gpu
@pytest.mark.parametrize("n,k,count,layout", [
    (50, 3, 2**16 + 3, "pm1"), (50, 3, 2**16, "bits"), (100, 100, 10007, "tokens"),
    (257, 9, 20001, "bits"), (1000, 37, 4099, "tokens"), (4096, 4096, 515, "bits"), (3000, 11, 777, "pm1"),
])
def test_gpu_matches_reference(n, k, count, layout):
    for start, noise in [(0, 0.0), (2**64 - count, 0.1), (2**32 - count // 2, 0.3)]:
        _assert_same(2**64 - 5, start, count, n, _secret(n, k, n + k), [0, 1, 2**32 - 1], noise, layout,
                     device="cuda")


@gpu
def test_gpu_single_sample_slices():
    """sparse_parity(start=a, count=c)[i] == sparse_parity(start=a+i, count=1)[0] on the compiled kernel."""
    a = 2**32 - 40
    x, y, cot = sparse_parity(9, a, 100, 77, [5, 76, 0], noise=0.2, backend="triton", device="cuda")
    for i in (0, 1, 39, 40, 41, 99):
        xi, yi, ci = sparse_parity(9, a + i, 1, 77, [5, 76, 0], noise=0.2, backend="triton", device="cuda")
        assert torch.equal(x[i], xi[0]) and torch.equal(y[i], yi[0]) and torch.equal(cot[i], ci[0])


@gpu
def test_gpu_call_never_synchronizes():
    """With secret and streams made once on the device, a call makes no synchronizing CUDA call."""
    secret, streams = on_device(_secret(50, 3, 1), [0, 1, 2], 50, "cuda")
    for backend in ("triton", "torch"):  # warm up: compile the kernel, build the reference's tables
        sparse_parity(1, 0, 64, 50, secret, stream=streams, layout="pm1", backend=backend, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ("triton", "torch"):
            for layout in LAYOUTS:
                sparse_parity(1, 2**40, 4099, 50, secret, stream=streams, noise=0.1, layout=layout,
                              backend=backend, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
