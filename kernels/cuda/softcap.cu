// Logit soft-capping (Gemma 2's final_logit_softcapping): x = cap * tanh(x / cap), in place.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) softcap_kernel(float* __restrict__ x,  // [n]
                                                      size_t n, float cap) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = tanhf(x[i] / cap) * cap;
}

}  // namespace

void softcap(float* x, size_t n, float cap, cudaStream_t stream) {
  if (n == 0) return;
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  LP_LAUNCH(softcap_kernel, dim3(blocks), dim3(256), 0, stream, x, n, cap);
  check_launch("softcap");
}

}  // namespace loraplex::cuda
