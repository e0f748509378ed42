#include "addon/model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <stdexcept>

namespace loraplex {

const char* proj_name(int p) {
  static const char* kNames[kNumProj] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return kNames[p];
}

int Model::proj_in(int p) const {
  switch (p) {
    case kO: return q_dim();
    case kDown: return spec.intermediate;
    default: return spec.hidden;
  }
}

int Model::proj_out(int p) const {
  switch (p) {
    case kQ: return q_dim();
    case kK: case kV: return kv_dim();
    case kGate: case kUp: return spec.intermediate;
    default: return spec.hidden;
  }
}

namespace {

void check_spec(const ModelSpec& s) {
  auto bad = [](const std::string& m) { throw std::runtime_error("config.json: " + m); };
  static const char* kArches[] = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"};
  if (std::find(std::begin(kArches), std::end(kArches), s.arch) == std::end(kArches)) bad("unsupported architecture " + s.arch);
  if (s.hidden <= 0 || s.intermediate <= 0 || s.n_layers <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 ||
      s.head_dim <= 0 || s.vocab <= 0)
    bad("dimensions must be positive");
  if (s.n_heads % s.n_kv_heads != 0) bad("num_attention_heads must be a multiple of num_key_value_heads");
  if (s.n_heads / s.n_kv_heads > 64) bad("more than 64 query heads per KV head is not supported");
  if (s.head_dim % 2 != 0 || s.head_dim > 1024) bad("head_dim must be even and at most 1024");
  if (s.files.empty()) bad("no safetensors files");
  if (!s.layer_windows.empty() && int(s.layer_windows.size()) != s.n_layers) bad("layer_types must name every layer");
  if (!s.layer_local_rope.empty() && int(s.layer_local_rope.size()) != s.n_layers) bad("layer_types must name every layer");
  for (int w : s.layer_windows)
    if (w < 0) bad("sliding_window must not be negative");
  if (s.rotary_dim < 0 || s.rotary_dim > s.head_dim || s.rotary_dim % 2 != 0)
    bad("partial_rotary_factor must give an even number of rotated dimensions up to head_dim");
  if (s.rope_type == RopeType::LongRope) {
    const size_t half = size_t(s.rot_dim() / 2);
    if (s.rope_short_factor.size() != half || s.rope_long_factor.size() != half)
      bad("rope_scaling short_factor and long_factor must have " + std::to_string(half) + " entries (rotary dimensions / 2)");
    for (float f : s.rope_short_factor)
      if (!(f > 0.f) || !std::isfinite(f)) bad("rope_scaling short_factor entries must be positive");
    for (float f : s.rope_long_factor)
      if (!(f > 0.f) || !std::isfinite(f)) bad("rope_scaling long_factor entries must be positive");
    if (s.rope_original_max <= 0) bad("original_max_position_embeddings must be positive");
  }
  if (!(s.embed_scale > 0.f) || !std::isfinite(s.embed_scale)) bad("the embedding scale must be positive");
  if (s.attn_scale < 0.f || s.attn_softcap < 0.f || s.final_softcap < 0.f || !std::isfinite(s.attn_scale) ||
      !std::isfinite(s.attn_softcap) || !std::isfinite(s.final_softcap))
    bad("query_pre_attn_scalar and the soft-capping values must be positive");
}

class TensorIndex {
 public:
  explicit TensorIndex(const std::vector<std::shared_ptr<SafetensorsFile>>& files) : files_(files) {}

  const TensorView& get(const std::string& name, std::vector<int64_t> shape) const {
    const TensorView* t = find(name);
    if (!t) throw std::runtime_error("missing tensor '" + name + "' (looked in " + shard_list() + ")");
    if (t->shape != shape) {
      TensorView want;
      want.shape = shape;
      throw std::runtime_error(where_(name) + ": tensor '" + name + "' has shape " + t->shape_str() +
                               " but the config implies " + want.shape_str());
    }
    if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
      throw std::runtime_error(where_(name) + ": tensor '" + name + "' has unsupported dtype " +
                               dtype_name(t->dtype) + " (F32, BF16 and F16 are supported)");
    return *t;
  }
  const TensorView* find(const std::string& name) const {
    for (auto& f : files_)
      if (auto* t = f->find(name)) return t;
    return nullptr;
  }

 private:
  std::string where_(const std::string& name) const {
    for (auto& f : files_)
      if (f->find(name)) return f->path();
    return "?";
  }
  std::string shard_list() const {
    std::string s;
    for (auto& f : files_) s += (s.empty() ? "" : ", ") + f->path();
    return s;
  }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files_;
};

cpu::WType wtype_of(DType d) {
  return d == DType::F32 ? cpu::WType::F32 : d == DType::BF16 ? cpu::WType::BF16 : cpu::WType::F16;
}

Weight weight(const TensorView& t) {
  Weight w;
  w.data = t.data;
  w.type = wtype_of(t.dtype);
  w.rows = int(t.shape[0]);
  w.cols = t.shape.size() > 1 ? int(t.shape[1]) : 1;
  return w;
}

std::vector<float> vec_f32(const TensorView& t) {
  std::vector<float> v(size_t(t.numel()));
  cpu::convert_row(t.data, wtype_of(t.dtype), 0, int(v.size()), v.data());
  return v;
}

// Default RoPE frequencies over the rotated dimensions: 1 / theta^(2i / rot_dim).
std::vector<float> default_inv_freq(float theta, int rot_dim) {
  std::vector<float> f(size_t(rot_dim / 2));
  for (int i = 0; i < rot_dim / 2; i++) {
    // fp32 arithmetic, as the reference builds its inv_freq buffer
    const float e = float(2 * i) / float(rot_dim);
    f[size_t(i)] = 1.0f / std::pow(theta, e);
  }
  return f;
}

void compute_inv_freq(Model& m) {
  const ModelSpec& s = m.spec;
  m.inv_freq = default_inv_freq(s.rope_theta, s.rot_dim());
  // Gemma 3's sliding layers: their own base, never scaled (scaling applies to global layers).
  if (s.rope_local_theta > 0.f) m.inv_freq_local = default_inv_freq(s.rope_local_theta, s.rot_dim());
  if (s.rope_type == RopeType::LongRope) {
    // inv_freq = 1 / (factor_i * theta^(2i / rot_dim)), in fp32 as the reference builds it; short
    // factors up to rope_original_max tokens, long ones past it; cos/sin scaled by the attention factor.
    m.inv_freq_long = m.inv_freq;
    for (size_t i = 0; i < m.inv_freq.size(); i++) {
      const float base = std::pow(s.rope_theta, float(2 * i) / float(s.rot_dim()));  // theta^(2i/rot_dim), fp32
      m.inv_freq[i] = 1.0f / (s.rope_short_factor[i] * base);
      m.inv_freq_long[i] = 1.0f / (s.rope_long_factor[i] * base);
    }
    m.attn_scaling = s.rope_attention_factor;
  } else if (s.rope_type == RopeType::Linear) {
    for (auto& f : m.inv_freq) f /= s.rope_factor;
  } else if (s.rope_type == RopeType::Llama3) {
    const float old_ctx = float(s.rope_original_max);
    const float low_wavelen = old_ctx / s.rope_low_freq_factor;
    const float high_wavelen = old_ctx / s.rope_high_freq_factor;
    const float pi = 3.141592653589793f;
    for (auto& f : m.inv_freq) {
      const float wavelen = 2.0f * pi / f;
      float g = wavelen > low_wavelen ? f / s.rope_factor : f;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) {
        const float smooth = (old_ctx / wavelen - s.rope_low_freq_factor) /
                             (s.rope_high_freq_factor - s.rope_low_freq_factor);
        g = (1.0f - smooth) * g / s.rope_factor + smooth * g;
      }
      f = g;
    }
  }
}

}  // namespace

std::shared_ptr<Model> load_model(const ModelSpec& spec, const LoadProgress& progress) {
  check_spec(spec);
  auto m = std::make_shared<Model>();
  m->spec = spec;
  // Sizes first, so that the phase has its total; open() checks the file itself.
  uint64_t total = 0, done = 0;
  std::vector<uint64_t> sizes;
  for (auto& path : spec.files) {
    struct stat st{};
    sizes.push_back(::stat(path.c_str(), &st) == 0 ? uint64_t(st.st_size) : 0);
    total += sizes.back();
  }
  if (progress) progress("read", 0, total);
  for (size_t i = 0; i < spec.files.size(); i++) {
    m->files.push_back(SafetensorsFile::open(spec.files[i]));
    done += sizes[i];
    if (progress) progress("read", done, total);
  }
  TensorIndex idx(m->files);
  const int64_t H = spec.hidden, I = spec.intermediate, V = spec.vocab;
  const int64_t QD = m->q_dim(), KD = m->kv_dim(), HD = spec.head_dim;
  // The decoder's tensor prefix: "model." for the causal LMs; the language model of a
  // Gemma3ForConditionalGeneration checkpoint is "model.language_model." as transformers 5 saves it,
  // "language_model.model." in the released (transformers 4) files. The vision tower is never read.
  std::string mp = "model.", head_name = "lm_head.weight";
  if (spec.multimodal_text) {
    mp = idx.find("language_model.model.embed_tokens.weight") ? "language_model.model." : "model.language_model.";
    if (mp == "language_model.model.") head_name = "language_model.lm_head.weight";
  }
  m->embed = weight(idx.get(mp + "embed_tokens.weight", {V, H}));
  if (spec.tied_embeddings) {
    m->lm_head = m->embed;
  } else {
    m->lm_head = weight(idx.get(head_name, {V, H}));
  }
  // Gemma's RMSNorm multiplies by (1 + w): fold the 1 in once, in fp32 as HF adds it, so the
  // norm kernel is the same (x * inv_rms) * w' (bit-identical: HF computes (x * inv_rms) * (1 + w)).
  const auto norm = [&](const std::string& name, int64_t n) {
    std::vector<float> w = vec_f32(idx.get(name, {n}));
    if (spec.norm_plus_one)
      for (auto& x : w) x = 1.0f + x;
    return w;
  };
  m->final_norm = norm(mp + "norm.weight", H);
  m->layers.resize(spec.n_layers);
  for (int l = 0; l < spec.n_layers; l++) {
    const std::string p = mp + "layers." + std::to_string(l) + ".";
    Layer& L = m->layers[l];
    L.attn_norm = norm(p + "input_layernorm.weight", H);
    if (spec.sandwich_norm) {
      // Gemma: post_attention_layernorm normalises the attention output; the MLP's input norm is
      // pre_feedforward_layernorm, and post_feedforward_layernorm normalises its output.
      L.post_attn_norm = norm(p + "post_attention_layernorm.weight", H);
      L.mlp_norm = norm(p + "pre_feedforward_layernorm.weight", H);
      L.post_mlp_norm = norm(p + "post_feedforward_layernorm.weight", H);
    } else {
      L.mlp_norm = norm(p + "post_attention_layernorm.weight", H);
    }
    if (spec.qk_norm) {
      L.q_norm = norm(p + "self_attn.q_norm.weight", HD);
      L.k_norm = norm(p + "self_attn.k_norm.weight", HD);
    }
    for (int pr = 0; pr < kNumProj; pr++) {
      if ((spec.fused_qkv && pr <= kV) || (spec.fused_gate_up && (pr == kGate || pr == kUp))) continue;
      const std::string mod = (pr <= kO ? "self_attn." : "mlp.") + std::string(proj_name(pr));
      L.proj[pr] = weight(idx.get(p + mod + ".weight", {m->proj_out(pr), m->proj_in(pr)}));
    }
    // Phi-3's fused projections: row slices of one row-major matrix are contiguous, so q, k and v
    // (gate and up) are views into it, split exactly where HF slices the fused output.
    const auto slice = [](const Weight& w, int row0, int rows) {
      Weight v = w;
      v.data = static_cast<const uint8_t*>(w.data) + size_t(row0) * size_t(w.cols) * cpu::wtype_size(w.type);
      v.rows = rows;
      return v;
    };
    if (spec.fused_qkv) {
      const Weight qkv = weight(idx.get(p + "self_attn.qkv_proj.weight", {QD + 2 * KD, H}));
      L.proj[kQ] = slice(qkv, 0, int(QD));
      L.proj[kK] = slice(qkv, int(QD), int(KD));
      L.proj[kV] = slice(qkv, int(QD + KD), int(KD));
    }
    if (spec.fused_gate_up) {
      const Weight gu = weight(idx.get(p + "mlp.gate_up_proj.weight", {2 * I, H}));
      L.proj[kGate] = slice(gu, 0, int(I));
      L.proj[kUp] = slice(gu, int(I), int(I));
    }
    if (spec.attn_bias) {
      L.q_bias = vec_f32(idx.get(p + "self_attn.q_proj.bias", {QD}));
      L.k_bias = vec_f32(idx.get(p + "self_attn.k_proj.bias", {KD}));
      L.v_bias = vec_f32(idx.get(p + "self_attn.v_proj.bias", {KD}));
    }
  }
  compute_inv_freq(*m);
  return m;
}

}  // namespace loraplex
