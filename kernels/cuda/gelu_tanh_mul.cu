// GeGLU activation (Gemma): act = gelu_tanh(gate) * up, element-wise, with the tanh approximation
// (HF's gelu_pytorch_tanh).
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__global__ void __launch_bounds__(256) gelu_tanh_mul_kernel(const float* __restrict__ gate,  // [n]
                                                            const float* __restrict__ up,    // [n]
                                                            size_t n,
                                                            float* __restrict__ act) {      // [n]
  // sqrt(2/pi) and the cubic coefficient, in fp32 as PyTorch's kernel uses them.
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    // tanhf (not a fast approximation): bandwidth-bound anyway, and it keeps the CPU oracle's accuracy.
    act[i] = 0.5f * g * (1.0f + tanhf(beta * (g + kappa * (g * g * g)))) * up[i];
  }
}

}  // namespace

void gelu_tanh_mul(const float* gate, const float* up, size_t n, float* act, cudaStream_t stream) {
  if (n == 0) return;
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  LP_LAUNCH(gelu_tanh_mul_kernel, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  check_launch("gelu_tanh_mul");
}

}  // namespace loraplex::cuda
