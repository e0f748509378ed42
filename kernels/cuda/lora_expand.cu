// LoRA expand: y[t, :] += sum_j z[t, j] * B_a^T[j, :] for the adapter a of each token (Punica's
// BGMV / SGMV "expand"; the scale was applied by the shrink). B^T rows are rows of the unified pool
// (fp32, or BF16 with --lora-dtype bfloat16) reached through the adapter's row-offset table; z is
// fp32; y is fp32 or BF16 (read, the LoRA term added in fp32, rounded once). Each y element is owned
// by one thread, so the read-modify-write needs no atomics.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

// 4 consecutive elements of dtype DT (16 or 8 bytes, aligned to that) as fp32, and back.
template <int DT>
__device__ __forceinline__ void load4(const void* p, size_t at, float* v) {
  if (DT == kF32) {
    const float4 a = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + at);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + at);
    v[0] = __uint_as_float(u.x << 16), v[1] = __uint_as_float(u.x & 0xFFFF0000u);
    v[2] = __uint_as_float(u.y << 16), v[3] = __uint_as_float(u.y & 0xFFFF0000u);
  }
}
template <int DT>
__device__ __forceinline__ void store4(void* p, size_t at, const float* v) {
  if (DT == kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + at) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    const uint32_t lo = uint32_t(f32_to_bf16_bits(v[0])) | uint32_t(f32_to_bf16_bits(v[1])) << 16;
    const uint32_t hi = uint32_t(f32_to_bf16_bits(v[2])) | uint32_t(f32_to_bf16_bits(v[3])) << 16;
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + at) = make_uint2(lo, hi);
  }
}

// ---- BGMV: one block per (token, 512 output columns); 4 columns a thread ----------------------
// The adapter's z values and B^T row offsets are staged in shared memory 32 at a time, so the
// rank loop issues only independent pool loads (no dependent offset load per row), and narrow
// blocks spread a decode step's few tokens over more SMs.

constexpr int kBgmvThreads = 128;
constexpr int kBgmvCols = kBgmvThreads * 4;
constexpr int kStage = 32;

template <int LT, int YT, bool VEC4>
__global__ void __launch_bounds__(kBgmvThreads) expand_bgmv_kernel(const uint8_t* __restrict__ pool,
                                                                   const LoraRef* __restrict__ refs, int ref_stride,
                                                                   const int32_t* __restrict__ token_slot,  // [T]
                                                                   const float* __restrict__ z,  // [T, max_rank]
                                                                   int max_rank,
                                                                   void* __restrict__ y,  // [T, out] dtype YT
                                                                   int out) {
  __shared__ float zs[kStage];
  __shared__ int64_t bo[kStage];
  const int t = blockIdx.x;
  const LoraRef r = refs[size_t(token_slot[t]) * ref_stride];
  if (r.rank == 0) return;  // block-uniform
  const float* zt = z + size_t(t) * max_rank;
  const size_t y0 = size_t(t) * out;
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
      // 16-byte (F32) / 8-byte (BF16) loads of each B^T row (64-byte aligned rows; out % 4 == 0).
      if (c < out) {
#pragma unroll 4
        for (int j = 0; j < n; j++) {
          const float zj = zs[j];
          float b[4];
          load4<LT>(pool + bo[j], c, b);
          acc[0] += zj * b[0];
          acc[1] += zj * b[1];
          acc[2] += zj * b[2];
          acc[3] += zj * b[3];
        }
      }
    } else {
      for (int q = 0; q < 4; q++) {
        const int cc = blockIdx.y * kBgmvCols + q * kBgmvThreads + threadIdx.x;
        if (cc < out)
          for (int j = 0; j < n; j++) acc[q] += zs[j] * load_as(pool + bo[j], LT, cc);
      }
    }
  }
  if (VEC4) {
    if (c < out) {
      float yv[4];
      load4<YT>(y, y0 + c, yv);
      for (int q = 0; q < 4; q++) yv[q] += acc[q];
      store4<YT>(y, y0 + c, yv);
    }
  } else {
    for (int q = 0; q < 4; q++) {
      const int cc = blockIdx.y * kBgmvCols + q * kBgmvThreads + threadIdx.x;
      if (cc < out) store_as(y, YT, y0 + cc, load_as(y, YT, y0 + cc) + acc[q]);
    }
  }
}

// ---- SGMV: a (tile of up to 32 tokens) x (64 columns) block GEMM over the rank -----------------

constexpr int kTileT = kSgmvTileT;  // 32 tokens
constexpr int kTileC = 64;          // output columns per block
constexpr int kBR = 32;             // rank chunk

template <int LT, int YT>
__global__ void __launch_bounds__(256) expand_sgmv_kernel(const uint8_t* __restrict__ pool,
                                                          const LoraRef* __restrict__ refs, int ref_stride,
                                                          const int32_t* __restrict__ tiles,  // [n_tiles, 3]
                                                          const float* __restrict__ z,        // [T, max_rank]
                                                          int max_rank,
                                                          void* __restrict__ y,  // [T, out] dtype YT
                                                          int out) {
  const int t0 = tiles[3 * blockIdx.x], t1 = tiles[3 * blockIdx.x + 1], slot = tiles[3 * blockIdx.x + 2];
  const LoraRef r = refs[size_t(slot) * ref_stride];
  if (r.rank == 0) return;  // block-uniform
  const int nt = t1 - t0, c0 = blockIdx.y * kTileC;
  auto* ye = static_cast<typename Elem<YT>::T*>(y);

  __shared__ float Zs[kBR][kTileT + 1];  // rank-major, padded: conflict-free transposed stores
  __shared__ float Bs[kBR][kTileC];
  // Thread (ty, tx) of 16 x 16 computes tokens ty, ty + 16 and columns tx + 16 b, b < 4: a warp's
  // 16 column lanes read 16 consecutive values of a staged B^T row.
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
      Bs[jj][cc] = j0 + jj < r.rank && c0 + cc < out ? load_as(pool + r.b_rows[j0 + jj], LT, c0 + cc) : 0.f;
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
      if (tt < nt && c < out) {
        const size_t i = size_t(t0 + tt) * out + c;
        Elem<YT>::store(ye, i, Elem<YT>::load(ye, i) + acc[a][b]);
      }
    }
}

void check_dtypes(const char* what, int lt, int yt) {
  if ((lt != kF32 && lt != kBF16) || (yt != kF32 && yt != kBF16))
    throw std::runtime_error(std::string(what) + ": LoRA rows and activations must be F32 or BF16");
}

template <int LT, int YT>
void bgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* token_slot, int T, const float* z,
          int max_rank, void* y, int out, cudaStream_t stream) {
  const dim3 grid(T, ceil_div(out, kBgmvCols));
  if (out % 4 == 0)
    LP_LAUNCH((expand_bgmv_kernel<LT, YT, true>), grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride,
              token_slot, z, max_rank, y, out);
  else
    LP_LAUNCH((expand_bgmv_kernel<LT, YT, false>), grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride,
              token_slot, z, max_rank, y, out);
}

template <int LT, int YT>
void sgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* tiles, int n_tiles, const float* z,
          int max_rank, void* y, int out, cudaStream_t stream) {
  LP_LAUNCH((expand_sgmv_kernel<LT, YT>), dim3(n_tiles, ceil_div(out, kTileC)), dim3(256), 0, stream, pool, refs,
            ref_stride, tiles, z, max_rank, y, out);
}

}  // namespace

void lora_expand_bgmv(const uint8_t* pool, int lt, const LoraRef* refs, int ref_stride, const int32_t* token_slot, int T,
                      const float* z, int max_rank, void* y, int yt, int out, cudaStream_t stream) {
  if (T <= 0 || max_rank <= 0 || out <= 0) return;
  check_dtypes("lora_expand_bgmv", lt, yt);
  if (ceil_div(out, kBgmvCols) > 65535) throw std::runtime_error("lora_expand_bgmv: output too wide");
  if (lt == kF32 && yt == kF32) bgmv<kF32, kF32>(pool, refs, ref_stride, token_slot, T, z, max_rank, y, out, stream);
  else if (lt == kF32) bgmv<kF32, kBF16>(pool, refs, ref_stride, token_slot, T, z, max_rank, y, out, stream);
  else if (yt == kF32) bgmv<kBF16, kF32>(pool, refs, ref_stride, token_slot, T, z, max_rank, y, out, stream);
  else bgmv<kBF16, kBF16>(pool, refs, ref_stride, token_slot, T, z, max_rank, y, out, stream);
  check_launch("lora_expand_bgmv");
}

void lora_expand_sgmv(const uint8_t* pool, int lt, const LoraRef* refs, int ref_stride, const int32_t* tiles,
                      int n_tiles, const float* z, int max_rank, void* y, int yt, int out, cudaStream_t stream) {
  if (n_tiles <= 0 || max_rank <= 0 || out <= 0) return;
  check_dtypes("lora_expand_sgmv", lt, yt);
  if (ceil_div(out, kTileC) > 65535) throw std::runtime_error("lora_expand_sgmv: output too wide");
  if (lt == kF32 && yt == kF32) sgmv<kF32, kF32>(pool, refs, ref_stride, tiles, n_tiles, z, max_rank, y, out, stream);
  else if (lt == kF32) sgmv<kF32, kBF16>(pool, refs, ref_stride, tiles, n_tiles, z, max_rank, y, out, stream);
  else if (yt == kF32) sgmv<kBF16, kF32>(pool, refs, ref_stride, tiles, n_tiles, z, max_rank, y, out, stream);
  else sgmv<kBF16, kBF16>(pool, refs, ref_stride, tiles, n_tiles, z, max_rank, y, out, stream);
  check_launch("lora_expand_sgmv");
}

}  // namespace loraplex::cuda
