// Measures read bandwidth with all OpenMP threads (sum over a buffer much larger than the caches),
// the bound a decode step cannot beat: it must read every base weight once.
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  const size_t bytes = (argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1024) << 20;
  const size_t n = bytes / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (size_t i = 0; i < n; i++) total += buf[i];
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (total < 0) std::printf("?");
    best = std::max(best, bytes / s / 1e9);
  }
  std::printf("{\"read_gb_per_s\": %.2f, \"threads\": %d, \"buffer_mib\": %zu}\n", best, omp_get_max_threads(), bytes >> 20);
  return 0;
}
