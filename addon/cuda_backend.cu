// CUDA backend (see cuda_backend.h): the model step of cpu_backend.cc on the GPU, op for op, over
// the same unified-pool layout, with the kernels of kernels/cuda.
#include "addon/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
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
  // True when it (re)allocated: the address changed.
  bool ensure(size_t bytes, const char* what) {
    if (bytes <= cap) return false;
    release();
    const size_t want = (std::max(bytes, cap + cap / 2) + 255) & ~size_t(255);
    check_cuda(cudaMalloc(&p, want), what);
    cap = want;
    return true;
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

std::string fmt_gib(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GiB", bytes / double(size_t(1) << 30));
  return b;
}
std::string fmt_fraction(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

bool is_device_pointer(const void* p) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();  // clear: plain host memory on older runtimes
    return false;
  }
  return attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
}

// A captured decode step: the instantiated graph and the step tables it reads (device memory at
// fixed addresses, refilled before every replay).
struct GraphKey {
  int bucket = 0, blocks = 0, lora_mask = 0, z_stride = 0;
  bool operator<(const GraphKey& o) const {
    if (bucket != o.bucket) return bucket < o.bucket;
    if (blocks != o.blocks) return blocks < o.blocks;
    if (lora_mask != o.lora_mask) return lora_mask < o.lora_mask;
    return z_stride < o.z_stride;
  }
};
struct Graph {
  cudaGraphExec_t exec = nullptr;
  uint64_t gen = 0;       // buffer generation the graph's pointers belong to
  uint64_t gemm_gen = 0;  // the Gemm's buffer generation at capture
  uint64_t last_use = 0;  // for LRU eviction
  int n_splits = 1;
  DevBuf tables;          // [tokens, positions, slots, query_start, context_lens, block_tables, token_seq, sample_rows, token_long]
  Graph() = default;
  Graph(Graph&& o) noexcept
      : exec(o.exec), gen(o.gen), gemm_gen(o.gemm_gen), last_use(o.last_use), n_splits(o.n_splits), tables(std::move(o.tables)) {
    o.exec = nullptr;
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec) cudaGraphExecDestroy(exec);
  }
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<Model> model, int block_size, int num_pages, int max_slots, const CudaOptions& options,
              const LoadProgress& progress);
  ~CudaBackend() override;

  std::string name() const override { return "cuda"; }
  const Model& model() const override { return *model_; }
  const PoolInfo& pool() const override { return pool_info_; }
  size_t lora_elem_bytes() const override { return cuda::dtype_bytes(lt_); }
  std::string compute_dtype() const override { return at_ == cuda::kBF16 ? "bfloat16" : "float32"; }
  std::string kv_cache_dtype() const override { return layout_.kt == cuda::kBF16 ? "bfloat16" : "float32"; }
  void install_adapter(int slot, const ParsedAdapter& a, const std::vector<int32_t>& pages) override;
  void remove_adapter(int slot) override;
  void forward(const StepBatch& b, float* logits, const RowLogits* extra) override;
  CudaGraphStats graph_stats() const {
    CudaGraphStats g = gstats_;
    g.live = int(graphs_.size());
    return g;
  }

 private:
  void init(int block_size, int num_pages, const LoadProgress& progress);
  void release() noexcept;
  const void* upload(const void* host, size_t bytes, const char* what);
  const float* upload(const std::vector<float>& v, const char* what) {
    return v.empty() ? nullptr : static_cast<const float*>(upload(v.data(), v.size() * sizeof(float), what));
  }
  DevWeight upload(const Weight& w, const char* what);
  void clear_slot(int slot);
  void scan_adapters(const StepBatch& b);
  void plan_step(const StepBatch& b);
  void ensure_buffers(int T, int z_stride, size_t attn_ws_floats, int n_rows);
  void wait_pending();
  void enqueue_step(int max_blocks);
  void project(int layer, int p, const void* x, void* y, const float* bias);
  void apply_lora(int layer, int p, const void* x, void* y);
  bool graph_eligible(const StepBatch& b, const RowLogits* extra) const;
  bool forward_graph(const StepBatch& b, float* logits);
  void warm_gemms(int T);
  Graph* capture(const GraphKey& key);
  cuda::LoraRef* d_refs_at(int slot) const { return d_refs_ + size_t(slot) * ref_stride_; }

  std::shared_ptr<Model> model_;
  int max_slots_;
  CudaOptions opt_;
  int at_ = cuda::kF32;  // activation dtype between kernels
  int lt_ = cuda::kF32;  // adapter row dtype in the pool
  int n_sms_ = 1;
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

  // Per-step state and buffers (grown, never shrunk). Growing one bumps buf_gen_: graphs captured
  // with the old addresses are dropped and captured again on their next use.
  StepPlan plan_;
  std::vector<int32_t> ints_;
  PinnedBuf h_step_;
  DevBuf d_step_, x_, h_, q_, k_, v_, att_, o_, gate_, up_, z_, last_, lastn_, logits_, attn_ws_, extra_rows_;
  uint64_t buf_gen_ = 1;

  std::map<GraphKey, Graph> graphs_;
  std::set<GraphKey> uncapturable_;  // keys whose capture failed: eager from then on
  uint64_t graph_clock_ = 0;
  CudaGraphStats gstats_;
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
                         const CudaOptions& options, const LoadProgress& progress)
    : model_(std::move(model)), max_slots_(max_slots), opt_(options) {
  at_ = opt_.compute_bf16 ? cuda::kBF16 : cuda::kF32;
  lt_ = opt_.lora_bf16 ? cuda::kBF16 : cuda::kF32;
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
  if (block_size < 1 || (num_pages < 1 && !(opt_.gpu_memory_utilization > 0)) || max_slots < 1)
    throw std::runtime_error("CUDA backend: block_size, num_pages and max_slots must be positive");
  if (opt_.gpu_memory_utilization > 1)
    throw std::runtime_error("--gpu-memory-utilization must be in (0, 1]");
  if (s.head_dim % 2 != 0 || s.n_heads % s.n_kv_heads != 0)
    throw std::runtime_error("CUDA backend: head_dim must be even and n_heads a multiple of n_kv_heads");
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess && prop.multiProcessorCount > 0) n_sms_ = prop.multiProcessorCount;
  ref_stride_ = s.n_layers * kNumProj;
  pool_info_.block_size = block_size;
  const int kt = opt_.kv_bf16 ? cuda::kBF16 : cuda::kF32;
  pool_info_.page_bytes = kv_page_bytes(s, block_size, cuda::dtype_bytes(kt));
  layout_ = {s.n_layers, block_size, s.n_kv_heads, s.head_dim, pool_info_.page_bytes, kt};

  check_cuda(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking), "cudaStreamCreate (compute)");
  check_cuda(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking), "cudaStreamCreate (copy)");
  check_cuda(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming), "cudaEventCreate");

  // --gpu-memory-utilization (vLLM's semantics): this server may use that fraction of the device's
  // memory; the pool is what is left of it after the weights and the activation buffers.
  size_t free0 = 0, total_mem = 0;
  double budget = 0;
  if (opt_.gpu_memory_utilization > 0) {
    check_cuda(cudaMemGetInfo(&free0, &total_mem), "cudaMemGetInfo");
    budget = double(total_mem) * opt_.gpu_memory_utilization;
    if (double(free0) < budget)
      throw std::runtime_error("--gpu-memory-utilization " + fmt_fraction(opt_.gpu_memory_utilization) + " asks for " +
                               fmt_gib(budget) + " of the GPU's " + fmt_gib(double(total_mem)) + ", but only " +
                               fmt_gib(double(free0)) + " are free (other processes hold the rest): lower it or free the GPU");
  }
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
  // Activations for the largest step expected, allocated now: the peak is paid (and fails) at
  // start-up rather than under load, and graph captures keep their buffers.
  if (opt_.max_tokens > 0) ensure_buffers(opt_.max_tokens, 0, 0, std::max(std::min(opt_.max_tokens, 256), RowLogits::kChunk));
  check_cuda(cudaDeviceSynchronize(), "CUDA backend initialisation");

  if (budget > 0) {
    size_t free1 = 0;
    check_cuda(cudaMemGetInfo(&free1, &total_mem), "cudaMemGetInfo");
    // What this backend holds so far (weights, tables, buffers), and 1% of the budget kept back for
    // what grows later: graph executables, larger attention / LoRA workspaces, allocator slack.
    const double used = double(free0 > free1 ? free0 - free1 : 0), reserve = budget / 100;
    const double pool_bytes = budget - used - reserve;
    const double pages = std::floor(pool_bytes / double(pool_info_.page_bytes));
    if (pages < 2)
      throw std::runtime_error("--gpu-memory-utilization " + fmt_fraction(opt_.gpu_memory_utilization) + " (" +
                               fmt_gib(budget) + ") leaves " + fmt_gib(std::max(pool_bytes, 0.0)) +
                               " for the KV cache and adapters after the weights and activations (" + fmt_gib(used) +
                               "): fewer than 2 pages of " + std::to_string(pool_info_.page_bytes) +
                               " bytes; raise it or lower --max-batch-tokens");
    num_pages = int(std::min(pages, 2147483647.0));
  }
  pool_info_.num_pages = num_pages;
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
  check_cuda(cudaDeviceSynchronize(), "CUDA backend initialisation");
}

CudaBackend::~CudaBackend() { release(); }

void CudaBackend::release() noexcept {
  // Must not throw: errors here are ignored (the backend is being torn down).
  if (compute_) cudaStreamSynchronize(compute_);
  if (copy_) cudaStreamSynchronize(copy_);
  graphs_.clear();
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
  if (a.page_bytes != pool_info_.page_bytes || a.elem_bytes != cuda::dtype_bytes(lt_))
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
  // Graphs read the table only through the device refs (rewritten below), never its address.
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

// The adapters of the batch: which projections they touch, their largest rank, and which slots'
// install copies the step must wait for.
void CudaBackend::scan_adapters(const StepBatch& b) {
  StepPlan& P = plan_;
  P.proj_used.assign(size_t(ref_stride_), 0);
  std::vector<char> seen(max_slots_, 0);
  for (int t = 0; t < b.n_tokens; t++) {
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
}

void CudaBackend::plan_step(const StepBatch& b) {
  const ModelSpec& s = model_->spec;
  StepPlan& P = plan_;
  const int T = b.n_tokens, S = b.n_seqs, n = int(b.sample_seqs.size());
  P = StepPlan{};
  P.T = T, P.S = S, P.n_sample = n;

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

  scan_adapters(b);
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

// Activation buffers for a step of T tokens (n_rows sampled or prompt-logprob rows at once).
void CudaBackend::ensure_buffers(int T, int z_stride, size_t attn_ws_floats, int n_rows) {
  const Model& m = *model_;
  const ModelSpec& s = m.spec;
  const size_t a = cuda::dtype_bytes(at_), f = sizeof(float), t = size_t(std::max(T, 1));
  bool grew = false;
  grew |= x_.ensure(t * s.hidden * f, "activations");  // the residual stream: fp32
  grew |= h_.ensure(t * s.hidden * a, "activations");
  grew |= o_.ensure(t * s.hidden * a, "activations");
  grew |= q_.ensure(t * m.q_dim() * a, "activations");
  grew |= att_.ensure(t * m.q_dim() * a, "activations");
  grew |= k_.ensure(t * m.kv_dim() * a, "activations");
  grew |= v_.ensure(t * m.kv_dim() * a, "activations");
  grew |= gate_.ensure(t * s.intermediate * a, "activations");
  grew |= up_.ensure(t * s.intermediate * a, "activations");
  if (z_stride > 0) grew |= z_.ensure(t * z_stride * f, "LoRA scratch");
  if (attn_ws_floats > 0) grew |= attn_ws_.ensure(attn_ws_floats * f, "attention workspace");
  if (n_rows > 0) {
    grew |= last_.ensure(size_t(n_rows) * s.hidden * f, "activations");
    grew |= lastn_.ensure(size_t(n_rows) * s.hidden * a, "activations");
    grew |= logits_.ensure(size_t(n_rows) * s.vocab * f, "logits");
  }
  if (grew) buf_gen_++;
}

void CudaBackend::wait_pending() {
  StepPlan& P = plan_;
  if (P.waited) return;
  for (int slot : P.pending_slots) {
    check_cuda(cudaStreamWaitEvent(compute_, slots_[slot].ready, 0), "cudaStreamWaitEvent (adapter ready)");
    slots_[slot].pending = false;
  }
  P.waited = true;
}

void CudaBackend::project(int layer, int p, const void* x, void* y, const float* bias) {
  const DevWeight& w = layers_[layer].proj[p];
  gemm_->run(x, at_, plan_.T, w.cols, w.data, w.wt, w.rows, bias, y, at_, compute_);
  if (plan_.any_lora && plan_.proj_used[size_t(layer) * kNumProj + p]) apply_lora(layer, p, x, y);
}

void CudaBackend::apply_lora(int layer, int p, const void* x, void* y) {
  StepPlan& P = plan_;
  wait_pending();  // first LoRA kernel of the step: adapters installed since the last step must be in
  const cuda::LoraRef* refs = d_refs_ + size_t(layer) * kNumProj + p;
  const int in = model_->proj_in(p), out = model_->proj_out(p);
  float* z = z_.as<float>();
  if (P.bgmv) {
    cuda::lora_shrink_bgmv(pool_, lt_, refs, ref_stride_, P.token_slots, P.T, x, at_, in, z, P.z_stride, compute_);
    cuda::lora_expand_bgmv(pool_, lt_, refs, ref_stride_, P.token_slots, P.T, z, P.z_stride, y, at_, out, compute_);
  } else {
    cuda::lora_shrink_sgmv(pool_, lt_, refs, ref_stride_, P.sgmv_tiles, P.n_sgmv_tiles, x, at_, in, z, P.z_stride,
                           compute_);
    cuda::lora_expand_sgmv(pool_, lt_, refs, ref_stride_, P.sgmv_tiles, P.n_sgmv_tiles, z, P.z_stride, y, at_, out,
                           compute_);
  }
}

// Every kernel of the step, from the embedding to the logits of the plan's sampled rows: enqueue
// only (no synchronisation, allocation or host copy), so that a decode step can be captured.
void CudaBackend::enqueue_step(int max_blocks) {
  const Model& m = *model_;
  const ModelSpec& s = m.spec;
  const StepPlan& P = plan_;
  const int T = P.T, H = s.hidden, I = s.intermediate, V = s.vocab;
  void *h = h_.p, *o = o_.p, *q = q_.p, *att = att_.p, *k = k_.p, *v = v_.p, *gate = gate_.p, *up = up_.p;
  float* x = x_.as<float>();
  const int A = at_;

  cuda::AttnBatch ab{P.S, P.query_start, P.context_lens, P.block_tables, P.token_seq, max_blocks, s.sliding_window,
                     s.attn_softcap};
  const float scale = s.scores_scale();
  cuda::embed(P.tokens, T, embed_.data, embed_.wt, H, x, compute_, s.embed_scale);
  for (int l = 0; l < s.n_layers; l++) {
    const DevLayer& L = layers_[l];
    // x += previous layer's MLP output (none before layer 0), h = norm(x).
    cuda::rmsnorm(x, l == 0 ? nullptr : o, L.attn_norm, T, H, s.rms_eps, h, compute_, cuda::kF32, A, A);
    project(l, kQ, h, q, L.bias[0]);
    project(l, kK, h, k, L.bias[1]);
    project(l, kV, h, v, L.bias[2]);
    if (s.qk_norm) {  // per head over head_dim: T * heads rows, in place
      cuda::rmsnorm(q, nullptr, L.q_norm, T * s.n_heads, s.head_dim, s.rms_eps, q, compute_, A, A, A);
      cuda::rmsnorm(k, nullptr, L.k_norm, T * s.n_kv_heads, s.head_dim, s.rms_eps, k, compute_, A, A, A);
    }
    const bool local = s.local_rope(l);
    cuda::rope(q, s.n_heads, k, s.n_kv_heads, T, s.head_dim, P.positions, local ? inv_freq_local_ : inv_freq_,
               local ? 1.0f : m.attn_scaling, compute_, s.rot_dim(), P.any_long ? inv_freq_long_ : nullptr, P.token_long,
               A);
    cuda::kv_write(pool_, layout_, l, ab, T, k, v, A, compute_);
    ab.sliding_window = s.window(l);
    if (P.decode_attn)
      cuda::paged_attention_decode(pool_, layout_, l, ab, T, q, A, s.n_heads, scale, P.n_splits, attn_ws_.as<float>(),
                                   att, compute_);
    else
      cuda::paged_attention_prefill(pool_, layout_, l, ab, P.prefill_tiles, P.n_prefill_tiles, q, A, s.n_heads, scale,
                                    att, compute_);
    project(l, kO, att, o, nullptr);
    if (s.sandwich_norm) cuda::rmsnorm(o, nullptr, L.post_attn_norm, T, H, s.rms_eps, o, compute_, A, A, A);
    cuda::rmsnorm(x, o, L.mlp_norm, T, H, s.rms_eps, h, compute_, cuda::kF32, A, A);  // x += attention output
    project(l, kGate, h, gate, nullptr);
    project(l, kUp, h, up, nullptr);
    // in place: act overwrites gate
    if (s.act == Activation::GeluTanh) cuda::gelu_tanh_mul(gate, up, size_t(T) * I, gate, compute_, A);
    else cuda::silu_mul(gate, up, size_t(T) * I, gate, compute_, A);
    project(l, kDown, gate, o, nullptr);
    // Gemma normalises the MLP output before the residual add (fused into the next rmsnorm).
    if (s.sandwich_norm) cuda::rmsnorm(o, nullptr, L.post_mlp_norm, T, H, s.rms_eps, o, compute_, A, A, A);
  }
  cuda::residual_add(x, o, size_t(T) * H, compute_, A);
  // Final norm and lm_head only on the last position of each sequence that samples.
  const int n = P.n_sample;
  if (n > 0) {
    cuda::gather_rows(x, P.sample_rows, n, H, last_.as<float>(), compute_);
    cuda::rmsnorm(last_.p, nullptr, final_norm_, n, H, s.rms_eps, lastn_.p, compute_, cuda::kF32, cuda::kF32, A);
    gemm_->run(lastn_.p, A, n, H, lm_head_.data, lm_head_.wt, V, nullptr, logits_.p, cuda::kF32, compute_);
    if (s.final_softcap > 0.f) cuda::softcap(logits_.as<float>(), size_t(n) * V, s.final_softcap, compute_);
  }
}

// Decode-only steps without prompt-logprob rows, small enough for a captured bucket.
bool CudaBackend::graph_eligible(const StepBatch& b, const RowLogits* extra) const {
  if (!opt_.graphs || (extra && !extra->rows.empty())) return false;
  return b.n_seqs == b.n_tokens && b.n_tokens <= opt_.max_graph_batch;
}

namespace {
// Decode batch buckets, as vLLM captures them: 1, 2, 4, then multiples of 8.
int graph_bucket(int T) { return T <= 1 ? 1 : T <= 2 ? 2 : T <= 4 ? 4 : (T + 7) / 8 * 8; }
int pow2_at_least(int v, int lo) {
  int p = lo;
  while (p < v) p *= 2;
  return p;
}
}  // namespace

void CudaBackend::warm_gemms(int T) {
  for (const DevLayer& L : layers_)
    for (int p = 0; p < kNumProj; p++) {
      const DevWeight& w = L.proj[p];
      gemm_->warm(T, w.cols, w.rows, at_, w.wt, at_, p < 3 && L.bias[p] != nullptr);
    }
  gemm_->warm(T, model_->spec.hidden, model_->spec.vocab, at_, lm_head_.wt, cuda::kF32, false);
}

Graph* CudaBackend::capture(const GraphKey& key) {
  const ModelSpec& s = model_->spec;
  const int B = key.bucket;
  Graph g;
  // Enough key splits that the step fills the GPU however short its bucket; each query then cuts
  // its own span into that many parts, so one capture serves any context length.
  g.n_splits = cuda::decode_splits_for(B, s.n_kv_heads, key.blocks * pool_info_.block_size, n_sms_);
  const size_t tables = size_t(B) * 8 + size_t(B) * key.blocks + 64;
  g.tables.ensure(tables * sizeof(int32_t), "cudaMalloc (graph step tables)");
  ensure_buffers(B, key.z_stride, cuda::decode_workspace_floats(B, s.n_heads, s.head_dim, g.n_splits), B);
  warm_gemms(B);  // lazy GEMM state (workspaces, algorithm choices) for this batch, before capture

  // The plan the captured kernels read: every pointer into g.tables, fixed for the graph's life.
  StepPlan& P = plan_;
  const int32_t* d = g.tables.as<int32_t>();
  size_t at = 0;
  auto next = [&](size_t k) {
    const int32_t* p = d + at;
    at += (k + 3) / 4 * 4;
    return p;
  };
  P.T = P.S = P.n_sample = B;
  P.tokens = next(B), P.positions = next(B), P.token_slots = next(B), P.query_start = next(B + 1);
  P.context_lens = next(B), P.block_tables = next(size_t(B) * key.blocks), P.token_seq = next(B);
  P.sample_rows = next(B), P.token_long = next(B);
  P.prefill_tiles = P.sgmv_tiles = nullptr;
  P.decode_attn = true;
  P.n_splits = g.n_splits;
  P.bgmv = true;
  P.any_lora = key.lora_mask != 0;
  P.z_stride = key.z_stride;
  P.any_long = inv_freq_long_ != nullptr;
  for (int l = 0; l < s.n_layers; l++)
    for (int p = 0; p < kNumProj; p++) P.proj_used[size_t(l) * kNumProj + p] = (key.lora_mask >> p) & 1;
  P.waited = true;  // the adapters' events are waited on before every launch, outside the graph

  check_cuda(cudaStreamSynchronize(compute_), "CUDA stream (before capture)");
  check_cuda(cudaStreamBeginCapture(compute_, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
  cudaGraph_t graph = nullptr;
  try {
    enqueue_step(key.blocks);
  } catch (...) {
    cudaStreamEndCapture(compute_, &graph);
    if (graph) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  check_cuda(cudaStreamEndCapture(compute_, &graph), "cudaStreamEndCapture");
  const cudaError_t e = cudaGraphInstantiate(&g.exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(e, "cudaGraphInstantiate");
  g.gen = buf_gen_;
  g.gemm_gen = gemm_->generation();
  gstats_.captures++;
  // At most 256 graphs: the least recently used one goes.
  if (graphs_.size() >= 256) {
    auto lru = graphs_.begin();
    for (auto it = graphs_.begin(); it != graphs_.end(); ++it)
      if (it->second.last_use < lru->second.last_use) lru = it;
    graphs_.erase(lru);
  }
  return &graphs_.emplace(key, std::move(g)).first->second;
}

// Runs a decode step through its captured graph (capturing it first if needed); false when the
// step must run eagerly instead (its capture failed once).
bool CudaBackend::forward_graph(const StepBatch& b, float* logits) {
  const ModelSpec& s = model_->spec;
  const int T = b.n_tokens, n = int(b.sample_seqs.size());
  plan_ = StepPlan{};
  plan_.T = T;
  scan_adapters(b);
  GraphKey key;
  key.bucket = graph_bucket(T);
  key.blocks = pow2_at_least(std::max(b.max_blocks, 1), 4);
  if (plan_.any_lora) {
    for (int p = 0; p < kNumProj; p++)
      for (int l = 0; l < s.n_layers; l++)
        if (plan_.proj_used[size_t(l) * kNumProj + p]) key.lora_mask |= 1 << p;
    key.z_stride = pow2_at_least(plan_.z_stride, 8);
  }
  std::vector<int> pending = plan_.pending_slots;
  if (uncapturable_.count(key)) return false;

  // This step's tables, padded to the bucket: padding sequences have context length 0 (no KV
  // write, zero attention output), the base model, and a sampled row nobody reads.
  const int B = key.bucket, W = key.blocks;
  ints_.assign(size_t(B) * 8 + size_t(B) * W + 64, 0);
  size_t at = 0;
  auto next = [&](size_t k) {
    int32_t* p = ints_.data() + at;
    at += (k + 3) / 4 * 4;
    return p;
  };
  int32_t *tokens = next(B), *positions = next(B), *slots = next(B), *qs = next(B + 1), *ctx = next(B),
          *bt = next(size_t(B) * W), *tseq = next(B), *rows = next(B), *tlong = next(B);
  for (int t = 0; t < T; t++) {
    tokens[t] = b.tokens[t], positions[t] = b.positions[t], slots[t] = b.token_slots[t];
    ctx[t] = b.context_lens[t];
    for (int j = 0; j < b.max_blocks; j++) bt[size_t(t) * W + j] = b.block_tables[size_t(t) * b.max_blocks + j];
    tlong[t] = !b.rope_long.empty() && b.rope_long[size_t(t)] != 0;
  }
  for (int i = 0; i <= B; i++) qs[i] = i;
  for (int t = 0; t < B; t++) tseq[t] = t;
  for (int i = 0; i < n; i++) rows[i] = b.sample_seqs[i];  // decode: sequence i's token is row i

  Graph* g = nullptr;
  auto it = graphs_.find(key);
  if (it != graphs_.end() && (it->second.gen != buf_gen_ || it->second.gemm_gen != gemm_->generation())) {
    graphs_.erase(it);  // its buffers moved
    gstats_.invalidations++;
    it = graphs_.end();
  }
  if (it != graphs_.end()) g = &it->second;
  else {
    try {
      g = capture(key);
    } catch (const std::exception&) {
      // A step that cannot be captured runs eagerly, now and from then on.
      uncapturable_.insert(key);
      gstats_.capture_failures++;
      return false;
    }
  }
  g->last_use = ++graph_clock_;
  const size_t bytes = ints_.size() * sizeof(int32_t);
  h_step_.ensure(bytes, "cudaHostAlloc (step tables)");
  std::memcpy(h_step_.p, ints_.data(), bytes);
  check_cuda(cudaMemcpyAsync(g->tables.p, h_step_.p, bytes, cudaMemcpyHostToDevice, compute_), "graph step tables upload");
  for (int slot : pending) {
    check_cuda(cudaStreamWaitEvent(compute_, slots_[slot].ready, 0), "cudaStreamWaitEvent (adapter ready)");
    slots_[slot].pending = false;
  }
  check_cuda(cudaGraphLaunch(g->exec, compute_), "cudaGraphLaunch");
  gstats_.replays++;
  if (n > 0)
    check_cuda(cudaMemcpyAsync(logits, logits_.p, size_t(n) * s.vocab * sizeof(float), cudaMemcpyDeviceToHost, compute_),
               "logits copy to host");
  check_cuda(cudaStreamSynchronize(compute_), "CUDA forward");
  return true;
}

void CudaBackend::forward(const StepBatch& b, float* logits, const RowLogits* extra) {
  const ModelSpec& s = model_->spec;
  if (b.n_tokens <= 0) return;
  const int T = b.n_tokens, S = b.n_seqs;
  if (int(b.tokens.size()) != T || int(b.positions.size()) != T || int(b.token_slots.size()) != T ||
      int(b.query_start.size()) != S + 1 || int(b.context_lens.size()) != S ||
      b.block_tables.size() != size_t(S) * size_t(b.max_blocks))
    throw std::runtime_error("CUDA backend: StepBatch arrays do not match n_tokens / n_seqs / max_blocks");
  // Idle in normal operation (the previous step synchronised); after a failed step this keeps the
  // pinned step buffer from being overwritten under a copy still in flight.
  check_cuda(cudaStreamSynchronize(compute_), "CUDA stream (previous step)");
  if (graph_eligible(b, extra) && forward_graph(b, logits)) return;
  if (opt_.graphs) gstats_.eager_steps++;
  plan_step(b);
  const StepPlan& P = plan_;
  const int H = s.hidden, V = s.vocab, n = P.n_sample;
  const size_t f = sizeof(float);
  ensure_buffers(T, P.any_lora ? P.z_stride : 0,
                 P.decode_attn && P.n_splits > 1 ? cuda::decode_workspace_floats(T, s.n_heads, s.head_dim, P.n_splits) : 0,
                 n);
  enqueue_step(b.max_blocks);
  // Sampling runs on the host (addon/sampler.cc): [n, V] fp32 logits come back.
  if (n > 0)
    check_cuda(cudaMemcpyAsync(logits, logits_.p, size_t(n) * V * f, cudaMemcpyDeviceToHost, compute_),
               "logits copy to host");
  // Prompt logprobs: the extra rows in chunks, each chunk's logits back to the host for the
  // log-softmax (the same host code as the CPU backend's rows).
  if (extra && !extra->rows.empty()) {
    const int R = int(extra->rows.size()), C = RowLogits::kChunk;
    // The sampled rows' copy may still be in flight from last_/logits_, which may be regrown here.
    check_cuda(cudaStreamSynchronize(compute_), "CUDA forward");
    ensure_buffers(T, 0, 0, C);
    extra_rows_.ensure(size_t(C) * sizeof(int32_t), "prompt logprob rows");
    std::vector<float> host(size_t(std::min(R, C)) * V);
    for (int first = 0; first < R; first += C) {
      const int cnt = std::min(C, R - first);
      check_cuda(cudaMemcpyAsync(extra_rows_.p, extra->rows.data() + first, size_t(cnt) * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, compute_),
                 "prompt logprob rows to device");
      cuda::gather_rows(x_.as<float>(), extra_rows_.as<int32_t>(), cnt, H, last_.as<float>(), compute_);
      cuda::rmsnorm(last_.p, nullptr, final_norm_, cnt, H, s.rms_eps, lastn_.p, compute_, cuda::kF32, cuda::kF32, at_);
      gemm_->run(lastn_.p, at_, cnt, H, lm_head_.data, lm_head_.wt, V, nullptr, logits_.p, cuda::kF32, compute_);
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
                                           const CudaOptions& options, const LoadProgress& progress) {
  return std::make_unique<CudaBackend>(std::move(model), block_size, num_pages, max_slots, options, progress);
}

CudaGraphStats cuda_graph_stats(const Backend& b) {
  const auto* c = dynamic_cast<const CudaBackend*>(&b);
  return c ? c->graph_stats() : CudaGraphStats{};
}

}  // namespace loraplex
