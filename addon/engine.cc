#include "addon/engine.h"

#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if LORAPLEX_WITH_CUDA
#include "addon/cuda_backend.h"
#endif

namespace loraplex {

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

[[noreturn]] void type_error(Napi::Env env, const std::string& m) { throw Napi::TypeError::New(env, m); }

Napi::Object get_object(Napi::Env env, Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsObject()) type_error(env, std::string(key) + " must be an object");
  return v.As<Napi::Object>();
}

double get_number(Napi::Env env, Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) type_error(env, std::string(key) + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

int get_int(Napi::Env env, Napi::Object o, const char* key) {
  double d = get_number(env, o, key);
  if (d != std::floor(d) || d < -2147483648.0 || d > 2147483647.0) type_error(env, std::string(key) + " must be an integer");
  return int(d);
}

template <typename T, napi_typedarray_type kType>
std::vector<T> get_array(Napi::Env env, Napi::Object o, const char* key, long expect = -1) {
  Napi::Value v = o.Get(key);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != kType)
    type_error(env, std::string(key) + " has the wrong typed-array type");
  auto a = v.As<Napi::TypedArrayOf<T>>();
  if (expect >= 0 && long(a.ElementLength()) != expect)
    type_error(env, std::string(key) + " has " + std::to_string(a.ElementLength()) + " elements, expected " +
                        std::to_string(expect));
  return std::vector<T>(a.Data(), a.Data() + a.ElementLength());
}

#define I32(o, k, n) get_array<int32_t, napi_int32_array>(env, o, k, n)
#define U32(o, k, n) get_array<uint32_t, napi_uint32_array>(env, o, k, n)
#define F32(o, k, n) get_array<float, napi_float32_array>(env, o, k, n)
#define F64(o, k, n) get_array<double, napi_float64_array>(env, o, k, n)
#define I64(o, k, n) get_array<int64_t, napi_bigint64_array>(env, o, k, n)
#define U8(o, k, n) get_array<uint8_t, napi_uint8_array>(env, o, k, n)

template <typename T, typename TA>
TA to_typed(Napi::Env env, const std::vector<T>& v) {
  TA a = TA::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(T));
  return a;
}

ModelSpec parse_spec(Napi::Env env, Napi::Object o) {
  ModelSpec s;
  Napi::Value arch = o.Get("arch");
  if (!arch.IsString()) type_error(env, "arch must be a string");
  s.arch = arch.As<Napi::String>().Utf8Value();
  s.hidden = get_int(env, o, "hiddenSize");
  s.intermediate = get_int(env, o, "intermediateSize");
  s.n_layers = get_int(env, o, "numLayers");
  s.n_heads = get_int(env, o, "numHeads");
  s.n_kv_heads = get_int(env, o, "numKvHeads");
  s.head_dim = get_int(env, o, "headDim");
  s.vocab = get_int(env, o, "vocabSize");
  s.rms_eps = float(get_number(env, o, "rmsNormEps"));
  s.rope_theta = float(get_number(env, o, "ropeTheta"));
  Napi::Object rope = get_object(env, o, "ropeScaling");
  std::string rt = rope.Get("type").ToString().Utf8Value();
  if (rt == "none") s.rope_type = RopeType::None;
  else if (rt == "linear") s.rope_type = RopeType::Linear;
  else if (rt == "llama3") s.rope_type = RopeType::Llama3;
  else if (rt == "longrope") s.rope_type = RopeType::LongRope;
  else type_error(env, "unsupported rope scaling " + rt);
  s.rope_factor = float(get_number(env, rope, "factor"));
  s.rope_low_freq_factor = float(get_number(env, rope, "lowFreqFactor"));
  s.rope_high_freq_factor = float(get_number(env, rope, "highFreqFactor"));
  s.rope_original_max = get_int(env, rope, "originalMaxPositionEmbeddings");
  if (s.rope_type == RopeType::LongRope) {
    const auto floats = [&](const char* key) {
      std::vector<float> out;
      Napi::Value v = rope.Get(key);
      if (!v.IsArray()) type_error(env, std::string("ropeScaling.") + key + " must be an array");
      auto a = v.As<Napi::Array>();
      for (uint32_t i = 0; i < a.Length(); i++) out.push_back(float(a.Get(i).ToNumber().DoubleValue()));
      return out;
    };
    s.rope_short_factor = floats("shortFactor");
    s.rope_long_factor = floats("longFactor");
    s.rope_attention_factor = float(get_number(env, rope, "attentionFactor"));
  }
  s.tied_embeddings = o.Get("tiedEmbeddings").ToBoolean();
  s.attn_bias = o.Get("attentionBias").ToBoolean();
  s.sliding_window = get_int(env, o, "slidingWindow");
  // Family features (model.h ModelSpec); absent keys keep the Llama defaults.
  const auto opt_number = [&](const char* key, double def) { return o.Get(key).IsUndefined() ? def : get_number(env, o, key); };
  const auto int_list = [&](const char* key) {
    std::vector<int> out;
    Napi::Value v = o.Get(key);
    if (v.IsUndefined()) return out;
    if (!v.IsArray()) type_error(env, std::string(key) + " must be an array");
    auto a = v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Value e = a.Get(i);
      if (!e.IsNumber()) type_error(env, std::string(key) + " must hold numbers");
      out.push_back(e.As<Napi::Number>().Int32Value());
    }
    return out;
  };
  s.layer_windows = int_list("layerWindows");
  for (int x : int_list("layerLocalRope")) s.layer_local_rope.push_back(x != 0);
  s.rope_local_theta = float(opt_number("ropeLocalTheta", 0));
  s.rotary_dim = int(opt_number("rotaryDim", 0));
  s.qk_norm = o.Get("qkNorm").ToBoolean();
  s.norm_plus_one = o.Get("normPlusOne").ToBoolean();
  s.sandwich_norm = o.Get("sandwichNorm").ToBoolean();
  Napi::Value act = o.Get("activation");
  const std::string act_name = act.IsUndefined() ? "silu" : act.ToString().Utf8Value();
  if (act_name == "silu") s.act = Activation::Silu;
  else if (act_name == "gelu_tanh") s.act = Activation::GeluTanh;
  else type_error(env, "unsupported activation " + act_name);
  s.embed_scale = float(opt_number("embedScale", 1));
  s.attn_scale = float(opt_number("attnScale", 0));
  s.attn_softcap = float(opt_number("attnSoftcap", 0));
  s.final_softcap = float(opt_number("finalSoftcap", 0));
  s.multimodal_text = o.Get("multimodalText").ToBoolean();
  s.fused_qkv = o.Get("fusedQkv").ToBoolean();
  s.fused_gate_up = o.Get("fusedGateUp").ToBoolean();
  Napi::Value files = o.Get("files");
  if (!files.IsArray()) type_error(env, "files must be an array");
  auto arr = files.As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); i++) s.files.push_back(arr.Get(i).ToString().Utf8Value());
  return s;
}

}  // namespace

struct EngineSampling {
  std::vector<uint32_t> seq_ids;
  std::vector<SamplingParams> params;  // aligned with batch.sample_seqs
  std::vector<uint32_t> new_ids;
  std::vector<int64_t> new_seeds;     // [K] read only where new_has_seed
  std::vector<uint8_t> new_has_seed;  // [K]
  // logit_bias: sample i's (token, bias) pairs are [bias_start[i], bias_start[i + 1]).
  std::vector<int32_t> bias_start, bias_ids;
  std::vector<float> bias_values;
  // Grammar bitmasks: sample i uses masks[mask_rows[i] * mask_words ...] (mask_rows[i] -1: none).
  std::vector<int32_t> mask_rows, masks;
  bool masks_deferred = false;  // masks come later through provideMasks()
  long mask_words = 0;
  std::vector<int32_t> new_prompt_start, new_prompt_tokens;
  std::vector<uint32_t> free_ids;
  // Prompt logprobs: token index in the batch, the token it should have predicted, top-N to report.
  std::vector<int32_t> plp_rows, plp_targets, plp_top;
};

// What a step hands back: per sampled row, then per prompt-logprob row.
struct StepOutput {
  std::vector<int32_t> tok, top_ids;
  std::vector<float> lp, top_lp;
  int max_n = 0;
  std::vector<float> plp;
  std::vector<int32_t> plp_rank, plp_top_ids;
  std::vector<float> plp_top_lp;
  int plp_max_n = 0;
  double fwd = 0, smp = 0;
};

Napi::Function Engine::Init(Napi::Env env) {
  return DefineClass(env, "Engine",
                     {InstanceMethod("load", &Engine::Load), InstanceMethod("loadProgress", &Engine::LoadProgressInfo),
                      InstanceMethod("step", &Engine::Step),
                      InstanceMethod("parseAdapter", &Engine::ParseAdapter),
                      InstanceMethod("adapterPages", &Engine::AdapterPages),
                     InstanceMethod("freeAdapter", &Engine::FreeAdapter),
                     InstanceMethod("adapterImageStats", &Engine::AdapterImageStatsJs),
                      InstanceMethod("installAdapter", &Engine::InstallAdapter),
                      InstanceMethod("removeAdapter", &Engine::RemoveAdapter), InstanceMethod("close", &Engine::Close),
                      InstanceMethod("provideMasks", &Engine::ProvideMasks)});
}

Engine::Engine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Engine>(info) {
  thread_ = std::thread([this] { ThreadMain(); });
}

Engine::~Engine() { StopThread(); }

void Engine::StopThread() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Engine::ThreadMain() {
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

struct Engine::Job {
  Napi::Promise::Deferred deferred;
  std::function<Napi::Value(Napi::Env)> to_js;
  std::string error;
  bool failed = false;
};

namespace {
void settle_job(Napi::Env env, Napi::Function, std::nullptr_t*, void* data);
}

Napi::Promise Engine::Submit(Napi::Env env, std::function<void()> work, std::function<Napi::Value(Napi::Env)> to_js) {
  auto* job = new Job{Napi::Promise::Deferred::New(env), std::move(to_js), {}, false};
  Napi::Promise promise = job->deferred.Promise();
  using Tsfn = Napi::TypedThreadSafeFunction<std::nullptr_t, void, settle_job>;
  Tsfn tsfn = Tsfn::New(env, "loraplex-engine", 0, 1);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) {
      delete job;
      tsfn.Release();
      throw Napi::Error::New(env, "engine is closed");
    }
    queue_.push_back([job, tsfn, work = std::move(work)]() mutable {
      try {
        work();
      } catch (const std::exception& e) {
        job->failed = true;
        job->error = e.what();
      }
      tsfn.BlockingCall(static_cast<void*>(job));
      tsfn.Release();
    });
  }
  cv_.notify_one();
  return promise;
}

namespace {
void settle_job(Napi::Env env, Napi::Function, std::nullptr_t*, void* data) {
  std::unique_ptr<Engine::Job> job(static_cast<Engine::Job*>(data));
  if (env == nullptr) return;  // environment is shutting down
  if (job->failed) {
    job->deferred.Reject(Napi::Error::New(env, job->error).Value());
    return;
  }
  try {
    job->deferred.Resolve(job->to_js ? job->to_js(env) : env.Undefined());
  } catch (const Napi::Error& e) {
    job->deferred.Reject(e.Value());
  }
}
}  // namespace

void Engine::ReportLoad(const char* phase, uint64_t done, uint64_t total) {
  const double now = ms_since(load_t0_);
  std::lock_guard<std::mutex> lk(load_mu_);
  if (load_phases_.empty() || load_phases_.back().name != phase) {
    if (!load_phases_.empty() && load_phases_.back().end_ms < 0) load_phases_.back().end_ms = now;
    load_phases_.push_back(LoadPhase{phase, 0, 0, now, -1});
  }
  LoadPhase& p = load_phases_.back();
  p.done = done;
  p.total = total;
  if (done >= total) p.end_ms = now;
}

// loadProgress() -> [{phase, done, total, ms, finished}]: the load's phases so far, in order.
// Synchronous and cheap: JS polls it while load() runs (a progress bar) and once after.
Napi::Value Engine::LoadProgressInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const double now = ms_since(load_t0_);
  std::lock_guard<std::mutex> lk(load_mu_);
  Napi::Array out = Napi::Array::New(env, load_phases_.size());
  for (size_t i = 0; i < load_phases_.size(); i++) {
    const LoadPhase& p = load_phases_[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("phase", p.name);
    o.Set("done", double(p.done));
    o.Set("total", double(p.total));
    o.Set("ms", (p.end_ms < 0 ? now : p.end_ms) - p.start_ms);
    o.Set("finished", p.end_ms >= 0);
    out.Set(uint32_t(i), o);
  }
  return out;
}

void Engine::RequireLoaded(Napi::Env env) const {
  if (!model_) throw Napi::Error::New(env, "no model loaded");
}

Napi::Value Engine::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (model_ || backend_) throw Napi::Error::New(env, "model already loaded");
  if (info.Length() < 2 || !info[0].IsObject() || !info[1].IsObject())
    type_error(env, "load(spec, options) expects two objects");
  ModelSpec spec = parse_spec(env, info[0].As<Napi::Object>());
  Napi::Object opt = info[1].As<Napi::Object>();
  const int block_size = get_int(env, opt, "blockSize");
  const double pool_bytes = opt.Get("poolBytes").IsNumber() ? opt.Get("poolBytes").As<Napi::Number>().DoubleValue() : 0.0;
  const int max_slots = get_int(env, opt, "maxSlots");
  const int threads = opt.Get("threads").IsNumber() ? get_int(env, opt, "threads") : 0;
  std::vector<int32_t> eos = I32(opt, "eosIds", -1);
  std::string device = opt.Get("device").IsString() ? opt.Get("device").As<Napi::String>().Utf8Value() : "";
  if (device.empty())
    if (const char* e = std::getenv("LORAPLEX_DEVICE")) device = e;
  if (!device.empty() && device != "cpu" && device != "cuda") type_error(env, "device must be cpu or cuda");
  // The CPU's numeric options: "auto" (the default) follows the model's weights, as vLLM's
  // --dtype auto does: BF16 weights get BF16 adapter rows, KV cache and matmul activations (the
  // last where the CPU has AVX512-BF16); fp32 and F16 weights get fp32 throughout, exact against
  // HF. "float32" / "bfloat16" force one. CUDA follows the same rule, BF16 matmuls on tensor cores.
  auto dtype_opt = [&](const char* key) {
    const std::string v = opt.Get(key).IsString() ? opt.Get(key).As<Napi::String>().Utf8Value() : "auto";
    if (v != "auto" && v != "float32" && v != "bfloat16") type_error(env, std::string(key) + " must be auto, float32 or bfloat16");
    return v;
  };
  const std::string lora_dtype = dtype_opt("loraDtype"), compute_dtype = dtype_opt("computeDtype"),
                    kv_dtype = dtype_opt("kvCacheDtype");
  // CUDA only: poolBytes is the --memory-budget when explicit; otherwise the pool is sized from the
  // device's memory (--gpu-memory-utilization). Decode steps replay CUDA graphs unless enforceEager.
  const bool pool_explicit = opt.Get("poolBytesExplicit").IsBoolean() && opt.Get("poolBytesExplicit").As<Napi::Boolean>().Value();
  const double gpu_util = opt.Get("gpuMemoryUtilization").IsNumber() ? opt.Get("gpuMemoryUtilization").As<Napi::Number>().DoubleValue() : 0.92;
  const bool enforce_eager = opt.Get("enforceEager").IsBoolean() && opt.Get("enforceEager").As<Napi::Boolean>().Value();
  const int max_tokens = opt.Get("maxBatchTokens").IsNumber() ? get_int(env, opt, "maxBatchTokens") : 0;
  const int max_seqs = opt.Get("maxNumSeqs").IsNumber() ? get_int(env, opt, "maxNumSeqs") : 256;
  if (!(gpu_util > 0 && gpu_util <= 1)) type_error(env, "gpuMemoryUtilization must be in (0, 1]");
  if (block_size < 1 || block_size > 1024) type_error(env, "blockSize must be in 1..1024");
  if (!(pool_bytes > 0)) type_error(env, "poolBytes must be positive");
  if (max_slots < 1) type_error(env, "maxSlots must be positive");
  auto result = std::make_shared<PoolInfo>();
  auto backend_name = std::make_shared<std::string>();
  {
    std::lock_guard<std::mutex> lk(load_mu_);
    load_phases_.clear();
    load_t0_ = Clock::now();
  }
  return Submit(
      env,
      [this, spec, block_size, pool_bytes, max_slots, threads, eos, device, lora_dtype, compute_dtype, kv_dtype, result,
       backend_name, pool_explicit, gpu_util, enforce_eager, max_tokens, max_seqs] {
        if (threads > 0) omp_set_num_threads(threads);
        // The engine thread's own OpenMP setting: omp_set_num_threads is per thread, so reading it
        // back on the JS thread would report that thread's default instead.
        omp_threads_ = omp_get_max_threads();
        const LoadProgress progress = [this](const char* phase, uint64_t done, uint64_t total) { ReportLoad(phase, done, total); };
        auto model = load_model(spec, progress);
        // lora: adapter rows (PEFT saves fp32) in the pool; bfloat16 halves the bytes a step streams
        // per distinct adapter. compute: bfloat16 rounds the activations of BF16-weight matmuls to
        // BF16 and runs them on the AVX512-BF16 dot product (about twice the fp32 FMA rate), as
        // PyTorch runs a BF16 model. kv: bfloat16 halves the bytes attention reads.
        bool model_bf16 = true;
        for (const Layer& L : model->layers)
          for (const Weight& w : L.proj) model_bf16 = model_bf16 && w.type == cpu::WType::BF16;
        const auto pick = [&](const std::string& v, bool auto_bf16) { return v == "bfloat16" || (v == "auto" && auto_bf16); };
        const CpuOptions cpu_opts{pick(lora_dtype, model_bf16), pick(compute_dtype, model_bf16 && cpu::has_bf16_dot()),
                                  pick(kv_dtype, model_bf16)};
        bool on_gpu = false;
#if LORAPLEX_WITH_CUDA
        std::string why;
        const bool gpu = cuda_device_available(&why);
        if (device == "cuda" && !gpu) throw std::runtime_error("--device cuda: " + why);
        on_gpu = device == "cuda" || (device.empty() && gpu);
#endif
        // HF multiplies Gemma's embeddings by torch.tensor(sqrt(hidden), dtype=activations): a BF16
        // model run in BF16 scales by the BF16-rounded scalar (fp32 compute keeps the fp32 one, as
        // HF does on an fp32 upcast).
        const bool computes_bf16 = on_gpu ? pick(compute_dtype, model_bf16) : cpu_opts.compute_bf16;
        if (computes_bf16 && model->embed.type == cpu::WType::BF16 && model->spec.embed_scale != 1.f)
          model->spec.embed_scale = cpu::bf16_to_f32(cpu::f32_to_bf16(model->spec.embed_scale));
        // The budget in pages of the KV dtype the backend will use.
        const auto pages_for = [&](size_t kv_elem_bytes) {
          const size_t page = kv_page_bytes(spec, block_size, kv_elem_bytes);
          const double n = std::floor(pool_bytes / double(page));
          if (n < 2)
            throw std::runtime_error("--memory-budget " + std::to_string(int64_t(pool_bytes)) + " bytes holds fewer than 2 pages of " +
                                     std::to_string(page) + " bytes");
          return int(std::min(n, 2147483647.0));
        };
#if LORAPLEX_WITH_CUDA
        if (on_gpu) {
          CudaOptions co;
          co.compute_bf16 = computes_bf16;
          co.kv_bf16 = pick(kv_dtype, model_bf16);
          co.lora_bf16 = pick(lora_dtype, model_bf16);
          co.graphs = !enforce_eager;
          co.max_graph_batch = std::min(max_seqs, 512);
          co.max_tokens = max_tokens;
          co.gpu_memory_utilization = pool_explicit ? 0.0 : gpu_util;
          backend_ = make_cuda_backend(model, block_size, pool_explicit ? pages_for(co.kv_bf16 ? 2 : sizeof(float)) : 0,
                                       max_slots + 1, co, progress);
        } else {
          backend_ = make_cpu_backend(model, block_size, pages_for(cpu_opts.kv_bf16 ? 2 : sizeof(float)), max_slots + 1, cpu_opts,
                                      progress);
        }
#else
        if (device == "cuda")
          throw std::runtime_error("--device cuda: this build has no CUDA backend (build with --CDLORAPLEX_CUDA=ON)");
        backend_ = make_cpu_backend(model, block_size, pages_for(cpu_opts.kv_bf16 ? 2 : sizeof(float)), max_slots + 1, cpu_opts,
                                    progress);
#endif
        *backend_name = backend_->name();
        sampler_ = std::make_unique<Sampler>(spec.vocab, eos);
        *result = backend_->pool();
        page_bytes_ = result->page_bytes;
        lora_elem_bytes_ = backend_->lora_elem_bytes();
        compute_dtype_ = backend_->compute_dtype();
        kv_cache_dtype_ = backend_->kv_cache_dtype();
        model_ = model;
      },
      [this, result, backend_name](Napi::Env env) {
        Napi::Object o = Napi::Object::New(env);
        o.Set("pageBytes", double(result->page_bytes));
        o.Set("loraDtype", lora_elem_bytes_ == 2 ? "bfloat16" : "float32");
        o.Set("computeDtype", compute_dtype_);
        o.Set("kvCacheDtype", kv_cache_dtype_);
        o.Set("numPages", result->num_pages);
        o.Set("blockSize", result->block_size);
        o.Set("backend", *backend_name);
        o.Set("threads", omp_threads_);
        return o;
      });
}

Napi::Value Engine::Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLoaded(env);
  if (info.Length() < 1 || !info[0].IsObject()) type_error(env, "step(batch) expects an object");
  Napi::Object o = info[0].As<Napi::Object>();
  auto b = std::make_shared<StepBatch>();
  auto sp = std::make_shared<EngineSampling>();
  b->tokens = I32(o, "tokens", -1);
  const long T = long(b->tokens.size());
  b->n_tokens = int(T);
  b->positions = I32(o, "positions", T);
  b->token_slots = I32(o, "tokenSlots", T);
  b->query_start = I32(o, "queryStart", -1);
  if (b->query_start.empty()) type_error(env, "queryStart must have S+1 entries");
  const long S = long(b->query_start.size()) - 1;
  b->n_seqs = int(S);
  b->context_lens = I32(o, "contextLens", S);
  b->max_blocks = get_int(env, o, "maxBlocks");
  b->block_tables = I32(o, "blockTables", S * long(b->max_blocks));
  sp->seq_ids = U32(o, "seqIds", S);
  b->sample_seqs = I32(o, "sampleSeqs", -1);
  if (!o.Get("ropeLong").IsUndefined()) b->rope_long = U8(o, "ropeLong", S);
  const long N = long(b->sample_seqs.size());
  auto temp = F32(o, "temperature", N), top_p = F32(o, "topP", N), min_p = F32(o, "minP", N),
       rep = F32(o, "repetitionPenalty", N), pres = F32(o, "presencePenalty", N), freq = F32(o, "frequencyPenalty", N);
  auto top_k = I32(o, "topK", N), nlp = I32(o, "numLogprobs", N);
  auto sup = U8(o, "suppressEos", N);
  sp->params.resize(N);
  for (long i = 0; i < N; i++)
    sp->params[i] = {temp[i], top_p[i], top_k[i], min_p[i], rep[i], pres[i], freq[i], std::min(std::max(nlp[i], -1), 20),
                     sup[i] != 0};
  sp->new_ids = U32(o, "newSeqIds", -1);
  sp->new_seeds = I64(o, "newSeeds", long(sp->new_ids.size()));
  sp->new_has_seed = U8(o, "newHasSeed", long(sp->new_ids.size()));
  sp->bias_start = I32(o, "logitBiasStart", N + 1);
  sp->bias_ids = I32(o, "logitBiasIds", -1);
  sp->bias_values = F32(o, "logitBiasValues", long(sp->bias_ids.size()));
  sp->new_prompt_start = I32(o, "newPromptStart", long(sp->new_ids.size()) + 1);
  sp->new_prompt_tokens = I32(o, "newPromptTokens", -1);
  sp->free_ids = U32(o, "freeSeqIds", -1);
  long mask_words = 0;
  if (o.Has("maskRows")) {
    sp->mask_rows = I32(o, "maskRows", N);
    mask_words = get_int(env, o, "maskWords");
    sp->masks = I32(o, "masks", -1);
  }
  if (o.Has("promptLpRows")) {
    sp->plp_rows = I32(o, "promptLpRows", -1);
    const long R = long(sp->plp_rows.size());
    sp->plp_targets = I32(o, "promptLpTargets", R);
    sp->plp_top = I32(o, "promptLpTop", R);
  }

  // Validate everything the kernels index with, so bad input is an error and never a crash.
  const ModelSpec& spec = model_->spec;
  const PoolInfo& pool = backend_->pool();
  if (b->query_start[0] != 0 || b->query_start[S] != T) type_error(env, "queryStart must run from 0 to the token count");
  for (long s = 0; s < S; s++) {
    const int q0 = b->query_start[s], q1 = b->query_start[s + 1];
    if (q1 < q0) type_error(env, "queryStart must be non-decreasing");
    const int ctx = b->context_lens[s];
    if (ctx < q1 - q0) type_error(env, "contextLens shorter than the new tokens of sequence " + std::to_string(s));
    if (ctx > long(b->max_blocks) * pool.block_size) type_error(env, "contextLens exceeds the block table capacity");
    const int used_blocks = (ctx + pool.block_size - 1) / pool.block_size;
    for (int k = 0; k < used_blocks; k++) {
      const int page = b->block_tables[s * long(b->max_blocks) + k];
      if (page < 0 || page >= pool.num_pages) type_error(env, "block table entry out of range");
    }
    for (int t = q0; t < q1; t++)
      if (b->positions[t] != ctx - (q1 - q0) + (t - q0)) type_error(env, "positions inconsistent with contextLens");
  }
  for (long t = 0; t < T; t++) {
    if (b->tokens[t] < 0 || b->tokens[t] >= spec.vocab) type_error(env, "token id out of the vocabulary");
    if (b->token_slots[t] < 0) type_error(env, "negative adapter slot");
  }
  for (long i = 0; i < N; i++) {
    const int s = b->sample_seqs[i];
    if (s < 0 || s >= S || b->query_start[s + 1] == b->query_start[s]) type_error(env, "sampleSeqs entry out of range");
  }
  for (size_t i = 0; i < sp->plp_rows.size(); i++) {
    if (sp->plp_rows[i] < 0 || sp->plp_rows[i] >= T) type_error(env, "promptLpRows entry out of range");
    if (sp->plp_targets[i] < 0 || sp->plp_targets[i] >= spec.vocab) type_error(env, "promptLpTargets entry out of the vocabulary");
    if (sp->plp_top[i] < 0 || sp->plp_top[i] > 20) type_error(env, "promptLpTop must be in [0, 20]");
  }
  if (sp->bias_start[0] != 0 || sp->bias_start[N] != long(sp->bias_ids.size()))
    type_error(env, "logitBiasStart must run from 0 to the logit_bias pair count");
  for (long i = 0; i < N; i++)
    if (sp->bias_start[i + 1] < sp->bias_start[i]) type_error(env, "logitBiasStart must be non-decreasing");
  for (long i = 0; i < N; i++) {  // the arrays live in sp, which outlives the step
    sp->params[i].bias_ids = sp->bias_ids.data() + sp->bias_start[i];
    sp->params[i].bias_values = sp->bias_values.data() + sp->bias_start[i];
    sp->params[i].n_bias = sp->bias_start[i + 1] - sp->bias_start[i];
  }
  for (size_t k = 0; k < sp->bias_ids.size(); k++) {
    if (sp->bias_ids[k] < 0 || sp->bias_ids[k] >= spec.vocab) type_error(env, "logitBiasIds entry out of the vocabulary");
    if (!(std::fabs(sp->bias_values[k]) <= 100.f)) type_error(env, "logitBiasValues must be in [-100, 100]");
  }
  sp->masks_deferred = o.Has("masksDeferred") && o.Get("masksDeferred").ToBoolean();
  if (sp->masks_deferred && sp->mask_rows.empty()) type_error(env, "masksDeferred needs maskRows");
  sp->mask_words = mask_words;
  if (sp->masks_deferred) {
    if (mask_words != (long(spec.vocab) + 31) / 32) type_error(env, "maskWords must be ceil(vocab / 32)");
    for (long i = 0; i < N; i++)
      if (sp->mask_rows[i] < -1) type_error(env, "maskRows entry out of range");
    std::lock_guard<std::mutex> lk(defer_mu_);
    defer_ready_ = false;
    defer_masks_.clear();
    defer_skip_.clear();
  } else if (!sp->mask_rows.empty()) {
    if (mask_words != (long(spec.vocab) + 31) / 32) type_error(env, "maskWords must be ceil(vocab / 32)");
    const long M = long(sp->masks.size()) / mask_words;
    if (M * mask_words != long(sp->masks.size())) type_error(env, "masks must hold whole rows of maskWords");
    for (long i = 0; i < N; i++) {
      if (sp->mask_rows[i] < -1 || sp->mask_rows[i] >= M) type_error(env, "maskRows entry out of range");
      if (sp->mask_rows[i] >= 0) sp->params[i].mask = sp->masks.data() + size_t(sp->mask_rows[i]) * size_t(mask_words);
    }
  }
  const long n_new = long(sp->new_ids.size());
  if (sp->new_prompt_start[0] != 0 || sp->new_prompt_start[n_new] != long(sp->new_prompt_tokens.size()))
    type_error(env, "newPromptStart must run from 0 to the prompt token count");

  auto res = std::make_shared<StepOutput>();
  return Submit(
      env,
      [this, b, sp, res] {
        const int V = model_->spec.vocab;
        for (uint32_t id : sp->free_ids) sampler_->remove_sequence(id);
        for (size_t i = 0; i < sp->new_ids.size(); i++) {
          const int32_t a = sp->new_prompt_start[i], z = sp->new_prompt_start[i + 1];
          sampler_->add_sequence(sp->new_ids[i], sp->new_has_seed[i] != 0, uint64_t(sp->new_seeds[i]),
                                 sp->new_prompt_tokens.data() + a, z - a);
        }
        const size_t n = b->sample_seqs.size();
        auto t0 = Clock::now();
        auto& [tok, top_ids, lp, top_lp, max_n, plp, plp_rank, plp_top_ids, plp_top_lp, plp_max_n, fwd, smp] = *res;
        // Prompt logprobs: each extra row's log-softmax, reduced to what is reported as its chunk
        // arrives (the chunk's logits are not kept).
        RowLogits extra;
        const size_t R = sp->plp_rows.size();
        if (R > 0) {
          extra.rows = sp->plp_rows;
          for (int32_t k : sp->plp_top) plp_max_n = std::max(plp_max_n, int(k));
          plp.assign(R, 0.f);
          plp_rank.assign(R, 0);
          plp_top_ids.assign(R * plp_max_n, -1);
          plp_top_lp.assign(R * plp_max_n, 0.f);
          StepOutput* out = res.get();  // (structured bindings cannot be captured before C++20)
          extra.consume = [out, sp, V](int first, int count, const float* lg) {
            const int w = out->plp_max_n;
            for (int i = 0; i < count; i++) {
              const size_t r = size_t(first + i);
              RowLogprobs q = row_logprobs(lg + size_t(i) * V, V, sp->plp_targets[r], sp->plp_top[r]);
              out->plp[r] = q.logprob;
              out->plp_rank[r] = q.rank;
              for (size_t k = 0; k < q.top_ids.size(); k++) {
                out->plp_top_ids[r * w + k] = q.top_ids[k];
                out->plp_top_lp[r * w + k] = q.top_logprobs[k];
              }
            }
          };
        }
        if (b->n_tokens > 0) {
          logits_.resize(n * size_t(V));
          backend_->forward(*b, logits_.data(), R > 0 ? &extra : nullptr);
        }
        const double fwd_ms = ms_since(t0);
        max_n = 0;
        for (auto& p : sp->params) max_n = std::max(max_n, p.num_logprobs);  // -1 counts as 0
        tok.assign(n, -1);
        lp.assign(n, 0.f);
        top_ids.assign(n * max_n, -1);
        top_lp.assign(n * max_n, 0.f);
        // Deferred masks: wait for provideMasks() (bounded: a JS side that never answers costs
        // those rows this step, never the engine thread). Rows without a mask sample nothing (-2).
        std::vector<uint8_t> skip(n, 0);
        if (sp->masks_deferred) {
          std::unique_lock<std::mutex> lk(defer_mu_);
          const bool got = defer_cv_.wait_for(lk, std::chrono::seconds(30), [this] { return defer_ready_; });
          if (got) {
            sp->masks = std::move(defer_masks_);
            for (int32_t k : defer_skip_)
              if (k >= 0 && size_t(k) < n) skip[k] = 1;
          }
          defer_ready_ = false;
          defer_masks_.clear();
          defer_skip_.clear();
          lk.unlock();
          const long W = sp->mask_words;
          const long M = W > 0 ? long(sp->masks.size()) / W : 0;
          for (size_t i = 0; i < n; i++) {
            const int r = sp->mask_rows[i];
            if (r < 0) continue;
            if (!got || r >= M) skip[i] = 1;
            else sp->params[i].mask = sp->masks.data() + size_t(r) * size_t(W);
          }
        }
        auto t1 = Clock::now();
        for (size_t i = 0; i < n; i++) {
          if (skip[i]) {
            tok[i] = -2;
            continue;
          }
          const uint32_t id = sp->seq_ids[b->sample_seqs[i]];
          if (!sampler_->has_sequence(id)) sampler_->add_sequence(id, false, 0, nullptr, 0);
          SampleResult r = sampler_->sample(id, logits_.data() + i * V, sp->params[i]);
          tok[i] = r.token;
          lp[i] = r.logprob;
          for (size_t k = 0; k < r.top_ids.size(); k++) {
            top_ids[i * max_n + k] = r.top_ids[k];
            top_lp[i * max_n + k] = r.top_logprobs[k];
          }
        }
        fwd = fwd_ms;
        smp = ms_since(t1);
      },
      [res](Napi::Env env) {
        auto& [tok, top_ids, lp, top_lp, max_n, plp, plp_rank, plp_top_ids, plp_top_lp, plp_max_n, fwd, smp] = *res;
        Napi::Object out = Napi::Object::New(env);
        out.Set("promptLogprobs", to_typed<float, Napi::Float32Array>(env, plp));
        out.Set("promptRanks", to_typed<int32_t, Napi::Int32Array>(env, plp_rank));
        out.Set("promptTopIds", to_typed<int32_t, Napi::Int32Array>(env, plp_top_ids));
        out.Set("promptTopLogprobs", to_typed<float, Napi::Float32Array>(env, plp_top_lp));
        out.Set("promptNumTop", plp_max_n);
        out.Set("tokens", to_typed<int32_t, Napi::Int32Array>(env, tok));
        out.Set("logprobs", to_typed<float, Napi::Float32Array>(env, lp));
        out.Set("topIds", to_typed<int32_t, Napi::Int32Array>(env, top_ids));
        out.Set("topLogprobs", to_typed<float, Napi::Float32Array>(env, top_lp));
        out.Set("numTop", max_n);
        out.Set("forwardMs", fwd);
        out.Set("sampleMs", smp);
        return out;
      });
}

namespace {

struct AdapterHolder {
  std::shared_ptr<ParsedAdapter> adapter;
};

class ParseWorker : public Napi::AsyncWorker {
 public:
  ParseWorker(Napi::Env env, std::shared_ptr<Model> model, std::string path, std::vector<LoraPlanEntry> plan,
              int max_rank, size_t page_bytes, size_t elem_bytes)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), model_(std::move(model)),
        path_(std::move(path)), plan_(std::move(plan)), max_rank_(max_rank), page_bytes_(page_bytes),
        elem_bytes_(elem_bytes) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      const auto t0 = std::chrono::steady_clock::now();
      result_ = parse_adapter(path_, plan_, *model_, max_rank_, page_bytes_, elem_bytes_);
      ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    auto* holder = new AdapterHolder{result_};
    Napi::Object o = Napi::Object::New(env);
    o.Set("handle", Napi::External<AdapterHolder>::New(env, holder, [](Napi::Env, AdapterHolder* h) { delete h; }));
    o.Set("bytes", double(result_->bytes));
    o.Set("maxRank", result_->max_rank);
    o.Set("numModules", double(result_->modules.size()));
    o.Set("pages", result_->num_pages());
    o.Set("rowBytes", double(result_->row_bytes));
    o.Set("parseMs", ms_);
    // What identifies the file read (its digest for the prefix cache; see adapter-cache.ts).
    const FileIdentity& id = result_->file;
    o.Set("file", Napi::String::New(env, std::to_string(id.dev) + ":" + std::to_string(id.ino) + ":" +
                                             std::to_string(id.size) + ":" + std::to_string(id.mtime_ns) + ":" +
                                             std::to_string(id.ctime_ns)));
    deferred_.Resolve(o);
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<Model> model_;
  std::string path_;
  std::vector<LoraPlanEntry> plan_;
  int max_rank_;
  size_t page_bytes_, elem_bytes_;
  double ms_ = 0;
  std::shared_ptr<ParsedAdapter> result_;
};

std::shared_ptr<ParsedAdapter> adapter_of(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) type_error(env, "expected an adapter object from parseAdapter()");
  Napi::Value h = v.As<Napi::Object>().Get("handle");
  if (!h.IsExternal()) type_error(env, "expected an adapter object from parseAdapter()");
  auto a = h.As<Napi::External<AdapterHolder>>().Data()->adapter;
  if (!a) type_error(env, "the adapter was freed");
  return a;
}

}  // namespace

// parseAdapter(path, plan: {layers: Int32Array, projs: Int32Array, ranks: Int32Array, scales: Float32Array}, maxRank)
Napi::Value Engine::ParseAdapter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLoaded(env);
  if (info.Length() < 3 || !info[0].IsString() || !info[1].IsObject() || !info[2].IsNumber())
    type_error(env, "parseAdapter(path, plan, maxRank)");
  Napi::Object p = info[1].As<Napi::Object>();
  auto layers = I32(p, "layers", -1);
  const long n = long(layers.size());
  auto projs = I32(p, "projs", n), ranks = I32(p, "ranks", n);
  auto scales = F32(p, "scales", n);
  std::vector<LoraPlanEntry> plan(n);
  for (long i = 0; i < n; i++) plan[i] = {layers[i], projs[i], ranks[i], scales[i]};
  auto* w = new ParseWorker(env, model_, info[0].As<Napi::String>().Utf8Value(), std::move(plan),
                            info[2].As<Napi::Number>().Int32Value(), page_bytes_, lora_elem_bytes_);
  Napi::Promise promise = w->Promise();
  w->Queue();
  return promise;
}

Napi::Value Engine::AdapterPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLoaded(env);
  auto a = adapter_of(env, info[0]);
  return Napi::Number::New(env, a->num_pages());
}

// freeAdapter(adapter): drops the host copy now (an install already queued keeps its own
// reference until it has run), instead of whenever the garbage collector gets to the handle.
Napi::Value Engine::FreeAdapter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsObject()) type_error(env, "freeAdapter(adapter)");
  Napi::Value h = info[0].As<Napi::Object>().Get("handle");
  if (!h.IsExternal()) type_error(env, "expected an adapter object from parseAdapter()");
  h.As<Napi::External<AdapterHolder>>().Data()->adapter.reset();
  return env.Undefined();
}

// adapterImageStats(): host memory in adapter images (live) and kept for reuse (cached).
Napi::Value Engine::AdapterImageStatsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto st = adapter_image_stats();
  Napi::Object o = Napi::Object::New(env);
  o.Set("liveBytes", double(st.live_bytes));
  o.Set("cachedBytes", double(st.cached_bytes));
  return o;
}

Napi::Value Engine::InstallAdapter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLoaded(env);
  if (info.Length() < 3 || !info[0].IsNumber() || !info[2].IsTypedArray()) type_error(env, "installAdapter(slot, adapter, pages)");
  const int slot = info[0].As<Napi::Number>().Int32Value();
  auto a = adapter_of(env, info[1]);
  auto arr = info[2].As<Napi::TypedArray>();
  if (arr.TypedArrayType() != napi_int32_array) type_error(env, "pages must be an Int32Array");
  auto pa = arr.As<Napi::Int32Array>();
  std::vector<int32_t> pages(pa.Data(), pa.Data() + pa.ElementLength());
  return Submit(env, [this, slot, a, pages] { backend_->install_adapter(slot, *a, pages); }, nullptr);
}

Napi::Value Engine::RemoveAdapter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  RequireLoaded(env);
  if (info.Length() < 1 || !info[0].IsNumber()) type_error(env, "removeAdapter(slot)");
  const int slot = info[0].As<Napi::Number>().Int32Value();
  return Submit(env, [this, slot] { backend_->remove_adapter(slot); }, nullptr);
}

// provideMasks(masks: Int32Array [rows * maskWords], skip: Int32Array): the masks of the step in
// flight (masksDeferred), and the sample indices it must not sample (their masks are late).
// JS thread; the engine thread waits for it after the forward.
Napi::Value Engine::ProvideMasks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsTypedArray() || !info[1].IsTypedArray()) type_error(env, "provideMasks(masks: Int32Array, skip: Int32Array)");
  auto copy = [&](Napi::Value v) {
    auto a = v.As<Napi::TypedArray>();
    if (a.TypedArrayType() != napi_int32_array) type_error(env, "provideMasks takes Int32Arrays");
    auto t = a.As<Napi::Int32Array>();
    return std::vector<int32_t>(t.Data(), t.Data() + t.ElementLength());
  };
  std::vector<int32_t> masks = copy(info[0]), skip = copy(info[1]);
  {
    std::lock_guard<std::mutex> lk(defer_mu_);
    defer_masks_ = std::move(masks);
    defer_skip_ = std::move(skip);
    defer_ready_ = true;
  }
  defer_cv_.notify_all();
  return env.Undefined();
}

Napi::Value Engine::Close(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Runs after every queued job; frees the pool on the engine thread.
  return Submit(env, [this] {
    backend_.reset();
    sampler_.reset();
  }, nullptr);
}

}  // namespace loraplex
