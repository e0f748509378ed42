// GeGLU activation (Gemma): act = gelu_tanh(gate) * up, element-wise, with the tanh approximation
// (HF's gelu_pytorch_tanh).
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

template <int AT>
__global__ void __launch_bounds__(256) gelu_tanh_mul_kernel(const void* gate_,    // [n]
                                                            const void* __restrict__ up_,    // [n]
                                                            size_t n,
                                                            void* act_) {  // may alias gate
       // [n]
  using E = Elem<AT>;
  const auto* gate = static_cast<const typename E::T*>(gate_);
  const auto* up = static_cast<const typename E::T*>(up_);
  auto* act = static_cast<typename E::T*>(act_);
  // sqrt(2/pi) and the cubic coefficient, in fp32 as PyTorch's kernel uses them.
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = E::load(gate, i);
    // tanhf (not a fast approximation): bandwidth-bound anyway, and it keeps the CPU oracle's accuracy.
    E::store(act, i, 0.5f * g * (1.0f + tanhf(beta * (g + kappa * (g * g * g)))) * E::load(up, i));
  }
}

}  // namespace

void gelu_tanh_mul(const void* gate, const void* up, size_t n, void* act, cudaStream_t stream, int at) {
  if (n == 0) return;
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  if (at == kBF16) LP_LAUNCH(gelu_tanh_mul_kernel<kBF16>, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  else LP_LAUNCH(gelu_tanh_mul_kernel<kF32>, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  check_launch("gelu_tanh_mul");
}

}  // namespace loraplex::cuda
