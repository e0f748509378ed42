// LoRA expand: y[t, :] += sum_j z[t, j] * B_a^T[j, :] for the adapter a of each token (Punica's
// BGMV / SGMV "expand"; the scale was applied by the shrink). B^T rows are fp32 rows of the unified
// pool reached through the adapter's row-offset table. Each y element is owned by one thread, so
// the read-modify-write needs no atomics.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

__device__ __forceinline__ const float* pool_row(const uint8_t* pool, int64_t off) {
  return reinterpret_cast<const float*>(pool + off);
}

// ---- BGMV: one block per (token, 512 output columns); 4 columns a thread ----------------------
// The adapter's z values and B^T row offsets are staged in shared memory 32 at a time, so the
// rank loop issues only independent pool loads (no dependent offset load per row), and narrow
// blocks spread a decode step's few tokens over more SMs.

constexpr int kBgmvThreads = 128;
constexpr int kBgmvCols = kBgmvThreads * 4;
constexpr int kStage = 32;

template <bool VEC4>
__global__ void __launch_bounds__(kBgmvThreads) expand_bgmv_kernel(const uint8_t* __restrict__ pool,
                                                                   const LoraRef* __restrict__ refs, int ref_stride,
                                                                   const int32_t* __restrict__ token_slot,  // [T]
                                                                   const float* __restrict__ z,  // [T, max_rank]
                                                                   int max_rank,
                                                                   float* __restrict__ y,  // [T, out]
                                                                   int out) {
  __shared__ float zs[kStage];
  __shared__ int64_t bo[kStage];
  const int t = blockIdx.x;
  const LoraRef r = refs[size_t(token_slot[t]) * ref_stride];
  if (r.rank == 0) return;  // block-uniform
  const float* zt = z + size_t(t) * max_rank;
  float* yt = y + size_t(t) * out;
  const int c = blockIdx.y * kBgmvCols + threadIdx.x * (VEC4 ? 4 : 1);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j0 = 0; j0 < r.rank; j0 += kStage) {
    const int n = imin(kStage, r.rank - j0);
    __syncthreads();  // the previous chunk is consumed
    if (threadIdx.x < n) {
      zs[threadIdx.x] = zt[j0 + threadIdx.x];
      bo[threadIdx.x] = r.b_rows[j0 + threadIdx.x];
    }
    __syncthreads();
    if (VEC4) {
      // 16-byte loads of each B^T row (64-byte aligned rows; out % 4 == 0).
      if (c < out) {
#pragma unroll 4
        for (int j = 0; j < n; j++) {
          const float zj = zs[j];
          const float4 b = *reinterpret_cast<const float4*>(pool_row(pool, bo[j]) + c);
          acc[0] += zj * b.x;
          acc[1] += zj * b.y;
          acc[2] += zj * b.z;
          acc[3] += zj * b.w;
        }
      }
    } else {
      for (int q = 0; q < 4; q++) {
        const int cc = blockIdx.y * kBgmvCols + q * kBgmvThreads + threadIdx.x;
        if (cc < out)
          for (int j = 0; j < n; j++) acc[q] += zs[j] * pool_row(pool, bo[j])[cc];
      }
    }
  }
  if (VEC4) {
    if (c < out) {
      float4* yp = reinterpret_cast<float4*>(yt + c);
      float4 yv = *yp;
      yv.x += acc[0];
      yv.y += acc[1];
      yv.z += acc[2];
      yv.w += acc[3];
      *yp = yv;
    }
  } else {
    for (int q = 0; q < 4; q++) {
      const int cc = blockIdx.y * kBgmvCols + q * kBgmvThreads + threadIdx.x;
      if (cc < out) yt[cc] += acc[q];
    }
  }
}

// ---- SGMV: a (tile of up to 32 tokens) x (64 columns) block GEMM over the rank -----------------

constexpr int kTileT = kSgmvTileT;  // 32 tokens
constexpr int kTileC = 64;          // output columns per block
constexpr int kBR = 32;             // rank chunk

__global__ void __launch_bounds__(256) expand_sgmv_kernel(const uint8_t* __restrict__ pool,
                                                          const LoraRef* __restrict__ refs, int ref_stride,
                                                          const int32_t* __restrict__ tiles,  // [n_tiles, 3]
                                                          const float* __restrict__ z,        // [T, max_rank]
                                                          int max_rank,
                                                          float* __restrict__ y,  // [T, out]
                                                          int out) {
  const int t0 = tiles[3 * blockIdx.x], t1 = tiles[3 * blockIdx.x + 1], slot = tiles[3 * blockIdx.x + 2];
  const LoraRef r = refs[size_t(slot) * ref_stride];
  if (r.rank == 0) return;  // block-uniform
  const int nt = t1 - t0, c0 = blockIdx.y * kTileC;

  __shared__ float Zs[kBR][kTileT + 1];  // rank-major, padded: conflict-free transposed stores
  __shared__ float Bs[kBR][kTileC];
  // Thread (ty, tx) of 16 x 16 computes tokens ty, ty + 16 and columns tx + 16 b, b < 4: a warp's
  // 16 column lanes read 16 consecutive floats of a staged B^T row.
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  float acc[2][4] = {};
  for (int j0 = 0; j0 < r.rank; j0 += kBR) {
    __syncthreads();
    for (int i = threadIdx.x; i < kTileT * kBR; i += 256) {  // z tile: lanes walk the rank
      const int tt = i / kBR, jj = i % kBR;
      Zs[jj][tt] = tt < nt && j0 + jj < r.rank ? z[size_t(t0 + tt) * max_rank + j0 + jj] : 0.f;
    }
    for (int i = threadIdx.x; i < kBR * kTileC; i += 256) {  // B^T tile: lanes walk the columns
      const int jj = i / kTileC, cc = i % kTileC;
      Bs[jj][cc] = j0 + jj < r.rank && c0 + cc < out ? pool_row(pool, r.b_rows[j0 + jj])[c0 + cc] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < kBR; jj++) {
      const float z0 = Zs[jj][ty], z1 = Zs[jj][ty + 16];
#pragma unroll
      for (int b = 0; b < 4; b++) {
        const float bv = Bs[jj][tx + 16 * b];
        acc[0][b] += z0 * bv;
        acc[1][b] += z1 * bv;
      }
    }
  }
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 4; b++) {
      const int tt = ty + 16 * a, c = c0 + tx + 16 * b;
      if (tt < nt && c < out) y[size_t(t0 + tt) * out + c] += acc[a][b];
    }
}

}  // namespace

void lora_expand_bgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* token_slot, int T,
                      const float* z, int max_rank, float* y, int out, cudaStream_t stream) {
  if (T <= 0 || max_rank <= 0 || out <= 0) return;
  if (ceil_div(out, kBgmvCols) > 65535) throw std::runtime_error("lora_expand_bgmv: output too wide");
  const dim3 grid(T, ceil_div(out, kBgmvCols));
  if (out % 4 == 0)
    LP_LAUNCH(expand_bgmv_kernel<true>, grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride, token_slot, z,
              max_rank, y, out);
  else
    LP_LAUNCH(expand_bgmv_kernel<false>, grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride, token_slot, z,
              max_rank, y, out);
  check_launch("lora_expand_bgmv");
}

void lora_expand_sgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* tiles, int n_tiles,
                      const float* z, int max_rank, float* y, int out, cudaStream_t stream) {
  if (n_tiles <= 0 || max_rank <= 0 || out <= 0) return;
  if (ceil_div(out, kTileC) > 65535) throw std::runtime_error("lora_expand_sgmv: output too wide");
  LP_LAUNCH(expand_sgmv_kernel, dim3(n_tiles, ceil_div(out, kTileC)), dim3(256), 0, stream, pool, refs, ref_stride, tiles,
            z, max_rank, y, out);
  check_launch("lora_expand_sgmv");
}

}  // namespace loraplex::cuda
