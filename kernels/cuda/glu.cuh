// Gated activations act = f(gate) * up, element-wise, for SwiGLU (silu_mul.cu) and GeGLU
// (gelu_tanh_mul.cu): one grid-stride kernel over the activation dtype (F32 or BF16: fp32 math,
// one rounding per element), the activation a functor. Internal to kernels/cuda.
#pragma once
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda::glu {

template <typename Act, int AT>
__global__ void __launch_bounds__(256) glu_kernel(const void* gate_,              // [n]
                                                  const void* __restrict__ up_,  // [n]
                                                  size_t n,
                                                  void* act_) {  // [n]; may alias gate
  using E = Elem<AT>;
  const auto* gate = static_cast<const typename E::T*>(gate_);
  const auto* up = static_cast<const typename E::T*>(up_);
  auto* act = static_cast<typename E::T*>(act_);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    E::store(act, i, Act()(E::load(gate, i)) * E::load(up, i));
}

template <typename Act>
void launch(const void* gate, const void* up, size_t n, void* act, cudaStream_t stream, int at, const char* name) {
  if (n == 0) return;
  // Grid-stride loop capped at 4096 blocks: enough to fill any current GPU.
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  if (at == kBF16) LP_LAUNCH((glu_kernel<Act, kBF16>), dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  else LP_LAUNCH((glu_kernel<Act, kF32>), dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  check_launch(name);
}

}  // namespace loraplex::cuda::glu
