// Per-query paged attention (flash-decoding). One block per (token, head, split): the split's keys
// are scored by warps (lanes across head_dim, so each K row is one coalesced read), softmaxed in
// shared memory, and the V rows are summed with threads across head_dim. Long contexts are cut into
// splits of kDecodePartition keys so that a batch of few sequences still has enough blocks to fill
// the GPU; a second kernel merges the splits with their (max, sum) statistics.
//
// Semantics (identical to kernels/cpu paged_attention): the query at position p attends to keys
// j in [lo, p], lo = max(0, p - window + 1) with a sliding window, else 0; fp32 throughout.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

constexpr int kThreads = 128;  // 4 warps: a 512-key partition is 128 keys per warp

__device__ __forceinline__ const float* kv_row(const uint8_t* pool, const KvLayout& L, int layer, int page, int slot,
                                               int which) {
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;
  return reinterpret_cast<const float*>(pool + size_t(page) * L.page_bytes) +
         size_t(layer) * 2 * L.block_size * row + size_t(which) * L.block_size * row + size_t(slot) * row;
}

__global__ void __launch_bounds__(kThreads) attn_decode_kernel(const uint8_t* __restrict__ pool,  // [pages * page_bytes]
                                                                KvLayout L, int layer, AttnBatch B,
                                                                const float* __restrict__ q,  // [T, n_heads, hd]
                                                                int n_heads, float scale, int n_splits,
                                                                float* __restrict__ ws,   // [T, n_heads, n_splits, hd + 2]
                                                                float* __restrict__ out) {  // [T, n_heads, hd]
  const int t = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
  const int hd = L.head_dim, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int s = B.token_seq[t];
  const int q0 = B.query_start[s], n_new = B.query_start[s + 1] - q0;
  const int pos = B.context_lens[s] - n_new + (t - q0);
  const int lo = B.sliding_window > 0 ? imax(0, pos - B.sliding_window + 1) : 0;
  const int k_begin = lo + split * kDecodePartition;
  const int k_end = imin(pos + 1, k_begin + kDecodePartition);  // exclusive; may be <= k_begin
  const int g = h / (n_heads / L.n_kv_heads);
  const int32_t* bt = B.block_tables + size_t(s) * B.max_blocks;

  LP_DYN_SMEM(float, smem);
  float* qs = smem;               // [hd]
  float* scores = smem + hd;      // [kDecodePartition]
  __shared__ float scratch[32];

  const size_t head_off = (size_t(t) * n_heads + h) * hd;
  float* ws_head = ws ? ws + ((size_t(t) * n_heads + h) * n_splits + split) * (hd + 2) : nullptr;
  if (k_begin >= k_end) {  // this split has no keys for this query (a shorter sequence): block-uniform
    if (ws_head) {
      for (int d = threadIdx.x; d < hd; d += blockDim.x) ws_head[d] = 0.f;
      if (threadIdx.x == 0) {
        ws_head[hd] = -INFINITY;  // max
        ws_head[hd + 1] = 0.f;    // sum
      }
    }
    return;
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = q[head_off + d];
  __syncthreads();

  // Scores: one warp per key, lanes across head_dim.
  for (int j = k_begin + warp; j < k_end; j += n_warps) {
    const float* kr = kv_row(pool, L, layer, bt[j / L.block_size], j % L.block_size, 0) + size_t(g) * hd;
    float d = 0.f;
    for (int i = lane; i < hd; i += 32) d += qs[i] * kr[i];
    d = warp_sum(d);
    if (lane == 0) {
      float sc = d * scale;
      if (B.softcap > 0.f) sc = tanhf(sc / B.softcap) * B.softcap;  // Gemma 2: before the softmax
      scores[j - k_begin] = sc;
    }
  }
  __syncthreads();
  const int n = k_end - k_begin;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, scores[j]);
  mx = block_max(mx, scratch);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float p = expf(scores[j] - mx);
    scores[j] = p;
    sum += p;
  }
  sum = block_sum(sum, scratch);  // its barriers also publish the probabilities written above

  // Weighted V: threads across head_dim, so each V row is read coalesced.
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < n; j++) {
      const int key = k_begin + j;
      acc += scores[j] * kv_row(pool, L, layer, bt[key / L.block_size], key % L.block_size, 1)[size_t(g) * hd + d];
    }
    if (ws_head) ws_head[d] = acc;
    else out[head_off + d] = acc / sum;
  }
  if (ws_head && threadIdx.x == 0) {
    ws_head[hd] = mx;
    ws_head[hd + 1] = sum;
  }
}

// Merges the splits of one (token, head): o = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
__global__ void __launch_bounds__(kThreads) attn_merge_kernel(const float* __restrict__ ws,  // [T, n_heads, n_splits, hd + 2]
                                                               int n_heads, int hd, int n_splits,
                                                               float* __restrict__ out) {  // [T, n_heads, hd]
  const size_t th = size_t(blockIdx.x) * n_heads + blockIdx.y;
  const float* w = ws + th * n_splits * (hd + 2);
  float M = -INFINITY;
  for (int s = 0; s < n_splits; s++) M = fmaxf(M, w[s * (hd + 2) + hd]);  // split 0 always has keys
  float L = 0.f;
  for (int s = 0; s < n_splits; s++) {
    const float m = w[s * (hd + 2) + hd];
    if (m != -INFINITY) L += expf(m - M) * w[s * (hd + 2) + hd + 1];
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < n_splits; s++) {
      const float m = w[s * (hd + 2) + hd];
      if (m != -INFINITY) acc += expf(m - M) * w[s * (hd + 2) + d];
    }
    out[th * hd + d] = acc / L;
  }
}

}  // namespace

void paged_attention_decode(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T,
                            const float* q, int n_heads, float scale, int n_splits, float* workspace, float* out,
                            cudaStream_t stream) {
  if (T <= 0) return;
  if (n_splits < 1) n_splits = 1;
  if (n_splits > 1 && !workspace) throw std::runtime_error("paged_attention_decode: workspace needed for splits > 1");
  if (n_heads > 65535 || n_splits > 65535) throw std::runtime_error("paged_attention_decode: grid too large");
  const size_t smem = (size_t(L.head_dim) + kDecodePartition) * sizeof(float);  // <= 6 KiB for hd <= 1024
  LP_LAUNCH(attn_decode_kernel, dim3(T, n_heads, n_splits), dim3(kThreads), smem, stream, pool, L, layer, B, q, n_heads,
            scale, n_splits, n_splits > 1 ? workspace : nullptr, out);
  check_launch("paged_attention_decode");
  if (n_splits > 1) {
    LP_LAUNCH(attn_merge_kernel, dim3(T, n_heads), dim3(kThreads), 0, stream, workspace, n_heads, L.head_dim, n_splits,
              out);
    check_launch("paged_attention_decode (merge)");
  }
}

}  // namespace loraplex::cuda
