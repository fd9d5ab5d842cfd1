"""Compile the exact launches the Triton wrappers make on a GPU, for sm_80 and sm_90, without a GPU.

``capture(arch, run)`` calls wrapper code on "meta" tensors with the device's compute capability forced
to ``arch`` (``kernels.dispatch.gpu_arch``), so the wrappers take their CUDA branch (block sizes, warps,
stages, autotuning lists), and records every ``kernel[grid](...)`` launch instead of running it.
``compile_launch`` hands each record to the kernel's own ``warmup`` against a stand-in driver for the
target: Triton's binder then makes the specializations a real launch makes (ints equal to 1 become
constants, ints and pointers divisible by 16 get ``tt.divisibility``; pointers are as aligned as the
CUDA caching allocator makes them, plus the view's offset). Registers and spills come from the ptxas
log, shared memory from the kernel's metadata. Needs compiled Triton: run with TRITON_INTERPRET unset.

``python -m kernels.aot [--tier quick|table|full] [--json PATH] [--table PATH]``: exit status 1 if a launch
fails to compile, spills registers or needs more shared memory than the target has.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # usable dynamic shared memory per block (bytes)
TARGETS = (80, 90)


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call of a wrapper."""
    case: str
    arch: int
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Result:
    """What compiling one launch for one target gave."""
    case: str
    arch: int
    kernel: str
    config: dict
    signature: dict = field(default_factory=dict)  # non-constexpr parameters: Triton type
    divisible16: list = field(default_factory=list)  # parameters specialized as divisible by 16
    regs: int = -1
    spill_bytes: int = -1
    stack_bytes: int = -1
    shared: int = -1
    vector_stores: int = 0  # st.global.v2/v4 in the PTX
    scalar_byte_stores: int = 0  # st.global of one byte
    addptr_i32: int = 0  # tt.addptr ops with a 32-bit offset in the TTIR
    error: str = ""

    def problems(self) -> list[str]:
        """Why this launch would fail or slow down on a real device; empty if it is fine."""
        where = f"{self.kernel} {self.config} for sm_{self.arch} ({self.case})"
        if self.error:
            return [f"{where}: compile error: {self.error}"]
        out = []
        if self.spill_bytes or self.stack_bytes:
            out.append(f"{where}: {self.spill_bytes} bytes spilled, {self.stack_bytes} bytes stack ({self.regs} regs)")
        if self.shared > SMEM_LIMIT[self.arch]:
            out.append(f"{where}: {self.shared} bytes of shared memory > {SMEM_LIMIT[self.arch]}")
        return out


class _Pointer:
    """A tensor argument as Triton's binder sees it: a dtype and an address (allocator-aligned base + offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._ptr = 512 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


class _Driver:
    """Just enough of a Triton driver to bind and compile for ``target``; nothing is launched."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def capture(arch: int, case: str, sink: list[Launch]) -> Iterator[None]:
    """Record the launches made inside the block, with ``arch`` as every meta tensor's compute capability."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from kernels import dispatch

    def jit_run(self, *args, grid, warmup, **kwargs):
        args = tuple(_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args)
        sink.append(Launch(case, arch, self, tuple(grid(kwargs) if callable(grid) else grid), args, kwargs))

    def tuned_run(self, *args, grid, warmup, **kwargs):
        for config in self.configs:  # every candidate autotuning may pick must compile
            jit_run(self.fn, *args, grid=grid, warmup=False, **{**kwargs, **config.all_kwargs()})

    real_arch = dispatch.gpu_arch
    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", tuned_run), \
            mock.patch.object(dispatch, "gpu_arch", lambda d: arch if d.type == "meta" else real_arch(d)):
        yield


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.M))


def compile_launch(launch: Launch, logs: dict) -> Result:
    """Compile ``launch`` for its target and read its resource usage; errors are reported, not raised."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    options = ("num_warps", "num_stages", "num_ctas", "maxnreg")
    config = {k: v for k, v in launch.kwargs.items() if k.isupper() or k in options}
    res = Result(launch.case, launch.arch, launch.fn.__name__, config)
    driver.set_active(_Driver(GPUTarget("cuda", launch.arch, 32)))  # stays: this runs in its own process
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            kernel = launch.fn.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    except Exception as e:  # a compile error of any kind is this check's finding
        lines = [line.strip() for line in str(e).splitlines() if line.strip().strip("^")]
        res.error = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        return res
    log = logs.setdefault(kernel.hash, out.getvalue())  # a cached kernel printed no log this time
    res.signature = {k: v for k, v in kernel.src.signature.items() if v != "constexpr"}
    names = list(kernel.src.signature)
    res.divisible16 = [names[path[0]] for path, attr in kernel.src.attrs.items() if ["tt.divisibility", 16] in attr]
    res.regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stack, spill_st, spill_ld = map(int, re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    res.stack_bytes, res.spill_bytes = stack, spill_st + spill_ld
    res.shared = kernel.metadata.shared
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    res.vector_stores = _count(r"^\s*(@%p\d+\s+)?st\.global(\.\w+)*\.v[24]\.", ptx)
    res.scalar_byte_stores = _count(r"^\s*(@%p\d+\s+)?st\.global(\.\w+)*\.[bu]8\s", ptx)
    res.addptr_i32 = _count(r"tt\.addptr [^:]*: [^,]+, (tensor<[0-9x]+xi32>|i32)\b", ttir)
    return res


# ------------------------------------------------------------------------------------------ the matrix
def _meta(*shape, dtype=torch.float16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention(dtype: torch.dtype, d: int, causal: bool, n: int, tf32: bool = False) -> Callable[[], None]:
    def run():
        from kernels.attention_triton import flash_attn_backward, flash_attn_forward
        q, k, v = (_meta(2, 3, n, d, dtype=dtype) for _ in range(3))
        matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            o, lse = flash_attn_forward(q, k, v, causal, d ** -0.5)
            flash_attn_backward(torch.empty_like(o), q, k, v, o, lse, causal, d ** -0.5)
        finally:
            matmul.allow_tf32 = before
    return run


def _data(n: int, k: int, count: int, layout: str, noise: float = 0.1, start: int = 12345,
          streams: int = 2) -> Callable[[], None]:
    def run():
        from kernels.sparse_parity_triton import sparse_parity_triton
        secret, ids = _meta(k, dtype=torch.int64), _meta(streams, dtype=torch.int64)
        sparse_parity_triton(2**63 + 77, start, count, n, secret, ids, int(noise * 2**32), layout)
    return run


def cases(tier: str) -> dict[str, Callable[[], None]]:
    """Named wrapper calls whose launches the check compiles, by tier.

    "quick": a few representative shapes. "table": every dtype, head_dim, causal flag and layout at
    one length (seq 1000, count 1000) -- every configuration the dispatch uses. "full": "table" plus
    the edge lengths whose specializations differ (seq 1, 17, 1024; n 1; count 1 and 2**31 + 5).
    """
    if tier == "quick":
        return {
            "attn fp16 d64 causal seq1000": _attention(torch.float16, 64, True, 1000),
            "attn fp32 d32 seq17": _attention(torch.float32, 32, False, 17),
            "data n50 bits": _data(50, 3, 1000, "bits"),
            "data n4096 pm1 count 2**31+5": _data(4096, 33, 2**31 + 5, "pm1", streams=1),
            "data n513 tokens count1": _data(513, 257, 1, "tokens"),
        }
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    seqs, counts = ((1000,), (1000,)) if tier == "table" else ((1000, 1, 17, 1024), (1000, 1, 2**31 + 5))
    out = {}
    for dtype, name in names.items():
        for d in (16, 32, 64, 128):
            for causal in (False, True):
                mode = " causal" if causal else ""
                for n in seqs:
                    out[f"attn {name} d{d}{mode} seq{n}"] = _attention(dtype, d, causal, n)
                if dtype == torch.float32:  # torch.backends.cuda.matmul.allow_tf32: tensor-core dots
                    out[f"attn tf32 d{d}{mode} seq1000"] = _attention(dtype, d, causal, 1000, True)
    for n in ((50, 513, 4096) if tier == "table" else (1, 50, 513, 4096)):
        for k in sorted({1, min(3, n), n}):
            for layout in ("bits", "pm1", "tokens"):
                for count in counts:
                    noise = 0.1 if count == 1000 else 0.0
                    out[f"data n{n} k{k} {layout} count{count} noise{noise}"] = _data(n, k, count, layout, noise)
    return out


def run_tier(tier: str, targets=TARGETS) -> list[Result]:
    """Capture and compile every launch of the tier for every target."""
    results, logs = [], {}
    for arch in targets:
        for case, call in cases(tier).items():
            launches: list[Launch] = []
            with capture(arch, case, launches):
                call()
            results += [compile_launch(launch, logs) for launch in launches]
    return results


def table(results: list[Result]) -> str:
    """Markdown: one row per target, kernel, pointer dtypes and configuration, over every case using it."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        dtypes = ",".join(sorted({v[1:] for v in r.signature.values() if v.startswith("*")}))
        cfg = " ".join(f"{k}={v}" for k, v in r.config.items())
        groups.setdefault((r.arch, r.kernel, dtypes, cfg), []).append(r)
    rows = ["| target | kernel | pointer dtypes | configuration | launches | registers | spill bytes | "
            "shared KiB | status |", "|---|---|---|---|---|---|---|---|---|"]
    for (arch, kernel, dtypes, cfg), rs in sorted(groups.items()):
        regs = sorted({r.regs for r in rs})
        status = "ok" if not any(r.problems() for r in rs) else "FAIL: " + rs[0].problems()[0].split(": ", 1)[1]
        rows.append(f"| sm_{arch} | {kernel} | {dtypes} | {cfg} | {len(rs)} | "
                    f"{regs[0] if len(regs) == 1 else f'{regs[0]}-{regs[-1]}'} | "
                    f"{max(r.spill_bytes for r in rs)} | {max(r.shared for r in rs) / 1024:.1f} | {status} |")
    return "\n".join(rows) + "\n"


def _ptxas_missing() -> str | None:
    """Why nothing can be compiled here, or None: the wheel's ptxas (and, where Triton uses one for
    sm_90+, ptxas-blackwell) must be present."""
    from triton import knobs
    for tool in ("ptxas", "ptxas_blackwell"):
        try:
            getattr(knobs.nvidia, tool, None)  # resolving the tool raises if its binary is missing
        except RuntimeError as e:
            return f"the triton wheel has no {tool.replace('_', '-')} ({e})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=("quick", "table", "full"), default="quick")
    parser.add_argument("--json", help="write the results (and a skip reason) to this file")
    parser.add_argument("--table", nargs="?", const="docs/kernels_compiled.md", help="write the markdown table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.aot: unset TRITON_INTERPRET (it needs compiled Triton)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    skip = _ptxas_missing()
    with tempfile.TemporaryDirectory(prefix="paritylab-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cold: ptxas must run for every kernel, so it logs
        results = [] if skip else run_tier(args.tier)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"skip": skip, "results": [asdict(r) for r in results]}, f)
    if args.table:
        with open(args.table, "w") as f:
            f.write(_TABLE_HEAD.format(tier=args.tier) + table(results))
    problems = [p for r in results for p in r.problems()]
    print(skip or f"{len(results)} launches compiled, {len(problems)} problems", *problems, sep="\n")
    return 1 if problems else 0


_TABLE_HEAD = """# Compiled Triton kernels

Every configuration the wrappers dispatch to on a GPU (`python -m kernels.aot --tier {tier} --table`),
compiled for sm_80 and sm_90 with the installed Triton's ptxas, no GPU needed. Registers are per
thread; shared memory is per block (limits: sm_80 163 KiB, sm_90 227 KiB); a spill or an over-limit
block fails `tests/test_triton_compile.py`.

"""

if __name__ == "__main__":
    sys.exit(main())
