// Heterogeneous LoRA kernels (compiled once per ISA; see dispatch.cc) (Punica's BGMV / SGMV idea on CPU). Two phases per projection:
//   shrink: z[t, j] = A_a[j, :] . x[t, :]          (r_a dots of length `in` per token)
//   expand: y[t, :] += s_a * sum_j z[t, j] B_a^T[j, :] (r_a axpys of length `out` per token)
// Rows come from the unified pool through per-adapter row tables, so adapters of any rank share
// pages with the KV cache and need no contiguous slab.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu::LP_ISA_NS {

namespace {

// Element k of a row of element type R (float, or uint16_t for BF16).
template <typename R>
inline float row_at(const R* row, int k) {
  if constexpr (sizeof(R) == 2) return bf16_bits(row[k]);
  else return row[k];
}

// z[t, j] = scale * A[j, :] . x[t, :] for rank rows [j0, j0 + 4) (rows past `rank` skipped) of
// tokens [t0, t1): four independent accumulators share each x load (a single dot product is one
// FMA latency chain per vector and runs at a quarter of the machine). Rows fp32 or BF16.
template <typename R>
inline void shrink4_t(const uint8_t* pool, const LoraRef& r, int j0, const float* x, int in, int t0, int t1, float* z,
                      int z_stride) {
  const int nr = r.rank - j0 < 4 ? r.rank - j0 : 4;
  auto row = [&](int j) { return reinterpret_cast<const R*>(pool + r.a_rows[j]); };
  const R* a0 = row(j0);
  const R* a1 = nr > 1 ? row(j0 + 1) : a0;
  const R* a2 = nr > 2 ? row(j0 + 2) : a0;
  const R* a3 = nr > 3 ? row(j0 + 3) : a0;
  for (int t = t0; t < t1; t++) {
    const float* xt = x + size_t(t) * in;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int k = 0; k < in; k++) {
      const float v = xt[k];
      s0 += row_at(a0, k) * v;
      s1 += row_at(a1, k) * v;
      s2 += row_at(a2, k) * v;
      s3 += row_at(a3, k) * v;
    }
    float* zt = z + size_t(t) * z_stride + j0;
    const float s[4] = {s0, s1, s2, s3};
    for (int q = 0; q < nr; q++) zt[q] = r.scale * s[q];
  }
}

inline void shrink4(const uint8_t* pool, const LoraRef& r, int j0, const float* x, int in, int t0, int t1, float* z,
                    int z_stride) {
  if (r.bf16) shrink4_t<uint16_t>(pool, r, j0, x, in, t0, t1, z, z_stride);
  else shrink4_t<float>(pool, r, j0, x, in, t0, t1, z, z_stride);
}

// y[t, c0 : c0 + len] += sum_j z[t, j] B^T[j, c0 : c0 + len] for tokens [t0, t1). With AVX-512
// the sum over the rank is kept in a register per 16 columns, so y is read and written once (not
// once per rank row); elsewhere one axpy per rank row over a y chunk that stays in L1.
#if defined(__AVX512F__)
template <bool BF16>
inline __m512 load_b(const uint8_t* row, int c, __mmask16 m) {
  if constexpr (BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(row) + c);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + c);
  }
}

template <bool BF16>
inline void expand_cols_t(const uint8_t* pool, const LoraRef& r, const float* z, int z_stride, int t0, int t1, float* y,
                          int out, int c0, int len) {
  constexpr int kMaxStage = 64;
  constexpr int es = BF16 ? 2 : 4;
  const uint8_t* rows[kMaxStage];
  for (int jb = 0; jb < r.rank; jb += kMaxStage) {
    const int nj = r.rank - jb < kMaxStage ? r.rank - jb : kMaxStage;
    for (int j = 0; j < nj; j++) rows[j] = pool + r.b_rows[jb + j] + size_t(c0) * es;
    for (int t = t0; t < t1; t++) {
      const float* zt = z + size_t(t) * z_stride + jb;
      float* yt = y + size_t(t) * out + c0;
      int c = 0;
      for (; c + 32 <= len; c += 32) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int j = 0; j < nj; j++) {
          const __m512 zj = _mm512_set1_ps(zt[j]);
          a0 = _mm512_fmadd_ps(zj, load_b<BF16>(rows[j], c, 0xFFFF), a0);
          a1 = _mm512_fmadd_ps(zj, load_b<BF16>(rows[j], c + 16, 0xFFFF), a1);
        }
        _mm512_storeu_ps(yt + c, _mm512_add_ps(_mm512_loadu_ps(yt + c), a0));
        _mm512_storeu_ps(yt + c + 16, _mm512_add_ps(_mm512_loadu_ps(yt + c + 16), a1));
      }
      for (; c < len; c += 16) {
        const __mmask16 m = static_cast<__mmask16>(len - c >= 16 ? 0xFFFFu : (1u << (len - c)) - 1);
        __m512 a0 = _mm512_setzero_ps();
        for (int j = 0; j < nj; j++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(zt[j]), load_b<BF16>(rows[j], c, m), a0);
        _mm512_mask_storeu_ps(yt + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yt + c), a0));
      }
    }
  }
}
#endif

inline void expand_cols(const uint8_t* pool, const LoraRef& r, const float* z, int z_stride, int t0, int t1, float* y,
                        int out, int c0, int len) {
#if defined(__AVX512F__)
  if (r.bf16) expand_cols_t<true>(pool, r, z, z_stride, t0, t1, y, out, c0, len);
  else expand_cols_t<false>(pool, r, z, z_stride, t0, t1, y, out, c0, len);
#else
  for (int t = t0; t < t1; t++)
    for (int j = 0; j < r.rank; j++) {
      const float zj = z[size_t(t) * z_stride + j];
      float* yt = y + size_t(t) * out + c0;
      if (r.bf16) {
        const uint16_t* b = lora_row_bf16(pool, r.b_rows[j]) + c0;
#pragma omp simd
        for (int c = 0; c < len; c++) yt[c] += zj * bf16_bits(b[c]);
      } else {
        const float* b = lora_row(pool, r.b_rows[j]) + c0;
#pragma omp simd
        for (int c = 0; c < len; c++) yt[c] += zj * b[c];
      }
    }
#endif
}

// Prefetch (to L2) `bytes` from `p`.
inline void prefetch_bytes(const uint8_t* p, size_t bytes) {
  for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
}

// Prefetch (to L2) every row of an adapter's module: A rows of `in` elements, B^T rows of `out`.
inline void prefetch_module(const uint8_t* pool, const LoraRef& r, int in, int out) {
  const size_t es = r.bf16 ? 2 : 4;
  for (int j = 0; j < r.rank; j++) {
    prefetch_bytes(pool + r.a_rows[j], size_t(in) * es);
    prefetch_bytes(pool + r.b_rows[j], size_t(out) * es);
  }
}

// Many segments (a decode batch over several adapters): each thread takes a contiguous share of
// whole segments (balanced by rank x tokens over all targets) and, target after target, runs
// shrink then expand for each of its segments, reading an adapter module's A rows and then its B
// rows front to back (contiguous runs in the pool) while the next module in that chain (the next
// segment, or the next target's first one) is prefetched; no barrier separates the phases or the
// targets. Returns false when one segment is too large a share of the work to balance this way.
bool sgmv_by_segment(const uint8_t* pool, const LoraTarget* tg, int n_tg, const LoraSegment* segs, int n_segs,
                     const float* x, int in, float* z, int max_rank) {
  const int nt = omp_get_max_threads();
  if (n_segs < 2 * nt) return false;
  static thread_local std::vector<double> prefix;
  prefix.assign(size_t(n_segs) + 1, 0.0);
  double biggest = 0.0;
  for (int s = 0; s < n_segs; s++) {
    double cost = 0.0;
    for (int p = 0; p < n_tg; p++)  // +2: the rows' bytes
      cost += double(tg[p].refs[segs[s].slot].rank) * (in + tg[p].out) * (segs[s].end - segs[s].start + 2);
    prefix[s + 1] = prefix[s] + cost;
    biggest = cost > biggest ? cost : biggest;
  }
  const double total = prefix[n_segs];
  if (total == 0.0 || biggest * nt > total) return false;
  const double* pre = prefix.data();  // the caller's thread-local: the team reads it through this
#pragma omp parallel
  {
    const int n = omp_get_num_threads(), id = omp_get_thread_num();
    // Segments whose cost midpoint falls in this thread's share [id, id + 1) * total / n.
    int s0 = 0, s1 = 0;
    for (int s = 0; s < n_segs; s++) {
      const int owner = int((pre[s] + pre[s + 1]) * 0.5 * n / total);
      if (owner < id) s0 = s + 1;
      if (owner <= id) s1 = s + 1;
    }
    for (int p = 0; p < n_tg; p++) {
      const LoraTarget& t = tg[p];
      for (int s = s0; s < s1; s++) {
        if (s + 1 < s1) prefetch_module(pool, t.refs[segs[s + 1].slot], in, t.out);
        else if (p + 1 < n_tg && s0 < s1) prefetch_module(pool, tg[p + 1].refs[segs[s0].slot], in, tg[p + 1].out);
        const LoraRef& r = t.refs[segs[s].slot];
        for (int j0 = 0; j0 < r.rank; j0 += 4) shrink4(pool, r, j0, x, in, segs[s].start, segs[s].end, z, max_rank);
        if (r.rank > 0) expand_cols(pool, r, z, max_rank, segs[s].start, segs[s].end, t.y, t.out, 0, t.out);
      }
    }
  }
  return true;
}

// Few segments: the phases are split inside each segment instead (rank rows, then output columns),
// so both threads share one adapter's work: one parallel region for all targets, shrink of every
// target (target p's z at z + p * T * max_rank), a barrier, then expand with each target's output
// columns split across threads. Each thread first prefetches every row byte its share will read
// (its rank rows of A, its columns of B^T): a share is only tens of KiB and, issued one by one
// from inside the loops, its misses queued behind each other (a decode step's LoRA on one adapter
// ran 3x slower in the engine than from cache). The arithmetic per output is the same as by
// segment.
void sgmv_split(const uint8_t* pool, const LoraTarget* tg, int n_tg, const LoraSegment* segs, int n_segs,
                const float* x, int in, float* z, int max_rank) {
  const int row_blocks = (max_rank + 3) / 4;
  const long per_target = long(n_segs) * row_blocks, n_work = per_target * n_tg;
  int T = 0;
  for (int s = 0; s < n_segs; s++) T = std::max(T, segs[s].end);
  const size_t z_target = size_t(T) * max_rank;
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    // Shrink: one work item per (target, segment, 4 rank rows), a contiguous range per thread.
    const long w0 = n_work * id / nt, w1 = n_work * (id + 1) / nt;
    const auto item = [&](long w, const LoraRef*& r, const LoraSegment*& sg, int& j0) {
      const long p = w / per_target, rest = w % per_target;
      sg = &segs[rest / row_blocks];
      r = &tg[p].refs[sg->slot];
      j0 = int(rest % row_blocks) * 4;
      return p;
    };
    // Expand: a contiguous range of 16-aligned columns of each target per thread.
    const auto columns = [&](int out, int& c0, int& len) {
      const int chunk = ((out + nt - 1) / nt + 15) / 16 * 16;
      c0 = std::min(out, id * chunk);
      len = std::min(out, c0 + chunk) - c0;
    };
    for (long w = w0; w < w1; w++) {
      const LoraRef* r;
      const LoraSegment* sg;
      int j0;
      item(w, r, sg, j0);
      for (int j = j0; j < j0 + 4 && j < r->rank; j++) prefetch_bytes(pool + r->a_rows[j], size_t(in) * (r->bf16 ? 2 : 4));
    }
    for (int p = 0; p < n_tg; p++) {
      int c0, len;
      columns(tg[p].out, c0, len);
      for (int s = 0; s < n_segs && len > 0; s++) {
        const LoraRef& r = tg[p].refs[segs[s].slot];
        const size_t es = r.bf16 ? 2 : 4;
        for (int j = 0; j < r.rank; j++) prefetch_bytes(pool + r.b_rows[j] + size_t(c0) * es, size_t(len) * es);
      }
    }
    for (long w = w0; w < w1; w++) {
      const LoraRef* r;
      const LoraSegment* sg;
      int j0;
      const long p = item(w, r, sg, j0);
      if (j0 < r->rank) shrink4(pool, *r, j0, x, in, sg->start, sg->end, z + p * z_target, max_rank);
    }
#pragma omp barrier
    for (int p = 0; p < n_tg; p++) {
      int c0, len;
      columns(tg[p].out, c0, len);
      if (len > 0)
        for (int s = 0; s < n_segs; s++)
          if (tg[p].refs[segs[s].slot].rank > 0)
            expand_cols(pool, tg[p].refs[segs[s].slot], z + p * z_target, max_rank, segs[s].start, segs[s].end,
                        tg[p].y, tg[p].out, c0, len);
    }
  }
}

}  // namespace

void lora_sgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const LoraSegment* segs, int n_segs,
               const float* x, int in, float* z) {
  int max_rank = 0;
  for (int p = 0; p < n_targets; p++)
    for (int s = 0; s < n_segs; s++) max_rank = std::max(max_rank, targets[p].refs[segs[s].slot].rank);
  if (max_rank == 0) return;
  if (sgmv_by_segment(pool, targets, n_targets, segs, n_segs, x, in, z, max_rank)) return;
  sgmv_split(pool, targets, n_targets, segs, n_segs, x, in, z, max_rank);
}

void lora_bgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const int32_t* token_slot, int T,
               const float* x, int in, float* z) {
  // Per-token gather: each token is its own segment, so the work items and the expand walk are
  // exactly SGMV's with segments of one token (no allocation: the segment list is reused).
  static thread_local std::vector<LoraSegment> segs;
  segs.resize(T);
  for (int t = 0; t < T; t++) segs[t] = {t, t + 1, token_slot[t]};
  LP_ISA_NS::lora_sgmv(pool, targets, n_targets, segs.data(), T, x, in, z);
}

}  // namespace loraplex::cpu::LP_ISA_NS
