// Progress of a model load, reported by the code doing the work (load_model, the backends'
// constructors) on the thread that runs it. In the addon that is the engine thread; engine.cc
// records each report and JavaScript polls the record (Engine.loadProgress()), so no callback ever
// crosses into JS from the engine thread.
#pragma once
#include <cstdint>
#include <functional>

namespace loraplex {

// phase: "read"   open and validate the safetensors files (headers; the data stays mmapped)
//        "pool"   allocate and commit the unified pool (--memory-budget)
//        "pack"   CPU: every projection and the lm_head into the GEMM layout (this is where the
//                 weight pages are first read from disk)
//        "upload" CUDA: weights copied to device memory
// done and total are bytes; the first report of a phase starts it, done == total ends it.
// An empty function reports nothing.
using LoadProgress = std::function<void(const char* phase, uint64_t done, uint64_t total)>;

}  // namespace loraplex
