// Residual add x += delta (the last layer's MLP output; earlier ones are fused into rmsnorm).
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) residual_add_kernel(float* __restrict__ x,            // [n]
                                                           const float* __restrict__ delta,  // [n]
                                                           size_t n) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] += delta[i];
}

}  // namespace

void residual_add(float* x, const float* delta, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  // Grid-stride loop capped at 4096 blocks: enough to fill any current GPU.
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  LP_LAUNCH(residual_add_kernel, dim3(blocks), dim3(256), 0, stream, x, delta, n);
  check_launch("residual_add");
}

}  // namespace loraplex::cuda
