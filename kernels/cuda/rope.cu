// Rotary embedding of q and k in one launch (rotate-half convention, as HF Llama / Qwen2 /
// Mistral). inv_freq comes from the Model, which has already applied none / linear / llama3
// scaling, so this kernel is the same for all of them.
#include "kernels/cuda/launchers.cuh"

namespace loraplex::cuda {

namespace {

template <int AT>
__global__ void __launch_bounds__(128) rope_kernel(void* __restrict__ q_,                  // [T, n_q, hd]
                                                   int n_q,
                                                   void* __restrict__ k_,                  // [T, n_k, hd] or null
                                                   int n_k, int hd, int rot,
                                                   const int32_t* __restrict__ positions,  // [T]
                                                   const float* __restrict__ inv_freq,     // [rot/2]
                                                   float attn_scale,
                                                   const float* __restrict__ inv_freq_alt,  // [rot/2] or null
                                                   const int32_t* __restrict__ token_alt) { // [T] or null
  // Dimensions at and past `rot` (partial rotary) pass through untouched.
  using E = Elem<AT>;
  auto* q = static_cast<typename E::T*>(q_);
  auto* k = static_cast<typename E::T*>(k_);
  const int t = blockIdx.x, half = rot / 2;
  const float pos = float(positions[t]);
  if (token_alt && token_alt[t]) inv_freq = inv_freq_alt;  // LongRoPE: this token's sequence is past the original context
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    // One cos/sin per (token, frequency), reused by every head. The angle is the fp32 product the
    // reference computes; cosf/sinf (not __cosf) because angles reach 1e5 rad at long positions.
    const float f = inv_freq[i] * pos;
    const float c = cosf(f) * attn_scale, s = sinf(f) * attn_scale;
    for (int h = 0; h < n_q; h++) {
      auto* v = q + (size_t(t) * n_q + h) * hd;
      const float a = E::load(v, i), b = E::load(v, i + half);
      E::store(v, i, a * c - b * s);
      E::store(v, i + half, b * c + a * s);
    }
    if (k)
      for (int h = 0; h < n_k; h++) {
        auto* v = k + (size_t(t) * n_k + h) * hd;
        const float a = E::load(v, i), b = E::load(v, i + half);
        E::store(v, i, a * c - b * s);
        E::store(v, i + half, b * c + a * s);
      }
  }
}

}  // namespace

void rope(void* q, int n_q_heads, void* k, int n_k_heads, int T, int head_dim, const int32_t* positions,
          const float* inv_freq, float attn_scale, cudaStream_t stream, int rot_dim, const float* inv_freq_alt,
          const int32_t* token_alt, int at) {
  if (T <= 0) return;
  const int rot = rot_dim > 0 ? rot_dim : head_dim;
  // Threads over frequencies: for each head, consecutive threads touch consecutive floats.
  const int threads = rot / 2 >= 128 ? 128 : ((rot / 2 + 31) / 32) * 32;
  const int32_t* alt = inv_freq_alt ? token_alt : nullptr;
  if (at == kBF16)
    LP_LAUNCH(rope_kernel<kBF16>, dim3(T), dim3(threads), 0, stream, q, n_q_heads, k, n_k_heads, head_dim, rot,
              positions, inv_freq, attn_scale, inv_freq_alt, alt);
  else
    LP_LAUNCH(rope_kernel<kF32>, dim3(T), dim3(threads), 0, stream, q, n_q_heads, k, n_k_heads, head_dim, rot,
              positions, inv_freq, attn_scale, inv_freq_alt, alt);
  check_launch("rope");
}

}  // namespace loraplex::cuda
