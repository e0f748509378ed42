// Paged attention over the unified pool. Keys/values of a sequence live in fixed-size blocks
// reached through its block table; no block is ever copied into a contiguous buffer.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"

namespace loraplex::cpu {

namespace {

inline float* kv_ptr(uint8_t* pool, const KvLayout& L, int layer, int page, int slot, int which) {
  float* base = reinterpret_cast<float*>(pool + size_t(page) * L.page_bytes);
  return base + size_t(layer) * L.layer_stride() + size_t(which) * L.block_size * L.n_kv_heads * L.head_dim +
         size_t(slot) * L.n_kv_heads * L.head_dim;
}

inline const float* kv_ptr(const uint8_t* pool, const KvLayout& L, int layer, int page, int slot, int which) {
  return kv_ptr(const_cast<uint8_t*>(pool), L, layer, page, slot, which);
}

// Per-sequence token -> (sequence, position) mapping shared by both attention versions.
template <typename F>
void for_each_query(const AttnBatch& B, F&& f) {
  for (int s = 0; s < B.n_seqs; s++) {
    const int q0 = B.query_start[s], q1 = B.query_start[s + 1];
    const int first_pos = B.context_lens[s] - (q1 - q0);
    for (int t = q0; t < q1; t++) f(s, t, first_pos + (t - q0));
  }
}

}  // namespace

void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v) {
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;
  for_each_query(B, [&](int s, int t, int pos) {
    const int page = B.block_tables[size_t(s) * B.max_blocks + pos / L.block_size];
    const int slot = pos % L.block_size;
    std::copy(k + size_t(t) * row, k + size_t(t + 1) * row, kv_ptr(pool, L, layer, page, slot, 0));
    std::copy(v + size_t(t) * row, v + size_t(t + 1) * row, kv_ptr(pool, L, layer, page, slot, 1));
  });
}

void paged_attention_ref(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,
                         int n_heads, float scale, float* out) {
  const int hd = L.head_dim, group = n_heads / L.n_kv_heads;
  std::vector<float> scores;
  for_each_query(B, [&](int s, int t, int pos) {
    const int lo = B.sliding_window > 0 ? std::max(0, pos - B.sliding_window + 1) : 0;
    scores.assign(pos - lo + 1, 0.f);
    for (int h = 0; h < n_heads; h++) {
      const int g = h / group;
      const float* qv = q + (size_t(t) * n_heads + h) * hd;
      float mx = -INFINITY;
      for (int j = lo; j <= pos; j++) {
        const int page = B.block_tables[size_t(s) * B.max_blocks + j / L.block_size];
        const float* kv = kv_ptr(pool, L, layer, page, j % L.block_size, 0) + size_t(g) * hd;
        float d = 0.f;
        for (int i = 0; i < hd; i++) d += qv[i] * kv[i];
        scores[j - lo] = d * scale;
        mx = std::max(mx, scores[j - lo]);
      }
      float sum = 0.f;
      for (auto& x : scores) { x = std::exp(x - mx); sum += x; }
      float* o = out + (size_t(t) * n_heads + h) * hd;
      std::fill(o, o + hd, 0.f);
      for (int j = lo; j <= pos; j++) {
        const int page = B.block_tables[size_t(s) * B.max_blocks + j / L.block_size];
        const float* vv = kv_ptr(pool, L, layer, page, j % L.block_size, 1) + size_t(g) * hd;
        const float w = scores[j - lo] / sum;
        for (int i = 0; i < hd; i++) o[i] += w * vv[i];
      }
    }
  });
}

void paged_attention(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,
                     int n_heads, float scale, float* out) {
  // Flatten (token, head) work items so both cores stay busy in decode (few tokens, many heads)
  // and in prefill (many tokens).
  struct Item { int s, t, pos; };
  std::vector<Item> items;
  for_each_query(B, [&](int s, int t, int pos) { items.push_back({s, t, pos}); });
  const int hd = L.head_dim, group = n_heads / L.n_kv_heads;
  const long n_work = long(items.size()) * n_heads;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 4)
    for (long w = 0; w < n_work; w++) {
      const Item& it = items[w / n_heads];
      const int h = int(w % n_heads), g = h / group;
      const int lo = B.sliding_window > 0 ? std::max(0, it.pos - B.sliding_window + 1) : 0;
      const int n = it.pos - lo + 1;
      scores.resize(n);
      const float* qv = q + (size_t(it.t) * n_heads + h) * hd;
      const int32_t* bt = B.block_tables + size_t(it.s) * B.max_blocks;
      float mx = -INFINITY;
      for (int j = lo; j <= it.pos; j++) {
        const float* kv = kv_ptr(pool, L, layer, bt[j / L.block_size], j % L.block_size, 0) + size_t(g) * hd;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int i = 0; i < hd; i++) d += qv[i] * kv[i];
        d *= scale;
        scores[j - lo] = d;
        mx = std::max(mx, d);
      }
      float sum = 0.f;
      for (int j = 0; j < n; j++) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      const float inv = 1.0f / sum;
      float* o = out + (size_t(it.t) * n_heads + h) * hd;
      std::fill(o, o + hd, 0.f);
      for (int j = lo; j <= it.pos; j++) {
        const float* vv = kv_ptr(pool, L, layer, bt[j / L.block_size], j % L.block_size, 1) + size_t(g) * hd;
        const float wj = scores[j - lo] * inv;
#pragma omp simd
        for (int i = 0; i < hd; i++) o[i] += wj * vv[i];
      }
    }
  }
}

}  // namespace loraplex::cpu
