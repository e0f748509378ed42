#include "addon/lora_adapter.h"

#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

namespace loraplex {

namespace {

// PEFT's tensor prefix of a module: `base_model.model.` + the module's name in the model.
// Gemma3ForConditionalGeneration's language model is `model.language_model.` (transformers 5) or
// `language_model.model.` (adapters trained with transformers 4); the first found is taken.
std::string module_prefix(int layer, int proj, const std::string& model_prefix = "model.", const char* name = nullptr) {
  return "base_model.model." + model_prefix + "layers." + std::to_string(layer) + (proj <= kO ? ".self_attn." : ".mlp.") +
         (name ? name : proj_name(proj));
}

// Phi-3's fused modules: the LoRA of qkv_proj (gate_up_proj) is one A and a B whose rows are
// q | k | v (gate | up) outputs. Each projection gets its own module with that A and its slice of
// B's rows, exactly where HF slices the fused output. Returns false for an unfused projection.
struct FusedSlice {
  const char* name;
  int row0, rows_total;
};
bool fused_slice(const Model& m, int proj, FusedSlice& out) {
  const int QD = m.q_dim(), KD = m.kv_dim(), I = m.spec.intermediate;
  if (m.spec.fused_qkv && proj <= kV) {
    out = {"qkv_proj", proj == kQ ? 0 : proj == kK ? QD : QD + KD, QD + 2 * KD};
    return true;
  }
  if (m.spec.fused_gate_up && (proj == kGate || proj == kUp)) {
    out = {"gate_up_proj", proj == kGate ? 0 : I, 2 * I};
    return true;
  }
  return false;
}

// Adapter tensors of a multimodal checkpoint's vision side (PEFT also wraps the vision tower's
// q/k/v projections when target_modules names them): never applied, as the vision tower is not
// loaded and image inputs are refused.
bool vision_tensor(const std::string& name) {
  return name.find(".vision_tower.") != std::string::npos || name.find(".multi_modal_projector.") != std::string::npos;
}

// PEFT writes `<module>.lora_A.weight`; some tools keep the adapter name: `<module>.lora_A.<name>.weight`.
const TensorView* find_lora(const SafetensorsFile& f, const std::string& prefix, const char* which,
                            std::set<std::string>& used) {
  const std::string plain = prefix + "." + which + ".weight";
  if (auto* t = f.find(plain)) {
    used.insert(plain);
    return t;
  }
  const std::string head = prefix + "." + which + ".";
  const TensorView* hit = nullptr;
  for (auto it = f.tensors().lower_bound(head); it != f.tensors().end() && it->first.compare(0, head.size(), head) == 0;
       ++it) {
    const std::string rest = it->first.substr(head.size());
    if (rest.size() > 7 && rest.compare(rest.size() - 7, 7, ".weight") == 0 &&
        rest.find('.') == rest.size() - 7) {
      if (hit) throw std::runtime_error(f.path() + ": several adapter names for '" + plain + "'");
      hit = &it->second;
      used.insert(it->first);
    }
  }
  return hit;
}

void to_f32(const TensorView& t, float* out) {
  const size_t n = size_t(t.numel());
  switch (t.dtype) {
    case DType::F32: cpu::convert_row(t.data, cpu::WType::F32, 0, int(n), out); break;
    case DType::BF16: cpu::convert_row(t.data, cpu::WType::BF16, 0, int(n), out); break;
    case DType::F16: cpu::convert_row(t.data, cpu::WType::F16, 0, int(n), out); break;
    default: throw std::runtime_error("unsupported dtype");
  }
}

}  // namespace

std::shared_ptr<ParsedAdapter> parse_adapter(const std::string& path, const std::vector<LoraPlanEntry>& plan,
                                             const Model& model, int max_rank) {
  auto f = SafetensorsFile::open(path);
  auto out = std::make_shared<ParsedAdapter>();
  std::set<std::string> used;
  for (const auto& e : plan) {
    if (e.layer < 0 || e.layer >= model.spec.n_layers || e.proj < 0 || e.proj >= kNumProj)
      throw std::runtime_error(path + ": plan names layer " + std::to_string(e.layer) + " outside the model");
    if (e.rank < 1 || e.rank > max_rank)
      throw std::runtime_error(path + ": rank " + std::to_string(e.rank) + " of " + module_prefix(e.layer, e.proj) +
                               " is outside 1.." + std::to_string(max_rank) + " (--max-lora-rank)");
    FusedSlice fs{nullptr, 0, 0};
    const bool fused = fused_slice(model, e.proj, fs);
    std::string prefix = module_prefix(e.layer, e.proj, "model.", fused ? fs.name : nullptr);
    if (model.spec.multimodal_text) {
      prefix = module_prefix(e.layer, e.proj, "model.language_model.");
      const std::string legacy = module_prefix(e.layer, e.proj, "language_model.model.");
      if (f->tensors().lower_bound(prefix + ".") == f->tensors().end() ||
          f->tensors().lower_bound(prefix + ".")->first.compare(0, prefix.size() + 1, prefix + ".") != 0)
        if (auto it = f->tensors().lower_bound(legacy + ".");
            it != f->tensors().end() && it->first.compare(0, legacy.size() + 1, legacy + ".") == 0)
          prefix = legacy;
    }
    const TensorView* a = find_lora(*f, prefix, "lora_A", used);
    const TensorView* b = find_lora(*f, prefix, "lora_B", used);
    if (!a || !b)
      throw std::runtime_error(path + ": missing tensor '" + prefix + (a ? ".lora_B" : ".lora_A") + ".weight'");
    const int in = model.proj_in(e.proj), outw = model.proj_out(e.proj);
    const int b_rows = fused ? fs.rows_total : outw, b_row0 = fused ? fs.row0 : 0;  // B's rows in the file
    for (const TensorView* t : {a, b}) {
      if (t->dtype != DType::F32 && t->dtype != DType::BF16 && t->dtype != DType::F16)
        throw std::runtime_error(path + ": tensor '" + t->name + "' has unsupported dtype " + dtype_name(t->dtype));
    }
    const std::vector<int64_t> want_a{e.rank, in}, want_b{b_rows, e.rank};
    if (a->shape != want_a)
      throw std::runtime_error(path + ": tensor '" + a->name + "' has shape " + a->shape_str() + ", expected [" +
                               std::to_string(e.rank) + ", " + std::to_string(in) + "] (rank x input width)");
    if (b->shape != want_b)
      throw std::runtime_error(path + ": tensor '" + b->name + "' has shape " + b->shape_str() + ", expected [" +
                               std::to_string(b_rows) + ", " + std::to_string(e.rank) + "] (output width x rank)");
    LoraModule m{e.layer, e.proj, e.rank, e.scale, std::vector<float>(size_t(e.rank) * in),
                 std::vector<float>(size_t(e.rank) * outw), -1};
    to_f32(*a, m.a.data());
    std::vector<float> bw_all(size_t(b_rows) * e.rank);
    to_f32(*b, bw_all.data());
    // This projection's rows of B (all of them unless fused).
    const std::vector<float> bw(bw_all.begin() + size_t(b_row0) * e.rank, bw_all.begin() + size_t(b_row0 + outw) * e.rank);
    for (int o = 0; o < outw; o++)
      for (int j = 0; j < e.rank; j++) m.bt[size_t(j) * outw + o] = bw[size_t(o) * e.rank + j];
    if (!std::isfinite(e.scale))
      throw std::runtime_error(path + ": the scale of '" + prefix + "' is not finite in float32");
    double amax[2] = {0.0, 0.0};
    for (int k = 0; k < 2; k++)
      for (float x : k == 0 ? m.a : bw) {
        if (!std::isfinite(x)) throw std::runtime_error(path + ": non-finite value in '" + prefix + "' LoRA weights");
        amax[k] = std::max(amax[k], double(std::fabs(x)));
      }
    // Worst case of one output of the delta, |s| * sum_j |B[o,j]| * sum_k |A[j,k]| |x_k|, for
    // activations up to kActivationHeadroom: it must stay finite in fp32, or the adapter would
    // turn finite inputs into inf/NaN logits. Real adapters sit ~30 orders of magnitude below.
    constexpr double kActivationHeadroom = 1e4;
    const double worst = std::fabs(double(e.scale)) * e.rank * amax[1] * double(in) * amax[0] * kActivationHeadroom;
    if (!(worst <= double(std::numeric_limits<float>::max())))
      throw std::runtime_error(path + ": the LoRA weights of '" + prefix + "' are too large (max |A| " +
                               std::to_string(amax[0]) + ", max |B| " + std::to_string(amax[1]) + ", scale " +
                               std::to_string(e.scale) + "): the update would overflow float32");
    // A later projection of a fused module (k, v after q; up after gate) shares the first one's A.
    if (fused && fs.row0 > 0)
      for (int i = int(out->modules.size()) - 1; i >= 0; i--) {
        const LoraModule& o = out->modules[size_t(i)];
        FusedSlice ofs{nullptr, 0, 0};
        if (o.layer == e.layer && o.a_from < 0 && fused_slice(model, o.proj, ofs) && ofs.row0 == 0 &&
            std::string(ofs.name) == fs.name && o.rank == e.rank && o.a == m.a) {
          m.a_from = i;
          m.a.clear();
          m.a.shrink_to_fit();
          break;
        }
      }
    out->bytes += (m.a.size() + m.bt.size()) * sizeof(float);
    out->max_rank = std::max(out->max_rank, e.rank);
    out->modules.push_back(std::move(m));
  }
  for (const auto& [name, t] : f->tensors()) {
    if (model.spec.multimodal_text && vision_tensor(name)) continue;
    if (!used.count(name))
      throw std::runtime_error(path + ": tensor '" + name +
                               "' is not a LoRA A/B weight of a module targeted by adapter_config.json");
  }
  return out;
}

std::vector<RowPlacement> place_rows(const ParsedAdapter& a, size_t page_bytes, size_t elem_bytes) {
  std::vector<RowPlacement> rows;
  int page = 0;
  size_t used = 0;
  auto place = [&](size_t bytes) {
    if (bytes > page_bytes)
      throw std::runtime_error("adapter row of " + std::to_string(bytes) + " bytes exceeds the page size " +
                               std::to_string(page_bytes));
    size_t start = (used + 63) & ~size_t(63);  // 64-byte aligned rows for SIMD loads
    if (start + bytes > page_bytes) {
      page++;
      start = 0;
    }
    rows.push_back({page, start});
    used = start + bytes;
  };
  for (const auto& m : a.modules) {
    const size_t in = m.a.size() / m.rank, out = m.bt.size() / m.rank;
    for (size_t j = 0; j < m.a_rows_placed(); j++) place(in * elem_bytes);
    for (int j = 0; j < m.rank; j++) place(out * elem_bytes);
  }
  return rows;
}

int pages_needed(const ParsedAdapter& a, size_t page_bytes, size_t elem_bytes) {
  auto rows = place_rows(a, page_bytes, elem_bytes);
  return rows.empty() ? 0 : rows.back().page_index + 1;
}

}  // namespace loraplex
