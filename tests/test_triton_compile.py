"""The Triton kernels compile for sm_80 and sm_90, in the configurations the wrappers use on a GPU, with no GPU.

``python -m kernels.aot`` (a subprocess: it needs TRITON_INTERPRET unset) captures the wrappers' own
launches on their CUDA branch and compiles each with the triton wheel's ptxas; a compile error, a
register spill or a block over the target's shared memory fails. The default suite runs the quick
tier; ``-m aot_full`` runs every dtype, head_dim, causal flag, layout and edge length (long: about
half an hour on two cores).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.aot import Result  # noqa: E402

pytestmark = pytest.mark.xdist_group("aot_quick")  # under pytest -n, one worker compiles the quick tier


def _compile_tier(tier: str, out: Path, timeout: int) -> tuple[list[Result], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--tier", tier, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"kernels.aot wrote no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    if data["skip"]:
        pytest.skip(data["skip"])
    return [Result(**r) for r in data["results"]], proc.stdout + proc.stderr[-3000:]


def _assert_fine(results: list[Result], log: str) -> None:
    problems = [p for r in results for p in r.problems()]
    assert results and not problems, "\n".join(problems) or log


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict[tuple[str, int, str], Result]:
    results, log = _compile_tier("quick", tmp_path_factory.mktemp("aot") / "quick.json", timeout=600)
    return {(r.case, r.arch, r.kernel): r for r in results}, log


def test_quick_tier_compiles_every_kernel_for_both_targets(quick):
    """No compile error, no spill, shared memory within the target's limit."""
    quick, log = quick
    _assert_fine(list(quick.values()), log)
    kernels = {kernel for _, _, kernel in quick}
    assert {"_attn_fwd", "_bwd_preprocess", "_sparse_parity_kernel"} <= kernels
    assert {arch for _, arch, _ in quick} == {80, 90}


def test_launch_specializations_are_those_of_a_real_launch(quick):
    """Ints equal to 1 become constants, ints and aligned pointers divisible by 16 are marked so."""
    quick = quick[0]
    attn = quick[("attn fp32 d32 seq17", 90, "_attn_fwd")]
    assert attn.signature["N_CTX"] == "i32" and "N_CTX" not in attn.divisible16
    assert {"Q", "K", "V", "O", "LSE", "stride_qn", "stride_qh"} <= set(attn.divisible16)
    single = quick[("data n513 tokens count1", 80, "_sparse_parity_kernel")]
    assert "count" not in single.signature  # count == 1: a constant of the compiled kernel


def test_data_kernel_offsets_are_64_bit(quick):
    """Counts past 2**31 bind as i64, and no pointer offset in the data kernel is 32-bit."""
    quick = quick[0]
    big = quick[("data n4096 pm1 count 2**31+5", 90, "_sparse_parity_kernel")]
    assert big.signature["count"] == "i64"
    data = [r for (_, _, kernel), r in quick.items() if kernel == "_sparse_parity_kernel"]
    assert all(r.addptr_i32 == 0 for r in data), [(r.case, r.addptr_i32) for r in data]


def test_bits_layout_stores_whole_16_byte_chunks(quick):
    """n = 50 bits per row (rows not 16-byte aligned): the (64 x 64) row tile goes out in 16-byte stores."""
    for arch in (80, 90):
        r = quick[0][("data n50 bits", arch, "_sparse_parity_kernel")]
        assert (r.config["BLOCK_R"], r.config["INNER"], r.config["num_warps"]) == (64, 64, 4)
        assert r.vector_stores * 16 * 32 * 4 == 64 * 64, (r.vector_stores, r.scalar_byte_stores)


@pytest.mark.aot_full
def test_full_matrix(tmp_path):  # deselected unless -m aot_full (pyproject.toml's addopts)
    results, log = _compile_tier("full", tmp_path / "full.json", timeout=3 * 3600)
    _assert_fine(results, log)
    assert {r.arch for r in results} == {80, 90}
    data = [r for r in results if r.kernel == "_sparse_parity_kernel"]
    assert data and all(r.addptr_i32 == 0 for r in data)
    assert all(r.signature["count"] == "i64" for r in data if "count2147483653" in r.case)
