// Query-tiled paged attention for prefill and chunked prefill (flash-attention in fp32 SIMT).
//
// One block per (query tile, head). A tile is up to kPrefillTileQ consecutive new tokens of one
// sequence; the block walks that sequence's keys in tiles of BK, staging K and V rows from their
// pages into shared memory once for all the tile's queries (vs once per query in the decode kernel),
// and keeps an online softmax (running max m, running sum l, rescaled accumulator) per query row.
// Layout inside the block: 8 threads per query row; a thread scores keys sub, sub+8, ... of each key
// tile and owns output dims sub, sub+8, ... of its row, so every row statistic is reduced over 8
// adjacent lanes with 3 shuffles. Shared rows are padded by one float so that the 8 threads of a row
// (reading 8 different K rows at the same dim) hit 8 different banks.
//
// Semantics as kernels/cpu paged_attention: causal, optional sliding window (pos - window, pos].
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

constexpr int kBQ = kPrefillTileQ;     // query rows per block
constexpr int kThreads = kBQ * 8;      // 8 threads per query row

// DPT: output dims per thread (head_dim <= 8 * DPT); BK: keys per tile (a multiple of 8, chosen so
// the staged Q, K, V tiles stay under 48 KiB of shared memory: no opt-in needed).
template <int DPT, int BK>
__global__ void __launch_bounds__(kThreads) attn_prefill_kernel(const uint8_t* __restrict__ pool,  // [pages * page_bytes]
                                                                 KvLayout L, int layer, AttnBatch B,
                                                                 const int32_t* __restrict__ tiles,  // [n_tiles, 2]
                                                                 const float* __restrict__ q,  // [T, n_heads, hd]
                                                                 int n_heads, float scale,
                                                                 float* __restrict__ out) {  // [T, n_heads, hd]
  const int tile = blockIdx.x, h = blockIdx.y;
  const int s = tiles[2 * tile], t0 = tiles[2 * tile + 1];
  const int q0 = B.query_start[s], q1 = B.query_start[s + 1];
  const int nq = imin(kBQ, q1 - t0);
  const int pos0 = B.context_lens[s] - (q1 - q0) + (t0 - q0);  // position of the tile's first query
  const int hd = L.head_dim, ld = hd + 1;
  const int g = h / (n_heads / L.n_kv_heads);
  const int32_t* bt = B.block_tables + size_t(s) * B.max_blocks;
  const size_t kv_row = size_t(L.n_kv_heads) * hd;  // floats per token in a K or V block

  LP_DYN_SMEM(float, smem);
  float* Qs = smem;               // [kBQ][ld]
  float* Ks = Qs + kBQ * ld;      // [BK][ld]
  float* Vs = Ks + BK * ld;       // [BK][ld]
  float* Ps = Vs + BK * ld;       // [kBQ][BK + 1] probabilities of the current key tile

  const int row = threadIdx.x >> 3, sub = threadIdx.x & 7;
  for (int i = threadIdx.x; i < kBQ * hd; i += kThreads) {
    const int r = i / hd, d = i - r * hd;
    Qs[r * ld + d] = r < nq ? q[(size_t(t0 + r) * n_heads + h) * hd + d] : 0.f;
  }
  const bool valid = row < nq;
  const int my_pos = pos0 + row;
  const int my_lo = B.sliding_window > 0 ? imax(0, my_pos - B.sliding_window + 1) : 0;
  const int k_lo = B.sliding_window > 0 ? imax(0, pos0 - B.sliding_window + 1) : 0;  // lowest key of any row
  const int k_hi = pos0 + nq - 1;                                                      // highest key of any row

  float m = -INFINITY, l = 0.f, acc[DPT];
#pragma unroll
  for (int i = 0; i < DPT; i++) acc[i] = 0.f;

  for (int kb = k_lo; kb <= k_hi; kb += BK) {
    __syncthreads();  // Q staged (first tile) / previous tile's K, V no longer read
    for (int i = threadIdx.x; i < BK * hd; i += kThreads) {
      const int kk = i / hd, d = i - kk * hd, j = kb + kk;
      float kv = 0.f, vv = 0.f;
      if (j <= k_hi) {
        const float* base = reinterpret_cast<const float*>(pool + size_t(bt[j / L.block_size]) * L.page_bytes) +
                            size_t(layer) * 2 * L.block_size * kv_row + size_t(j % L.block_size) * kv_row +
                            size_t(g) * hd + d;
        kv = base[0];
        vv = base[size_t(L.block_size) * kv_row];
      }
      Ks[kk * ld + d] = kv;
      Vs[kk * ld + d] = vv;
    }
    __syncthreads();

    // Scores of this thread's keys; masked ones are -inf.
    float sc[BK / 8], tmax = -INFINITY;
#pragma unroll
    for (int mi = 0; mi < BK / 8; mi++) {
      const int kk = sub + 8 * mi, j = kb + kk;
      float d = 0.f;
      for (int i = 0; i < hd; i++) d += Qs[row * ld + i] * Ks[kk * ld + i];
      const bool ok = valid && j <= my_pos && j >= my_lo && j <= k_hi;
      float s = d * scale;
      if (B.softcap > 0.f) s = tanhf(s / B.softcap) * B.softcap;  // Gemma 2: before the mask and softmax
      sc[mi] = ok ? s : -INFINITY;
      tmax = fmaxf(tmax, sc[mi]);
    }
    // Row statistics over the row's 8 lanes. Every lane of the warp takes part in each shuffle
    // (rows with nothing to attend to yet keep m = -inf and contribute p = 0).
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 2));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 4));
    const float m_new = fmaxf(m, tmax);
    const bool none = m_new == -INFINITY;
    const float alpha = none ? 1.f : expf(m - m_new);  // m = -inf -> 0: nothing accumulated yet
    float psum = 0.f;
#pragma unroll
    for (int mi = 0; mi < BK / 8; mi++) {
      const float p = (none || sc[mi] == -INFINITY) ? 0.f : expf(sc[mi] - m_new);
      Ps[row * (BK + 1) + sub + 8 * mi] = p;
      psum += p;
    }
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 1);
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 2);
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 4);
    l = l * alpha + psum;
    m = m_new;
    __syncwarp();  // a row's probabilities are written and read by the same 8 lanes of one warp

#pragma unroll
    for (int di = 0; di < DPT; di++) {
      const int d = sub + 8 * di;
      if (d < hd) {
        float a = acc[di] * alpha;
        for (int kk = 0; kk < BK; kk++) a += Ps[row * (BK + 1) + kk] * Vs[kk * ld + d];
        acc[di] = a;
      }
    }
  }
  if (valid) {
    float* o = out + (size_t(t0 + row) * n_heads + h) * hd;
#pragma unroll
    for (int di = 0; di < DPT; di++) {
      const int d = sub + 8 * di;
      if (d < hd) o[d] = acc[di] / l;  // l > 0: key pos itself is always allowed
    }
  }
}

template <int DPT, int BK>
void launch(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const int32_t* tiles, int n_tiles,
            const float* q, int n_heads, float scale, float* out, cudaStream_t stream) {
  const int ld = L.head_dim + 1;
  const size_t smem = (size_t(kBQ) * ld + 2 * size_t(BK) * ld + size_t(kBQ) * (BK + 1)) * sizeof(float);
  LP_LAUNCH((attn_prefill_kernel<DPT, BK>), dim3(n_tiles, n_heads), dim3(kThreads), smem, stream, pool, L, layer, B,
            tiles, q, n_heads, scale, out);
}

}  // namespace

std::vector<int32_t> make_prefill_tiles(const int32_t* query_start, int n_seqs) {
  std::vector<int32_t> tiles;
  for (int s = 0; s < n_seqs; s++)
    for (int t = query_start[s]; t < query_start[s + 1]; t += kBQ) {
      tiles.push_back(s);
      tiles.push_back(t);
    }
  return tiles;
}

void paged_attention_prefill(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B,
                             const int32_t* tiles, int n_tiles, const float* q, int n_heads, float scale, float* out,
                             cudaStream_t stream) {
  if (n_tiles <= 0) return;
  if (n_heads > 65535) throw std::runtime_error("paged_attention_prefill: too many heads");
  // Shared memory: hd 64 -> 41 KiB, 128 -> 42 KiB, 256 -> 33 KiB.
  if (L.head_dim <= 64) launch<8, 64>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  else if (L.head_dim <= 128) launch<16, 32>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  else if (L.head_dim <= 256) launch<32, 8>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  else throw std::runtime_error("paged_attention_prefill: head_dim " + std::to_string(L.head_dim) +
                                " > 256 (use paged_attention_decode)");
  check_launch("paged_attention_prefill");
}

}  // namespace loraplex::cuda
