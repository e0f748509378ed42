// SwiGLU activation: act = silu(gate) * up, element-wise.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) silu_mul_kernel(const float* __restrict__ gate,  // [n]
                                                       const float* __restrict__ up,    // [n]
                                                       size_t n,
                                                       float* __restrict__ act) {      // [n]
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    // expf, not __expf: the fast intrinsic loses accuracy for large |g| and the kernel is
    // bandwidth-bound anyway.
    act[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

}  // namespace

void silu_mul(const float* gate, const float* up, size_t n, float* act, cudaStream_t stream) {
  if (n == 0) return;
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  LP_LAUNCH(silu_mul_kernel, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  check_launch("silu_mul");
}

}  // namespace loraplex::cuda
