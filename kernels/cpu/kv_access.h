// Address arithmetic shared by the KV and LoRA kernels (inline, no ISA-specific code).
#pragma once
#include <cstdint>

#include "kernels/cpu/kernels.h"

namespace loraplex::cpu {

// K (which = 0) or V (which = 1) row of `slot` in `page` for `layer`: [n_kv_heads, head_dim]
// elements (fp32, or BF16 when L.bf16) starting at the returned byte address.
inline uint8_t* kv_row(uint8_t* pool, const KvLayout& L, int layer, int page, int slot, int which) {
  const size_t elems = size_t(layer) * L.layer_stride() + size_t(which) * L.block_size * L.n_kv_heads * L.head_dim +
                       size_t(slot) * L.n_kv_heads * L.head_dim;
  return pool + size_t(page) * L.page_bytes + elems * L.elem_bytes();
}

inline const uint8_t* kv_row(const uint8_t* pool, const KvLayout& L, int layer, int page, int slot, int which) {
  return kv_row(const_cast<uint8_t*>(pool), L, layer, page, slot, which);
}

// BF16 -> fp32 (exact: the high half of the bits).
inline float bf16_bits(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

// Element i of a KV row (fp32 or BF16).
inline float kv_at(const uint8_t* row, size_t i, bool bf16) {
  return bf16 ? bf16_bits(reinterpret_cast<const uint16_t*>(row)[i]) : reinterpret_cast<const float*>(row)[i];
}

// Calls f(seq, token index, position) for every new token of the batch.
template <typename F>
void for_each_query(const AttnBatch& B, F&& f) {
  for (int s = 0; s < B.n_seqs; s++) {
    const int q0 = B.query_start[s], q1 = B.query_start[s + 1];
    const int first_pos = B.context_lens[s] - (q1 - q0);
    for (int t = q0; t < q1; t++) f(s, t, first_pos + (t - q0));
  }
}

inline const float* lora_row(const uint8_t* pool, int64_t off) { return reinterpret_cast<const float*>(pool + off); }
inline const uint16_t* lora_row_bf16(const uint8_t* pool, int64_t off) {
  return reinterpret_cast<const uint16_t*>(pool + off);
}
// Element k of a LoRA row stored as fp32 or BF16.
inline float lora_at(const uint8_t* pool, int64_t off, int k, bool bf16) {
  return bf16 ? bf16_bits(lora_row_bf16(pool, off)[k]) : lora_row(pool, off)[k];
}

}  // namespace loraplex::cpu

namespace loraplex::cpu {

// exp(x) for x <= 0 (softmax after subtracting the max) in plain arithmetic so `omp simd` loops
// vectorise it (std::exp is a scalar libm call): Cody-Waite range reduction by ln2, a degree-6
// polynomial on [-ln2/2, ln2/2], and 2^n by building the exponent bits. Max relative error ~2e-7.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_rintf(x * 1.44269504088896341f);  // rint (not round): vectorises to one rounding instruction
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

// tanh(x) in straight-line arithmetic (vectorises, unlike std::tanh): an odd Taylor polynomial to
// x^11 below |x| = 0.25 (truncation < 1e-9 relative), (1 - e) / (1 + e) with e = exp(-2|x|) above
// (1 - e >= 0.39 there, so exp_nonpos's ~2e-7 stays ~5e-7 relative). Saturates to +-1.
inline float tanh_fast(float x) {
  const float a = x < 0.f ? -x : x;
  const float x2 = x * x;
  float p = -1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * p;
  const float e = exp_nonpos(-2.0f * a);
  const float big = (1.0f - e) / (1.0f + e);
  const float large = x < 0.f ? -big : big;
  return a < 0.25f ? small : large;
}

}  // namespace loraplex::cpu
