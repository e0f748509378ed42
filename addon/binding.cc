// N-API registration: the only place that knows the module's exported names.
#include <napi.h>

#include "addon/engine.h"

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) {
  exports.Set("Engine", loraplex::Engine::Init(env));
  return exports;
}

NODE_API_MODULE(loraplex_native, InitModule)
