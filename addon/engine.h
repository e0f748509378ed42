// The native engine as seen from JavaScript. It owns one engine thread; every model step, adapter
// install/remove and the model load itself run there, in submission order, and each call returns a
// Promise that is settled back on the JS thread. Adapter parsing (disk -> host memory) runs on a
// libuv worker instead, so it overlaps with running steps.
// Thread safety: the Napi methods run on the JS thread; backend_, sampler_ and everything they own
// are touched only by the engine thread; the Model is immutable and shared read-only.
#pragma once
#include <napi.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "addon/backend.h"
#include "addon/sampler.h"

namespace loraplex {

class Engine : public Napi::ObjectWrap<Engine> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Engine(const Napi::CallbackInfo& info);
  ~Engine() override;

  struct Job;  // a queued call's promise and result builder (public for the settle callback)

 private:
  Napi::Value Load(const Napi::CallbackInfo& info);
  Napi::Value LoadProgressInfo(const Napi::CallbackInfo& info);
  Napi::Value Step(const Napi::CallbackInfo& info);
  Napi::Value ParseAdapter(const Napi::CallbackInfo& info);
  Napi::Value AdapterPages(const Napi::CallbackInfo& info);
  Napi::Value FreeAdapter(const Napi::CallbackInfo& info);
  Napi::Value AdapterImageStatsJs(const Napi::CallbackInfo& info);
  Napi::Value InstallAdapter(const Napi::CallbackInfo& info);
  Napi::Value RemoveAdapter(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);
  Napi::Value ProvideMasks(const Napi::CallbackInfo& info);

  // Queues work for the engine thread. `work` runs there and may throw; `to_js` runs on the JS
  // thread afterwards to build the resolved value.
  Napi::Promise Submit(Napi::Env env, std::function<void()> work, std::function<Napi::Value(Napi::Env)> to_js);
  void ThreadMain();
  void StopThread();
  void RequireLoaded(Napi::Env env) const;

  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;

  // Set by Load on the engine thread; read on the JS thread only after Load's promise resolved.
  std::shared_ptr<Model> model_;
  size_t page_bytes_ = 0;
  size_t lora_elem_bytes_ = sizeof(float);  // the backend's adapter row element size
  int omp_threads_ = 0;                      // OpenMP threads of the engine thread (set by Load)
  std::string compute_dtype_ = "float32";     // the backend's matmul activations (--compute-dtype)
  std::string kv_cache_dtype_ = "float32";    // the backend's KV cache elements (--kv-cache-dtype)
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Sampler> sampler_;
  std::vector<float> logits_;
  // Deferred grammar masks: a step that carries masksDeferred runs its forward at once and samples
  // once the JS thread (provideMasks) hands the masks over, so the grammar worker computes them
  // while the forward runs. Written on the JS thread, waited for on the engine thread.
  std::mutex defer_mu_;
  std::condition_variable defer_cv_;
  bool defer_ready_ = false;
  std::vector<int32_t> defer_masks_;  // [rows * mask_words]
  std::vector<int32_t> defer_skip_;   // sample indices not to sample this step (their masks are late)

  // The model load's phases as reported by load_model and the backend (addon/load_progress.h):
  // written on the engine thread, read by loadProgress() on the JS thread, both under load_mu_.
  struct LoadPhase {
    std::string name;
    uint64_t done = 0, total = 0;
    double start_ms = 0, end_ms = -1;  // since the load began; end_ms < 0 while running
  };
  std::mutex load_mu_;
  std::vector<LoadPhase> load_phases_;
  std::chrono::steady_clock::time_point load_t0_;
  void ReportLoad(const char* phase, uint64_t done, uint64_t total);
};

}  // namespace loraplex
