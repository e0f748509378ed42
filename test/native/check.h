// The check harness shared by the C++ test programs (test/native/kernel_tests.cc and
// test/cuda/backend_ops_test.cu): pass/fail counting, tolerant float comparison, timed sections,
// and a deterministic PRNG. Header-only; each program is one translation unit.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace loraplex::check {

inline int g_passed = 0, g_failed = 0;
inline double g_worst = 0;  // largest |err| / tolerance seen in the current section (margin report)

inline std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

inline void record(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    g_passed++;
  } else {
    if (++g_failed <= 100) printf("FAIL %s%s%s\n", what.c_str(), detail.empty() ? "" : ": ", detail.c_str());
    if (g_failed == 100) printf("(further failures are counted, not printed)\n");
    fflush(stdout);
  }
}

struct Tol {
  double atol = 1e-4, rtol = 1e-4;  // fp32 sums in a different order
};
inline const Tol kExact{0, 0};

// One case: got[i] ~ want[i] for all i. NaN must meet NaN, infinities must be equal.
inline bool expect_close(const std::string& what, const float* got, const float* want, size_t n, Tol tol = {}) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; i++) {
    const double g = got[i], w = want[i];
    bool ok;
    if (std::isnan(g) || std::isnan(w)) {
      ok = std::isnan(g) && std::isnan(w);
    } else if (std::isinf(g) || std::isinf(w)) {
      ok = g == w;
    } else {
      const double lim = tol.atol + tol.rtol * std::fabs(w), err = std::fabs(g - w);
      ok = err <= lim;
      if (lim > 0) g_worst = std::max(g_worst, err / lim);
    }
    if (!ok && bad++ == 0) first = i;
  }
  record(bad == 0, what,
         bad == 0 ? ""
                  : fmt("%zu of %zu values out of tolerance; first [%zu]: got %.9g want %.9g (atol %.1e rtol %.1e)",
                        bad, n, first, got[first], want[first], tol.atol, tol.rtol));
  return bad == 0;
}

// Prints a section's counts, worst margin and time when it goes out of scope.
struct Section {
  const char* name;
  int p0 = g_passed, f0 = g_failed;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  explicit Section(const char* n) : name(n) { g_worst = 0; }
  ~Section() {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    printf("[%s] %d passed, %d failed, worst |err|/tol %.3f, %.2f s\n", name, g_passed - p0, g_failed - f0, g_worst, s);
    fflush(stdout);
  }
};

// Deterministic PRNG (splitmix64).
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo = -1.f, float hi = 1.f) { return lo + (hi - lo) * float(next() >> 40) * (1.f / 16777216.f); }
  int below(int n) { return int(next() % uint64_t(n)); }
  std::vector<float> vec(size_t n, float lo = -1.f, float hi = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = uniform(lo, hi);
    return v;
  }
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[size_t(below(int(i)))]);
  }
};

// Output canaries: a quiet NaN nobody computes.
constexpr uint32_t kCanaryBits = 0x7FC0DEADu;

}  // namespace loraplex::check
