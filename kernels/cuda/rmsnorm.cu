// RMSNorm with the residual add fused in front: the backend adds each sub-layer's output to the
// residual stream and normalises it in the same pass over the row, saving one read and one write
// of [T, H] per sub-layer.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(float* x,                         // [T, H]; y may alias it
                                                           const float* __restrict__ delta,  // [T, H] or null
                                                           const float* __restrict__ w,      // [H]
                                                           int H, float eps,
                                                           float* y) {  // [T, H]; may alias x
  __shared__ float scratch[32];
  float* xr = x + size_t(blockIdx.x) * H;
  float* yr = y + size_t(blockIdx.x) * H;
  const float* dr = delta ? delta + size_t(blockIdx.x) * H : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = xr[i];
    if (dr) {
      v += dr[i];
      xr[i] = v;  // each element is read back only by the thread that wrote it
    }
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  // fp32 mean of squares as HF computes it; precise sqrt and division (not rsqrtf) to stay close
  // to the CPU oracle, at no cost in a bandwidth-bound kernel.
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

}  // namespace

void rmsnorm(float* x, const float* delta, const float* w, int T, int H, float eps, float* y, cudaStream_t stream) {
  if (T <= 0) return;
  LP_LAUNCH(rmsnorm_kernel, dim3(T), dim3(kThreads), 0, stream, x, delta, w, H, eps, y);
  check_launch("rmsnorm");
}

}  // namespace loraplex::cuda
