// Base-weight GEMM without cuBLAS: y[T, N] = x[T, K] . W[N, K]^T (+ bias), W in F32 / BF16 / F16,
// converted to fp32 in registers (exactly), fp32 accumulation: the CPU oracle's arithmetic.
//
// gemm_skinny (T <= 8, decode): the step is bound by reading W once. One warp per output row; each
// lane loads 16 bytes of W per step (8 BF16/F16 weights or 4 F32), and applies them to all T tokens
// (x rows stay in L1: T * K * 4 bytes), so W is streamed exactly once per call.
// gemm_tiled (any T): 64 x 64 output tiles, K in chunks of 16 staged in shared memory (W converted
// while staging, so each weight is converted once per tile, not once per token), 4 x 4 outputs per
// thread read as float4 from k-major tiles. SIMT fp32: the fallback when cuBLAS is absent.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

// ---- skinny ---------------------------------------------------------------------------------------

constexpr int kSkinnyWarps = 8;  // output rows per block

// 8 consecutive weights of row n starting at column k (k % 8 == 0, K % 8 == 0).
template <int WT>
__device__ __forceinline__ void load_w8(const void* W, size_t at, float* w) {
  if (WT == kF32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(W) + at);
    const float4 a = p[0], b = p[1];
    w[0] = a.x, w[1] = a.y, w[2] = a.z, w[3] = a.w, w[4] = b.x, w[5] = b.y, w[6] = b.z, w[7] = b.w;
  } else {
    unpack8<WT>(*reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(W) + at), w);
  }
}

template <int WT, int TT, bool VEC>
__global__ void __launch_bounds__(kSkinnyWarps * 32) gemm_skinny_kernel(const float* __restrict__ x,  // [T, K]
                                                                         int T, int K,
                                                                         const void* __restrict__ W,  // [N, K]
                                                                         int N,
                                                                         const float* __restrict__ bias,  // [N] or null
                                                                         float* __restrict__ y) {  // [T, N]
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kSkinnyWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // warp-uniform
  float acc[TT];
#pragma unroll
  for (int t = 0; t < TT; t++) acc[t] = 0.f;
  const size_t row = size_t(n) * K;
  if (VEC) {
#pragma unroll 2
    for (int k = lane * 8; k < K; k += 32 * 8) {
      float w[8];
      load_w8<WT>(W, row + k, w);
#pragma unroll
      for (int t = 0; t < TT; t++) {
        if (t < T) {
          const float4* xp = reinterpret_cast<const float4*>(x + size_t(t) * K + k);
          const float4 a = xp[0], b = xp[1];
          acc[t] += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z +
                    w[7] * b.w;
        }
      }
    }
  } else {
    for (int k = lane; k < K; k += 32) {
      const float w = load_w(W, WT, row + k);
#pragma unroll
      for (int t = 0; t < TT; t++)
        if (t < T) acc[t] += w * x[size_t(t) * K + k];
    }
  }
  const float b = bias ? bias[n] : 0.f;
#pragma unroll
  for (int t = 0; t < TT; t++) {
    if (t < T) {  // T is uniform: the whole warp shuffles or none of it
      const float v = warp_sum(acc[t]);
      if (lane == 0) y[size_t(t) * N + n] = v + b;
    }
  }
}

template <int WT, int TT>
void skinny(const float* x, int T, int K, const void* W, int N, const float* bias, float* y, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, kSkinnyWarps)), block(kSkinnyWarps * 32);
  // 16-byte loads need K % 8 == 0 (row starts of W and x stay 16-byte aligned).
  if (K % 8 == 0) LP_LAUNCH((gemm_skinny_kernel<WT, TT, true>), grid, block, 0, stream, x, T, K, W, N, bias, y);
  else LP_LAUNCH((gemm_skinny_kernel<WT, TT, false>), grid, block, 0, stream, x, T, K, W, N, bias, y);
}

template <int WT>
void skinny_t(const float* x, int T, int K, const void* W, int N, const float* bias, float* y, cudaStream_t stream) {
  // Round T up to a compiled width; rows t >= T are skipped inside.
  if (T <= 1) skinny<WT, 1>(x, T, K, W, N, bias, y, stream);
  else if (T <= 2) skinny<WT, 2>(x, T, K, W, N, bias, y, stream);
  else if (T <= 4) skinny<WT, 4>(x, T, K, W, N, bias, y, stream);
  else skinny<WT, 8>(x, T, K, W, N, bias, y, stream);
}

// ---- tiled ----------------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kBK = 16;

template <int WT, bool VEC>
__global__ void __launch_bounds__(256) gemm_tiled_kernel(const float* __restrict__ x,  // [T, K]
                                                         int T, int K,
                                                         const void* __restrict__ W,  // [N, K]
                                                         int N,
                                                         const float* __restrict__ bias,  // [N] or null
                                                         float* __restrict__ y) {  // [T, N]
  __shared__ __align__(16) float As[kBK][kBM];  // x tile, k-major
  __shared__ __align__(16) float Bs[kBK][kBN];  // W tile (fp32), k-major
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  // Staging: thread -> (row lr of the tile, 4 consecutive k from lk): 4 lanes cover a 16-k chunk.
  const int lr = threadIdx.x >> 2, lk = (threadIdx.x & 3) * 4;
  const int xm = m0 + lr, wn = n0 + lr;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kBK) {
    const int k = k0 + lk;
    float xv[4], wv[4];
    if (VEC) {  // K % 4 == 0: the 4 values are all in bounds or all out
      const bool kin = k < K;
      if (xm < T && kin) {
        const float4 v = *reinterpret_cast<const float4*>(x + size_t(xm) * K + k);
        xv[0] = v.x, xv[1] = v.y, xv[2] = v.z, xv[3] = v.w;
      } else {
        xv[0] = xv[1] = xv[2] = xv[3] = 0.f;
      }
      if (wn < N && kin) {
        const size_t at = size_t(wn) * K + k;
        if (WT == kF32) {
          const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(W) + at);
          wv[0] = v.x, wv[1] = v.y, wv[2] = v.z, wv[3] = v.w;
        } else {
          const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(W) + at);
          const uint4 u4 = make_uint4(u.x, u.y, 0u, 0u);
          float w8[8];
          unpack8<WT>(u4, w8);
          wv[0] = w8[0], wv[1] = w8[1], wv[2] = w8[2], wv[3] = w8[3];
        }
      } else {
        wv[0] = wv[1] = wv[2] = wv[3] = 0.f;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        xv[e] = xm < T && k + e < K ? x[size_t(xm) * K + k + e] : 0.f;
        wv[e] = wn < N && k + e < K ? load_w(W, WT, size_t(wn) * K + k + e) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; e++) {
      As[lk + e][lr] = xv[e];
      Bs[lk + e][lr] = wv[e];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk++) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int m = m0 + ty * 4 + i;
    if (m >= T) continue;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx * 4 + j;
      if (n < N) y[size_t(m) * N + n] = acc[i][j] + (bias ? bias[n] : 0.f);
    }
  }
}

template <int WT>
void tiled(const float* x, int T, int K, const void* W, int N, const float* bias, float* y, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, kBN), ceil_div(T, kBM));
  if (K % 4 == 0) LP_LAUNCH((gemm_tiled_kernel<WT, true>), grid, dim3(256), 0, stream, x, T, K, W, N, bias, y);
  else LP_LAUNCH((gemm_tiled_kernel<WT, false>), grid, dim3(256), 0, stream, x, T, K, W, N, bias, y);
}

void check_args(const char* what, int T, int K, int N, int wt) {
  if (T < 0 || K <= 0 || N <= 0 || wt < kF32 || wt > kF16)
    throw std::runtime_error(std::string(what) + ": bad shape or dtype (T=" + std::to_string(T) + " K=" +
                             std::to_string(K) + " N=" + std::to_string(N) + " wt=" + std::to_string(wt) + ")");
}

}  // namespace

void gemm_skinny(const float* x, int T, int K, const void* W, int wt, int N, const float* bias, float* y,
                 cudaStream_t stream) {
  check_args("gemm_skinny", T, K, N, wt);
  if (T == 0) return;
  if (T > kSkinnyMaxT) throw std::runtime_error("gemm_skinny: T > 8");
  if (wt == kF32) skinny_t<kF32>(x, T, K, W, N, bias, y, stream);
  else if (wt == kBF16) skinny_t<kBF16>(x, T, K, W, N, bias, y, stream);
  else skinny_t<kF16>(x, T, K, W, N, bias, y, stream);
  check_launch("gemm_skinny");
}

void gemm_tiled(const float* x, int T, int K, const void* W, int wt, int N, const float* bias, float* y,
                cudaStream_t stream) {
  check_args("gemm_tiled", T, K, N, wt);
  if (T == 0) return;
  if (ceil_div(T, kBM) > 65535) throw std::runtime_error("gemm_tiled: T too large");
  if (wt == kF32) tiled<kF32>(x, T, K, W, N, bias, y, stream);
  else if (wt == kBF16) tiled<kBF16>(x, T, K, W, N, bias, y, stream);
  else tiled<kF16>(x, T, K, W, N, bias, y, stream);
  check_launch("gemm_tiled");
}

}  // namespace loraplex::cuda
