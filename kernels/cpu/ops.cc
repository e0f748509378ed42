// Element-wise and row-wise ops of the Llama block: embedding gather, RMSNorm, RoPE, SiLU*up
// (compiled once per ISA; see dispatch.cc).
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "kernels/cpu/isa.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu::LP_ISA_NS {

void embed(const int32_t* ids, int T, const void* table, WType wt, int H, float scale, float* out) {
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    float* o = out + size_t(t) * H;
    convert_row(table, wt, size_t(ids[t]) * H, H, o);
    if (scale != 1.0f) {
#pragma omp simd
      for (int i = 0; i < H; i++) o[i] *= scale;
    }
  }
}

void rmsnorm(const float* x, const float* w, int T, int H, float eps, float* y) {
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    const float* xr = x + size_t(t) * H;
    float* yr = y + size_t(t) * H;
    // fp32 sum of squares as the reference computes it; double here only lowers rounding noise.
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < H; i++) ss += double(xr[i]) * xr[i];
    const float inv = 1.0f / std::sqrt(float(ss / H) + eps);
    for (int i = 0; i < H; i++) yr[i] = w[i] * (xr[i] * inv);
  }
}

void rope_table(const int32_t* positions, int T, const float* inv_freq, int half, float attn_scale, float* cs,
                float* sn) {
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    const float pos = float(positions[t]);
    for (int i = 0; i < half; i++) {
      // fp32 product exactly like the reference's freqs = inv_freq (x) positions
      const float f = inv_freq[i] * pos;
      cs[size_t(t) * half + i] = std::cos(f) * attn_scale;
      sn[size_t(t) * half + i] = std::sin(f) * attn_scale;
    }
  }
}

void rope_apply(float* x, int T, int n_heads, int head_dim, int rot_dim, const float* cs, const float* sn) {
  const int half = rot_dim / 2;  // dimensions past rot_dim pass through
#pragma omp parallel for schedule(static) if (T > 8)
  for (int t = 0; t < T; t++) {
    const float* c = cs + size_t(t) * half;
    const float* s = sn + size_t(t) * half;
    for (int h = 0; h < n_heads; h++) {
      float* v = x + (size_t(t) * n_heads + h) * head_dim;
#pragma omp simd
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

// sigmoid(g) from e = exp(-|g|) <= 1 (exp_nonpos vectorises; std::exp is a scalar libm call):
// 1 / (1 + e) for g >= 0, e / (1 + e) below. Relative error ~2e-7, as libm's.
static void silu_mul_range(const float* gate, const float* up, size_t i0, size_t i1, float* act) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    const float g = gate[i];
    const float e = exp_nonpos(g >= 0.f ? -g : g);
    const float sig = (g >= 0.f ? 1.0f : e) / (1.0f + e);
    act[i] = g * sig * up[i];
  }
}

void silu_mul(const float* gate, const float* up, int T, int I, float* act) {
  const size_t n = size_t(T) * I;
  // Not `parallel for simd if (...)`: GCC then emits the SIMD body only for the parallel case and
  // a scalar loop below the threshold (a decode step's 16 x 1536 ran scalar: 5 ms of a 28 ms step).
  if (n <= 65536) return silu_mul_range(gate, up, 0, n, act);
#pragma omp parallel
  {
    const size_t nt = size_t(omp_get_num_threads()), id = size_t(omp_get_thread_num());
    const size_t chunk = (n + nt - 1) / nt / 16 * 16 + 16;
    const size_t i0 = std::min(n, id * chunk), i1 = std::min(n, i0 + chunk);
    silu_mul_range(gate, up, i0, i1, act);
  }
}

// Element-wise ops of n floats: in one thread up to 64K elements (a decode step), else split into
// contiguous 16-aligned chunks, one per thread (the `if` clause on `parallel for simd` made GCC
// emit the SIMD body only for the parallel case; see silu_mul).
template <typename F>
static void split_elementwise(size_t n, F&& range) {
  if (n <= 65536) return range(size_t(0), n);
#pragma omp parallel
  {
    const size_t nt = size_t(omp_get_num_threads()), id = size_t(omp_get_thread_num());
    const size_t chunk = (n + nt - 1) / nt / 16 * 16 + 16;
    const size_t i0 = std::min(n, id * chunk), i1 = std::min(n, i0 + chunk);
    range(i0, i1);
  }
}

static void gelu_tanh_mul_range(const float* gate, const float* up, size_t i0, size_t i1, float* act) {
  // sqrt(2/pi) and the cubic coefficient of the tanh approximation, in fp32 as PyTorch uses them.
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
#pragma omp simd
  for (size_t i = i0; i < i1; i++) {
    const float g = gate[i];
    const float inner = beta * (g + kappa * (g * g * g));
    act[i] = 0.5f * g * (1.0f + tanh_fast(inner)) * up[i];
  }
}

void gelu_tanh_mul(const float* gate, const float* up, int T, int I, float* act) {
  split_elementwise(size_t(T) * I, [&](size_t i0, size_t i1) { gelu_tanh_mul_range(gate, up, i0, i1, act); });
}

static void softcap_range(float* x, size_t i0, size_t i1, float cap) {
#pragma omp simd
  for (size_t i = i0; i < i1; i++) x[i] = tanh_fast(x[i] / cap) * cap;
}

void softcap(float* x, size_t n, float cap) {
  split_elementwise(n, [&](size_t i0, size_t i1) { softcap_range(x, i0, i1, cap); });
}

}  // namespace loraplex::cpu::LP_ISA_NS
