// RMSNorm with the residual add fused in front: the backend adds each sub-layer's output to the
// residual stream and normalises it in the same pass over the row, saving one read and one write
// of [T, H] per sub-layer. Each of x, delta and y has its own dtype (fp32 or BF16): the residual
// stream is fp32, sub-layer outputs and the normalised rows are BF16 on the BF16 compute path.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

constexpr int kThreads = 256;

template <int XT, int DT, int YT>
__global__ void __launch_bounds__(kThreads) rmsnorm_kernel(void* x_,                  // [T, H]; y may alias it
                                                           const void* __restrict__ delta_,  // [T, H] or null
                                                           const float* __restrict__ w,      // [H]
                                                           int H, float eps,
                                                           void* y_) {  // [T, H]; may alias x
  using X = Elem<XT>;
  using D = Elem<DT>;
  using Y = Elem<YT>;
  __shared__ float scratch[32];
  typename X::T* xr = static_cast<typename X::T*>(x_) + size_t(blockIdx.x) * H;
  typename Y::T* yr = static_cast<typename Y::T*>(y_) + size_t(blockIdx.x) * H;
  const typename D::T* dr = delta_ ? static_cast<const typename D::T*>(delta_) + size_t(blockIdx.x) * H : nullptr;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = X::load(xr, i);
    if (dr) {
      v += D::load(dr, i);
      X::store(xr, i, v);  // each element is read back only by the thread that wrote it
      v = X::load(xr, i);  // what the stream now holds (BF16 x: the rounded sum)
    }
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  // fp32 mean of squares as HF computes it; precise sqrt and division (not rsqrtf) to stay close
  // to the CPU oracle, at no cost in a bandwidth-bound kernel.
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) Y::store(yr, i, w[i] * (X::load(xr, i) * inv));
}

template <int XT, int DT, int YT>
void launch(void* x, const void* delta, const float* w, int T, int H, float eps, void* y, cudaStream_t stream) {
  LP_LAUNCH((rmsnorm_kernel<XT, DT, YT>), dim3(T), dim3(kThreads), 0, stream, x, delta, w, H, eps, y);
}

}  // namespace

void rmsnorm(void* x, const void* delta, const float* w, int T, int H, float eps, void* y, cudaStream_t stream, int xt,
             int dt, int yt) {
  if (T <= 0) return;
  if (!delta) dt = kF32;  // unused
  const int code = (xt == kBF16) * 4 + (dt == kBF16) * 2 + (yt == kBF16);
  switch (code) {
    case 0: launch<kF32, kF32, kF32>(x, delta, w, T, H, eps, y, stream); break;
    case 1: launch<kF32, kF32, kBF16>(x, delta, w, T, H, eps, y, stream); break;
    case 2: launch<kF32, kBF16, kF32>(x, delta, w, T, H, eps, y, stream); break;
    case 3: launch<kF32, kBF16, kBF16>(x, delta, w, T, H, eps, y, stream); break;
    case 4: launch<kBF16, kF32, kF32>(x, delta, w, T, H, eps, y, stream); break;
    case 5: launch<kBF16, kF32, kBF16>(x, delta, w, T, H, eps, y, stream); break;
    case 6: launch<kBF16, kBF16, kF32>(x, delta, w, T, H, eps, y, stream); break;
    default: launch<kBF16, kBF16, kBF16>(x, delta, w, T, H, eps, y, stream); break;
  }
  check_launch("rmsnorm");
}

}  // namespace loraplex::cuda
