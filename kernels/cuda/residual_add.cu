// Residual add x += delta (the last layer's MLP output; earlier ones are fused into rmsnorm). The
// residual stream x is fp32; delta is fp32 or BF16 (the BF16 compute path's sub-layer output).
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

template <int DT>
__global__ void __launch_bounds__(256) residual_add_kernel(float* __restrict__ x,           // [n]
                                                           const void* __restrict__ delta,  // [n]
                                                           size_t n) {
  const auto* d = static_cast<const typename Elem<DT>::T*>(delta);
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] += Elem<DT>::load(d, i);
}

}  // namespace

void residual_add(float* x, const void* delta, size_t n, cudaStream_t stream, int dt) {
  if (n == 0) return;
  // Grid-stride loop capped at 4096 blocks: enough to fill any current GPU.
  const int blocks = int(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
  if (dt == kBF16) LP_LAUNCH(residual_add_kernel<kBF16>, dim3(blocks), dim3(256), 0, stream, x, delta, n);
  else LP_LAUNCH(residual_add_kernel<kF32>, dim3(blocks), dim3(256), 0, stream, x, delta, n);
  check_launch("residual_add");
}

}  // namespace loraplex::cuda
