// Plain-loop reference kernels: the oracles the optimised (per-ISA) kernels are tested against.
// Compiled once, without ISA flags.
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/kv_access.h"

namespace loraplex::cpu {

void paged_attention_ref(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,
                         int n_heads, float scale, float* out) {
  const int hd = L.head_dim, group = n_heads / L.n_kv_heads;
  std::vector<float> scores;
  for_each_query(B, [&](int s, int t, int pos) {
    const int lo = B.sliding_window > 0 ? std::max(0, pos - B.sliding_window + 1) : 0;
    scores.assign(pos - lo + 1, 0.f);
    for (int h = 0; h < n_heads; h++) {
      const int g = h / group;
      const float* qv = q + (size_t(t) * n_heads + h) * hd;
      float mx = -INFINITY;
      for (int j = lo; j <= pos; j++) {
        const int page = B.block_tables[size_t(s) * B.max_blocks + j / L.block_size];
        const uint8_t* kv = kv_row(pool, L, layer, page, j % L.block_size, 0);
        float d = 0.f;
        for (int i = 0; i < hd; i++) d += qv[i] * kv_at(kv, size_t(g) * hd + i, L.bf16);
        float sc = d * scale;
        if (B.softcap > 0.f) sc = float(std::tanh(double(sc) / B.softcap) * B.softcap);
        scores[j - lo] = sc;
        mx = std::max(mx, sc);
      }
      float sum = 0.f;
      for (auto& x : scores) { x = std::exp(x - mx); sum += x; }
      float* o = out + (size_t(t) * n_heads + h) * hd;
      std::fill(o, o + hd, 0.f);
      for (int j = lo; j <= pos; j++) {
        const int page = B.block_tables[size_t(s) * B.max_blocks + j / L.block_size];
        const uint8_t* vv = kv_row(pool, L, layer, page, j % L.block_size, 1);
        const float w = scores[j - lo] / sum;
        for (int i = 0; i < hd; i++) o[i] += w * kv_at(vv, size_t(g) * hd + i, L.bf16);
      }
    }
  });
}

void gelu_tanh_mul_ref(const float* gate, const float* up, size_t n, float* act) {
  const double beta = std::sqrt(2.0 / 3.141592653589793), kappa = 0.044715;
  for (size_t i = 0; i < n; i++) {
    const double g = gate[i];
    act[i] = float(0.5 * g * (1.0 + std::tanh(beta * (g + kappa * g * g * g))) * up[i]);
  }
}

void softcap_ref(float* x, size_t n, float cap) {
  for (size_t i = 0; i < n; i++) x[i] = float(std::tanh(double(x[i]) / cap) * cap);
}

void lora_ref(const uint8_t* pool, const LoraRef* refs, const int32_t* token_slot, int T, const float* x, int in,
              float* y, int out) {
  std::vector<float> z;
  for (int t = 0; t < T; t++) {
    const LoraRef& r = refs[token_slot[t]];
    if (r.rank == 0) continue;
    z.assign(r.rank, 0.f);
    for (int j = 0; j < r.rank; j++) {
      float acc = 0.f;
      for (int k = 0; k < in; k++) acc += lora_at(pool, r.a_rows[j], k, r.bf16) * x[size_t(t) * in + k];
      z[j] = acc;
    }
    for (int o = 0; o < out; o++) {
      float acc = 0.f;
      for (int j = 0; j < r.rank; j++) acc += z[j] * lora_at(pool, r.b_rows[j], o, r.bf16);
      y[size_t(t) * out + o] += r.scale * acc;
    }
  }
}

}  // namespace loraplex::cpu
