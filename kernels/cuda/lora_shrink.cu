// LoRA shrink: z[t, j] = s_a * A_a[j, :] . x[t, :] for the adapter a of each token (Punica's
// BGMV / SGMV "shrink"). A rows are rows of the unified pool (fp32, or BF16 with --lora-dtype
// bfloat16: the same 64-byte aligned offsets, 2-byte elements) reached through the adapter's
// row-offset table, so adapters of any rank share pages with the KV cache. x is fp32 or BF16; both
// are converted to fp32 exactly, and z is fp32.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

// ---- BGMV: one block per (token, rank row); the block's warps split the row --------------------
// Decode batches are small (one token, rank 16 is 16 blocks): splitting each dot product over
// four warps keeps enough loads in flight that the kernel is not latency bound (measured on an
// H200: one warp per row made the LoRA of a 7B decode step cost 5 ms).

constexpr int kBgmvThreads = 128;

template <int LT, int XT, bool VEC8>
__global__ void __launch_bounds__(kBgmvThreads) shrink_bgmv_kernel(const uint8_t* __restrict__ pool,
                                                                   const LoraRef* __restrict__ refs, int ref_stride,
                                                                   const int32_t* __restrict__ token_slot,  // [T]
                                                                   const void* __restrict__ x,  // [T, in] dtype XT
                                                                   int in,
                                                                   float* __restrict__ z,  // [T, max_rank]
                                                                   int max_rank) {
  __shared__ float scratch[32];
  const int t = blockIdx.x, j = blockIdx.y;
  const LoraRef r = refs[size_t(token_slot[t]) * ref_stride];
  float* zt = z + size_t(t) * max_rank;
  if (j >= r.rank) {  // block-uniform
    if (threadIdx.x == 0) zt[j] = 0.f;
    return;
  }
  const void* a = pool + r.a_rows[j];
  const size_t x0 = size_t(t) * in;
  float acc = 0.f;
  if (VEC8) {
    // Rows are 64-byte aligned in the pool and in % 8 == 0 keeps x rows 16-byte aligned.
#pragma unroll 2
    for (int i = threadIdx.x * 8; i < in; i += kBgmvThreads * 8) {
      float av[8], xv[8];
      load8<LT>(a, i, av);
      load8<XT>(x, x0 + i, xv);
#pragma unroll
      for (int e = 0; e < 8; e++) acc += av[e] * xv[e];
    }
  } else {
    for (int i = threadIdx.x; i < in; i += kBgmvThreads) acc += load_as(a, LT, i) * load_as(x, XT, x0 + i);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) zt[j] = r.scale * acc;
}

// ---- SGMV: a (tile of up to 32 tokens) x (32 rank rows) block GEMM over `in` -------------------

constexpr int kTileT = kSgmvTileT;  // tokens per tile (32)
constexpr int kTileR = 32;          // rank rows per block
constexpr int kBK = 32;             // reduction chunk

template <int LT, int XT>
__global__ void __launch_bounds__(256) shrink_sgmv_kernel(const uint8_t* __restrict__ pool,
                                                          const LoraRef* __restrict__ refs, int ref_stride,
                                                          const int32_t* __restrict__ tiles,  // [n_tiles, 3]
                                                          const void* __restrict__ x,         // [T, in] dtype XT
                                                          int in,
                                                          float* __restrict__ z,  // [T, max_rank]
                                                          int max_rank) {
  const int t0 = tiles[3 * blockIdx.x], t1 = tiles[3 * blockIdx.x + 1], slot = tiles[3 * blockIdx.x + 2];
  const LoraRef r = refs[size_t(slot) * ref_stride];
  const int j0 = blockIdx.y * kTileR;
  if (j0 >= r.rank) return;  // block-uniform: this adapter has fewer rank rows (or none here)
  const int nt = t1 - t0, nr = imin(kTileR, r.rank - j0);
  const auto* xe = static_cast<const typename Elem<XT>::T*>(x);

  // k-major tiles, padded by one: the transposed stores and the per-k reads are conflict-free.
  __shared__ float Xs[kBK][kTileT + 1];
  __shared__ float As[kBK][kTileR + 1];
  __shared__ int64_t arow[kTileR];
  const int tid = threadIdx.x;
  if (tid < kTileR) arow[tid] = tid < nr ? r.a_rows[j0 + tid] : 0;

  // Thread (ty, tx) of 16 x 16 computes tokens ty, ty + 16 and rank rows tx, tx + 16.
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  float acc[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
  for (int k0 = 0; k0 < in; k0 += kBK) {
    __syncthreads();  // arow written (first pass) / previous chunk consumed
    // Stage 32 x 32 of x and of A: lanes walk k, so each row chunk is one contiguous read.
    for (int i = threadIdx.x; i < kTileT * kBK; i += 256) {
      const int rr = i / kBK, kk = i % kBK, k = k0 + kk;
      Xs[kk][rr] = rr < nt && k < in ? Elem<XT>::load(xe, size_t(t0 + rr) * in + k) : 0.f;
      As[kk][rr] = rr < nr && k < in ? load_as(pool + arow[rr], LT, k) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; kk++) {
      const float x0 = Xs[kk][ty], x1 = Xs[kk][ty + 16];
      const float a0 = As[kk][tx], a1 = As[kk][tx + 16];
      acc[0][0] += x0 * a0;
      acc[0][1] += x0 * a1;
      acc[1][0] += x1 * a0;
      acc[1][1] += x1 * a1;
    }
  }
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 2; b++) {
      const int tt = ty + 16 * a, jj = tx + 16 * b;
      if (tt < nt && jj < nr) z[size_t(t0 + tt) * max_rank + j0 + jj] = r.scale * acc[a][b];
    }
}

void check_dtypes(const char* what, int lt, int xt) {
  if ((lt != kF32 && lt != kBF16) || (xt != kF32 && xt != kBF16))
    throw std::runtime_error(std::string(what) + ": LoRA rows and activations must be F32 or BF16");
}

template <int LT, int XT>
void bgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* token_slot, int T, const void* x,
          int in, float* z, int max_rank, cudaStream_t stream) {
  const dim3 grid(T, max_rank);
  if (in % 8 == 0)
    LP_LAUNCH((shrink_bgmv_kernel<LT, XT, true>), grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride,
              token_slot, x, in, z, max_rank);
  else
    LP_LAUNCH((shrink_bgmv_kernel<LT, XT, false>), grid, dim3(kBgmvThreads), 0, stream, pool, refs, ref_stride,
              token_slot, x, in, z, max_rank);
}

template <int LT, int XT>
void sgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride, const int32_t* tiles, int n_tiles, const void* x,
          int in, float* z, int max_rank, cudaStream_t stream) {
  LP_LAUNCH((shrink_sgmv_kernel<LT, XT>), dim3(n_tiles, ceil_div(max_rank, kTileR)), dim3(256), 0, stream, pool, refs,
            ref_stride, tiles, x, in, z, max_rank);
}

}  // namespace

std::vector<int32_t> make_sgmv_tiles(const int32_t* token_slot, int T) {
  std::vector<int32_t> tiles;
  for (int t = 0; t < T;) {
    int e = t + 1;
    while (e < T && token_slot[e] == token_slot[t]) e++;
    if (token_slot[t] != 0)
      for (int a = t; a < e; a += kTileT) {
        tiles.push_back(a);
        tiles.push_back(a + kTileT < e ? a + kTileT : e);
        tiles.push_back(token_slot[t]);
      }
    t = e;
  }
  return tiles;
}

void lora_shrink_bgmv(const uint8_t* pool, int lt, const LoraRef* refs, int ref_stride, const int32_t* token_slot, int T,
                      const void* x, int xt, int in, float* z, int max_rank, cudaStream_t stream) {
  if (T <= 0 || max_rank <= 0) return;
  check_dtypes("lora_shrink_bgmv", lt, xt);
  if (max_rank > 65535) throw std::runtime_error("lora_shrink_bgmv: rank too large");
  if (lt == kF32 && xt == kF32) bgmv<kF32, kF32>(pool, refs, ref_stride, token_slot, T, x, in, z, max_rank, stream);
  else if (lt == kF32) bgmv<kF32, kBF16>(pool, refs, ref_stride, token_slot, T, x, in, z, max_rank, stream);
  else if (xt == kF32) bgmv<kBF16, kF32>(pool, refs, ref_stride, token_slot, T, x, in, z, max_rank, stream);
  else bgmv<kBF16, kBF16>(pool, refs, ref_stride, token_slot, T, x, in, z, max_rank, stream);
  check_launch("lora_shrink_bgmv");
}

void lora_shrink_sgmv(const uint8_t* pool, int lt, const LoraRef* refs, int ref_stride, const int32_t* tiles,
                      int n_tiles, const void* x, int xt, int in, float* z, int max_rank, cudaStream_t stream) {
  if (n_tiles <= 0 || max_rank <= 0) return;
  check_dtypes("lora_shrink_sgmv", lt, xt);
  if (lt == kF32 && xt == kF32) sgmv<kF32, kF32>(pool, refs, ref_stride, tiles, n_tiles, x, in, z, max_rank, stream);
  else if (lt == kF32) sgmv<kF32, kBF16>(pool, refs, ref_stride, tiles, n_tiles, x, in, z, max_rank, stream);
  else if (xt == kF32) sgmv<kBF16, kF32>(pool, refs, ref_stride, tiles, n_tiles, x, in, z, max_rank, stream);
  else sgmv<kBF16, kBF16>(pool, refs, ref_stride, tiles, n_tiles, x, in, z, max_rank, stream);
  check_launch("lora_shrink_sgmv");
}

}  // namespace loraplex::cuda
