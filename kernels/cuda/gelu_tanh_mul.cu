// GeGLU activation (Gemma): act = gelu_tanh(gate) * up, element-wise, with the tanh approximation
// (HF's gelu_pytorch_tanh; the kernel: glu.cuh).
#include "kernels/cuda/glu.cuh"

namespace loraplex::cuda {

namespace {

struct GeluTanh {
  __device__ __forceinline__ float operator()(float g) const {
    // sqrt(2/pi) and the cubic coefficient, in fp32 as PyTorch's kernel uses them; tanhf (not a
    // fast approximation): bandwidth-bound anyway, and it keeps the CPU oracle's accuracy.
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
    return 0.5f * g * (1.0f + tanhf(beta * (g + kappa * (g * g * g))));
  }
};

}  // namespace

void gelu_tanh_mul(const void* gate, const void* up, size_t n, void* act, cudaStream_t stream, int at) {
  glu::launch<GeluTanh>(gate, up, n, act, stream, at, "gelu_tanh_mul");
}

}  // namespace loraplex::cuda
