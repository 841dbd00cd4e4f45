"""Our own CPU kernels for the engine's per-row arithmetic, whose results never depend on the batch.

A row's greedy tokens must be the same alone and in any batch (steered beside unsteered, one
coefficient beside another: the comparisons this server exists for). Library kernels do not
promise that: oneDNN picks its blocking, and with it the order of a dot product's sums, from the
number of rows; torch's reductions split differently by shape; SDPA's blocks follow the padded
length. In bfloat16 such a difference in the last bit becomes, a few tokens later, a different
token (measured on the AVX512-BF16 host, 2026-12-06: 10 of 32 greedy rows changed in a batch).

So every reduction of a row is computed here, in float32, in one fixed order that depends only
on the row's own sizes (the hidden size, its own context length), never on how many rows share
the call, where the row sits in it, the padding, or the number of threads:

- ``linear``: each output element is one 8-lane FMA chain over the input (weight times input),
  its lanes summed in a fixed tree, then the tail and the bias. Rows are computed in tiles of up
  to 4 rows by 3 weight rows to reuse loads, but each element's chain is the same in every tile
  shape; threads split the output columns, never a sum.
- ``linear_int8``: the same chain over an int8 weight (``--quantization int8``, see
  :mod:`steering.quant`), each weight widened exactly to float32 on load, then the row's scale
  and the bias: a quarter of float32's bytes, half of bfloat16's, read per product. Weights are
  stored in blocks of 4 rows (one contiguous stream per tile); on CPUs with AVX-512 each chain has
  16 lanes, and bfloat16 inputs on AVX512-BF16 CPUs run VDPBF16PS chains as the bfloat16 kernel
  does (each the only path such a CPU runs for its dtype and shape; see the code).
- ``lora_add``: LoRA deltas for every adapter of a step in one call per layer and group, each
  adapter's rows through ``linear``'s chains (x A^T, then each part's B), added in float32.
- ``rms_norm`` and ``silu_mul``: HF's RMSNorm and gated SiLU, row by row, with HF's roundings.
- ``attention``: per (token, KV head), the scores against the keys its own position (and
  sliding window) allows, read from the slot cache after this step's keys were written, then
  softmax and the weighted values, summed key by key in position order. A prompt token gives
  the same numbers whether it was prefilled in one chunk or three, beside 31 rows or none.

The code uses AVX2 and FMA only (8-lane float32), so the AVX2-only hosts and the AVX512 ones
run the same instructions: the guarantee holds on both by construction, in float32 and in
bfloat16 (bfloat16 is widened to float32 exactly on load and rounded to nearest even on store).

They are compiled on first use with ``torch.utils.cpp_extension.load_inline`` (g++ and ninja;
about a minute once, then cached in torch's extension folder, ``TORCH_EXTENSIONS_DIR``);
``make install`` builds them. Where they cannot be built (no compiler, no AVX2, another
architecture) or ``PERSONA_CPU_KERNELS=0`` turns them off, the engine uses oneDNN and SDPA:
faster at large batches, with no batch invariance (the README gives both numbers).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading

import torch

log = logging.getLogger(__name__)

_NAME = "persona_cpu_kernels_v4"
_FUNCTIONS = ["linear", "linear_int8", "rms_norm", "silu_mul", "attention", "attention_stored", "lora_add"]

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Every function here computes each output row from that row's inputs alone, with one fixed
// order of operations: no reduction is ever split between threads or shaped by how many rows a
// call has. Built with -ffp-contract=off, so the compiler never fuses a multiply and an add in
// one place and not in another.

namespace {

using bf16 = c10::BFloat16;

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  // bfloat16 is the high half of a float32: widening is exact.
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
// int8 weights (steering.quant): sign-extended and converted, exact as well.
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float f32(float v) { return v; }
inline float f32(bf16 v) { return static_cast<float>(v); }
inline float f32(int8_t v) { return static_cast<float>(v); }
template <typename T> inline T from_f32(float v) { return static_cast<T>(v); }  // bf16: round to nearest even

// <a, b> over k elements: one 8-lane FMA chain, its lanes summed, then the k % 8 tail in order.
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t k_total) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= k_total; k += 8) acc = _mm256_fmadd_ps(load8(a + k), load8(b + k), acc);
  float total = lane_sum(acc);
  for (; k < k_total; ++k) total = total + f32(a[k]) * f32(b[k]);
  return total;
}

// e^x in 8 lanes: n = round(x / ln 2), r = x - n ln 2 in two parts, e^r by its Taylor series to
// r^7 (|r| <= ln 2 / 2: within about 1 ulp of float32), times 2^n. x is clamped to
// [-87.3, 88.3] first, so 2^n stays a normal number (below the clamp e^x is taken as ~1e-38
// instead of 0). A fixed sequence of operations per lane: an element's value never depends on its
// neighbours, and every CPU with AVX2 computes the same bits. It replaces glibc's scalar expf in
// SiLU and the softmax, where expf took most of the time (SiLU over a 512-token prefill step:
// 51 ms of it, 2026-12-06, AVX512-BF16 host).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

// v[i] = exp8(v[i] - shift) for i < count; a tail shorter than 8 goes through the same lanes.
inline void exp_shifted(float* v, int64_t count, float shift) {
  const __m256 sv = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), sv)));
  if (i < count) {
    float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = i; j < count; ++j) tail[j - i] = v[j];
    _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), sv)));
    for (int64_t j = i; j < count; ++j) v[j] = tail[j - i];
  }
}

// 8 floats rounded to bfloat16 as c10::BFloat16(float) rounds one (nearest, ties to even; NaN to
// 0x7FC0), as 32-bit lanes holding the 16 bits.
inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i near = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(near, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
// The value a T holds nearest to each lane (float32 lanes in, float32 lanes out).
template <typename T> inline __m256 rounded(__m256 v);
template <> inline __m256 rounded<float>(__m256 v) { return v; }
template <> inline __m256 rounded<bf16>(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(v), 16)); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  const __m256i r = bf16_bits(v);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// out[r, c] = <x[r, :], w[c, :]> for an R x C tile: each of the R * C accumulators runs exactly
// the chain of dot() (weight first, as there), so a product's value never depends on the tile
// it was computed in, nor on how many rows the call had. A quantized weight's chain is then
// multiplied by its row's scale, before the bias: one more fixed operation per element.
template <int R, int C, typename W, typename B>
inline void tile(const float* x, const W* w, int64_t k_total, float* out, int64_t ldo, const B* bias,
                 const float* scale) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= k_total; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load8(w + c * k_total + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k_total + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float total = lane_sum(acc[r][c]);
      for (int64_t j = k; j < k_total; ++j) total = total + f32(w[c * k_total + j]) * x[r * k_total + j];
      if (scale) total = total * scale[c];
      if (bias) total = total + f32(bias[c]);
      out[r * ldo + c] = total;
    }
}

template <int C, typename W, typename B>
inline void rows_tile(int R, const float* x, const W* w, int64_t k, float* out, int64_t ldo, const B* bias,
                      const float* scale) {
  switch (R) {
    case 4: tile<4, C>(x, w, k, out, ldo, bias, scale); break;
    case 3: tile<3, C>(x, w, k, out, ldo, bias, scale); break;
    case 2: tile<2, C>(x, w, k, out, ldo, bias, scale); break;
    default: tile<1, C>(x, w, k, out, ldo, bias, scale); break;
  }
}

constexpr int kTileRows = 4, kTileCols = 3;
constexpr int64_t kBlockRows = 64;  // input rows kept hot in L2 while a thread sweeps its weights

template <typename W, typename B>
void linear_impl(const float* x, const W* w, const B* bias, const float* scale, float* out, int64_t m_total,
                 int64_t n_total, int64_t k_total) {
  const int64_t blocks = (n_total + kTileCols - 1) / kTileCols;
  // At least ~128k multiply-adds per thread: a parallel region costs more than a smaller share.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (kTileCols * k_total * m_total));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
      const int64_t m1 = std::min(m_total, m0 + kBlockRows);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * kTileCols;
        const int64_t cols = std::min<int64_t>(kTileCols, n_total - n);
        const W* wb = w + n * k_total;
        const B* bb = bias ? bias + n : nullptr;
        const float* sb = scale ? scale + n : nullptr;
        for (int64_t m = m0; m < m1; m += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
          float* o = out + m * n_total + n;
          const float* xm = x + m * k_total;
          if (cols == 3) rows_tile<3>(rows, xm, wb, k_total, o, n_total, bb, sb);
          else if (cols == 2) rows_tile<2>(rows, xm, wb, k_total, o, n_total, bb, sb);
          else rows_tile<1>(rows, xm, wb, k_total, o, n_total, bb, sb);
        }
      }
    }
  });
}

// The same for bfloat16 inputs and weights on CPUs with AVX512-BF16: each accumulator is one
// chain of VDPBF16PS over 32-element steps (pairs of products into 16 float32 lanes), its lanes
// summed by _mm512_reduce_add_ps, then the tail in order, then rounded to bfloat16 as a float32
// result's .to(bfloat16) would be (nearest, ties to even). One fixed sequence per element again;
// such a CPU takes this path for every bfloat16 product, so it is the only one it ever runs.
//
// A tile's first pass over its 4 weight rows also asks for the rows of the block kBf16Ahead
// blocks further on, into L2: the weights stream from memory once per step, and the hardware
// prefetchers follow 4 interleaved row streams poorly. Prefetching changes no number. Streaming
// every layer of SmolLM2-135M as a decode step does (2 threads, AVX512-BF16 host, 2026-12-06),
// 12 blocks ahead into L2 took a step's products from 14.3 to 10.7 ms at 1 row and from 41.8 to
// 35.6 ms at 32 rows; 4 blocks ahead into L1 gained 7-9%, 32 into L2 15-26%.
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
constexpr int64_t kBf16Ahead = 12;

// The lane sums of a 4x4 tile's 16 accumulators, each by _mm512_reduce_add_ps's own tree (lane i
// plus lane i+8, then i plus i+4, then i plus i+2, then the two left), but for all 16 at once,
// with shuffles that pair accumulators. IEEE addition commutes, so each sum is bitwise
// reduce_add's. Lane c * 4 + r holds accumulator [r][c].
BF16_TARGET inline __m512 reduce16_bf16(const __m512 (&acc)[4][4]) {
  __m512 s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i) {  // accumulators 2i, 2i+1: a[i] + a[i+8], eight each
    const __m512 a = acc[(2 * i) / 4][(2 * i) % 4], b = acc[(2 * i + 1) / 4][(2 * i + 1) % 4];
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // then i + (i+4): one quarter per accumulator, 4i .. 4i+3
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // then i + (i+2) within each quarter
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // and the last two: quarter q, place p holds accumulator 4p + q
  return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int R, int C>
BF16_TARGET inline void tile_bf16(const bf16* x, const bf16* w, int64_t k_total, bf16* out, int64_t ldo,
                                  const bf16* bias, const bf16* ahead) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= k_total; k += 32) {
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(w + c * k_total + k);
    if (ahead)
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(ahead + c * k_total + k), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k_total + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xv);
    }
  }
  if constexpr (R == 4 && C == 4) {
    if (k == k_total) {  // a full tile without a tail: its 16 sums, bias and rounding in one vector
      // reduce16_bf16 puts accumulator [r][c] in lane c * 4 + r; row-major order is lane r * 4 + c.
      __m512 total = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15),
                                           reduce16_bf16(acc));
      if (bias) {
        const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bias));  // bias[0..3], widened exactly
        const __m128 b4 = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
        total = _mm512_add_ps(total, _mm512_broadcast_f32x4(b4));
      }
      // Rows 0-1 in the low half, 2-3 in the high one, each rounded as store8 rounds; packed in row order.
      const __m256i low = bf16_bits(_mm512_castps512_ps256(total));
      const __m256i high = bf16_bits(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(total), 1)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0xD8);
      alignas(32) uint64_t rows[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(rows), packed);
      for (int r = 0; r < R; ++r) std::memcpy(out + r * ldo, &rows[r], 8);
      return;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float total = _mm512_reduce_add_ps(acc[r][c]);
      for (int64_t j = k; j < k_total; ++j) total = total + f32(w[c * k_total + j]) * f32(x[r * k_total + j]);
      if (bias) total = total + f32(bias[c]);
      out[r * ldo + c] = from_f32<bf16>(total);
    }
}

template <int C>
BF16_TARGET inline void rows_tile_bf16(int R, const bf16* x, const bf16* w, int64_t k, bf16* out, int64_t ldo,
                                       const bf16* bias, const bf16* ahead) {
  switch (R) {
    case 4: tile_bf16<4, C>(x, w, k, out, ldo, bias, ahead); break;
    case 3: tile_bf16<3, C>(x, w, k, out, ldo, bias, ahead); break;
    case 2: tile_bf16<2, C>(x, w, k, out, ldo, bias, ahead); break;
    default: tile_bf16<1, C>(x, w, k, out, ldo, bias, ahead); break;
  }
}

BF16_TARGET void linear_bf16(const bf16* x, const bf16* w, const bf16* bias, bf16* out, int64_t m_total,
                             int64_t n_total, int64_t k_total) {
  constexpr int cols_per_tile = 4;
  const int64_t blocks = (n_total + cols_per_tile - 1) / cols_per_tile;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (cols_per_tile * k_total * m_total));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
      const int64_t m1 = std::min(m_total, m0 + kBlockRows);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * cols_per_tile;
        const int64_t cols = std::min<int64_t>(cols_per_tile, n_total - n);
        const bf16* wb = w + n * k_total;
        const bf16* bb = bias ? bias + n : nullptr;
        for (int64_t m = m0; m < m1; m += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
          bf16* o = out + m * n_total + n;
          const bf16* xm = x + m * k_total;
          const bf16* ahead = m == m0 && b + kBf16Ahead < end ? wb + kBf16Ahead * cols_per_tile * k_total : nullptr;
          if (cols == 4) rows_tile_bf16<4>(rows, xm, wb, k_total, o, n_total, bb, ahead);
          else if (cols == 3) rows_tile_bf16<3>(rows, xm, wb, k_total, o, n_total, bb, ahead);
          else if (cols == 2) rows_tile_bf16<2>(rows, xm, wb, k_total, o, n_total, bb, ahead);
          else rows_tile_bf16<1>(rows, xm, wb, k_total, o, n_total, bb, ahead);
        }
      }
    }
  });
}

// int8 weights in blocks (steering.quant packs every weight whose shape allows): rows in groups of
// 4 and, within a group, 16 input columns of each row in turn ([N/4][K/16][4][16]), so a tile of
// 4 weight rows reads one contiguous stream, a cache line per step. Read row by row, the 4 rows
// are 4 interleaved streams that the prefetchers follow poorly: a [3072, 576] int8 product read
// its weights at 6-8 GB/s that way, 24 GB/s packed (one thread, AVX512-BF16 host, 2026-12-06),
// where a plain sum of a large tensor reads 21 GB/s.
//
// On CPUs with AVX-512 each accumulator is one 16-lane FMA chain (widening int8 costs two
// instructions per vector besides the FMA, so sixteen lanes halve the instructions per weight),
// its lanes summed by _mm512_reduce_add_ps; elsewhere one 8-lane chain, in the order of the plain
// kernel's. Then the row's scale and the bias. Which one runs depends on the CPU only, so a row's
// numbers are the same alone and in any batch.
#define I8_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
constexpr int kBlockCols = 4, kBlockDepth = 16;

template <int R>
I8_TARGET inline void tile_i8_avx512(const float* x, const int8_t* w, int64_t k_total, float* out, int64_t ldo,
                                     const float* bias, const float* scale) {
  __m512 acc[R][kBlockCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; k += kBlockDepth) {
    const int8_t* step = w + k * kBlockCols;
    __m512 wv[kBlockCols];
    for (int c = 0; c < kBlockCols; ++c)
      wv[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step + c * kBlockDepth))));
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k_total + k);
      for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) {
      float total = _mm512_reduce_add_ps(acc[r][c]) * scale[c];
      if (bias) total = total + bias[c];
      out[r * ldo + c] = total;
    }
}

template <int R>
inline void tile_i8_avx2(const float* x, const int8_t* w, int64_t k_total, float* out, int64_t ldo,
                         const float* bias, const float* scale) {
  __m256 acc[R][kBlockCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_total; k += 8) {
    const int8_t* step = w + (k / kBlockDepth) * kBlockDepth * kBlockCols + k % kBlockDepth;
    __m256 wv[kBlockCols];
    for (int c = 0; c < kBlockCols; ++c) wv[c] = load8(step + c * kBlockDepth);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k_total + k);
      for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) {
      float total = lane_sum(acc[r][c]) * scale[c];
      if (bias) total = total + bias[c];
      out[r * ldo + c] = total;
    }
}

// bfloat16 inputs on CPUs with AVX512-BF16 (in-features a multiple of 32): the int8 weights are
// widened to bfloat16 (exact: bfloat16 holds every integer up to 256) and each accumulator is one chain of
// VDPBF16PS over 32-element steps, as the unquantized bfloat16 kernel's; then the lane sum, the
// scale and the bias. One instruction per 32 products and row instead of two FMAs per 16 with
// the input widened to float32: at 32 rows the float32-chain path took 1.25-1.55x the time of the
// unquantized bfloat16 kernel. Such a CPU takes this path for every such bfloat16 product.
template <int R>
BF16_TARGET inline void tile_i8_bf16(const bf16* x, const int8_t* w, int64_t k_total, float* out, int64_t ldo,
                                     const float* bias, const float* scale) {
  __m512 acc[R][kBlockCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; k += 2 * kBlockDepth) {
    const int8_t* step = w + k * kBlockCols;
    __m512bh wv[kBlockCols];
    for (int c = 0; c < kBlockCols; ++c) {
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(step + c * kBlockDepth))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(step + (kBlockCols + c) * kBlockDepth))));
      wv[c] = _mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half: columns k..k+31 in order
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * k_total + k);
      for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv[c], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) {
      float total = _mm512_reduce_add_ps(acc[r][c]) * scale[c];
      if (bias) total = total + bias[c];
      out[r * ldo + c] = total;
    }
}

BF16_TARGET void linear_i8_bf16(const bf16* x, const int8_t* w, const float* bias, const float* scale, float* out,
                                int64_t m_total, int64_t n_total, int64_t k_total) {
  const int64_t blocks = n_total / kBlockCols;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (kBlockCols * k_total * m_total));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
      const int64_t m1 = std::min(m_total, m0 + kBlockRows);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * kBlockCols;
        const int8_t* wb = w + n * k_total;
        const float* bb = bias ? bias + n : nullptr;
        for (int64_t m = m0; m < m1; m += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m1 - m));
          float* o = out + m * n_total + n;
          const bf16* xm = x + m * k_total;
          switch (rows) {
            case 4: tile_i8_bf16<4>(xm, wb, k_total, o, n_total, bb, scale + n); break;
            case 3: tile_i8_bf16<3>(xm, wb, k_total, o, n_total, bb, scale + n); break;
            case 2: tile_i8_bf16<2>(xm, wb, k_total, o, n_total, bb, scale + n); break;
            default: tile_i8_bf16<1>(xm, wb, k_total, o, n_total, bb, scale + n); break;
          }
        }
      }
    }
  });
}

// Not itself compiled for AVX-512 (AVX2-only CPUs run it with Wide false): the wide tiles are calls.
template <bool Wide>
void linear_i8_blocked(const float* x, const int8_t* w, const float* bias, const float* scale, float* out,
                                 int64_t m_total, int64_t n_total, int64_t k_total) {
  const int64_t blocks = n_total / kBlockCols;
  constexpr int tile_rows = Wide ? 4 : 2;  // AVX2 has 16 registers: 2 x 4 accumulators
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / (kBlockCols * k_total * m_total));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < m_total; m0 += kBlockRows) {
      const int64_t m1 = std::min(m_total, m0 + kBlockRows);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = b * kBlockCols;
        const int8_t* wb = w + n * k_total;
        const float* bb = bias ? bias + n : nullptr;
        for (int64_t m = m0; m < m1; m += tile_rows) {
          const int rows = static_cast<int>(std::min<int64_t>(tile_rows, m1 - m));
          float* o = out + m * n_total + n;
          const float* xm = x + m * k_total;
          if constexpr (Wide) {
            switch (rows) {
              case 4: tile_i8_avx512<4>(xm, wb, k_total, o, n_total, bb, scale + n); break;
              case 3: tile_i8_avx512<3>(xm, wb, k_total, o, n_total, bb, scale + n); break;
              case 2: tile_i8_avx512<2>(xm, wb, k_total, o, n_total, bb, scale + n); break;
              default: tile_i8_avx512<1>(xm, wb, k_total, o, n_total, bb, scale + n); break;
            }
          } else if (rows == 2) {
            tile_i8_avx2<2>(xm, wb, k_total, o, n_total, bb, scale + n);
          } else {
            tile_i8_avx2<1>(xm, wb, k_total, o, n_total, bb, scale + n);
          }
        }
      }
    }
  });
}

const bool kHasAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
const bool kHasBf16 = __builtin_cpu_supports("avx512bf16");

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bfloat16");
}

}  // namespace

// x [M, K] and weight [N, K] (float32 or bfloat16, contiguous), bias [N] or empty -> [M, N] in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1));
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.numel() == weight.size(0) && bias.is_contiguous() &&
                            bias.scalar_type() == weight.scalar_type()));
  const int64_t m_total = x.size(0), n_total = weight.size(0), k_total = x.size(1);
  if (kHasBf16 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
    auto rounded = torch::empty({m_total, n_total}, x.options());
    linear_bf16(x.data_ptr<bf16>(), weight.data_ptr<bf16>(), has_bias ? bias.data_ptr<bf16>() : nullptr,
                rounded.data_ptr<bf16>(), m_total, n_total, k_total);
    return rounded;
  }
  auto out = torch::empty({m_total, n_total}, x.options().dtype(at::kFloat));
  auto xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (weight.scalar_type() == at::kFloat) {
    linear_impl(xf.data_ptr<float>(), weight.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr,
                nullptr, out.data_ptr<float>(), m_total, n_total, k_total);
  } else {
    linear_impl(xf.data_ptr<float>(), weight.data_ptr<bf16>(), has_bias ? bias.data_ptr<bf16>() : nullptr,
                nullptr, out.data_ptr<float>(), m_total, n_total, k_total);
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// x [M, K] (float32 or bfloat16); weight int8, [N, K] or blocked [N/4, K/16, 4, 16] (see
// linear_i8_blocked); scale float32 [N]; bias float32 [N] or empty -> [M, N] in x's dtype:
// (x . weight[c]) * scale[c] + bias[c], each element one fixed chain over the int8 weight widened
// exactly to float32, rounded to x's dtype as linear rounds.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias) {
  check_cpu(x, "x");
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.scalar_type() == at::kChar,
              "weight must be a contiguous int8 CPU tensor");
  const bool blocked = weight.dim() == 4;
  TORCH_CHECK(weight.dim() == 2 || (blocked && weight.size(2) == kBlockCols && weight.size(3) == kBlockDepth),
              "weight must be [N, K] or [N/4, K/16, 4, 16]");
  const int64_t n_total = blocked ? weight.size(0) * kBlockCols : weight.size(0);
  const int64_t k_total = blocked ? weight.size(1) * kBlockDepth : weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k_total, "x must be [M, in_features]");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == n_total,
              "scale must be float32 [out_features]");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.numel() == n_total && bias.is_contiguous() && bias.scalar_type() == at::kFloat),
              "bias must be float32 [out_features] or empty");
  const int64_t m_total = x.size(0);
  auto out = torch::empty({m_total, n_total}, x.options().dtype(at::kFloat));
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  if (blocked && kHasBf16 && x.scalar_type() == at::kBFloat16 && k_total % (2 * kBlockDepth) == 0) {
    linear_i8_bf16(x.data_ptr<bf16>(), weight.data_ptr<int8_t>(), bp, scale.data_ptr<float>(), out.data_ptr<float>(),
                   m_total, n_total, k_total);
    return out.to(at::kBFloat16);
  }
  auto xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (blocked && kHasAvx512)
    linear_i8_blocked<true>(xf.data_ptr<float>(), weight.data_ptr<int8_t>(), bp, scale.data_ptr<float>(),
                            out.data_ptr<float>(), m_total, n_total, k_total);
  else if (blocked)
    linear_i8_blocked<false>(xf.data_ptr<float>(), weight.data_ptr<int8_t>(), bp, scale.data_ptr<float>(),
                             out.data_ptr<float>(), m_total, n_total, k_total);
  else
    linear_impl(xf.data_ptr<float>(), weight.data_ptr<int8_t>(), bp, scale.data_ptr<float>(), out.data_ptr<float>(),
                m_total, n_total, k_total);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

namespace {

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* out, int64_t m_total, int64_t k_total, float eps) {
  at::parallel_for(0, m_total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * k_total;
      const float inv = 1.0f / std::sqrt(dot(row, row, k_total) / static_cast<float>(k_total) + eps);
      T* o = out + m * k_total;
      // HF's order: normalise in float32, round to the model's dtype, then the weight.
      const __m256 iv = _mm256_set1_ps(inv);
      int64_t k = 0;
      for (; k + 8 <= k_total; k += 8) store8(o + k, _mm256_mul_ps(load8(w + k), rounded<T>(_mm256_mul_ps(load8(row + k), iv))));
      for (; k < k_total; ++k) o[k] = from_f32<T>(f32(w[k]) * f32(from_f32<T>(f32(row[k]) * inv)));
    }
  });
}

// silu(g) = g / (1 + e^-g) in float32, rounded to T, times up, rounded: HF's two operations.
template <typename T>
inline void silu_mul8(const T* gate, const T* up, T* o) {
  const __m256 g = load8(gate);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  store8(o, _mm256_mul_ps(rounded<T>(silu), load8(up)));
}

template <typename T>
void silu_mul_impl(const T* gate_up, T* out, int64_t m_total, int64_t inner) {
  at::parallel_for(0, m_total, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* gate = gate_up + m * 2 * inner;
      const T* up = gate + inner;
      T* o = out + m * inner;
      int64_t i = 0;
      for (; i + 8 <= inner; i += 8) silu_mul8(gate + i, up + i, o + i);
      if (i < inner) {  // the tail through the same lanes, zero-padded
        T g[8], u[8], r[8];
        for (int64_t j = 0; j < 8; ++j) {
          g[j] = i + j < inner ? gate[i + j] : from_f32<T>(0.0f);
          u[j] = i + j < inner ? up[i + j] : from_f32<T>(0.0f);
        }
        silu_mul8(g, u, r);
        for (int64_t j = 0; i + j < inner; ++j) o[i + j] = r[j];
      }
    }
  });
}

// Scores of G query heads (float32, [G][D]) against n keys, for a head size D known at compile
// time: the key row stays in registers across the group, and each score is dot()'s chain over D
// (the query first, as there), its lane sum, the scale and the cap, so it equals the generic path.
template <int D, int G, typename T>
inline void scores_fixed(const float* qf, const T* keys, float* scores, int64_t n, float scale, float softcap) {
  for (int64_t j = 0; j < n; ++j) {
    const T* k = keys + j * D;
    __m256 kr[D / 8];
    for (int s = 0; s < D / 8; ++s) kr[s] = load8(k + 8 * s);
    for (int h = 0; h < G; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int s = 0; s < D / 8; ++s) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qf + h * D + 8 * s), kr[s], acc);
      float score = lane_sum(acc) * scale;
      if (softcap > 0.0f) score = softcap * std::tanh(score / softcap);
      scores[h * n + j] = score;
    }
  }
}

// The weighted values of G heads over n keys on CPUs with AVX-512: the G x D sums stay in
// registers for the whole pass instead of going through memory at every key. Each element is
// still acc = p * v + acc, key by key in position order, the generic path's operation; only the
// number of lanes per instruction differs, which changes no element.
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
AVX512_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512_TARGET inline __m512 load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int D, int G, typename T>
AVX512_TARGET void values_fixed(const float* probs, const T* values, float* acc_out, int64_t n) {
  __m512 acc[G][D / 16];
  for (int h = 0; h < G; ++h)
    for (int s = 0; s < D / 16; ++s) acc[h][s] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* v = values + j * D;
    __m512 vr[D / 16];
    for (int s = 0; s < D / 16; ++s) vr[s] = load16(v + 16 * s);
    for (int h = 0; h < G; ++h) {
      const __m512 pv = _mm512_set1_ps(probs[h * n + j]);
      for (int s = 0; s < D / 16; ++s) acc[h][s] = _mm512_fmadd_ps(pv, vr[s], acc[h][s]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int s = 0; s < D / 16; ++s) _mm512_storeu_ps(acc_out + h * D + 16 * s, acc[h][s]);
}

// The fixed-size paths above for the head sizes and groups they are built for; false elsewhere.
template <typename T>
bool scores_known(int64_t dim, int64_t group, const float* qf, const T* keys, float* scores, int64_t n, float scale,
                  float softcap) {
#define PERSONA_SCORES(D, G) if (dim == D && group == G) { scores_fixed<D, G>(qf, keys, scores, n, scale, softcap); return true; }
  PERSONA_SCORES(64, 1) PERSONA_SCORES(64, 2) PERSONA_SCORES(64, 3) PERSONA_SCORES(64, 4)
  PERSONA_SCORES(128, 1) PERSONA_SCORES(128, 2) PERSONA_SCORES(128, 4)
#undef PERSONA_SCORES
  return false;
}

template <typename T>
bool values_known(int64_t dim, int64_t group, const float* probs, const T* values, float* acc, int64_t n) {
  if (!kHasAvx512) return false;
#define PERSONA_VALUES(D, G) if (dim == D && group == G) { values_fixed<D, G>(probs, values, acc, n); return true; }
  PERSONA_VALUES(64, 1) PERSONA_VALUES(64, 2) PERSONA_VALUES(64, 3) PERSONA_VALUES(64, 4)
  PERSONA_VALUES(128, 1) PERSONA_VALUES(128, 2)
#undef PERSONA_VALUES
  return false;
}

// One (token, KV head): the token's `group` query heads over the keys its window allows, in
// float32: scores, softmax, weighted values, each summed key by key in position order. Each key
// and value row is widened to float32 once and serves every query head of the group.
template <typename T>
void attend_one(const T* q, const T* keys, const T* values, T* out, int64_t first, int64_t last, int64_t group,
                int64_t dim, float scale, float softcap, std::vector<float>& buffer) {
  const int64_t n = last - first + 1;
  buffer.resize(group * n + group * dim * 2 + dim);
  float* scores = buffer.data();
  float* acc = scores + group * n;
  float* qf = acc + group * dim;
  float* row = qf + group * dim;
  for (int64_t i = 0; i < group * dim; ++i) {
    qf[i] = f32(q[i]);
    acc[i] = 0.0f;
  }
  if (!scores_known(dim, group, qf, keys + first * dim, scores, n, scale, softcap)) {
    for (int64_t j = 0; j < n; ++j) {
      const T* k = keys + (first + j) * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = f32(k[d]);
      for (int64_t h = 0; h < group; ++h) {
        float s = dot(qf + h * dim, row, dim) * scale;
        if (softcap > 0.0f) s = softcap * std::tanh(s / softcap);
        scores[h * n + j] = s;
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* s = scores + h * n;
    float top = s[0];
    for (int64_t j = 1; j < n; ++j) top = std::max(top, s[j]);
    exp_shifted(s, n, top);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum = sum + s[j];
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * inv;
  }
  if (!values_known(dim, group, scores, values + first * dim, acc, n)) {
    for (int64_t j = 0; j < n; ++j) {
      const T* v = values + (first + j) * dim;
      for (int64_t d = 0; d < dim; ++d) row[d] = f32(v[d]);
      for (int64_t h = 0; h < group; ++h) {
        const float p = scores[h * n + j];
        float* a = acc + h * dim;
        const __m256 pv = _mm256_set1_ps(p);
        int64_t d = 0;
        for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(a + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(row + d), _mm256_loadu_ps(a + d)));
        for (; d < dim; ++d) a[d] = a[d] + p * row[d];
      }
    }
  }
  for (int64_t i = 0; i < group * dim; ++i) out[i] = from_f32<T>(acc[i]);
}

template <typename T>
void attention_impl(const T* q, const T* keys, const T* values, const int64_t* slots, const int64_t* positions,
                    T* out, int64_t tokens, int64_t heads, int64_t kv_heads, int64_t max_len, int64_t dim, float scale,
                    int64_t window, float softcap) {
  const int64_t group = heads / kv_heads;
  int64_t keys_read = 0;
  for (int64_t t = 0; t < tokens; ++t) keys_read += window > 0 ? std::min(window, positions[t] + 1) : positions[t] + 1;
  // Short contexts run in the calling thread: a parallel region would cost more than it saves.
  // A prompt's later tokens read more keys: threads take the tasks in strides, not in runs, so
  // each gets a share of the long ones (a 512-token chunk ran no faster on 2 threads than on 1).
  const int64_t tasks = tokens * kv_heads;
  const int64_t strides = std::max<int64_t>(1, std::min<int64_t>(tasks, at::get_num_threads()));
  const int64_t grain = keys_read * heads * dim < (int64_t{1} << 17) ? strides : 1;
  at::parallel_for(0, strides, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer;
    for (int64_t i = 0; i < tasks; ++i) {
      if (i % strides < begin || i % strides >= end) continue;
      const int64_t t = i / kv_heads, g = i % kv_heads;
      const int64_t last = positions[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t base = (slots[t] * kv_heads + g) * max_len * dim;
      attend_one(q + (t * heads + g * group) * dim, keys + base, values + base, out + (t * heads + g * group) * dim,
                 first, last, group, dim, scale, softcap, buffer);
    }
  });
}

}  // namespace

// x [M, K], weight [K] (same dtype) -> HF's RMSNorm of every row.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type());
  auto out = torch::empty_like(x);
  if (x.scalar_type() == at::kFloat)
    rms_norm_impl<float>(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1), eps);
  else
    rms_norm_impl<bf16>(x.data_ptr<bf16>(), weight.data_ptr<bf16>(), out.data_ptr<bf16>(), x.size(0), x.size(1), eps);
  return out;
}

// gate_up [M, 2I] (gate then up) -> silu(gate) * up [M, I], rounded as HF's two operations are.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0);
  const int64_t inner = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inner}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), gate_up.size(0), inner);
  else
    silu_mul_impl<bf16>(gate_up.data_ptr<bf16>(), out.data_ptr<bf16>(), gate_up.size(0), inner);
  return out;
}

// query [T, H, D]; keys/values [slots, KVH, max_len, D] (the cache, this step's keys already
// written); slots/positions int64 [T]. Token t attends to positions max(0, p - window + 1)..p
// (window 0: from 0) of its slot; softcap > 0 caps the scores as softcap * tanh(s / softcap).
torch::Tensor attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor slots,
                        torch::Tensor positions, double scale, int64_t window, double softcap) {
  check_cpu(query, "query");
  check_cpu(keys, "keys");
  check_cpu(values, "values");
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 4 && keys.sizes() == values.sizes());
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type());
  TORCH_CHECK(query.size(2) == keys.size(3) && query.size(1) % keys.size(1) == 0);
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
              positions.is_contiguous() && slots.numel() == query.size(0) && positions.numel() == query.size(0));
  const int64_t tokens = query.size(0), heads = query.size(1), kv_heads = keys.size(1), max_len = keys.size(2);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_len && slot[t] >= 0 && slot[t] < keys.size(0), "token ", t, " is outside the cache");
  auto out = torch::empty_like(query);
  if (query.scalar_type() == at::kFloat)
    attention_impl<float>(query.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), slot, pos,
                          out.data_ptr<float>(), tokens, heads, kv_heads, max_len, query.size(2), scale, window, softcap);
  else
    attention_impl<bf16>(query.data_ptr<bf16>(), keys.data_ptr<bf16>(), values.data_ptr<bf16>(), slot, pos,
                         out.data_ptr<bf16>(), tokens, heads, kv_heads, max_len, query.size(2), scale, window, softcap);
  return out;
}

// attention() after writing the step's own keys and values ([T, KV heads, head_dim], the cache's
// dtype) at each token's slot and position: one call per layer instead of two index_copy_ calls
// and the attention (their dispatch cost 3-4 ms a 32-row decode step across 30 layers).
torch::Tensor attention_stored(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor keys,
                               torch::Tensor values, torch::Tensor slots, torch::Tensor positions, double scale,
                               int64_t window, double softcap) {
  check_cpu(key, "key");
  check_cpu(value, "value");
  check_cpu(keys, "keys");
  check_cpu(values, "values");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && key.dim() == 3 && key.sizes() == value.sizes());
  TORCH_CHECK(key.scalar_type() == keys.scalar_type() && value.scalar_type() == keys.scalar_type());
  const int64_t tokens = key.size(0), kv_heads = keys.size(1), max_len = keys.size(2), dim = keys.size(3);
  TORCH_CHECK(key.size(1) == kv_heads && key.size(2) == dim, "key must be [tokens, kv_heads, head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
              positions.is_contiguous() && slots.numel() == tokens && positions.numel() == tokens);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_len && slot[t] >= 0 && slot[t] < keys.size(0), "token ", t, " is outside the cache");
  const int64_t bytes = dim * keys.element_size();
  char* kd = static_cast<char*>(keys.data_ptr());
  char* vd = static_cast<char*>(values.data_ptr());
  const char* ks = static_cast<const char*>(key.data_ptr());
  const char* vs = static_cast<const char*>(value.data_ptr());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t to = ((slot[t] * kv_heads + g) * max_len + pos[t]) * bytes, from = (t * kv_heads + g) * bytes;
      std::memcpy(kd + to, ks + from, bytes);
      std::memcpy(vd + to, vs + from, bytes);
    }
  return attention(query, keys, values, slots, positions, scale, window, softcap);
}
namespace {

// One fused group's LoRA for the rows of one adapter: gather and widen the rows, t = x A^T, then
// each part's block of outputs from its own ranks (zero-padded to its B's width), scaled and added
// to `out` (in float32, then rounded to out's dtype). Every product is linear_impl's: a row's
// delta is the same whichever rows share the call.
template <typename T>
void lora_rows(const T* x, T* out, const int64_t* rows, int64_t count, int64_t k_total, int64_t n_total,
               const torch::Tensor& a, const torch::Tensor* b, const int64_t* meta, const double* scales,
               int64_t parts, std::vector<float>& xg, std::vector<float>& t, std::vector<float>& tp,
               std::vector<float>& d) {
  const int64_t ranks = a.size(0);
  xg.resize(count * k_total);
  for (int64_t i = 0; i < count; ++i) {
    const T* src = x + rows[i] * k_total;
    for (int64_t k = 0; k < k_total; ++k) xg[i * k_total + k] = f32(src[k]);
  }
  t.resize(count * ranks);
  linear_impl<float, float>(xg.data(), a.data_ptr<float>(), nullptr, nullptr, t.data(), count, ranks, k_total);
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t c0 = meta[4 * p], c1 = meta[4 * p + 1], r0 = meta[4 * p + 2], r1 = meta[4 * p + 3];
    const int64_t width = b[p].size(1), cols = c1 - c0;
    tp.assign(count * width, 0.0f);
    for (int64_t i = 0; i < count; ++i)
      for (int64_t r = r0; r < r1; ++r) tp[i * width + (r - r0)] = t[i * ranks + r];
    d.resize(count * cols);
    linear_impl<float, float>(tp.data(), b[p].data_ptr<float>(), nullptr, nullptr, d.data(), count, cols, width);
    const float scale = static_cast<float>(scales[p]);
    for (int64_t i = 0; i < count; ++i) {
      T* o = out + rows[i] * n_total + c0;
      const float* di = d.data() + i * cols;
      for (int64_t c = 0; c < cols; ++c) o[c] = from_f32<T>(f32(o[c]) + di[c] * scale);
    }
  }
}

}  // namespace

// The LoRA deltas of one fused group for every adapter of a step, added to `out` [T, N] in place:
// one call per layer and group instead of a dozen small tensor operations per adapter.
// x [T, K] is the group's input (out's dtype). Adapter j: a[j] [ranks_j, K] float32; its token rows
// rows[spans[4j] : spans[4j+1]]; its parts b[spans[4j+2] : spans[4j+3]]. Part p: b[p]
// [c1 - c0, width >= r1 - r0] float32, meta[4p : 4p+4] = (c0, c1, r0, r1), scaling scales[p].
void lora_add(torch::Tensor x, torch::Tensor out, torch::Tensor rows, std::vector<int64_t> spans,
              std::vector<torch::Tensor> a, std::vector<torch::Tensor> b, std::vector<int64_t> meta,
              std::vector<double> scales) {
  check_cpu(x, "x");
  check_cpu(out, "out");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && x.dim() == 2 && out.dim() == 2 && x.size(0) == out.size(0),
              "x and out must be [T, K] and [T, N] of one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.device().is_cpu(), "rows: int64 on CPU");
  TORCH_CHECK(spans.size() == 4 * a.size() && meta.size() == 4 * b.size() && scales.size() == b.size(),
              "lora_add: spans, meta and scales do not match a and b");
  const int64_t k_total = x.size(1), n_total = out.size(1), t_total = x.size(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(r[i] >= 0 && r[i] < t_total, "lora_add: row out of range");
  for (size_t j = 0; j < a.size(); ++j) {
    const int64_t* s = spans.data() + 4 * j;
    TORCH_CHECK(a[j].scalar_type() == at::kFloat && a[j].is_contiguous() && a[j].dim() == 2 &&
                a[j].size(1) == k_total, "lora_add: a[j] must be contiguous float32 [ranks, K]");
    TORCH_CHECK(0 <= s[0] && s[0] <= s[1] && s[1] <= rows.numel() && 0 <= s[2] && s[2] <= s[3] &&
                s[3] <= static_cast<int64_t>(b.size()), "lora_add: span out of range");
    for (int64_t p = s[2]; p < s[3]; ++p) {
      const int64_t* m = meta.data() + 4 * p;
      TORCH_CHECK(b[p].scalar_type() == at::kFloat && b[p].is_contiguous() && b[p].dim() == 2 &&
                  0 <= m[0] && m[0] <= m[1] && m[1] <= n_total && b[p].size(0) == m[1] - m[0] && 0 <= m[2] &&
                  m[2] <= m[3] && m[3] <= a[j].size(0) && b[p].size(1) >= m[3] - m[2],
                  "lora_add: part ", p, " does not fit its adapter or the output");
    }
  }
  std::vector<float> xg, t, tp, d;
  for (size_t j = 0; j < a.size(); ++j) {
    const int64_t* s = spans.data() + 4 * j;
    if (s[1] == s[0]) continue;
    if (x.scalar_type() == at::kFloat)
      lora_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), r + s[0], s[1] - s[0], k_total, n_total, a[j],
                       b.data() + s[2], meta.data() + 4 * s[2], scales.data() + s[2], s[3] - s[2], xg, t, tp, d);
    else
      lora_rows<bf16>(x.data_ptr<bf16>(), out.data_ptr<bf16>(), r + s[0], s[1] - s[0], k_total, n_total, a[j],
                      b.data() + s[2], meta.data() + 4 * s[2], scales.data() + s[2], s[3] - s[2], xg, t, tp, d);
  }
}
"""

_lock = threading.Lock()
_loaded: object = None  # the extension module, False once it failed, None before the first try


def supported() -> bool:
    """True where the kernels can run: x86-64 with AVX2 (as torch sees the CPU) and a C++ compiler."""
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

        module = load_inline(_NAME, cpp_sources=_SOURCE, functions=_FUNCTIONS,
                             extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"],
                             extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - any build failure leaves oneDNN and SDPA in place
        log.warning("could not build the CPU kernels (%s); the engine uses oneDNN and SDPA, without batch "
                    "invariance", exc)
        return False
    log.info("CPU kernels ready (AVX2 float32 accumulation: batch-invariant products, norms and attention)")
    return module


if __name__ == "__main__":  # `python -m steering.cpu_kernels`: build now (make install does)
    logging.basicConfig(level=logging.INFO)
    print("built" if load() is not None else "not built (see the log above)")
