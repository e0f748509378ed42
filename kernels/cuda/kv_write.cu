// KV-cache write: this step's K and V rows into their pages, through the block tables, converted
// from the activation dtype to the pool's element dtype (BF16: round to nearest even, as cpu::kv_write).
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

template <int AT, int KT>
__global__ void __launch_bounds__(256) kv_write_kernel(uint8_t* __restrict__ pool,  // [num_pages * page_bytes]
                                                       KvLayout L, int layer, AttnBatch B,
                                                       const void* __restrict__ k,  // [T, n_kv, hd] dtype AT
                                                       const void* __restrict__ v) {  // [T, n_kv, hd] dtype AT
  using A = Elem<AT>;
  using E = Elem<KT>;
  const int t = blockIdx.x;
  const int s = B.token_seq[t];
  const int q0 = B.query_start[s], n_new = B.query_start[s + 1] - q0;
  const int pos = B.context_lens[s] - n_new + (t - q0);
  if (pos < 0) return;  // a padding sequence (context_lens 0): nothing to write, block table not read
  const int page = B.block_tables[size_t(s) * B.max_blocks + pos / L.block_size];
  const int slot = pos % L.block_size;
  const size_t row = size_t(L.n_kv_heads) * L.head_dim;  // elements per token
  typename E::T* base = reinterpret_cast<typename E::T*>(pool + size_t(page) * L.page_bytes) +
                        size_t(layer) * 2 * L.block_size * row + size_t(slot) * row;
  typename E::T* kd = base;                             // K block of this layer
  typename E::T* vd = base + size_t(L.block_size) * row;  // V block follows
  const typename A::T* ks = static_cast<const typename A::T*>(k) + size_t(t) * row;
  const typename A::T* vs = static_cast<const typename A::T*>(v) + size_t(t) * row;
  for (size_t i = threadIdx.x; i < row; i += blockDim.x) {
    if (AT == KT) {  // same dtype: the bits as they are
      kd[i] = reinterpret_cast<const typename E::T*>(ks)[i];
      vd[i] = reinterpret_cast<const typename E::T*>(vs)[i];
    } else {
      E::store(kd, i, A::load(ks, i));
      E::store(vd, i, A::load(vs, i));
    }
  }
}

template <int AT, int KT>
void launch(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T, const void* k, const void* v,
            cudaStream_t stream) {
  LP_LAUNCH((kv_write_kernel<AT, KT>), dim3(T), dim3(256), 0, stream, pool, L, layer, B, k, v);
}

}  // namespace

void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, int T, const void* k, const void* v,
              int at, cudaStream_t stream) {
  if (T <= 0) return;
  if ((at != kF32 && at != kBF16) || (L.kt != kF32 && L.kt != kBF16))
    throw std::runtime_error("kv_write: activations and KV must be F32 or BF16");
  if (at == kF32) {
    if (L.kt == kF32) launch<kF32, kF32>(pool, L, layer, B, T, k, v, stream);
    else launch<kF32, kBF16>(pool, L, layer, B, T, k, v, stream);
  } else {
    if (L.kt == kF32) launch<kBF16, kF32>(pool, L, layer, B, T, k, v, stream);
    else launch<kBF16, kBF16>(pool, L, layer, B, T, k, v, stream);
  }
  check_launch("kv_write");
}

}  // namespace loraplex::cuda
