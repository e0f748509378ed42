// Gemm (gemm.cuh): dispatch between the SIMT kernels (gemm_simt.cu) and cuBLAS, plus the kernels
// only the cuBLAS path needs (activation split, bias broadcast).
#include <cstdlib>
#include <string>

#include "kernels/cuda/gemm.cuh"

#ifndef LORAPLEX_HAVE_CUBLAS
#define LORAPLEX_HAVE_CUBLAS 0
#endif
#if LORAPLEX_HAVE_CUBLAS
#include <cublas_v2.h>
#include <cuda_bf16.h>
#endif

namespace loraplex::cuda {

namespace {

int act_split_from_env() {
  const char* s = std::getenv("LORAPLEX_CUDA_ACT_SPLIT");
  if (!s || !*s) return 2;
  const int v = std::atoi(s);
  if (v < 1 || v > 3) throw std::runtime_error(std::string("LORAPLEX_CUDA_ACT_SPLIT must be 1, 2 or 3, got ") + s);
  return v;
}

#if LORAPLEX_HAVE_CUBLAS

void check_cublas(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(int(st)));
}

// parts[p] = the p-th term of x's expansion in the 16-bit dtype: x_1 = round(x),
// x_2 = round(x - x_1), x_3 = round(x - x_1 - x_2); round to nearest even.
template <int WT>
__global__ void __launch_bounds__(256) split_activations_kernel(const float* __restrict__ x,  // [n]
                                                                size_t n, int n_parts,
                                                                uint16_t* __restrict__ parts) {  // [n_parts, n]
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    float r = x[i];
    for (int p = 0; p < n_parts; p++) {
      float back;
      if (WT == kBF16) {
        const __nv_bfloat16 h = __float2bfloat16_rn(r);
        parts[p * n + i] = __bfloat16_as_ushort(h);
        back = __bfloat162float(h);
      } else {
        const __half h = __float2half_rn(r);
        parts[p * n + i] = __half_as_ushort(h);
        back = __half2float(h);
      }
      r -= back;
    }
  }
}

__global__ void __launch_bounds__(256) bias_rows_kernel(const float* __restrict__ bias,  // [N]
                                                        int N, size_t n,
                                                        float* __restrict__ y) {  // [T, N]
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] = bias[i % N];
}

#endif  // LORAPLEX_HAVE_CUBLAS

}  // namespace

Gemm::Gemm(int act_split) : act_split_(act_split > 0 ? act_split : act_split_from_env()) {
  if (act_split_ > 3) throw std::runtime_error("Gemm: act_split must be 1..3");
#if LORAPLEX_HAVE_CUBLAS
  cublasHandle_t h = nullptr;
  check_cublas(cublasCreate(&h), "cublasCreate");
  handle_ = h;
  // Default math mode: CUBLAS_COMPUTE_32F never uses TF32, so F32 weights get a true fp32 GEMM.
  // By default cuBLAS may also reduce split-K partial sums in half precision for F16 inputs: on an
  // H200 that put one of 300000 outputs (K = 4096) 1.4e-3 off; disallowed.
  check_cublas(cublasSetMathMode(h, cublasMath_t(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
               "cublasSetMathMode");
#endif
}

Gemm::~Gemm() {
  if (parts_) cudaFree(parts_);
#if LORAPLEX_HAVE_CUBLAS
  if (handle_) cublasDestroy(static_cast<cublasHandle_t>(handle_));
#endif
}

bool Gemm::has_cublas() const { return LORAPLEX_HAVE_CUBLAS != 0; }

const char* Gemm::path(int T, int wt) const {
  if (T <= kSkinnyMaxT) return "skinny";
#if LORAPLEX_HAVE_CUBLAS
  if (wt == kF32) return "cublas-f32";
  static const char* kSplit[] = {"", "cublas-split1", "cublas-split2", "cublas-split3"};
  return kSplit[act_split_];
#else
  (void)wt;
  return "tiled";
#endif
}

void Gemm::run(const float* x, int T, int K, const void* W, int wt, int N, const float* bias, float* y,
               cudaStream_t stream) {
  if (T <= 0) return;
  if (T <= kSkinnyMaxT) {
    gemm_skinny(x, T, K, W, wt, N, bias, y, stream);
    return;
  }
#if LORAPLEX_HAVE_CUBLAS
  // Row-major y[T, N] = x[T, K] W[N, K]^T is column-major y^T[N, T] = (W as [K, N])^T . (x as [K, T]).
  cublasHandle_t handle = static_cast<cublasHandle_t>(handle_);
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  const float one = 1.f, zero = 0.f;
  const size_t n_y = size_t(T) * N;
  const int blocks_y = int(n_y / 256 + 1 < 4096 ? n_y / 256 + 1 : 4096);
  if (bias) {  // y starts as the broadcast bias; every product below accumulates into it
    LP_LAUNCH(bias_rows_kernel, dim3(blocks_y), dim3(256), 0, stream, bias, N, n_y, y);
    check_launch("gemm bias");
  }
  if (wt == kF32) {
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, CUDA_R_32F, K, x, CUDA_R_32F, K,
                              bias ? &one : &zero, y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (F32)");
    return;
  }
  const size_t n_x = size_t(T) * K, need = n_x * act_split_ * sizeof(uint16_t);
  if (need > parts_bytes_) {
    if (parts_) {
      check_cuda(cudaStreamSynchronize(stream), "Gemm: sync before growing the split buffer");
      check_cuda(cudaFree(parts_), "Gemm: cudaFree");
      parts_ = nullptr;
      parts_bytes_ = 0;
    }
    check_cuda(cudaMalloc(&parts_, need), "Gemm: cudaMalloc of the activation split buffer");
    parts_bytes_ = need;
  }
  uint16_t* parts = static_cast<uint16_t*>(parts_);
  const int blocks_x = int(n_x / 256 + 1 < 4096 ? n_x / 256 + 1 : 4096);
  if (wt == kBF16) LP_LAUNCH(split_activations_kernel<kBF16>, dim3(blocks_x), dim3(256), 0, stream, x, n_x, act_split_, parts);
  else LP_LAUNCH(split_activations_kernel<kF16>, dim3(blocks_x), dim3(256), 0, stream, x, n_x, act_split_, parts);
  check_launch("gemm split_activations");
  const cudaDataType dt = wt == kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  for (int p = 0; p < act_split_; p++) {
    const float* beta = (p == 0 && !bias) ? &zero : &one;
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, dt, K, parts + p * n_x, dt, K, beta,
                              y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (16-bit)");
  }
#else
  gemm_tiled(x, T, K, W, wt, N, bias, y, stream);
#endif
}

}  // namespace loraplex::cuda
