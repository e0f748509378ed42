// Paged attention over the unified pool (compiled once per ISA; see dispatch.cc). Keys/values of a
// sequence live in fixed-size blocks reached through its block table; no block is ever copied.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu::LP_ISA_NS {

void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v) {
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;
  for_each_query(B, [&](int s, int t, int pos) {
    const int page = B.block_tables[size_t(s) * B.max_blocks + pos / L.block_size];
    const int slot = pos % L.block_size;
    std::copy(k + size_t(t) * row, k + size_t(t + 1) * row, kv_ptr(pool, L, layer, page, slot, 0));
    std::copy(v + size_t(t) * row, v + size_t(t + 1) * row, kv_ptr(pool, L, layer, page, slot, 1));
  });
}

void paged_attention(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,
                     int n_heads, float scale, float* out) {
  // One work item per (query token, KV head): the `group` query heads that share a KV head are
  // processed together, so every K and V row is read once for all of them (GQA), and work spreads
  // over both cores in decode (few tokens, several KV heads) and prefill (many tokens).
  struct Item { int s, t, pos; };
  std::vector<Item> items;
  for_each_query(B, [&](int s, int t, int pos) { items.push_back({s, t, pos}); });
  const int hd = L.head_dim, n_kv = L.n_kv_heads, group = n_heads / n_kv, bs = L.block_size;
  const long n_work = long(items.size()) * n_kv;
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 2)
    for (long w = 0; w < n_work; w++) {
      const Item& it = items[w / n_kv];
      const int g = int(w % n_kv);
      const int lo = B.sliding_window > 0 ? std::max(0, it.pos - B.sliding_window + 1) : 0;
      const int n = it.pos - lo + 1;
      scores.resize(size_t(n) * group);
      const float* qg = q + (size_t(it.t) * n_heads + size_t(g) * group) * hd;  // [group, hd]
      const int32_t* bt = B.block_tables + size_t(it.s) * B.max_blocks;
      float mx[64];
      for (int h = 0; h < group; h++) mx[h] = -INFINITY;
      for (int j = lo; j <= it.pos; j++) {
        const float* kv = kv_ptr(pool, L, layer, bt[j / bs], j % bs, 0) + size_t(g) * hd;
        for (int h = 0; h < group; h++) {
          const float* qv = qg + size_t(h) * hd;
          float d = 0.f;
#pragma omp simd reduction(+ : d)
          for (int i = 0; i < hd; i++) d += qv[i] * kv[i];
          d *= scale;
          scores[size_t(h) * n + (j - lo)] = d;
          mx[h] = std::max(mx[h], d);
        }
      }
      float inv[64];
      for (int h = 0; h < group; h++) {
        float* sc = scores.data() + size_t(h) * n;
        float sum = 0.f;
        const float m = mx[h];
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < n; j++) {
          sc[j] = exp_nonpos(sc[j] - m);
          sum += sc[j];
        }
        inv[h] = 1.0f / sum;
        float* o = out + (size_t(it.t) * n_heads + size_t(g) * group + h) * hd;
        std::fill(o, o + hd, 0.f);
      }
      for (int j = lo; j <= it.pos; j++) {
        const float* vv = kv_ptr(pool, L, layer, bt[j / bs], j % bs, 1) + size_t(g) * hd;
        for (int h = 0; h < group; h++) {
          float* o = out + (size_t(it.t) * n_heads + size_t(g) * group + h) * hd;
          const float wj = scores[size_t(h) * n + (j - lo)] * inv[h];
#pragma omp simd
          for (int i = 0; i < hd; i++) o[i] += wj * vv[i];
        }
      }
    }
  }
}

}  // namespace loraplex::cpu::LP_ISA_NS
