// Gemm (gemm.cuh): dispatch between the SIMT kernels (gemm_simt.cu), cuBLAS (fp32 activations) and
// cuBLASLt (BF16 activations), plus the kernels only the cuBLAS paths need (activation split, bias
// broadcast, BF16 bias copy).
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>

#include "kernels/cuda/gemm.cuh"

#ifndef LORAPLEX_HAVE_CUBLAS
#define LORAPLEX_HAVE_CUBLAS 0
#endif
#if LORAPLEX_HAVE_CUBLAS
#include <cublasLt.h>
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

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// cuBLASLt plans are kept per T bucket (the next power of two >= T, at least 32): the heuristic is
// queried once per bucket at its largest T, and the layouts are re-pointed at the exact T per call.
int t_bucket(int T) {
  int b = 32;
  while (b < T && b < (1 << 30)) b <<= 1;
  return b;
}

constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

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

__global__ void __launch_bounds__(256) bias_to_bf16_kernel(const float* __restrict__ bias, int N,
                                                           uint16_t* __restrict__ out) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < N; i += gridDim.x * blockDim.x)
    out[i] = f32_to_bf16_bits(bias[i]);
}

// One cuBLASLt plan: D[N, T] (column-major; row-major y[T, N]) = op(A)[N, K] . B[K, T] with
// A = W as column-major [K, N] (transposed), B = x as column-major [K, T].
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;  // kept for a re-query at an exact T
  cublasLtMatmulAlgo_t algo{};
  bool usable = false;          // a heuristic result exists
  bool bias_bf16 = false;       // the library wanted a BF16 bias for this D: bias_copy holds it
  uint16_t* bias_copy = nullptr;  // [N] device, when bias_bf16
  int cur_T = -1;
  ~LtPlan() {
    if (bias_copy) cudaFree(bias_copy);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// The best algorithm for the plan's descriptor and layouts as they are now (host-side only).
bool lt_query(cublasLtHandle_t h, LtPlan& p) {
  cublasLtMatmulHeuristicResult_t res{};
  int n = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(h, p.desc, p.a, p.b, p.d, p.d, p.pref, 1, &res, &n);
  if (st == CUBLAS_STATUS_SUCCESS && n > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
    p.algo = res.algo;
    return true;
  }
  return false;
}

#endif  // LORAPLEX_HAVE_CUBLAS

}  // namespace

struct Gemm::LtCache {
#if LORAPLEX_HAVE_CUBLAS
  // (T bucket, K, N, yt, bias?) -> plan
  std::map<std::tuple<int, int, int, int, int>, std::unique_ptr<LtPlan>> plans;
#endif
};

Gemm::Gemm(int act_split) : act_split_(act_split > 0 ? act_split : act_split_from_env()), lt_(new LtCache) {
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
  cublasLtHandle_t lt = nullptr;
  check_cublas(cublasLtCreate(&lt), "cublasLtCreate");
  lt_handle_ = lt;
  check_cuda(cudaMalloc(&lt_ws_, kLtWorkspaceBytes), "Gemm: cudaMalloc of the cuBLASLt workspace");
  lt_ws_bytes_ = kLtWorkspaceBytes;
#endif
}

Gemm::~Gemm() {
  lt_.reset();
  if (parts_) cudaFree(parts_);
#if LORAPLEX_HAVE_CUBLAS
  if (lt_ws_) cudaFree(lt_ws_);
  if (lt_handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(lt_handle_));
  if (handle_) cublasDestroy(static_cast<cublasHandle_t>(handle_));
#endif
}

bool Gemm::has_cublas() const { return LORAPLEX_HAVE_CUBLAS != 0; }

const char* Gemm::path(int T, int xt, int wt, int yt) const {
  if (T <= kSkinnyMaxT) return "skinny";
#if LORAPLEX_HAVE_CUBLAS
  if (xt == kF32 && yt == kF32) {
    if (wt == kF32) return "cublas-f32";
    static const char* kSplit[] = {"", "cublas-split1", "cublas-split2", "cublas-split3"};
    return kSplit[act_split_];
  }
  if (xt == kBF16 && wt == kBF16) return "cublaslt-bf16";
  return "tiled";
#else
  (void)xt, (void)wt, (void)yt;
  return "tiled";
#endif
}

void Gemm::grow_parts(size_t need) {
  if (need <= parts_bytes_) return;
  if (parts_) {
    check_cuda(cudaDeviceSynchronize(), "Gemm: sync before growing the split buffer");
    check_cuda(cudaFree(parts_), "Gemm: cudaFree");
    parts_ = nullptr;
    parts_bytes_ = 0;
  }
  check_cuda(cudaMalloc(&parts_, need), "Gemm: cudaMalloc of the activation split buffer");
  parts_bytes_ = need;
  generation_++;  // graphs captured with the old buffer must not replay
}

#if LORAPLEX_HAVE_CUBLAS
namespace {

LtPlan* lt_plan(Gemm::LtCache& cache, cublasLtHandle_t h, void* ws, size_t ws_bytes, int T, int K, int N, int yt,
                bool bias) {
  const int bucket = t_bucket(T);
  auto key = std::make_tuple(bucket, K, N, yt, int(bias));
  auto it = cache.plans.find(key);
  if (it != cache.plans.end()) return it->second.get();
  auto p = std::make_unique<LtPlan>();
  const cudaDataType dt = yt == kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  check_cublas(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)), "TRANSA");
  check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)), "TRANSB");
  check_cublas(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, K, N, K), "layout A");
  check_cublas(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, K, bucket, K), "layout B");
  check_cublas(cublasLtMatrixLayoutCreate(&p->d, dt, N, bucket, N), "layout D");
  check_cublas(cublasLtMatmulPreferenceCreate(&p->pref), "cublasLtMatmulPreferenceCreate");
  cublasLtMatmulPreference_t pref = p->pref;
  // Split-K partial sums only in fp32 (the compute type), never in the BF16 output (INPLACE /
  // OUTPUT_TYPE would round every partial sum): the CPU oracle accumulates in fp32.
  const uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  const uint32_t align = 16;  // run() checks x, W, y (and an fp32 bias) for 16-byte alignment
  check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                    sizeof(ws_bytes)), "pref workspace");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes,
                                                    sizeof(schemes)), "pref reduction");
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    check_cublas(cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align)), "pref alignment");
  auto query = [&]() { return lt_query(h, *p); };
  if (bias) {
    // cublasLt.h: the bias has D's type by default; an fp32 bias (the model's) is asked for first
    // and a BF16 copy used only if the library has no kernel for that. The heuristic looks at the
    // pointer's alignment: a 256-byte aligned stand-in here, run() checks the real one.
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), "EPILOGUE");
    const void* stand_in = ws;
    check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &stand_in, sizeof(stand_in)),
                 "BIAS_POINTER");
    int32_t bt = CUDA_R_32F;
    check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)),
                 "BIAS_DATA_TYPE");
    p->usable = query();
    if (!p->usable && yt == kBF16) {
      bt = CUDA_R_16BF;
      check_cublas(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)),
                   "BIAS_DATA_TYPE");
      p->usable = query();
      if (p->usable) {
        p->bias_bf16 = true;
        check_cuda(cudaMalloc(reinterpret_cast<void**>(&p->bias_copy), size_t(N) * 2), "Gemm: cudaMalloc of a BF16 bias");
      }
    }
  } else {
    p->usable = query();
  }
  LtPlan* raw = p.get();
  cache.plans.emplace(key, std::move(p));
  return raw;
}

}  // namespace
#endif

void Gemm::warm(int T, int K, int N, int xt, int wt, int yt, bool bias) {
  if (T <= 0) return;
  if (T <= kSkinnyMaxT) {
    gemm_skinny_reserve(T, K, N);
    return;
  }
#if LORAPLEX_HAVE_CUBLAS
  const std::string p = path(T, xt, wt, yt);
  if (p.rfind("cublas-split", 0) == 0) grow_parts(size_t(T) * K * act_split_ * sizeof(uint16_t));
  if (p == "cublaslt-bf16")
    lt_plan(*lt_, static_cast<cublasLtHandle_t>(lt_handle_), lt_ws_, lt_ws_bytes_, T, K, N, yt, bias);
#else
  (void)K, (void)N, (void)xt, (void)wt, (void)yt, (void)bias;
#endif
}

void Gemm::run(const void* x, int xt, int T, int K, const void* W, int wt, int N, const float* bias, void* y, int yt,
               cudaStream_t stream) {
  if (T <= 0) return;
  if (T <= kSkinnyMaxT) {
    gemm_skinny(x, xt, T, K, W, wt, N, bias, y, yt, stream);
    return;
  }
#if LORAPLEX_HAVE_CUBLAS
  const std::string p = path(T, xt, wt, yt);
  if (p == "cublaslt-bf16") {
    LtPlan* plan = lt_plan(*lt_, static_cast<cublasLtHandle_t>(lt_handle_), lt_ws_, lt_ws_bytes_, T, K, N, yt, bias);
    const bool aligned = aligned16(x) && aligned16(W) && aligned16(y) && (!bias || plan->bias_bf16 || aligned16(bias)) &&
                         K % 8 == 0 && N % 8 == 0;
    if (plan->usable && aligned) {
      cublasLtHandle_t h = static_cast<cublasLtHandle_t>(lt_handle_);
      if (plan->cur_T != T) {  // re-point the bucket's layouts at this T (host-only calls)
        const uint64_t cols = uint64_t(T);
        check_cublas(cublasLtMatrixLayoutSetAttribute(plan->b, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof(cols)), "B cols");
        check_cublas(cublasLtMatrixLayoutSetAttribute(plan->d, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof(cols)), "D cols");
        plan->cur_T = T;
      }
      if (bias) {
        const void* bp = bias;
        if (plan->bias_bf16) {
          LP_LAUNCH(bias_to_bf16_kernel, dim3(ceil_div(N, 256) < 1024 ? ceil_div(N, 256) : 1024), dim3(256), 0, stream,
                    bias, N, plan->bias_copy);
          check_launch("gemm bias_to_bf16");
          bp = plan->bias_copy;
        }
        check_cublas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)),
                     "BIAS_POINTER");
      }
      const float one = 1.f, zero = 0.f;
      cublasStatus_t st = cublasLtMatmul(h, plan->desc, &one, W, plan->a, x, plan->b, &zero, y, plan->d, y, plan->d,
                                         &plan->algo, lt_ws_, lt_ws_bytes_, stream);
      // The bucket's algorithm was chosen at the bucket's largest T; should it not apply to this T,
      // ask again for this T with the same preferences (fp32-only split-K reduction; host-side).
      if ((st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) && lt_query(h, *plan))
        st = cublasLtMatmul(h, plan->desc, &one, W, plan->a, x, plan->b, &zero, y, plan->d, y, plan->d, &plan->algo,
                            lt_ws_, lt_ws_bytes_, stream);
      check_cublas(st, "cublasLtMatmul (BF16)");
      return;
    }
    // No cuBLASLt kernel for this shape / alignment: the SIMT kernel computes the same thing.
    gemm_tiled(x, xt, T, K, W, wt, N, bias, y, yt, stream);
    return;
  }
  if (p == "tiled") {
    gemm_tiled(x, xt, T, K, W, wt, N, bias, y, yt, stream);
    return;
  }
  // fp32 x and y: cuBLAS. Row-major y[T, N] = x[T, K] W[N, K]^T is column-major
  // y^T[N, T] = (W as [K, N])^T . (x as [K, T]).
  const float* xf = static_cast<const float*>(x);
  float* yf = static_cast<float*>(y);
  cublasHandle_t handle = static_cast<cublasHandle_t>(handle_);
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  const float one = 1.f, zero = 0.f;
  const size_t n_y = size_t(T) * N;
  const int blocks_y = int(n_y / 256 + 1 < 4096 ? n_y / 256 + 1 : 4096);
  if (bias) {  // y starts as the broadcast bias; every product below accumulates into it
    LP_LAUNCH(bias_rows_kernel, dim3(blocks_y), dim3(256), 0, stream, bias, N, n_y, yf);
    check_launch("gemm bias");
  }
  if (wt == kF32) {
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, CUDA_R_32F, K, xf, CUDA_R_32F, K,
                              bias ? &one : &zero, yf, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (F32)");
    return;
  }
  const size_t n_x = size_t(T) * K;
  grow_parts(n_x * act_split_ * sizeof(uint16_t));
  uint16_t* parts = static_cast<uint16_t*>(parts_);
  const int blocks_x = int(n_x / 256 + 1 < 4096 ? n_x / 256 + 1 : 4096);
  if (wt == kBF16) LP_LAUNCH(split_activations_kernel<kBF16>, dim3(blocks_x), dim3(256), 0, stream, xf, n_x, act_split_, parts);
  else LP_LAUNCH(split_activations_kernel<kF16>, dim3(blocks_x), dim3(256), 0, stream, xf, n_x, act_split_, parts);
  check_launch("gemm split_activations");
  const cudaDataType dt = wt == kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  for (int q = 0; q < act_split_; q++) {
    const float* beta = (q == 0 && !bias) ? &zero : &one;
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, W, dt, K, parts + q * n_x, dt, K, beta,
                              yf, CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx (16-bit)");
  }
#else
  gemm_tiled(x, xt, T, K, W, wt, N, bias, y, yt, stream);
#endif
}

}  // namespace loraplex::cuda
