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
// Runs body for every thread of every block; sets the launch error on a bad configuration.
void launch_impl(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
// A launch on a capturing stream is recorded (configuration checked now, body run at replay).
bool record_launch(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body);
template <typename F>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t s, F&& f) {
  std::function<void()> body(std::forward<F>(f));
  if (!record_launch(s, grid, block, smem, body)) launch_impl(grid, block, smem, body);
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
