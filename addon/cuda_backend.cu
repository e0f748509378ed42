// CUDA backend (see cuda_backend.h): the model step of cpu_backend.cc on the GPU, op for op, over
// the same unified-pool layout, with the kernels of kernels/cuda.
#include "addon/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/launchers.cuh"

namespace loraplex {

namespace {

using cuda::check_cuda;

// A device buffer that only grows. Growing frees the old one (cudaFree synchronises the device),
// which happens during the first steps of a run and then no more.
struct DevBuf {
  void* p = nullptr;
  size_t cap = 0;
  DevBuf() = default;
  DevBuf(DevBuf&& o) noexcept : p(o.p), cap(o.cap) { o.p = nullptr, o.cap = 0; }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  ~DevBuf() { release(); }
  void release() {
    if (p) cudaFree(p);
    p = nullptr;
    cap = 0;
  }
  void ensure(size_t bytes, const char* what) {
    if (bytes <= cap) return;
    release();
    const size_t want = (std::max(bytes, cap + cap / 2) + 255) & ~size_t(255);
    check_cuda(cudaMalloc(&p, want), what);
    cap = want;
  }
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

// Pinned host memory, so that copies from it are truly asynchronous.
struct PinnedBuf {
  void* p = nullptr;
  size_t cap = 0;
  PinnedBuf() = default;
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
  ~PinnedBuf() {
    if (p) cudaFreeHost(p);
  }
  void ensure(size_t bytes, const char* what) {
    if (bytes <= cap) return;
    if (p) cudaFreeHost(p);
    p = nullptr;
    cap = 0;
    const size_t want = (std::max(bytes, cap + cap / 2) + 255) & ~size_t(255);
    check_cuda(cudaHostAlloc(&p, want, cudaHostAllocDefault), what);
    cap = want;
  }
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

struct DevWeight {
  const void* data = nullptr;  // device
  int wt = 0;                  // cuda::WDType (same codes as cpu::WType)
  int rows = 0, cols = 0;
};

struct DevLayer {
  const float* attn_norm = nullptr;  // [H]
  const float* mlp_norm = nullptr;   // [H]
  const float* post_attn_norm = nullptr;  // [H] (sandwich_norm) or null
  const float* post_mlp_norm = nullptr;   // [H] (sandwich_norm) or null
  const float* q_norm = nullptr;     // [head_dim] (qk_norm) or null
  const float* k_norm = nullptr;     // [head_dim] (qk_norm) or null
  DevWeight proj[kNumProj];
  const float* bias[3] = {nullptr, nullptr, nullptr};  // q, k, v (Qwen2) or null
};

// An adapter slot: host mirror of its row offsets and ranks, the device row-offset table the LoRA
// kernels follow, and the event that marks its install copy complete.
struct Slot {
  std::vector<int64_t> rows;  // byte offsets of every row in the pool, in place_rows() order
  DevBuf d_rows;              // the same, on the device
  std::vector<int> ranks;     // [layer * kNumProj + proj]
  int max_rank = 0;
  cudaEvent_t ready = nullptr;
  bool pending = false;       // copy enqueued and the compute stream has not waited on it yet
};

// Everything forward() derives from the batch on the host before launching.
struct StepPlan {
  int T = 0, S = 0, n_sample = 0;
  bool decode_attn = true;  // per-query kernel (decode-only batches, or head_dim > 256)
  int n_splits = 1;
  int n_prefill_tiles = 0;
  bool any_lora = false, bgmv = false, waited = false;
  int z_stride = 0;  // largest rank among the adapters of this batch
  int n_sgmv_tiles = 0;
  std::vector<char> proj_used;  // [layer * kNumProj + proj]: some adapter of the batch touches it
  std::vector<int> pending_slots;
  // Device pointers into the step buffer.
  const int32_t *tokens, *positions, *token_slots, *query_start, *context_lens, *block_tables, *token_seq,
      *sample_rows, *prefill_tiles, *sgmv_tiles, *token_long;
  bool any_long = false;  // LongRoPE: some sequence of the step rotates with the long factors
};

// Staging ring for host -> device copies on the copy stream: two pinned halves; while the DMA
// engine drains one, the host fills the other. Adjacent destinations are coalesced into one copy
// (adapter rows are packed back to back inside a page, separated only by 64-byte alignment).
class StagingRing {
 public:
  static constexpr size_t kHalf = size_t(16) << 20;
  StagingRing() = default;
  ~StagingRing() {
    for (auto& e : ev_)
      if (e) cudaEventDestroy(e);
    if (buf_) cudaFreeHost(buf_);
  }
  void init() {
    if (buf_) return;
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&buf_), 2 * kHalf, cudaHostAllocDefault),
               "cudaHostAlloc of the adapter staging ring (32 MiB)");
    for (auto& e : ev_) check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  }
  // Queues a copy of n bytes from host src to device dst.
  void stage(cudaStream_t stream, void* dst, const void* src, size_t n) {
    auto* d = static_cast<uint8_t*>(dst);
    auto* s = static_cast<const uint8_t*>(src);
    while (n > kHalf) {  // larger than half the ring: in pieces
      stage(stream, d, s, kHalf);
      d += kHalf, s += kHalf, n -= kHalf;
    }
    const uintptr_t at = reinterpret_cast<uintptr_t>(d), end = run_ + fill_;
    const bool append = fill_ > 0 && at >= end && at - end < 64 && at + n - run_ <= kHalf;
    if (!append) {
      flush(stream);
      run_ = at;
    }
    uint8_t* half = buf_ + cur_ * kHalf;
    const size_t off = at - run_;
    if (off > fill_) std::memset(half + fill_, 0, off - fill_);  // alignment padding between rows
    std::memcpy(half + off, s, n);
    fill_ = off + n;
  }
  void flush(cudaStream_t stream) {
    if (fill_ == 0) return;
    check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(run_), buf_ + cur_ * kHalf, fill_, cudaMemcpyHostToDevice, stream),
               "adapter copy (cudaMemcpyAsync)");
    check_cuda(cudaEventRecord(ev_[cur_], stream), "cudaEventRecord");
    cur_ ^= 1;
    fill_ = 0;
    // Before refilling the other half, its previous copy must have left it.
    check_cuda(cudaEventSynchronize(ev_[cur_]), "cudaEventSynchronize (staging ring)");
  }

 private:
  uint8_t* buf_ = nullptr;
  cudaEvent_t ev_[2] = {nullptr, nullptr};
  int cur_ = 0;
  uintptr_t run_ = 0;  // device address of the staged run's first byte
  size_t fill_ = 0;    // staged bytes of the current half
};

bool is_device_pointer(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // clear: plain host memory on older runtimes
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<Model> model, int block_size, int num_pages, int max_slots, const LoadProgress& progress);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  const Model& model() const override { return *model_; }
  const PoolInfo& pool() const override { return pool_info_; }
  void install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) override;
  void remove_adapter(int slot) override;
  void forward(const StepBatch& b, float* logits, const RowLogits* extra) override;

 private:
  void init(int block_size, int num_pages, const LoadProgress& progress);
  void release() noexcept;
  const void* upload(const void* host, size_t bytes, const char* what);
  const float* upload(const std::vector<float>& v, const char* what) {
    return v.empty() ? nullptr : static_cast<const float*>(upload(v.data(), v.size() * sizeof(float), what));
  }
  DevWeight upload(const Weight& w, const char* what);
  void clear_slot(int slot);
  void plan_step(const StepBatch& b);
  void project(int layer, int p, const float* x, float* y, const float* bias);
  void apply_lora(int layer, int p, const float* x, float* y);
  cuda::LoraRef* d_refs_at(int slot) const { return d_refs_ + size_t(slot) * ref_stride_; }

  std::shared_ptr<Model> model_;
  int max_slots_;
  int ref_stride_;  // n_layers * kNumProj
  PoolInfo pool_info_;
  cuda::KvLayout layout_{};
  uint8_t* pool_ = nullptr;
  cudaStream_t compute_ = nullptr, copy_ = nullptr;
  cudaEvent_t compute_mark_ = nullptr;

  std::vector<void*> owned_;  // device allocations of weights
  // The "upload" phase of the load: bytes of the model's Weights copied so far / in all (init only).
  const LoadProgress* progress_ = nullptr;
  uint64_t upload_done_ = 0, upload_total_ = 0;
  DevWeight embed_, lm_head_;
  const float* final_norm_ = nullptr;
  const float* inv_freq_ = nullptr;
  const float* inv_freq_local_ = nullptr;  // Gemma 3's sliding layers, or null
  const float* inv_freq_long_ = nullptr;   // LongRoPE's long factors, or null
  std::vector<DevLayer> layers_;

  cuda::LoraRef* d_refs_ = nullptr;  // [slot][layer][proj]
  std::vector<cuda::LoraRef> h_refs_;
  std::vector<Slot> slots_;
  StagingRing ring_;
  std::unique_ptr<cuda::Gemm> gemm_;

  // Per-step state and buffers (grown, never shrunk).
  StepPlan plan_;
  std::vector<int32_t> ints_;
  PinnedBuf h_step_;
  DevBuf d_step_, x_, h_, q_, k_, v_, att_, o_, gate_, up_, z_, last_, logits_, attn_ws_, extra_rows_;
};

const void* CudaBackend::upload(const void* host, size_t bytes, const char* what) {
  void* d = nullptr;
  const cudaError_t e = cudaMalloc(&d, bytes);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("CUDA backend: cannot allocate ") + std::to_string(bytes) + " bytes for " + what +
                             ": " + cudaGetErrorString(e));
  owned_.push_back(d);
  check_cuda(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), what);
  return d;
}

DevWeight CudaBackend::upload(const Weight& w, const char* what) {
  DevWeight d;
  d.wt = int(w.type);
  d.rows = w.rows;
  d.cols = w.cols;
  const size_t bytes = size_t(w.rows) * size_t(w.cols) * cpu::wtype_size(w.type);
  d.data = is_device_pointer(w.data) ? w.data : upload(w.data, bytes, what);
  upload_done_ += bytes;
  if (progress_ && *progress_) (*progress_)("upload", upload_done_, upload_total_);
  return d;
}

CudaBackend::CudaBackend(std::shared_ptr<Model> model, int block_size, int num_pages, int max_slots,
                         const LoadProgress& progress)
    : model_(std::move(model)), max_slots_(max_slots) {
  try {
    init(block_size, num_pages, progress);
  } catch (...) {
    progress_ = nullptr;
    release();  // a failed load (say, out of device memory) must not keep what it allocated
    throw;
  }
  progress_ = nullptr;
}

void CudaBackend::init(int block_size, int num_pages, const LoadProgress& progress) {
  const int max_slots = max_slots_;
  std::string why;
  if (!cuda_device_available(&why)) throw std::runtime_error("CUDA backend unavailable: " + why);
  const ModelSpec& s = model_->spec;
  if (block_size < 1 || num_pages < 1 || max_slots < 1)
    throw std::runtime_error("CUDA backend: block_size, num_pages and max_slots must be positive");
  if (s.head_dim % 2 != 0 || s.n_heads % s.n_kv_heads != 0)
    throw std::runtime_error("CUDA backend: head_dim must be even and n_heads a multiple of n_kv_heads");
  ref_stride_ = s.n_layers * kNumProj;
  pool_info_.block_size = block_size;
  pool_info_.num_pages = num_pages;
  pool_info_.page_bytes = kv_page_bytes(s, block_size);
  layout_ = {s.n_layers, block_size, s.n_kv_heads, s.head_dim, pool_info_.page_bytes};

  check_cuda(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "cudaStreamCreate (compute)");
  check_cuda(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "cudaStreamCreate (copy)");
  check_cuda(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming), "cudaEventCreate");

  // The unified pool: one device allocation for KV pages and adapter rows.
  const size_t total = pool_info_.page_bytes * size_t(num_pages);
  if (progress) progress("pool", 0, total);
  const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&pool_), total);
  if (e != cudaSuccess) {
    size_t free_b = 0, total_b = 0;
    cudaGetLastError();
    cudaMemGetInfo(&free_b, &total_b);
    throw std::runtime_error("cannot allocate the memory pool on the GPU (" + std::to_string(total) + " bytes, " +
                             std::to_string(free_b) + " free): " + cudaGetErrorString(e));
  }
  check_cuda(cudaMemset(pool_, 0, total), "cudaMemset (pool)");
  if (progress) progress("pool", total, total);

  // Weights, in their stored dtype. Progress counts the Weights (the norms and biases are noise).
  const Model& m = *model_;
  const auto weight_bytes = [](const Weight& w) { return uint64_t(w.rows) * uint64_t(w.cols) * cpu::wtype_size(w.type); };
  upload_total_ = weight_bytes(m.embed) + (m.lm_head.data == m.embed.data ? 0 : weight_bytes(m.lm_head));
  for (const Layer& L : m.layers)
    for (const Weight& w : L.proj) upload_total_ += weight_bytes(w);
  progress_ = &progress;
  if (progress) progress("upload", 0, upload_total_);
  embed_ = upload(m.embed, "model.embed_tokens.weight");
  lm_head_ = m.lm_head.data == m.embed.data ? embed_ : upload(m.lm_head, "lm_head.weight");
  final_norm_ = upload(m.final_norm, "model.norm.weight");
  inv_freq_ = upload(m.inv_freq, "rope inv_freq");
  inv_freq_local_ = upload(m.inv_freq_local, "local rope inv_freq");
  inv_freq_long_ = upload(m.inv_freq_long, "longrope long inv_freq");
  layers_.resize(s.n_layers);
  for (int l = 0; l < s.n_layers; l++) {
    const Layer& L = m.layers[l];
    DevLayer& D = layers_[l];
    D.attn_norm = upload(L.attn_norm, "input_layernorm.weight");
    D.mlp_norm = upload(L.mlp_norm, "post_attention_layernorm.weight");
    D.post_attn_norm = upload(L.post_attn_norm, "post_attention_layernorm.weight");
    D.post_mlp_norm = upload(L.post_mlp_norm, "post_feedforward_layernorm.weight");
    D.q_norm = upload(L.q_norm, "q_norm.weight");
    D.k_norm = upload(L.k_norm, "k_norm.weight");
    for (int p = 0; p < kNumProj; p++) D.proj[p] = upload(L.proj[p], proj_name(p));
    D.bias[0] = upload(L.q_bias, "q_proj.bias");
    D.bias[1] = upload(L.k_bias, "k_proj.bias");
    D.bias[2] = upload(L.v_bias, "v_proj.bias");
  }

  // LoRA tables: every slot starts with rank 0 everywhere (slot 0 is the base model forever).
  h_refs_.assign(size_t(max_slots_) * ref_stride_, cuda::LoraRef{});
  const size_t ref_bytes = h_refs_.size() * sizeof(cuda::LoraRef);
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&d_refs_), ref_bytes), "cudaMalloc (LoRA ref table)");
  check_cuda(cudaMemset(d_refs_, 0, ref_bytes), "cudaMemset (LoRA ref table)");
  slots_.resize(max_slots_);
  for (auto& sl : slots_) {
    sl.ranks.assign(ref_stride_, 0);
    check_cuda(cudaEventCreateWithFlags(&sl.ready, cudaEventDisableTiming), "cudaEventCreate");
  }
  gemm_ = std::make_unique<cuda::Gemm>();
  check_cuda(cudaDeviceSynchronize(), "CUDA backend initialisation");
}

CudaBackend::~CudaBackend() { release(); }

void CudaBackend::release() noexcept {
  // Must not throw: errors here are ignored (the backend is being torn down).
  if (compute_) cudaStreamSynchronize(compute_);
  if (copy_) cudaStreamSynchronize(copy_);
  gemm_.reset();
  for (auto& sl : slots_) {
    sl.d_rows.release();
    if (sl.ready) cudaEventDestroy(sl.ready);
  }
  if (d_refs_) cudaFree(d_refs_);
  slots_.clear();
  d_refs_ = nullptr;
  for (void* p : owned_) cudaFree(p);
  owned_.clear();
  if (pool_) cudaFree(pool_);
  pool_ = nullptr;
  if (compute_mark_) cudaEventDestroy(compute_mark_);
  if (compute_) cudaStreamDestroy(compute_);
  if (copy_) cudaStreamDestroy(copy_);
  compute_mark_ = nullptr;
  compute_ = copy_ = nullptr;
}

// ---- adapters ------------------------------------------------------------------------------------

void CudaBackend::clear_slot(int slot) {
  Slot& sl = slots_[slot];
  // The adapter's pages may become KV pages of the next step: that step must not overtake a copy
  // into them that is still in flight.
  if (sl.pending) check_cuda(cudaStreamWaitEvent(compute_, sl.ready, 0), "cudaStreamWaitEvent");
  sl.pending = false;
  sl.rows.clear();
  std::fill(sl.ranks.begin(), sl.ranks.end(), 0);
  sl.max_rank = 0;
  std::fill(h_refs_.begin() + size_t(slot) * ref_stride_, h_refs_.begin() + size_t(slot + 1) * ref_stride_,
            cuda::LoraRef{});
}

void CudaBackend::install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) {
  if (slot <= 0 || slot >= max_slots_) throw std::runtime_error("adapter slot " + std::to_string(slot) + " out of range");
  if (a.page_bytes != pool_info_.page_bytes || a.elem_bytes != sizeof(float))
    throw std::runtime_error("adapter image was laid out for another pool");
  if (int(pages.size()) != a.num_pages())
    throw std::runtime_error("adapter needs " + std::to_string(a.num_pages()) + " pages, got " + std::to_string(pages.size()));
  for (int32_t p : pages)
    if (p < 0 || p >= pool_info_.num_pages) throw std::runtime_error("page id " + std::to_string(p) + " out of range");
  for (const auto& mod : a.modules)
    if (mod.layer < 0 || mod.layer >= model_->spec.n_layers || mod.proj < 0 || mod.proj >= kNumProj || mod.rank <= 0)
      throw std::runtime_error("adapter module out of range (layer " + std::to_string(mod.layer) + ", proj " +
                               std::to_string(mod.proj) + ", rank " + std::to_string(mod.rank) + ")");
  clear_slot(slot);
  ring_.init();
  Slot& sl = slots_[slot];

  // The copy stream must not overtake compute work still touching these pages (KV of sequences
  // freed just before this install).
  check_cuda(cudaEventRecord(compute_mark_, compute_), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(copy_, compute_mark_, 0), "cudaStreamWaitEvent");

  // Row offsets, exactly as CpuBackend::install_adapter computes them.
  sl.rows.resize(a.rows.size());
  for (size_t r = 0; r < a.rows.size(); r++)
    sl.rows[r] = int64_t(pages[a.rows[r].page_index]) * int64_t(pool_info_.page_bytes) + int64_t(a.rows[r].offset);
  // Growing the slot's table frees the old one; cudaFree synchronises the device, so no pending
  // copy into it and no kernel reading it is left (and no step runs between install calls).
  sl.d_rows.ensure(std::max<size_t>(sl.rows.size(), 1) * sizeof(int64_t), "cudaMalloc (adapter row table)");

  // The host image holds the pages as the pool does: one copy per page.
  for (int i = 0; i < a.num_pages(); i++)
    ring_.stage(copy_, pool_ + int64_t(pages[i]) * int64_t(pool_info_.page_bytes), a.page(i), a.page_used[i]);
  for (const auto& mod : a.modules) {
    const int idx = mod.layer * kNumProj + mod.proj;
    cuda::LoraRef& ref = h_refs_[size_t(slot) * ref_stride_ + idx];
    ref.rank = mod.rank;
    ref.scale = mod.scale;
    ref.a_rows = sl.d_rows.as<int64_t>() + mod.a_row0;  // a fused target's later projections share the first's
    ref.b_rows = sl.d_rows.as<int64_t>() + mod.b_row0;
    sl.ranks[idx] = mod.rank;
    sl.max_rank = std::max(sl.max_rank, mod.rank);
  }
  // Then the row-offset table and the slot's refs, on the same stream, so one event covers all.
  if (!sl.rows.empty()) ring_.stage(copy_, sl.d_rows.p, sl.rows.data(), sl.rows.size() * sizeof(int64_t));
  ring_.stage(copy_, d_refs_at(slot), h_refs_.data() + size_t(slot) * ref_stride_, ref_stride_ * sizeof(cuda::LoraRef));
  ring_.flush(copy_);
  check_cuda(cudaEventRecord(sl.ready, copy_), "cudaEventRecord (adapter ready)");
  sl.pending = true;
}

void CudaBackend::remove_adapter(int slot) {
  if (slot <= 0 || slot >= max_slots_) return;
  clear_slot(slot);
  // Zero the slot's device refs too, so a stray token of this slot gets the base model (as on CPU).
  ring_.init();
  ring_.stage(copy_, d_refs_at(slot), h_refs_.data() + size_t(slot) * ref_stride_, ref_stride_ * sizeof(cuda::LoraRef));
  ring_.flush(copy_);
  check_cuda(cudaEventRecord(slots_[slot].ready, copy_), "cudaEventRecord");
  slots_[slot].pending = true;
}

// ---- the step ------------------------------------------------------------------------------------

void CudaBackend::plan_step(const StepBatch& b) {
  const ModelSpec& s = model_->spec;
  StepPlan& P = plan_;
  const int T = b.n_tokens, S = b.n_seqs, n = int(b.sample_seqs.size());
  P = StepPlan{};
  P.T = T, P.S = S, P.n_sample = n;
  if (int(b.tokens.size()) != T || int(b.positions.size()) != T || int(b.token_slots.size()) != T ||
      int(b.query_start.size()) != S + 1 || int(b.context_lens.size()) != S ||
      b.block_tables.size() != size_t(S) * size_t(b.max_blocks))
    throw std::runtime_error("CUDA backend: StepBatch arrays do not match n_tokens / n_seqs / max_blocks");

  std::vector<int32_t> token_seq(T), sample_rows(n), token_long(T, 0);
  int max_new = 0, max_span = 1;
  const int window = s.widest_window();
  for (int q = 0; q < S; q++) {
    const int q0 = b.query_start[q], q1 = b.query_start[q + 1];
    max_new = std::max(max_new, q1 - q0);
    const bool is_long = !b.rope_long.empty() && b.rope_long[size_t(q)] != 0;
    P.any_long = P.any_long || is_long;
    for (int t = q0; t < q1; t++) {
      token_seq[t] = q;
      token_long[t] = is_long;
      const int pos = b.context_lens[q] - (q1 - q0) + (t - q0);
      const int lo = window > 0 ? std::max(0, pos - window + 1) : 0;
      max_span = std::max(max_span, pos - lo + 1);
    }
  }
  for (int i = 0; i < n; i++) sample_rows[i] = b.query_start[b.sample_seqs[i] + 1] - 1;
  P.decode_attn = max_new <= 1 || !cuda::prefill_supported(s.head_dim);
  std::vector<int32_t> prefill_tiles;
  if (P.decode_attn) P.n_splits = cuda::decode_splits(max_span);
  else prefill_tiles = cuda::make_prefill_tiles(b.query_start.data(), S);
  P.n_prefill_tiles = int(prefill_tiles.size() / 2);

  // Adapters of this batch.
  P.proj_used.assign(size_t(ref_stride_), 0);
  std::vector<char> seen(max_slots_, 0);
  for (int t = 0; t < T; t++) {
    const int slot = b.token_slots[t];
    if (slot < 0 || slot >= max_slots_)
      throw std::runtime_error("token adapter slot " + std::to_string(slot) + " out of range");
    if (slot == 0 || seen[slot]) continue;
    seen[slot] = 1;
    const Slot& sl = slots_[slot];
    if (sl.max_rank == 0) continue;
    P.any_lora = true;
    P.z_stride = std::max(P.z_stride, sl.max_rank);
    for (int i = 0; i < ref_stride_; i++)
      if (sl.ranks[i] > 0) P.proj_used[i] = 1;
    if (sl.pending) P.pending_slots.push_back(slot);
  }
  for (int slot = 1; slot < max_slots_; slot++)  // removed slots' zeroed refs (stray tokens)
    if (seen[slot] && slots_[slot].max_rank == 0 && slots_[slot].pending) P.pending_slots.push_back(slot);
  // Decode-only batches (one token per sequence) take the per-token gather, as on the CPU.
  P.bgmv = S == T;
  std::vector<int32_t> sgmv_tiles;
  if (P.any_lora && !P.bgmv) sgmv_tiles = cuda::make_sgmv_tiles(b.token_slots.data(), T);
  P.n_sgmv_tiles = int(sgmv_tiles.size() / 3);

  // All step tables in one pinned buffer and one copy.
  ints_.clear();
  std::vector<size_t> at;
  auto put = [&](const int32_t* p, size_t k) {
    at.push_back(ints_.size());
    ints_.insert(ints_.end(), p, p + k);
    while (ints_.size() % 4) ints_.push_back(0);  // keep each table 16-byte aligned
  };
  put(b.tokens.data(), T);
  put(b.positions.data(), T);
  put(b.token_slots.data(), T);
  put(b.query_start.data(), S + 1);
  put(b.context_lens.data(), S);
  put(b.block_tables.data(), b.block_tables.size());
  put(token_seq.data(), T);
  put(sample_rows.data(), n);
  put(prefill_tiles.data(), prefill_tiles.size());
  put(sgmv_tiles.data(), sgmv_tiles.size());
  put(token_long.data(), T);
  const size_t bytes = std::max<size_t>(ints_.size(), 1) * sizeof(int32_t);
  h_step_.ensure(bytes, "cudaHostAlloc (step tables)");
  d_step_.ensure(bytes, "cudaMalloc (step tables)");
  std::memcpy(h_step_.p, ints_.data(), ints_.size() * sizeof(int32_t));
  check_cuda(cudaMemcpyAsync(d_step_.p, h_step_.p, bytes, cudaMemcpyHostToDevice, compute_), "step tables upload");
  const int32_t* d = d_step_.as<int32_t>();
  const int32_t** dst[] = {&P.tokens,     &P.positions, &P.token_slots,  &P.query_start,   &P.context_lens,
                           &P.block_tables, &P.token_seq, &P.sample_rows, &P.prefill_tiles, &P.sgmv_tiles,
                           &P.token_long};
  for (size_t i = 0; i < at.size(); i++) *dst[i] = d + at[i];
}

void CudaBackend::project(int layer, int p, const float* x, float* y, const float* bias) {
  const DevWeight& w = layers_[layer].proj[p];
  gemm_->run(x, plan_.T, w.cols, w.data, w.wt, w.rows, bias, y, compute_);
  if (plan_.any_lora && plan_.proj_used[size_t(layer) * kNumProj + p]) apply_lora(layer, p, x, y);
}

void CudaBackend::apply_lora(int layer, int p, const float* x, float* y) {
  StepPlan& P = plan_;
  if (!P.waited) {  // first LoRA kernel of the step: adapters installed since the last step must be in
    for (int slot : P.pending_slots) {
      check_cuda(cudaStreamWaitEvent(compute_, slots_[slot].ready, 0), "cudaStreamWaitEvent (adapter ready)");
      slots_[slot].pending = false;
    }
    P.waited = true;
  }
  const cuda::LoraRef* refs = d_refs_ + size_t(layer) * kNumProj + p;
  const int in = model_->proj_in(p), out = model_->proj_out(p);
  float* z = z_.as<float>();
  if (P.bgmv) {
    cuda::lora_shrink_bgmv(pool_, refs, ref_stride_, P.token_slots, P.T, x, in, z, P.z_stride, compute_);
    cuda::lora_expand_bgmv(pool_, refs, ref_stride_, P.token_slots, P.T, z, P.z_stride, y, out, compute_);
  } else {
    cuda::lora_shrink_sgmv(pool_, refs, ref_stride_, P.sgmv_tiles, P.n_sgmv_tiles, x, in, z, P.z_stride, compute_);
    cuda::lora_expand_sgmv(pool_, refs, ref_stride_, P.sgmv_tiles, P.n_sgmv_tiles, z, P.z_stride, y, out, compute_);
  }
}

void CudaBackend::forward(const StepBatch& b, float* logits, const RowLogits* extra) {
  const Model& m = *model_;
  const ModelSpec& s = m.spec;
  if (b.n_tokens <= 0) return;
  // Idle in normal operation (the previous step synchronised); after a failed step this keeps the
  // pinned step buffer from being overwritten under a copy still in flight.
  check_cuda(cudaStreamSynchronize(compute_), "CUDA stream (previous step)");
  plan_step(b);
  const StepPlan& P = plan_;
  const int T = P.T, H = s.hidden, QD = m.q_dim(), KD = m.kv_dim(), I = s.intermediate, V = s.vocab;
  const size_t f = sizeof(float);
  x_.ensure(size_t(T) * H * f, "activations");
  h_.ensure(size_t(T) * H * f, "activations");
  o_.ensure(size_t(T) * H * f, "activations");
  q_.ensure(size_t(T) * QD * f, "activations");
  att_.ensure(size_t(T) * QD * f, "activations");
  k_.ensure(size_t(T) * KD * f, "activations");
  v_.ensure(size_t(T) * KD * f, "activations");
  gate_.ensure(size_t(T) * I * f, "activations");
  up_.ensure(size_t(T) * I * f, "activations");
  if (P.any_lora) z_.ensure(size_t(T) * P.z_stride * f, "LoRA scratch");
  if (P.decode_attn && P.n_splits > 1)
    attn_ws_.ensure(cuda::decode_workspace_floats(T, s.n_heads, s.head_dim, P.n_splits) * f, "attention workspace");
  float *x = x_.as<float>(), *h = h_.as<float>(), *o = o_.as<float>(), *q = q_.as<float>(), *att = att_.as<float>(),
        *k = k_.as<float>(), *v = v_.as<float>(), *gate = gate_.as<float>(), *up = up_.as<float>();

  cuda::AttnBatch ab{P.S, P.query_start, P.context_lens, P.block_tables, P.token_seq, b.max_blocks, s.sliding_window,
                     s.attn_softcap};
  const float scale = s.scores_scale();
  cuda::embed(P.tokens, T, embed_.data, embed_.wt, H, x, compute_, s.embed_scale);
  for (int l = 0; l < s.n_layers; l++) {
    const DevLayer& L = layers_[l];
    // x += previous layer's MLP output (none before layer 0), h = norm(x).
    cuda::rmsnorm(x, l == 0 ? nullptr : o, L.attn_norm, T, H, s.rms_eps, h, compute_);
    project(l, kQ, h, q, L.bias[0]);
    project(l, kK, h, k, L.bias[1]);
    project(l, kV, h, v, L.bias[2]);
    if (s.qk_norm) {  // per head over head_dim: T * heads rows, in place
      cuda::rmsnorm(q, nullptr, L.q_norm, T * s.n_heads, s.head_dim, s.rms_eps, q, compute_);
      cuda::rmsnorm(k, nullptr, L.k_norm, T * s.n_kv_heads, s.head_dim, s.rms_eps, k, compute_);
    }
    const bool local = s.local_rope(l);
    cuda::rope(q, s.n_heads, k, s.n_kv_heads, T, s.head_dim, P.positions, local ? inv_freq_local_ : inv_freq_,
               local ? 1.0f : m.attn_scaling, compute_, s.rot_dim(), P.any_long ? inv_freq_long_ : nullptr, P.token_long);
    cuda::kv_write(pool_, layout_, l, ab, T, k, v, cuda::kF32, compute_);
    ab.sliding_window = s.window(l);
    if (P.decode_attn)
      cuda::paged_attention_decode(pool_, layout_, l, ab, T, q, cuda::kF32, s.n_heads, scale, P.n_splits,
                                   attn_ws_.as<float>(), att, compute_);
    else
      cuda::paged_attention_prefill(pool_, layout_, l, ab, P.prefill_tiles, P.n_prefill_tiles, q, cuda::kF32, s.n_heads,
                                    scale, att, compute_);
    project(l, kO, att, o, nullptr);
    if (s.sandwich_norm) cuda::rmsnorm(o, nullptr, L.post_attn_norm, T, H, s.rms_eps, o, compute_);
    cuda::rmsnorm(x, o, L.mlp_norm, T, H, s.rms_eps, h, compute_);  // x += attention output
    project(l, kGate, h, gate, nullptr);
    project(l, kUp, h, up, nullptr);
    // in place: act overwrites gate
    if (s.act == Activation::GeluTanh) cuda::gelu_tanh_mul(gate, up, size_t(T) * I, gate, compute_);
    else cuda::silu_mul(gate, up, size_t(T) * I, gate, compute_);
    project(l, kDown, gate, o, nullptr);
    // Gemma normalises the MLP output before the residual add (fused into the next rmsnorm).
    if (s.sandwich_norm) cuda::rmsnorm(o, nullptr, L.post_mlp_norm, T, H, s.rms_eps, o, compute_);
  }
  cuda::residual_add(x, o, size_t(T) * H, compute_);
  // Final norm and lm_head only on the last position of each sequence that samples.
  const int n = P.n_sample;
  if (n > 0) {
    last_.ensure(size_t(n) * H * f, "activations");
    logits_.ensure(size_t(n) * V * f, "logits");
    float* last = last_.as<float>();
    cuda::gather_rows(x, P.sample_rows, n, H, last, compute_);
    cuda::rmsnorm(last, nullptr, final_norm_, n, H, s.rms_eps, last, compute_);
    gemm_->run(last, n, H, lm_head_.data, lm_head_.wt, V, nullptr, logits_.as<float>(), compute_);
    if (s.final_softcap > 0.f) cuda::softcap(logits_.as<float>(), size_t(n) * V, s.final_softcap, compute_);
    // Sampling runs on the host (addon/sampler.cc): [n, V] fp32 logits come back.
    check_cuda(cudaMemcpyAsync(logits, logits_.p, size_t(n) * V * f, cudaMemcpyDeviceToHost, compute_),
               "logits copy to host");
  }
  // Prompt logprobs: the extra rows in chunks, each chunk's logits back to the host for the
  // log-softmax (the same host code as the CPU backend's rows).
  if (extra && !extra->rows.empty()) {
    const int R = int(extra->rows.size()), C = RowLogits::kChunk;
    // The sampled rows' copy may still be in flight from last_/logits_, which may be regrown here.
    check_cuda(cudaStreamSynchronize(compute_), "CUDA forward");
    last_.ensure(size_t(C) * H * f, "activations");
    logits_.ensure(size_t(C) * V * f, "logits");
    extra_rows_.ensure(size_t(C) * sizeof(int32_t), "prompt logprob rows");
    std::vector<float> host(size_t(std::min(R, C)) * V);
    float* last = last_.as<float>();
    for (int first = 0; first < R; first += C) {
      const int cnt = std::min(C, R - first);
      check_cuda(cudaMemcpyAsync(extra_rows_.p, extra->rows.data() + first, size_t(cnt) * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, compute_),
                 "prompt logprob rows to device");
      cuda::gather_rows(x, extra_rows_.as<int32_t>(), cnt, H, last, compute_);
      cuda::rmsnorm(last, nullptr, final_norm_, cnt, H, s.rms_eps, last, compute_);
      gemm_->run(last, cnt, H, lm_head_.data, lm_head_.wt, V, nullptr, logits_.as<float>(), compute_);
      if (s.final_softcap > 0.f) cuda::softcap(logits_.as<float>(), size_t(cnt) * V, s.final_softcap, compute_);
      check_cuda(cudaMemcpyAsync(host.data(), logits_.p, size_t(cnt) * V * f, cudaMemcpyDeviceToHost, compute_),
                 "prompt logits copy to host");
      check_cuda(cudaStreamSynchronize(compute_), "CUDA prompt logits");
      extra->consume(first, cnt, host.data());
    }
  }
  check_cuda(cudaStreamSynchronize(compute_), "CUDA forward");
}

}  // namespace

bool cuda_device_available(std::string* why_not) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why_not) *why_not = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(e);
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    if (why_not) *why_not = "no CUDA device";
    return false;
  }
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  e = cudaGetDeviceProperties(&prop, dev);
  if (e != cudaSuccess) {
    if (why_not) *why_not = std::string("cudaGetDeviceProperties failed: ") + cudaGetErrorString(e);
    cudaGetLastError();
    return false;
  }
  if (prop.major < 8) {
    if (why_not)
      *why_not = std::string(prop.name) + " has compute capability " + std::to_string(prop.major) + "." +
                 std::to_string(prop.minor) + "; the CUDA kernels are built for 8.0 and newer";
    return false;
  }
  return true;
}

bool cuda_device_available() { return cuda_device_available(nullptr); }

void cuda_memory_info(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = *total_bytes = 0;
  if (!cuda_device_available()) return;
  if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
    cudaGetLastError();
    *free_bytes = *total_bytes = 0;
  }
}

std::unique_ptr<Backend> make_cuda_backend(std::shared_ptr<Model> model, int block_size, int num_pages, int max_slots,
                                           const LoadProgress& progress) {
  return std::make_unique<CudaBackend>(std::move(model), block_size, num_pages, max_slots, progress);
}

}  // namespace loraplex
