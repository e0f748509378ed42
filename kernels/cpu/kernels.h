// CPU compute kernels. Each operation has a plain-loop reference (`*_ref`, the oracle for tests)
// and an optimised version (SIMD chosen at run time, OpenMP across cores).
// Thread safety: kernels are re-entrant; the optimised ones open their own OpenMP parallel region,
// so call them from one thread at a time (the engine thread).
#pragma once
#include <cstddef>
#include <cstdint>

namespace loraplex::cpu {

enum class WType : int { F32 = 0, BF16 = 1, F16 = 2 };

size_t wtype_size(WType t);
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // round to nearest even; finite inputs
float f16_to_f32(uint16_t h);
// Converts n weights of type t starting at element offset `off` into fp32.
void convert_row(const void* w, WType t, size_t off, int n, float* out);

// y[T, N] = x[T, K] . W[N, K]^T (+ bias[N]); fp32 accumulation, W in its stored dtype.
// The optimised kernel reads W packed (pack_weights, once at load): groups of 16 rows interleaved
// by column, P[g][k][l] = W[16 g + l][k], rows past N zero; packed_elems(N, K) elements.
size_t packed_elems(int N, int K);
void pack_weights(const void* W, WType t, int N, int K, void* out);
void matmul_packed(const float* x, int T, int K, const void* P, WType wt, int N, const float* bias, float* y);
// Row-major convenience (packs W into a temporary first): for tests and one-off products.
void matmul(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y);
void matmul_ref(const float* x, int T, int K, const void* W, WType wt, int N, const float* bias, float* y);

// BF16 weights with BF16-rounded activations (--compute-dtype bfloat16): y = bf16(x) . W^T with
// fp32 products and sums, on the AVX512-BF16 dot-product instruction (has_bf16_dot() must be true).
// W packed by pack_weights_bf16_pairs: groups of 16 rows, column pairs interleaved,
// P[g][p][l][h] = W[16 g + l][2 p + h], N padded to 16 and K to even with zeros.
bool has_bf16_dot();
size_t packed_pairs_elems(int N, int K);  // uint16 elements
void pack_weights_bf16_pairs(const uint16_t* W, int N, int K, uint16_t* out);
void matmul_bf16_pairs(const float* x, int T, int K, const uint16_t* P, int N, const float* bias, float* y);

// y[T, H] = x / rms(x) * w, rms over H with eps (HF LlamaRMSNorm: fp32 variance).
void rmsnorm(const float* x, const float* w, int T, int H, float eps, float* y);

// out[T, H] = embedding rows of ids, converted to fp32, times `scale` in fp32 (Gemma multiplies by
// sqrt(hidden) as an fp32 scalar; 1 leaves the rows exact).
void embed(const int32_t* ids, int T, const void* table, WType wt, int H, float* out, float scale = 1.0f);

// Which SIMD build the dispatched kernels use ("avx512", "avx2", "generic"); set_isa() switches
// (false if this CPU cannot run it). Default: the best the CPU has, or LORAPLEX_ISA.
const char* active_isa();
bool set_isa(const char* name);

// cos/sin tables [T, half] for the positions (shared by every layer and by q and k in one step).
void rope_table(const int32_t* positions, int T, const float* inv_freq, int half, float attn_scale, float* cs,
                float* sn);
// In-place rotation of x [T, n_heads, head_dim] with those tables. Partial rotary (Phi-3/Phi-4):
// only the first rot_dim dimensions of each head rotate (pairs i, i + rot_dim/2; tables [T, rot_dim/2]),
// the rest pass through; rot_dim 0 means head_dim.
void rope_apply(float* x, int T, int n_heads, int head_dim, const float* cs, const float* sn, int rot_dim = 0);

// In-place rotary embedding (rotate-half convention, as HF Llama/Qwen2/Mistral).
// x: [T, n_heads, head_dim]; inv_freq: [head_dim/2]; scale multiplies cos and sin.
void rope(float* x, int T, int n_heads, int head_dim, const int32_t* positions, const float* inv_freq,
          float attn_scale);

// act[T, I] = silu(gate[T, I]) * up[T, I]  (gate_up: [T, 2, I] is not used; two buffers)
void silu_mul(const float* gate, const float* up, int T, int I, float* act);
// act[T, I] = gelu_tanh(gate) * up (GeGLU, Gemma's gelu_pytorch_tanh):
// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
void gelu_tanh_mul(const float* gate, const float* up, int T, int I, float* act);
// In place x[n] = cap * tanh(x / cap) (Gemma 2's final-logit soft-capping); cap > 0.
void softcap(float* x, size_t n, float cap);
// Plain-loop oracles of the two above (std::tanh).
void gelu_tanh_mul_ref(const float* gate, const float* up, size_t n, float* act);
void softcap_ref(float* x, size_t n, float cap);

// Paged KV-cache layout inside one page (one block of `block_size` tokens, all layers):
//   [layer][k|v][block_size][n_kv_heads][head_dim], fp32 or (CPU, --kv-cache-dtype bfloat16) BF16.
struct KvLayout {
  int n_layers, block_size, n_kv_heads, head_dim;
  size_t page_bytes;  // page stride in the pool (>= elements_per_block * element size)
  bool bf16 = false;  // elements stored as BF16 (rounded to nearest even by kv_write)
  size_t layer_stride() const { return size_t(2) * block_size * n_kv_heads * head_dim; }  // elements
  size_t elem_bytes() const { return bf16 ? 2 : 4; }
};

// The batch geometry shared by KV writes and attention.
struct AttnBatch {
  int n_seqs;
  const int32_t* query_start;   // [S+1] token offsets of each sequence's new tokens
  const int32_t* context_lens;  // [S] tokens in the KV cache after this step (incl. new ones)
  const int32_t* block_tables;  // [S, max_blocks]
  int max_blocks;
  int sliding_window;           // 0 = none; else attend to keys in (p - window, p]
  float softcap = 0.f;          // 0 = none; else scores s -> softcap * tanh(s / softcap) before softmax (Gemma 2)
};

// Writes k, v ([T, n_kv, hd]) of layer `layer` into their pages.
void kv_write(uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* k, const float* v);

// out[T, n_heads, hd] = causal softmax(q k^T * scale) v over the paged cache of each sequence (scores
// soft-capped first when B.softcap > 0; keys limited to B.sliding_window when set).
void paged_attention(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B, const float* q,
                     int n_heads, float scale, float* out);
void paged_attention_ref(const uint8_t* pool, const KvLayout& L, int layer, const AttnBatch& B,
                         const float* q, int n_heads, float scale, float* out);

}  // namespace loraplex::cpu

namespace loraplex::cpu {

// LoRA for one projection of one layer, y[T, out] += s_a * (x[T, in] . A_a^T) . B_a for each token's
// adapter a. Adapter rows live in the unified pool: A_a has r_a rows of length `in`, B_a^T has r_a
// rows of length `out`; row j of each is reached through a byte-offset table into the pool.
struct LoraRef {
  int rank = 0;                  // 0: this adapter does not touch this projection
  float scale = 0.f;             // alpha / r (or alpha / sqrt(r) with rsLoRA)
  const int64_t* a_rows = nullptr;  // [rank] byte offsets of A rows (length in)
  const int64_t* b_rows = nullptr;  // [rank] byte offsets of B^T rows (length out)
  bool bf16 = false;             // rows stored as BF16 (--lora-dtype bfloat16), else fp32
};

// A run of consecutive tokens that share one adapter (SGMV's segment).
struct LoraSegment {
  int start, end;  // token range [start, end)
  int slot;        // index into the LoraRef array; refs[slot].rank == 0 means no LoRA
};

// One projection's LoRA: its adapter table (indexed by slot) and its output y[T, out], to which
// the LoRA is added. The kernels below take several targets that share the input x (q, k and v,
// or gate and up), so one pass schedules all of them.
struct LoraTarget {
  const LoraRef* refs;
  int out;
  float* y;
};

// SGMV-style: per segment, A rows are read once and applied to every token of the segment.
// z: scratch of at least n_targets * T * (the largest rank) floats.
void lora_sgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const LoraSegment* segs, int n_segs,
               const float* x, int in, float* z);
// Adapter rows into the pool's format, for the loader: src values (F32 or BF16) -> fp32 or BF16
// (bf16) rows, rounding to nearest even; the same pass records max |x| and non-finite values.
struct RowScan {
  float amax = 0.f;
  uint32_t nonfinite = 0;
};
// n contiguous values -> one row.
void lora_pack_rows(const void* src, WType st, size_t n, void* dst, bool bf16, RowScan& sc);
// src [out, rank] row-major -> rank rows of `out` (dst[j][o] = src[o][j]).
void lora_pack_transposed(const void* src, WType st, int out, int rank, void* const* dst, bool bf16, RowScan& sc);
// BGMV-style: per-token gather of the adapter (token_slot[t] indexes refs), for decode batches.
void lora_bgmv(const uint8_t* pool, const LoraTarget* targets, int n_targets, const int32_t* token_slot, int T,
               const float* x, int in, float* z);
// Plain loops over every token: the oracle for both.
void lora_ref(const uint8_t* pool, const LoraRef* refs, const int32_t* token_slot, int T, const float* x, int in,
              float* y, int out);

}  // namespace loraplex::cpu
