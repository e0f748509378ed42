// Measures read bandwidth with all OpenMP threads (sum over a buffer much larger than the caches),
// the bound a decode step cannot beat: it must read every base weight once.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

int main(int argc, char** argv) {
  const size_t bytes = size_t(argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024) << 20;
  const size_t n = bytes / sizeof(float);
  float* buf = static_cast<float*>(std::aligned_alloc(64, bytes));
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) buf[i] = 1.0f;  // first touch by the thread that reads it
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      // Four independent accumulators so the add latency never limits the loads.
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_load_ps(buf + i));
        a1 = _mm512_add_ps(a1, _mm512_load_ps(buf + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_load_ps(buf + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_load_ps(buf + i + 48));
      }
      total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (total < 0) std::printf("?");
    best = std::max(best, bytes / s / 1e9);
  }
  std::printf("{\"read_gb_per_s\": %.2f, \"threads\": %d, \"buffer_mib\": %zu}\n", best, omp_get_max_threads(), bytes >> 20);
  std::free(buf);
  return 0;
}
