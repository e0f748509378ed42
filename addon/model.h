// Base model: configuration (normalised by TypeScript from config.json) and weights, which stay in
// their stored dtype inside the mmapped safetensors files (no fp32 copy of the big matrices).
// Thread safety: load_model() may run on any thread; a loaded Model is immutable and shared
// read-only by the engine thread.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "addon/load_progress.h"
#include "addon/safetensors.h"
#include "kernels/cpu/kernels.h"

namespace loraplex {

enum class RopeType { None, Linear, Llama3 };

struct ModelSpec {
  std::string arch;  // "llama" | "mistral" | "qwen2"
  int hidden = 0, intermediate = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, vocab = 0;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  RopeType rope_type = RopeType::None;
  float rope_factor = 1.f, rope_low_freq_factor = 1.f, rope_high_freq_factor = 4.f;
  int rope_original_max = 8192;
  bool tied_embeddings = false;
  bool attn_bias = false;  // q/k/v bias (Qwen2)
  int sliding_window = 0;  // 0 = none
  std::vector<std::string> files;  // safetensors shards
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
  std::vector<float> attn_norm, mlp_norm;    // [H]
  Weight proj[kNumProj];                     // q [nh*hd, H], k/v [nkv*hd, H], o [H, nh*hd], gate/up [I, H], down [H, I]
  std::vector<float> q_bias, k_bias, v_bias;  // empty unless attn_bias
};

struct Model {
  ModelSpec spec;
  std::vector<std::shared_ptr<SafetensorsFile>> files;  // keep the mappings alive
  Weight embed, lm_head;
  std::vector<float> final_norm;
  std::vector<Layer> layers;
  std::vector<float> inv_freq;  // [head_dim/2], rope scaling applied
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
