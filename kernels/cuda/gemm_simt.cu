// Base-weight GEMM without cuBLAS: y[T, N] = x[T, K] . W[N, K]^T (+ bias). x is fp32 or BF16, W is
// F32 / BF16 / F16, both converted to fp32 in registers (exactly), fp32 accumulation: the CPU
// oracle's arithmetic on the same values. y is written as fp32 or BF16 (rounded once, at the end).
//
// gemm_skinny (T <= 16, decode): the step is bound by reading W once. A block of 8 warps owns 32
// output rows (4 per warp) and one K range (its split); x[:, chunk] is staged in shared memory as
// fp32, then each lane streams 16 bytes of each of its warp's 4 rows per step (8 BF16/F16 weights,
// or 2 x 16 bytes of F32) and applies them to all T tokens: W is read exactly once per call, each
// lane keeps 4 independent 16-byte loads in flight, and each x value read from shared memory serves
// 4 rows. With few rows (N / 32 blocks cannot fill the GPU) K is split across blocks; the partial
// sums land in an fp32 workspace, and the last block of each row range to finish (a per-range
// arrival counter) adds them in split order, adds the bias and writes y: deterministic, one launch.
// Why this should run near the HBM bound: at T <= 8 the arithmetic is at most 8 FMA per weight
// (16 per 2-byte BF16 weight = 8 flop/byte: an H200's ~67 fp32 TFLOPS cover ~8 TB/s), and enough
// bytes are in flight (2 blocks x 256 threads x 64 bytes = 32 KiB per SM against ~22 KiB that
// Little's law asks of an H200 at ~600 ns). At T = 16 the SIMT FMA rate itself (16 flop/byte) is
// the limit (~4.2 TB/s at peak issue, so ~70-85% of HBM at best); tensor-core mma for that case is
// future work (see test/cuda/README.md).
// gemm_tiled (any T): 64 x 64 output tiles, K in chunks of 16 staged in shared memory (x and W
// converted while staging, so each value is converted once per tile, not once per use), 4 x 4
// outputs per thread read as float4 from k-major tiles. SIMT fp32: the fallback when cuBLAS is absent.
#include <algorithm>
#include <mutex>

#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

// ---- skinny ---------------------------------------------------------------------------------------

constexpr int kSkWarps = 8;                      // warps per block
constexpr int kSkRows = 4;                       // output rows per warp
constexpr int kSkBlockRows = kSkWarps * kSkRows;  // output rows per block (32)
constexpr int kSkSmemBudget = 32768;             // bytes of staged x per block (at the compiled T width)
constexpr int kSkMinSplitK = 512;                // columns per split at least (auto split)


// Device-scope fence and an L1-bypassing load for the split-K hand-over (no-ops on the emulator,
// which runs blocks one after another).
__device__ __forceinline__ void lp_threadfence() {
#ifndef LORAPLEX_CUDA_EMU
  __threadfence();
#endif
}
__device__ __forceinline__ float lp_ldcg(const float* p) {
#ifndef LORAPLEX_CUDA_EMU
  return __ldcg(p);
#else
  return *p;
#endif
}

// Grid (ceil(N / 32), splits); block 256; dynamic shared memory T * KC floats.
// Split s covers columns [s * kper, min(K, (s + 1) * kper)); kper % 8 == 0, KC % 256 == 0.
template <int WT, int XT, int TT, bool VEC>
__global__ void __launch_bounds__(kSkWarps * 32) gemm_skinny_kernel(const void* __restrict__ x,  // [T, K]
                                                                     int T, int K,
                                                                     const void* __restrict__ W,  // [N, K]
                                                                     int N, int kper, int KC,
                                                                     const float* __restrict__ bias,  // [N] or null
                                                                     void* __restrict__ y,  // [T, N] dtype yt
                                                                     int yt,
                                                                     float* __restrict__ ws,  // [splits, T, N]
                                                                     int* __restrict__ counters) {  // [gridDim.x]
  LP_DYN_SMEM(float, xs);  // [T][KC]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kSkWarps + warp) * kSkRows;
  const int ks = blockIdx.y * kper, ke = imin(K, ks + kper);
  const bool active = n0 < N;  // warp-uniform
  const auto* xe = static_cast<const typename Elem<XT>::T*>(x);
  float acc[kSkRows][TT];
#pragma unroll
  for (int r = 0; r < kSkRows; r++)
#pragma unroll
    for (int t = 0; t < TT; t++) acc[r][t] = 0.f;

  for (int c0 = ks; c0 < ke; c0 += KC) {
    const int kc = imin(KC, ke - c0);
    __syncthreads();  // the previous chunk is consumed
    // Stage x[:, c0 : c0 + kc) as fp32, zero beyond kc (the compute loop reads whole 8-column groups).
    if (VEC) {  // kc % 8 == 0 and x rows 16-byte aligned: one 16-byte (BF16) / 2 x 16-byte (F32) load per 8
      const int groups = KC / 8;
      for (int g = threadIdx.x; g < T * groups; g += kSkWarps * 32) {
        const int t = g / groups, kk = (g - t * groups) * 8;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (kk < kc) load8<XT>(x, size_t(t) * K + c0 + kk, v);
        float4* dst = reinterpret_cast<float4*>(xs + t * KC + kk);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    } else {
      for (int i = threadIdx.x; i < T * KC; i += kSkWarps * 32) {
        const int t = i / KC, kk = i - t * KC;
        xs[i] = kk < kc ? Elem<XT>::load(xe, size_t(t) * K + c0 + kk) : 0.f;
      }
    }
    __syncthreads();
    if (!active) continue;
    for (int kk = lane * 8; kk < kc; kk += 32 * 8) {
      float w[kSkRows][8];
#pragma unroll
      for (int r = 0; r < kSkRows; r++) {
        const int n = n0 + r;
        const size_t at = size_t(n) * K + c0 + kk;
        if (n < N && VEC) {
          load8<WT>(W, at, w[r]);
        } else {
#pragma unroll
          for (int e = 0; e < 8; e++) w[r][e] = n < N && kk + e < kc ? load_w(W, WT, at + e) : 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < TT; t++) {
        if (t < T) {
          // kk + 8 <= KC (KC % 256 == 0), and columns past kc are zero in xs.
          const float4 a = *reinterpret_cast<const float4*>(xs + t * KC + kk);
          const float4 b = *reinterpret_cast<const float4*>(xs + t * KC + kk + 4);
#pragma unroll
          for (int r = 0; r < kSkRows; r++)
            acc[r][t] += w[r][0] * a.x + w[r][1] * a.y + w[r][2] * a.z + w[r][3] * a.w + w[r][4] * b.x +
                         w[r][5] * b.y + w[r][6] * b.z + w[r][7] * b.w;
        }
      }
    }
  }
  const bool direct = gridDim.y == 1;
  if (active) {
#pragma unroll
    for (int r = 0; r < kSkRows; r++) {
      const int n = n0 + r;
#pragma unroll
      for (int t = 0; t < TT; t++) {
        if (t < T) {  // T is uniform: the whole warp shuffles or none of it
          const float v = warp_sum(acc[r][t]);
          if (lane == 0 && n < N) {
            if (direct) store_as(y, yt, size_t(t) * N + n, v + (bias ? bias[n] : 0.f));
            else ws[(size_t(blockIdx.y) * T + t) * N + n] = v;
          }
        }
      }
    }
  }
  if (direct) return;  // grid-uniform
  // Split-K hand-over (the threadFenceReduction pattern): publish this split's partial sums, count
  // the arrival; the last split of this row range to arrive sums all of them in split order (so the
  // bits do not depend on which block came last), adds the bias, writes y and re-arms the counter.
  __shared__ int last;
  lp_threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;  // block-uniform
  lp_threadfence();
  const int r0 = blockIdx.x * kSkBlockRows, rows = imin(kSkBlockRows, N - r0);
  for (int i = threadIdx.x; i < T * rows; i += kSkWarps * 32) {
    const int t = i / rows, n = r0 + (i - t * rows);
    float sum = 0.f;
    for (int p = 0; p < int(gridDim.y); p++) sum += lp_ldcg(ws + (size_t(p) * T + t) * N + n);
    store_as(y, yt, size_t(t) * N + n, sum + (bias ? bias[n] : 0.f));
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

int sm_count() {
  static const int n = [] {
    int dev = 0;
    cudaDeviceProp p{};
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&p, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return 1;
    }
    return p.multiProcessorCount > 0 ? p.multiProcessorCount : 1;
  }();
  return n;
}

// Columns per split (a multiple of 8) for the split count asked.
int split_cols(int K, int splits) { return (ceil_div(K, splits) + 7) / 8 * 8; }

// The process-wide split-K workspace (fp32 partial sums) and arrival counters. A buffer once handed
// out is never freed (growing retires it), so CUDA graphs captured with it keep a valid pointer and
// no queued launch can lose it. Sizes stay small (splits x T x N floats; auto splits only where N
// is small: ~1 MiB for a 4096-row projection at T = 16), and growth is geometric. The counters (one
// int per 32-row range) start at zero and every split launch leaves them at zero; a new counter
// array is zeroed with a device sync once, when it is allocated (hence gemm_skinny_reserve).
struct SkinnyWorkspace {
  float* ws;
  int* counters;
};
std::mutex g_ws_mu;
float* g_ws = nullptr;
size_t g_ws_floats = 0;
int* g_cnt = nullptr;
size_t g_cnt_n = 0;
std::vector<void*> g_ws_retired;

SkinnyWorkspace skinny_workspace(size_t floats, size_t counters) {
  std::lock_guard<std::mutex> lk(g_ws_mu);
  if (floats > g_ws_floats) {
    const size_t n = std::max(floats, 2 * g_ws_floats);
    float* p = nullptr;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(float)),
               "gemm_skinny: cudaMalloc of the split-K workspace");
    if (g_ws) g_ws_retired.push_back(g_ws);  // launches queued or captured may still use it
    g_ws = p;
    g_ws_floats = n;
  }
  if (counters > g_cnt_n) {
    const size_t n = std::max(counters, 2 * g_cnt_n);
    int* p = nullptr;
    check_cuda(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(int)), "gemm_skinny: cudaMalloc of split-K counters");
    check_cuda(cudaMemset(p, 0, n * sizeof(int)), "gemm_skinny: zeroing split-K counters");
    check_cuda(cudaDeviceSynchronize(), "gemm_skinny: zeroing split-K counters");
    if (g_cnt) g_ws_retired.push_back(g_cnt);
    g_cnt = p;
    g_cnt_n = n;
  }
  return {g_ws, g_cnt};
}

template <int WT, int XT, int TT, bool VEC>
void skinny_launch(const void* x, int T, int K, const void* W, int N, const float* bias, void* y, int yt, int splits,
                   cudaStream_t stream) {
  const int kper = split_cols(K, splits);
  // Staged chunk: as many columns as fit the budget at this width, at most the split's range.
  const int kc_budget = kSkSmemBudget / (TT * 4) / 256 * 256;
  const int KC = std::min(kc_budget, (kper + 255) / 256 * 256);
  const dim3 grid(ceil_div(N, kSkBlockRows), splits);
  const SkinnyWorkspace w = splits > 1 ? skinny_workspace(size_t(splits) * T * N, grid.x) : SkinnyWorkspace{nullptr, nullptr};
  LP_LAUNCH((gemm_skinny_kernel<WT, XT, TT, VEC>), grid, dim3(kSkWarps * 32), size_t(T) * KC * sizeof(float), stream, x,
            T, K, W, N, kper, KC, bias, y, yt, w.ws, w.counters);
}

template <int WT, int XT>
void skinny_t(const void* x, int T, int K, const void* W, int N, const float* bias, void* y, int yt, int splits,
              cudaStream_t stream) {
  // 16-byte loads need K % 8 == 0 (row starts of W stay 16-byte aligned); other K: scalar loads.
  if (K % 8 != 0) return skinny_launch<WT, XT, 16, false>(x, T, K, W, N, bias, y, yt, splits, stream);
  // Round T up to a compiled width; rows t >= T are skipped inside.
  if (T <= 1) skinny_launch<WT, XT, 1, true>(x, T, K, W, N, bias, y, yt, splits, stream);
  else if (T <= 2) skinny_launch<WT, XT, 2, true>(x, T, K, W, N, bias, y, yt, splits, stream);
  else if (T <= 4) skinny_launch<WT, XT, 4, true>(x, T, K, W, N, bias, y, yt, splits, stream);
  else if (T <= 8) skinny_launch<WT, XT, 8, true>(x, T, K, W, N, bias, y, yt, splits, stream);
  else skinny_launch<WT, XT, 16, true>(x, T, K, W, N, bias, y, yt, splits, stream);
}

template <int WT>
void skinny_x(const void* x, int xt, int T, int K, const void* W, int N, const float* bias, void* y, int yt, int splits,
              cudaStream_t stream) {
  if (xt == kF32) skinny_t<WT, kF32>(x, T, K, W, N, bias, y, yt, splits, stream);
  else skinny_t<WT, kBF16>(x, T, K, W, N, bias, y, yt, splits, stream);
}

// ---- tiled ----------------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kBK = 16;

// 4 consecutive 16-bit values (8 bytes) unpacked to fp32.
template <int DT>
__device__ __forceinline__ void unpack4(const void* p, size_t at, float* out) {
  const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + at);
  float w8[8];
  unpack8<DT>(make_uint4(u.x, u.y, 0u, 0u), w8);
  out[0] = w8[0], out[1] = w8[1], out[2] = w8[2], out[3] = w8[3];
}

template <int DT>
__device__ __forceinline__ void load4(const void* p, size_t at, float* out) {
  if (DT == kF32) {
    const float4 v = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + at);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    unpack4<DT>(p, at, out);
  }
}

template <int WT, int XT, bool VEC>
__global__ void __launch_bounds__(256) gemm_tiled_kernel(const void* __restrict__ x,  // [T, K] dtype XT
                                                         int T, int K,
                                                         const void* __restrict__ W,  // [N, K]
                                                         int N,
                                                         const float* __restrict__ bias,  // [N] or null
                                                         void* __restrict__ y,  // [T, N] dtype yt
                                                         int yt) {
  __shared__ __align__(16) float As[kBK][kBM];  // x tile (fp32), k-major
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
    if (VEC) {  // K % 4 == 0: the 4 values are all in bounds or all out (8- or 16-byte aligned)
      const bool kin = k < K;
      if (xm < T && kin) load4<XT>(x, size_t(xm) * K + k, xv);
      else xv[0] = xv[1] = xv[2] = xv[3] = 0.f;
      if (wn < N && kin) load4<WT>(W, size_t(wn) * K + k, wv);
      else wv[0] = wv[1] = wv[2] = wv[3] = 0.f;
    } else {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        xv[e] = xm < T && k + e < K ? load_as(x, XT, size_t(xm) * K + k + e) : 0.f;
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
      if (n < N) store_as(y, yt, size_t(m) * N + n, acc[i][j] + (bias ? bias[n] : 0.f));
    }
  }
}

template <int WT, int XT>
void tiled(const void* x, int T, int K, const void* W, int N, const float* bias, void* y, int yt, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, kBN), ceil_div(T, kBM));
  if (K % 4 == 0) LP_LAUNCH((gemm_tiled_kernel<WT, XT, true>), grid, dim3(256), 0, stream, x, T, K, W, N, bias, y, yt);
  else LP_LAUNCH((gemm_tiled_kernel<WT, XT, false>), grid, dim3(256), 0, stream, x, T, K, W, N, bias, y, yt);
}

template <int WT>
void tiled_x(const void* x, int xt, int T, int K, const void* W, int N, const float* bias, void* y, int yt,
             cudaStream_t stream) {
  if (xt == kF32) tiled<WT, kF32>(x, T, K, W, N, bias, y, yt, stream);
  else tiled<WT, kBF16>(x, T, K, W, N, bias, y, yt, stream);
}

void check_args(const char* what, int xt, int T, int K, int N, int wt, int yt) {
  if (T < 0 || K <= 0 || N <= 0 || wt < kF32 || wt > kF16 || (xt != kF32 && xt != kBF16) || (yt != kF32 && yt != kBF16))
    throw std::runtime_error(std::string(what) + ": bad shape or dtype (T=" + std::to_string(T) + " K=" +
                             std::to_string(K) + " N=" + std::to_string(N) + " xt=" + std::to_string(xt) + " wt=" +
                             std::to_string(wt) + " yt=" + std::to_string(yt) + ")");
}

}  // namespace

int gemm_skinny_splits(int T, int K, int N, int split_k) {
  int want = split_k;
  if (want <= 0) {
    // Aim for ~3 blocks per SM (2 resident at ~100 registers a thread, plus the tail); each split
    // keeps >= 512 columns (1 KiB of BF16 per row and lane group) and there are at most 16.
    const int blocks = ceil_div(N, kSkBlockRows), target = 3 * sm_count();
    want = blocks >= target ? 1 : ceil_div(target, blocks);
    want = std::min(want, std::max(1, K / kSkMinSplitK));
    want = std::min(want, 16);
  }
  want = std::max(1, std::min({want, ceil_div(K, 8), 65535}));  // grid.y <= 65535
  return ceil_div(K, split_cols(K, want));  // no empty split
}

void gemm_skinny_reserve(int T, int K, int N, int split_k) {
  if (T <= 0 || K <= 0 || N <= 0) return;
  const int s = gemm_skinny_splits(T, K, N, split_k);
  if (s > 1) skinny_workspace(size_t(s) * T * N, size_t(ceil_div(N, kSkBlockRows)));
}

void gemm_skinny(const void* x, int xt, int T, int K, const void* W, int wt, int N, const float* bias, void* y, int yt,
                 cudaStream_t stream, int split_k) {
  check_args("gemm_skinny", xt, T, K, N, wt, yt);
  if (T == 0) return;
  if (T > kSkinnyMaxT) throw std::runtime_error("gemm_skinny: T > kSkinnyMaxT (16)");
  const int splits = gemm_skinny_splits(T, K, N, split_k);
  if (wt == kF32) skinny_x<kF32>(x, xt, T, K, W, N, bias, y, yt, splits, stream);
  else if (wt == kBF16) skinny_x<kBF16>(x, xt, T, K, W, N, bias, y, yt, splits, stream);
  else skinny_x<kF16>(x, xt, T, K, W, N, bias, y, yt, splits, stream);
  check_launch("gemm_skinny");
}

void gemm_tiled(const void* x, int xt, int T, int K, const void* W, int wt, int N, const float* bias, void* y, int yt,
                cudaStream_t stream) {
  check_args("gemm_tiled", xt, T, K, N, wt, yt);
  if (T == 0) return;
  if (ceil_div(T, kBM) > 65535) throw std::runtime_error("gemm_tiled: T too large");
  if (wt == kF32) tiled_x<kF32>(x, xt, T, K, W, N, bias, y, yt, stream);
  else if (wt == kBF16) tiled_x<kBF16>(x, xt, T, K, W, N, bias, y, yt, stream);
  else tiled_x<kF16>(x, xt, T, K, W, N, bias, y, yt, stream);
  check_launch("gemm_tiled");
}

}  // namespace loraplex::cuda
