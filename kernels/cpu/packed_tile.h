// The register tile of the packed GEMM kernels (matmul.cc, matmul_bf16dot.cc): TB tokens x G
// groups of 16 output rows, one AVX-512 vector of fp32 accumulators each, over a K slice. Both
// kernels start it from zero (first slice) or from y (partial sums of earlier slices), and store
// it back with the bias added after the last slice; rows past N are masked off. Inlined into the
// kernels, which are compiled for AVX-512 F/BW/VL or a superset.
#pragma once
#include <immintrin.h>

#include <cstddef>

namespace loraplex::cpu::tile {

#define LP_TILE_INLINE __attribute__((always_inline, target("avx512f,avx512bw,avx512vl"))) inline

constexpr int kRows = 16;  // output rows per group = fp32 lanes of a vector

template <int TB, int G>
LP_TILE_INLINE void begin(__m512 (&acc)[TB][G], __mmask16 (&mask)[G], const float* y, int N, int g0, bool first) {
#pragma GCC unroll 8
  for (int j = 0; j < G; j++) {
    const int n = N - (g0 + j) * kRows;
    mask[j] = static_cast<__mmask16>(n >= kRows ? 0xFFFFu : (1u << n) - 1);
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; t++)
#pragma GCC unroll 8
    for (int j = 0; j < G; j++)
      acc[t][j] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[j], y + size_t(t) * N + (g0 + j) * kRows);
}

template <int TB, int G>
LP_TILE_INLINE void end(const __m512 (&acc)[TB][G], const __mmask16 (&mask)[G], float* y, int N, int g0,
                        const float* bias, bool last) {
#pragma GCC unroll 8
  for (int j = 0; j < G; j++) {
    const int n0 = (g0 + j) * kRows;
    const __m512 b = last && bias ? _mm512_maskz_loadu_ps(mask[j], bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int t = 0; t < TB; t++) _mm512_mask_storeu_ps(y + size_t(t) * N + n0, mask[j], _mm512_add_ps(acc[t][j], b));
  }
}

#undef LP_TILE_INLINE

}  // namespace loraplex::cpu::tile
