// The base-weight GEMM as the backend sees it: y[T, N] = x[T, K] . W[N, K]^T (+ bias), W in its
// stored dtype, x in xt (kF32 or kBF16), y in yt (kF32 or kBF16), bias fp32, fp32 accumulation.
// The route run() takes (path() names it; tests choose tolerances from the name):
//
//   T <= kSkinnyMaxT (16, decode)         "skinny"        gemm_skinny (W read once, split-K by shape)
//   xt F32, yt F32, with cuBLAS:
//     wt F32                              "cublas-f32"    cublasGemmEx, CUBLAS_COMPUTE_32F (no TF32)
//     wt BF16 / F16                       "cublas-split<k>" x split into k parts of the weight's
//                                         dtype, x = x_1 + x_2 (+ x_3), each multiplied by W with fp32
//                                         accumulation into y (k = act_split, LORAPLEX_CUDA_ACT_SPLIT,
//                                         default 2: 16 significant bits of x; F16 parts overflow
//                                         beyond |x| = 65504)
//   xt BF16, wt BF16, with cuBLAS         "cublaslt-bf16" cublasLtMatmul BF16 x BF16 on tensor cores,
//                                         CUBLAS_COMPUTE_32F, D in yt, bias fused as the epilogue
//                                         (CUBLASLT_EPILOGUE_BIAS, fp32 bias when the library accepts
//                                         it for this D, else a BF16 copy of the bias, see gemm.cu).
//                                         Needs K % 8 == 0, N % 8 == 0 and 16-byte aligned x, W, y
//                                         (and fp32 bias); otherwise, or when cuBLASLt offers no
//                                         algorithm, run() takes gemm_tiled (same arithmetic)
//   everything else                       "tiled"         gemm_tiled (SIMT fp32): no cuBLAS; BF16 x
//                                         with F32 / F16 weights (cuBLAS needs one 16-bit type for
//                                         both operands, and the BF16 path only pairs BF16 x with
//                                         BF16 weights); F32 x with BF16 y (the split path
//                                         accumulates into y across parts)
//
// CUDA graphs: run() allocates, synchronises or queries heuristics only the first time it meets a
// shape; warm(T, K, N, xt, wt, yt, bias) does that up front (the split-K workspace of the skinny
// kernel, the activation-split buffer, the cuBLASLt descriptors, layouts and algorithm of the
// shape's T bucket). After warm for a shape, run() for it is capture-safe: host calls and launches
// on `stream` only.
//
// Thread safety: one Gemm per backend, used from the engine thread only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

#include "kernels/cuda/launchers.cuh"

// The class has the same layout with and without cuBLAS (opaque handles), so code that includes
// this header needs neither the cuBLAS headers nor LORAPLEX_HAVE_CUBLAS; only gemm.cu does.
namespace loraplex::cuda {

class Gemm {
 public:
  // Creates the cuBLAS and cuBLASLt handles and the cuBLASLt workspace (when built with cuBLAS) on
  // the current device. act_split <= 0 reads LORAPLEX_CUDA_ACT_SPLIT (default 2).
  explicit Gemm(int act_split = 0);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  void run(const void* x,      // [T, K] dtype xt
           int xt, int T, int K,
           const void* W,      // [N, K] dtype wt
           int wt, int N,
           const float* bias,  // [N] or nullptr
           void* y,            // [T, N] dtype yt
           int yt, cudaStream_t stream);

  // Everything run(T, K, N, ...) would allocate or look up on first use, done now (see above).
  void warm(int T, int K, int N, int xt, int wt, int yt, bool bias);

  // Which implementation run() picks: "skinny", "tiled", "cublas-f32", "cublas-split<k>",
  // "cublaslt-bf16". yt defaults to fp32 output.
  const char* path(int T, int xt, int wt, int yt = kF32) const;
  bool has_cublas() const;
  // Bumped whenever a device buffer that run() passes to its kernels moves (the activation-split
  // buffer grows): a CUDA graph captured before holds the old address and must be captured again.
  uint64_t generation() const { return generation_; }
  int act_split() const { return act_split_; }

  struct LtCache;  // cuBLASLt plans per shape (gemm.cu)

 private:
  void grow_parts(size_t bytes);
  int act_split_ = 2;
  void* handle_ = nullptr;     // cublasHandle_t
  void* lt_handle_ = nullptr;  // cublasLtHandle_t
  void* lt_ws_ = nullptr;      // cuBLASLt workspace (device)
  size_t lt_ws_bytes_ = 0;
  std::unique_ptr<LtCache> lt_;
  uint64_t generation_ = 0;
  void* parts_ = nullptr;  // [act_split, T, K] 16-bit activation parts (device)
  size_t parts_bytes_ = 0;
};

}  // namespace loraplex::cuda
