// Run-time ISA selection for the per-ISA kernels (see isa.h): AVX-512 (F/BW/VL) where the CPU has
// it, else AVX2+FMA, else the portable build. LORAPLEX_ISA=avx512|avx2|generic forces one (tests
// run every variant this machine can execute).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels/cpu/kernels.h"

#define LP_ISA_NS generic
#include "kernels/cpu/isa.h"
#undef LP_ISA_NS
LP_DECLARE_ISA_KERNELS(avx2)
LP_DECLARE_ISA_KERNELS(avx512)

namespace loraplex::cpu {

namespace {

enum class Isa { Generic, Avx2, Avx512 };

bool cpu_has(Isa i) {
  switch (i) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("fma");
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    default: return true;
  }
}

Isa parse(const std::string& s) {
  if (s == "avx512") return Isa::Avx512;
  if (s == "avx2") return Isa::Avx2;
  if (s == "generic") return Isa::Generic;
  throw std::runtime_error("unknown ISA '" + s + "' (avx512, avx2, generic)");
}

Isa detect() {
  if (const char* e = std::getenv("LORAPLEX_ISA")) {
    Isa want = parse(e);
    if (!cpu_has(want)) throw std::runtime_error(std::string("LORAPLEX_ISA=") + e + ": this CPU cannot run it");
    return want;
  }
  return cpu_has(Isa::Avx512) ? Isa::Avx512 : cpu_has(Isa::Avx2) ? Isa::Avx2 : Isa::Generic;
}

Isa& current() {
  static Isa v = detect();
  return v;
}

}  // namespace

const char* active_isa() {
  switch (current()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

bool set_isa(const char* name) {
  Isa want = parse(name);
  if (!cpu_has(want)) return false;
  current() = want;
  return true;
}

#define LP_DISPATCH(fn, ...)                         \
  switch (current()) {                               \
    case Isa::Avx512: return avx512::fn(__VA_ARGS__); \
    case Isa::Avx2: return avx2::fn(__VA_ARGS__);     \
    default: return generic::fn(__VA_ARGS__);         \
  }

void embed(const int32_t* ids, int T, const void* table, WType wt, int H, float* out, float scale) {
  LP_DISPATCH(embed, ids, T, table, wt, H, scale, out)
}
void rmsnorm(const float* x, const float* w, int T, int H, float eps, float* y) { LP_DISPATCH(rmsnorm, x, w, T, H, eps, y) }
void rope_table(const int32_t* positions, int T, const float* inv_freq, int half, float attn_scale, float* cs, float* sn) {
  LP_DISPATCH(rope_table, positions, T, inv_freq, half, attn_scale, cs, sn)
}
void rope_apply(float* x, int T, int n_heads, int head_dim, const float* cs, const float* sn, int rot_dim) {
  LP_DISPATCH(rope_apply, x, T, n_heads, head_dim, rot_dim > 0 ? rot_dim : head_dim, cs, sn)
}
void silu_mul(const float* gate, const float* up, int T, int I, float* act) { LP_DISPATCH(silu_mul, gate, up, T, I, act) }
void gelu_tanh_mul(const float* gate, const float* up, int T, int I, float* act) {
  LP_DISPATCH(gelu_tanh_mul, gate, up, T, I, act)
}
void softcap(float* x, size_t n, float cap) { LP_DISPATCH(softcap, x, n, cap) }
void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v) {
  LP_DISPATCH(kv_write, pool, L, layer, B, k, v)
}
void paged_attention(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q, int n_heads,
                     float scale, float* out) {
  LP_DISPATCH(paged_attention, pool, L, layer, B, q, n_heads, scale, out)
}
void lora_sgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const LoraSegment* segs, int n_segs,
               const float* x, int in, float* z) {
  LP_DISPATCH(lora_sgmv, pool, targets, n_targets, segs, n_segs, x, in, z)
}
void lora_bgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const int32_t* token_slot, int T,
               const float* x, int in, float* z) {
  LP_DISPATCH(lora_bgmv, pool, targets, n_targets, token_slot, T, x, in, z)
}
void lora_pack_rows(const void* src, WType st, size_t n, void* dst, bool bf16, RowScan& sc) {
  LP_DISPATCH(lora_pack_rows, src, st, n, dst, bf16, sc)
}
void lora_pack_transposed(const void* src, WType st, int out, int rank, void* const* dst, bool bf16, RowScan& sc) {
  LP_DISPATCH(lora_pack_transposed, src, st, out, rank, dst, bf16, sc)
}

// rope() = table + apply, for callers that rotate one tensor (the backend shares one table per step).
void rope(float* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq, float attn_scale) {
  const int half = head_dim / 2;
  float* cs = new float[size_t(T) * half * 2];
  float* sn = cs + size_t(T) * half;
  rope_table(positions, T, inv_freq, half, attn_scale, cs, sn);
  rope_apply(x, T, n_heads, head_dim, cs, sn);
  delete[] cs;
}

}  // namespace loraplex::cpu
