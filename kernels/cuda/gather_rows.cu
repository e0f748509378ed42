// Row gather: the last position of each sampled sequence, so the final norm and the lm_head run on
// n_sample rows instead of all T.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) gather_rows_kernel(const float* __restrict__ x,       // [T, H]
                                                          const int32_t* __restrict__ rows,  // [n]
                                                          int H,
                                                          float* __restrict__ out) {        // [n, H]
  const float* src = x + size_t(rows[blockIdx.x]) * H;
  float* dst = out + size_t(blockIdx.x) * H;
  for (int i = threadIdx.x; i < H; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

void gather_rows(const float* x, const int32_t* rows, int n, int H, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  LP_LAUNCH(gather_rows_kernel, dim3(n), dim3(256), 0, stream, x, rows, H, out);
  check_launch("gather_rows");
}

}  // namespace loraplex::cuda
