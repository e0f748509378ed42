// The base-weight GEMM as the backend sees it: y[T, N] = x[T, K] . W[N, K]^T (+ bias), W in its
// stored dtype, fp32 activations and accumulation. Two implementations behind one class:
//
// - LORAPLEX_HAVE_CUBLAS (cuBLAS headers and library found at build time): decode-sized calls
//   (T <= kSkinnyMaxT) still use gemm_skinny (bandwidth-bound: W read once, fp32 activations);
//   larger T go to cublasGemmEx on tensor cores. F32 weights: an fp32 GEMM (CUBLAS_COMPUTE_32F,
//   no TF32). BF16 / F16 weights: cuBLAS needs both operands in one 16-bit type, so x is split into
//   `act_split` parts of the weight's dtype, x = x_1 + x_2 (+ x_3), each part multiplied by W
//   with fp32 accumulation into the same y. Two BF16 parts carry 16 significant bits of x (relative
//   error about 2^-17, against the 2^-9 of plain BF16 activations), which keeps the CUDA backend
//   within the golden suite's tolerance of the fp32 reference; three carry all 24.
//   LORAPLEX_CUDA_ACT_SPLIT=1|2|3 chooses (default 2). F16 parts overflow beyond |x| = 65504, so
//   F16 models whose activations exceed that range need the fallback path (or BF16 weights).
// - Without cuBLAS: gemm_skinny for T <= kSkinnyMaxT, gemm_tiled otherwise (fp32 SIMT).
//
// Thread safety: one Gemm per backend, used from the engine thread only.
#pragma once
#include <cstddef>

#include "kernels/cuda/launchers.cuh"

// The class has the same layout with and without cuBLAS (opaque handles), so code that includes
// this header needs neither the cuBLAS headers nor LORAPLEX_HAVE_CUBLAS; only gemm.cu does.
namespace loraplex::cuda {

class Gemm {
 public:
  // Creates the cuBLAS handle (when built with cuBLAS) on the current device. act_split <= 0 reads
  // LORAPLEX_CUDA_ACT_SPLIT (default 2).
  explicit Gemm(int act_split = 0);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  void run(const float* x,     // [T, K]
           int T, int K,
           const void* W,      // [N, K] dtype wt
           int wt, int N,
           const float* bias,  // [N] or nullptr
           float* y,           // [T, N]
           cudaStream_t stream);

  // Which implementation run() picks for these arguments: "skinny", "tiled", "cublas-f32",
  // "cublas-split<k>" (tests choose their tolerance from it).
  const char* path(int T, int wt) const;
  bool has_cublas() const;
  int act_split() const { return act_split_; }

 private:
  int act_split_ = 2;
  void* handle_ = nullptr;  // cublasHandle_t
  void* parts_ = nullptr;   // [act_split, T, K] 16-bit activation parts (device)
  size_t parts_bytes_ = 0;
};

}  // namespace loraplex::cuda
