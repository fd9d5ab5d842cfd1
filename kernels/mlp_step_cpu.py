"""The elementwise half of the MLP ensemble's plain-SGD step (kernels/mlp_step.py) as one C++ loop nest (CPU,
ReLU, hinge loss).

Between the two batched matmuls of a step (``[x, 1] @ [w1^T; b1]`` and the first-layer update) the
eager step makes a dozen passes over (members, batch, width) tensors. Here one pass per sample does
ReLU, f = w2 . h + b2, the hinge slack and gradient g, dz = g w2 (z > 0), and accumulates the w2 and
b2 gradients, which are applied after the member's last sample (dz uses the w2 the forward pass
used, as in the eager step). Sums run in a different order than MKL's, so weights agree with the
eager step to rounding, not to the bit; members stay independent, so a member in an ensemble still
equals the member alone. Built with torch.utils.cpp_extension on first use (a C++ compiler, ~20 s,
cached across runs); ``kernels.compile=true`` turns it on.
"""
from typing import Callable

import torch

from kernels.cpp import build
from kernels.mlp_step import UNCOUNTED, Counter, Params, never

SOURCE = r"""
#include <torch/extension.h>
#include <vector>

// bits (E, B, n) uint8, any strides -> x[..., :n] = 1 - 2 bits (x contiguous (E, B, n + 1)).
void bits_to_pm1(torch::Tensor bits, torch::Tensor x) {
  const int64_t E = bits.size(0), B = bits.size(1), n = bits.size(2), cols = x.size(2);
  const int64_t se = bits.stride(0), sb = bits.stride(1), sn = bits.stride(2);
  const uint8_t* src = bits.data_ptr<uint8_t>();
  float* dst = x.data_ptr<float>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t b = 0; b < B; ++b) {
      const uint8_t* s = src + e * se + b * sb;
      float* d = dst + (e * B + b) * cols;
      #pragma omp simd
      for (int64_t i = 0; i < n; ++i) d[i] = 1.f - 2.f * (float)s[i * sn];
    }
}

// z (E, B, W): pre-activations. w2 (E, W), b2 (E,), y (E, B) +/-1, any strides on y. With h = relu(z),
// writes slack (E, B) = 1 - y f and dz (E, B, W) = g w2 (z > 0), g = scale y where slack > 0
// (scale = -1 / B); then w2 -= lr sum_b g h and b2 -= lr sum_b g. dz may be z itself.
void hinge_relu_step(torch::Tensor z, torch::Tensor w2, torch::Tensor b2, torch::Tensor y,
                     torch::Tensor slack, torch::Tensor dz, double scale, double lr) {
  const int64_t E = z.size(0), B = z.size(1), W = z.size(2);
  const int64_t ye = y.stride(0), yb = y.stride(1);
  float* zp = z.data_ptr<float>();
  float* w2p = w2.data_ptr<float>();
  float* b2p = b2.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* sp = slack.data_ptr<float>();
  float* dzp = dz.data_ptr<float>();
  const float sc = (float)scale, l = (float)lr;
  std::vector<float> acc(W);
  for (int64_t e = 0; e < E; ++e) {
    float* w = w2p + e * W;
    float* a = acc.data();
    std::fill(acc.begin(), acc.end(), 0.f);
    float gsum = 0.f;
    for (int64_t b = 0; b < B; ++b) {
      float* h = zp + (e * B + b) * W;
      float f = 0.f;
      #pragma omp simd reduction(+:f)
      for (int64_t j = 0; j < W; ++j) {
        const float v = h[j] > 0.f ? h[j] : 0.f;
        h[j] = v;
        f += w[j] * v;
      }
      const float yy = yp[e * ye + b * yb];
      const float s = 1.f - yy * (f + b2p[e]);
      sp[e * B + b] = s;
      const float g = s > 0.f ? yy * sc : 0.f;
      gsum += g;
      float* d = dzp + (e * B + b) * W;
      #pragma omp simd
      for (int64_t j = 0; j < W; ++j) {  // d may be h itself: read h[j] before writing d[j]
        const float v = h[j];
        a[j] += g * v;
        d[j] = v > 0.f ? g * w[j] : 0.f;
      }
    }
    #pragma omp simd
    for (int64_t j = 0; j < W; ++j) w[j] -= l * a[j];
    b2p[e] -= l * gsum;
  }
}
"""


def extension():
    """The compiled module, or None where it cannot be built (one warning)."""
    return build("paritylab_fused_cpu", SOURCE, ("bits_to_pm1", "hinge_relu_step"))


@torch.no_grad()
def hinge_relu_sgd_steps(ext, params: Params, xs: torch.Tensor, ys: torch.Tensor, lr: float,
                         count: Counter = UNCOUNTED, stop: Callable[[], bool] = never) -> torch.Tensor:
    """kernels.mlp_step.fused_sgd_steps for ReLU and the hinge loss, with the compiled module ``ext``: xs
    (E, steps, B, n) bits, ys (E, steps, B) +/-1; updates params = ([w1^T; b1], w2, b2) in place. Returns losses
    (steps, E)."""
    first, w2, b2 = params
    members, steps, batch, n = xs.shape
    x = ys.new_ones(members, batch, n + 1)
    z = ys.new_empty(members, batch, first.shape[2])  # pre-activations, then (in place) dz: less to cache
    slack, x_t = ys.new_empty(steps, members, batch), x.transpose(1, 2)
    for j, (x_j, y_j) in enumerate(zip(xs.unbind(1), ys.unbind(1))):
        ext.bits_to_pm1(x_j, x)
        torch.bmm(x, first, out=z)
        count.before()
        ext.hinge_relu_step(z, w2, b2, y_j, slack[j], z, -1.0 / batch, lr)
        first.baddbmm_(x_t, z, alpha=-lr)
        count.after()
        if stop():  # cut the batch short at this step
            break
    return slack[:j + 1].clamp_min_(0).mean(2)
