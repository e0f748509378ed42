// Base model: configuration (normalised by TypeScript from config.json) and weights, which stay in
// their stored dtype inside the mmapped safetensors files (no fp32 copy of the big matrices).
// Thread safety: load_model() may run on any thread; a loaded Model is immutable and shared
// read-only by the engine thread.
#pragma once
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "addon/load_progress.h"
#include "addon/safetensors.h"
#include "kernels/cpu/kernels.h"

namespace loraplex {

enum class RopeType { None, Linear, Llama3, LongRope };
enum class Activation { Silu, GeluTanh };

// The normalised family spec (DESIGN.md: a family is a set of features the one forward reads, not
// a forward of its own). TypeScript (server/engine/model-config.ts) derives it from config.json.
struct ModelSpec {
  std::string arch;  // "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3"
  int hidden = 0, intermediate = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab = 0;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  RopeType rope_type = RopeType::None;
  float rope_factor = 1.f, rope_low_freq_factor = 1.f, rope_high_freq_factor = 4.f;
  int rope_original_max = 8192;
  // LongRoPE (Phi-3): per-frequency divisors [rot_dim/2] for sequences up to rope_original_max
  // tokens (short) and beyond (long), and the cos/sin scale (attention factor) for both.
  std::vector<float> rope_short_factor, rope_long_factor;
  float rope_attention_factor = 1.f;
  bool tied_embeddings = false;
  bool attn_bias = false;  // q/k/v bias (Qwen2)
  int sliding_window = 0;  // 0 = none (the largest per-layer window)
  // Per layer: the attention window (0 = full attention). Empty: sliding_window for every layer.
  std::vector<int> layer_windows;
  // Per layer: 1 = the local RoPE base (rope_local_theta, no scaling; Gemma 3's sliding layers).
  std::vector<uint8_t> layer_local_rope;
  float rope_local_theta = 0.f;  // 0 = one RoPE for every layer
  int rotary_dim = 0;            // rotated dimensions of each head (partial rotary); 0 = head_dim
  bool qk_norm = false;          // per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
  bool norm_plus_one = false;    // RMSNorm applies (1 + w) (Gemma); folded into the weights at load
  bool sandwich_norm = false;    // Gemma: post-attention, pre- and post-feedforward norms
  Activation act = Activation::Silu;
  float embed_scale = 1.f;       // embeddings times this fp32 scalar (Gemma: sqrt(hidden))
  float attn_scale = 0.f;        // scores' scale; 0 = 1/sqrt(head_dim)
  float attn_softcap = 0.f;      // 0 = none; else scores -> cap * tanh(scores / cap) (Gemma 2)
  float final_softcap = 0.f;     // the same on the logits
  bool multimodal_text = false;  // Gemma3ForConditionalGeneration: the language model's weights only
  bool fused_qkv = false;        // Phi-3: one qkv_proj [q | k | v rows] instead of q/k/v_proj
  bool fused_gate_up = false;    // Phi-3: one gate_up_proj [gate | up rows] instead of gate/up_proj
  std::vector<std::string> files;  // safetensors shards

  int window(int layer) const { return layer_windows.empty() ? sliding_window : layer_windows[size_t(layer)]; }
  bool local_rope(int layer) const { return !layer_local_rope.empty() && layer_local_rope[size_t(layer)] != 0; }
  // The widest span any layer attends to: 0 (unbounded) if some layer is global, else the largest window.
  int widest_window() const {
    if (layer_windows.empty()) return sliding_window;
    int w = 0;
    for (int x : layer_windows) {
      if (x == 0) return 0;
      w = x > w ? x : w;
    }
    return w;
  }
  int rot_dim() const { return rotary_dim > 0 ? rotary_dim : head_dim; }
  float scores_scale() const { return attn_scale > 0.f ? attn_scale : 1.0f / std::sqrt(float(head_dim)); }
};

// A weight matrix [rows, cols] in its stored dtype.
struct Weight {
  const void* data = nullptr;
  cpu::WType type = cpu::WType::F32;
  int rows = 0, cols = 0;
};

// The seven LoRA-able projections, in a fixed order used everywhere (adapters, kernels, tables).
enum Proj : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown, kNumProj };
const char* proj_name(int p);  // "q_proj", ...

struct Layer {
  std::vector<float> attn_norm, mlp_norm;    // [H] before attention, before the MLP
  std::vector<float> post_attn_norm, post_mlp_norm;  // [H] on the attention / MLP output (sandwich_norm)
  std::vector<float> q_norm, k_norm;         // [head_dim] (qk_norm)
  Weight proj[kNumProj];                     // q [nh*hd, H], k/v [nkv*hd, H], o [H, nh*hd], gate/up [I, H], down [H, I]
  std::vector<float> q_bias, k_bias, v_bias;  // empty unless attn_bias
};

struct Model {
  ModelSpec spec;
  std::vector<std::shared_ptr<SafetensorsFile>> files;  // keep the mappings alive
  Weight embed, lm_head;
  std::vector<float> final_norm;
  std::vector<Layer> layers;
  std::vector<float> inv_freq;        // [rot_dim/2], rope scaling applied
  std::vector<float> inv_freq_local;  // [rot_dim/2] with rope_local_theta (empty: one RoPE)
  std::vector<float> inv_freq_long;   // [rot_dim/2] LongRoPE's long factors (inv_freq: the short ones)
  float attn_scaling = 1.f;     // multiplies cos/sin (1 for none/linear/llama3)

  int q_dim() const { return spec.n_heads * spec.head_dim; }
  int kv_dim() const { return spec.n_kv_heads * spec.head_dim; }
  int proj_in(int p) const;   // input width of projection p
  int proj_out(int p) const;  // output width of projection p
};

// Validates the spec, opens every shard strictly, checks every needed tensor's presence, dtype and
// shape. Throws std::runtime_error naming the file and tensor on any problem. Reports the "read"
// phase (bytes of the files opened) to `progress`.
std::shared_ptr<Model> load_model(const ModelSpec& spec, const LoadProgress& progress = {});

}  // namespace loraplex
