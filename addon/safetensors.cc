#include "addon/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "addon/json.h"

namespace loraplex {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

static bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL}};
  for (auto& [n, d] : kNames) {
    if (s == n) { *out = d; return true; }
  }
  return false;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ && map_ != MAP_FAILED) munmap(map_, map_len_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  auto fail = [&](const std::string& what) -> void { throw std::runtime_error(path + ": " + what); };
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail("truncated safetensors file (" + std::to_string(file_size) + " bytes, need at least 8)");
  }
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_len_ = file_size;
  f->map_ = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    fail(std::string("mmap failed: ") + std::strerror(errno));
  }
  const uint8_t* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderBytes)
    fail("header length " + std::to_string(header_len) + " exceeds the 100 MB cap");
  if (header_len < 2 || 8 + header_len > file_size)
    fail("header length " + std::to_string(header_len) + " does not fit in a " +
         std::to_string(file_size) + "-byte file (truncated?)");
  JsonValue header;
  try {
    header = parse_json(reinterpret_cast<const char*>(base + 8), header_len);
  } catch (const std::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (header.kind != JsonValue::Kind::Object) fail("header is not a JSON object");
  const uint64_t data_len = file_size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;

  struct Span { uint64_t begin, end; const std::string* name; };
  std::vector<Span> spans;
  for (auto& [name, entry] : header.object) {
    if (name == "__metadata__") {
      if (entry.kind != JsonValue::Kind::Object) fail("__metadata__ is not an object");
      for (auto& [k, v] : entry.object) {
        if (v.kind != JsonValue::Kind::String) fail("__metadata__." + k + " is not a string");
        f->metadata_[k] = v.str;
      }
      continue;
    }
    const std::string where = "tensor '" + name + "': ";
    if (entry.kind != JsonValue::Kind::Object) fail(where + "entry is not an object");
    for (auto& [k, _] : entry.object) {
      if (k != "dtype" && k != "shape" && k != "data_offsets") fail(where + "unknown field '" + k + "'");
    }
    auto dt = entry.object.find("dtype");
    auto sh = entry.object.find("shape");
    auto off = entry.object.find("data_offsets");
    if (dt == entry.object.end() || dt->second.kind != JsonValue::Kind::String) fail(where + "missing dtype");
    if (sh == entry.object.end() || sh->second.kind != JsonValue::Kind::Array) fail(where + "missing shape");
    if (off == entry.object.end() || off->second.kind != JsonValue::Kind::Array || off->second.array.size() != 2)
      fail(where + "data_offsets must be [begin, end]");
    TensorView t;
    t.name = name;
    if (!parse_dtype(dt->second.str, &t.dtype)) fail(where + "unknown dtype '" + dt->second.str + "'");
    // numel * dtype size with overflow checks
    unsigned __int128 bytes = dtype_size(t.dtype);
    for (auto& d : sh->second.array) {
      if (d.kind != JsonValue::Kind::Number || !d.is_integer || d.integer < 0)
        fail(where + "shape entries must be non-negative integers");
      t.shape.push_back(d.integer);
      bytes *= static_cast<uint64_t>(d.integer);
      if (bytes > file_size) fail(where + "shape " + t.shape_str() + " is larger than the file");
    }
    uint64_t b[2];
    for (int k = 0; k < 2; k++) {
      auto& o = off->second.array[k];
      if (o.kind != JsonValue::Kind::Number || !o.is_integer || o.integer < 0)
        fail(where + "data_offsets must be non-negative integers");
      b[k] = static_cast<uint64_t>(o.integer);
    }
    if (b[1] < b[0]) fail(where + "data_offsets end before begin");
    if (b[1] > data_len)
      fail(where + "data_offsets [" + std::to_string(b[0]) + ", " + std::to_string(b[1]) +
           "] out of bounds (data section is " + std::to_string(data_len) + " bytes; truncated file?)");
    if (static_cast<uint64_t>(bytes) != b[1] - b[0])
      fail(where + "byte size " + std::to_string(b[1] - b[0]) + " does not match shape " + t.shape_str() +
           " x " + dtype_name(t.dtype) + " (" + std::to_string(static_cast<uint64_t>(bytes)) + " bytes)");
    t.data = data + b[0];
    t.nbytes = b[1] - b[0];
    auto [it, _] = f->tensors_.emplace(name, std::move(t));
    spans.push_back({b[0], b[1], &it->first});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (auto& s : spans) {
    if (s.begin < cursor) fail("tensor '" + *s.name + "' overlaps the previous tensor");
    if (s.begin > cursor)
      fail("gap of " + std::to_string(s.begin - cursor) + " bytes before tensor '" + *s.name + "'");
    cursor = s.end;
  }
  if (cursor != data_len)
    fail(std::to_string(data_len - cursor) + " trailing bytes after the last tensor");
  return f;
}

}  // namespace loraplex
