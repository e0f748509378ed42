// Minimal strict JSON parser for the safetensors header (and adapter metadata).
// Thread safety: pure functions; any thread may call.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace loraplex {

struct JsonValue {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0;
  bool is_integer = false;   // number written without fraction/exponent
  int64_t integer = 0;       // valid when is_integer and it fits in int64
  std::string str;
  std::vector<JsonValue> array;
  // Insertion order is irrelevant for safetensors; duplicate keys are rejected.
  std::map<std::string, JsonValue> object;
};

// Throws std::runtime_error with the byte offset on malformed input, trailing garbage,
// duplicate keys or nesting deeper than max_depth.
JsonValue parse_json(const char* data, size_t len, int max_depth = 64);

}  // namespace loraplex
