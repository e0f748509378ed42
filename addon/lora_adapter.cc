#include "addon/lora_adapter.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <set>
#include <stdexcept>

#include "kernels/cpu/kernels.h"

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

// --- host images -------------------------------------------------------------------------------
// Adapter images are a few MB to a few hundred MB. Fresh anonymous memory costs a page fault and a
// zeroing per 4 KiB page on first touch, as much as the conversion itself: images are 2 MiB aligned
// with transparent huge pages requested, and freed images of the same size are kept (bounded) for
// the next load, which in steady state (host tier full, one adapter out for one in) is all of them.
constexpr size_t kImageAlign = size_t(2) << 20;
constexpr size_t kImageCacheBytes = size_t(256) << 20;

struct ImageAllocator {
  std::mutex mu;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t cached = 0, live = 0;

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached -= bytes;
        live += bytes;
        return p;
      }
    }
    const size_t rounded = (bytes + kImageAlign - 1) / kImageAlign * kImageAlign;
    void* p = std::aligned_alloc(kImageAlign, rounded);
    if (!p) throw std::runtime_error("out of host memory for an adapter image of " + std::to_string(bytes) + " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, rounded, MADV_HUGEPAGE);
#endif
    std::lock_guard<std::mutex> lock(mu);
    live += bytes;
    return p;
  }
  void give(void* p, size_t bytes) {
    std::unique_lock<std::mutex> lock(mu);
    live -= bytes;
    if (bytes <= kImageCacheBytes) {
      // Oldest blocks go first when the cache is over its bound.
      while (cached + bytes > kImageCacheBytes && !free_.empty()) {
        auto it = free_.begin();
        cached -= it->first;
        std::free(it->second);
        free_.erase(it);
      }
      free_.emplace(bytes, p);
      cached += bytes;
      return;
    }
    lock.unlock();
    std::free(p);
  }
};

ImageAllocator& images() {
  static ImageAllocator* a = new ImageAllocator();  // never destroyed: images may outlive statics
  return *a;
}

std::shared_ptr<uint8_t> new_image(size_t bytes) {
  if (bytes == 0) return std::shared_ptr<uint8_t>();
  auto* p = static_cast<uint8_t*>(images().take(bytes));
  return std::shared_ptr<uint8_t>(p, [bytes](uint8_t* q) { images().give(q, bytes); });
}

// --- conversion ----------------------------------------------------------------------------------
// A tensor's bytes as fp32 or BF16 values (F16 is widened to fp32 first).
struct Source {
  const void* p = nullptr;
  cpu::WType type = cpu::WType::F32;
};

// `count` values from value `first` on (a fused B's slice of rows), or all of them (count 0).
Source read_tensor(const SafetensorsFile& f, const TensorView& t, std::vector<uint8_t>& raw, std::vector<float>& wide,
                   size_t first = 0, size_t count = 0) {
  const size_t esz = dtype_size(t.dtype);
  const size_t nbytes = count ? count * esz : t.nbytes - first * esz;
  if (raw.size() < nbytes) raw.resize(nbytes);
  f.read(t, first * esz, nbytes, raw.data());
  switch (t.dtype) {
    case DType::F32: return {raw.data(), cpu::WType::F32};
    case DType::BF16: return {raw.data(), cpu::WType::BF16};
    case DType::F16: {
      const size_t n = nbytes / esz;
      if (wide.size() < n) wide.resize(n);
      cpu::convert_row(raw.data(), cpu::WType::F16, 0, int(n), wide.data());
      return {wide.data(), cpu::WType::F32};
    }
    default: throw std::runtime_error("unsupported dtype");
  }
}

// A rows as they are; B [out, rank] transposed into rank rows of `out`.
void fill_module(const ParsedAdapter& out, const LoraModule& m, const Source& a, const Source& b, cpu::RowScan& sa,
                 cpu::RowScan& sb) {
  const bool bf16 = out.elem_bytes == 2;
  const size_t esz = a.type == cpu::WType::BF16 ? 2 : 4;
  auto row = [&](size_t r) { return const_cast<uint8_t*>(out.row(r)); };
  // A shared with an earlier module (a fused target): its rows are written there; scanned here
  // (into a scratch row) for this module's overflow check.
  thread_local std::vector<uint8_t> discard;
  if (m.a_from >= 0 && discard.size() < size_t(m.in) * 4) discard.resize(size_t(m.in) * 4);
  for (int j = 0; j < m.rank; j++)
    cpu::lora_pack_rows(static_cast<const uint8_t*>(a.p) + size_t(j) * m.in * esz, a.type, size_t(m.in),
                        m.a_from >= 0 ? discard.data() : row(m.a_row0 + j), bf16, sa);
  void* rows[1024];
  std::vector<void*> many;
  void** dst = rows;
  if (m.rank > 1024) many.resize(m.rank), dst = many.data();
  for (int j = 0; j < m.rank; j++) dst[j] = row(m.b_row0 + j);
  cpu::lora_pack_transposed(b.p, b.type, m.out, m.rank, dst, bf16, sb);
}

}  // namespace

std::vector<RowPlacement> place_rows(std::vector<LoraModule>& modules, size_t page_bytes, size_t elem_bytes,
                                     std::vector<size_t>* page_used) {
  std::vector<RowPlacement> rows;
  int page = 0;
  size_t used = 0;
  if (page_used) page_used->clear();
  auto place = [&](size_t bytes) {
    if (bytes > page_bytes)
      throw std::runtime_error("adapter row of " + std::to_string(bytes) + " bytes exceeds the page size " +
                               std::to_string(page_bytes));
    size_t start = (used + 63) & ~size_t(63);  // 64-byte aligned rows for SIMD loads
    if (rows.empty()) {
      start = 0;
    } else if (start + bytes > page_bytes) {
      if (page_used) page_used->push_back(used);
      page++;
      start = 0;
    }
    rows.push_back({page, start});
    used = start + bytes;
  };
  for (size_t i = 0; i < modules.size(); i++) {
    LoraModule& m = modules[i];
    if (m.a_from >= 0) {
      if (size_t(m.a_from) >= i || modules[size_t(m.a_from)].a_from >= 0 || modules[size_t(m.a_from)].rank != m.rank ||
          modules[size_t(m.a_from)].in != m.in)
        throw std::runtime_error("adapter module shares the A rows of a module that cannot lend them");
      m.a_row0 = modules[size_t(m.a_from)].a_row0;
    } else {
      m.a_row0 = rows.size();
      for (int j = 0; j < m.rank; j++) place(size_t(m.in) * elem_bytes);
    }
    m.b_row0 = rows.size();
    for (int j = 0; j < m.rank; j++) place(size_t(m.out) * elem_bytes);
  }
  if (page_used && !rows.empty()) page_used->push_back(used);
  return rows;
}

namespace {

std::shared_ptr<ParsedAdapter> layout(std::vector<LoraModule> modules, size_t page_bytes, size_t elem_bytes) {
  if (elem_bytes != 2 && elem_bytes != 4) throw std::runtime_error("adapter rows are fp32 or BF16");
  auto out = std::make_shared<ParsedAdapter>();
  out->page_bytes = page_bytes;
  out->elem_bytes = elem_bytes;
  out->rows = place_rows(modules, page_bytes, elem_bytes, &out->page_used);
  for (const auto& m : modules) out->max_rank = std::max(out->max_rank, m.rank);
  out->modules = std::move(modules);
  out->bytes = size_t(out->num_pages()) * page_bytes;
  for (const auto& m : out->modules)
    out->row_bytes += size_t(m.rank) * (size_t(m.a_from >= 0 ? 0 : m.in) + size_t(m.out)) * elem_bytes;
  out->image = new_image(out->bytes);
  return out;
}

}  // namespace

namespace {

// Per-thread read buffers, kept between loads (a fresh buffer costs page faults every time).
struct Scratch {
  std::vector<uint8_t> raw_a, raw_b;
  std::vector<float> wide_a, wide_b;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// A module's tensors in the file: B's rows [b_row0, b_row0 + out) are its own (a fused qkv_proj /
// gate_up_proj B holds q | k | v or gate | up); `prefix` names the module as the file does.
struct ModuleSource {
  const TensorView* a;
  const TensorView* b;
  int b_row0;
  std::string prefix;
};

// Reads one module's A and B, converts them into its rows and checks them.
void check_module(const std::string& path, const ParsedAdapter& out, const LoraModule& m, const SafetensorsFile& f,
                  const ModuleSource& t, Scratch& sc) {
  const Source a = read_tensor(f, *t.a, sc.raw_a, sc.wide_a);
  const Source b = read_tensor(f, *t.b, sc.raw_b, sc.wide_b, size_t(t.b_row0) * size_t(m.rank), size_t(m.out) * size_t(m.rank));
  cpu::RowScan sa, sb;
  fill_module(out, m, a, b, sa, sb);
  const std::string& prefix = t.prefix;
  if (sa.nonfinite || sb.nonfinite) throw std::runtime_error(path + ": non-finite value in '" + prefix + "' LoRA weights");
  // Worst case of one output of the delta, |s| * sum_j |B[o,j]| * sum_k |A[j,k]| |x_k|, for
  // activations up to kActivationHeadroom: it must stay finite in fp32, or the adapter would
  // turn finite inputs into inf/NaN logits. Real adapters sit ~30 orders of magnitude below.
  constexpr double kActivationHeadroom = 1e4;
  const double worst =
      std::fabs(double(m.scale)) * m.rank * double(sb.amax) * double(m.in) * double(sa.amax) * kActivationHeadroom;
  if (!(worst <= double(std::numeric_limits<float>::max())))
    throw std::runtime_error(path + ": the LoRA weights of '" + prefix + "' are too large (max |A| " +
                             std::to_string(sa.amax) + ", max |B| " + std::to_string(sb.amax) + ", scale " +
                             std::to_string(m.scale) + "): the update would overflow float32");
}

// Helper threads that share one load's modules with the thread that parses it (a libuv worker),
// so a single cold load runs at the speed of several cores. Persistent: their scratch buffers
// stay warm. Loads running at once share the helpers.
class LoaderPool {
 public:
  LoaderPool() {
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const int helpers = int(std::min(3u, hw - 1));
    for (int i = 0; i < helpers; i++) threads_.emplace_back([this] { work(); });
  }
  int size() const { return int(threads_.size()); }
  // Runs fn(0..n-1): 0 on the caller, the rest on helpers (or the caller when none is free).
  void run(int n, const std::function<void(int)>& fn) {
    struct Latch {
      std::mutex mu;
      std::condition_variable cv;
      int left;
    } latch;
    latch.left = n - 1;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int c = 1; c < n; c++)
        jobs_.push_back([&fn, &latch, c] {
          fn(c);
          std::lock_guard<std::mutex> l(latch.mu);
          if (--latch.left == 0) latch.cv.notify_all();
        });
    }
    cv_.notify_all();
    fn(0);
    // Help with queued jobs (this load's or another's) rather than wait idle.
    while (true) {
      std::function<void()> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (jobs_.empty()) break;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
    std::unique_lock<std::mutex> l(latch.mu);
    latch.cv.wait(l, [&] { return latch.left == 0; });
  }

 private:
  void work() {
    while (true) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
};

LoaderPool& loader_pool() {
  static LoaderPool* p = new LoaderPool();  // never destroyed: its threads run until exit
  return *p;
}

}  // namespace

std::shared_ptr<ParsedAdapter> parse_adapter(const std::string& path, const std::vector<LoraPlanEntry>& plan,
                                             const Model& model, int max_rank, size_t page_bytes, size_t elem_bytes) {
  auto f = SafetensorsFile::open_for_read(path);
  std::set<std::string> used;
  std::vector<LoraModule> modules;
  std::vector<ModuleSource> tensors;
  // Every check that needs no tensor byte first: a bad adapter costs no conversion.
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
    if (!std::isfinite(e.scale))
      throw std::runtime_error(path + ": the scale of '" + prefix + "' is not finite in float32");
    LoraModule mod{e.layer, e.proj, e.rank, e.scale, in, outw};
    // A later projection of a fused module (k, v after q; up after gate) reads the same A tensor:
    // it shares the first projection's A rows.
    if (fused && b_row0 > 0)
      for (size_t i = 0; i < modules.size(); i++)
        if (modules[i].layer == e.layer && modules[i].a_from < 0 && tensors[i].a == a && tensors[i].b_row0 == 0 &&
            modules[i].rank == e.rank) {
          mod.a_from = int(i);
          break;
        }
    modules.push_back(mod);
    tensors.push_back({a, b, b_row0, prefix});
  }
  for (const auto& [name, t] : f->tensors()) {
    if (model.spec.multimodal_text && vision_tensor(name)) continue;
    if (!used.count(name))
      throw std::runtime_error(path + ": tensor '" + name +
                               "' is not a LoRA A/B weight of a module targeted by adapter_config.json");
  }
  auto out = layout(std::move(modules), page_bytes, elem_bytes);
  out->file = f->identity();
  // Modules in contiguous chunks of about equal bytes, one per helper thread plus this one.
  const size_t n = out->modules.size();
  const int chunks = int(std::min<size_t>(n, size_t(loader_pool().size() + 1)));
  std::vector<size_t> bounds{0};
  {
    size_t total = 0, acc = 0;
    for (const auto& m : out->modules) total += size_t(m.rank) * size_t(m.in + m.out);
    for (size_t i = 0; i < n && int(bounds.size()) < chunks; i++) {
      acc += size_t(out->modules[i].rank) * size_t(out->modules[i].in + out->modules[i].out);
      if (acc * size_t(chunks) >= total * bounds.size()) bounds.push_back(i + 1);
    }
    bounds.resize(size_t(chunks));
    bounds.push_back(n);
  }
  std::vector<std::string> errors(static_cast<size_t>(chunks));
  auto run_chunk = [&](int c) {
    try {
      Scratch& sc = scratch();
      for (size_t i = bounds[c]; i < bounds[c + 1]; i++) check_module(path, *out, out->modules[i], *f, tensors[i], sc);
    } catch (const std::exception& e) {
      errors[c] = e.what();
    }
  };
  loader_pool().run(chunks, run_chunk);
  for (const auto& e : errors)  // the first failing module, in file order
    if (!e.empty()) throw std::runtime_error(e);
  // The bytes read are the bytes of the file that was opened: a file rewritten in place while it
  // was read could have mixed two versions.
  if (!(f->identity_now() == out->file))
    throw std::runtime_error(path + ": the file changed while it was being read");
  return out;
}

std::shared_ptr<ParsedAdapter> pack_adapter(const std::vector<LoraModuleF32>& mods, size_t page_bytes,
                                            size_t elem_bytes) {
  std::vector<LoraModule> modules;
  for (const auto& m : mods) {
    const auto& am = m.a_from >= 0 && size_t(m.a_from) < mods.size() ? mods[size_t(m.a_from)] : m;
    if (m.rank < 1 || am.a.empty() || am.a.size() % size_t(m.rank) || m.bt.size() % size_t(m.rank))
      throw std::runtime_error("pack_adapter: module rows do not match its rank");
    LoraModule mod{m.layer, m.proj, m.rank, m.scale, int(am.a.size() / size_t(m.rank)), int(m.bt.size() / size_t(m.rank))};
    mod.a_from = m.a_from;
    modules.push_back(mod);
  }
  auto out = layout(std::move(modules), page_bytes, elem_bytes);
  for (size_t i = 0; i < mods.size(); i++) {
    const LoraModule& m = out->modules[i];
    cpu::RowScan sc;
    for (int j = 0; j < m.rank; j++) {
      if (m.a_from < 0)
        cpu::lora_pack_rows(mods[i].a.data() + size_t(j) * m.in, cpu::WType::F32, size_t(m.in),
                            const_cast<uint8_t*>(out->row(m.a_row0 + j)), elem_bytes == 2, sc);
      cpu::lora_pack_rows(mods[i].bt.data() + size_t(j) * m.out, cpu::WType::F32, size_t(m.out),
                          const_cast<uint8_t*>(out->row(m.b_row0 + j)), elem_bytes == 2, sc);
    }
  }
  return out;
}

AdapterImageStats adapter_image_stats() {
  std::lock_guard<std::mutex> lock(images().mu);
  return {images().live, images().cached};
}

}  // namespace loraplex
