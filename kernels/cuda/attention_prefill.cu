// Query-tiled paged attention for prefill and chunked prefill: flash-attention in fp32 SIMT (F32
// activations, or head_dim not a multiple of 16), and on BF16 tensor cores (wmma) for BF16
// activations (the second half of this file).
//
// SIMT kernel: one block per (query tile, head). A tile is up to kPrefillTileQ consecutive new
// tokens of one sequence; the block walks that sequence's keys in tiles of BK, staging K and V rows
// from their pages into shared memory once for all the tile's queries (vs once per query in decode),
// and keeps an online softmax (running max m, running sum l, rescaled accumulator) per query row.
// Layout inside the block: 8 threads per query row; a thread scores keys sub, sub+8, ... of each key
// tile and owns output dims sub, sub+8, ... of its row, so every row statistic is reduced over 8
// adjacent lanes with 3 shuffles. Shared rows are padded by one float so that the 8 threads of a row
// (reading 8 different K rows at the same dim) hit 8 different banks.
//
// Semantics as kernels/cpu paged_attention: causal, optional sliding window (pos - window, pos],
// soft-capping; padding sequences (context_lens 0) get zeros without their block table being read.
#include "kernels/cuda/launchers.cuh"

#ifndef LORAPLEX_CUDA_EMU
#include <mma.h>
#endif

namespace loraplex::cuda {

namespace {

constexpr int kBQ = kPrefillTileQ;     // query rows per block
constexpr int kThreads = kBQ * 8;      // 8 threads per query row

// DPT: output dims per thread (head_dim <= 8 * DPT); BK: keys per tile (a multiple of 8, chosen so
// the staged Q, K, V tiles stay under 48 KiB of shared memory: no opt-in needed).
template <int AT, int KT, int DPT, int BK>
__global__ void __launch_bounds__(kThreads) attn_prefill_kernel(const uint8_t* __restrict__ pool,  // [pages * page_bytes]
                                                                 KvLayout L, int layer, AttnBatch B,
                                                                 const int32_t* __restrict__ tiles,  // [n_tiles, 2]
                                                                 const void* __restrict__ qv,  // [T, n_heads, hd] AT
                                                                 int n_heads, float scale,
                                                                 void* __restrict__ outv) {  // [T, n_heads, hd] AT
  using A = Elem<AT>;
  using E = Elem<KT>;
  const typename A::T* q = static_cast<const typename A::T*>(qv);
  typename A::T* out = static_cast<typename A::T*>(outv);
  const int tile = blockIdx.x, h = blockIdx.y;
  const int s = tiles[2 * tile], t0 = tiles[2 * tile + 1];
  const int q0 = B.query_start[s], q1 = B.query_start[s + 1];
  const int nq = imin(kBQ, q1 - t0);
  const int pos0 = B.context_lens[s] - (q1 - q0) + (t0 - q0);  // position of the tile's first query
  const int hd = L.head_dim, ld = hd + 1;
  const int g = h / (n_heads / L.n_kv_heads);
  const int32_t* bt = B.block_tables + size_t(s) * B.max_blocks;
  const size_t kv_row = size_t(L.n_kv_heads) * hd;  // elements per token in a K or V block
  if (B.context_lens[s] == 0) {  // padding sequence: zeros (block-uniform)
    for (int i = threadIdx.x; i < nq * hd; i += kThreads) {
      const int r = i / hd, d = i - r * hd;
      A::store(out, (size_t(t0 + r) * n_heads + h) * hd + d, 0.f);
    }
    return;
  }

  LP_DYN_SMEM(float, smem);
  float* Qs = smem;               // [kBQ][ld]
  float* Ks = Qs + kBQ * ld;      // [BK][ld]
  float* Vs = Ks + BK * ld;       // [BK][ld]
  float* Ps = Vs + BK * ld;       // [kBQ][BK + 1] probabilities of the current key tile

  const int row = threadIdx.x >> 3, sub = threadIdx.x & 7;
  for (int i = threadIdx.x; i < kBQ * hd; i += kThreads) {
    const int r = i / hd, d = i - r * hd;
    Qs[r * ld + d] = r < nq ? A::load(q, (size_t(t0 + r) * n_heads + h) * hd + d) : 0.f;
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
        const typename E::T* base =
            reinterpret_cast<const typename E::T*>(pool + size_t(bt[j / L.block_size]) * L.page_bytes) +
            size_t(layer) * 2 * L.block_size * kv_row + size_t(j % L.block_size) * kv_row + size_t(g) * hd + d;
        kv = E::load(base, 0);
        vv = E::load(base, size_t(L.block_size) * kv_row);
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
    typename A::T* o = out + (size_t(t0 + row) * n_heads + h) * hd;
#pragma unroll
    for (int di = 0; di < DPT; di++) {
      const int d = sub + 8 * di;
      if (d < hd) A::store(o, d, acc[di] / l);  // l > 0: key pos itself is always allowed
    }
  }
}

template <int AT, int KT, int DPT, int BK>
void launch(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const int32_t* tiles, int n_tiles,
            const void* q, int n_heads, float scale, void* out, cudaStream_t stream) {
  const int ld = L.head_dim + 1;
  const size_t smem = (size_t(kBQ) * ld + 2 * size_t(BK) * ld + size_t(kBQ) * (BK + 1)) * sizeof(float);
  LP_LAUNCH((attn_prefill_kernel<AT, KT, DPT, BK>), dim3(n_tiles, n_heads), dim3(kThreads), smem, stream, pool, L, layer,
            B, tiles, q, n_heads, scale, out);
}

template <int AT, int KT>
void launch_simt(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const int32_t* tiles,
                 int n_tiles, const void* q, int n_heads, float scale, void* out, cudaStream_t stream) {
  // Shared memory: hd 64 -> 41 KiB, 128 -> 42 KiB, 256 -> 33 KiB.
  if (L.head_dim <= 64) launch<AT, KT, 8, 64>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  else if (L.head_dim <= 128) launch<AT, KT, 16, 32>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  else launch<AT, KT, 32, 8>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
}

// ------------------------------------------------------------------------------------------------
// Tensor-core kernel (BF16 activations, head_dim % 16 == 0, <= 256), FlashAttention-2 style.
//
// One block per (query tile, KV head, chunk of up to kWarpsMax query heads of that KV head's group);
// warp w owns query head w of the chunk: its 16 query rows (the tile) against each key tile of kWBK
// keys. Per key tile: the block stages K and V (BF16, converted from fp32 pages while staging) in
// shared memory once for all its heads; each warp computes S = Q K^T (16 x kWBK) with
// 16x16x16 BF16 wmma into fp32 shared memory, runs the online softmax over S in SIMT (two lanes per
// row, 16 keys each: scale, soft-cap, causal / window mask, running max and sum, O rescaled by
// e^(m_old - m_new)), writes P rounded to BF16 (the sum l adds the rounded values, so the weights
// are normalised by exactly what multiplies V), and accumulates O += P V with wmma, O held in fp32
// shared memory (loaded into the accumulator fragment, updated, stored back). The kernel never
// depends on which fragment elements a lane holds.
// Shared tiles: row strides padded (BF16 rows + 8 elements, fp32 rows + 4) against bank conflicts
// while keeping wmma's rules (ldm a multiple of 16 bytes, every fragment pointer 32-byte aligned).

constexpr int kWBK = 32;       // keys per tile
constexpr int kWarpsMax = 4;   // query heads (warps) per block

struct WmmaSmem {  // byte offsets of the shared tiles; every region 128-byte aligned
  int ldh, ldo, lds, ldp;
  size_t k, v, warp0, per_warp, q, o, s, p, total;
  __host__ __device__ WmmaSmem(int hd, int n_warps) {
    ldh = hd + 8;       // BF16 K, V, Q rows
    ldo = hd + 4;       // fp32 O rows
    lds = kWBK + 4;     // fp32 S rows
    ldp = kWBK + 8;     // BF16 P rows
    auto up = [](size_t b) { return (b + 127) / 128 * 128; };
    k = 0;
    v = up(size_t(kWBK) * ldh * 2);
    warp0 = v + up(size_t(kWBK) * ldh * 2);
    q = 0;
    o = up(size_t(16) * ldh * 2);
    s = o + up(size_t(16) * ldo * 4);
    p = s + up(size_t(16) * lds * 4);
    per_warp = p + up(size_t(16) * ldp * 2);
    total = warp0 + per_warp * n_warps;
  }
};

template <int KT>
__global__ void __launch_bounds__(kWarpsMax * 32) attn_prefill_wmma_kernel(
    const uint8_t* __restrict__ pool,  // [pages * page_bytes]
    KvLayout L, int layer, AttnBatch B,
    const int32_t* __restrict__ tiles,  // [n_tiles, 2]
    const uint16_t* __restrict__ q,     // [T, n_heads, hd] BF16
    int n_heads, float scale,
    uint16_t* __restrict__ out) {       // [T, n_heads, hd] BF16
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // BF16 wmma needs sm_80
#else
  namespace wmma = nvcuda::wmma;
  using E = Elem<KT>;
  const int tile = blockIdx.x, g = blockIdx.y;
  const int n_warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group = n_heads / L.n_kv_heads;
  const int hi = blockIdx.z * n_warps + warp;  // this warp's head within the group
  const bool active = hi < group;              // warp-uniform
  const int h = g * group + hi;
  const int s = tiles[2 * tile], t0 = tiles[2 * tile + 1];
  const int q0 = B.query_start[s], q1 = B.query_start[s + 1];
  const int nq = imin(kBQ, q1 - t0);
  const int hd = L.head_dim;
  const int r = lane >> 1, half = lane & 1;  // softmax / output: row r, keys (dims) of this half
  if (B.context_lens[s] == 0) {              // padding sequence: zeros (block-uniform)
    if (active && r < nq)
      for (int d = half; d < hd; d += 2) out[(size_t(t0 + r) * n_heads + h) * hd + d] = 0;
    return;
  }
  const int pos0 = B.context_lens[s] - (q1 - q0) + (t0 - q0);
  const int32_t* bt = B.block_tables + size_t(s) * B.max_blocks;
  const size_t kv_row = size_t(L.n_kv_heads) * hd;

  const WmmaSmem lay(hd, n_warps);
#ifndef LORAPLEX_CUDA_EMU
  extern __shared__ __align__(128) unsigned char lp_smem_wmma[];  // wmma tiles: 32-byte alignment at least
  unsigned char* smem = lp_smem_wmma;
#else
  LP_DYN_SMEM(unsigned char, smem);
#endif
  uint16_t* Ks = reinterpret_cast<uint16_t*>(smem + lay.k);  // [kWBK][ldh]
  uint16_t* Vs = reinterpret_cast<uint16_t*>(smem + lay.v);  // [kWBK][ldh]
  unsigned char* wbase = smem + lay.warp0 + lay.per_warp * warp;
  uint16_t* Qw = reinterpret_cast<uint16_t*>(wbase + lay.q);  // [16][ldh]
  float* Ow = reinterpret_cast<float*>(wbase + lay.o);        // [16][ldo]
  float* Sw = reinterpret_cast<float*>(wbase + lay.s);        // [16][lds]
  uint16_t* Pw = reinterpret_cast<uint16_t*>(wbase + lay.p);  // [16][ldp]
  const int ldh = lay.ldh, ldo = lay.ldo, lds = lay.lds, ldp = lay.ldp;

  if (active)
    for (int i = lane; i < 16 * hd; i += 32) {
      const int rr = i / hd, d = i - rr * hd;
      Qw[rr * ldh + d] = rr < nq ? q[(size_t(t0 + rr) * n_heads + h) * hd + d] : uint16_t(0);
      Ow[rr * ldo + d] = 0.f;
    }
  const int my_pos = pos0 + r;
  const int my_lo = B.sliding_window > 0 ? imax(0, my_pos - B.sliding_window + 1) : 0;
  const bool valid = r < nq;
  const int k_lo = B.sliding_window > 0 ? imax(0, pos0 - B.sliding_window + 1) : 0;  // lowest key of any row
  const int k_hi = pos0 + nq - 1;                                                      // highest key of any row
  float m = -INFINITY, l = 0.f;  // statistics of row r (both lanes of the row hold them)

  for (int kb = k_lo; kb <= k_hi; kb += kWBK) {
    __syncthreads();  // previous tile's K, V no longer read
    for (int i = threadIdx.x; i < kWBK * hd; i += blockDim.x) {
      const int kk = i / hd, d = i - kk * hd, j = kb + kk;
      uint16_t kx = 0, vx = 0;  // keys past k_hi: zeros (P is 0 there; NaN pages must not reach the mma)
      if (j <= k_hi) {
        const typename E::T* base =
            reinterpret_cast<const typename E::T*>(pool + size_t(bt[j / L.block_size]) * L.page_bytes) +
            size_t(layer) * 2 * L.block_size * kv_row + size_t(j % L.block_size) * kv_row + size_t(g) * hd + d;
        if (KT == kBF16) {
          kx = uint16_t(base[0]);
          vx = uint16_t(base[size_t(L.block_size) * kv_row]);
        } else {
          kx = f32_to_bf16_bits(float(base[0]));
          vx = f32_to_bf16_bits(float(base[size_t(L.block_size) * kv_row]));
        }
      }
      Ks[kk * ldh + d] = kx;
      Vs[kk * ldh + d] = vx;
    }
    __syncthreads();
    if (!active) continue;

    // S = Q K^T: K staged [key][d] is K^T in column-major. Each Q fragment serves every key chunk.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[kWBK / 16];
#pragma unroll
      for (int jc = 0; jc < kWBK / 16; jc++) wmma::fill_fragment(sacc[jc], 0.f);
      for (int k0 = 0; k0 < hd; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const bf16_t*>(Qw + k0), ldh);
#pragma unroll
        for (int jc = 0; jc < kWBK / 16; jc++) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::col_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const bf16_t*>(Ks + jc * 16 * ldh + k0), ldh);
          wmma::mma_sync(sacc[jc], a, b, sacc[jc]);
        }
      }
#pragma unroll
      for (int jc = 0; jc < kWBK / 16; jc++) wmma::store_matrix_sync(Sw + jc * 16, sacc[jc], lds, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row r over this tile's keys half*16 .. half*16 + 15.
    float sc[16], tmax = -INFINITY;
#pragma unroll
    for (int c = 0; c < 16; c++) {
      const int kk = half * 16 + c, j = kb + kk;
      float x = Sw[r * lds + kk] * scale;
      if (B.softcap > 0.f) x = tanhf(x / B.softcap) * B.softcap;  // Gemma 2: before the mask and softmax
      const bool ok = valid && j <= my_pos && j >= my_lo && j <= k_hi;
      sc[c] = ok ? x : -INFINITY;
      tmax = fmaxf(tmax, sc[c]);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xFFFFFFFFu, tmax, 1));
    const float m_new = fmaxf(m, tmax);
    const bool none = m_new == -INFINITY;  // nothing to attend to yet in this row
    const float alpha = none ? 1.f : expf(m - m_new);
    float psum = 0.f;
#pragma unroll
    for (int c = 0; c < 16; c++) {
      const float p = (none || sc[c] == -INFINITY) ? 0.f : expf(sc[c] - m_new);
      const uint16_t pb = f32_to_bf16_bits(p);
      Pw[r * ldp + half * 16 + c] = pb;
      psum += bf16_bits_to_f32(pb);
    }
    psum += __shfl_xor_sync(0xFFFFFFFFu, psum, 1);
    l = l * alpha + psum;
    m = m_new;
    if (alpha != 1.f)
      for (int d = half; d < hd; d += 2) Ow[r * ldo + d] *= alpha;
    __syncwarp();

    // O += P V (V staged [key][d]: row-major K x N). The P fragments serve every dim chunk.
    {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major> pa[kWBK / 16];
#pragma unroll
      for (int kc = 0; kc < kWBK / 16; kc++)
        wmma::load_matrix_sync(pa[kc], reinterpret_cast<const bf16_t*>(Pw + kc * 16), ldp);
      for (int d0 = 0; d0 < hd; d0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
        wmma::load_matrix_sync(o, Ow + d0, ldo, wmma::mem_row_major);
#pragma unroll
        for (int kc = 0; kc < kWBK / 16; kc++) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::row_major> b;
          wmma::load_matrix_sync(b, reinterpret_cast<const bf16_t*>(Vs + kc * 16 * ldh + d0), ldh);
          wmma::mma_sync(o, pa[kc], b, o);
        }
        wmma::store_matrix_sync(Ow + d0, o, ldo, wmma::mem_row_major);
      }
    }
    __syncwarp();
  }
  if (active && valid) {
    uint16_t* o = out + (size_t(t0 + r) * n_heads + h) * hd;
    const float inv = 1.f / l;  // l > 0: key pos itself is always allowed
    for (int d = half; d < hd; d += 2) o[d] = f32_to_bf16_bits(Ow[r * ldo + d] * inv);
  }
#endif
}

template <int KT>
void launch_wmma(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const int32_t* tiles,
                 int n_tiles, const void* q, int n_heads, float scale, void* out, cudaStream_t stream) {
  const int group = n_heads / L.n_kv_heads;
  const int n_warps = group < kWarpsMax ? group : kWarpsMax;
  const size_t smem = WmmaSmem(L.head_dim, n_warps).total;  // hd 128, 4 warps: 112 KiB; hd 256: 145 KiB
  allow_smem(attn_prefill_wmma_kernel<KT>, smem);
  LP_LAUNCH((attn_prefill_wmma_kernel<KT>), dim3(n_tiles, L.n_kv_heads, ceil_div(group, n_warps)), dim3(32 * n_warps),
            smem, stream, pool, L, layer, B, tiles, static_cast<const uint16_t*>(q), n_heads, scale,
            static_cast<uint16_t*>(out));
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
                             const int32_t* tiles, int n_tiles, const void* q, int at, int n_heads, float scale,
                             void* out, cudaStream_t stream) {
  if (n_tiles <= 0) return;
  if (n_heads > 65535) throw std::runtime_error("paged_attention_prefill: too many heads");
  if (L.n_kv_heads <= 0 || n_heads % L.n_kv_heads != 0)
    throw std::runtime_error("paged_attention_prefill: n_heads must be a multiple of n_kv_heads");
  if ((at != kF32 && at != kBF16) || (L.kt != kF32 && L.kt != kBF16))
    throw std::runtime_error("paged_attention_prefill: activations and KV must be F32 or BF16");
  const int path = prefill_path(L.head_dim, at);
  if (path == kPrefillNone)
    throw std::runtime_error("paged_attention_prefill: head_dim " + std::to_string(L.head_dim) +
                             " > 256 (use paged_attention_decode)");
  if (path == kPrefillWmma) {
    if (L.kt == kF32) launch_wmma<kF32>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
    else launch_wmma<kBF16>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  } else if (at == kF32) {
    if (L.kt == kF32) launch_simt<kF32, kF32>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
    else launch_simt<kF32, kBF16>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  } else {
    if (L.kt == kF32) launch_simt<kBF16, kF32>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
    else launch_simt<kBF16, kBF16>(pool, L, layer, B, tiles, n_tiles, q, n_heads, scale, out, stream);
  }
  check_launch("paged_attention_prefill");
}

}  // namespace loraplex::cuda
