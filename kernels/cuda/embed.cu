// Embedding gather: one block per token copies (and converts) one row of the table.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) embed_kernel(const int32_t* __restrict__ ids,  // [T]
                                                    const void* __restrict__ table,   // [V, H] dtype wt
                                                    int wt, int H, float scale,
                                                    float* __restrict__ out) {        // [T, H]
  const int t = blockIdx.x;
  const size_t row = size_t(ids[t]) * H;
  float* o = out + size_t(t) * H;
  // Consecutive threads read consecutive elements: coalesced for every dtype.
  for (int i = threadIdx.x; i < H; i += blockDim.x) o[i] = scale == 1.0f ? load_w(table, wt, row + i) : load_w(table, wt, row + i) * scale;
}

}  // namespace

void embed(const int32_t* ids, int T, const void* table, int wt, int H, float* out, cudaStream_t stream, float scale) {
  if (T <= 0) return;
  LP_LAUNCH(embed_kernel, dim3(T), dim3(256), 0, stream, ids, table, wt, H, scale, out);
  check_launch("embed");
}

}  // namespace loraplex::cuda
