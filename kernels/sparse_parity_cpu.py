"""The sparse-parity stream of kernels/sparse_parity.py as a C++ loop nest for CPUs: same bits, ~10x faster.

Philox4x32-10 runs on 16 samples at a time in plain uint32 / uint64 arithmetic (32 x 32 -> 64-bit
multiplies, which AVX2 / AVX-512 vectorize), then each sample's bits, prefix parities over the secret
and noisy label are written out: the "bits" layout; the others are derived from it in PyTorch.
"""
import torch

from kernels.cpp import build

SOURCE = r"""
#include <torch/extension.h>
#include <cstdint>
#include <vector>

constexpr int LANES = 16;

// Ten Philox4x32 rounds on LANES counters at once (the same function as tl.philox).
static inline void philox(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    #pragma omp simd
    for (int l = 0; l < LANES; ++l) {
      const uint64_t p0 = (uint64_t)c0[l] * 0xD2511F53u, p1 = (uint64_t)c2[l] * 0xCD9E8D57u;
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = (uint32_t)p1;
      c3[l] = (uint32_t)p0;
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Counters (word, g mod 2^32, g div 2^32, stream) of samples g = first, first + 1, ... in the LANES lanes.
static inline void counters(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t word, uint64_t first,
                            uint32_t stream) {
  for (int l = 0; l < LANES; ++l) {
    const uint64_t g = first + (uint64_t)l;
    c0[l] = word; c1[l] = (uint32_t)g; c2[l] = (uint32_t)(g >> 32); c3[l] = stream;
  }
}

// Samples [start, start + count) of every stream: x (S, count, n), y (S, count), cot (S, count, k), uint8.
void sparse_parity_bits(uint64_t seed, uint64_t start, torch::Tensor secret, torch::Tensor streams,
                        int64_t threshold, torch::Tensor x, torch::Tensor y, torch::Tensor cot) {
  const int64_t S = x.size(0), count = x.size(1), n = x.size(2), k = secret.size(0);
  const int64_t calls = ((n + 31) / 32 + 3) / 4;
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const int64_t* sec = secret.data_ptr<int64_t>();
  const int64_t* st = streams.data_ptr<int64_t>();
  uint8_t* xp = x.data_ptr<uint8_t>();
  uint8_t* yp = y.data_ptr<uint8_t>();
  uint8_t* cp = cot.data_ptr<uint8_t>();
  std::vector<uint32_t> words(LANES * calls * 4);  // words[lane * 4 calls + w]
  uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
  for (int64_t s = 0; s < S; ++s) {
    const uint32_t stream = (uint32_t)st[s];
    for (int64_t i0 = 0; i0 < count; i0 += LANES) {
      const int lanes = (int)std::min<int64_t>(LANES, count - i0);
      for (int64_t call = 0; call < calls; ++call) {
        counters(c0, c1, c2, c3, (uint32_t)call, start + (uint64_t)i0, stream);
        philox(c0, c1, c2, c3, k0, k1);
        for (int l = 0; l < LANES; ++l) {
          uint32_t* w = words.data() + (l * calls + call) * 4;
          w[0] = c0[l]; w[1] = c1[l]; w[2] = c2[l]; w[3] = c3[l];
        }
      }
      uint32_t noise[LANES];
      if (threshold > 0) {
        counters(c0, c1, c2, c3, 0xFFFFFFFFu, start + (uint64_t)i0, stream);  // the noise word
        philox(c0, c1, c2, c3, k0, k1);
        for (int l = 0; l < LANES; ++l) noise[l] = c0[l];
      }
      for (int l = 0; l < lanes; ++l) {
        const int64_t row = s * count + i0 + l;
        const uint32_t* w = words.data() + l * calls * 4;
        uint8_t* xr = xp + row * n;
        #pragma omp simd
        for (int64_t b = 0; b < n; ++b) xr[b] = (uint8_t)((w[b >> 5] >> (b & 31)) & 1u);
        uint8_t parity = 0;
        uint8_t* cr = cp + row * k;
        for (int64_t j = 0; j < k; ++j) {
          parity ^= (uint8_t)((w[sec[j] >> 5] >> (sec[j] & 31)) & 1u);
          cr[j] = parity;
        }
        yp[row] = parity ^ (uint8_t)(threshold > 0 && noise[l] < (uint64_t)threshold);
      }
    }
  }
}
"""


def extension():
    """The compiled module, or None where it cannot be built (one warning)."""
    return build("paritylab_sparse_parity_cpu", SOURCE, ("sparse_parity_bits",))


def sparse_parity_cpu(ext, seed: int, start: int, count: int, n: int, secret: torch.Tensor,
                      streams: torch.Tensor, threshold: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, cot) in the "bits" layout with a leading stream axis, from the compiled module ``ext``."""
    x = torch.empty(streams.numel(), count, n, dtype=torch.uint8)
    y = torch.empty(streams.numel(), count, dtype=torch.uint8)
    cot = torch.empty(streams.numel(), count, secret.numel(), dtype=torch.uint8)
    ext.sparse_parity_bits(seed, start, secret.contiguous(), streams.contiguous(), threshold, x, y, cot)
    return x, y, cot
