// Adapter rows into the pool's format (compiled once per ISA, see isa.h): a PEFT tensor's values
// (fp32 or BF16) -> fp32 or BF16 rows, with the scan the loader needs in the same pass (max |x|
// and a count of non-finite values). B [out, rank] is written transposed (rank rows of `out`).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/isa.h"

namespace loraplex::cpu::LP_ISA_NS {

namespace {

inline float load_f(const float* p, size_t i) { return p[i]; }
inline float load_f(const uint16_t* p, size_t i) {
  const uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store_f(float* d, size_t i, float x) { d[i] = x; }
inline void store_f(uint16_t* d, size_t i, float x) {  // round to nearest even, as f32_to_bf16
  uint32_t u;
  std::memcpy(&u, &x, 4);
  d[i] = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename S, typename D>
void rows(const S* src, size_t n, D* dst, RowScan& sc) {
  float amax = sc.amax;
  uint32_t bad = 0;
#pragma omp simd reduction(max : amax) reduction(+ : bad)
  for (size_t i = 0; i < n; i++) {
    const float x = load_f(src, i);
    const float ax = std::fabs(x);
    bad += ax <= std::numeric_limits<float>::max() ? 0u : 1u;  // inf and NaN
    amax = ax > amax ? ax : amax;
    store_f(dst, i, x);
  }
  sc.amax = amax;
  sc.nonfinite += bad;
}

// A block of outputs at a time: the block's source lines stay in L1 while each of the rank rows
// gets its stretch of the block.
template <typename S, typename D>
void transposed(const S* src, int out, int rank, D* const* dst, RowScan& sc) {
  constexpr int kBlock = 64;
  float amax = sc.amax;
  uint32_t bad = 0;
  for (int o0 = 0; o0 < out; o0 += kBlock) {
    const int n = std::min(out, o0 + kBlock) - o0;
    const S* s0 = src + size_t(o0) * size_t(rank);
    for (int j = 0; j < rank; j++) {
      D* d = dst[j] + o0;
      const S* s = s0 + j;
#pragma omp simd reduction(max : amax) reduction(+ : bad)
      for (int o = 0; o < n; o++) {
        const float x = load_f(s, size_t(o) * size_t(rank));
        const float ax = std::fabs(x);
        bad += ax <= std::numeric_limits<float>::max() ? 0u : 1u;
        amax = ax > amax ? ax : amax;
        store_f(d, size_t(o), x);
      }
    }
  }
  sc.amax = amax;
  sc.nonfinite += bad;
}

}  // namespace

void lora_pack_rows(const void* src, WType st, size_t n, void* dst, bool bf16, RowScan& sc) {
  if (st == WType::BF16) {
    const auto* s = static_cast<const uint16_t*>(src);
    bf16 ? rows(s, n, static_cast<uint16_t*>(dst), sc) : rows(s, n, static_cast<float*>(dst), sc);
  } else {
    const auto* s = static_cast<const float*>(src);
    bf16 ? rows(s, n, static_cast<uint16_t*>(dst), sc) : rows(s, n, static_cast<float*>(dst), sc);
  }
}

void lora_pack_transposed(const void* src, WType st, int out, int rank, void* const* dst, bool bf16, RowScan& sc) {
  if (st == WType::BF16) {
    const auto* s = static_cast<const uint16_t*>(src);
    if (bf16) transposed(s, out, rank, reinterpret_cast<uint16_t* const*>(dst), sc);
    else transposed(s, out, rank, reinterpret_cast<float* const*>(dst), sc);
  } else {
    const auto* s = static_cast<const float*>(src);
    if (bf16) transposed(s, out, rank, reinterpret_cast<uint16_t* const*>(dst), sc);
    else transposed(s, out, rank, reinterpret_cast<float* const*>(dst), sc);
  }
}

}  // namespace loraplex::cpu::LP_ISA_NS
