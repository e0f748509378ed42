// SwiGLU activation: act = silu(gate) * up, element-wise (the kernel: glu.cuh).
#include "kernels/cuda/glu.cuh"

namespace loraplex::cuda {

namespace {

struct Silu {
  // expf, not __expf: the fast intrinsic loses accuracy for large |g| and the kernel is
  // bandwidth-bound anyway.
  __device__ __forceinline__ float operator()(float g) const { return g / (1.0f + expf(-g)); }
};

}  // namespace

void silu_mul(const void* gate, const void* up, size_t n, void* act, cudaStream_t stream, int at) {
  glu::launch<Silu>(gate, up, n, act, stream, at, "silu_mul");
}

}  // namespace loraplex::cuda
