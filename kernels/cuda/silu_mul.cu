// SwiGLU activation: act = silu(gate) * up, element-wise.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

template <int AT>
__global__ void __launch_bounds__(256) silu_mul_kernel(const void* gate_,    // [n]
                                                       const void* __restrict__ up_,    // [n]
                                                       size_t n,
                                                       void* act_) {  // may alias gate
       // [n]
  using E = Elem<AT>;
  const auto* gate = static_cast<const typename E::T*>(gate_);
  const auto* up = static_cast<const typename E::T*>(up_);
  auto* act = static_cast<typename E::T*>(act_);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = E::load(gate, i);
    // expf, not __expf: the fast intrinsic loses accuracy for large |g| and the kernel is
    // bandwidth-bound anyway.
    E::store(act, i, g / (1.0f + expf(-g)) * E::load(up, i));
  }
}

}  // namespace

void silu_mul(const void* gate, const void* up, size_t n, void* act, cudaStream_t stream, int at) {
  if (n == 0) return;
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  if (at == kBF16) LP_LAUNCH(silu_mul_kernel<kBF16>, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  else LP_LAUNCH(silu_mul_kernel<kF32>, dim3(blocks), dim3(256), 0, stream, gate, up, n, act);
  check_launch("silu_mul");
}

}  // namespace loraplex::cuda
