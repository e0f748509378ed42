// CUDA vs CPU, op by op (in the manner of ggml's test-backend-ops and Punica's kernel tests): every
// kernel of kernels/cuda against its kernels/cpu counterpart on the same random inputs, and then the
// whole CudaBackend against the CpuBackend (the oracle) on small random models with adapters.
//
// - Tolerances are per op and dtype (fp32 sums in another order; for cuBLAS's split 16-bit
//   activations, the split's precision); outputs are compared element by element (NaN must meet NaN).
// - Device outputs are surrounded by canaries (a NaN bit pattern nobody computes), so writes past
//   either end of a tensor are caught. KV pools and LoRA pools start as NaN, so reading anything not
//   written poisons the output.
// - LoRA runs mixes identical / distinct / uniform / skewed / with-base over ranks 1..128, in BGMV
//   and SGMV form, with adapter rows scattered through the pool at 64-byte aligned byte offsets.
//
// Prints one FAIL line per failing case, one summary per section, and ends with "N passed, M
// failed"; exits 1 on any failure. Without a usable GPU it prints "SKIPPED: no CUDA device
// (reason)" and exits 0. Built against the host emulator (test/cuda/emu) it runs the same checks
// on smaller shapes (--quick is implied).
// Usage: backend_ops_test [--quick] [--only SECTION]
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "addon/backend.h"
#include "addon/cuda_backend.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/kv_access.h"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/launchers.cuh"
#include "test/native/check.h"

using namespace loraplex;
using namespace loraplex::check;
namespace cu = loraplex::cuda;

namespace {

// ------------------------------------------------------------------------------------------------
// Harness

bool g_quick = false;
cudaStream_t g_stream = nullptr;

void ck(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    printf("FATAL %s: %s\n", what, cudaGetErrorString(e));
    exit(2);
  }
}
void sync() { ck(cudaStreamSynchronize(g_stream), "stream sync"); }

float canary() {
  float c;
  std::memcpy(&c, &kCanaryBits, 4);
  return c;
}

// cudaMemcpy from pageable memory returns once the data is staged, before the DMA has landed, and
// runs on the legacy stream, which does not order against the test's non-blocking stream: every
// harness copy therefore waits for the whole device before and after (a race seen on an H200:
// canaries landing after the kernel's writes, beyond the first MiB of large outputs).
void copy_sync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, const char* what) {
  ck(cudaDeviceSynchronize(), what);
  ck(cudaMemcpy(dst, src, bytes, kind), what);
  ck(cudaDeviceSynchronize(), what);
}

// A device array with canaries on both sides.
template <typename T>
struct Dev {
  static constexpr size_t kPad = 64 / sizeof(T) > 0 ? 64 / sizeof(T) : 1;
  T* base = nullptr;
  size_t n = 0;
  Dev() = default;
  explicit Dev(size_t n_) : n(n_) {
    ck(cudaMalloc(reinterpret_cast<void**>(&base), (n + 2 * kPad) * sizeof(T)), "cudaMalloc");
    std::vector<T> fill(n + 2 * kPad);
    for (auto& v : fill) std::memcpy(static_cast<void*>(&v), &kCanaryBits, std::min(sizeof(T), sizeof(uint32_t)));
    copy_sync(base, fill.data(), fill.size() * sizeof(T), cudaMemcpyHostToDevice, "fill");
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) { upload(h); }
  ~Dev() {
    if (base) cudaFree(base);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  T* p() const { return base + kPad; }
  void upload(const std::vector<T>& h) {
    copy_sync(p(), h.data(), std::min(h.size(), n) * sizeof(T), cudaMemcpyHostToDevice, "upload");
  }
  std::vector<T> host() const {
    std::vector<T> h(n);
    copy_sync(h.data(), p(), n * sizeof(T), cudaMemcpyDeviceToHost, "download");
    return h;
  }
  bool intact() const {
    std::vector<T> all(n + 2 * kPad);
    copy_sync(all.data(), base, all.size() * sizeof(T), cudaMemcpyDeviceToHost, "download");
    for (size_t i = 0; i < all.size(); i++) {
      if (i >= kPad && i < kPad + n) continue;
      uint32_t u = 0;
      std::memcpy(&u, static_cast<const void*>(&all[i]), std::min(sizeof(T), sizeof(uint32_t)));
      const uint32_t want = sizeof(T) >= 4 ? kCanaryBits : (kCanaryBits & ((1u << (8 * sizeof(T))) - 1));
      if (u != want) return false;
    }
    return true;
  }
};

template <typename T>
void expect_guard(const std::string& what, const Dev<T>& d) {
  record(d.intact(), what + " [canary]", "wrote outside its output");
}

// dtype helpers
const char* wname(int t) { return t == 0 ? "F32" : t == 1 ? "BF16" : "F16"; }

struct Weights {
  int t;
  std::vector<float> f32;
  std::vector<uint16_t> h16;
  const void* data() const { return t == 0 ? static_cast<const void*>(f32.data()) : h16.data(); }
  size_t bytes() const { return t == 0 ? f32.size() * 4 : h16.size() * 2; }
};

// Random weights of about [-amp, amp]; F16 as random bit patterns (1 in 16 subnormal) like the CPU tests.
Weights random_weights(Rng& rng, int t, size_t n, float amp = 1.f) {
  Weights w{t, {}, {}};
  if (t == 0) {
    w.f32 = rng.vec(n, -amp, amp);
  } else if (t == 1) {
    w.h16.resize(n);
    for (auto& h : w.h16) h = cpu::f32_to_bf16(rng.uniform(-amp, amp));
  } else {
    w.h16.resize(n);
    const int top = amp >= 1.f ? 15 : std::max(1, 15 + int(std::floor(std::log2(amp))));
    for (auto& h : w.h16) {
      const uint64_t r = rng.next();
      const int e = (r & 0xF) == 0 ? 0 : std::max(1, top - 6) + int((r >> 4) % 7);
      h = uint16_t(((r >> 8) & 1) << 15 | std::min(e, 30) << 10 | ((r >> 9) & 0x3FF));
    }
  }
  return w;
}

struct DevWeights {
  void* p = nullptr;
  explicit DevWeights(const Weights& w) {
    ck(cudaMalloc(&p, std::max<size_t>(w.bytes(), 1)), "cudaMalloc");
    copy_sync(p, w.data(), w.bytes(), cudaMemcpyHostToDevice, "upload");
  }
  ~DevWeights() { cudaFree(p); }
};

// ------------------------------------------------------------------------------------------------
// 1. Row-wise and element-wise ops

void test_elementwise(Rng& rng) {
  Section sec("elementwise");
  // embed: the conversion is exact.
  for (int wt : {0, 1, 2})
    for (int H : {1, 7, 64, 300}) {
      const int V = 50;
      const Weights table = random_weights(rng, wt, size_t(V) * H);
      const DevWeights dt(table);
      for (int T : {1, 5, 40}) {
        std::vector<int32_t> ids(T);
        for (auto& i : ids) i = rng.below(V);
        std::vector<float> want(size_t(T) * H);
        cpu::embed(ids.data(), T, table.data(), cpu::WType(wt), H, want.data());
        Dev<int32_t> d_ids(ids);
        Dev<float> out(want.size());
        cu::embed(d_ids.p(), T, dt.p, wt, H, out.p(), g_stream);
        sync();
        const std::string what = fmt("embed %s T=%d H=%d", wname(wt), T, H);
        expect_close(what, out.host().data(), want.data(), want.size(), kExact);
        expect_guard(what, out);
      }
    }
  // rmsnorm: plain, fused residual add, in place. The CPU sums squares in double, the GPU in fp32.
  for (int H : {1, 31, 64, 896, 4096})
    for (int T : {1, 3, 17}) {
      const std::vector<float> x = rng.vec(size_t(T) * H, -3.f, 3.f), d = rng.vec(size_t(T) * H),
                               w = rng.vec(H, 0.5f, 1.5f);
      const float eps = 1e-6f;
      for (int mode = 0; mode < 3; mode++) {  // 0 plain, 1 with delta, 2 in place
        std::vector<float> xs = x, want(x.size());
        if (mode == 1)
          for (size_t i = 0; i < xs.size(); i++) xs[i] += d[i];
        cpu::rmsnorm(xs.data(), w.data(), T, H, eps, want.data());
        Dev<float> dx(x), dd(d), dw(w), dy(x.size());
        float* y = mode == 2 ? dx.p() : dy.p();
        cu::rmsnorm(dx.p(), mode == 1 ? dd.p() : nullptr, dw.p(), T, H, eps, y, g_stream);
        sync();
        const std::string what = fmt("rmsnorm T=%d H=%d %s", T, H, mode == 0 ? "plain" : mode == 1 ? "+residual" : "in place");
        expect_close(what, (mode == 2 ? dx : dy).host().data(), want.data(), want.size(), {1e-5, 2e-5});
        if (mode == 1) expect_close(what + " (residual written back)", dx.host().data(), xs.data(), xs.size(), kExact);
        expect_guard(what, mode == 2 ? dx : dy);
      }
    }
  // rope on q and k together, realistic inv_freq, positions up to 128K.
  for (int hd : {2, 24, 64, 128, 256})
    for (auto [nq, nk] : std::vector<std::pair<int, int>>{{1, 1}, {4, 2}, {3, 0}})
      for (float attn_scale : {1.f, 1.25f}) {
        const int T = 9, half = hd / 2;
        std::vector<float> inv(half);
        for (int i = 0; i < half; i++) inv[i] = 1.0f / std::pow(500000.f, float(2 * i) / float(hd));
        std::vector<int32_t> pos(T);
        for (int t = 0; t < T; t++) pos[t] = t < 3 ? t : rng.below(131072);
        const std::vector<float> q = rng.vec(size_t(T) * nq * hd), k = rng.vec(size_t(T) * std::max(nk, 1) * hd);
        std::vector<float> wq = q, wk = k;
        cpu::rope(wq.data(), T, nq, hd, pos.data(), inv.data(), attn_scale);
        if (nk) cpu::rope(wk.data(), T, nk, hd, pos.data(), inv.data(), attn_scale);
        Dev<float> dq(q), dk(k), dinv(inv);
        Dev<int32_t> dpos(pos);
        cu::rope(dq.p(), nq, nk ? dk.p() : nullptr, nk, T, hd, dpos.p(), dinv.p(), attn_scale, g_stream);
        sync();
        const std::string what = fmt("rope hd=%d nq=%d nk=%d scale=%g", hd, nq, nk, attn_scale);
        // Angles up to ~1e5 rad: device cosf/sinf and the host's differ by an ulp or two.
        expect_close(what + " q", dq.host().data(), wq.data(), wq.size(), {1e-5, 1e-5});
        expect_close(what + " k", dk.host().data(), wk.data(), wk.size(), {1e-5, 1e-5});
        expect_guard(what, dq);
      }
  // embed times Gemma's sqrt(hidden): the fp32 product of each converted weight and the scale.
  for (int wt : {0, 1}) {
    const int V = 30, H = 48, T = 7;
    const float sc = float(std::sqrt(48.0));
    const Weights table = random_weights(rng, wt, size_t(V) * H);
    const DevWeights dt(table);
    std::vector<int32_t> ids(T);
    for (auto& i : ids) i = rng.below(V);
    std::vector<float> want(size_t(T) * H);
    cpu::embed(ids.data(), T, table.data(), cpu::WType(wt), H, want.data(), sc);
    Dev<int32_t> d_ids(ids);
    Dev<float> out(want.size());
    cu::embed(d_ids.p(), T, dt.p, wt, H, out.p(), g_stream, sc);
    sync();
    expect_close(fmt("embed scaled %s", wname(wt)), out.host().data(), want.data(), want.size(), kExact);
    expect_guard("embed scaled", out);
  }
  // q/k norm (Qwen3, Gemma 3): rmsnorm over head_dim with T * heads rows, in place.
  for (auto [heads, hd] : std::vector<std::pair<int, int>>{{16, 128}, {4, 256}, {3, 24}})
    for (int T : {1, 9}) {
      const int rows = T * heads;
      const std::vector<float> x = rng.vec(size_t(rows) * hd, -4.f, 4.f), w = rng.vec(hd, 0.5f, 1.5f);
      std::vector<float> want(x.size());
      cpu::rmsnorm(x.data(), w.data(), rows, hd, 1e-6f, want.data());
      Dev<float> dx(x), dw(w);
      cu::rmsnorm(dx.p(), nullptr, dw.p(), rows, hd, 1e-6f, dx.p(), g_stream);
      sync();
      const std::string what = fmt("qk_norm T=%d heads=%d hd=%d", T, heads, hd);
      expect_close(what, dx.host().data(), want.data(), want.size(), {1e-5, 2e-5});
      expect_guard(what, dx);
    }
  // Partial rotary (Phi-3 / Phi-4-mini): the first rot_dim dimensions rotate, the rest pass through.
  for (auto [hd, rot] : std::vector<std::pair<int, int>>{{16, 12}, {96, 72}, {128, 96}, {64, 64}}) {
    const int T = 7, nq = 4, nk = 2, half = rot / 2;
    std::vector<float> inv(half);
    for (int i = 0; i < half; i++) inv[i] = 1.0f / std::pow(10000.f, float(2 * i) / float(rot));
    std::vector<int32_t> pos(T);
    for (int t = 0; t < T; t++) pos[t] = rng.below(8192);
    const std::vector<float> q = rng.vec(size_t(T) * nq * hd), k = rng.vec(size_t(T) * nk * hd);
    std::vector<float> wq = q, wk = k, cs(size_t(T) * half), sn(size_t(T) * half);
    cpu::rope_table(pos.data(), T, inv.data(), half, 1.0f, cs.data(), sn.data());
    cpu::rope_apply(wq.data(), T, nq, hd, cs.data(), sn.data(), rot);
    cpu::rope_apply(wk.data(), T, nk, hd, cs.data(), sn.data(), rot);
    Dev<float> dq(q), dk(k), dinv(inv);
    Dev<int32_t> dpos(pos);
    cu::rope(dq.p(), nq, dk.p(), nk, T, hd, dpos.p(), dinv.p(), 1.0f, g_stream, rot);
    sync();
    const std::string what = fmt("rope partial hd=%d rot=%d", hd, rot);
    expect_close(what + " q", dq.host().data(), wq.data(), wq.size(), {1e-5, 1e-5});
    expect_close(what + " k", dk.host().data(), wk.data(), wk.size(), {1e-5, 1e-5});
    expect_guard(what, dq);
  }
  // LongRoPE: per-token choice of the long frequencies (token_alt), partial rotary 12 of 16.
  {
    const int T = 6, nq = 3, nk = 1, hd = 16, rot = 12, half = rot / 2;
    std::vector<float> inv(half), inv_long(half);
    for (int i = 0; i < half; i++) inv[i] = 1.0f / std::pow(10000.f, float(2 * i) / float(rot)), inv_long[i] = inv[i] / (1.f + i);
    std::vector<int32_t> pos(T), alt = {0, 1, 1, 0, 1, 0};
    for (int t = 0; t < T; t++) pos[t] = rng.below(4096);
    const std::vector<float> q = rng.vec(size_t(T) * nq * hd), k = rng.vec(size_t(T) * nk * hd);
    std::vector<float> wq = q, wk = k, cs(size_t(T) * half), sn(size_t(T) * half), cl(cs.size()), sl(sn.size());
    cpu::rope_table(pos.data(), T, inv.data(), half, 1.18f, cs.data(), sn.data());
    cpu::rope_table(pos.data(), T, inv_long.data(), half, 1.18f, cl.data(), sl.data());
    for (int t = 0; t < T; t++)
      if (alt[t])
        for (int i = 0; i < half; i++) cs[size_t(t) * half + i] = cl[size_t(t) * half + i], sn[size_t(t) * half + i] = sl[size_t(t) * half + i];
    cpu::rope_apply(wq.data(), T, nq, hd, cs.data(), sn.data(), rot);
    cpu::rope_apply(wk.data(), T, nk, hd, cs.data(), sn.data(), rot);
    Dev<float> dq(q), dk(k), dinv(inv), dlong(inv_long);
    Dev<int32_t> dpos(pos), dalt(alt);
    cu::rope(dq.p(), nq, dk.p(), nk, T, hd, dpos.p(), dinv.p(), 1.18f, g_stream, rot, dlong.p(), dalt.p());
    sync();
    expect_close("rope longrope per-token q", dq.host().data(), wq.data(), wq.size(), {1e-5, 1e-5});
    expect_close("rope longrope per-token k", dk.host().data(), wk.data(), wk.size(), {1e-5, 1e-5});
    expect_guard("rope longrope", dq);
  }
  // GeGLU and logit soft-capping (Gemma): CPU tanh_fast vs device tanhf.
  for (size_t n : {size_t(1), size_t(1000), size_t(70001)}) {
    const std::vector<float> g = rng.vec(n, -8.f, 8.f), u = rng.vec(n);
    std::vector<float> want(n);
    cpu::gelu_tanh_mul(g.data(), u.data(), 1, int(n), want.data());
    Dev<float> dg(g), du(u), da(n);
    cu::gelu_tanh_mul(dg.p(), du.p(), n, da.p(), g_stream);
    sync();
    expect_close(fmt("gelu_tanh_mul n=%zu", n), da.host().data(), want.data(), n, {2e-6, 1e-5});
    expect_guard(fmt("gelu_tanh_mul n=%zu", n), da);
    for (float cap : {30.f, 0.5f}) {
      const std::vector<float> x = rng.vec(n, -3 * cap, 3 * cap);
      std::vector<float> wx = x;
      cpu::softcap(wx.data(), n, cap);
      Dev<float> dx(x);
      cu::softcap(dx.p(), n, cap, g_stream);
      sync();
      expect_close(fmt("softcap n=%zu cap=%g", n, cap), dx.host().data(), wx.data(), n, {2e-6 * cap, 1e-5});
      expect_guard(fmt("softcap n=%zu cap=%g", n, cap), dx);
    }
  }
  // silu * up, residual add, gather rows.
  for (size_t n : {size_t(1), size_t(1000), size_t(70001)}) {
    const std::vector<float> g = rng.vec(n, -30.f, 30.f), u = rng.vec(n);
    std::vector<float> want(n);
    cpu::silu_mul(g.data(), u.data(), 1, int(n), want.data());
    Dev<float> dg(g), du(u), da(n);
    cu::silu_mul(dg.p(), du.p(), n, da.p(), g_stream);
    sync();
    expect_close(fmt("silu_mul n=%zu", n), da.host().data(), want.data(), n, {1e-6, 1e-5});
    expect_guard(fmt("silu_mul n=%zu", n), da);
    std::vector<float> sum(n);
    for (size_t i = 0; i < n; i++) sum[i] = g[i] + u[i];
    cu::residual_add(dg.p(), du.p(), n, g_stream);
    sync();
    expect_close(fmt("residual_add n=%zu", n), dg.host().data(), sum.data(), n, kExact);
  }
  for (int H : {5, 64, 1000}) {
    const int T = 11;
    const std::vector<float> x = rng.vec(size_t(T) * H);
    const std::vector<int32_t> rows = {10, 0, 3, 3};
    std::vector<float> want;
    for (int r : rows) want.insert(want.end(), x.begin() + size_t(r) * H, x.begin() + size_t(r + 1) * H);
    Dev<float> dx(x), out(want.size());
    Dev<int32_t> dr(rows);
    cu::gather_rows(dx.p(), dr.p(), int(rows.size()), H, out.p(), g_stream);
    sync();
    expect_close(fmt("gather_rows H=%d", H), out.host().data(), want.data(), want.size(), kExact);
    expect_guard(fmt("gather_rows H=%d", H), out);
  }
}

// ------------------------------------------------------------------------------------------------
// 2. GEMM

Tol gemm_tol(const std::string& path, int wt, int K) {
  const double grow = std::max(1.0, std::sqrt(K / 576.0));  // fp32 rounding of a K-term sum
  if (path.rfind("cublas-split", 0) == 0 && wt != 0) {
    const int parts = path.back() - '0';
    // Relative precision of x after the split: bf16 keeps 8 bits per part, f16 11.
    const double u = std::pow(2.0, -(wt == 1 ? 8 : 11) * parts - 1);
    return {std::max(1e-4 * grow, 4.0 * u * std::sqrt(double(K))), std::max(1e-4, 4.0 * u)};
  }
  return {1e-4 * grow, 1e-4};
}

void run_gemm_case(Rng& rng, cu::Gemm& gemm, int wt, int T, int K, int N, bool with_bias, const Weights& W,
                   const DevWeights& dW) {
  const std::vector<float> x = rng.vec(size_t(T) * K), bias = rng.vec(N);
  std::vector<float> want(size_t(T) * N);
  // The truth, accumulated in fp64: an fp32 CPU GEMM sums in another order than cuBLAS, and at
  // K = 4096 two fp32 orders alone differ by ~3e-4 on a few outputs (seen on an H200), which is
  // the tolerance itself. Rows converted once (~17 G multiply-adds in all: seconds).
  {
    std::vector<float> wf(size_t(N) * K);
    cpu::convert_row(W.data(), cpu::WType(wt), 0, N * K, wf.data());
    for (int t = 0; t < T; t++)
      for (int n = 0; n < N; n++) {
        double acc = with_bias ? bias[n] : 0.0;
        const float* xr = x.data() + size_t(t) * K;
        const float* wr = wf.data() + size_t(n) * K;
        for (int k = 0; k < K; k++) acc += double(xr[k]) * wr[k];
        want[size_t(t) * N + n] = float(acc);
      }
  }
  Dev<float> dx(x), db(bias);
  const std::string base = fmt("gemm W=%s T=%d K=%d N=%d bias=%d", wname(wt), T, K, N, with_bias);
  // Through the dispatcher (cuBLAS when built with it), then each SIMT kernel directly.
  for (int impl = 0; impl < 3; impl++) {
    if (impl == 1 && T > cu::kSkinnyMaxT) continue;
    Dev<float> y(want.size());
    std::string path;
    if (impl == 0) {
      path = gemm.path(T, wt);
      gemm.run(dx.p(), T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), g_stream);
    } else if (impl == 1) {
      path = "skinny";
      cu::gemm_skinny(dx.p(), T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), g_stream);
    } else {
      path = "tiled";
      cu::gemm_tiled(dx.p(), T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), g_stream);
    }
    sync();
    const std::string what = base + " " + (impl == 0 ? "run:" : "") + path;
    expect_close(what, y.host().data(), want.data(), want.size(), gemm_tol(path, wt, K));
    expect_guard(what, y);
  }
}

void test_gemm(Rng& rng) {
  Section sec("gemm");
  cu::Gemm gemm;
  printf("gemm: %s, activation split %d\n", gemm.has_cublas() ? "cuBLAS for T > 8" : "no cuBLAS (SIMT tiles)",
         gemm.act_split());
  const std::vector<int> Ks = g_quick ? std::vector<int>{8, 30, 100, 576} : std::vector<int>{8, 24, 30, 64, 100, 576, 4096};
  const std::vector<int> Ns = g_quick ? std::vector<int>{1, 17, 130} : std::vector<int>{1, 7, 64, 250, 1000};
  const std::vector<int> Ts =
      g_quick ? std::vector<int>{1, 3, 8, 9, 70} : std::vector<int>{1, 2, 3, 5, 8, 9, 16, 33, 64, 130, 300};
  for (int wt : {0, 1, 2})
    for (int K : Ks)
      for (int N : Ns) {
        const Weights W = random_weights(rng, wt, size_t(N) * K);
        const DevWeights dW(W);
        for (int T : Ts) run_gemm_case(rng, gemm, wt, T, K, N, (T + N) % 2 == 1, W, dW);
      }
  // Model-sized projections (a 7B's q and down widths) in every dtype.
  if (!g_quick)
    for (int wt : {0, 1, 2})
      for (auto [T, K, N] : std::vector<std::array<int, 3>>{{1, 4096, 4096}, {64, 4096, 1024}, {257, 11008, 512}}) {
        const Weights W = random_weights(rng, wt, size_t(N) * K, 0.05f);
        const DevWeights dW(W);
        run_gemm_case(rng, gemm, wt, T, K, N, true, W, dW);
      }
}

// ------------------------------------------------------------------------------------------------
// 3. KV write and paged attention (decode and prefill kernels) against kernels/cpu

struct AttnCase {
  int block_size, group, head_dim, window;
  const char* mix;  // prefill, decode, mixed
  std::vector<int> ctx;
  float q_amp = 1.f;
  float softcap = 0.f;      // Gemma 2's attention logit soft-capping (0 = none)
  int at = 0, kt = 0;       // activation and KV-pool dtypes (cu::kF32 / cu::kBF16)
  int n_pad = 0;            // padding sequences (context 0, as a CUDA graph pads a batch) among the real ones
  std::vector<int> splits;  // decode-kernel split counts (empty: decode_splits(longest span), and 2 more)
};

// A device tensor of activations in dtype at (F32 or BF16 bits), from / to fp32 values.
struct DevAct {
  int at;
  std::unique_ptr<Dev<float>> f;
  std::unique_ptr<Dev<uint16_t>> h;
  DevAct(int at_, const std::vector<float>& v) : at(at_) {
    if (at == cu::kF32) {
      f = std::make_unique<Dev<float>>(v);
    } else {
      std::vector<uint16_t> b(v.size());
      for (size_t i = 0; i < v.size(); i++) b[i] = cpu::f32_to_bf16(v[i]);
      h = std::make_unique<Dev<uint16_t>>(b);
    }
  }
  DevAct(int at_, size_t n) : at(at_) {
    if (at == cu::kF32) f = std::make_unique<Dev<float>>(n);
    else h = std::make_unique<Dev<uint16_t>>(n);
  }
  void* p() const { return f ? static_cast<void*>(f->p()) : static_cast<void*>(h->p()); }
  std::vector<float> host() const {
    if (f) return f->host();
    const std::vector<uint16_t> b = h->host();
    std::vector<float> v(b.size());
    for (size_t i = 0; i < b.size(); i++) v[i] = cpu::bf16_bits(b[i]);
    return v;
  }
  bool intact() const { return f ? f->intact() : h->intact(); }
};

// Values as the device sees them in dtype at (BF16: rounded to nearest even).
std::vector<float> as_dtype(std::vector<float> v, int at) {
  if (at == cu::kBF16)
    for (auto& x : v) x = cpu::bf16_bits(cpu::f32_to_bf16(x));
  return v;
}

// Tolerances of the attention kernels. fp32 activations: summation order only (the KV dtype does
// not matter: both sides read the same BF16 pages exactly). BF16 activations: q is the same BF16 on
// both sides; the output is rounded to BF16 (unit roundoff u = 2^-8 relative: rtol 2u). The
// tensor-core prefill kernel also rounds the probabilities P to BF16 (output error <= u max|v| =
// 2^-8 for |v| <= 1: atol 2^-7 is twice that) and, over an fp32 pool, K and V to BF16 as it stages
// them: each score moves by ~u scale sqrt(sum q_i^2 k_i^2) (random signs), a few u q_amp on the
// output, hence 2^-6 q_amp more.
constexpr double kBiasLimit = 1.0 / 1024;
Tol attn_tol(const AttnCase& c, bool tensor_core) {
  const double base = 2e-5 * std::max(1.f, c.q_amp);
  if (c.at == cu::kF32) return {base, 1e-4};
  if (!tensor_core) return {base + 1e-6, 1.0 / 128};
  return {base + 1.0 / 128 + (c.kt == cu::kF32 ? c.q_amp / 64.0 : 0.0), 1.0 / 128};
}

// BF16 outputs: the element-wise bound above is a worst case (every rounding error aligned) and
// leaves room for systematic errors of the same size (a normaliser off by 1%). Round-to-nearest
// errors are unbiased, so the least-squares scale of got against want, sum(got want) / sum(want^2),
// stays within ~u / sqrt(n) of 1; a systematic error moves it by its own relative size.
void expect_unbiased(const std::string& what, const std::vector<float>& got, const std::vector<float>& want, double lim) {
  double gw = 0, ww = 0;
  for (size_t i = 0; i < got.size(); i++) gw += double(got[i]) * want[i], ww += double(want[i]) * want[i];
  const double dev = ww > 0 ? gw / ww - 1 : 0;
  record(std::fabs(dev) <= lim, what + " [scale bias]", fmt("sum(got want) / sum(want^2) - 1 = %.3g, limit %.3g", dev, lim));
}

void run_attention_case(Rng& rng, const AttnCase& c) {
  const int n_layers = 2, layer = 1, n_kv = 2, n_heads = n_kv * c.group, hd = c.head_dim, bs = c.block_size;
  const std::vector<int>& ctx = c.ctx;
  const int S = int(ctx.size());
  const bool kv16 = c.kt == cu::kBF16;
  const std::string tag =
      fmt("attention bs=%d group=%d hd=%d window=%d mix=%s q_amp=%g softcap=%g ctx=%d..%d act=%s kv=%s%s", bs, c.group,
          hd, c.window, c.mix, c.q_amp, c.softcap, ctx.front(), ctx.back(), wname(c.at), wname(c.kt),
          c.n_pad ? fmt(" pad=%d", c.n_pad).c_str() : "");
  std::vector<int> n_new(S);
  for (int s = 0; s < S; s++) {
    const std::string m = c.mix;
    const int choice = m == "prefill" ? 0 : m == "decode" ? 1 : rng.below(3);
    n_new[s] = choice == 0 ? ctx[s] : choice == 1 ? 1 : std::max(1, ctx[s] / 3);
  }
  std::vector<int> n_blocks(S);
  int total_blocks = 0, max_blocks = 0;
  for (int s = 0; s < S; s++) {
    n_blocks[s] = (ctx[s] + bs - 1) / bs;
    total_blocks += n_blocks[s];
    max_blocks = std::max(max_blocks, n_blocks[s] + 1);
  }
  const int n_pages = total_blocks + 1;
  std::vector<int32_t> page_ids(n_pages);
  for (int i = 0; i < n_pages; i++) page_ids[i] = i;
  rng.shuffle(page_ids);
  const int spare = page_ids.back();  // never written: NaN; also fills unused block-table entries
  std::vector<int32_t> block_tables(size_t(S) * max_blocks, spare);
  for (int s = 0, next = 0; s < S; s++)
    for (int b = 0; b < n_blocks[s]; b++) block_tables[size_t(s) * max_blocks + b] = page_ids[next++];

  // The device batch: the real sequences with c.n_pad padding sequences among them (context 0, one
  // or two tokens each, block-table rows of the never-written page): dev_seq[i] = real index or -1.
  std::vector<int> dev_seq;
  for (int s = 0, pads = 0; s < S || pads < c.n_pad;) {
    if (pads < c.n_pad && (pads <= s || s == S)) dev_seq.push_back(-1), pads++;
    if (s < S) dev_seq.push_back(s++);
  }
  const int DS = int(dev_seq.size());
  std::vector<int32_t> dev_bt(size_t(DS) * max_blocks, spare);
  for (int i = 0; i < DS; i++)
    if (dev_seq[i] >= 0)
      std::copy_n(block_tables.begin() + size_t(dev_seq[i]) * max_blocks, max_blocks, dev_bt.begin() + size_t(i) * max_blocks);
  // Device token rows for per-real-sequence token counts cnt (context cl): rows[] = real token index
  // or -1 (a padding token), and the device query_start / context_lens / token_seq.
  struct DevBatch {
    std::vector<int32_t> qs{0}, cl, ts;
    std::vector<int> rows;
  };
  auto dev_batch = [&](const std::vector<int32_t>& real_qs, const std::vector<int32_t>& real_cl) {
    DevBatch d;
    for (int i = 0, pad_i = 0; i < DS; i++) {
      const int s = dev_seq[i];
      const int n = s >= 0 ? real_qs[s + 1] - real_qs[s] : 1 + (pad_i++ % 2);
      for (int k = 0; k < n; k++) d.rows.push_back(s >= 0 ? real_qs[s] + k : -1), d.ts.push_back(i);
      d.qs.push_back(d.qs.back() + n);
      d.cl.push_back(s >= 0 ? real_cl[s] : 0);
    }
    return d;
  };
  // Rows of x [T_real, width] spread over the device tokens; padding tokens get random values.
  auto spread = [&](const std::vector<float>& x, const std::vector<int>& rows, size_t width) {
    std::vector<float> y(rows.size() * width);
    for (size_t t = 0; t < rows.size(); t++) {
      if (rows[t] >= 0) std::copy_n(x.begin() + size_t(rows[t]) * width, width, y.begin() + t * width);
      else for (size_t i = 0; i < width; i++) y[t * width + i] = rng.uniform(-1.f, 1.f);
    }
    return y;
  };

  cpu::KvLayout L{n_layers, bs, n_kv, hd, 0, kv16};
  const size_t row = size_t(n_kv) * hd;
  L.page_bytes = size_t(n_layers) * L.layer_stride() * L.elem_bytes() + 64;
  cu::KvLayout DL{n_layers, bs, n_kv, hd, L.page_bytes};
  DL.kt = c.kt;
  float pool_fill = canary();
  if (kv16) {  // two BF16 NaNs per float
    const uint32_t bits = 0x7FC17FC1u;
    std::memcpy(&pool_fill, &bits, 4);
  }
  std::vector<float> pool_f(L.page_bytes / 4 * n_pages, pool_fill);
  uint8_t* pool = reinterpret_cast<uint8_t*>(pool_f.data());
  Dev<float> dpool(pool_f);

  // K and V as the activation dtype holds them (the CPU kv_write then rounds to the pool's dtype).
  std::vector<std::vector<float>> K(S), V(S);
  for (int s = 0; s < S; s++) K[s] = as_dtype(rng.vec(ctx[s] * row), c.at), V[s] = as_dtype(rng.vec(ctx[s] * row), c.at);
  Dev<int32_t> dbt(dev_bt);
  std::vector<int32_t> query_start, context_lens;
  for (int step = 0; step < 2; step++) {  // history, then this step's new tokens
    std::vector<int32_t> qs(1, 0), cl;
    std::vector<float> k, v;
    for (int s = 0; s < S; s++) {
      const int p0 = step == 0 ? 0 : ctx[s] - n_new[s], p1 = step == 0 ? ctx[s] - n_new[s] : ctx[s];
      k.insert(k.end(), K[s].begin() + p0 * row, K[s].begin() + p1 * row);
      v.insert(v.end(), V[s].begin() + p0 * row, V[s].begin() + p1 * row);
      qs.push_back(qs.back() + (p1 - p0));
      cl.push_back(p1);
    }
    const cpu::AttnBatch B{S, qs.data(), cl.data(), block_tables.data(), max_blocks, c.window};
    cpu::kv_write(pool, L, layer, B, k.data(), v.data());
    const DevBatch d = dev_batch(qs, cl);
    const int T = d.qs[DS];
    if (T > 0) {
      Dev<int32_t> dqs(d.qs), dcl(d.cl), dts(d.ts);
      DevAct dk(c.at, spread(k, d.rows, row)), dv(c.at, spread(v, d.rows, row));
      const cu::AttnBatch DB{DS, dqs.p(), dcl.p(), dbt.p(), dts.p(), max_blocks, c.window};
      cu::kv_write(reinterpret_cast<uint8_t*>(dpool.p()), DL, layer, DB, T, dk.p(), dv.p(), c.at, g_stream);
      sync();
    }
    query_start = qs, context_lens = cl;
  }
  const std::vector<float> got_pool = dpool.host();
  const bool kv_same = std::memcmp(got_pool.data(), pool_f.data(), pool_f.size() * 4) == 0;
  record(kv_same, tag + " kv_write", "device pool bytes differ from the CPU kv_write's");
  expect_guard(tag + " kv_write", dpool);

  const int T = query_start[S];
  int max_span = 1;
  for (int s = 0; s < S; s++)
    for (int t = query_start[s]; t < query_start[s + 1]; t++) {
      const int pos = context_lens[s] - n_new[s] + (t - query_start[s]);
      max_span = std::max(max_span, c.window > 0 ? std::min(pos + 1, c.window) : pos + 1);
    }
  const std::vector<float> q = as_dtype(rng.vec(size_t(T) * n_heads * hd, -c.q_amp, c.q_amp), c.at);
  const float scale = 1.0f / std::sqrt(float(hd));
  const cpu::AttnBatch B{S, query_start.data(), context_lens.data(), block_tables.data(), max_blocks, c.window, c.softcap};
  std::vector<float> want(q.size());
  cpu::paged_attention(pool, L, layer, B, q.data(), n_heads, scale, want.data());

  const DevBatch d = dev_batch(query_start, context_lens);
  const int DT = d.qs[DS];
  const size_t hrow = size_t(n_heads) * hd;
  std::vector<float> want_dev(size_t(DT) * hrow, 0.f);  // padding tokens: zeros
  for (int t = 0; t < DT; t++)
    if (d.rows[t] >= 0) std::copy_n(want.begin() + size_t(d.rows[t]) * hrow, hrow, want_dev.begin() + size_t(t) * hrow);
  Dev<int32_t> dqs(d.qs), dcl(d.cl), dts(d.ts);
  DevAct dq(c.at, spread(q, d.rows, hrow));
  const cu::AttnBatch DB{DS, dqs.p(), dcl.p(), dbt.p(), dts.p(), max_blocks, c.window, c.softcap};
  if (std::string(c.mix) == "decode" && c.splits.size() > 1) {
    // CUDA-graph replay: one launch (the same arguments, buffers and split count) serves two
    // batches whose context lengths differ only in device memory: first every context halved (the
    // keys are already in the pool), then the real ones written into the same buffer.
    std::vector<int32_t> cl_a = context_lens;
    for (auto& x : cl_a) x = std::max(1, x / 2);
    const cpu::AttnBatch BA{S, query_start.data(), cl_a.data(), block_tables.data(), max_blocks, c.window, c.softcap};
    std::vector<float> want_a(q.size());
    cpu::paged_attention(pool, L, layer, BA, q.data(), n_heads, scale, want_a.data());
    const DevBatch da = dev_batch(query_start, cl_a);
    std::vector<float> want_a_dev(want_dev.size(), 0.f);
    for (int t = 0; t < DT; t++)
      if (d.rows[t] >= 0) std::copy_n(want_a.begin() + size_t(d.rows[t]) * hrow, hrow, want_a_dev.begin() + size_t(t) * hrow);
    const int n_splits = c.splits.back();
    Dev<float> ws(std::max<size_t>(cu::decode_workspace_floats(DT, n_heads, hd, n_splits), 1));
    DevAct out(c.at, want_dev.size());
    for (int replay = 0; replay < 2; replay++) {
      dcl.upload(replay == 0 ? da.cl : d.cl);
      cu::paged_attention_decode(reinterpret_cast<const uint8_t*>(dpool.p()), DL, layer, DB, DT, dq.p(), c.at, n_heads,
                                 scale, n_splits, ws.p(), out.p(), g_stream);
      sync();
      const std::string what = tag + fmt(" decode-kernel replay %d (contexts %s) splits=%d", replay,
                                         replay == 0 ? "halved" : "real", n_splits);
      expect_close(what, out.host().data(), (replay == 0 ? want_a_dev : want_dev).data(), want_dev.size(),
                   attn_tol(c, false));
    }
  }
  {  // decode kernel (any batch): the step's number of splits and forced extra splits, or c.splits
    const Tol tol = attn_tol(c, false);
    std::vector<int> splits = c.splits;
    if (splits.empty()) splits = {cu::decode_splits(max_span), cu::decode_splits(max_span) + 2};
    std::vector<float> first;
    for (int n_splits : splits) {
      Dev<float> ws(std::max<size_t>(cu::decode_workspace_floats(DT, n_heads, hd, n_splits), 1));
      DevAct out(c.at, want_dev.size());
      cu::paged_attention_decode(reinterpret_cast<const uint8_t*>(dpool.p()), DL, layer, DB, DT, dq.p(), c.at, n_heads,
                                 scale, n_splits, ws.p(), out.p(), g_stream);
      sync();
      const std::string what = tag + fmt(" decode-kernel splits=%d", n_splits);
      const std::vector<float> got = out.host();
      expect_close(what, got.data(), want_dev.data(), want_dev.size(), tol);
      if (c.at == cu::kBF16) expect_unbiased(what, got, want_dev, kBiasLimit);
      record(out.intact(), what + " [canary]", "wrote outside its output");
      // The same launch for any split count: equal to the first within fp32 reordering (BF16
      // outputs: within one rounding step).
      if (first.empty()) first = got;
      else if (c.splits.size() > 1)
        expect_close(what + " vs splits=" + std::to_string(splits[0]), got.data(), first.data(), got.size(),
                     c.at == cu::kF32 ? Tol{2e-6, 1e-5} : Tol{1e-6, 1.0 / 64});
    }
  }
  if (cu::prefill_supported(hd)) {
    const bool tc = cu::prefill_path(hd, c.at) == cu::kPrefillWmma;
    const std::vector<int32_t> tiles = cu::make_prefill_tiles(d.qs.data(), DS);
    Dev<int32_t> dtiles(tiles);
    DevAct out(c.at, want_dev.size());
    cu::paged_attention_prefill(reinterpret_cast<const uint8_t*>(dpool.p()), DL, layer, DB, dtiles.p(),
                                int(tiles.size() / 2), dq.p(), c.at, n_heads, scale, out.p(), g_stream);
    sync();
    const std::string what = tag + fmt(" prefill-kernel%s tiles=%zu", tc ? " (tensor cores)" : "", tiles.size() / 2);
    const std::vector<float> got = out.host();
    expect_close(what, got.data(), want_dev.data(), want_dev.size(), attn_tol(c, tc));
    if (c.at == cu::kBF16) expect_unbiased(what, got, want_dev, kBiasLimit);
    record(out.intact(), what + " [canary]", "wrote outside its output");
  }
}

void test_attention(Rng& rng) {
  Section sec("attention");
  const std::vector<int> short_ctx = {1, 15, 16, 17, 70};
  // Every case in fp32 and, with BF16 activations and / or a BF16 pool, in the other three dtype
  // combinations (--quick: one of them per case in turn, and in the main grid only for "mixed",
  // which runs both the prefill-like and the decode-like tokens).
  int turn = 0;
  auto run_dtypes = [&](AttnCase c, bool grid = false) {
    run_attention_case(rng, c);
    if (g_quick && grid && std::string(c.mix) != "mixed") return;
    const int combos[3][2] = {{cu::kF32, cu::kBF16}, {cu::kBF16, cu::kF32}, {cu::kBF16, cu::kBF16}};
    for (int i = 0; i < 3; i++) {
      if (g_quick && i != turn % 3) continue;
      c.at = combos[i][0], c.kt = combos[i][1];
      run_attention_case(rng, c);
    }
    turn++;
  };
  for (int bs : {1, 16})
    for (int group : {1, 4})
      for (int hd : g_quick ? std::vector<int>{24, 100, 130} : std::vector<int>{24, 64, 100, 128, 256, 320})
        for (int window : {0, 8})
          for (const char* mix : {"prefill", "decode", "mixed"})
            run_dtypes({bs, group, hd, window, mix, short_ctx}, true);
  // Long contexts: several decode splits, many prefill key tiles; large scores (the max matters).
  // (The emulator runs a decode-kernel prefill at O(tokens x span) fiber switches: shorter there.)
  for (const char* mix : {"prefill", "decode", "mixed"}) {
    const bool cheap = std::string(mix) == "decode";
    run_dtypes({16, 2, g_quick ? 32 : 128, 0, mix,
                g_quick ? std::vector<int>{cheap ? 1100 : 200, 3} : std::vector<int>{1300, 513, 2}});
  }
  run_dtypes({16, 2, 64, 100, "mixed", g_quick ? std::vector<int>{260, 5} : std::vector<int>{1500, 40}});
  for (int bs : {1, 16}) run_dtypes({bs, 2, 64, 0, "mixed", short_ctx, 30.f});
  // Soft-capped scores (Gemma 2), large enough that the cap clips; Gemma's head_dim 256 among them.
  for (int hd : {24, 64, 256})
    for (int window : {0, 8})
      for (const char* mix : {"prefill", "decode", "mixed"})
        run_dtypes({16, 2, hd, window, mix, short_ctx, 30.f, 2.5f}, hd != 256);
  // GQA group sizes and the tensor-core head dims (multiples of 16, and 72 which is not: the BF16
  // SIMT fallback), chunked prefill mixed with decode, every dtype combination.
  // (--quick: BF16 activations only, the pool's dtype in turn.)
  for (int group : {1, 2, 4, 8})
    for (int hd : {64, 72, 128, 256}) {
      if (g_quick && (group == 2 || group == 8) && hd != 64 && hd != 128) continue;
      for (int at : {cu::kF32, cu::kBF16})
        for (int kt : {cu::kF32, cu::kBF16}) {
          if (g_quick && (at == cu::kF32 || kt != (turn & 1))) continue;
          AttnCase c{16, group, hd, group == 4 ? 8 : 0, "mixed", {1, 17, 40}};
          c.at = at, c.kt = kt;
          run_attention_case(rng, c);
        }
      turn++;
    }
  // Other tensor-core head dims (an odd number of 16-wide chunks; 96 = 6 x 16).
  for (int hd : {80, 96}) {
    AttnCase c{16, hd == 80 ? 4 : 2, hd, hd == 80 ? 8 : 0, "mixed", {1, 17, 40}, 1.f, hd == 96 ? 30.f : 0.f};
    c.at = cu::kBF16, c.kt = hd == 80 ? cu::kF32 : cu::kBF16;
    run_attention_case(rng, c);
  }
  // Groups that do not fill the last block: 6 (tensor cores: a block with 2 idle warps) and 12
  // (decode: a second block of 4 heads per KV head).
  for (int group : {6, 12}) {
    AttnCase c{16, group, 64, 0, "mixed", {2, 17, 40}};
    c.at = cu::kBF16, c.kt = group == 6 ? cu::kBF16 : cu::kF32;
    run_attention_case(rng, c);
    c.at = cu::kF32, c.splits = {1, 3};
    run_attention_case(rng, c);
  }
  // Split-count invariance (the graph-captured launch): the same queries with 1, 3, 8, 32 splits,
  // more splits than some queries have keys, with GQA, a window and soft-capping.
  for (int kt : {cu::kF32, cu::kBF16}) {
    AttnCase c{16, 4, 64, 0, "decode", {3, 40, 300, 129}};
    c.kt = kt, c.splits = {1, 3, 8, 32};
    run_attention_case(rng, c);
    c.window = 50, c.softcap = 30.f, c.q_amp = 2.5f, c.at = cu::kBF16;
    run_attention_case(rng, c);
  }
  // decode_splits_for (the split count of a captured graph): properties over a range of shapes.
  {
    std::string bad;
    for (int T : {1, 3, 16, 64, 256})
      for (int kv : {1, 2, 8})
        for (int cap : {1, 100, 4096, 131072})
          for (int sms : {1, 78, 132}) {
            const int n = cu::decode_splits_for(T, kv, cap, sms);
            const long blocks = long(T) * kv;
            const bool ok = n >= 1 && n <= 64 && (blocks < 2L * sms || n == 1) &&  // never splits a full GPU
                            (n == 1 || cu::decode_partition_len(cap, n) >= cu::kDecodePartition / 2) &&
                            (n == 64 || blocks * n >= 2L * sms || n >= cap / (cu::kDecodePartition / 2));
            if (!ok && bad.empty()) bad = fmt("T=%d kv=%d cap=%d sms=%d -> %d", T, kv, cap, sms, n);
          }
    record(bad.empty(), "attention decode_splits_for: in [1, 64], 1 when the tokens fill the GPU, "
                        "enough blocks unless partitions would get short", bad);
  }
  // Padding sequences (context 0): no KV writes (the pool must equal the CPU's, which never saw
  // them), zeros out of both kernels, with 1 and several splits.
  for (int at : {cu::kF32, cu::kBF16}) {
    AttnCase c{16, 2, 64, 0, "mixed", {5, 33, 70}};
    c.at = at, c.kt = at, c.n_pad = 3, c.splits = {1, 4};
    run_attention_case(rng, c);
    c.mix = "decode", c.n_pad = 1;
    run_attention_case(rng, c);
  }
}

// ------------------------------------------------------------------------------------------------
// 4. LoRA (BGMV, SGMV)

// Adapters for one projection, rows scattered through a byte pool at random 64-byte aligned offsets
// (unused bytes NaN), visible to the CPU kernels and (same bytes, same offsets) to the CUDA ones.
// The device ref table is strided (ref_stride 3, as the backend's [slot][layer][proj] table is),
// with NaN-scaled decoys in between that must never be read.
struct AdapterSet {
  int in, out, n;
  static constexpr int kStride = 3;
  std::vector<uint8_t> pool_h;
  std::vector<cpu::LoraRef> refs;  // [slot]
  std::vector<std::vector<int64_t>> a_rows, b_rows;
  std::unique_ptr<Dev<uint8_t>> pool_d;
  std::unique_ptr<Dev<int64_t>> rows_d;
  std::unique_ptr<Dev<cu::LoraRef>> refs_d;
  AdapterSet(Rng& rng, int in_, int out_, const std::vector<int>& ranks) : in(in_), out(out_), n(int(ranks.size())) {
    refs.resize(n);
    a_rows.resize(n);
    b_rows.resize(n);
    struct Row { int slot, j; bool is_b; };
    std::vector<Row> rows;
    for (int s = 0; s < n; s++)
      for (int j = 0; j < ranks[s]; j++) rows.push_back({s, j, false}), rows.push_back({s, j, true});
    rng.shuffle(rows);
    auto padded = [](int floats) { return (size_t(floats) * 4 + 63) / 64 * 64; };
    std::vector<int64_t> offs(rows.size());
    size_t at = 64 * size_t(rng.below(4));
    for (size_t i = 0; i < rows.size(); i++) {
      offs[i] = int64_t(at);
      at += padded(rows[i].is_b ? out : in) + 64 * size_t(rng.below(3));
    }
    pool_h.assign(at + 64, 0xFF);
    for (int s = 0; s < n; s++) a_rows[s].resize(ranks[s]), b_rows[s].resize(ranks[s]);
    for (size_t i = 0; i < rows.size(); i++) {
      const Row& r = rows[i];
      (r.is_b ? b_rows : a_rows)[r.slot][r.j] = offs[i];
      const int len = r.is_b ? out : in;
      float* dst = reinterpret_cast<float*>(pool_h.data() + offs[i]);
      const float amp = r.is_b ? 0.1f : 1.0f / std::sqrt(float(in));
      for (int k = 0; k < len; k++) dst[k] = rng.uniform(-amp, amp);
    }
    for (int s = 0; s < n; s++) {
      refs[s].rank = ranks[s];
      refs[s].scale = ranks[s] ? rng.uniform(0.25f, 2.f) : 0.f;
      refs[s].a_rows = ranks[s] ? a_rows[s].data() : nullptr;
      refs[s].b_rows = ranks[s] ? b_rows[s].data() : nullptr;
    }
    // Device copies: the pool, one table of all row offsets, and the strided ref table.
    pool_d = std::make_unique<Dev<uint8_t>>(pool_h);
    std::vector<int64_t> all;
    std::vector<size_t> a_at(n), b_at(n);
    for (int s = 0; s < n; s++) {
      a_at[s] = all.size();
      all.insert(all.end(), a_rows[s].begin(), a_rows[s].end());
      b_at[s] = all.size();
      all.insert(all.end(), b_rows[s].begin(), b_rows[s].end());
    }
    all.push_back(0);
    rows_d = std::make_unique<Dev<int64_t>>(all);
    std::vector<cu::LoraRef> dr(size_t(n) * kStride);
    for (auto& r : dr) r = cu::LoraRef{1 << 20, NAN, nullptr, nullptr};  // decoys
    for (int s = 0; s < n; s++) {
      cu::LoraRef& r = dr[size_t(s) * kStride];
      r.rank = ranks[s];
      r.scale = refs[s].scale;
      r.a_rows = ranks[s] ? rows_d->p() + a_at[s] : nullptr;
      r.b_rows = ranks[s] ? rows_d->p() + b_at[s] : nullptr;
    }
    refs_d = std::make_unique<Dev<cu::LoraRef>>(dr);
  }
};

void run_lora_case(Rng& rng, const AdapterSet& A, const std::vector<int32_t>& slot, const std::string& tag) {
  const int T = int(slot.size());
  int batch_rank = 0;
  for (int32_t s : slot) batch_rank = std::max(batch_rank, A.refs[s].rank);
  const std::vector<float> x = rng.vec(size_t(T) * A.in);
  const std::vector<float> y0 = rng.vec(size_t(T) * A.out);
  std::vector<float> want(y0);
  cpu::lora_ref(A.pool_h.data(), A.refs.data(), slot.data(), T, x.data(), A.in, want.data(), A.out);
  const Tol tol{2e-5 * std::max(1.0, std::sqrt(batch_rank / 16.0)), 1e-4};
  Dev<float> dx(x);
  Dev<int32_t> dslot(slot);
  const uint8_t* pool = A.pool_d->p();
  const cu::LoraRef* refs = A.refs_d->p();
  if (batch_rank == 0) batch_rank = 1;  // the backend never launches then; the kernels must still be no-ops
  {
    Dev<float> y(y0), z(size_t(T) * batch_rank);
    cu::lora_shrink_bgmv(pool, refs, AdapterSet::kStride, dslot.p(), T, dx.p(), A.in, z.p(), batch_rank, g_stream);
    cu::lora_expand_bgmv(pool, refs, AdapterSet::kStride, dslot.p(), T, z.p(), batch_rank, y.p(), A.out, g_stream);
    sync();
    expect_close(tag + " bgmv", y.host().data(), want.data(), want.size(), tol);
    expect_guard(tag + " bgmv y", y);
    expect_guard(tag + " bgmv z", z);
  }
  {
    const std::vector<int32_t> tiles = cu::make_sgmv_tiles(slot.data(), T);
    Dev<int32_t> dtiles(tiles.empty() ? std::vector<int32_t>{0} : tiles);
    Dev<float> y(y0), z(size_t(T) * batch_rank);
    const int n_tiles = int(tiles.size() / 3);
    cu::lora_shrink_sgmv(pool, refs, AdapterSet::kStride, dtiles.p(), n_tiles, dx.p(), A.in, z.p(), batch_rank, g_stream);
    cu::lora_expand_sgmv(pool, refs, AdapterSet::kStride, dtiles.p(), n_tiles, z.p(), batch_rank, y.p(), A.out, g_stream);
    sync();
    const std::string what = tag + fmt(" sgmv tiles=%d", n_tiles);
    expect_close(what, y.host().data(), want.data(), want.size(), tol);
    expect_guard(what + " y", y);
    expect_guard(what + " z", z);
  }
}

void test_lora(Rng& rng) {
  Section sec("lora");
  // Slot 0: base model; slot 7: an adapter that does not touch this projection; ranks 1..128 mixed.
  std::vector<int> ranks = {0};
  for (int cycle = 0; cycle < (g_quick ? 1 : 3); cycle++)
    for (int r : {1, 2, 8, 16, 33, 64, 128}) ranks.push_back(r);
  ranks.insert(ranks.begin() + 7, 0);
  const int n_slots = int(ranks.size());
  const std::vector<std::array<int, 2>> widths =
      g_quick ? std::vector<std::array<int, 2>>{{64, 64}, {100, 37}, {576, 130}}
              : std::vector<std::array<int, 2>>{{64, 64}, {576, 192}, {4096, 4096}, {4096, 11008}, {100, 37}};
  for (const auto& wd : widths) {
    const AdapterSet A(rng, wd[0], wd[1], ranks);
    const std::string base = fmt("lora in=%d out=%d", A.in, A.out);
    auto run = [&](const char* mix, const std::vector<int32_t>& slot) {
      std::string ids;
      for (size_t i = 0; i < slot.size() && i < 16; i++) ids += fmt("%s%d", i ? "," : "", slot[i]);
      run_lora_case(rng, A, slot,
                    base + fmt(" mix=%s T=%zu slots=[%s%s]", mix, slot.size(), ids.c_str(), slot.size() > 16 ? ",..." : ""));
    };
    // identical: every token on one adapter, each adapter in turn (and the base model).
    for (int s = 0; s < n_slots; s++) run("identical", std::vector<int32_t>(g_quick ? 5 : 40, s));
    // distinct: every token its own adapter.
    std::vector<int32_t> distinct;
    for (int s = 1; s < n_slots; s++) distinct.push_back(s);
    rng.shuffle(distinct);
    run("distinct", distinct);
    // uniform over all slots (base included).
    std::vector<int32_t> uni(g_quick ? 24 : 64);
    for (auto& s : uni) s = rng.below(n_slots);
    run("uniform", uni);
    // skewed: zipf-like (p ~ 1/k^1.5) over a random ordering of the adapters; sorted by slot as the
    // scheduler orders a batch (long SGMV segments), and unsorted.
    std::vector<double> cdf;
    double acc = 0;
    for (size_t k = 0; k < distinct.size(); k++) cdf.push_back(acc += 1.0 / std::pow(double(k + 1), 1.5));
    std::vector<int32_t> skew(g_quick ? 40 : 100);
    for (auto& s : skew) {
      const size_t k = std::lower_bound(cdf.begin(), cdf.end(), rng.uniform(0.f, 1.f) * acc) - cdf.begin();
      s = distinct[std::min(k, distinct.size() - 1)];
    }
    run("skewed", skew);
    std::sort(skew.begin(), skew.end());
    run("skewed-sorted", skew);
    // base-heavy, and prefill-like runs (one adapter in two non-adjacent segments, longer than a tile).
    std::vector<int32_t> based(48);
    for (auto& s : based) s = rng.below(10) < 4 ? 0 : 1 + rng.below(n_slots - 1);
    run("with-base", based);
    std::vector<int32_t> runs;
    auto add = [&](int s, int k) { runs.insert(runs.end(), k, s); };
    add(3, g_quick ? 35 : 70), add(0, 5), add(7, 3), add(n_slots - 1, 33), add(3, 1), add(1, 2);
    run("runs", runs);
  }
}

// ------------------------------------------------------------------------------------------------
// 5. The whole backend: CudaBackend vs CpuBackend on small random models with adapters

struct TinyModel {
  std::shared_ptr<Model> model;
  std::vector<Weights> store;  // keeps weight bytes alive
};

const void* keep(TinyModel& tm, Weights w) {
  tm.store.push_back(std::move(w));
  return tm.store.back().data();
}

TinyModel make_tiny_model(Rng& rng, const std::string& arch, int wt, int hidden, int inter, int layers, int heads,
                          int kv_heads, int head_dim, int vocab, bool tied, bool bias, int window, RopeType rope) {
  TinyModel tm;
  tm.store.reserve(size_t(layers) * 8 + 4);
  auto m = std::make_shared<Model>();
  ModelSpec& s = m->spec;
  s.arch = arch;
  s.hidden = hidden, s.intermediate = inter, s.n_layers = layers, s.n_heads = heads, s.n_kv_heads = kv_heads;
  s.head_dim = head_dim, s.vocab = vocab, s.rms_eps = 1e-5f, s.rope_theta = 10000.f, s.rope_type = rope;
  s.rope_factor = 2.f, s.tied_embeddings = tied, s.attn_bias = bias, s.sliding_window = window;
  auto weight = [&](int rows, int cols, float amp) {
    Weight w;
    w.data = keep(tm, random_weights(rng, wt, size_t(rows) * cols, amp));
    w.type = cpu::WType(wt);
    w.rows = rows, w.cols = cols;
    return w;
  };
  m->embed = weight(vocab, hidden, 1.f);
  m->lm_head = tied ? m->embed : weight(vocab, hidden, 1.f / std::sqrt(float(hidden)));
  m->final_norm = rng.vec(hidden, 0.8f, 1.2f);
  m->layers.resize(layers);
  for (int l = 0; l < layers; l++) {
    Layer& L = m->layers[l];
    L.attn_norm = rng.vec(hidden, 0.8f, 1.2f);
    L.mlp_norm = rng.vec(hidden, 0.8f, 1.2f);
    for (int p = 0; p < kNumProj; p++) L.proj[p] = weight(m->proj_out(p), m->proj_in(p), 1.f / std::sqrt(float(m->proj_in(p))));
    if (bias) L.q_bias = rng.vec(m->q_dim(), -0.5f, 0.5f), L.k_bias = rng.vec(m->kv_dim(), -0.5f, 0.5f),
              L.v_bias = rng.vec(m->kv_dim(), -0.5f, 0.5f);
  }
  m->inv_freq.resize(head_dim / 2);
  for (int i = 0; i < head_dim / 2; i++)
    m->inv_freq[i] = 1.0f / std::pow(s.rope_theta, float(2 * i) / float(head_dim)) / (rope == RopeType::Linear ? 2.f : 1.f);
  tm.model = m;
  return tm;
}

// The family features of issue #16 on top of a tiny model (model.h ModelSpec): "qk-norm" (Qwen3),
// "gemma2" (sandwich norms, GeGLU, embed scale, query_pre_attn_scalar, both soft-caps, alternating
// windows), "gemma3" (q/k norm, sandwich norms, GeGLU, pattern windows, a local RoPE base),
// "partial-rotary" (half the head rotates).
void add_family(Rng& rng, TinyModel& tm, const std::string& fam) {
  Model& m = *tm.model;
  ModelSpec& s = m.spec;
  const int hd = s.head_dim;
  if (fam == "qk-norm" || fam == "gemma3") {
    s.qk_norm = true;
    for (Layer& L : m.layers) L.q_norm = rng.vec(hd, 0.8f, 1.2f), L.k_norm = rng.vec(hd, 0.8f, 1.2f);
  }
  if (fam == "gemma2" || fam == "gemma3") {
    s.sandwich_norm = true;
    s.act = Activation::GeluTanh;
    s.embed_scale = float(std::sqrt(double(s.hidden)));
    s.attn_scale = float(std::pow(24.0, -0.5));
    for (Layer& L : m.layers) L.post_attn_norm = rng.vec(s.hidden, 0.8f, 1.2f), L.post_mlp_norm = rng.vec(s.hidden, 0.8f, 1.2f);
    s.layer_windows.clear();
    for (int l = 0; l < s.n_layers; l++)
      s.layer_windows.push_back(fam == "gemma2" ? ((l + 1) % 2 ? 6 : 0) : ((l + 1) % 3 ? 6 : 0));
    s.sliding_window = 6;
  }
  if (fam == "gemma2") s.attn_softcap = 5.f, s.final_softcap = 8.f;
  if (fam == "gemma3") {
    s.rope_local_theta = 10000.f;
    for (int l = 0; l < s.n_layers; l++) s.layer_local_rope.push_back(s.layer_windows[l] != 0);
    m.inv_freq_local.resize(hd / 2);
    for (int i = 0; i < hd / 2; i++) m.inv_freq_local[i] = 1.0f / std::pow(10000.f, float(2 * i) / float(hd));
    for (auto& f : m.inv_freq) f *= 0.01f;  // a different global base
  }
  if (fam == "partial-rotary" || fam == "phi3-longrope") {
    s.rotary_dim = fam == "phi3-longrope" ? hd * 3 / 4 : hd / 2;
    const int half = s.rotary_dim / 2;
    m.inv_freq.resize(half);
    for (int i = 0; i < half; i++) m.inv_freq[i] = 1.0f / std::pow(s.rope_theta, float(2 * i) / float(s.rotary_dim));
  }
  if (fam == "phi3-longrope") {  // the long factors for some sequences of a step (StepBatch::rope_long)
    s.rope_type = RopeType::LongRope;
    s.fused_qkv = s.fused_gate_up = true;  // adapters share A across q/k/v and gate/up (run_backend_case)
    s.sliding_window = 7;
    m.inv_freq_long = m.inv_freq;
    for (size_t i = 0; i < m.inv_freq_long.size(); i++) m.inv_freq_long[i] /= 1.0f + float(i);
    m.attn_scaling = 1.18f;
  }
}

// fused: k and v share q's A rows, up shares gate's (when the adapter has the lead projection).
std::shared_ptr<ParsedAdapter> make_adapter(Rng& rng, const Model& m, size_t page_bytes, const std::vector<int>& projs,
                                            int rank, int skip_layer = -1, bool fused = false) {
  std::vector<LoraModuleF32> mods;
  for (int l = 0; l < m.spec.n_layers; l++) {
    if (l == skip_layer) continue;
    for (int p : projs) {
      LoraModuleF32 mod;
      mod.layer = l, mod.proj = p, mod.rank = rank, mod.scale = rng.uniform(0.5f, 2.f);
      const int lead = fused ? (p == kK || p == kV ? kQ : p == kUp ? kGate : -1) : -1;
      for (size_t j = 0; lead >= 0 && j < mods.size(); j++)
        if (mods[j].layer == l && mods[j].proj == lead && mods[j].a_from < 0) mod.a_from = int(j);
      if (mod.a_from < 0) mod.a = rng.vec(size_t(rank) * m.proj_in(p), -0.3f, 0.3f);
      mod.bt = rng.vec(size_t(rank) * m.proj_out(p), -0.3f, 0.3f);
      mods.push_back(std::move(mod));
    }
  }
  return pack_adapter(mods, page_bytes, sizeof(float));
}

// One sequence of the scripted conversation: its tokens, adapter slot and pages.
struct SeqState {
  std::vector<int32_t> tokens;  // all tokens so far (prompt + generated)
  int done = 0;                 // tokens already in the KV cache
  int slot = 0;
  std::vector<int32_t> pages;
};

void run_backend_case(Rng& rng, const std::string& name, TinyModel& tm) {
  const Model& m = *tm.model;
  const int block_size = 4, max_slots = 5;
  // Pages: 3 adapters, then KV. Adapter pages come from the pool like KV pages do.
  const size_t page_bytes = kv_page_bytes(m.spec, block_size);
  std::vector<std::shared_ptr<ParsedAdapter>> ads;
  // Fused targets (Phi-3): k and v take q's A rows, up takes gate's (LoraModule::a_from).
  const bool fused = m.spec.fused_qkv;
  ads.push_back(make_adapter(rng, m, page_bytes, {kQ, kV}, 8, -1, fused));
  ads.push_back(make_adapter(rng, m, page_bytes, {kQ, kK, kV, kO, kGate, kUp, kDown}, 33, 1, fused));
  ads.push_back(make_adapter(rng, m, page_bytes, {kO, kDown}, 1, -1, fused));
  int num_pages = 0;
  std::vector<std::vector<int32_t>> ad_pages;
  for (auto& a : ads) {
    const int np = a->num_pages();
    std::vector<int32_t> pg;
    for (int i = 0; i < np; i++) pg.push_back(num_pages + 2 * i);  // non-contiguous: every other page
    num_pages += 2 * np;
    ad_pages.push_back(pg);
  }
  std::vector<int32_t> moved_pages;  // adapter 2 reinstalled mid-run into another slot, on other pages
  for (int i = 0; i < ads[1]->num_pages(); i++) moved_pages.push_back(num_pages++);
  const int kv_first = num_pages;
  num_pages += 64;
  std::unique_ptr<Backend> cpu_be = make_cpu_backend(tm.model, block_size, num_pages, max_slots);
  std::unique_ptr<Backend> gpu_be;
  try {
    gpu_be = make_cuda_backend(tm.model, block_size, num_pages, max_slots);
  } catch (const std::exception& e) {
    record(false, name + " make_cuda_backend", e.what());
    return;
  }
  record(gpu_be->pool().page_bytes == cpu_be->pool().page_bytes && gpu_be->name() == "cuda",
         name + " pool geometry", "page_bytes or name differ");
  for (int i = 0; i < 3; i++) {
    cpu_be->install_adapter(i + 1, *ads[i], ad_pages[i]);
    gpu_be->install_adapter(i + 1, *ads[i], ad_pages[i]);
  }

  std::vector<SeqState> seqs(5);
  int next_page = kv_first;
  const int prompt_len[] = {11, 3, 1, 7, 21};
  const int slots[] = {0, 1, 2, 3, 1};
  for (int i = 0; i < 5; i++) {
    for (int k = 0; k < prompt_len[i]; k++) seqs[i].tokens.push_back(rng.below(m.spec.vocab));
    seqs[i].slot = slots[i];
  }
  const Tol tol = {m.embed.type == cpu::WType::F32 ? 2e-4 : 5e-4, 2e-4};
  // Steps: chunked prefill of some sequences while others decode, then decode-only steps; the
  // scheduler's order (by adapter slot) is mimicked in some steps and broken in others.
  const std::vector<std::vector<std::pair<int, int>>> script = {
      {{0, 6}, {1, 3}},                  // chunked prefill of 0, full prefill of 1
      {{0, 5}, {1, 1}, {2, 1}, {4, 8}},  // rest of 0, decode 1, prefill 2 (1 token), chunk of 4
      {{4, 13}, {3, 7}, {0, 1}},         // finish 4 (17 tokens), prefill 3, decode 0
      {{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}},
      {{1, 1}, {4, 1}, {0, 1}, {2, 1}, {3, 1}},  // decode, slots unsorted
      {{2, 1}, {3, 1}},
  };
  for (size_t st = 0; st < script.size(); st++) {
    if (st == 4) {  // swap adapter 2 (slot 2) out and back into slot 4 on other pages, mid-run
      cpu_be->remove_adapter(2);
      gpu_be->remove_adapter(2);
      for (auto& sq : seqs)
        if (sq.slot == 2) sq.slot = 4;
      cpu_be->install_adapter(4, *ads[1], moved_pages);
      gpu_be->install_adapter(4, *ads[1], moved_pages);
    }
    StepBatch b;
    b.query_start.push_back(0);
    int max_blocks = 0;
    for (auto [i, n] : script[st]) {
      SeqState& sq = seqs[i];
      while (int(sq.tokens.size()) < sq.done + n) sq.tokens.push_back(rng.below(m.spec.vocab));  // "sampled"
      for (int k = 0; k < n; k++) {
        b.tokens.push_back(sq.tokens[sq.done + k]);
        b.positions.push_back(sq.done + k);
        b.token_slots.push_back(sq.slot);
      }
      sq.done += n;
      while (int(sq.pages.size()) * block_size < sq.done) sq.pages.push_back(next_page++);
      b.query_start.push_back(int(b.tokens.size()));
      b.context_lens.push_back(sq.done);
      max_blocks = std::max(max_blocks, int(sq.pages.size()));
    }
    b.n_tokens = int(b.tokens.size());
    b.n_seqs = int(script[st].size());
    b.max_blocks = max_blocks + 1;
    b.block_tables.assign(size_t(b.n_seqs) * b.max_blocks, 0);
    if (!m.inv_freq_long.empty())  // LongRoPE: sequences 1 and 4 past the original context
      for (auto [i, n] : script[st]) b.rope_long.push_back(i == 1 || i == 4);
    for (int s = 0; s < b.n_seqs; s++) {
      const SeqState& sq = seqs[script[st][s].first];
      std::copy(sq.pages.begin(), sq.pages.end(), b.block_tables.begin() + size_t(s) * b.max_blocks);
      if (s % 2 == 0 || st == 5) b.sample_seqs.push_back(s);
    }
    const size_t V = size_t(m.spec.vocab), n = b.sample_seqs.size();
    std::vector<float> want(n * V), got(n * V, canary());
    cpu_be->forward(b, want.data());
    try {
      gpu_be->forward(b, got.data());
    } catch (const std::exception& e) {
      record(false, name + fmt(" step %zu forward", st), e.what());
      return;
    }
    expect_close(name + fmt(" step %zu (T=%d, S=%d) logits", st, b.n_tokens, b.n_seqs), got.data(), want.data(),
                 want.size(), tol);
  }
  if (next_page > num_pages) record(false, name + " test bug: more pages than the pool", "");
}

void test_backend(Rng& rng) {
  Section sec("backend");
  for (int wt : {0, 1, 2}) {
    {
      TinyModel tm = make_tiny_model(rng, "llama", wt, 64, 96, 2, 4, 2, 16, 97, false, false, 0, RopeType::None);
      run_backend_case(rng, fmt("backend llama-gqa %s", wname(wt)), tm);
    }
    {
      TinyModel tm = make_tiny_model(rng, "qwen2", wt, 48, 80, 2, 2, 1, 24, 61, true, true, 0, RopeType::Linear);
      run_backend_case(rng, fmt("backend qwen2-tied-bias %s", wname(wt)), tm);
    }
    {
      TinyModel tm = make_tiny_model(rng, "mistral", wt, 32, 64, 3, 2, 2, 24, 50, false, false, 6, RopeType::None);
      run_backend_case(rng, fmt("backend mistral-window %s", wname(wt)), tm);
    }
    // The families of issue #16, on the same scripted steps.
    for (const char* fam : {"qk-norm", "gemma2", "gemma3", "partial-rotary", "phi3-longrope"}) {
      const std::string f = fam;
      const std::string arch = f == "qk-norm" ? "qwen3" : f == "partial-rotary" ? "llama" : f == "phi3-longrope" ? "phi3" : f;
      TinyModel tm = make_tiny_model(rng, arch, wt, 48, 80, 3, 4, 2, 16, 61, f != "partial-rotary" && f != "phi3-longrope", false, 0,
                                     f == "gemma3" ? RopeType::Linear : RopeType::None);
      add_family(rng, tm, f);
      run_backend_case(rng, fmt("backend %s %s", fam, wname(wt)), tm);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string only;
#ifdef LORAPLEX_CUDA_EMU
  g_quick = true;
#endif
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--quick") g_quick = true;
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else {
      fprintf(stderr, "usage: %s [--quick] [--only elementwise|gemm|attention|lora|backend]\n", argv[0]);
      return 2;
    }
  }
  std::string why;
  if (!cuda_device_available(&why)) {
    printf("SKIPPED: no CUDA device (%s)\n", why.c_str());
    printf("0 passed, 0 failed, 1 skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  int dev = 0;
  cudaGetDevice(&dev);
  cudaGetDeviceProperties(&prop, dev);
  printf("device: %s (sm_%d%d)%s\n", prop.name, prop.major, prop.minor, g_quick ? ", quick shapes" : "");
  ck(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  Rng rng(20240607);
  struct { const char* name; void (*fn)(Rng&); } sections[] = {
      {"elementwise", test_elementwise}, {"gemm", test_gemm}, {"attention", test_attention},
      {"lora", test_lora}, {"backend", test_backend}};
  for (auto& s : sections) {
    if (!only.empty() && only != s.name) continue;
    try {
      s.fn(rng);
    } catch (const std::exception& e) {
      record(false, std::string(s.name) + " threw", e.what());
    }
  }
  cudaStreamDestroy(g_stream);
  printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
