// Kernel micro-benchmarks: base GEMM/GEMV at decode and prefill batch sizes on SmolLM2-135M's
// projection shapes (BF16 weights), reported as GFLOP/s and weight GB/s.
// Usage: build/kernel_bench [T ...]      per-shape, weights hot in cache
//        build/kernel_bench --step [T ...] a decode/prefill step's projections over 30 layers of
//                                          distinct weights (streamed from memory, as in the engine)
//        build/kernel_bench --lora [A ...]  a 16-token decode step's LoRA (30 layers x 7 projections,
//                                          rank 16) over A adapters, rows scattered in pool pages
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"

using namespace loraplex::cpu;

static std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> nd(0, 0.02f);
  std::vector<uint16_t> w(n);
  for (auto& v : w) v = f32_to_bf16(nd(rng));
  return w;
}

// Every projection of 30 layers (q, k, v, o, gate, up, down) plus the lm_head, each with its own
// packed weights, in the engine's order: the weights (270 MB) come from memory, not cache.
static int step_bench(const std::vector<int>& Ts) {
  struct Proj { int N, K; };
  const Proj layer[] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  const int n_layers = 30;
  std::mt19937 rng(1);
  std::vector<std::vector<uint8_t>> packed;
  for (int l = 0; l < n_layers; l++)
    for (const Proj& p : layer) {
      auto w = random_bf16(rng, size_t(p.N) * p.K);
      packed.emplace_back(packed_elems(p.N, p.K) * 2);
      pack_weights(w.data(), WType::BF16, p.N, p.K, packed.back().data());
    }
  auto lm = random_bf16(rng, size_t(49152) * 576);
  std::vector<uint8_t> lm_packed(packed_elems(49152, 576) * 2);
  pack_weights(lm.data(), WType::BF16, 49152, 576, lm_packed.data());
  double bytes = lm.size() * 2.0, flops_tok = 2.0 * 49152 * 576;
  for (const Proj& p : layer) bytes += 2.0 * p.N * p.K * n_layers, flops_tok += 2.0 * p.N * p.K * n_layers;
  for (int T : Ts) {
    std::vector<float> x(size_t(T) * 1536, 0.01f), y(size_t(T) * 49152);
    double best = 1e30, sum = 0;
    const int reps = 20;
    for (int r = 0; r < reps + 1; r++) {
      auto t0 = std::chrono::steady_clock::now();
      for (int l = 0; l < n_layers; l++)
        for (int i = 0; i < 7; i++)
          matmul_packed(x.data(), T, layer[i].K, packed[size_t(l) * 7 + i].data(), WType::BF16, layer[i].N, nullptr, y.data());
      matmul_packed(x.data(), T, 576, lm_packed.data(), WType::BF16, 49152, nullptr, y.data());
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r == 0) continue;  // warm-up
      best = std::min(best, sec);
      sum += sec;
    }
    const double mean = sum / reps;
    std::printf("step T=%-4d mean %7.2f ms  best %7.2f ms  %7.1f GFLOP/s  %6.1f GB/s(W)\n", T, mean * 1e3, best * 1e3,
                flops_tok * T / mean / 1e9, bytes / mean / 1e9);
  }
  return 0;
}

// LoRA of one decode step: 16 tokens over A adapters (16 / A tokens each, SGMV segments), every
// projection of 30 layers, rank 16, fp32 and BF16 rows; each adapter's rows placed in order in its
// own pages of the engine's page size, the pages scattered over a pool, as the engine places them.
static int lora_bench(const std::vector<int>& As) {
  const int T = 16, rank = 16, n_layers = 30;
  const int ins[7] = {576, 576, 576, 576, 576, 576, 1536}, outs[7] = {576, 192, 192, 576, 1536, 1536, 576};
  const size_t page = 737280;  // the engine's page for this model and block size 16
  for (int A : As)
    for (bool bf16 : {false, true}) {
      const size_t es = bf16 ? 2 : 4;
      size_t per_adapter = 0;
      for (int p = 0; p < 7; p++) per_adapter += size_t(n_layers) * rank * ((ins[p] + outs[p]) * es + 64);
      const int pages_per = int(per_adapter / page) + 2, n_pages = A * pages_per + 64;
      std::vector<uint8_t> pool(size_t(n_pages) * page, 0);
      std::mt19937 rng(1);
      std::vector<int> perm(n_pages);
      for (int i = 0; i < n_pages; i++) perm[i] = i;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::vector<std::vector<int64_t>> rows(A);
      std::vector<LoraRef> refs(size_t(n_layers) * 7 * (A + 1));
      for (int a = 0; a < A; a++) {
        int pg = 0;
        size_t used = 0;
        rows[a].reserve(size_t(n_layers) * 7 * 2 * rank);
        auto place = [&](size_t bytes) {
          size_t st = (used + 63) & ~size_t(63);
          if (st + bytes > page) pg++, st = 0;
          used = st + bytes;
          rows[a].push_back(int64_t(perm[a * pages_per + pg]) * int64_t(page) + int64_t(st));
        };
        for (int l = 0; l < n_layers; l++)
          for (int p = 0; p < 7; p++) {
            const size_t first = rows[a].size();
            for (int j = 0; j < rank; j++) place(ins[p] * es);
            for (int j = 0; j < rank; j++) place(outs[p] * es);
            LoraRef& r = refs[(size_t(l) * 7 + p) * (A + 1) + a + 1];
            r.rank = rank, r.scale = 2.f, r.bf16 = bf16;
            r.a_rows = rows[a].data() + first, r.b_rows = rows[a].data() + first + rank;
          }
      }
      std::vector<LoraSegment> segs;
      for (int a = 0; a < A; a++) segs.push_back({a * T / A, (a + 1) * T / A, a + 1});
      std::vector<float> x(size_t(T) * 1536, 0.01f), y(size_t(T) * 1536), z(size_t(T) * rank);
      std::vector<double> ms;
      for (int it = 0; it < 24; it++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int l = 0; l < n_layers; l++)
          for (int p = 0; p < 7; p++)
          {
            const LoraTarget t{&refs[(size_t(l) * 7 + p) * (A + 1)], outs[p], y.data()};
            lora_sgmv(pool.data(), &t, 1, segs.data(), A, x.data(), ins[p], z.data());
          }
        if (it >= 4) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      const double mb = A * per_adapter / 1e6;
      std::printf("lora step T=16 A=%-3d %s rows: median %6.2f ms  (%.0f MB of rows, %.1f GB/s)\n", A,
                  bf16 ? "bf16" : "fp32", ms[ms.size() / 2], mb, mb / ms[ms.size() / 2]);
    }
  return 0;
}

int main(int argc, char** argv) {
  std::vector<int> Ts = {1, 4, 16, 32, 256};
  const bool step = argc > 1 && std::strcmp(argv[1], "--step") == 0;
  const bool lora = argc > 1 && std::strcmp(argv[1], "--lora") == 0;
  if (lora) Ts = {1, 8, 16};
  if (argc > 1 + (step || lora)) {
    Ts.clear();
    for (int i = 1 + (step || lora); i < argc; i++) Ts.push_back(std::atoi(argv[i]));
  }
  if (step) return step_bench(Ts);
  if (lora) return lora_bench(Ts);
  struct Shape { const char* name; int N, K; };
  const Shape shapes[] = {{"q/o 576x576", 576, 576}, {"k/v 192x576", 192, 576}, {"gate/up 1536x576", 1536, 576},
                          {"down 576x1536", 576, 1536}, {"lm_head 49152x576", 49152, 576}};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 0.02f);
  for (const Shape& s : shapes) {
    std::vector<uint16_t> w(size_t(s.N) * s.K);
    for (auto& v : w) {
      float f = nd(rng);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      v = uint16_t(u >> 16);
    }
    std::vector<uint8_t> P(packed_elems(s.N, s.K) * 2);
    pack_weights(w.data(), WType::BF16, s.N, s.K, P.data());  // as the engine does at load
    for (int T : Ts) {
      if (s.N == 49152 && T > 32) continue;
      std::vector<float> x(size_t(T) * s.K, 0.01f), y(size_t(T) * s.N);
      matmul_packed(x.data(), T, s.K, P.data(), WType::BF16, s.N, nullptr, y.data());
      const double flops = 2.0 * T * s.N * s.K;
      int reps = std::max(3, int(2e9 / flops));
      if (reps > 2000) reps = 2000;
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; r++) matmul_packed(x.data(), T, s.K, P.data(), WType::BF16, s.N, nullptr, y.data());
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
      std::printf("%-18s T=%-4d %8.3f ms  %7.1f GFLOP/s  %6.1f GB/s(W)\n", s.name, T, sec * 1e3, flops / sec / 1e9,
                  w.size() * 2.0 / sec / 1e9);
      if (has_bf16_dot()) {  // the same product with --compute-dtype bfloat16's kernel
        std::vector<uint16_t> PP(packed_pairs_elems(s.N, s.K));
        pack_weights_bf16_pairs(w.data(), s.N, s.K, PP.data());
        matmul_bf16_pairs(x.data(), T, s.K, PP.data(), s.N, nullptr, y.data());
        auto t1 = std::chrono::steady_clock::now();
        for (int r = 0; r < reps; r++) matmul_bf16_pairs(x.data(), T, s.K, PP.data(), s.N, nullptr, y.data());
        const double s2 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() / reps;
        std::printf("%-18s T=%-4d %8.3f ms  %7.1f GFLOP/s  %6.1f GB/s(W)  bf16 dot\n", s.name, T, s2 * 1e3,
                    flops / s2 / 1e9, w.size() * 2.0 / s2 / 1e9);
      }
    }
  }
  // Paged attention, decode: S sequences x 1 query, SmolLM2 heads (9 q / 3 kv, head_dim 64), 30 layers' worth.
  for (int ctx : {128, 512}) {
    const int S = 16, bs = 16, nkv = 3, nh = 9, hd = 64, layers = 1;
    const int blocks = (ctx + bs - 1) / bs;
    KvLayout L{layers, bs, nkv, hd, size_t(layers) * 2 * bs * nkv * hd * 4};
    std::vector<uint8_t> pool(L.page_bytes * S * blocks);
    for (size_t i = 0; i < pool.size() / 4; i++) reinterpret_cast<float*>(pool.data())[i] = nd(rng);
    std::vector<int32_t> qs(S + 1), cl(S, ctx), bt(S * blocks);
    for (int s = 0; s <= S; s++) qs[s] = s;
    for (int i = 0; i < S * blocks; i++) bt[i] = i;
    AttnBatch B{S, qs.data(), cl.data(), bt.data(), blocks, 0};
    std::vector<float> q(S * nh * hd, 0.1f), out(S * nh * hd);
    const int reps = 300;
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; r++) paged_attention(pool.data(), L, 0, B, q.data(), nh, 0.125f, out.data());
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
    std::printf("attention decode S=%d ctx=%d: %.3f ms/layer (%s)\n", S, ctx, sec * 1e3, active_isa());
  }
  return 0;
}
