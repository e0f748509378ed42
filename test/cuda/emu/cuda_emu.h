// A CUDA emulator for testing kernel logic on machines without a GPU (CI, laptops): the kernels of
// kernels/cuda and addon/cuda_backend.cu compile as plain C++ against this header (force-included
// with -include, LORAPLEX_CUDA_EMU defined). Semantics:
// - A launch runs synchronously, one block at a time; each thread of a block is a fiber (ucontext),
//   switched only at barriers, so __syncthreads, __syncwarp and warp shuffles behave as on the GPU
//   for correct programs. Incorrect ones are caught: a barrier that not all live threads of the
//   block (or warp) reach, a __syncthreads after some threads exited, or a shuffle with exited lanes
//   aborts with the kernel's block and thread.
// - __shared__ arrays become function statics (one copy, shared by the block's fibers); dynamic
//   shared memory is filled with NaN bytes at the start of every block, so reads of shared memory
//   the kernel never wrote show up as NaN.
// - Device memory is host memory (malloc); the pointer attributes know which allocations are
//   "device". Streams and events are no-ops: every operation completes when it is issued.
// - Launch configurations are checked like the driver does (block <= 1024 threads, grid y/z <=
//   65535, dynamic shared memory <= 227 KiB): a bad launch sets the error cudaGetLastError returns.
// What it cannot show: performance, races between threads that do not meet at a barrier (fibers run
// to the next barrier one after another), out-of-bounds shared-memory accesses, real rounding of the
// device's math functions (it uses the host's libm).
#pragma once
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#ifndef LORAPLEX_CUDA_EMU
#define LORAPLEX_CUDA_EMU 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// ---- runtime API subset ----------------------------------------------------------------------------

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
enum cudaMemoryType : int {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t totalGlobalMem, sharedMemPerBlock;
};
struct emu_stream_t;
struct emu_event_t;
typedef emu_stream_t* cudaStream_t;
typedef emu_event_t* cudaEvent_t;
constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocDefault = 0;

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaMalloc(void** p, size_t n);
template <typename T>
cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void* p);
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags);
cudaError_t cudaMallocHost(void** p, size_t n);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int v, size_t n);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d);
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);
// The emulated device's memory (default 4 GiB): cudaMalloc fails beyond it, cudaMemGetInfo reports
// what is left of it.
void emu_set_device_memory(size_t total_bytes);

// ---- stream capture and graphs (CUDA graphs) -----------------------------------------------------
// Capture records every launch, cudaMemcpyAsync and cudaMemsetAsync issued on the capturing stream
// (with its arguments by value, as the driver does); replay runs them in order. As under the
// driver's global capture mode, calls that would synchronise or allocate while a capture is active
// (cudaMalloc, cudaFree, cudaHostAlloc, cudaMemcpy, cudaMemset, any *Synchronize) fail with
// cudaErrorStreamCaptureUnsupported and invalidate the capture, and so do cudaStreamWaitEvent and
// cudaEventRecord on the capturing stream (events of other streams must be waited on before the
// graph launch); cudaStreamEndCapture then returns cudaErrorStreamCaptureInvalidated.
enum cudaStreamCaptureMode : int { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1, cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus : int { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1, cudaStreamCaptureStatusInvalidated = 2 };
constexpr cudaError_t cudaErrorStreamCaptureUnsupported = cudaError_t(900);
constexpr cudaError_t cudaErrorStreamCaptureInvalidated = cudaError_t(901);
struct emu_graph_t;
struct emu_graph_exec_t;
typedef emu_graph_t* cudaGraph_t;
typedef emu_graph_exec_t* cudaGraphExec_t;
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
// Kernel attributes: only the dynamic shared-memory opt-in. Launches with more than 48 KiB of
// dynamic shared memory fail (as on the GPU) unless the kernel was opted in to at least that much.
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
namespace emu {
cudaError_t func_set_attribute(const void* kernel, int attr, int value);
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return ::emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---- device-side built-ins ---------------------------------------------------------------------------

namespace emu {

uint3 thread_idx();
extern uint3 block_idx;
extern dim3 block_dim, grid_dim;
void* dyn_smem();
void syncthreads();
void syncwarp();
uint64_t shuffle(uint64_t bits, int src_lane_or_mask, int mode);  // mode 0: xor, 1: index, 2: down, 3: up
float f16_to_f32(uint16_t h);
// Runs body for every thread of every block; sets the launch error on a bad configuration
// (kernel: the launched function, for its shared-memory opt-in; nullptr = unknown).
void launch_impl(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body, const void* kernel = nullptr);
// A launch on a capturing stream is recorded (configuration checked now, body run at replay).
bool record_launch(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body,
                   const void* kernel = nullptr);
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t s, F&& f) {
  std::function<void()> body(std::forward<F>(f));
  if (!record_launch(s, grid, block, smem, body)) launch_impl(grid, block, smem, body);
}
template <typename K, typename F>
void launch_kernel(K* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t s, F&& f) {
  std::function<void()> body(std::forward<F>(f));
  const void* k = reinterpret_cast<const void*>(kernel);
  if (!record_launch(s, grid, block, smem, body, k)) launch_impl(grid, block, smem, body, k);
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define warpSize 32

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { ::emu::syncwarp(); }

template <typename T>
inline T emu_shfl(T v, int arg, int mode) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::emu::shuffle(bits, arg, mode);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) { return emu_shfl(v, lane_mask, 0); }
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) { return emu_shfl(v, src, 1); }
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) { return emu_shfl(v, int(d), 2); }
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) { return emu_shfl(v, int(d), 3); }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int32_t i) { return __uint_as_float(uint32_t(i)); }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}

// ---- BF16 and tensor cores (nvcuda::wmma) ------------------------------------------------------------
// __nv_bfloat16 as a struct around its bits (kernels name it through cuda::bf16_t).
struct __nv_bfloat16 {
  unsigned short __x;
};
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.__x) << 16); }

// The subset of nvcuda::wmma the kernels use: 16x16x16 fragments of BF16 (matrix_a, matrix_b) and
// float (accumulator). Exact and simple rather than faithful to the hardware's register layout:
// every lane's fragment holds the whole tile (x[] is the tile in row-major order, num_elements =
// 256), so element-wise operations applied uniformly to x[] work as on the GPU, while code that
// assumes which elements a lane holds does not. load/store/mma are warp-collective: each is a warp
// barrier on entry and exit (a lane that skips one, or exited lanes, abort like a bad __syncwarp),
// and pointers / ldm are checked against wmma's rules (256-bit aligned, ldm a multiple of 16 bytes).
// mma_sync: d = c + a.b with each product exact (BF16 x BF16 fits fp32) and the sum in fp32 in k order.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, typename T, typename Layout = void>
struct fragment_base {
  using element_type = T;
  static constexpr int num_elements = 256;
  T x[num_elements];  // the whole 16 x 16 tile, row-major (row = M or K index, column = N or K index)
};
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment : fragment_base<Use, T, Layout> {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 fragments only");
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
inline void from_f(float& d, float v) { d = v; }
inline void from_f(__nv_bfloat16& d, float v) {  // round to nearest even, as __float2bfloat16
  const uint32_t u = __float_as_uint(v);
  d.__x = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
void check_ptr(const void* p, unsigned ldm, size_t elem_bytes, const char* what);  // aborts on misuse
inline bool is_col(row_major) { return false; }
inline bool is_col(col_major) { return true; }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}

// matrix_a / matrix_b with their layout in the type. Element (r, c) of the tile (r: row of A / k of
// B) is p[r * ldm + c] for row_major, p[c * ldm + r] for col_major.
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Layout, void>::value, "matrix_a / matrix_b fragments need a layout");
  detail::check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
  __syncwarp();
  const bool col = detail::is_col(Layout{});
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++) f.x[r * 16 + c] = col ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
  __syncwarp();
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, 4, "load_matrix_sync");
  __syncwarp();
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++) f.x[r * 16 + c] = l == mem_col_major ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
  __syncwarp();
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm, 4, "store_matrix_sync");
  __syncwarp();
  for (int r = 0; r < 16; r++)
    for (int c = 0; c < 16; c++) (l == mem_col_major ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c]) = f.x[r * 16 + c];
  __syncwarp();
}
template <typename TA, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  __syncwarp();
  float r[256];
  for (int i = 0; i < 16; i++)
    for (int j = 0; j < 16; j++) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; k++) s += detail::to_f(a.x[i * 16 + k]) * detail::to_f(b.x[k * 16 + j]);
      r[i * 16 + j] = s;
    }
  for (int i = 0; i < 256; i++) d.x[i] = r[i];
  __syncwarp();
}
}  // namespace wmma
}  // namespace nvcuda
