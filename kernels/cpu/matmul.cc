// Base-weight GEMM/GEMV. W is [N, K] row-major in its stored dtype (F32/BF16/F16).
//
// Optimised path: the N rows are cut into tiles of kTileRows; each thread converts one tile of W
// to fp32 in a small L1/L2-resident buffer (so BF16/F16 rows are converted once per call, not once
// per token), then a 4x4 register-blocked AVX-512 micro-kernel computes 4 tokens x 4 rows with 16
// accumulators. Decode (T small) is bound by streaming W once; prefill reuses each tile T times.
#include <immintrin.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "kernels/cpu/kernels.h"

// Every SIMD function is compiled for AVX-512 F/BW/VL and only called after has_avx512() said yes.
#define LP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace loraplex::cpu {

size_t wtype_size(WType t) { return t == WType::F32 ? 4 : 2; }

float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F;
  uint32_t mant = h & 0x3FF;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; exp--; }
      mant &= 0x3FF;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (mant << 13);
  } else {
    u = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

LP_AVX512 static void convert_row_avx512(const void* w, WType t, size_t off, int n,
                                                                    float* out) {
  int i = 0;
  if (t == WType::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(w) + off;
    for (; i + 16 <= n; i += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(out + i, _mm512_castsi512_ps(u));
    }
    for (; i < n; i++) out[i] = bf16_to_f32(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + off;
    for (; i + 16 <= n; i += 16) {
      __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      _mm512_storeu_ps(out + i, _mm512_cvtph_ps(h));
    }
    for (; i < n; i++) out[i] = f16_to_f32(p[i]);
  }
}

static bool has_avx512() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return v;
}

void convert_row(const void* w, WType t, size_t off, int n, float* out) {
  if (t == WType::F32) {
    std::memcpy(out, static_cast<const float*>(w) + off, size_t(n) * 4);
  } else if (has_avx512()) {
    convert_row_avx512(w, t, off, n, out);
  } else if (t == WType::BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(w) + off;
    for (int i = 0; i < n; i++) out[i] = bf16_to_f32(p[i]);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w) + off;
    for (int i = 0; i < n; i++) out[i] = f16_to_f32(p[i]);
  }
}

void matmul_ref(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y) {
  std::vector<float> row(K);
  for (int n = 0; n < N; n++) {
    convert_row(W, wt, size_t(n) * K, K, row.data());
    for (int t = 0; t < T; t++) {
      float acc = 0.f;
      for (int k = 0; k < K; k++) acc += x[size_t(t) * K + k] * row[k];
      y[size_t(t) * N + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

namespace {

// Loads 16 weights of row `w` at column k as fp32: BF16 is a shift, F16 the F16C conversion.
template <WType WT>
LP_AVX512 inline __m512 load16(const void* w, size_t off) {
  if constexpr (WT == WType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + off);
  } else if constexpr (WT == WType::BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + off));
    return _mm512_cvtph_ps(h);
  }
}

template <WType WT>
LP_AVX512 inline __m512 load16_masked(const void* w, size_t off, __mmask16 m) {
  if constexpr (WT == WType::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(w) + off);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w) + off);
    if constexpr (WT == WType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// Decode path (few tokens): stream W once, converting in registers; R rows x TT tokens of dot
// products share each loaded weight vector. Memory-bound: the point is to read W exactly once.
template <WType WT, int TT, int R>
LP_AVX512 void gemv_rows(const float* x, int K, const void* W, size_t row0, float* y,
                                                           int N, const float* bias) {
  __m512 acc[TT][R];
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; r++) wv[r] = load16<WT>(W, (row0 + r) * size_t(K) + k);
    for (int t = 0; t < TT; t++) {
      const __m512 xv = _mm512_loadu_ps(x + size_t(t) * K + k);
      for (int r = 0; r < R; r++) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; r++) wv[r] = load16_masked<WT>(W, (row0 + r) * size_t(K) + k, m);
    for (int t = 0; t < TT; t++) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + size_t(t) * K + k);
      for (int r = 0; r < R; r++) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < TT; t++)
    for (int r = 0; r < R; r++)
      y[size_t(t) * N + row0 + r] = _mm512_reduce_add_ps(acc[t][r]) + (bias ? bias[row0 + r] : 0.f);
}

template <WType WT, int TT>
void gemv(const float* x, int K, const void* W, int N, const float* bias, float* y) {
  constexpr int R = TT == 1 ? 8 : 4;  // more rows in flight when there is one token: more loads to overlap
  const int groups = N / R;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < groups; g++) gemv_rows<WT, TT, R>(x, K, W, size_t(g) * R, y, N, bias);
  for (int n = groups * R; n < N; n++) gemv_rows<WT, TT, 1>(x, K, W, size_t(n), y, N, bias);
}

// Batched path: rows are cut into tiles of kTileRows; each thread converts its tile to fp32 once
// (an L2-resident buffer, so BF16/F16 rows are converted once per call, not once per token), then
// a 6-row x 4-token register-blocked micro-kernel (24 accumulators, 10 loads per 24 FMAs) covers
// every token.
constexpr int kTileRows = 24;

template <int R>
LP_AVX512 void tile_avx512(const float* x, int T, int K, const float* w, float* y, int N,
                                                     const float* bias) {
  int t = 0;
  // The converted tile is plain fp32 rows, so the decode kernel (F32, rows from 0) is the micro-kernel.
  for (; t + 4 <= T; t += 4) gemv_rows<WType::F32, 4, R>(x + size_t(t) * K, K, w, 0, y + size_t(t) * N, N, bias);
  for (; t + 2 <= T; t += 2) gemv_rows<WType::F32, 2, R>(x + size_t(t) * K, K, w, 0, y + size_t(t) * N, N, bias);
  for (; t < T; t++) gemv_rows<WType::F32, 1, R>(x + size_t(t) * K, K, w, 0, y + size_t(t) * N, N, bias);
}

void tile_scalar(const float* x, int T, int K, const float* w, int R, float* y, int N, const float* bias) {
  for (int t = 0; t < T; t++)
    for (int r = 0; r < R; r++) {
      float acc = 0.f;
      for (int k = 0; k < K; k++) acc += x[size_t(t) * K + k] * w[size_t(r) * K + k];
      y[size_t(t) * N + r] = acc + (bias ? bias[r] : 0.f);
    }
}

void gemm_tiled(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y, bool avx) {
  const int n_tiles = (N + kTileRows - 1) / kTileRows;
#pragma omp parallel
  {
    std::vector<float> buf(wt == WType::F32 ? 0 : size_t(kTileRows) * K);
#pragma omp for schedule(static)
    for (int tile = 0; tile < n_tiles; tile++) {
      const int n0 = tile * kTileRows;
      const int R = N - n0 < kTileRows ? N - n0 : kTileRows;
      const float* w;
      if (wt == WType::F32) {
        w = static_cast<const float*>(W) + size_t(n0) * K;
      } else {
        convert_row(W, wt, size_t(n0) * K, R * K, buf.data());
        w = buf.data();
      }
      const float* b = bias ? bias + n0 : nullptr;
      if (!avx) {
        tile_scalar(x, T, K, w, R, y + n0, N, b);
        continue;
      }
      int r = 0;
      for (; r + 6 <= R; r += 6) tile_avx512<6>(x, T, K, w + size_t(r) * K, y + n0 + r, N, b ? b + r : nullptr);
      for (; r + 2 <= R; r += 2) tile_avx512<2>(x, T, K, w + size_t(r) * K, y + n0 + r, N, b ? b + r : nullptr);
      for (; r < R; r++) tile_avx512<1>(x, T, K, w + size_t(r) * K, y + n0 + r, N, b ? b + r : nullptr);
    }
  }
}

template <WType WT>
bool gemv_dispatch(const float* x, int T, int K, const void* W, int N, const float* bias, float* y) {
  switch (T) {
    case 1: gemv<WT, 1>(x, K, W, N, bias, y); return true;
    case 2: gemv<WT, 2>(x, K, W, N, bias, y); return true;
    case 3: gemv<WT, 3>(x, K, W, N, bias, y); return true;
    case 4: gemv<WT, 4>(x, K, W, N, bias, y); return true;
    default: return false;
  }
}

}  // namespace

void matmul(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y) {
  const bool avx = has_avx512();
  if (avx && T <= 4) {
    const bool done = wt == WType::F32    ? gemv_dispatch<WType::F32>(x, T, K, W, N, bias, y)
                      : wt == WType::BF16 ? gemv_dispatch<WType::BF16>(x, T, K, W, N, bias, y)
                                          : gemv_dispatch<WType::F16>(x, T, K, W, N, bias, y);
    if (done) return;
  }
  gemm_tiled(x, T, K, W, wt, N, bias, y, avx);
}

}  // namespace loraplex::cpu
