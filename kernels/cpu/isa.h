// Per-ISA compilation of the SIMD-friendly kernels: ops.cc, attention.cc and lora.cc are compiled
// three times (CMake: -DLP_ISA_NS=avx512 | avx2 | generic with matching -m flags) so the compiler
// vectorises their loops for each instruction set; dispatch.cc picks one at run time.
#pragma once
#include "kernels/cpu/kernels.h"

#ifndef LP_ISA_NS
#error "LP_ISA_NS must name the ISA namespace (avx512, avx2 or generic)"
#endif

#define LP_DECLARE_ISA_KERNELS(NS)                                                                                   \
  namespace loraplex::cpu::NS {                                                                                      \
  void embed(const int32_t* ids, int T, const void* table, WType wt, int H, float scale, float* out);               \
  void rmsnorm(const float* x, const float* w, int T, int H, float eps, float* y);                                  \
  void rope_table(const int32_t* positions, int T, const float* inv_freq, int half, float attn_scale, float* cs,    \
                  float* sn);                                                                                        \
  void rope_apply(float* x, int T, int n_heads, int head_dim, int rot_dim, const float* cs, const float* sn);       \
  void silu_mul(const float* gate, const float* up, int T, int I, float* act);                                      \
  void gelu_tanh_mul(const float* gate, const float* up, int T, int I, float* act);                                 \
  void softcap(float* x, size_t n, float cap);                                                                      \
  void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v);   \
  void paged_attention(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,       \
                       int n_heads, float scale, float* out);                                                        \
  void lora_sgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const LoraSegment* segs, int n_segs, \
                 const float* x, int in, float* z);                                                                  \
  void lora_bgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const int32_t* token_slot, int T,   \
                 const float* x, int in, float* z);                                                                  \
  void lora_pack_rows(const void* src, WType st, size_t n, void* dst, bool bf16, RowScan& sc);                      \
  void lora_pack_transposed(const void* src, WType st, int out, int rank, void* const* dst, bool bf16, RowScan& sc); \
  }

LP_DECLARE_ISA_KERNELS(LP_ISA_NS)
