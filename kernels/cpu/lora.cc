// Heterogeneous LoRA kernels (compiled once per ISA; see dispatch.cc) (Punica's BGMV / SGMV idea on CPU). Two phases per projection:
//   shrink: z[t, j] = A_a[j, :] . x[t, :]          (r_a dots of length `in` per token)
//   expand: y[t, :] += s_a * sum_j z[t, j] B_a^T[j, :] (r_a axpys of length `out` per token)
// Rows come from the unified pool through per-adapter row tables, so adapters of any rank share
// pages with the KV cache and need no contiguous slab.
#include <omp.h>

#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu::LP_ISA_NS {

namespace {


inline float dot(const float* a, const float* b, int n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; i++) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* x, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; i++) y[i] += alpha * x[i];
}

}  // namespace


void lora_sgmv(const uint8_t* pool, const LoraRef* refs, const LoraSegment* segs, int n_segs, const float* x,
               int in, float* y, int out, float* z) {
  // Shrink: one work item per (segment, rank row); the A row stays in L1 across the segment.
  struct Work { int seg, j; };
  std::vector<Work> work;
  int max_rank = 0;
  for (int s = 0; s < n_segs; s++) {
    const LoraRef& r = refs[segs[s].slot];
    for (int j = 0; j < r.rank; j++) work.push_back({s, j});
    if (r.rank > max_rank) max_rank = r.rank;
  }
  if (work.empty()) return;
#pragma omp parallel for schedule(static)
  for (size_t w = 0; w < work.size(); w++) {
    const LoraSegment& sg = segs[work[w].seg];
    const LoraRef& r = refs[sg.slot];
    const int j = work[w].j;
    const float* a = lora_row(pool, r.a_rows[j]);
    for (int t = sg.start; t < sg.end; t++) z[size_t(t) * max_rank + j] = r.scale * dot(a, x + size_t(t) * in, in);
  }
  // Expand: split the output columns across threads; each thread walks every segment so that a
  // B^T row chunk is reused by all tokens of its segment while it is hot.
  const int n_threads = omp_get_max_threads();
  const int chunk = ((out + n_threads - 1) / n_threads + 15) / 16 * 16;
#pragma omp parallel for schedule(static)
  for (int c0 = 0; c0 < out; c0 += chunk) {
    const int len = c0 + chunk <= out ? chunk : out - c0;
    for (int s = 0; s < n_segs; s++) {
      const LoraSegment& sg = segs[s];
      const LoraRef& r = refs[sg.slot];
      for (int t = sg.start; t < sg.end; t++)
        for (int j = 0; j < r.rank; j++)
          axpy(z[size_t(t) * max_rank + j], lora_row(pool, r.b_rows[j]) + c0, y + size_t(t) * out + c0, len);
    }
  }
}

void lora_bgmv(const uint8_t* pool, const LoraRef* refs, const int32_t* token_slot, int T, const float* x, int in,
               float* y, int out, float* z) {
  int max_rank = 0;
  for (int t = 0; t < T; t++)
    if (refs[token_slot[t]].rank > max_rank) max_rank = refs[token_slot[t]].rank;
  if (max_rank == 0) return;
  const long n_work = long(T) * max_rank;
#pragma omp parallel for schedule(static)
  for (long w = 0; w < n_work; w++) {
    const int t = int(w / max_rank), j = int(w % max_rank);
    const LoraRef& r = refs[token_slot[t]];
    if (j >= r.rank) continue;
    z[w] = r.scale * dot(lora_row(pool, r.a_rows[j]), x + size_t(t) * in, in);
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < T; t++) {
    const LoraRef& r = refs[token_slot[t]];
    for (int j = 0; j < r.rank; j++)
      axpy(z[size_t(t) * max_rank + j], lora_row(pool, r.b_rows[j]), y + size_t(t) * out, out);
  }
}

}  // namespace loraplex::cpu::LP_ISA_NS
