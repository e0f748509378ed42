// CUDA kernels of the model step: the one launcher header. Every operation of kernels/cpu has a
// launcher here, implemented in kernels/cuda/<operation>.cu; addon/cuda_backend.cu and the op tests
// (test/cuda/backend_ops_test.cu) call only these.
//
// Conventions
// - All pointers are device pointers unless a comment says "host".
// - Activations, KV cache and LoRA rows are fp32; base weights stay in their stored dtype
//   (WDType: F32, BF16, F16) and are converted to fp32 in registers: accumulation is always fp32,
//   so every kernel computes what the CPU oracle computes, up to summation order.
// - Every launcher enqueues on `stream`, never synchronises, and checks its launch with
//   cudaGetLastError (throwing std::runtime_error naming the kernel). Shapes are given as
//   `// [T, H]` comments on each parameter.
// Thread safety: launchers are re-entrant; callers serialise use of a stream (the engine thread).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cuda/common.cuh"

namespace loraplex::cuda {

// ------------------------------------------------------------------------------------------------
// Element-wise and row-wise ops (embed.cu, rmsnorm.cu, residual_add.cu, rope.cu, silu_mul.cu,
// gelu_tanh_mul.cu, softcap.cu, gather_rows.cu)

// out[t, :] = table[ids[t], :] converted to fp32, times `scale` (Gemma: sqrt(hidden); 1 = exact rows).
void embed(const int32_t* ids,  // [T] token ids, each in [0, V)
           int T,
           const void* table,   // [V, H] in dtype wt
           int wt, int H,
           float* out,          // [T, H]
           cudaStream_t stream, float scale = 1.0f);

// If delta: x += delta (the residual add, written back to x). Then y = x / rms(x) * w, rms over H
// with eps (HF LlamaRMSNorm, fp32). y may alias x. Also the per-head q/k norm (Qwen3, Gemma 3):
// T * heads rows of head_dim, in place. Gemma's (1 + w) is folded into w at load (model.cc).
void rmsnorm(float* x,            // [T, H]
             const float* delta,  // [T, H] or nullptr
             const float* w,      // [H]
             int T, int H, float eps,
             float* y,            // [T, H]
             cudaStream_t stream);

// x += delta over n floats.
void residual_add(float* x,            // [n]
                  const float* delta,  // [n]
                  size_t n, cudaStream_t stream);

// In-place rotary embedding (rotate-half) of q and k with the same positions. inv_freq already
// carries the model's rope scaling (none / linear / llama3: Model::inv_freq); cos and sin are
// multiplied by attn_scale. k may be nullptr (n_k_heads ignored). Partial rotary (Phi-3): only the
// first rot_dim dimensions of each head rotate (pairs i, i + rot_dim/2); 0 means head_dim.
// LongRoPE (Phi-3): tokens with token_alt[t] != 0 rotate with inv_freq_alt (the long factors).
void rope(float* q,                  // [T, n_q_heads, head_dim]
          int n_q_heads,
          float* k,                  // [T, n_k_heads, head_dim] or nullptr
          int n_k_heads, int T, int head_dim,
          const int32_t* positions,  // [T]
          const float* inv_freq,     // [rot_dim / 2]
          float attn_scale, cudaStream_t stream, int rot_dim = 0,
          const float* inv_freq_alt = nullptr,  // [rot_dim / 2] or nullptr
          const int32_t* token_alt = nullptr);  // [T] or nullptr

// act = silu(gate) * up over n floats (n = T * I).
void silu_mul(const float* gate,  // [T, I]
              const float* up,    // [T, I]
              size_t n,
              float* act,         // [T, I]
              cudaStream_t stream);

// act = gelu_tanh(gate) * up over n floats (GeGLU, Gemma's gelu_pytorch_tanh):
// gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
void gelu_tanh_mul(const float* gate,  // [T, I]
                   const float* up,    // [T, I]
                   size_t n,
                   float* act,         // [T, I]
                   cudaStream_t stream);

// In place x = cap * tanh(x / cap) over n floats (Gemma 2's final-logit soft-capping), cap > 0.
void softcap(float* x,  // [n]
             size_t n, float cap, cudaStream_t stream);

// out[i, :] = x[rows[i], :]  (the last token of each sampled sequence).
void gather_rows(const float* x,       // [T, H]
                 const int32_t* rows,  // [n] indices into T
                 int n, int H,
                 float* out,           // [n, H]
                 cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Base-weight GEMM (gemm_simt.cu; the dispatching wrapper with cuBLAS is gemm.cuh)

// y = x . W^T (+ bias), fp32 accumulation, W in its stored dtype. For T <= kSkinnyMaxT (decode):
// one warp per output row streams W once with 16-byte loads for all T tokens, so decode runs at
// memory bandwidth. Needs nothing but T <= kSkinnyMaxT.
constexpr int kSkinnyMaxT = 8;
void gemm_skinny(const float* x,     // [T, K]
                 int T, int K,
                 const void* W,      // [N, K] dtype wt
                 int wt, int N,
                 const float* bias,  // [N] or nullptr
                 float* y,           // [T, N]
                 cudaStream_t stream);
// Any T: 64x64 output tiles, W converted to fp32 as it is staged in shared memory, 4x4 register
// blocking. The fallback for T > kSkinnyMaxT when cuBLAS is absent (SIMT fp32, no tensor cores).
void gemm_tiled(const float* x,     // [T, K]
                int T, int K,
                const void* W,      // [N, K] dtype wt
                int wt, int N,
                const float* bias,  // [N] or nullptr
                float* y,           // [T, N]
                cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Paged KV cache and attention (kv_write.cu, attention_decode.cu, attention_prefill.cu)
//
// Dtypes: activations (q, k, v, out) are `at` in {kF32, kBF16}; the pool's K/V elements are L.kt in
// {kF32, kBF16}. Softmax and accumulation are fp32 everywhere; BF16 values are rounded to nearest
// even where stored (KV pages, outputs).
// Graph padding: a sequence with context_lens[s] == 0 is a padding entry (a CUDA graph captured for
// a larger batch): kv_write writes nothing for its tokens and attention writes zeros for them,
// neither reading its block table.

// The page layout of kernels/cpu (KvLayout): inside each page, [layer][k|v][block_size][n_kv_heads]
// [head_dim] elements of dtype kt (dtype_bytes(kt) each); pages are page_bytes apart in the pool.
struct KvLayout {
  int n_layers, block_size, n_kv_heads, head_dim;
  size_t page_bytes;
  int kt = kF32;  // element dtype of K and V in the pool: kF32 or kBF16 (cpu::KvLayout::bf16)
};

// The step's batch geometry (the device copy of cpu::AttnBatch plus token -> sequence). A token t of
// sequence s sits at position context_lens[s] - (query_start[s+1] - query_start[s]) + (t - query_start[s]).
struct AttnBatch {
  int n_seqs;
  const int32_t* query_start;   // [S+1]
  const int32_t* context_lens;  // [S] KV length after this step (incl. this step's tokens); 0 = padding
  const int32_t* block_tables;  // [S, max_blocks] page ids
  const int32_t* token_seq;     // [T] the sequence of each token
  int max_blocks;
  int sliding_window;           // 0 = none; else keys j with pos - window < j <= pos
  float softcap = 0.f;          // 0 = none; else scores s -> softcap * tanh(s / softcap) before softmax
};

// Writes this step's k, v of layer `layer` into their pages, converted to L.kt (BF16: round to
// nearest even, bit-exact with cpu::kv_write on a cpu::KvLayout with bf16). Tokens at a negative
// position (those of padding sequences) are skipped.
void kv_write(uint8_t* pool,      // [num_pages * page_bytes]
              const KvLayout& L, int layer, const AttnBatch& B,
              int T,
              const void* k,      // [T, n_kv_heads, head_dim] dtype at
              const void* v,      // [T, n_kv_heads, head_dim] dtype at
              int at, cudaStream_t stream);

// Per-query paged attention (flash-decoding): one block per (token, KV head, split) computes all the
// query heads of that KV head's group (GQA: each K/V row is read once for the group; groups of more
// than kDecodeMaxGroup heads take ceil(group / kDecodeMaxGroup) blocks). Each query cuts its own key
// span into n_splits partitions of decode_partition_len(span, n_splits) keys; a block walks its
// partition in chunks with an online softmax, and for n_splits > 1 a second kernel merges the
// non-empty partitions through `workspace` by their (max, sum) statistics.
// CUDA graphs: n_splits is the caller's choice and nothing of the launch depends on context lengths
// (grid, smem and arguments are the same for any context_lens / block_tables in device memory), so
// one captured launch is correct for every replay; partitions beyond a short query's keys are empty
// and contribute nothing. Works for any token of any step and any head_dim (the fallback of the
// prefill kernel).
constexpr int kDecodeMaxGroup = 8;      // query heads per block
constexpr int kDecodeGranule = 32;      // partitions are a multiple of this many keys
constexpr int kDecodePartition = 512;   // eager launches: about this many keys per split
// Keys per partition of a query whose span (keys it sees) is `span`, cut into n_splits.
__host__ __device__ inline int decode_partition_len(int span, int n_splits) {
  const int per = (span + n_splits - 1) / n_splits;
  return (per + kDecodeGranule - 1) / kDecodeGranule * kDecodeGranule;
}
// Splits for an eager launch whose longest attention span is max_span: ~kDecodePartition keys each.
inline int decode_splits(int max_span) { return max_span <= kDecodePartition ? 1 : ceil_div(max_span, kDecodePartition); }
// Splits for a launch that must serve any span up to max_span_cap (a captured graph): enough
// (token, KV head, split) blocks to give each of n_sms SMs about two, but no partition shorter than
// ~kDecodePartition / 2 keys at the cap and at most 64 splits. T * n_kv_heads already >= 2 n_sms: 1.
inline int decode_splits_for(int T, int n_kv_heads, int max_span_cap, int n_sms) {
  const long blocks = long(T) * n_kv_heads;
  if (blocks <= 0 || blocks >= 2L * n_sms) return 1;
  const int want = ceil_div(2L * n_sms, blocks);
  const int by_len = ceil_div(max_span_cap, kDecodePartition / 2);
  int n = want < by_len ? want : by_len;
  n = n < 64 ? n : 64;
  return n < 1 ? 1 : n;
}
// Floats of workspace for T tokens (0 when n_splits == 1).
inline size_t decode_workspace_floats(int T, int n_heads, int head_dim, int n_splits) {
  return n_splits == 1 ? 0 : size_t(T) * n_heads * n_splits * (head_dim + 2);
}
void paged_attention_decode(const uint8_t* pool,  // [num_pages * page_bytes]
                            const KvLayout& L, int layer, const AttnBatch& B,
                            int T,
                            const void* q,        // [T, n_heads, head_dim] dtype at
                            int at, int n_heads, float scale,
                            int n_splits,         // decode_splits(longest span) or decode_splits_for(...)
                            float* workspace,     // [decode_workspace_floats(...)] or nullptr if 1 split
                            void* out,            // [T, n_heads, head_dim] dtype at
                            cudaStream_t stream);

// Query-tiled paged attention for prefill and chunked prefill (flash-attention style, online
// softmax): one block per tile of up to kPrefillTileQ consecutive tokens of one sequence; each K/V
// tile is staged in shared memory once for all the tile's queries. Two kernels:
// - fp32 SIMT (at == kF32, or head_dim not a multiple of 16): one block per (tile, head);
// - tensor cores (at == kBF16 and head_dim % 16 == 0, head_dim <= 256; prefill_path() ==
//   kPrefillWmma): one block per (tile, KV head, group of up to 4 query heads), one warp per query
//   head; S = Q K^T and O += P V on BF16 wmma fragments with fp32 accumulators, K/V staged as BF16
//   (converted while staging when kt == kF32), P rounded to BF16, O and the softmax in fp32.
constexpr int kPrefillTileQ = 16;
enum PrefillPath : int { kPrefillNone = 0, kPrefillSimt = 1, kPrefillWmma = 2 };
inline int prefill_path(int head_dim, int at) {
  if (head_dim > 256) return kPrefillNone;  // use paged_attention_decode
  return at == kBF16 && head_dim % 16 == 0 ? kPrefillWmma : kPrefillSimt;
}
inline bool prefill_supported(int head_dim) { return head_dim <= 256; }
// host: (sequence, first token) of every query tile of the step: [n_tiles, 2].
std::vector<int32_t> make_prefill_tiles(const int32_t* query_start, int n_seqs);
void paged_attention_prefill(const uint8_t* pool,   // [num_pages * page_bytes]
                             const KvLayout& L, int layer, const AttnBatch& B,
                             const int32_t* tiles,  // [n_tiles, 2] from make_prefill_tiles
                             int n_tiles,
                             const void* q,         // [T, n_heads, head_dim] dtype at
                             int at, int n_heads, float scale,
                             void* out,             // [T, n_heads, head_dim] dtype at
                             cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Heterogeneous LoRA (lora_shrink.cu, lora_expand.cu): y += s_a * (x . A_a^T) . B_a per token's
// adapter a, rows read from the unified pool through per-adapter row-offset tables, exactly as
// CpuBackend::install_adapter / place_rows lay them out (fp32 rows at byte offsets into the pool).

// One adapter's view of one (layer, projection). The same bytes on host and device.
struct LoraRef {
  int rank = 0;                     // 0: the adapter does not touch this projection
  float scale = 0.f;                // alpha / r (or alpha / sqrt(r))
  const int64_t* a_rows = nullptr;  // [rank] device: byte offsets of A rows (length in) in the pool
  const int64_t* b_rows = nullptr;  // [rank] device: byte offsets of B^T rows (length out)
};
// refs: the ref of slot s is refs[s * ref_stride] (the backend keeps [slot][layer][proj]).

// BGMV (decode: per-token adapter index). Shrink: z[t, j] = s_a * A_a[j, :] . x[t, :] for j < r_a
// (0 for r_a <= j < max_rank). Expand: y[t, :] += sum_j z[t, j] B_a^T[j, :].
void lora_shrink_bgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride,
                      const int32_t* token_slot,  // [T]
                      int T,
                      const float* x,             // [T, in]
                      int in,
                      float* z,                   // [T, max_rank]
                      int max_rank, cudaStream_t stream);
void lora_expand_bgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride,
                      const int32_t* token_slot,  // [T]
                      int T,
                      const float* z,             // [T, max_rank]
                      int max_rank,
                      float* y,                   // [T, out]
                      int out, cudaStream_t stream);

// SGMV (prefill / mixed: segments of consecutive tokens sharing an adapter, cut into tiles of at
// most kSgmvTileT tokens): each A / B^T row chunk staged in shared memory serves the whole tile,
// i.e. a small GEMM per segment instead of per-token dots.
constexpr int kSgmvTileT = 32;
// host: tiles (t0, t1, slot) over the runs of equal token_slot, slot 0 (base model) skipped: [n, 3].
std::vector<int32_t> make_sgmv_tiles(const int32_t* token_slot, int T);
void lora_shrink_sgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride,
                      const int32_t* tiles,  // [n_tiles, 3] from make_sgmv_tiles
                      int n_tiles,
                      const float* x,        // [T, in]
                      int in,
                      float* z,              // [T, max_rank] (rows of tiled tokens written)
                      int max_rank, cudaStream_t stream);
void lora_expand_sgmv(const uint8_t* pool, const LoraRef* refs, int ref_stride,
                      const int32_t* tiles,  // [n_tiles, 3]
                      int n_tiles,
                      const float* z,        // [T, max_rank]
                      int max_rank,
                      float* y,              // [T, out]
                      int out, cudaStream_t stream);

}  // namespace loraplex::cuda
