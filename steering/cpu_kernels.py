"""A float32 matrix-vector product for one-row decoding steps on x86 CPUs with AVX2.

At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the
weights from memory. On the 2-core AVX2 host (2026-12-03), oneDNN's packed float32 product read
a layer's weights at 10-14 GB/s when they came from DRAM (40 different ``[3072, 576]``
weights in turn: 509 us a call), while a plain sum over a large tensor read 22 GB/s. The kernel
here streams four weight rows at a time with two FMA accumulators per row over the whole input
and splits the output rows over torch's own OpenMP threads: 19-22 GB/s on the same weights
(349 us a call for ``[3072, 576]``, 161 against 268 us for ``[576, 1536]``, 68 against 133 us for
``[576, 576]``; the 49,152-row output head 6.2 against 6.5 ms).

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja; about
50 s once, then cached in torch's extension folder, ``TORCH_EXTENSIONS_DIR``); ``make install``
builds it. Where it cannot be built or loaded (no compiler, no AVX2, another architecture) the
layers keep oneDNN; ``PERSONA_CPU_KERNELS=0`` (the server's setting) turns it off.

Only single-row products use it: a row decoding alone takes this kernel and the same row in a
larger step takes oneDNN, so the two differ by the order of accumulation inside a dot product
(the greedy tokens are compared in ``tests/test_engine.py``, as they are for oneDNN's packed
and plain bfloat16 paths).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading

import torch

log = logging.getLogger(__name__)

_NAME = "persona_cpu_kernels_v1"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r] = <w[r, :], x> for `rows` consecutive weight rows starting at `w` (rows <= 4).
template <int R>
inline void dot_rows(const float* x, const float* w, int64_t k_total, float* out) {
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) { even[r] = _mm256_setzero_ps(); odd[r] = _mm256_setzero_ps(); }
  int64_t k = 0;
  for (; k + 16 <= k_total; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      const float* row = w + r * k_total + k;
      even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row), x0, even[r]);
      odd[r] = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), x1, odd[r]);
    }
  }
  for (; k + 8 <= k_total; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) even[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k_total + k), x0, even[r]);
  }
  for (int r = 0; r < R; ++r) {
    float total = lane_sum(_mm256_add_ps(even[r], odd[r]));
    for (int64_t j = k; j < k_total; ++j) total += w[r * k_total + j] * x[j];
    out[r] = total;
  }
}

}  // namespace

// x: [1, K] float32 contiguous; weight: [N, K] float32 contiguous; bias: [N] or empty.
torch::Tensor row_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous() && x.scalar_type() == at::kFloat);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat);
  const int64_t n_total = weight.size(0), k_total = weight.size(1);
  TORCH_CHECK(x.size(1) == k_total);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.numel() == n_total && bias.is_contiguous() && bias.scalar_type() == at::kFloat));
  auto out = torch::empty({1, n_total}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t blocks = (n_total + 3) / 4;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * 4, left = n_total - n;
      const float* w = wp + n * k_total;
      if (left >= 4) dot_rows<4>(xp, w, k_total, op + n);
      else if (left == 3) dot_rows<3>(xp, w, k_total, op + n);
      else if (left == 2) dot_rows<2>(xp, w, k_total, op + n);
      else dot_rows<1>(xp, w, k_total, op + n);
      if (bp) for (int64_t i = n; i < n + (left < 4 ? left : 4); ++i) op[i] += bp[i];
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_loaded: object = None  # the extension module, False once it failed, None before the first try


def supported() -> bool:
    """True where the kernel can run: x86-64 with AVX2 (as torch sees the CPU) and a C++ compiler."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old torch: no way to tell, so no
        return False
    return capability in ("AVX2", "AVX512") and shutil.which(os.environ.get("CXX", "c++")) is not None


def load():
    """The compiled kernels (building them the first time, which takes about a minute), or None
    where they are unsupported or failed to build (logged once)."""
    global _loaded
    if _loaded is not None:
        return _loaded or None
    with _lock:
        if _loaded is None:
            _loaded = _build() if supported() else False
    return _loaded or None


def _build():
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(_NAME, cpp_sources=_SOURCE, functions=["row_linear"],
                             extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - any build failure leaves oneDNN in place
        log.warning("could not build the CPU row kernel (%s); single-row products use oneDNN", exc)
        return False
    log.info("CPU row kernel ready (AVX2 float32, single-row products)")
    return module


if __name__ == "__main__":  # `python -m steering.cpu_kernels`: build now (make install does)
    logging.basicConfig(level=logging.INFO)
    print("built" if load() is not None else "not built (see the log above)")
