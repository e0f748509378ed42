// Paged attention over the unified pool (compiled once per ISA; see dispatch.cc). Keys/values of a
// sequence live in fixed-size blocks reached through its block table; no block is ever copied.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu::LP_ISA_NS {

// Softmax of each of `group` score rows of length n in place (exp only); inv[h] = 1 / row sum.
static inline void softmax_rows(float* scores, int n, int group, const float* mx, float* inv) {
  for (int h = 0; h < group; h++) {
    float* sc = scores + size_t(h) * n;
    float sum = 0.f;
    const float m = mx[h];
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
      sc[j] = exp_nonpos(sc[j] - m);
      sum += sc[j];
    }
    inv[h] = 1.0f / sum;
  }
}

// Soft-capping (Gemma 2) of each of `group` score rows in place, s -> cap * tanh(s / cap), in the
// order HF applies it (after the scale, before the mask and softmax); mx[h] becomes the capped max.
static inline void softcap_rows(float* scores, int n, int group, float cap, float* mx) {
  for (int h = 0; h < group; h++) {
    float* sc = scores + size_t(h) * n;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int j = 0; j < n; j++) {
      sc[j] = tanh_fast(sc[j] / cap) * cap;
      m = sc[j] > m ? sc[j] : m;
    }
    mx[h] = m;
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 KV elements at element offset `i` of a row, as fp32 (BF16: the high half of each lane).
template <bool BF16>
static inline __m512 load_kv(const uint8_t* row, size_t i) {
  if constexpr (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(row) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + i);
  }
}

// AVX-512 path for head_dim = 16*C: the G query heads of one KV head stay in registers, scores
// are one dot per (key, head), and the output accumulates in registers over all keys (G*C zmm),
// so each K and V row is loaded once and nothing is re-read. Returns false when the shape is not
// covered (the portable loop below then runs).
template <int C, int G, bool BF16>
static void attend_item(const uint8_t* pool, const KvLayout& L, int layer, const int32_t* bt, int lo, int pos, int g,
                        const float* qg, float scale, float cap, float* og, float* scores) {
  const int bs = L.block_size;
  // bytes between consecutive keys in a block
  const size_t row = size_t(L.n_kv_heads) * L.head_dim * (BF16 ? 2 : 4);
  __m512 q[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) q[h][c] = _mm512_loadu_ps(qg + size_t(h) * 16 * C + 16 * c);
  const int n = pos - lo + 1;
  float mx[G];
  for (int h = 0; h < G; h++) mx[h] = -INFINITY;
  for (int j = lo; j <= pos;) {
    const int blk = j / bs, end = std::min(pos + 1, (blk + 1) * bs);
    const uint8_t* kb = kv_row(pool, L, layer, bt[blk], j % bs, 0);
    for (; j < end; j++, kb += row) {
      __m512 k[C];
      for (int c = 0; c < C; c++) k[c] = load_kv<BF16>(kb, size_t(g) * 16 * C + 16 * c);
      for (int h = 0; h < G; h++) {
        __m512 acc = _mm512_mul_ps(q[h][0], k[0]);
        for (int c = 1; c < C; c++) acc = _mm512_fmadd_ps(q[h][c], k[c], acc);
        const float d = _mm512_reduce_add_ps(acc) * scale;
        scores[size_t(h) * n + (j - lo)] = d;
        mx[h] = d > mx[h] ? d : mx[h];
      }
    }
  }
  if (cap > 0.f) softcap_rows(scores, n, G, cap, mx);
  float inv[G];
  softmax_rows(scores, n, G, mx, inv);
  __m512 o[G][C];
  for (int h = 0; h < G; h++)
    for (int c = 0; c < C; c++) o[h][c] = _mm512_setzero_ps();
  for (int j = lo; j <= pos;) {
    const int blk = j / bs, end = std::min(pos + 1, (blk + 1) * bs);
    const uint8_t* vb = kv_row(pool, L, layer, bt[blk], j % bs, 1);
    for (; j < end; j++, vb += row) {
      __m512 v[C];
      for (int c = 0; c < C; c++) v[c] = load_kv<BF16>(vb, size_t(g) * 16 * C + 16 * c);
      for (int h = 0; h < G; h++) {
        const __m512 w = _mm512_set1_ps(scores[size_t(h) * n + (j - lo)]);
        for (int c = 0; c < C; c++) o[h][c] = _mm512_fmadd_ps(w, v[c], o[h][c]);
      }
    }
  }
  for (int h = 0; h < G; h++) {
    const __m512 s = _mm512_set1_ps(inv[h]);
    for (int c = 0; c < C; c++) _mm512_storeu_ps(og + size_t(h) * 16 * C + 16 * c, _mm512_mul_ps(o[h][c], s));
  }
}

using AttendFn = void (*)(const uint8_t*, const KvLayout&, int, const int32_t*, int, int, int, const float*, float, float,
                          float*, float*);

template <int C, bool BF16>
static AttendFn pick_group(int group) {
  switch (group) {
    case 1: return attend_item<C, 1, BF16>;
    case 2: return attend_item<C, 2, BF16>;
    case 3: return attend_item<C, 3, BF16>;
    case 4: return attend_item<C, 4, BF16>;
    case 5: return attend_item<C, 5, BF16>;
    case 6: return attend_item<C, 6, BF16>;
    case 7: return attend_item<C, 7, BF16>;
    case 8: return attend_item<C, 8, BF16>;
    default: return nullptr;
  }
}

template <bool BF16>
static AttendFn pick_attend(int head_dim, int group) {
  switch (head_dim) {
    case 64: return pick_group<4, BF16>(group);
    case 128: return pick_group<8, BF16>(group);
    default: return nullptr;
  }
}
#endif

void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v) {
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;
  for_each_query(B, [&](int s, int t, int pos) {
    const int page = B.block_tables[size_t(s) * B.max_blocks + pos / L.block_size];
    const int slot = pos % L.block_size;
    uint8_t* kd = kv_row(pool, L, layer, page, slot, 0);
    uint8_t* vd = kv_row(pool, L, layer, page, slot, 1);
    if (!L.bf16) {
      std::copy(k + size_t(t) * row, k + size_t(t + 1) * row, reinterpret_cast<float*>(kd));
      std::copy(v + size_t(t) * row, v + size_t(t + 1) * row, reinterpret_cast<float*>(vd));
      return;
    }
    for (size_t i = 0; i < row; i++) {
      reinterpret_cast<uint16_t*>(kd)[i] = f32_to_bf16(k[size_t(t) * row + i]);
      reinterpret_cast<uint16_t*>(vd)[i] = f32_to_bf16(v[size_t(t) * row + i]);
    }
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
#if defined(__AVX512F__)
  const AttendFn fast = L.bf16 ? pick_attend<true>(hd, group) : pick_attend<false>(hd, group);
#endif
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
#if defined(__AVX512F__)
      if (fast) {
        fast(pool, L, layer, bt, lo, it.pos, g, qg, scale, B.softcap, out + (size_t(it.t) * n_heads + size_t(g) * group) * hd, scores.data());
        continue;
      }
#endif
      float mx[64];
      for (int h = 0; h < group; h++) mx[h] = -INFINITY;
      for (int j = lo; j <= it.pos; j++) {
        const uint8_t* kv = kv_row(pool, L, layer, bt[j / bs], j % bs, 0);
        for (int h = 0; h < group; h++) {
          const float* qv = qg + size_t(h) * hd;
          float d = 0.f;
#pragma omp simd reduction(+ : d)
          for (int i = 0; i < hd; i++) d += qv[i] * kv_at(kv, size_t(g) * hd + i, L.bf16);
          d *= scale;
          scores[size_t(h) * n + (j - lo)] = d;
          mx[h] = std::max(mx[h], d);
        }
      }
      if (B.softcap > 0.f) softcap_rows(scores.data(), n, group, B.softcap, mx);
      float inv[64];
      softmax_rows(scores.data(), n, group, mx, inv);
      for (int h = 0; h < group; h++) {
        float* o = out + (size_t(it.t) * n_heads + size_t(g) * group + h) * hd;
        std::fill(o, o + hd, 0.f);
      }
      for (int j = lo; j <= it.pos; j++) {
        const uint8_t* vv = kv_row(pool, L, layer, bt[j / bs], j % bs, 1);
        for (int h = 0; h < group; h++) {
          float* o = out + (size_t(it.t) * n_heads + size_t(g) * group + h) * hd;
          const float wj = scores[size_t(h) * n + (j - lo)] * inv[h];
#pragma omp simd
          for (int i = 0; i < hd; i++) o[i] += wj * kv_at(vv, size_t(g) * hd + i, L.bf16);
        }
      }
    }
  }
}

}  // namespace loraplex::cpu::LP_ISA_NS
