// The CUDA emulator's runtime (see cuda_emu.h): fibers for the threads of a block, barriers and
// shuffles between them, and host-memory stand-ins for the runtime API.
// Single-threaded: launches must come from one host thread at a time (the tests' driver).
// Fibers: ucontext only to enter a fiber the first time; every switch after that is
// _setjmp/_longjmp, which (unlike swapcontext) makes no system call to save the signal mask.
#undef _FORTIFY_SOURCE  // its longjmp check rejects jumps between stacks
#include "test/cuda/emu/cuda_emu.h"

#include "kernels/cpu/kernels.h"

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace emu {

uint3 block_idx{0, 0, 0};
dim3 block_dim{1, 1, 1}, grid_dim{1, 1, 1};

namespace {

enum State { kReady, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  uint3 tid;
  int linear = 0;
  State state = kReady;
  std::vector<char> stack;
};

struct Block {
  std::vector<std::unique_ptr<Fiber>> fibers;  // stable addresses: a ucontext must not move
  int cur = -1;
  const std::function<void()>* body = nullptr;
  std::vector<uint64_t> shfl;
  std::vector<unsigned char> smem;
  const char* where = "";
};

Block g_block;
jmp_buf g_main_jb;
cudaError_t g_last_error = cudaSuccess;
std::map<uintptr_t, size_t> g_device_allocs;  // base -> bytes
std::map<const void*, int> g_smem_optin;       // kernel -> cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kStack = 256 * 1024;

[[noreturn]] void fail(const std::string& m) {
  std::fprintf(stderr, "CUDA emulator: %s (block %u,%u,%u)\n", m.c_str(), block_idx.x, block_idx.y, block_idx.z);
  std::abort();
}

Fiber& cur() {
  if (g_block.cur < 0) fail("device built-in used outside a kernel");
  return *g_block.fibers[size_t(g_block.cur)];
}

void yield_to_scheduler() {
  Fiber& f = cur();
  if (!_setjmp(f.jb)) _longjmp(g_main_jb, 1);
}

// Fibers persist across blocks and launches: after a thread's body returns, its fiber parks at the
// scheduler and runs the body again when resumed for the next block (so contexts are made once).
void fiber_main() {
  for (;;) {
    (*g_block.body)();
    cur().state = kDone;
    yield_to_scheduler();
  }
}

void resume(int i) {
  Fiber& f = *g_block.fibers[size_t(i)];
  g_block.cur = i;
  if (!_setjmp(g_main_jb)) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.ctx);
    }
    _longjmp(f.jb, 1);
  }
  g_block.cur = -1;
}

void run_block(size_t n_threads) {
  Block& b = g_block;
  while (b.fibers.size() < n_threads) b.fibers.push_back(std::make_unique<Fiber>());
  b.shfl.assign(n_threads, 0);
  for (size_t i = 0; i < n_threads; i++) {
    Fiber& f = *b.fibers[i];
    f.linear = int(i);
    f.tid = {unsigned(i % block_dim.x), unsigned(i / block_dim.x % block_dim.y), unsigned(i / (block_dim.x * block_dim.y))};
    f.state = kReady;
    if (f.stack.empty()) {
      f.stack.resize(kStack);
      f.started = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
    }
  }
  // Lanes run in index order until each reaches a barrier or exits. When the last live lane of a
  // warp arrives at a warp barrier, the warp is released and the sweep restarts at its first lane;
  // when every live thread waits at __syncthreads, the block is released and the sweep restarts.
  const size_t n_warps = (n_threads + 31) / 32;
  std::vector<int> warp_wait(n_warps, 0), warp_done(n_warps, 0);
  size_t block_wait = 0, done = 0, i = 0;
  while (true) {
    if (i == n_threads) {
      if (done == n_threads) return;
      if (block_wait == n_threads - done) {
        if (done > 0) fail(std::string(b.where) + ": __syncthreads reached after " + std::to_string(done) + " threads exited");
        for (size_t k = 0; k < n_threads; k++) b.fibers[k]->state = kReady;
        block_wait = 0;
        i = 0;
        continue;
      }
      fail(std::string(b.where) + ": deadlock: " + std::to_string(block_wait) + " of " + std::to_string(n_threads - done) +
           " live threads at __syncthreads, the others at a warp barrier that not all their lanes reach");
    }
    Fiber& f = *b.fibers[i];
    if (f.state != kReady) {
      i++;
      continue;
    }
    resume(int(i));
    const size_t w = i / 32, lo = w * 32, lanes = std::min(n_threads, lo + 32) - lo;
    switch (f.state) {
      case kDone:
        done++;
        warp_done[w]++;
        if (warp_wait[w] > 0 && size_t(warp_wait[w]) == lanes - warp_done[w])
          fail(std::string(b.where) + ": warp-synchronous operation with exited lanes in warp " + std::to_string(w));
        i++;
        break;
      case kWaitWarp:
        if (size_t(++warp_wait[w]) == lanes - warp_done[w]) {
          if (warp_done[w] > 0)
            fail(std::string(b.where) + ": warp-synchronous operation with exited lanes in warp " + std::to_string(w));
          for (size_t k = lo; k < lo + lanes; k++)
            if (b.fibers[k]->state == kWaitWarp) b.fibers[k]->state = kReady;
          warp_wait[w] = 0;
          i = lo;
        } else {
          i++;
        }
        break;
      case kWaitBlock:
        block_wait++;
        i++;
        break;
      default:
        fail("fiber yielded while ready");
    }
  }
}

}  // namespace

uint3 thread_idx() { return cur().tid; }

// 128-byte aligned, as the GPU's shared window is (wmma needs 32-byte aligned tiles).
void* dyn_smem() { return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(g_block.smem.data()) + 127) & ~uintptr_t(127)); }

void syncthreads() {
  cur().state = kWaitBlock;
  yield_to_scheduler();
}

void syncwarp() {
  cur().state = kWaitWarp;
  yield_to_scheduler();
}

uint64_t shuffle(uint64_t bits, int arg, int mode) {
  Fiber& f = cur();
  const int lane = f.linear & 31, base = f.linear - lane;
  g_block.shfl[size_t(f.linear)] = bits;
  syncwarp();
  int src = lane;
  switch (mode) {
    case 0: src = lane ^ arg; break;
    case 1: src = arg & 31; break;
    case 2: src = lane + arg < 32 ? lane + arg : lane; break;
    default: src = lane - arg >= 0 ? lane - arg : lane; break;
  }
  if (size_t(base + src) >= g_block.shfl.size()) fail("shuffle from a lane beyond the block");
  const uint64_t r = g_block.shfl[size_t(base + src)];
  syncwarp();  // nobody overwrites its slot before every lane has read
  return r;
}

namespace {
[[noreturn]] void wmma_fail(const std::string& m) { fail(m); }
}  // namespace

// __half2float: the project's exact F16 decoding (kernels/cpu, checked by the kernel tests).
float f16_to_f32(uint16_t h) { return loraplex::cpu::f16_to_f32(h); }

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;
  g_smem_optin[kernel] = value;
  return cudaSuccess;
}

void launch_impl(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body, const void* kernel) {
  const size_t n_threads = size_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n_threads == 0 || n_threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || smem > 227 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (kernel && smem > 48 * 1024) {  // over the default limit: only with the kernel's opt-in
    auto it = g_smem_optin.find(kernel);
    if (it == g_smem_optin.end() || size_t(it->second) < smem) {
      g_last_error = cudaErrorInvalidValue;
      return;
    }
  }
  if (g_block.cur >= 0) fail("kernel launched from inside a kernel");
  grid_dim = grid;
  block_dim = block;
  g_block.body = &body;
  g_block.where = "kernel";
  g_block.smem.assign(smem + 128, 0xFF);  // NaN bytes: reads of unwritten shared memory show
  for (unsigned z = 0; z < grid.z; z++)
    for (unsigned y = 0; y < grid.y; y++)
      for (unsigned x = 0; x < grid.x; x++) {
        block_idx = {x, y, z};
        std::memset(g_block.smem.data(), 0xFF, g_block.smem.size());
        run_block(n_threads);
      }
  block_idx = {0, 0, 0};
}

}  // namespace emu

void nvcuda::wmma::detail::check_ptr(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  emu::cur();  // inside a kernel
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    emu::wmma_fail(std::string(emu::g_block.where) + ": " + what + " with a pointer that is not 256-bit aligned");
  if ((size_t(ldm) * elem_bytes) % 16 != 0)
    emu::wmma_fail(std::string(emu::g_block.where) + ": " + what + " with ldm " + std::to_string(ldm) +
                   " not a multiple of 16 bytes");
}

// ---- runtime API ---------------------------------------------------------------------------------

struct emu_stream_t {
  // While capturing: the recorded operations (nullptr otherwise); `invalid` after a forbidden call.
  std::vector<std::function<void()>>* capture = nullptr;
  bool invalid = false;
};
struct emu_graph_t {
  std::vector<std::function<void()>> ops;
};
struct emu_graph_exec_t {
  std::vector<std::function<void()>> ops;
};

namespace emu {
namespace {
std::vector<cudaStream_t> g_capturing;  // streams with an active capture (global mode)
// A call the driver refuses during a global-mode capture: invalidates every active capture.
bool capture_forbids() {
  if (g_capturing.empty()) return false;
  for (cudaStream_t s : g_capturing) s->invalid = true;
  return true;
}
}  // namespace

bool record_launch(cudaStream_t s, dim3 grid, dim3 block, size_t smem, std::function<void()> body, const void* kernel) {
  if (!s || !s->capture) return false;
  const size_t n_threads = size_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n_threads == 0 || n_threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || smem > 227 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    s->invalid = true;
    return true;
  }
  s->capture->push_back([grid, block, smem, body, kernel] { launch_impl(grid, block, smem, body, kernel); });
  return true;
}
}  // namespace emu
struct emu_event_t {
  int unused;
};

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "unknown error";
  }
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_last_error; }

namespace emu {
namespace {
size_t g_device_total = size_t(4) << 30;  // emu_set_device_memory
size_t g_device_used = 0;
}  // namespace
}  // namespace emu
void emu_set_device_memory(size_t total_bytes) { emu::g_device_total = total_bytes; }

cudaError_t cudaMalloc(void** p, size_t n) {
  if (emu::capture_forbids()) return cudaErrorStreamCaptureUnsupported;
  const size_t rounded = (std::max<size_t>(n, 1) + 255) & ~size_t(255);
  if (emu::g_device_used + rounded > emu::g_device_total) {
    *p = nullptr;
    return cudaErrorMemoryAllocation;
  }
  emu::g_device_used += rounded;
  *p = std::aligned_alloc(256, (std::max<size_t>(n, 1) + 255) & ~size_t(255));
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xA5, n);  // garbage, as fresh device memory is
  emu::g_device_allocs[reinterpret_cast<uintptr_t>(*p)] = n;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (emu::capture_forbids()) return cudaErrorStreamCaptureUnsupported;
  if (!p) return cudaSuccess;
  auto it = emu::g_device_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == emu::g_device_allocs.end()) return cudaErrorInvalidValue;
  emu::g_device_used -= (std::max<size_t>(it->second, 1) + 255) & ~size_t(255);
  emu::g_device_allocs.erase(it);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) {
  if (emu::capture_forbids()) return cudaErrorStreamCaptureUnsupported;
  *p = std::aligned_alloc(256, (std::max<size_t>(n, 1) + 255) & ~size_t(255));
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaMallocHost(void** p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (emu::capture_forbids()) return cudaErrorStreamCaptureUnsupported;
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s) {
  if (s && s->capture) {
    s->capture->push_back([=] {
      if (n) std::memmove(dst, src, n);
    });
    return cudaSuccess;
  }
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (emu::capture_forbids()) return cudaErrorStreamCaptureUnsupported;
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
  if (s && s->capture) {
    s->capture->push_back([=] {
      if (n) std::memset(p, v, n);
    });
    return cudaSuccess;
  }
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = new emu_stream_t{};
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return emu::capture_forbids() ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t, unsigned) {
  if (s && s->capture) {
    s->invalid = true;
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new emu_event_t{};
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t s) {
  if (s && s->capture) {
    s->invalid = true;
    return cudaErrorStreamCaptureUnsupported;
  }
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  return emu::capture_forbids() ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 0.f;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  return emu::capture_forbids() ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "loraplex CUDA emulator (host)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 8;  // enough that shape heuristics (split-K, attention splits) take their multi-block paths
  p->totalGlobalMem = emu::g_device_total;
  p->sharedMemPerBlock = 48 * 1024;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  *total_b = emu::g_device_total;
  *free_b = emu::g_device_total - emu::g_device_used;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  std::memset(a, 0, sizeof *a);
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  auto it = emu::g_device_allocs.upper_bound(u);
  if (it != emu::g_device_allocs.begin()) {
    --it;
    if (u < it->first + std::max<size_t>(it->second, 1)) {
      a->type = cudaMemoryTypeDevice;
      a->devicePointer = const_cast<void*>(p);
      return cudaSuccess;
    }
  }
  a->type = cudaMemoryTypeUnregistered;
  a->hostPointer = const_cast<void*>(p);
  return cudaSuccess;
}

// ---- stream capture and graphs -------------------------------------------------------------------

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  if (!s || s->capture) return cudaErrorInvalidValue;  // the legacy stream cannot capture
  s->capture = new std::vector<std::function<void()>>();
  s->invalid = false;
  emu::g_capturing.push_back(s);
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  if (!s || !s->capture) return cudaErrorInvalidValue;
  auto* ops = s->capture;
  s->capture = nullptr;
  emu::g_capturing.erase(std::find(emu::g_capturing.begin(), emu::g_capturing.end(), s));
  const bool invalid = s->invalid;
  s->invalid = false;
  if (invalid) {
    delete ops;
    *g = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  *g = new emu_graph_t{std::move(*ops)};
  delete ops;
  return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status) {
  *status = !s || !s->capture ? cudaStreamCaptureStatusNone
            : s->invalid      ? cudaStreamCaptureStatusInvalidated
                              : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  if (!g) return cudaErrorInvalidValue;
  *e = new emu_graph_exec_t{g->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
  if (!e) return cudaErrorInvalidValue;
  if (s && s->capture) return cudaErrorStreamCaptureUnsupported;
  for (auto& op : e->ops) op();
  return emu::g_last_error;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
