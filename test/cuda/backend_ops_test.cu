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
#include <tuple>
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

// BF16 activations (--compute-dtype bfloat16): the same ops on BF16 inputs and outputs (the residual
// stream stays fp32). Oracle: the CPU op on the BF16 inputs (decoded exactly), its result rounded
// to BF16; the device's fp32 math differs from the CPU's by a few fp32 ulps, which can move the
// final rounding by one BF16 ulp (2^-8 .. 2^-7 relative): tolerance 2^-7 relative.
std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); i++) h[i] = cpu::f32_to_bf16(v[i]);
  return h;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& h) {
  std::vector<float> v(h.size());
  for (size_t i = 0; i < h.size(); i++) v[i] = cpu::bf16_to_f32(h[i]);
  return v;
}
std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = cpu::bf16_to_f32(cpu::f32_to_bf16(x));
  return v;
}
const Tol kBf16Tol{1e-6, 1.0 / 128 + 1e-5};

void test_elementwise_bf16(Rng& rng) {
  Section sec("elementwise-bf16");
  const int B = cu::kBF16, F = cu::kF32;
  // rmsnorm: fp32 residual x += BF16 delta, BF16 output; BF16 in place (q/k norm, sandwich norm);
  // fp32 rows to BF16 (the final norm before the lm_head).
  for (int H : {1, 64, 896, 4096})
    for (int T : {1, 3, 17}) {
      const std::vector<float> x = rng.vec(size_t(T) * H, -3.f, 3.f), w = rng.vec(H, 0.5f, 1.5f);
      const std::vector<uint16_t> d16 = to_bf16(rng.vec(size_t(T) * H));
      const std::vector<float> d = from_bf16(d16);
      const float eps = 1e-6f;
      {  // x fp32 (+ delta BF16) -> y BF16
        std::vector<float> xs = x, want(x.size());
        for (size_t i = 0; i < xs.size(); i++) xs[i] += d[i];
        cpu::rmsnorm(xs.data(), w.data(), T, H, eps, want.data());
        Dev<float> dx(x), dw(w);
        Dev<uint16_t> dd(d16), dy(x.size());
        cu::rmsnorm(dx.p(), dd.p(), dw.p(), T, H, eps, dy.p(), g_stream, F, B, B);
        sync();
        const std::string what = fmt("rmsnorm bf16 T=%d H=%d +residual", T, H);
        expect_close(what, from_bf16(dy.host()).data(), round_bf16(want).data(), want.size(), kBf16Tol);
        expect_close(what + " (fp32 residual written back)", dx.host().data(), xs.data(), xs.size(), kExact);
        expect_guard(what, dy);
      }
      {  // BF16 in place
        const std::vector<uint16_t> x16 = to_bf16(x);
        const std::vector<float> xd = from_bf16(x16);
        std::vector<float> want(x.size());
        cpu::rmsnorm(xd.data(), w.data(), T, H, eps, want.data());
        Dev<uint16_t> dx(x16);
        Dev<float> dw(w);
        cu::rmsnorm(dx.p(), nullptr, dw.p(), T, H, eps, dx.p(), g_stream, B, B, B);
        sync();
        const std::string what = fmt("rmsnorm bf16 T=%d H=%d in place", T, H);
        expect_close(what, from_bf16(dx.host()).data(), round_bf16(want).data(), want.size(), kBf16Tol);
        expect_guard(what, dx);
      }
    }
  // rope on BF16 q and k (also partial rotary and LongRoPE's per-token factors).
  for (auto [hd, rot] : std::vector<std::pair<int, int>>{{64, 64}, {128, 128}, {96, 72}, {256, 256}}) {
    const int T = 9, nq = 4, nk = 2, half = rot / 2;
    std::vector<float> inv(half), inv_long(half);
    for (int i = 0; i < half; i++) inv[i] = 1.0f / std::pow(500000.f, float(2 * i) / float(rot)), inv_long[i] = inv[i] / (1.f + i);
    std::vector<int32_t> pos(T), alt(T);
    for (int t = 0; t < T; t++) pos[t] = t < 3 ? t : rng.below(131072), alt[t] = rng.below(2);
    const std::vector<uint16_t> q16 = to_bf16(rng.vec(size_t(T) * nq * hd)), k16 = to_bf16(rng.vec(size_t(T) * nk * hd));
    std::vector<float> wq = from_bf16(q16), wk = from_bf16(k16), cs(size_t(T) * half), sn(size_t(T) * half), cl(cs.size()), sl(sn.size());
    cpu::rope_table(pos.data(), T, inv.data(), half, 1.0f, cs.data(), sn.data());
    cpu::rope_table(pos.data(), T, inv_long.data(), half, 1.0f, cl.data(), sl.data());
    for (int t = 0; t < T; t++)
      if (alt[t])
        for (int i = 0; i < half; i++) cs[size_t(t) * half + i] = cl[size_t(t) * half + i], sn[size_t(t) * half + i] = sl[size_t(t) * half + i];
    cpu::rope_apply(wq.data(), T, nq, hd, cs.data(), sn.data(), rot);
    cpu::rope_apply(wk.data(), T, nk, hd, cs.data(), sn.data(), rot);
    Dev<uint16_t> dq(q16), dk(k16);
    Dev<float> dinv(inv), dlong(inv_long);
    Dev<int32_t> dpos(pos), dalt(alt);
    cu::rope(dq.p(), nq, dk.p(), nk, T, hd, dpos.p(), dinv.p(), 1.0f, g_stream, rot, dlong.p(), dalt.p(), B);
    sync();
    const std::string what = fmt("rope bf16 hd=%d rot=%d", hd, rot);
    // Angles to ~1e5 rad: the host's and device's cosf may differ by an ulp before the rounding.
    expect_close(what + " q", from_bf16(dq.host()).data(), round_bf16(wq).data(), wq.size(), {1e-5, 1.0 / 128 + 1e-5});
    expect_close(what + " k", from_bf16(dk.host()).data(), round_bf16(wk).data(), wk.size(), {1e-5, 1.0 / 128 + 1e-5});
    expect_guard(what, dq);
    expect_guard(what, dk);
  }
  // SwiGLU / GeGLU on BF16 (in place over gate, as the backend runs them), residual add of a BF16
  // delta into the fp32 stream.
  for (size_t n : {size_t(1), size_t(1000), size_t(70001)}) {
    const std::vector<uint16_t> g16 = to_bf16(rng.vec(n, -8.f, 8.f)), u16 = to_bf16(rng.vec(n));
    const std::vector<float> g = from_bf16(g16), u = from_bf16(u16);
    for (int act = 0; act < 2; act++) {
      std::vector<float> want(n);
      if (act == 0) cpu::silu_mul(g.data(), u.data(), 1, int(n), want.data());
      else cpu::gelu_tanh_mul(g.data(), u.data(), 1, int(n), want.data());
      Dev<uint16_t> dg(g16), du(u16);
      if (act == 0) cu::silu_mul(dg.p(), du.p(), n, dg.p(), g_stream, B);
      else cu::gelu_tanh_mul(dg.p(), du.p(), n, dg.p(), g_stream, B);
      sync();
      const std::string what = fmt("%s bf16 n=%zu", act == 0 ? "silu_mul" : "gelu_tanh_mul", n);
      // gelu: the CPU's tanh_fast is within ~1e-6 of tanhf before the rounding.
      expect_close(what, from_bf16(dg.host()).data(), round_bf16(want).data(), n, {1e-5, 1.0 / 128 + 1e-5});
      expect_guard(what, dg);
    }
    const std::vector<float> x = rng.vec(n);
    std::vector<float> sum(n);
    for (size_t i = 0; i < n; i++) sum[i] = x[i] + u[i];
    Dev<float> dx(x);
    Dev<uint16_t> du(u16);
    cu::residual_add(dx.p(), du.p(), n, g_stream, B);
    sync();
    expect_close(fmt("residual_add bf16 delta n=%zu", n), dx.host().data(), sum.data(), n, kExact);
    expect_guard(fmt("residual_add bf16 delta n=%zu", n), dx);
  }
}

// ------------------------------------------------------------------------------------------------
// 2. GEMM

// BF16 helpers for activations: to_bf16 / from_bf16 / round_bf16 above (cpu::f32_to_bf16's rounding).
const char* aname(int t) { return t == 0 ? "F32" : "BF16"; }

// A device activation tensor of dtype t (F32 or BF16) with canaries; values given as fp32 (exact
// for BF16 when they were rounded first).
struct Act {
  int t;
  std::unique_ptr<Dev<float>> f;
  std::unique_ptr<Dev<uint16_t>> h;
  Act(int t_, size_t n) : t(t_) {
    if (t == 0) f = std::make_unique<Dev<float>>(n);
    else h = std::make_unique<Dev<uint16_t>>(n);
  }
  Act(int t_, const std::vector<float>& v) : t(t_) {
    if (t == 0) f = std::make_unique<Dev<float>>(v);
    else h = std::make_unique<Dev<uint16_t>>(to_bf16(v));
  }
  void* p() const { return t == 0 ? static_cast<void*>(f->p()) : static_cast<void*>(h->p()); }
  std::vector<float> host() const { return t == 0 ? f->host() : from_bf16(h->host()); }
  void guard(const std::string& what) const {
    if (t == 0) expect_guard(what, *f);
    else expect_guard(what, *h);
  }
};

// One BF16 ulp relative to the value (7 stored bits): the bound for a result rounded once to BF16
// against the rounded truth (the two may round to neighbours when the fp32 sum is near a tie).
constexpr double kBf16Ulp = 1.0 / 128;

Tol gemm_tol(const std::string& path, int wt, int K, int yt) {
  const double grow = std::max(1.0, std::sqrt(K / 576.0));  // fp32 rounding of a K-term sum
  Tol t{1e-4 * grow, 1e-4};
  if (path.rfind("cublas-split", 0) == 0 && wt != 0) {
    const int parts = path.back() - '0';
    // Relative precision of x after the split: bf16 keeps 8 bits per part, f16 11.
    const double u = std::pow(2.0, -(wt == 1 ? 8 : 11) * parts - 1);
    t = {std::max(1e-4 * grow, 4.0 * u * std::sqrt(double(K))), std::max(1e-4, 4.0 * u)};
  }
  // "cublaslt-bf16", "skinny", "tiled" with BF16 x: exact products of the BF16 values, fp32 sums.
  if (yt == 1) t.rtol += kBf16Ulp;
  return t;
}

// The truth, accumulated in fp64 on the values the kernels see (x already BF16-rounded for BF16
// activations): an fp32 CPU GEMM sums in another order than cuBLAS, and at K = 4096 two fp32 orders
// alone differ by ~3e-4 on a few outputs (seen on an H200), which is the tolerance itself. For BF16
// outputs the truth is rounded to BF16 once, as the kernels do.
std::vector<float> gemm_truth(const std::vector<float>& x, int T, int K, const Weights& W, int N,
                              const std::vector<float>* bias, int yt) {
  std::vector<float> wf(size_t(N) * K), want(size_t(T) * N);
  cpu::convert_row(W.data(), cpu::WType(W.t), 0, N * K, wf.data());
  for (int t = 0; t < T; t++)
    for (int n = 0; n < N; n++) {
      double acc = bias ? (*bias)[n] : 0.0;
      const float* xr = x.data() + size_t(t) * K;
      const float* wr = wf.data() + size_t(n) * K;
      for (int k = 0; k < K; k++) acc += double(xr[k]) * wr[k];
      want[size_t(t) * N + n] = float(acc);
    }
  return yt == 1 ? round_bf16(want) : want;
}

void run_gemm_case(Rng& rng, cu::Gemm& gemm, int xt, int wt, int yt, int T, int K, int N, bool with_bias,
                   const Weights& W, const DevWeights& dW) {
  std::vector<float> x = rng.vec(size_t(T) * K);
  if (xt == 1) x = round_bf16(x);
  const std::vector<float> bias = rng.vec(N);
  const std::vector<float> want = gemm_truth(x, T, K, W, N, with_bias ? &bias : nullptr, yt);
  Act dx(xt, x);
  Dev<float> db(bias);
  const std::string base = fmt("gemm x=%s W=%s y=%s T=%d K=%d N=%d bias=%d", aname(xt), wname(wt), aname(yt), T, K, N,
                               with_bias);
  // Through the dispatcher (cuBLAS / cuBLASLt when built with it), then each SIMT kernel directly.
  for (int impl = 0; impl < 3; impl++) {
    if (impl == 1 && T > cu::kSkinnyMaxT) continue;
    Act y(yt, want.size());
    std::string path;
    if (impl == 0) {
      path = gemm.path(T, xt, wt, yt);
      gemm.run(dx.p(), xt, T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), yt, g_stream);
    } else if (impl == 1) {
      path = "skinny";
      cu::gemm_skinny(dx.p(), xt, T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), yt, g_stream);
    } else {
      path = "tiled";
      cu::gemm_tiled(dx.p(), xt, T, K, dW.p, wt, N, with_bias ? db.p() : nullptr, y.p(), yt, g_stream);
    }
    sync();
    const std::string what = base + " " + (impl == 0 ? "run:" : "") + path;
    expect_close(what, y.host().data(), want.data(), want.size(), gemm_tol(path, wt, K, yt));
    y.guard(what);
  }
}

// The skinny kernel's split-K: every split count (auto, none, 2, 5) against the truth, split-K
// really splitting, and a split run repeated giving the same bits (the partial sums are reduced
// in a fixed order).
void run_skinny_split_case(Rng& rng, int xt, int wt, int yt, int T, int K, int N) {
  const Weights W = random_weights(rng, wt, size_t(N) * K, 0.5f);
  const DevWeights dW(W);
  std::vector<float> x = rng.vec(size_t(T) * K);
  if (xt == 1) x = round_bf16(x);
  const std::vector<float> bias = rng.vec(N);
  const std::vector<float> want = gemm_truth(x, T, K, W, N, &bias, yt);
  Act dx(xt, x);
  Dev<float> db(bias);
  const std::string base =
      fmt("gemm_skinny split-K x=%s W=%s y=%s T=%d K=%d N=%d", aname(xt), wname(wt), aname(yt), T, K, N);
  std::vector<float> first;
  for (int split : {0, 1, 2, 5, 5}) {
    const int used = cu::gemm_skinny_splits(T, K, N, split);
    if (split > 1) record(used == std::min(split, (K + 7) / 8), fmt("%s split_k=%d splits", base.c_str(), split),
                          fmt("gemm_skinny_splits gave %d", used));
    cu::gemm_skinny_reserve(T, K, N, split);
    Act y(yt, want.size());
    cu::gemm_skinny(dx.p(), xt, T, K, dW.p, wt, N, db.p(), y.p(), yt, g_stream, split);
    sync();
    const std::string what = base + fmt(" split_k=%d (%d splits)", split, used);
    const std::vector<float> got = y.host();
    expect_close(what, got.data(), want.data(), want.size(), gemm_tol("skinny", wt, K, yt));
    y.guard(what);
    if (split == 5) {
      if (first.empty()) first = got;
      else record(std::memcmp(first.data(), got.data(), got.size() * 4) == 0, what + " repeated", "results differ bitwise");
    }
  }
}

#ifndef LORAPLEX_CUDA_EMU
// warm() then run() captured into a CUDA graph (as the backend captures decode steps): the capture
// must succeed (no allocation, sync or other capture-unsafe call inside run()), and the replayed
// graph must compute the product. GPU only: the emulator has no stream capture.
void run_gemm_graph_case(Rng& rng, cu::Gemm& gemm, int T, int K, int N) {
  const Weights W = random_weights(rng, 1, size_t(N) * K, 0.05f);
  const DevWeights dW(W);
  const std::vector<float> x = round_bf16(rng.vec(size_t(T) * K)), bias = rng.vec(N);
  const std::vector<float> want = gemm_truth(x, T, K, W, N, &bias, 1);
  Act dx(1, x), y(1, want.size());
  Dev<float> db(bias);
  const std::string what = fmt("gemm graph capture x=BF16 W=BF16 y=BF16 T=%d K=%d N=%d %s", T, K, N,
                               gemm.path(T, 1, 1, 1));
  gemm.warm(T, K, N, 1, 1, 1, true);
  sync();
  std::string err;
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal);
  if (e == cudaSuccess) {
    try {
      gemm.run(dx.p(), 1, T, K, dW.p, 1, N, db.p(), y.p(), 1, g_stream);
    } catch (const std::exception& ex) {
      err = ex.what();
    }
    e = cudaStreamEndCapture(g_stream, &graph);
  }
  if (e != cudaSuccess && err.empty()) err = cudaGetErrorString(e);
  (void)cudaGetLastError();
  record(err.empty(), what, err);
  if (!err.empty()) {
    if (graph) cudaGraphDestroy(graph);
    return;
  }
  cudaGraphExec_t exec = nullptr;
  ck(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  ck(cudaGraphLaunch(exec, g_stream), "cudaGraphLaunch");
  sync();
  expect_close(what + " replay", y.host().data(), want.data(), want.size(), gemm_tol(gemm.path(T, 1, 1, 1), 1, K, 1));
  y.guard(what);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
#endif

void test_gemm(Rng& rng) {
  Section sec("gemm");
  cu::Gemm gemm;
  printf("gemm: %s, activation split %d\n",
         gemm.has_cublas() ? "cuBLAS (F32 x) / cuBLASLt (BF16 x) for T > 16" : "no cuBLAS (SIMT tiles)", gemm.act_split());
  // The documented routes (gemm.cuh): decode sizes always skinny; BF16 x only pairs with BF16 W on
  // cuBLASLt; the rest of BF16 x, and fp32 x into BF16 y, on the SIMT tiles.
  {
    const bool cb = gemm.has_cublas();
    const std::string s1 = gemm.path(16, 1, 1, 1), s2 = gemm.path(17, 1, 1, 1), s3 = gemm.path(17, 1, 2, 0),
                      s4 = gemm.path(17, 1, 0, 1), s5 = gemm.path(17, 0, 1, 1), s6 = gemm.path(17, 0, 0, 0);
    record(s1 == "skinny" && s2 == (cb ? "cublaslt-bf16" : "tiled") && s3 == "tiled" && s4 == "tiled" && s5 == "tiled" &&
               s6 == (cb ? "cublas-f32" : "tiled"),
           "gemm paths", s1 + " " + s2 + " " + s3 + " " + s4 + " " + s5 + " " + s6);
  }
  const std::vector<int> Ks = g_quick ? std::vector<int>{8, 30, 100, 576} : std::vector<int>{8, 24, 30, 64, 100, 576, 4096};
  const std::vector<int> Ns = g_quick ? std::vector<int>{1, 17, 130} : std::vector<int>{1, 7, 64, 250, 1000};
  const std::vector<int> Ts =
      g_quick ? std::vector<int>{1, 3, 8, 9, 16, 70} : std::vector<int>{1, 2, 3, 5, 8, 9, 16, 17, 33, 64, 130, 300};
  // (x, y) dtypes: the fp32 path, BF16 activations with fp32 and BF16 outputs, fp32 x into BF16 y.
  const std::vector<std::array<int, 2>> xy = {{0, 0}, {1, 0}, {1, 1}, {0, 1}};
  for (int wt : {0, 1, 2})
    for (int K : Ks)
      for (int N : Ns) {
        const Weights W = random_weights(rng, wt, size_t(N) * K);
        const DevWeights dW(W);
        for (int T : Ts)
          for (size_t c = 0; c < xy.size(); c++) {
            // --quick: each mixed dtype pair on every third (T, N) only; in full, not on the few
            // largest products (their fp64 truth dominates the suite's host time).
            if (c > 0 && (g_quick ? (T + N + int(c)) % 3 != 0 : double(T) * K * N > 6e7)) continue;
            run_gemm_case(rng, gemm, xy[c][0], wt, xy[c][1], T, K, N, (T + N) % 2 == 1, W, dW);
          }
      }
#ifndef LORAPLEX_CUDA_EMU
  // Decode shapes (split-K on a large GPU) and one cuBLASLt shape, captured into graphs.
  for (auto [T, K, N] : std::vector<std::array<int, 3>>{{1, 4096, 4096}, {16, 4096, 1024}, {48, 1024, 512}})
    run_gemm_graph_case(rng, gemm, T, K, N);
#endif
  // Skinny split-K at the decode widths (K a multiple of 8 for 16-byte loads, and not).
  for (int wt : {1, 0, 2})
    for (auto [K, N] : std::vector<std::array<int, 2>>{{1024, 40}, {1002, 24}})
      for (int T : {1, 2, 7, 8, 9, 16}) {
        if (g_quick && (wt == 1 ? T == 2 || T == 8 : T != 16)) continue;
        run_skinny_split_case(rng, 1, wt, 1, T, K, N);
        run_skinny_split_case(rng, 0, wt, 0, T, K, N);
      }
  // Model-sized projections (a 7B's q and down widths) in every dtype; BF16 x with BF16 weights.
  if (!g_quick) {
    for (int wt : {0, 1, 2})
      for (auto [T, K, N] : std::vector<std::array<int, 3>>{{1, 4096, 4096}, {64, 4096, 1024}, {257, 11008, 512}}) {
        const Weights W = random_weights(rng, wt, size_t(N) * K, 0.05f);
        const DevWeights dW(W);
        run_gemm_case(rng, gemm, 0, wt, 0, T, K, N, true, W, dW);
        if (wt == 1) {
          run_gemm_case(rng, gemm, 1, wt, 1, T, K, N, true, W, dW);
          run_gemm_case(rng, gemm, 1, wt, 0, T, K, N, false, W, dW);
        }
      }
    // Warmed shapes: warm() then run() (the capture-safe sequence) on the BF16 route.
    const Weights W = random_weights(rng, 1, size_t(512) * 4096, 0.05f);
    const DevWeights dW(W);
    for (int T : {16, 48, 100}) {
      gemm.warm(T, 4096, 512, 1, 1, 1, true);
      run_gemm_case(rng, gemm, 1, 1, 1, T, 4096, 512, true, W, dW);
    }
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
// Rows are fp32 (lt 0) or BF16 (lt 1: 2-byte elements, as the CPU backend's --lora-dtype bfloat16).
// The device ref table is strided (ref_stride 3, as the backend's [slot][layer][proj] table is),
// with NaN-scaled decoys in between that must never be read.
struct AdapterSet {
  int in, out, n, lt;
  static constexpr int kStride = 3;
  std::vector<uint8_t> pool_h;
  std::vector<cpu::LoraRef> refs;  // [slot]
  std::vector<std::vector<int64_t>> a_rows, b_rows;
  std::unique_ptr<Dev<uint8_t>> pool_d;
  std::unique_ptr<Dev<int64_t>> rows_d;
  std::unique_ptr<Dev<cu::LoraRef>> refs_d;
  AdapterSet(Rng& rng, int in_, int out_, const std::vector<int>& ranks, int lt_ = 0)
      : in(in_), out(out_), n(int(ranks.size())), lt(lt_) {
    refs.resize(n);
    a_rows.resize(n);
    b_rows.resize(n);
    struct Row { int slot, j; bool is_b; };
    std::vector<Row> rows;
    for (int s = 0; s < n; s++)
      for (int j = 0; j < ranks[s]; j++) rows.push_back({s, j, false}), rows.push_back({s, j, true});
    rng.shuffle(rows);
    const size_t eb = lt == 1 ? 2 : 4;
    auto padded = [&](int elems) { return (size_t(elems) * eb + 63) / 64 * 64; };
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
      const float amp = r.is_b ? 0.1f : 1.0f / std::sqrt(float(in));
      for (int k = 0; k < len; k++) {
        const float v = rng.uniform(-amp, amp);
        if (lt == 1) reinterpret_cast<uint16_t*>(pool_h.data() + offs[i])[k] = cpu::f32_to_bf16(v);
        else reinterpret_cast<float*>(pool_h.data() + offs[i])[k] = v;
      }
    }
    for (int s = 0; s < n; s++) {
      refs[s].rank = ranks[s];
      refs[s].scale = ranks[s] ? rng.uniform(0.25f, 2.f) : 0.f;
      refs[s].a_rows = ranks[s] ? a_rows[s].data() : nullptr;
      refs[s].b_rows = ranks[s] ? b_rows[s].data() : nullptr;
      refs[s].bf16 = lt == 1;
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

// x in xt and y in yt (0 = F32, 1 = BF16); the oracle is cpu::lora_ref on the same (rounded)
// values, its result rounded to BF16 once for a BF16 y (so the bound gains one BF16 ulp).
void run_lora_case(Rng& rng, const AdapterSet& A, const std::vector<int32_t>& slot, const std::string& tag0, int xt,
                   int yt) {
  const int T = int(slot.size());
  const std::string tag = tag0 + fmt(" rows=%s x=%s y=%s", aname(A.lt), aname(xt), aname(yt));
  int batch_rank = 0;
  for (int32_t s : slot) batch_rank = std::max(batch_rank, A.refs[s].rank);
  std::vector<float> x = rng.vec(size_t(T) * A.in), y0 = rng.vec(size_t(T) * A.out);
  if (xt == 1) x = round_bf16(x);
  if (yt == 1) y0 = round_bf16(y0);
  std::vector<float> want(y0);
  cpu::lora_ref(A.pool_h.data(), A.refs.data(), slot.data(), T, x.data(), A.in, want.data(), A.out);
  if (yt == 1) want = round_bf16(want);
  const Tol tol{2e-5 * std::max(1.0, std::sqrt(batch_rank / 16.0)), 1e-4 + (yt == 1 ? kBf16Ulp : 0.0)};
  Act dx(xt, x);
  Dev<int32_t> dslot(slot);
  const uint8_t* pool = A.pool_d->p();
  const cu::LoraRef* refs = A.refs_d->p();
  if (batch_rank == 0) batch_rank = 1;  // the backend never launches then; the kernels must still be no-ops
  {
    Act y(yt, y0);
    Dev<float> z(size_t(T) * batch_rank);
    cu::lora_shrink_bgmv(pool, A.lt, refs, AdapterSet::kStride, dslot.p(), T, dx.p(), xt, A.in, z.p(), batch_rank,
                         g_stream);
    cu::lora_expand_bgmv(pool, A.lt, refs, AdapterSet::kStride, dslot.p(), T, z.p(), batch_rank, y.p(), yt, A.out,
                         g_stream);
    sync();
    expect_close(tag + " bgmv", y.host().data(), want.data(), want.size(), tol);
    y.guard(tag + " bgmv y");
    expect_guard(tag + " bgmv z", z);
  }
  {
    const std::vector<int32_t> tiles = cu::make_sgmv_tiles(slot.data(), T);
    Dev<int32_t> dtiles(tiles.empty() ? std::vector<int32_t>{0} : tiles);
    Act y(yt, y0);
    Dev<float> z(size_t(T) * batch_rank);
    const int n_tiles = int(tiles.size() / 3);
    cu::lora_shrink_sgmv(pool, A.lt, refs, AdapterSet::kStride, dtiles.p(), n_tiles, dx.p(), xt, A.in, z.p(), batch_rank,
                         g_stream);
    cu::lora_expand_sgmv(pool, A.lt, refs, AdapterSet::kStride, dtiles.p(), n_tiles, z.p(), batch_rank, y.p(), yt, A.out,
                         g_stream);
    sync();
    const std::string what = tag + fmt(" sgmv tiles=%d", n_tiles);
    expect_close(what, y.host().data(), want.data(), want.size(), tol);
    y.guard(what + " y");
    expect_guard(what + " z", z);
  }
}

#ifndef LORAPLEX_CUDA_EMU
// BGMV captured once into a CUDA graph (as the backend captures decode steps) and replayed with
// other adapter mixes written into the same token_slot buffer: the kernels read the slots on the
// device, so one graph serves every mix (ranks differ per mix; max_rank is the graph's).
void run_lora_graph_case(Rng& rng, const AdapterSet& A, int xt, int yt) {
  const int T = 8, max_rank = 128;
  const std::string tag = fmt("lora bgmv graph in=%d out=%d rows=%s x=%s y=%s", A.in, A.out, aname(A.lt), aname(xt),
                              aname(yt));
  std::vector<float> x = rng.vec(size_t(T) * A.in), y0 = rng.vec(size_t(T) * A.out);
  if (xt == 1) x = round_bf16(x);
  if (yt == 1) y0 = round_bf16(y0);
  Act dx(xt, x), y(yt, y0);
  Dev<int32_t> dslot(std::vector<int32_t>(T, 0));
  Dev<float> z(size_t(T) * max_rank);
  cudaGraph_t graph = nullptr;
  ck(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
  cu::lora_shrink_bgmv(A.pool_d->p(), A.lt, A.refs_d->p(), AdapterSet::kStride, dslot.p(), T, dx.p(), xt, A.in, z.p(),
                       max_rank, g_stream);
  cu::lora_expand_bgmv(A.pool_d->p(), A.lt, A.refs_d->p(), AdapterSet::kStride, dslot.p(), T, z.p(), max_rank, y.p(), yt,
                       A.out, g_stream);
  ck(cudaStreamEndCapture(g_stream, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  ck(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int mix = 0; mix < 3; mix++) {
    std::vector<int32_t> slot(T);
    for (auto& sl : slot) sl = rng.below(A.n);
    std::vector<float> want(y0);
    cpu::lora_ref(A.pool_h.data(), A.refs.data(), slot.data(), T, x.data(), A.in, want.data(), A.out);
    if (yt == 1) want = round_bf16(want);
    dslot.upload(slot);
    if (yt == 1) y.h->upload(to_bf16(y0));
    else y.f->upload(y0);
    ck(cudaGraphLaunch(exec, g_stream), "cudaGraphLaunch");
    sync();
    expect_close(tag + fmt(" replay %d", mix), y.host().data(), want.data(), want.size(),
                 Tol{2e-5 * std::sqrt(128 / 16.0), 1e-4 + (yt == 1 ? kBf16Ulp : 0.0)});
    y.guard(tag);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
#endif

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
#ifndef LORAPLEX_CUDA_EMU
  for (int lt : {0, 1}) {
    const AdapterSet A(rng, 576, 192, ranks, lt);
    run_lora_graph_case(rng, A, lt, lt);
  }
#endif
  // (rows, x, y) dtypes: the fp32 path; BF16 rows; BF16 activations; both. --quick runs the mixed
  // dtypes on the first two widths and every third mix.
  const std::vector<std::array<int, 3>> dts = {{0, 0, 0}, {1, 0, 0}, {0, 1, 1}, {1, 1, 1}};
  for (size_t w = 0; w < widths.size(); w++)
    for (size_t d = 0; d < dts.size(); d++) {
      if (g_quick && d > 0 && w + 1 == widths.size()) continue;
      const auto& wd = widths[w];
      const int lt = dts[d][0], xt = dts[d][1], yt = dts[d][2];
      const AdapterSet A(rng, wd[0], wd[1], ranks, lt);
      const std::string base = fmt("lora in=%d out=%d", A.in, A.out);
      int n_mix = 0;
      auto run = [&](const char* mix, const std::vector<int32_t>& slot) {
        if (g_quick && d > 0 && n_mix++ % 3) return;
        std::string ids;
        for (size_t i = 0; i < slot.size() && i < 16; i++) ids += fmt("%s%d", i ? "," : "", slot[i]);
        run_lora_case(rng, A, slot,
                      base + fmt(" mix=%s T=%zu slots=[%s%s]", mix, slot.size(), ids.c_str(),
                                 slot.size() > 16 ? ",..." : ""),
                      xt, yt);
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
                                            int rank, int skip_layer = -1, bool fused = false, size_t elem_bytes = 4) {
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
  return pack_adapter(mods, page_bytes, elem_bytes);
}

// One sequence of the scripted conversation: its tokens, adapter slot and pages.
struct SeqState {
  std::vector<int32_t> tokens;  // all tokens so far (prompt + generated)
  int done = 0;                 // tokens already in the KV cache
  int slot = 0;
  std::vector<int32_t> pages;
};

// BF16-activation backend bounds (see run_backend_case) and the worst values seen, printed at the
// end of the section so the bounds' margin is visible.
constexpr double kBf16BackendRelL2 = 0.08, kBf16BackendMaxAbs = 0.1;
double g_bf16_worst_rel = 0, g_bf16_worst_abs = 0;

// The backend's options for a case: CudaOptions{} is the exact fp32 path launched eagerly.
// The CPU oracle takes the same KV and adapter-row dtypes (the same rounding of the stored
// values) and computes in fp32; BF16 activations on the GPU get the BF16 tolerance.
struct Variant {
  const char* tag;
  CudaOptions cuda;
  bool decode_tail = false;  // the graph variants' extra decode-only steps (also run eagerly to compare)
};
const Variant kFp32Eager{"", CudaOptions{}};

// Runs the scripted steps on both backends and checks each step's logits against the CPU; the GPU
// logits of every step are appended to *gpu_logits when given.
void run_backend_case(Rng& rng, const std::string& name0, TinyModel& tm, const Variant& var = kFp32Eager,
                      std::vector<std::vector<float>>* gpu_logits = nullptr) {
  const Model& m = *tm.model;
  const std::string name = name0 + var.tag;
  const CudaOptions& co = var.cuda;
  const int block_size = 4, max_slots = 5;
  // Pages: 3 adapters, then KV. Adapter pages come from the pool like KV pages do.
  const size_t page_bytes = kv_page_bytes(m.spec, block_size, co.kv_bf16 ? 2 : 4);
  const size_t lora_elem = co.lora_bf16 ? 2 : 4;
  std::vector<std::shared_ptr<ParsedAdapter>> ads;
  // Fused targets (Phi-3): k and v take q's A rows, up takes gate's (LoraModule::a_from).
  const bool fused = m.spec.fused_qkv;
  ads.push_back(make_adapter(rng, m, page_bytes, {kQ, kV}, 8, -1, fused, lora_elem));
  ads.push_back(make_adapter(rng, m, page_bytes, {kQ, kK, kV, kO, kGate, kUp, kDown}, 33, 1, fused, lora_elem));
  ads.push_back(make_adapter(rng, m, page_bytes, {kO, kDown}, 1, -1, fused, lora_elem));
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
  CpuOptions cpu_opts;
  cpu_opts.kv_bf16 = co.kv_bf16, cpu_opts.lora_bf16 = co.lora_bf16;
  std::unique_ptr<Backend> cpu_be = make_cpu_backend(tm.model, block_size, num_pages, max_slots, cpu_opts);
  std::unique_ptr<Backend> gpu_be;
  try {
    gpu_be = make_cuda_backend(tm.model, block_size, num_pages, max_slots, co);
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
  // BF16 activations: every kernel output rounded to 8 significant bits, a relative 2^-9 per
  // rounding over a few layers; a wrong kernel (a missed row, a wrong conversion) moves logits by
  // whole units.
  const Tol tol = co.compute_bf16 ? Tol{0.05, 0.05} : Tol{m.embed.type == cpu::WType::F32 ? 2e-4 : 5e-4, 2e-4};
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
  // With graphs: more decode-only steps, so that captured graphs replay over grown contexts (new
  // pages, wider block tables), other batch sizes of the same bucket and other adapter mixes.
  auto steps = script;
  if (co.graphs || var.decode_tail)
    for (const auto& extra : std::vector<std::vector<std::pair<int, int>>>{
             {{0, 1}, {1, 1}, {2, 1}, {3, 1}},          // bucket 4
             {{3, 1}, {2, 1}, {1, 1}},                  // bucket 4 again, other slots and order
             {{0, 1}, {4, 1}, {2, 1}, {3, 1}, {1, 1}},  // bucket 8, longer contexts
             {{4, 1}},                                  // bucket 1, adapter 2
             {{0, 1}},                                  // bucket 1, base model only
             {{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}},  // bucket 8 again
             {{4, 40}},                                 // the largest step yet: activation buffers grow
             {{0, 1}, {1, 1}, {2, 1}, {3, 1}},          // bucket 4 (same key): its buffers moved, captured again
         })
      steps.push_back(extra);
  for (size_t st = 0; st < steps.size(); st++) {
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
    for (auto [i, n] : steps[st]) {
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
    b.n_seqs = int(steps[st].size());
    b.max_blocks = max_blocks + 1;
    b.block_tables.assign(size_t(b.n_seqs) * b.max_blocks, 0);
    if (!m.inv_freq_long.empty())  // LongRoPE: sequences 1 and 4 past the original context
      for (auto [i, n] : steps[st]) b.rope_long.push_back(i == 1 || i == 4);
    for (int s = 0; s < b.n_seqs; s++) {
      const SeqState& sq = seqs[steps[st][s].first];
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
    if (gpu_logits) gpu_logits->push_back(got);
    const std::string what = name + fmt(" step %zu (T=%d, S=%d) logits", st, b.n_tokens, b.n_seqs);
    if (!co.compute_bf16) {
      expect_close(what, got.data(), want.data(), want.size(), tol);
      continue;
    }
    // BF16 activations: each kernel output rounded to 8 significant bits (2^-9 relative), through
    // a few layers and large random adapters; random tiny models cancel a lot in their logits, so
    // the relative error of a step reaches a few percent (over 24 seeds of the Llama case, eager:
    // median worst 0.6%, largest 4.6%, from one sequence of one seed). Checked as the relative L2 error of
    // each step's logits and the largest element error against the logits' scale; a wrong kernel
    // (a missed adapter row, a wrong conversion, a stale KV page) moves logits by tens of percent.
    double num = 0, den = 0, worst = 0, scale = 0;
    bool finite = true;
    for (size_t i = 0; i < want.size(); i++) {
      finite = finite && std::isfinite(got[i]);
      num += double(got[i] - want[i]) * (got[i] - want[i]);
      den += double(want[i]) * want[i];
      worst = std::max(worst, double(std::fabs(got[i] - want[i])));
      scale = std::max(scale, double(std::fabs(want[i])));
    }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    g_bf16_worst_rel = std::max(g_bf16_worst_rel, rel);
    g_bf16_worst_abs = std::max(g_bf16_worst_abs, worst / std::max(scale, 1.0));
    record(finite && rel <= kBf16BackendRelL2 && worst <= kBf16BackendMaxAbs * std::max(scale, 1.0), what,
           fmt("relative L2 error %.4f (bound %.3f), largest error %.4f of logits up to %.3f (bound %.2f x max(1, that))", rel,
               kBf16BackendRelL2, worst, scale, kBf16BackendMaxAbs));
  }
  if (next_page > num_pages) record(false, name + " test bug: more pages than the pool", "");
  if (co.graphs) {
    // Decode-only steps replayed graphs (none fell back to eager launches or failed to capture).
    const CudaGraphStats g = cuda_graph_stats(*gpu_be);
    record(g.replays >= 7 && g.capture_failures == 0 && g.captures >= 4 && g.captures < g.replays && g.invalidations >= 1,
           name + " graph replays",
           fmt("captures %llu, replays %llu, failures %llu, invalidations %llu", (unsigned long long)g.captures,
               (unsigned long long)g.replays, (unsigned long long)g.capture_failures, (unsigned long long)g.invalidations));
  }
}

// --gpu-memory-utilization: the pool is the budget (that fraction of the device's memory) less what
// the backend holds already, 1% kept back; too little free memory, or a budget that leaves fewer
// than 2 pages, fails start-up with the flag's name in the error. The emulator's device memory is
// set small for it; on a GPU this needs most of the device, so it runs on the emulator only.
void test_memory_budget(Rng& rng) {
#ifdef LORAPLEX_CUDA_EMU
  size_t f0 = 0, t0 = 0;
  cudaMemGetInfo(&f0, &t0);
  const size_t used_before = t0 - f0;  // what earlier sections still hold
  emu_set_device_memory(used_before + (size_t(64) << 20));
  TinyModel tm = make_tiny_model(rng, "llama", 1, 64, 96, 2, 4, 2, 16, 97, false, false, 0, RopeType::None);
  const int block_size = 16;
  for (double util : {0.5, 0.9}) {
    for (bool kv_bf16 : {false, true}) {
      CudaOptions co;
      co.gpu_memory_utilization = util, co.kv_bf16 = kv_bf16, co.max_tokens = 256;
      size_t free0 = 0, total = 0, free1 = 0;
      cudaMemGetInfo(&free0, &total);
      const std::string what = fmt("memory budget util=%g kv=%s", util, kv_bf16 ? "bf16" : "f32");
      try {
        auto be = make_cuda_backend(tm.model, block_size, 0, 3, co);
        cudaMemGetInfo(&free1, &total);
        const double budget = double(total) * util, held = double(free0 - free1);
        const PoolInfo& pi = be->pool();
        record(pi.page_bytes == kv_page_bytes(tm.model->spec, block_size, kv_bf16 ? 2 : 4) && pi.num_pages >= 2 &&
                   held <= budget && held >= budget * 0.98 - double(pi.page_bytes),
               what, fmt("held %.0f of a %.0f budget, %d pages of %zu", held, budget, pi.num_pages, pi.page_bytes));
      } catch (const std::exception& e) {
        record(false, what, e.what());
      }
    }
  }
  auto expect_refused = [&](const std::string& what, double util, const char* needle) {
    CudaOptions co;
    co.gpu_memory_utilization = util, co.max_tokens = 256;
    try {
      auto be = make_cuda_backend(tm.model, block_size, 0, 3, co);
      record(false, what, "started");
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      record(msg.find("--gpu-memory-utilization") != std::string::npos && msg.find(needle) != std::string::npos, what, msg);
    }
  };
  expect_refused("memory budget: fewer than 2 pages", 0.002, "fewer than 2 pages");
  {
    void* hog = nullptr;  // another process's memory
    ck(cudaMalloc(&hog, size_t(40) << 20), "cudaMalloc");
    expect_refused("memory budget: less free than the budget", 0.5, "free");
    cudaFree(hog);
  }
  size_t free_end = 0, total_end = 0;
  cudaMemGetInfo(&free_end, &total_end);
  record(total_end - free_end == used_before, "memory budget: a refused start-up frees what it allocated",
         fmt("%zu of %zu free", free_end, total_end));
  emu_set_device_memory(size_t(4) << 30);
#else
  (void)rng;
#endif
}

// The models of the BF16 and graph variants (the same shapes as the fp32 cases below).
const char* const kModels[] = {"llama-gqa", "qwen2-tied-bias", "mistral-window", "qk-norm", "gemma2", "gemma3", "partial-rotary",
                               "phi3-longrope"};
TinyModel variant_model(Rng& rng, const std::string& m, int wt) {
  if (m == "llama-gqa") return make_tiny_model(rng, "llama", wt, 64, 96, 2, 4, 2, 16, 97, false, false, 0, RopeType::None);
  if (m == "qwen2-tied-bias") return make_tiny_model(rng, "qwen2", wt, 48, 80, 2, 2, 1, 24, 61, true, true, 0, RopeType::Linear);
  if (m == "mistral-window") return make_tiny_model(rng, "mistral", wt, 32, 64, 3, 2, 2, 24, 50, false, false, 6, RopeType::None);
  const std::string arch = m == "qk-norm" ? "qwen3" : m == "partial-rotary" ? "llama" : m == "phi3-longrope" ? "phi3" : m;
  TinyModel tm = make_tiny_model(rng, arch, wt, 48, 80, 3, 4, 2, 16, 61, m != "partial-rotary" && m != "phi3-longrope", false, 0,
                                 m == "gemma3" ? RopeType::Linear : RopeType::None);
  add_family(rng, tm, m);
  return tm;
}

void test_backend(Rng& rng) {
  Section sec("backend");
  test_memory_budget(rng);
  // BF16 compute, KV cache and adapter rows; the same with CUDA graphs; graphs on the exact path.
  CudaOptions bf16;
  bf16.compute_bf16 = bf16.kv_bf16 = bf16.lora_bf16 = true;
  CudaOptions bf16_graphs = bf16, f32_graphs;
  bf16_graphs.graphs = f32_graphs.graphs = true;
  const Variant kBf16{" [bf16]", bf16}, kBf16Graphs{" [bf16, graphs]", bf16_graphs}, kF32Graphs{" [graphs]", f32_graphs};
  // BF16 eager on every model; graphs (fp32 and BF16) on a Llama, Gemma 2 (soft-capping,
  // alternating windows) and Phi-3 (LongRoPE, fused targets), which cover the graph-specific paths.
  // BF16 eager on every model.
  for (int i = 0; i < 8; i++) {
    const std::string what = "backend " + std::string(kModels[i]) + " BF16";
    TinyModel tm = variant_model(rng, kModels[i], cu::kBF16);
    run_backend_case(rng, what, tm, kBf16);
  }
  // Graphs against the same steps launched eagerly, on the same model, adapters and tokens (the
  // same seed), and both against the CPU: a Llama, Gemma 2 (soft-capping, alternating windows) and
  // Phi-3 (LongRoPE, fused targets) in BF16, the Llama in fp32. The two GPU runs differ only in
  // attention split counts and the LoRA scratch stride, so fp32 logits agree to summation order
  // and BF16 ones to a rounding flip or two.
  const Variant kBf16Tail{" [bf16, eager + decode tail]", bf16, true}, kF32Tail{" [eager + decode tail]", CudaOptions{}, true};
  for (const auto& [model, gv, ev] : std::vector<std::tuple<int, Variant, Variant>>{
           {0, kBf16Graphs, kBf16Tail}, {4, kBf16Graphs, kBf16Tail}, {7, kBf16Graphs, kBf16Tail}, {0, kF32Graphs, kF32Tail}}) {
    const uint64_t seed = rng.next();
    const int wt = gv.cuda.compute_bf16 ? cu::kBF16 : cu::kF32;
    const std::string what = fmt("backend %s %s", kModels[model], wname(wt));
    std::vector<std::vector<float>> eager, graphs;
    {
      Rng r(seed);
      TinyModel tm = variant_model(r, kModels[model], wt);
      run_backend_case(r, what, tm, ev, &eager);
    }
    {
      Rng r(seed);
      TinyModel tm = variant_model(r, kModels[model], wt);
      run_backend_case(r, what, tm, gv, &graphs);
    }
    bool same_shape = eager.size() == graphs.size();
    for (size_t st = 0; same_shape && st < eager.size(); st++) same_shape = eager[st].size() == graphs[st].size();
    record(same_shape && !eager.empty(), what + " graphs vs eager: same steps", "");
    for (size_t st = 0; same_shape && st < eager.size(); st++) {
      const std::string w = what + fmt(" graphs vs eager, step %zu", st);
      if (wt == cu::kF32) {
        expect_close(w, graphs[st].data(), eager[st].data(), eager[st].size(), {2e-5, 2e-5});
        continue;
      }
      double num = 0, den = 0;
      for (size_t i = 0; i < eager[st].size(); i++)
        num += std::pow(double(graphs[st][i]) - eager[st][i], 2), den += std::pow(double(eager[st][i]), 2);
      const double rel = std::sqrt(num / std::max(den, 1e-30));
      record(rel <= 0.01, w, fmt("relative L2 difference %.4f (bound 0.01)", rel));
    }
  }
  printf("backend, BF16 activations: worst relative L2 error %.4f (bound %.3f), worst element error %.4f of the logits' scale (bound %.2f)\n",
         g_bf16_worst_rel, kBf16BackendRelL2, g_bf16_worst_abs, kBf16BackendMaxAbs);
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
      {"elementwise", test_elementwise}, {"elementwise", test_elementwise_bf16}, {"gemm", test_gemm}, {"attention", test_attention},
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
