// CPU backend: the reference implementation of the model step over the unified pool.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>

#include <sys/mman.h>

#include <chrono>
#include <cstdio>

#include "addon/backend.h"
#include "kernels/cpu/kernels.h"

namespace loraplex {

size_t kv_page_bytes(const ModelSpec& s, int block_size, size_t elem_bytes) {
  const size_t bytes = size_t(s.n_layers) * 2 * block_size * s.n_kv_heads * s.head_dim * elem_bytes;
  return (bytes + 63) & ~size_t(63);
}

namespace {

// LORAPLEX_PROFILE=1: per-op wall time of decode-only steps, printed to stderr every 50 of them;
// LORAPLEX_PROFILE=prefill: the same for the steps that carry prompt tokens.
struct OpProfile {
  const char* env = std::getenv("LORAPLEX_PROFILE");
  const bool enabled = env != nullptr;
  const bool prefill = env != nullptr && std::strcmp(env, "prefill") == 0;
  bool on = false;  // enabled and this step is of the profiled kind (decode-only, or with prompt tokens)
  // The last entry is not an op of its own: the LoRA part of qkv, o, mlp-in and act+down.
  static constexpr int kOps = 9;
  double ms[kOps] = {};
  int steps = 0;
  static constexpr const char* kNames[kOps] = {"embed+norm", "qkv", "rope+kv", "attention", "o", "mlp-in", "act+down", "lm_head", "(of which lora)"};
  void report() {
    if (!on || ++steps % (prefill ? 4 : 50) != 0) return;
    std::fprintf(stderr, "[profile] %d steps:", steps);
    for (int i = 0; i < kOps; i++) std::fprintf(stderr, " %s %.2f ms/step", kNames[i], ms[i] / steps);
    std::fprintf(stderr, "\n");
  }
};

class OpTimer {
 public:
  OpTimer(OpProfile& p, int op) : p_(p), op_(op), t0_(p.on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{}) {}
  ~OpTimer() {
    if (p_.on) p_.ms[op_] += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count();
  }
 private:
  OpProfile& p_;
  int op_;
  std::chrono::steady_clock::time_point t0_;
};

struct InstalledAdapter {
  std::vector<int64_t> rows;  // byte offsets of every row, in place_rows() order
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(std::shared_ptr<Model> model, int block_size, int num_pages, int max_slots, const CpuOptions& o,
             const LoadProgress& progress)
      : model_(std::move(model)), max_slots_(max_slots), lora_bf16_(o.lora_bf16), compute_bf16_(o.compute_bf16) {
    if (compute_bf16_ && !cpu::has_bf16_dot())
      throw std::runtime_error("--compute-dtype bfloat16 needs a CPU with AVX512-BF16 (vdpbf16ps); this one has none");
    const ModelSpec& s = model_->spec;
    pool_info_.block_size = block_size;
    pool_info_.num_pages = num_pages;
    pool_info_.page_bytes = kv_page_bytes(s, block_size, o.kv_bf16 ? 2 : sizeof(float));
    layout_ = {s.n_layers, block_size, s.n_kv_heads, s.head_dim, pool_info_.page_bytes, o.kv_bf16};
    const size_t total = pool_info_.page_bytes * size_t(num_pages);
    // 2 MiB aligned (and rounded) so that transparent huge pages can back it, then touched once
    // in parallel: the budget is committed up front (as a GPU pool would be) and no step pays
    // first-touch page faults for KV blocks or adapter rows it is given later.
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t alloc = (total + kHuge - 1) / kHuge * kHuge;
    if (progress) progress("pool", 0, alloc);
    pool_ = static_cast<uint8_t*>(std::aligned_alloc(kHuge, alloc));
    if (!pool_) throw std::runtime_error("cannot allocate the memory pool (" + std::to_string(total) + " bytes)");
#ifdef MADV_HUGEPAGE
    madvise(pool_, alloc, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
    const long n_chunks = long(alloc / kHuge);
    // In up to 64 slices, so that a large budget reports progress (from this thread only).
    const long slice = std::max(1L, (n_chunks + 63) / 64);
    for (long c0 = 0; c0 < n_chunks; c0 += slice) {
      const long c1 = std::min(n_chunks, c0 + slice);
#pragma omp parallel for schedule(static)
      for (long c = c0; c < c1; c++) std::memset(pool_ + size_t(c) * kHuge, 0, kHuge);
      if (progress) progress("pool", uint64_t(c1) * kHuge, alloc);
    }
    refs_.assign(size_t(s.n_layers) * kNumProj * max_slots_, cpu::LoraRef{});
    installed_.resize(max_slots_);
    // Every projection and the lm_head packed once for the GEMM kernel (same dtype and bytes as
    // the file; the mmap stays for the embedding gather and for other backends). With
    // --compute-dtype bfloat16, BF16 weights are packed in column pairs for the dot-product kernel.
    // Progress in bytes of the file's weights; packing is where their pages are first read.
    const auto file_bytes = [](const Weight& w) { return uint64_t(w.rows) * uint64_t(w.cols) * cpu::wtype_size(w.type); };
    uint64_t pack_total = file_bytes(model_->lm_head), pack_done = 0;
    for (const Layer& L : model_->layers)
      for (const Weight& w : L.proj) pack_total += file_bytes(w);
    if (progress) progress("pack", 0, pack_total);
    packed_.resize(size_t(s.n_layers) * kNumProj);
    for (int l = 0; l < s.n_layers; l++)
      for (int p = 0; p < kNumProj; p++) {
        packed_[size_t(l) * kNumProj + p] = pack(model_->layers[l].proj[p]);
        pack_done += file_bytes(model_->layers[l].proj[p]);
        if (progress) progress("pack", pack_done, pack_total);
      }
    packed_lm_head_ = pack(model_->lm_head);
    if (progress) progress("pack", pack_total, pack_total);
  }
  ~CpuBackend() override { std::free(pool_); }

  std::string name() const override { return "cpu"; }
  const Model& model() const override { return *model_; }
  const PoolInfo& pool() const override { return pool_info_; }
  size_t lora_elem_bytes() const override { return lora_bf16_ ? 2 : sizeof(float); }
  std::string compute_dtype() const override { return compute_bf16_ ? "bfloat16" : "float32"; }
  std::string kv_cache_dtype() const override { return layout_.bf16 ? "bfloat16" : "float32"; }

  void install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) override {
    if (slot <= 0 || slot >= max_slots_) throw std::runtime_error("adapter slot " + std::to_string(slot) + " out of range");
    if (a.page_bytes != pool_info_.page_bytes || a.elem_bytes != lora_elem_bytes())
      throw std::runtime_error("adapter image was laid out for another pool");
    if (int(pages.size()) != a.num_pages())
      throw std::runtime_error("adapter needs " + std::to_string(a.num_pages()) + " pages, got " + std::to_string(pages.size()));
    for (int32_t p : pages)
      if (p < 0 || p >= pool_info_.num_pages) throw std::runtime_error("page id " + std::to_string(p) + " out of range");
    remove_adapter(slot);
    // The host image is laid out page by page as the pool holds it: one copy per page.
#pragma omp parallel for schedule(static) if (a.num_pages() > 1)
    for (int i = 0; i < a.num_pages(); i++)
      std::memcpy(pool_ + size_t(pages[i]) * pool_info_.page_bytes, a.page(i), a.page_used[i]);
    InstalledAdapter& ia = installed_[slot];
    ia.rows.resize(a.rows.size());
    for (size_t r = 0; r < a.rows.size(); r++)
      ia.rows[r] = int64_t(pages[a.rows[r].page_index]) * int64_t(pool_info_.page_bytes) + int64_t(a.rows[r].offset);
    for (const auto& m : a.modules) {
      cpu::LoraRef& ref = ref_at(m.layer, m.proj, slot);
      ref.rank = m.rank;
      ref.scale = m.scale;
      ref.a_rows = ia.rows.data() + m.a_row0;  // a fused target's later projections share the first's
      ref.b_rows = ia.rows.data() + m.b_row0;
      ref.bf16 = lora_bf16_;
    }
  }

  void remove_adapter(int slot) override {
    if (slot <= 0 || slot >= max_slots_) return;
    for (int l = 0; l < model_->spec.n_layers; l++)
      for (int p = 0; p < kNumProj; p++) ref_at(l, p, slot) = cpu::LoraRef{};
    installed_[slot].rows.clear();
  }

  void forward(const StepBatch& b, float* logits, const RowLogits* extra) override;

 private:
  cpu::LoraRef& ref_at(int layer, int proj, int slot) {
    return refs_[(size_t(layer) * kNumProj + proj) * max_slots_ + slot];
  }
  bool pairs(const Weight& w) const { return compute_bf16_ && w.type == cpu::WType::BF16; }
  std::vector<uint8_t> pack(const Weight& w) const {
    if (pairs(w)) {
      std::vector<uint8_t> out(cpu::packed_pairs_elems(w.rows, w.cols) * 2);
      cpu::pack_weights_bf16_pairs(static_cast<const uint16_t*>(w.data), w.rows, w.cols,
                                   reinterpret_cast<uint16_t*>(out.data()));
      return out;
    }
    std::vector<uint8_t> out(cpu::packed_elems(w.rows, w.cols) * cpu::wtype_size(w.type));
    cpu::pack_weights(w.data, w.type, w.rows, w.cols, out.data());
    return out;
  }
  // y[T, w.rows] = x[T, w.cols] . W^T (+ bias) with the kernel its packing was made for.
  void gemm(const float* x, int T, const Weight& w, const std::vector<uint8_t>& packed, const float* bias, float* y) const {
    if (pairs(w))
      cpu::matmul_bf16_pairs(x, T, w.cols, reinterpret_cast<const uint16_t*>(packed.data()), w.rows, bias, y);
    else
      cpu::matmul_packed(x, T, w.cols, packed.data(), w.type, w.rows, bias, y);
  }
  // ys[i][T, out] += LoRA of projection ps[i] for each token's adapter; the projections share x.
  void apply_lora(int layer, std::initializer_list<int> ps, const float* x, std::initializer_list<float*> ys);
  // y = x . W^T (+ bias) for projection p (the base weights only).
  void project(int layer, int p, const float* x, float* y, const std::vector<float>* bias);

  std::shared_ptr<Model> model_;
  int max_slots_;
  bool lora_bf16_;
  bool compute_bf16_;
  PoolInfo pool_info_;
  cpu::KvLayout layout_{};
  uint8_t* pool_ = nullptr;
  std::vector<cpu::LoraRef> refs_;           // [layer][proj][slot]
  std::vector<InstalledAdapter> installed_;  // [slot]
  std::vector<std::vector<uint8_t>> packed_;  // [layer][proj], cpu::pack_weights layout
  std::vector<uint8_t> packed_lm_head_;

  // Per-step state and scratch (reused across steps to avoid allocation in the hot loop).
  const StepBatch* batch_ = nullptr;
  std::vector<cpu::LoraSegment> segs_;
  bool any_lora_ = false, per_token_ = false;
  std::vector<float> x_, h_, q_, k_, v_, att_, o_, gate_, up_, act_, z_, last_, rope_cos_, rope_sin_, long_cos_, long_sin_;
  OpProfile prof_;
};

void CpuBackend::project(int layer, int p, const float* x, float* y, const std::vector<float>* bias) {
  const Weight& w = model_->layers[layer].proj[p];
  gemm(x, batch_->n_tokens, w, packed_[size_t(layer) * kNumProj + p], bias && !bias->empty() ? bias->data() : nullptr, y);
}

void CpuBackend::apply_lora(int layer, std::initializer_list<int> ps, const float* x, std::initializer_list<float*> ys) {
  if (!any_lora_) return;
  OpTimer timer(prof_, 8);
  cpu::LoraTarget targets[3];
  int n = 0;
  auto y = ys.begin();
  for (int p : ps) targets[n++] = {&ref_at(layer, p, 0), model_->proj_out(p), *y++};
  const int in = model_->proj_in(*ps.begin());
  if (per_token_) cpu::lora_bgmv(pool_, targets, n, batch_->token_slots.data(), batch_->n_tokens, x, in, z_.data());
  else cpu::lora_sgmv(pool_, targets, n, segs_.data(), int(segs_.size()), x, in, z_.data());
}

void CpuBackend::forward(const StepBatch& b, float* logits, const RowLogits* extra) {
  const Model& m = *model_;
  const ModelSpec& s = m.spec;
  const int T = b.n_tokens, H = s.hidden, QD = m.q_dim(), KD = m.kv_dim(), I = s.intermediate;
  batch_ = &b;
  prof_.on = prof_.enabled && (b.n_seqs == b.n_tokens) != prof_.prefill;
  // Segments of consecutive tokens sharing an adapter (the scheduler orders sequences by adapter).
  segs_.clear();
  any_lora_ = false;
  int max_rank = 0;
  for (int t = 0; t < T; t++) {
    const int slot = b.token_slots[t];
    if (slot != 0) any_lora_ = true;
    if (segs_.empty() || segs_.back().slot != slot) segs_.push_back({t, t + 1, slot});
    else segs_.back().end = t + 1;
  }
  if (any_lora_) {
    for (int l = 0; l < s.n_layers; l++)
      for (int p = 0; p < kNumProj; p++)
        for (auto& sg : segs_) max_rank = std::max(max_rank, ref_at(l, p, sg.slot).rank);
    // Every token on its own adapter (no two neighbours share one): the per-token gather path
    // (BGMV). Otherwise segments (SGMV), so tokens that share an adapter read its rows once; the
    // engine orders sequences by adapter, so a decode batch of 16 on 8 adapters is 8 segments.
    per_token_ = int(segs_.size()) == T;
    z_.resize(size_t(3) * T * std::max(max_rank, 1));  // up to 3 LoRA targets a call (q, k, v)
  }
  x_.resize(size_t(T) * H); h_.resize(size_t(T) * H); o_.resize(size_t(T) * H);
  q_.resize(size_t(T) * QD); att_.resize(size_t(T) * QD);
  k_.resize(size_t(T) * KD); v_.resize(size_t(T) * KD);
  gate_.resize(size_t(T) * I); up_.resize(size_t(T) * I); act_.resize(size_t(T) * I);

  cpu::AttnBatch ab{b.n_seqs, b.query_start.data(), b.context_lens.data(), b.block_tables.data(), b.max_blocks,
                    s.sliding_window, s.attn_softcap};
  const float scale = s.scores_scale();
  const int rot = s.rot_dim(), half = rot / 2;
  const bool two_ropes = !m.inv_freq_local.empty();
  {
    OpTimer t(prof_, 0);
    cpu::embed(b.tokens.data(), T, m.embed.data, m.embed.type, H, x_.data(), s.embed_scale);
    // cos/sin depend only on the positions: computed once per step for every layer, q and k
    // (twice with a local RoPE base: Gemma 3's sliding layers use their own).
    rope_cos_.resize(size_t(T) * half * (two_ropes ? 2 : 1));
    rope_sin_.resize(rope_cos_.size());
    cpu::rope_table(b.positions.data(), T, m.inv_freq.data(), half, m.attn_scaling, rope_cos_.data(), rope_sin_.data());
    if (two_ropes)
      cpu::rope_table(b.positions.data(), T, m.inv_freq_local.data(), half, 1.0f, rope_cos_.data() + size_t(T) * half,
                      rope_sin_.data() + size_t(T) * half);
    // LongRoPE: the tokens of sequences in the long regime (the scheduler's per-sequence choice)
    // take the long factors' rows.
    if (!m.inv_freq_long.empty() && std::find(b.rope_long.begin(), b.rope_long.end(), 1) != b.rope_long.end()) {
      long_cos_.resize(size_t(T) * half);
      long_sin_.resize(size_t(T) * half);
      cpu::rope_table(b.positions.data(), T, m.inv_freq_long.data(), half, m.attn_scaling, long_cos_.data(), long_sin_.data());
      for (int q = 0; q < b.n_seqs; q++) {
        if (!b.rope_long[size_t(q)]) continue;
        const size_t r0 = size_t(b.query_start[q]) * half, r1 = size_t(b.query_start[q + 1]) * half;
        std::copy(long_cos_.begin() + r0, long_cos_.begin() + r1, rope_cos_.begin() + r0);
        std::copy(long_sin_.begin() + r0, long_sin_.begin() + r1, rope_sin_.begin() + r0);
      }
    }
  }
  for (int l = 0; l < s.n_layers; l++) {
    const Layer& L = m.layers[l];
    {
      OpTimer t(prof_, 1);
      cpu::rmsnorm(x_.data(), L.attn_norm.data(), T, H, s.rms_eps, h_.data());
      project(l, kQ, h_.data(), q_.data(), &L.q_bias);
      project(l, kK, h_.data(), k_.data(), &L.k_bias);
      project(l, kV, h_.data(), v_.data(), &L.v_bias);
      apply_lora(l, {kQ, kK, kV}, h_.data(), {q_.data(), k_.data(), v_.data()});
    }
    {
      OpTimer t(prof_, 2);
      if (s.qk_norm) {  // per head, over head_dim: the same row norm with T * heads rows
        cpu::rmsnorm(q_.data(), L.q_norm.data(), T * s.n_heads, s.head_dim, s.rms_eps, q_.data());
        cpu::rmsnorm(k_.data(), L.k_norm.data(), T * s.n_kv_heads, s.head_dim, s.rms_eps, k_.data());
      }
      const size_t tab = s.local_rope(l) ? size_t(T) * half : 0;
      cpu::rope_apply(q_.data(), T, s.n_heads, s.head_dim, rope_cos_.data() + tab, rope_sin_.data() + tab, rot);
      cpu::rope_apply(k_.data(), T, s.n_kv_heads, s.head_dim, rope_cos_.data() + tab, rope_sin_.data() + tab, rot);
      cpu::kv_write(pool_, layout_, l, ab, k_.data(), v_.data());
    }
    ab.sliding_window = s.window(l);
    { OpTimer t(prof_, 3); cpu::paged_attention(pool_, layout_, l, ab, q_.data(), s.n_heads, scale, att_.data()); }
    {
      OpTimer t(prof_, 4);
      project(l, kO, att_.data(), o_.data(), nullptr);
      apply_lora(l, {kO}, att_.data(), {o_.data()});
      if (s.sandwich_norm) cpu::rmsnorm(o_.data(), L.post_attn_norm.data(), T, H, s.rms_eps, o_.data());
      for (size_t i = 0; i < x_.size(); i++) x_[i] += o_[i];
      cpu::rmsnorm(x_.data(), L.mlp_norm.data(), T, H, s.rms_eps, h_.data());
    }
    {
      OpTimer t(prof_, 5);
      project(l, kGate, h_.data(), gate_.data(), nullptr);
      project(l, kUp, h_.data(), up_.data(), nullptr);
      apply_lora(l, {kGate, kUp}, h_.data(), {gate_.data(), up_.data()});
    }
    {
      OpTimer t(prof_, 6);
      if (s.act == Activation::GeluTanh) cpu::gelu_tanh_mul(gate_.data(), up_.data(), T, I, act_.data());
      else cpu::silu_mul(gate_.data(), up_.data(), T, I, act_.data());
      project(l, kDown, act_.data(), o_.data(), nullptr);
      apply_lora(l, {kDown}, act_.data(), {o_.data()});
      if (s.sandwich_norm) cpu::rmsnorm(o_.data(), L.post_mlp_norm.data(), T, H, s.rms_eps, o_.data());
      for (size_t i = 0; i < x_.size(); i++) x_[i] += o_[i];
    }
  }
  // Final norm and lm_head only on the rows whose logits are needed: the last position of each
  // sequence that samples, then (prompt logprobs) the extra rows in chunks.
  const int n = int(b.sample_seqs.size());
  OpTimer lm_timer(prof_, 7);
  // rows [n] token indices -> out [n, vocab] logits
  const auto head = [&](const int32_t* rows, int cnt, float* out) {
    last_.resize(size_t(cnt) * H);
    for (int i = 0; i < cnt; i++) std::memcpy(last_.data() + size_t(i) * H, x_.data() + size_t(rows[i]) * H, H * sizeof(float));
    cpu::rmsnorm(last_.data(), m.final_norm.data(), cnt, H, s.rms_eps, last_.data());
    gemm(last_.data(), cnt, m.lm_head, packed_lm_head_, nullptr, out);
    if (s.final_softcap > 0.f) cpu::softcap(out, size_t(cnt) * s.vocab, s.final_softcap);
  };
  if (n > 0) {
    std::vector<int32_t> rows(n);
    for (int i = 0; i < n; i++) rows[i] = b.query_start[b.sample_seqs[i] + 1] - 1;
    head(rows.data(), n, logits);
  }
  if (extra && !extra->rows.empty()) {
    const int R = int(extra->rows.size()), V = s.vocab;
    std::vector<float> chunk(size_t(std::min(R, RowLogits::kChunk)) * V);
    for (int first = 0; first < R; first += RowLogits::kChunk) {
      const int cnt = std::min(RowLogits::kChunk, R - first);
      head(extra->rows.data() + first, cnt, chunk.data());
      extra->consume(first, cnt, chunk.data());
    }
  }
  prof_.report();
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(std::shared_ptr<Model> model, int block_size, int num_pages,
                                          int max_slots, const CpuOptions& options, const LoadProgress& progress) {
  return std::make_unique<CpuBackend>(std::move(model), block_size, num_pages, max_slots, options, progress);
}

}  // namespace loraplex
