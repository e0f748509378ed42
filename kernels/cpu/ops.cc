// Element-wise and row-wise ops of the Llama block: embedding gather, RMSNorm, RoPE, SiLU*up.
#include <omp.h>

#include <cmath>

#include "kernels/cpu/kernels.h"

namespace loraplex::cpu {

void embed(const int32_t* ids, int T, const void* table, WType wt, int H, float* out) {
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) convert_row(table, wt, size_t(ids[t]) * H, H, out + size_t(t) * H);
}

void rmsnorm(const float* x, const float* w, int T, int H, float eps, float* y) {
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    const float* xr = x + size_t(t) * H;
    float* yr = y + size_t(t) * H;
    // fp32 sum of squares as the reference computes it; double here only lowers rounding noise.
    double ss = 0.0;
    for (int i = 0; i < H; i++) ss += double(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(float(ss / H) + eps);
    for (int i = 0; i < H; i++) yr[i] = w[i] * (xr[i] * inv);
  }
}

void rope(float* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
          float attn_scale) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    const float pos = float(positions[t]);
    // cos/sin of (inv_freq * pos) computed in fp32 exactly like the reference's fp32 product.
    float cs[512], sn[512];
    for (int i = 0; i < half; i++) {
      const float f = inv_freq[i] * pos;
      cs[i] = std::cos(f) * attn_scale;
      sn[i] = std::sin(f) * attn_scale;
    }
    for (int h = 0; h < n_heads; h++) {
      float* v = x + (size_t(t) * n_heads + h) * head_dim;
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void silu_mul(const float* gate, const float* up, int T, int I, float* act) {
  const size_t n = size_t(T) * I;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (size_t i = 0; i < n; i++) {
    const float g = gate[i];
    act[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace loraplex::cpu
