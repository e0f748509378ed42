// Base-weight GEMM/GEMV. W is [N, K] row-major in its stored dtype (F32/BF16/F16).
//
// The engine packs every projection once at load (pack_weights): groups of 16 rows interleaved
// by column, P[g][k][l] = W[16 g + l][k], in the stored dtype (same bytes, no fp32 copy). A
// 16-row group at one k is then one contiguous vector: the kernel loads it (converting BF16/F16
// in registers), broadcasts each token's activation and accumulates 16 output rows per FMA, with
// no horizontal sums. The same kernel serves decode (T = 1: W streamed once, memory bound) and
// prefill (8-token x 48-row register blocks, FMA bound); only the token blocking differs.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/packed_tile.h"

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

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
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

constexpr int kG = 16;  // rows per packed group = fp32 lanes of an AVX-512 vector
constexpr int kPrefetchK = 32;  // k steps ahead (32 x 16 BF16 = 1 KiB per group stream)

// 16 consecutive packed elements (the 16 rows of a group at one k) as fp32.
template <WType WT>
LP_AVX512 inline __m512 load_group(const void* p, size_t off) {
  if constexpr (WT == WType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + off);
  } else if constexpr (WT == WType::BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + off));
    return _mm512_cvtph_ps(h);
  }
}

// y[t][16 g + l] for TB tokens x G groups over k in [k0, k1): TB * G accumulators, each a vector
// of 16 output rows, started from zero (first slice) or from y, stored back with the bias added
// after the last slice. At every k, G packed weight vectors are loaded (and converted) once and
// each of the TB activations is broadcast once: a weight load feeds TB FMAs, a broadcast G.
template <WType WT, int TB, int G>
LP_AVX512 void packed_block(const float* x, int K, int k0, int k1, const void* P, int g0, int N, const float* bias,
                            float* y, bool first, bool last) {
  __mmask16 mask[G];
  __m512 acc[TB][G];
  tile::begin(acc, mask, y, N, g0, first);
  const size_t stride = size_t(K) * kG;  // elements between groups
  const size_t base = size_t(g0) * stride;
  constexpr size_t es = WT == WType::F32 ? 4 : 2;
  const char* pb = static_cast<const char*>(P) + base * es;
  for (int k = k0; k < k1; k++) {
    // Prefetch each group stream ~1 KiB ahead so the loads from memory overlap the FMAs.
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) _mm_prefetch(pb + (j * stride + size_t(k + kPrefetchK) * kG) * es, _MM_HINT_T0);
    __m512 w[G];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) w[j] = load_group<WT>(P, base + j * stride + size_t(k) * kG);
#pragma GCC unroll 8
    for (int t = 0; t < TB; t++) {
      const __m512 xb = _mm512_set1_ps(x[size_t(t) * K + k]);
#pragma GCC unroll 8
      for (int j = 0; j < G; j++) acc[t][j] = _mm512_fmadd_ps(w[j], xb, acc[t][j]);
    }
  }
  tile::end(acc, mask, y, N, g0, bias, last);
}

// Groups [g0, g0 + G) for every token. K is cut into slices whose weight panel (G groups x kc
// columns, 24 KiB) stays in L1 while every token block uses it: W is read from memory once per
// call however many token blocks there are (8 tokens, then 4, 2, 1 for the tail).
template <WType WT, int G>
LP_AVX512 void packed_groups(const float* x, int T, int K, const void* P, int g0, int N, const float* bias, float* y) {
  constexpr int kc = WT == WType::F32 ? 128 : 256;
  for (int k0 = 0; k0 < K; k0 += kc) {
    const int k1 = k0 + kc < K ? k0 + kc : K;
    const bool first = k0 == 0, last = k1 == K;
    int t = 0;
    for (; t + 8 <= T; t += 8)
      packed_block<WT, 8, G>(x + size_t(t) * K, K, k0, k1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t + 4 <= T; t += 4)
      packed_block<WT, 4, G>(x + size_t(t) * K, K, k0, k1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t + 2 <= T; t += 2)
      packed_block<WT, 2, G>(x + size_t(t) * K, K, k0, k1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t < T; t++)
      packed_block<WT, 1, G>(x + size_t(t) * K, K, k0, k1, P, g0, N, bias, y + size_t(t) * N, first, last);
  }
}

template <WType WT>
void matmul_packed_avx512(const float* x, int T, int K, const void* P, int N, const float* bias, float* y) {
  // Three groups (48 rows) per job: 8 tokens x 3 groups = 24 accumulators, 11 loads per 24 FMAs.
  // Long batches (prefill) go in chunks of kChunk tokens, chunk-major: a thread's x chunk stays in
  // L2 while it walks the weight panels (from L3), instead of every panel re-reading all of x.
  constexpr int G = 3, kChunk = 64;
  const int n_groups = (N + kG - 1) / kG;
  const int n_jobs = (n_groups + G - 1) / G;
  const int n_chunks = (T + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static)
  for (int c = 0; c < n_chunks; c++)
    for (int job = 0; job < n_jobs; job++) {
      const int t0 = c * kChunk, tn = T - t0 < kChunk ? T - t0 : kChunk;
      const float* xc = x + size_t(t0) * K;
      float* yc = y + size_t(t0) * N;
      const int g0 = job * G, g1 = g0 + G < n_groups ? g0 + G : n_groups;
      if (g1 - g0 == G) packed_groups<WT, G>(xc, tn, K, P, g0, N, bias, yc);
      else
        for (int g = g0; g < g1; g++) packed_groups<WT, 1>(xc, tn, K, P, g, N, bias, yc);
    }
}

// AVX2 + FMA path (CPUs without AVX-512): the same packed layout; a 16-row group at one k is two
// 8-lane vectors. 16 ymm registers: one group x up to 6 tokens (12 accumulators, 2 weight vectors,
// a broadcast), K-sliced panels reused from L1 by every token block, as in the AVX-512 kernel.
#define LP_AVX2 __attribute__((target("avx2,fma,f16c")))

template <WType WT>
LP_AVX2 inline void load_group_avx2(const void* p, size_t off, __m256& lo, __m256& hi) {
  if constexpr (WT == WType::F32) {
    lo = _mm256_loadu_ps(static_cast<const float*>(p) + off);
    hi = _mm256_loadu_ps(static_cast<const float*>(p) + off + 8);
  } else {
    const uint16_t* q = static_cast<const uint16_t*>(p) + off;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 8));
    if constexpr (WT == WType::BF16) {
      lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(a), 16));
      hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
    } else {
      lo = _mm256_cvtph_ps(a);
      hi = _mm256_cvtph_ps(b);
    }
  }
}

template <WType WT, int TB>
LP_AVX2 void packed_block_avx2(const float* x, int K, int k0, int k1, const void* P, int g, int N, const float* bias,
                               float* y, bool first, bool last) {
  const int n0 = g * kG, rows = N - n0 < kG ? N - n0 : kG;
  alignas(32) float tmp[kG];
  __m256 acc[TB][2];
  for (int t = 0; t < TB; t++) {
    if (first) {
      acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    } else {  // partial sums of earlier K slices (a short last group goes through tmp)
      for (int l = 0; l < kG; l++) tmp[l] = l < rows ? y[size_t(t) * N + n0 + l] : 0.f;
      acc[t][0] = _mm256_load_ps(tmp);
      acc[t][1] = _mm256_load_ps(tmp + 8);
    }
  }
  const size_t base = size_t(g) * K * kG;
  constexpr size_t es = WT == WType::F32 ? 4 : 2;
  const char* pb = static_cast<const char*>(P) + base * es;
  for (int k = k0; k < k1; k++) {
    _mm_prefetch(pb + size_t(k + kPrefetchK) * kG * es, _MM_HINT_T0);
    __m256 wlo, whi;
    load_group_avx2<WT>(P, base + size_t(k) * kG, wlo, whi);
    for (int t = 0; t < TB; t++) {
      const __m256 xb = _mm256_broadcast_ss(x + size_t(t) * K + k);
      acc[t][0] = _mm256_fmadd_ps(wlo, xb, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(whi, xb, acc[t][1]);
    }
  }
  for (int t = 0; t < TB; t++) {
    _mm256_store_ps(tmp, acc[t][0]);
    _mm256_store_ps(tmp + 8, acc[t][1]);
    for (int l = 0; l < rows; l++) y[size_t(t) * N + n0 + l] = tmp[l] + (last && bias ? bias[n0 + l] : 0.f);
  }
}

template <WType WT>
LP_AVX2 void packed_group_avx2(const float* x, int T, int K, const void* P, int g, int N, const float* bias, float* y) {
  constexpr int kc = WT == WType::F32 ? 256 : 512;  // 16 rows x kc: a 16 KiB panel in L1
  for (int k0 = 0; k0 < K; k0 += kc) {
    const int k1 = k0 + kc < K ? k0 + kc : K;
    const bool first = k0 == 0, last = k1 == K;
    int t = 0;
    for (; t + 6 <= T; t += 6)
      packed_block_avx2<WT, 6>(x + size_t(t) * K, K, k0, k1, P, g, N, bias, y + size_t(t) * N, first, last);
    for (; t + 4 <= T; t += 4)
      packed_block_avx2<WT, 4>(x + size_t(t) * K, K, k0, k1, P, g, N, bias, y + size_t(t) * N, first, last);
    for (; t + 2 <= T; t += 2)
      packed_block_avx2<WT, 2>(x + size_t(t) * K, K, k0, k1, P, g, N, bias, y + size_t(t) * N, first, last);
    for (; t < T; t++)
      packed_block_avx2<WT, 1>(x + size_t(t) * K, K, k0, k1, P, g, N, bias, y + size_t(t) * N, first, last);
  }
}

template <WType WT>
void matmul_packed_avx2(const float* x, int T, int K, const void* P, int N, const float* bias, float* y) {
  constexpr int kChunk = 64;
  const int n_groups = (N + kG - 1) / kG, n_chunks = (T + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static)
  for (int c = 0; c < n_chunks; c++)
    for (int g = 0; g < n_groups; g++) {
      const int t0 = c * kChunk, tn = T - t0 < kChunk ? T - t0 : kChunk;
      packed_group_avx2<WT>(x + size_t(t0) * K, tn, K, P, g, N, bias, y + size_t(t0) * N);
    }
}

// Portable path: the same layout, plain loops (one group of 16 accumulators per token).
void matmul_packed_scalar(const float* x, int T, int K, const void* P, WType wt, int N, const float* bias, float* y) {
  const int n_groups = (N + kG - 1) / kG;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < n_groups; g++) {
    std::vector<float> w(size_t(K) * kG);
    convert_row(P, wt, size_t(g) * K * kG, K * kG, w.data());
    const int n0 = g * kG, n = N - n0 < kG ? N - n0 : kG;
    for (int t = 0; t < T; t++) {
      float acc[kG] = {};
      for (int k = 0; k < K; k++)
        for (int l = 0; l < kG; l++) acc[l] += w[size_t(k) * kG + l] * x[size_t(t) * K + k];
      for (int l = 0; l < n; l++) y[size_t(t) * N + n0 + l] = acc[l] + (bias ? bias[n0 + l] : 0.f);
    }
  }
}

}  // namespace

size_t packed_elems(int N, int K) { return size_t((N + kG - 1) / kG) * kG * size_t(K); }

void pack_weights(const void* W, WType t, int N, int K, void* out) {
  const int n_groups = (N + kG - 1) / kG;
  const size_t es = wtype_size(t);
  const auto* src = static_cast<const uint8_t*>(W);
  auto* dst = static_cast<uint8_t*>(out);
#pragma omp parallel for schedule(static)
  for (int g = 0; g < n_groups; g++)
    for (int l = 0; l < kG; l++) {
      const int n = g * kG + l;
      for (int k = 0; k < K; k++) {
        uint8_t* d = dst + ((size_t(g) * K + k) * kG + l) * es;
        if (n < N) std::memcpy(d, src + (size_t(n) * K + k) * es, es);
        else std::memset(d, 0, es);
      }
    }
}

void matmul_packed(const float* x, int T, int K, const void* P, WType wt, int N, const float* bias, float* y) {
  if (T <= 0 || N <= 0) return;
  // The ISA the other kernels run (dispatch.cc: the best this CPU has, or LORAPLEX_ISA), so the
  // kernel tests exercise every GEMM path this machine can execute.
  const char* isa = active_isa();
  if (std::strcmp(isa, "avx512") == 0 && has_avx512()) {
    switch (wt) {
      case WType::F32: return matmul_packed_avx512<WType::F32>(x, T, K, P, N, bias, y);
      case WType::BF16: return matmul_packed_avx512<WType::BF16>(x, T, K, P, N, bias, y);
      case WType::F16: return matmul_packed_avx512<WType::F16>(x, T, K, P, N, bias, y);
    }
  }
  if (std::strcmp(isa, "generic") != 0) {  // avx2
    switch (wt) {
      case WType::F32: return matmul_packed_avx2<WType::F32>(x, T, K, P, N, bias, y);
      case WType::BF16: return matmul_packed_avx2<WType::BF16>(x, T, K, P, N, bias, y);
      case WType::F16: return matmul_packed_avx2<WType::F16>(x, T, K, P, N, bias, y);
    }
  }
  matmul_packed_scalar(x, T, K, P, wt, N, bias, y);
}

void matmul(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y) {
  std::vector<uint8_t> packed(packed_elems(N, K) * wtype_size(wt));
  pack_weights(W, wt, N, K, packed.data());
  matmul_packed(x, T, K, packed.data(), wt, N, bias, y);
}

}  // namespace loraplex::cpu
