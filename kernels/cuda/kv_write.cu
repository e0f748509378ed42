// KV-cache write: this step's K and V rows into their pages, through the block tables.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) kv_write_kernel(uint8_t* __restrict__ pool,  // [num_pages * page_bytes]
                                                       KvLayout L, int layer, AttnBatch B,
                                                       const float* __restrict__ k,  // [T, n_kv, hd]
                                                       const float* __restrict__ v) {  // [T, n_kv, hd]
  const int t = blockIdx.x;
  const int s = B.token_seq[t];
  const int q0 = B.query_start[s], n_new = B.query_start[s + 1] - q0;
  const int pos = B.context_lens[s] - n_new + (t - q0);
  const int page = B.block_tables[size_t(s) * B.max_blocks + pos / L.block_size];
  const int slot = pos % L.block_size;
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;  // floats per token
  float* base = reinterpret_cast<float*>(pool + size_t(page) * L.page_bytes) +
                size_t(layer) * 2 * L.block_size * row + size_t(slot) * row;
  float* kd = base;                          // K block of this layer
  float* vd = base + size_t(L.block_size) * row;  // V block follows
  const float* ks = k + size_t(t) * row;
  const float* vs = v + size_t(t) * row;
  for (size_t i = threadIdx.x; i < row; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

}  // namespace

void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T, const float* k, const float* v,
              cudaStream_t stream) {
  if (T <= 0) return;
  LP_LAUNCH(kv_write_kernel, dim3(T), dim3(256), 0, stream, pool, L, layer, B, k, v);
  check_launch("kv_write");
}

}  // namespace loraplex::cuda
