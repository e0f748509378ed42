// Decode-step benchmark of the CUDA backend on a Llama-7B-shaped model with random BF16 weights,
// built directly in device memory (a hash of the element index: no download, no curand, and no
// 13 GB host copy: the backend uses device-resident Weights in place).
//
// Times CudaBackend::forward for decode steps (one new token per sequence, every sequence sampled,
// so the [batch, vocab] logits copy to the host is included, as in the engine) at batch 1 / 16 / 64
// with 0 / 8 / 64 distinct adapters (rank 16 on all seven projections, installed through
// install_adapter like the engine does), and one 512-token prefill. KV contents are whatever the
// pool holds (zeros): attention cost depends on the context length, not on the values. First, the
// decode GEMM alone (gemm_skinny with BF16 activations) on the 7B projection shapes at T = 1..16,
// in GB/s of weights and percent of the HBM peak.
//
// Modes (--modes, default all): f32 (the exact path: fp32 activations, KV and adapter rows, eager
// launches), bf16 (BF16 activations, KV and adapter rows, tensor-core GEMMs, eager) and bf16-graphs
// (the same with CUDA graphs for the decode steps: the server's default for a BF16 model). The
// device's bandwidth is measured first (a 1 GiB device-to-device copy), and the issue #19 targets
// are printed against it at the end.
//
// Usage: bench_decode [--layers N] [--ctx N] [--rank R] [--iters N]
//        [--batches 1,16,64] [--adapters 0,8,64] [--modes f32,bf16,bf16-graphs]
// Prints one line per configuration and a final "bench_decode: ok".
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "addon/backend.h"
#include "addon/cuda_backend.h"
#include "kernels/cuda/gemm.cuh"

using namespace loraplex;

namespace {

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "bench_decode: %s: %s\n", what, cudaGetErrorString(e));
    exit(1);
  }
}

__host__ __device__ inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// w[i] = bf16(amp * u), u uniform in [-1, 1) from a hash of (seed, i); round to nearest even.
__global__ void hash_fill_bf16(uint16_t* w,  // [n]
                               size_t n, uint64_t seed, float amp) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float u = float(mix(seed + i * 0x9E3779B97F4A7C15ull) >> 40) * (2.f / 16777216.f) - 1.f;
    uint32_t b = __float_as_uint(amp * u);
    b += 0x7FFF + ((b >> 16) & 1);
    w[i] = uint16_t(b >> 16);
  }
}

std::vector<void*> g_device;

Weight device_weight(int rows, int cols, uint64_t seed, float amp) {
  const size_t n = size_t(rows) * cols;
  void* p = nullptr;
  ck(cudaMalloc(&p, n * 2), "cudaMalloc (weights)");
  g_device.push_back(p);
  hash_fill_bf16<<<4096, 256>>>(static_cast<uint16_t*>(p), n, seed, amp);
  ck(cudaGetLastError(), "hash_fill_bf16");
  Weight w;
  w.data = p;
  w.type = cpu::WType::BF16;
  w.rows = rows;
  w.cols = cols;
  return w;
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The decode GEMM alone (gemm_skinny, BF16 x and y, auto split-K) on the Llama-7B projection shapes
// at T = 1..16: weight bytes streamed per second against the HBM peak from the device attributes.
// Each iteration uses the next layer's weight (up to 8), so the 32-90 MB matrices do not sit in L2.
void bench_skinny(const Model& m, int layers, int iters) {
  int khz = 0, bus = 0;
  ck(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, 0), "memory clock");
  ck(cudaDeviceGetAttribute(&bus, cudaDevAttrGlobalMemoryBusWidth, 0), "bus width");
  const double peak = 2.0 * khz * 1e3 * bus / 8.0;  // bytes/s (double data rate)
  const int n_w = std::min(layers, 8);
  const int H = m.spec.hidden, I = m.spec.intermediate, V = m.spec.vocab;
  void* x = nullptr;
  void* y = nullptr;
  ck(cudaMalloc(&x, size_t(16) * std::max(H, I) * 2), "cudaMalloc x");
  ck(cudaMalloc(&y, size_t(16) * std::max(V, I) * 2), "cudaMalloc y");
  ck(cudaMemset(x, 0, size_t(16) * std::max(H, I) * 2), "cudaMemset x");
  cudaEvent_t e0, e1;
  ck(cudaEventCreate(&e0), "event");
  ck(cudaEventCreate(&e1), "event");
  printf("gemm_skinny (BF16 x, W, y; auto split-K), HBM peak %.0f GB/s from the device attributes\n", peak / 1e9);
  printf("%-18s %3s %7s %10s %8s %8s\n", "shape NxK", "T", "splits", "us", "GB/s", "of peak");
  struct Shape { const char* name; int p; int N, K; };
  const Shape shapes[] = {{"q 4096x4096", kQ, H, H}, {"gate 11008x4096", kGate, I, H}, {"down 4096x11008", kDown, H, I},
                          {"lm_head 32000x4096", -1, V, H}};
  for (const Shape& sh : shapes)
    for (int T : {1, 2, 4, 8, 16}) {
      auto w_of = [&](int i) { return sh.p < 0 ? m.lm_head.data : m.layers[i % n_w].proj[sh.p].data; };
      const int reps = sh.p < 0 ? 1 : n_w;
      for (int i = 0; i < reps; i++)  // warm-up (and the split-K workspace)
        cuda::gemm_skinny(x, cuda::kBF16, T, sh.K, w_of(i), cuda::kBF16, sh.N, nullptr, y, cuda::kBF16, nullptr);
      ck(cudaEventRecord(e0), "record");
      for (int i = 0; i < iters; i++)
        cuda::gemm_skinny(x, cuda::kBF16, T, sh.K, w_of(i), cuda::kBF16, sh.N, nullptr, y, cuda::kBF16, nullptr);
      ck(cudaEventRecord(e1), "record");
      ck(cudaEventSynchronize(e1), "sync");
      float ms = 0.f;
      ck(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
      const double s = ms / 1e3 / iters, bytes = double(sh.N) * sh.K * 2;
      printf("%-18s %3d %7d %10.1f %8.0f %7.0f%%\n", sh.name, T, cuda::gemm_skinny_splits(T, sh.K, sh.N), s * 1e6,
             bytes / s / 1e9, 100.0 * bytes / s / peak);
    }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(x);
  cudaFree(y);
}

}  // namespace

int main(int argc, char** argv) {
  int layers = 32, ctx = 256, rank = 16, iters = 20;
  std::vector<int> batches = {1, 16, 64}, adapters = {0, 8, 64};
  std::vector<std::string> modes = {"f32", "bf16", "bf16-graphs"};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--layers") layers = std::atoi(argv[i + 1]);
    else if (a == "--ctx") ctx = std::atoi(argv[i + 1]);
    else if (a == "--rank") rank = std::atoi(argv[i + 1]);
    else if (a == "--iters") iters = std::atoi(argv[i + 1]);
    else if (a == "--batches") batches = parse_list(argv[i + 1]);
    else if (a == "--adapters") adapters = parse_list(argv[i + 1]);
    else if (a == "--modes") {
      modes.clear();
      std::stringstream ss(argv[i + 1]);
      std::string item;
      while (std::getline(ss, item, ',')) modes.push_back(item);
    }
    else {
      fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  std::string why;
  if (!cuda_device_available(&why)) {
    printf("SKIPPED: no CUDA device (%s)\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  ck(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int max_adapters = *std::max_element(adapters.begin(), adapters.end());

  // Llama-2-7B shapes.
  auto model = std::make_shared<Model>();
  ModelSpec& s = model->spec;
  s.arch = "llama";
  s.hidden = 4096, s.intermediate = 11008, s.n_layers = layers, s.n_heads = 32, s.n_kv_heads = 32, s.head_dim = 128;
  s.vocab = 32000, s.rms_eps = 1e-5f, s.rope_theta = 10000.f;
  const auto t_build = std::chrono::steady_clock::now();
  uint64_t seed = 1;
  model->embed = device_weight(s.vocab, s.hidden, seed++, 1.f);
  model->lm_head = device_weight(s.vocab, s.hidden, seed++, 1.f / 64.f);
  model->final_norm.assign(s.hidden, 1.f);
  model->layers.resize(layers);
  size_t weight_bytes = size_t(2) * s.vocab * s.hidden * 2;
  for (int l = 0; l < layers; l++) {
    Layer& L = model->layers[l];
    L.attn_norm.assign(s.hidden, 1.f);
    L.mlp_norm.assign(s.hidden, 1.f);
    for (int p = 0; p < kNumProj; p++) {
      const int in = model->proj_in(p), out = model->proj_out(p);
      L.proj[p] = device_weight(out, in, seed++, std::sqrt(3.f / float(in)));
      weight_bytes += size_t(in) * out * 2;
    }
  }
  model->inv_freq.resize(s.head_dim / 2);
  for (int i = 0; i < s.head_dim / 2; i++) model->inv_freq[i] = 1.f / std::pow(s.rope_theta, float(2 * i) / s.head_dim);
  ck(cudaDeviceSynchronize(), "model init");
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build).count();
  bench_skinny(*model, layers, std::max(iters, 8) * 4);

  // Device bandwidth: a 1 GiB device-to-device copy reads and writes every byte once.
  double bw = 0;
  {
    const size_t n = size_t(1) << 30;
    void *a = nullptr, *c = nullptr;
    ck(cudaMalloc(&a, n), "cudaMalloc (bandwidth probe)");
    ck(cudaMalloc(&c, n), "cudaMalloc (bandwidth probe)");
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<double> gbs;
    for (int it = 0; it < 6; it++) {
      cudaEventRecord(e0);
      ck(cudaMemcpy(c, a, n, cudaMemcpyDeviceToDevice), "bandwidth probe");
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (it > 0) gbs.push_back(2.0 * n / (ms / 1000.0) / 1e9);
    }
    bw = *std::max_element(gbs.begin(), gbs.end());
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(c);
  }
  const double bound_ms = weight_bytes / (bw * 1e9) * 1000.0;
  printf("bandwidth: %.0f GB/s (device-to-device copy, read + write); HBM bound of a decode step (weights once): %.3f ms\n",
         bw, bound_ms);

  const int block_size = 16;
  const int blocks_per_seq = (ctx + 1 + block_size - 1) / block_size;
  const int prefill_len = 512, prefill_blocks = (prefill_len + block_size - 1) / block_size;
  // One adapter (rank `rank` on every projection of every layer), installed max_adapters times.
  std::vector<LoraModuleF32> mods;
  uint64_t h = 12345;
  for (int l = 0; l < layers; l++)
    for (int p = 0; p < kNumProj; p++) {
      LoraModuleF32 m;
      m.layer = l, m.proj = p, m.rank = rank, m.scale = 2.f;
      m.a.resize(size_t(rank) * model->proj_in(p));
      m.bt.resize(size_t(rank) * model->proj_out(p));
      for (auto& v : m.a) v = float(mix(h++) >> 40) * (2.f / 16777216.f) - 1.f;
      for (auto& v : m.bt) v = (float(mix(h++) >> 40) * (2.f / 16777216.f) - 1.f) * 0.01f;
      mods.push_back(std::move(m));
    }
  printf("device: %s, %.1f GiB; model: Llama-7B shapes, %d layers, BF16, %.2f GB of weights (built in %.2f s)\n",
         prop.name, prop.totalGlobalMem / 1073741824.0, layers, weight_bytes / 1e9, build_s);
  struct Result {
    std::string mode;
    int B, A;
    double ms;
  };
  std::vector<Result> results;
  std::vector<std::pair<std::string, double>> prefill_tps;
  std::vector<std::pair<std::string, long>> pages_per_gib;

  for (const std::string& mode : modes) {
    CudaOptions co;
    if (mode == "bf16" || mode == "bf16-graphs") co.compute_bf16 = co.kv_bf16 = co.lora_bf16 = true;
    else if (mode != "f32") {
      fprintf(stderr, "unknown mode %s (f32, bf16, bf16-graphs)\n", mode.c_str());
      return 2;
    }
    co.graphs = mode == "bf16-graphs";
    co.max_graph_batch = std::max(max_batch, 1);
    co.max_tokens = std::max(prefill_len, max_batch);
    const size_t page_bytes = kv_page_bytes(s, block_size, co.kv_bf16 ? 2 : 4);
    const auto adp = pack_adapter(mods, page_bytes, co.lora_bf16 ? 2 : 4);
    const ParsedAdapter& ad = *adp;
    const int ad_pages = ad.num_pages();
    const int num_pages = max_adapters * ad_pages + std::max(max_batch * blocks_per_seq, prefill_blocks);
    pages_per_gib.push_back({mode, long((size_t(1) << 30) / page_bytes)});
    printf("\n== mode %s: activations %s, KV %s, adapter rows %s, %s\n", mode.c_str(), co.compute_bf16 ? "BF16" : "fp32",
           co.kv_bf16 ? "BF16" : "fp32", co.lora_bf16 ? "BF16" : "fp32", co.graphs ? "CUDA graphs" : "eager");
    printf("pool: %d pages x %.2f MiB = %.2f GiB (block %d; adapters rank %d on 7 projections, %.0f MiB, %d pages each)\n",
           num_pages, page_bytes / 1048576.0, double(page_bytes) * num_pages / 1073741824.0, block_size, rank,
           ad.bytes / 1048576.0, ad_pages);
    std::unique_ptr<Backend> be = make_cuda_backend(model, block_size, num_pages, max_adapters + 1, co);
    {
      cuda::Gemm probe(0);
      const int xt = co.compute_bf16 ? cuda::kBF16 : cuda::kF32;
      printf("gemm: T=1 %s, T=16 %s, T=64 %s\n", probe.path(1, xt, 1), probe.path(16, xt, 1), probe.path(64, xt, 1));
    }
    const auto t_inst = std::chrono::steady_clock::now();
    for (int a = 0; a < max_adapters; a++) {
      std::vector<int32_t> pages(ad_pages);
      for (int i = 0; i < ad_pages; i++) pages[i] = a * ad_pages + i;
      be->install_adapter(a + 1, ad, pages);
    }
    ck(cudaDeviceSynchronize(), "adapter installs");
    const double inst_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_inst).count();
    if (max_adapters > 0)
      printf("install: %d adapters in %.2f s (%.1f GB/s host -> device through the staging ring)\n", max_adapters, inst_s,
             max_adapters * double(ad.bytes) / inst_s / 1e9);
    const int kv_first = max_adapters * ad_pages;

    printf("%-7s %-9s %12s %12s %12s %14s %10s\n", "batch", "adapters", "median ms", "min ms", "tokens/s", "weights GB/s",
           "x bound");
    std::vector<float> logits;
    for (int B : batches)
      for (int A : adapters) {
        StepBatch b;
        b.n_tokens = B, b.n_seqs = B, b.max_blocks = blocks_per_seq;
        b.query_start.push_back(0);
        for (int i = 0; i < B; i++) {
          b.tokens.push_back(int32_t(mix(uint64_t(i) + 99) % uint64_t(s.vocab)));
          b.positions.push_back(ctx);
          b.token_slots.push_back(A == 0 ? 0 : 1 + i % A);
          b.query_start.push_back(i + 1);
          b.context_lens.push_back(ctx + 1);
          for (int k = 0; k < blocks_per_seq; k++) b.block_tables.push_back(kv_first + i * blocks_per_seq + k);
          b.sample_seqs.push_back(i);
        }
        logits.resize(size_t(B) * s.vocab);
        std::vector<double> ms;
        for (int it = 0; it < iters + 3; it++) {  // the first (capture, warm-up) steps are not timed
          const auto t0 = std::chrono::steady_clock::now();
          be->forward(b, logits.data());
          const double d = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
          if (it >= 3) ms.push_back(d);
        }
        const double med = median(ms), mn = *std::min_element(ms.begin(), ms.end());
        printf("%-7d %-9d %12.3f %12.3f %12.0f %14.0f %10.2f\n", B, A, med, mn, B / med * 1000.0, weight_bytes / med / 1e6,
               med / bound_ms);
        fflush(stdout);
        results.push_back({mode, B, A, med});
      }
    {  // one prefill of 512 tokens, base model
      StepBatch b;
      b.n_tokens = prefill_len, b.n_seqs = 1, b.max_blocks = prefill_blocks;
      b.query_start = {0, prefill_len};
      b.context_lens = {prefill_len};
      for (int t = 0; t < prefill_len; t++) {
        b.tokens.push_back(int32_t(mix(uint64_t(t)) % uint64_t(s.vocab)));
        b.positions.push_back(t);
        b.token_slots.push_back(0);
      }
      for (int k = 0; k < prefill_blocks; k++) b.block_tables.push_back(kv_first + k);
      b.sample_seqs = {0};
      logits.resize(s.vocab);
      std::vector<double> ms;
      for (int it = 0; it < 4; it++) {
        const auto t0 = std::chrono::steady_clock::now();
        be->forward(b, logits.data());
        if (it >= 1) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      const double med = median(ms);
      printf("prefill %d tokens: %.2f ms (%.0f tokens/s)\n", prefill_len, med, prefill_len / med * 1000.0);
      prefill_tps.push_back({mode, prefill_len / med * 1000.0});
    }
    const CudaGraphStats g = cuda_graph_stats(*be);
    if (co.graphs)
      printf("graphs: %llu captured, %llu replays, %llu eager steps, %llu capture failures\n",
             (unsigned long long)g.captures, (unsigned long long)g.replays, (unsigned long long)g.eager_steps,
             (unsigned long long)g.capture_failures);
  }

  // The targets of issue #19, from whichever modes ran.
  auto find = [&](const std::string& mode, int B, int A) {
    for (const Result& r : results)
      if (r.mode == mode && r.B == B && r.A == A) return r.ms;
    return -1.0;
  };
  const std::string best = std::find(modes.begin(), modes.end(), "bf16-graphs") != modes.end() ? "bf16-graphs" : modes.back();
  printf("\ntargets (%s):\n", best.c_str());
  if (const double b1 = find(best, 1, 0); b1 > 0)
    printf("  batch-1 decode step %.3f ms = %.2fx the HBM bound %.3f ms (%.0f GB/s measured); target <= 1.3x: %s\n", b1,
           b1 / bound_ms, bound_ms, bw, b1 / bound_ms <= 1.3 ? "met" : "MISSED");
  if (const double base = find(best, 64, 0), lora = find(best, 64, 64); base > 0 && lora > 0)
    printf("  batch 64, 64 adapters %.3f ms = %.2fx base-only %.3f ms; target <= 1.25x: %s\n", lora, lora / base, base,
           lora / base <= 1.25 ? "met" : "MISSED");
  for (const auto& [mode, tps] : prefill_tps)
    if (mode == best)
      printf("  prefill 512: %.0f tokens/s = %.2fx the fp32 backend's 12,015; target >= 3x: %s\n", tps, tps / 12015.0,
             tps >= 3 * 12015.0 ? "met" : "MISSED");
  long f32_pages = 0, bf16_pages = 0;
  for (const auto& [mode, n] : pages_per_gib) (mode == "f32" ? f32_pages : bf16_pages) = n;
  if (f32_pages > 0 && bf16_pages > 0)
    printf("  KV pages per GiB: fp32 %ld, BF16 %ld (%.2fx); target 2x: %s\n", f32_pages, bf16_pages,
           double(bf16_pages) / f32_pages, bf16_pages >= 2 * f32_pages ? "met" : "MISSED");
  for (void* p : g_device) cudaFree(p);
  printf("bench_decode: ok\n");
  return 0;
}
