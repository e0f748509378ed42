// Per-query paged attention (flash-decoding with GQA head sharing).
//
// One block per (token, KV head, split[, group chunk]): the block owns the up to kDecodeMaxGroup
// query heads that share the KV head, so each K and V row is read once for all of them (the CPU
// kernel's per-(token, KV head) loop). The query's key span [lo, pos] is cut into n_splits
// partitions of decode_partition_len(span, n_splits) keys; the block walks its partition in chunks
// of kChunk keys: scores by warps (one key per warp, lanes across head_dim, one dot per head of the
// group from the same K elements, the 8 dots reduced together by warp_sum8), a per-head online
// softmax over the chunk (running max m, sum l, the accumulator rescaled by e^(m_old - m_new)), and
// the V rows summed with threads across head_dim. A partition past the query's last key is empty: its block writes (max -inf, sum 0) and
// the merge kernel skips it, so the launch does not depend on the context lengths (CUDA graphs).
//
// Semantics (identical to kernels/cpu paged_attention): the query at position p attends to keys
// j in [lo, p], lo = max(0, p - window + 1) with a sliding window, else 0; fp32 math, K/V read in
// the pool's dtype, q and out in the activation dtype. Padding sequences (context_lens 0) get zeros.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kG = kDecodeMaxGroup;
constexpr int kChunk = 64;  // keys per online-softmax step

static_assert(kG == 8, "warp_sum8 reduces 8 values");

// Sums each of the 8 values d[0..7] over the warp in 9 shuffles instead of 8 x 5: at each step the
// two halves of a lane pair exchange half of their values, so the set of values per lane halves
// while the lanes each covers doubles. Returns, on lane l, the warp sum of d[(l >> 2) & 7].
__device__ __forceinline__ float warp_sum8(const float* d, int lane) {
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
  float e[4], f[2];
#pragma unroll
  for (int i = 0; i < 4; i++)  // e[i]: value (b4 ? 4 : 0) + i over lanes {l, l ^ 16}
    e[i] = (b4 ? d[i + 4] : d[i]) + __shfl_xor_sync(0xFFFFFFFFu, b4 ? d[i] : d[i + 4], 16);
#pragma unroll
  for (int i = 0; i < 2; i++)  // f[i]: value (b4 ? 4 : 0) + (b3 ? 2 : 0) + i over 4 lanes
    f[i] = (b3 ? e[i + 2] : e[i]) + __shfl_xor_sync(0xFFFFFFFFu, b3 ? e[i] : e[i + 2], 8);
  float g = (b2 ? f[1] : f[0]) + __shfl_xor_sync(0xFFFFFFFFu, b2 ? f[0] : f[1], 4);  // 8 lanes
  g += __shfl_xor_sync(0xFFFFFFFFu, g, 2);
  g += __shfl_xor_sync(0xFFFFFFFFu, g, 1);
  return g;
}

template <int AT, int KT>
__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const uint8_t* __restrict__ pool,  // [pages * page_bytes]
                                                                KvLayout L, int layer, AttnBatch B,
                                                                const void* __restrict__ q,  // [T, n_heads, hd] AT
                                                                int n_heads, float scale, int n_splits,
                                                                float* __restrict__ ws,  // [T, n_heads, n_splits, hd + 2]
                                                                void* __restrict__ out) {  // [T, n_heads, hd] AT
  using A = Elem<AT>;
  using E = Elem<KT>;
  const int t = blockIdx.x, split = blockIdx.z;
  const int hd = L.head_dim, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / L.n_kv_heads, per_kv = (group + kG - 1) / kG;
  const int g = blockIdx.y / per_kv;                           // KV head
  const int h0 = g * group + (blockIdx.y - g * per_kv) * kG;  // first query head of this block
  const int gb = imin(kG, (g + 1) * group - h0);              // query heads of this block
  const int s = B.token_seq[t];
  const int q0 = B.query_start[s], n_new = B.query_start[s + 1] - q0;
  const int pos = B.context_lens[s] - n_new + (t - q0);

  const size_t head_off = (size_t(t) * n_heads + h0) * hd;  // q / out of head h0; heads are contiguous
  auto ws_at = [=](int hh) { return ws + ((size_t(t) * n_heads + h0 + hh) * n_splits + split) * (hd + 2); };

  int k_begin = 0, k_end = 0;  // this block's keys, [k_begin, k_end)
  if (pos >= 0) {
    const int lo = B.sliding_window > 0 ? imax(0, pos - B.sliding_window + 1) : 0;
    const int plen = decode_partition_len(pos - lo + 1, n_splits);
    k_begin = lo + split * plen;
    k_end = imin(pos + 1, k_begin + plen);
  }
  if (k_begin >= k_end) {  // padding token, or a partition past this query's keys: block-uniform
    if (ws) {
      if (threadIdx.x < gb) {
        ws_at(threadIdx.x)[hd] = -INFINITY;  // max
        ws_at(threadIdx.x)[hd + 1] = 0.f;    // sum
      }
    } else {  // n_splits == 1: only a padding token gets here
      for (int i = threadIdx.x; i < gb * hd; i += blockDim.x) A::store(static_cast<typename A::T*>(out), head_off + i, 0.f);
    }
    return;
  }
  const int32_t* bt = B.block_tables + size_t(s) * B.max_blocks;
  const size_t row = size_t(L.n_kv_heads) * hd;  // elements per token in a K or V block
  auto kv_ptr = [=](int j, int which) {
    return reinterpret_cast<const typename E::T*>(pool + size_t(bt[j / L.block_size]) * L.page_bytes) +
           size_t(layer) * 2 * L.block_size * row + size_t(which) * L.block_size * row +
           size_t(j % L.block_size) * row + size_t(g) * hd;
  };

  LP_DYN_SMEM(float, smem);
  float* qs = smem;               // [kG][hd] the group's queries (fp32)
  float* acc = qs + kG * hd;      // [kG][hd] unnormalised outputs
  float* sc = acc + kG * hd;      // [kG][kChunk] scores, then probabilities of the chunk
  __shared__ float m_s[kG], l_s[kG], alpha_s[kG];

  const typename A::T* qa = static_cast<const typename A::T*>(q);
  for (int i = threadIdx.x; i < gb * hd; i += blockDim.x) {
    qs[i] = A::load(qa, head_off + i);
    acc[i] = 0.f;
  }
  if (threadIdx.x < kG) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
  }
  __syncthreads();

  for (int c0 = k_begin; c0 < k_end; c0 += kChunk) {
    const int n = imin(kChunk, k_end - c0);
    // Scores: one warp per key, lanes across head_dim; the K elements serve every head of the group.
    for (int jj = warp; jj < n; jj += kWarps) {
      const typename E::T* kr = kv_ptr(c0 + jj, 0);
      float d[kG];
#pragma unroll
      for (int hh = 0; hh < kG; hh++) d[hh] = 0.f;
      for (int i = lane; i < hd; i += 32) {
        const float kv = E::load(kr, i);
#pragma unroll
        for (int hh = 0; hh < kG; hh++)
          if (hh < gb) d[hh] += qs[hh * hd + i] * kv;
      }
      const float v = warp_sum8(d, lane);  // the dot of head (lane >> 2), on every lane of it
      const int hh = lane >> 2;
      if ((lane & 3) == 0 && hh < gb) {
        float x = v * scale;
        if (B.softcap > 0.f) x = tanhf(x / B.softcap) * B.softcap;  // Gemma 2: before the softmax
        sc[hh * kChunk + jj] = x;
      }
    }
    __syncthreads();
    // Online softmax per head: one warp per head.
    for (int hh = warp; hh < gb; hh += kWarps) {
      float mx = -INFINITY;
      for (int jj = lane; jj < n; jj += 32) mx = fmaxf(mx, sc[hh * kChunk + jj]);
      mx = warp_max(mx);
      const float m_old = m_s[hh], m_new = fmaxf(m_old, mx);
      float sum = 0.f;
      for (int jj = lane; jj < n; jj += 32) {
        const float p = expf(sc[hh * kChunk + jj] - m_new);
        sc[hh * kChunk + jj] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        alpha_s[hh] = alpha;
        l_s[hh] = l_s[hh] * alpha + sum;
        m_s[hh] = m_new;
      }
    }
    __syncthreads();
    // Weighted V: threads across head_dim (coalesced V rows), every head of the group per element.
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float a[kG];
#pragma unroll
      for (int hh = 0; hh < kG; hh++) a[hh] = 0.f;
      for (int jj = 0; jj < n; jj++) {
        const float v = E::load(kv_ptr(c0 + jj, 1), d);
#pragma unroll
        for (int hh = 0; hh < kG; hh++)
          if (hh < gb) a[hh] += sc[hh * kChunk + jj] * v;
      }
#pragma unroll
      for (int hh = 0; hh < kG; hh++)
        if (hh < gb) acc[hh * hd + d] = acc[hh * hd + d] * alpha_s[hh] + a[hh];
    }
    __syncthreads();  // sc and alpha_s are rewritten by the next chunk
  }

  for (int i = threadIdx.x; i < gb * hd; i += blockDim.x) {
    const int hh = i / hd;
    if (ws) ws_at(hh)[i - hh * hd] = acc[i];
    else A::store(static_cast<typename A::T*>(out), head_off + i, acc[i] / l_s[hh]);
  }
  if (ws && threadIdx.x < gb) {
    ws_at(threadIdx.x)[hd] = m_s[threadIdx.x];
    ws_at(threadIdx.x)[hd + 1] = l_s[threadIdx.x];
  }
}

// Merges the non-empty partitions of one (token, head): o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s
// over the partitions with m_s > -inf; zeros when there is none (a padding token).
template <int AT>
__global__ void __launch_bounds__(kThreads) attn_merge_kernel(const float* __restrict__ ws,  // [T, n_heads, n_splits, hd + 2]
                                                               int n_heads, int hd, int n_splits,
                                                               void* __restrict__ out) {  // [T, n_heads, hd] AT
  using A = Elem<AT>;
  const size_t th = size_t(blockIdx.x) * n_heads + blockIdx.y;
  const float* w = ws + th * n_splits * (hd + 2);
  typename A::T* o = static_cast<typename A::T*>(out) + th * hd;
  float M = -INFINITY;
  for (int s = 0; s < n_splits; s++) M = fmaxf(M, w[s * (hd + 2) + hd]);
  if (M == -INFINITY) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) A::store(o, d, 0.f);
    return;
  }
  float Lsum = 0.f;
  for (int s = 0; s < n_splits; s++) {
    const float m = w[s * (hd + 2) + hd];
    if (m != -INFINITY) Lsum += expf(m - M) * w[s * (hd + 2) + hd + 1];
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < n_splits; s++) {
      const float m = w[s * (hd + 2) + hd];
      if (m != -INFINITY) a += expf(m - M) * w[s * (hd + 2) + d];  // empty partitions' acc is never read
    }
    A::store(o, d, a / Lsum);
  }
}

template <int AT, int KT>
void launch(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T, const void* q, int n_heads,
            float scale, int n_splits, float* workspace, void* out, cudaStream_t stream) {
  const int group = n_heads / L.n_kv_heads, per_kv = (group + kG - 1) / kG;
  const size_t smem = (2 * size_t(kG) * L.head_dim + size_t(kG) * kChunk) * sizeof(float);  // hd 256: 18 KiB
  allow_smem(attn_decode_kernel<AT, KT>, smem);
  LP_LAUNCH((attn_decode_kernel<AT, KT>), dim3(T, L.n_kv_heads * per_kv, n_splits), dim3(kThreads), smem, stream, pool,
            L, layer, B, q, n_heads, scale, n_splits, n_splits > 1 ? workspace : nullptr, out);
  check_launch("paged_attention_decode");
  if (n_splits > 1) {
    LP_LAUNCH((attn_merge_kernel<AT>), dim3(T, n_heads), dim3(kThreads), 0, stream, workspace, n_heads, L.head_dim,
              n_splits, out);
    check_launch("paged_attention_decode (merge)");
  }
}

}  // namespace

void paged_attention_decode(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T, const void* q,
                            int at, int n_heads, float scale, int n_splits, float* workspace, void* out,
                            cudaStream_t stream) {
  if (T <= 0) return;
  if (n_splits < 1) n_splits = 1;
  if (n_splits > 1 && !workspace) throw std::runtime_error("paged_attention_decode: workspace needed for splits > 1");
  if (L.n_kv_heads <= 0 || n_heads % L.n_kv_heads != 0)
    throw std::runtime_error("paged_attention_decode: n_heads must be a multiple of n_kv_heads");
  const long grid_y = long(L.n_kv_heads) * ((n_heads / L.n_kv_heads + kG - 1) / kG);
  if (n_heads > 65535 || grid_y > 65535 || n_splits > 65535) throw std::runtime_error("paged_attention_decode: grid too large");
  if ((at != kF32 && at != kBF16) || (L.kt != kF32 && L.kt != kBF16))
    throw std::runtime_error("paged_attention_decode: activations and KV must be F32 or BF16");
  if (at == kF32) {
    if (L.kt == kF32) launch<kF32, kF32>(pool, L, layer, B, T, q, n_heads, scale, n_splits, workspace, out, stream);
    else launch<kF32, kBF16>(pool, L, layer, B, T, q, n_heads, scale, n_splits, workspace, out, stream);
  } else {
    if (L.kt == kF32) launch<kBF16, kF32>(pool, L, layer, B, T, q, n_heads, scale, n_splits, workspace, out, stream);
    else launch<kBF16, kBF16>(pool, L, layer, B, T, q, n_heads, scale, n_splits, workspace, out, stream);
  }
}

}  // namespace loraplex::cuda
