// Kernel micro-benchmarks: base GEMM/GEMV at decode and prefill batch sizes on SmolLM2-135M's
// projection shapes (BF16 weights), reported as GFLOP/s and weight GB/s.
// Usage: build/kernel_bench [T ...]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/cpu/kernels.h"

using namespace loraplex::cpu;

int main(int argc, char** argv) {
  std::vector<int> Ts = {1, 4, 16, 32, 256};
  if (argc > 1) {
    Ts.clear();
    for (int i = 1; i < argc; i++) Ts.push_back(std::atoi(argv[i]));
  }
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
