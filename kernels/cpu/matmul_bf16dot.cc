// BF16 x BF16 -> fp32 GEMM for BF16 weights with the AVX512-BF16 dot-product instruction
// (vdpbf16ps: 16 lanes x 2 products per instruction, twice the fp32 FMA rate), used when the
// engine runs with --compute-dtype bfloat16. Activations are rounded to BF16 (nearest even) before
// the product, as a BF16 model run natively in PyTorch does; products and sums stay fp32.
//
// Packing (pack_weights_bf16_pairs): groups of 16 rows; at each pair of columns (2p, 2p + 1) a
// group is one 64-byte vector whose 32-bit lane l holds W[16 g + l][2p] (low half) and
// W[16 g + l][2p + 1] (high half). K is padded to even and N to 16 with zeros. The kernel loads a
// group's vector once per k-pair and broadcasts each token's (x[2p], x[2p + 1]) pair: one
// instruction adds 32 products. Blocking mirrors matmul.cc: 8 tokens x 3 groups in registers,
// K-sliced panels that stay in L1 across the token blocks, 64-token chunks.
#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/packed_tile.h"

#define LP_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace loraplex::cpu {

namespace {

constexpr int kG = 16;

bool cpu_has_bf16_dot() {
  static const bool v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return v;
}

template <int TB, int G>
LP_AVX512BF16 void pair_block(const uint32_t* xp, int K2, int p0, int p1, const uint16_t* P, int g0, int N,
                              const float* bias, float* y, bool first, bool last) {
  __mmask16 mask[G];
  __m512 acc[TB][G];
  tile::begin(acc, mask, y, N, g0, first);
  const size_t stride = size_t(K2) * kG * 2;  // uint16 elements between groups
  const uint16_t* pb = P + size_t(g0) * stride;
  for (int p = p0; p < p1; p++) {
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) _mm_prefetch(reinterpret_cast<const char*>(pb + j * stride + size_t(p + 16) * kG * 2), _MM_HINT_T0);
    __m512bh w[G];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) w[j] = (__m512bh)_mm512_loadu_si512(pb + j * stride + size_t(p) * kG * 2);
#pragma GCC unroll 8
    for (int t = 0; t < TB; t++) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(xp[size_t(t) * K2 + p]));
#pragma GCC unroll 8
      for (int j = 0; j < G; j++) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], w[j], xb);
    }
  }
  tile::end(acc, mask, y, N, g0, bias, last);
}

template <int G>
LP_AVX512BF16 void pair_groups(const uint32_t* xp, int T, int K2, const uint16_t* P, int g0, int N, const float* bias,
                               float* y) {
  constexpr int kc = 128;  // k-pairs per slice: 3 groups x 128 x 64 B = 24 KiB panel
  for (int p0 = 0; p0 < K2; p0 += kc) {
    const int p1 = p0 + kc < K2 ? p0 + kc : K2;
    const bool first = p0 == 0, last = p1 == K2;
    int t = 0;
    for (; t + 8 <= T; t += 8) pair_block<8, G>(xp + size_t(t) * K2, K2, p0, p1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t + 4 <= T; t += 4) pair_block<4, G>(xp + size_t(t) * K2, K2, p0, p1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t + 2 <= T; t += 2) pair_block<2, G>(xp + size_t(t) * K2, K2, p0, p1, P, g0, N, bias, y + size_t(t) * N, first, last);
    for (; t < T; t++) pair_block<1, G>(xp + size_t(t) * K2, K2, p0, p1, P, g0, N, bias, y + size_t(t) * N, first, last);
  }
}

// x[t, 0:K] -> BF16 pairs (nearest even), zero-padded to K2 pairs.
LP_AVX512BF16 void round_rows(const float* x, int T0, int T1, int K, int K2, uint32_t* xp) {
  for (int t = T0; t < T1; t++) {
    const float* xr = x + size_t(t) * K;
    uint16_t* o = reinterpret_cast<uint16_t*>(xp + size_t(t) * K2);
    int k = 0;
    for (; k + 16 <= K; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + k)));
    for (; k < K; k++) o[k] = f32_to_bf16(xr[k]);
    for (; k < 2 * K2; k++) o[k] = 0;
  }
}

}  // namespace

bool has_bf16_dot() { return cpu_has_bf16_dot(); }

size_t packed_pairs_elems(int N, int K) { return size_t((N + kG - 1) / kG) * kG * size_t((K + 1) / 2) * 2; }

void pack_weights_bf16_pairs(const uint16_t* W, int N, int K, uint16_t* out) {
  const int n_groups = (N + kG - 1) / kG, K2 = (K + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int g = 0; g < n_groups; g++)
    for (int p = 0; p < K2; p++)
      for (int l = 0; l < kG; l++)
        for (int h = 0; h < 2; h++) {
          const int n = g * kG + l, k = 2 * p + h;
          out[((size_t(g) * K2 + p) * kG + l) * 2 + h] = n < N && k < K ? W[size_t(n) * K + k] : uint16_t(0);
        }
}

void matmul_bf16_pairs(const float* x, int T, int K, const uint16_t* P, int N, const float* bias, float* y) {
  if (T <= 0 || N <= 0) return;
  constexpr int G = 3, kChunk = 64;
  const int K2 = (K + 1) / 2;
  static thread_local std::vector<uint32_t> xp;
  xp.resize(size_t(T) * K2);
  uint32_t* xpp = xp.data();  // the caller's thread-local, shared with the team through this
  const int n_groups = (N + kG - 1) / kG, n_jobs = (n_groups + G - 1) / G, n_chunks = (T + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    round_rows(x, int(long(T) * id / nt), int(long(T) * (id + 1) / nt), K, K2, xpp);
#pragma omp barrier
#pragma omp for collapse(2) schedule(static)
    for (int c = 0; c < n_chunks; c++)
      for (int job = 0; job < n_jobs; job++) {
        const int t0 = c * kChunk, tn = T - t0 < kChunk ? T - t0 : kChunk;
        const uint32_t* xc = xpp + size_t(t0) * K2;
        float* yc = y + size_t(t0) * N;
        const int g0 = job * G, g1 = g0 + G < n_groups ? g0 + G : n_groups;
        if (g1 - g0 == G) pair_groups<G>(xc, tn, K2, P, g0, N, bias, yc);
        else
          for (int g = g0; g < g1; g++) pair_groups<1>(xc, tn, K2, P, g, N, bias, yc);
      }
  }
}

}  // namespace loraplex::cpu
