// Device helpers shared by the CUDA kernels (kernels/cuda/*.cu): dtype decoding, warp/block
// reductions, the launch macro and the error check every launcher ends with.
// Internal to kernels/cuda; the public surface is launchers.cuh.
//
// LORAPLEX_CUDA_EMU: the kernels are also compiled as plain C++ against the host emulator in
// test/cuda/emu (threads as fibers, one block at a time), so that their logic is tested on machines
// without a GPU. Hence the launch macro instead of bare <<<>>> and no CUDA-only types in kernel
// signatures (weights travel as `const void*` + a dtype code, 16-bit values as uint16_t).
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#ifndef LORAPLEX_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace loraplex::cuda {

// Weight dtypes; the same codes as cpu::WType (F32 = 0, BF16 = 1, F16 = 2).
enum WDType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Throws std::runtime_error naming the kernel and the CUDA error; every launcher calls it after its
// launch, so a bad configuration fails at the launch that caused it and not at the next sync.
inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA launch of ") + what + " failed: " + cudaGetErrorString(e));
}

inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

inline int ceil_div(long a, long b) { return int((a + b - 1) / b); }

}  // namespace loraplex::cuda

// kernel<<<grid, block, smem, stream>>>(args...), or a synchronous emulated launch.
#ifndef LORAPLEX_CUDA_EMU
#define LP_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// Dynamic shared memory as `type* name`; 16-byte aligned so float4 accesses are legal.
#define LP_DYN_SMEM(type, name)                            \
  extern __shared__ __align__(16) unsigned char lp_smem[]; \
  type* name = reinterpret_cast<type*>(lp_smem)
#else
// Arguments by value: a launch recorded during stream capture runs after its caller returned.
#define LP_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch_kernel(&(kernel), (grid), (block), (smem), (stream), [=] { kernel(__VA_ARGS__); })
#define LP_DYN_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dyn_smem())
#endif

namespace loraplex::cuda {

// bf16 -> fp32 is exact: the 16 bits are the top half of the fp32 pattern.
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) {
#ifndef LORAPLEX_CUDA_EMU
  return __half2float(__ushort_as_half(h));
#else
  return ::emu::f16_to_f32(h);
#endif
}

// Element i of a weight array of dtype `wt`, converted to fp32 (exactly).
__device__ __forceinline__ float load_w(const void* w, int wt, size_t i) {
  if (wt == kF32) return static_cast<const float*>(w)[i];
  const uint16_t h = static_cast<const uint16_t*>(w)[i];
  return wt == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

// fp32 -> BF16 bits, round to nearest even: the arithmetic of cpu::f32_to_bf16, so a value the
// device rounds equals the CPU oracle's bit for bit.
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Activations, KV cache and LoRA rows are kF32 or kBF16 (the BF16 compute path); weights may also
// be kF16. Element i of an array of dtype t, as fp32 (exact), and v stored into it (BF16: rounded
// to nearest even). Kernels on hot paths template on the dtype with Elem<DT> instead.
__device__ __forceinline__ float load_as(const void* p, int t, size_t i) { return load_w(p, t, i); }
__device__ __forceinline__ void store_as(void* p, int t, size_t i, float v) {
  if (t == kF32) static_cast<float*>(p)[i] = v;
  else static_cast<uint16_t*>(p)[i] = f32_to_bf16_bits(v);
}

template <int DT>
struct Elem;
template <>
struct Elem<kF32> {
  using T = float;
  static __device__ __forceinline__ float load(const T* p, size_t i) { return p[i]; }
  static __device__ __forceinline__ void store(T* p, size_t i, float v) { p[i] = v; }
};
template <>
struct Elem<kBF16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(const T* p, size_t i) { return bf16_bits_to_f32(p[i]); }
  static __device__ __forceinline__ void store(T* p, size_t i, float v) { p[i] = f32_to_bf16_bits(v); }
};

// The BF16 element type that tensor-core fragments (nvcuda::wmma) are declared with: CUDA's
// __nv_bfloat16 on the device, the emulator's stand-in (a struct around the 16 bits) on the host.
// Kernel signatures keep uint16_t; kernels reinterpret BF16 shared-memory tiles as bf16_t.
using bf16_t = __nv_bfloat16;
__device__ __forceinline__ bf16_t bf16_from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }

// Raises the dynamic shared-memory limit of `kernel` to `bytes` when that is over the default
// 48 KiB (the opt-in every kernel with larger tiles needs); a no-op below, and after the first call
// that raised it as far (remembered per kernel: one device per process). So the attribute is set by
// the first eager launch, not while a stream is being captured into a CUDA graph.
template <typename K>
inline void allow_smem(K* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mu;
  static std::map<const void*, size_t> raised;  // kernel -> limit set
  std::lock_guard<std::mutex> lock(mu);
  size_t& have = raised[reinterpret_cast<const void*>(kernel)];
  if (have >= bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  have = bytes;
}

// Bytes per element of an activation / KV / LoRA dtype (host and device).
inline size_t dtype_bytes(int t) { return t == kF32 ? 4 : 2; }

// Eight consecutive 16-bit weights (one 16-byte load) unpacked to fp32.
template <int WT>
__device__ __forceinline__ void unpack8(const uint4& u, float* out) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (WT == kBF16) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      out[2 * i] = f16_bits_to_f32(uint16_t(w[i] & 0xFFFF));
      out[2 * i + 1] = f16_bits_to_f32(uint16_t(w[i] >> 16));
    }
  }
}

// 8 consecutive elements of dtype DT (F32, BF16 or F16: weights, activations, LoRA rows) from a
// 16-byte aligned address, as fp32: two float4 loads, or one uint4 of 16-bit values unpacked.
template <int DT>
__device__ __forceinline__ void load8(const void* p, size_t at, float* out) {
  if (DT == kF32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + at);
    const float4 a = q[0], b = q[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
    unpack8<DT>(*reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + at), out);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; it may be reused after the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : -INFINITY;
  return warp_max(v);
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

}  // namespace loraplex::cuda
