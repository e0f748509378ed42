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
  if (fd_ >= 0) ::close(fd_);
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

static FileIdentity identity_of(const struct stat& st) {
  FileIdentity id;
  id.dev = uint64_t(st.st_dev);
  id.ino = uint64_t(st.st_ino);
  id.size = uint64_t(st.st_size);
  id.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  id.ctime_ns = int64_t(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
  return id;
}

// Opens a regular file; returns its descriptor and size (>= 8). Throws "<path>: <problem>".
static int open_regular(const std::string& path, struct stat* st) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) {
    ::close(fd);
    throw std::runtime_error(path + ": not a regular file");
  }
  if (st->st_size < 8) {
    ::close(fd);
    throw std::runtime_error(path + ": truncated safetensors file (" + std::to_string(st->st_size) +
                             " bytes, need at least 8)");
  }
  return fd;
}

static uint64_t header_length(const std::string& path, const uint8_t* first8, uint64_t file_size) {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | first8[i];
  if (header_len > SafetensorsFile::kMaxHeaderBytes)
    throw std::runtime_error(path + ": header length " + std::to_string(header_len) + " exceeds the 100 MB cap");
  if (header_len < 2 || 8 + header_len > file_size)
    throw std::runtime_error(path + ": header length " + std::to_string(header_len) + " does not fit in a " +
                             std::to_string(file_size) + "-byte file (truncated?)");
  return header_len;
}

// pread of exactly n bytes at off, or a clear error (EINTR retried; a short file is "truncated").
static void pread_exact(int fd, const std::string& path, uint64_t off, size_t n, void* dst) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, off_t(off));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(path + ": read failed: " + std::strerror(errno));
    }
    if (got == 0) throw std::runtime_error(path + ": file is shorter than its header says (truncated while loading?)");
    p += got;
    off += uint64_t(got);
    n -= size_t(got);
  }
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  struct stat st {};
  int fd = open_regular(path, &st);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->identity_ = identity_of(st);
  f->map_len_ = file_size;
  f->map_ = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    throw std::runtime_error(path + ": mmap failed: " + std::strerror(errno));
  }
  const uint8_t* base = static_cast<const uint8_t*>(f->map_);
  const uint64_t header_len = header_length(path, base, file_size);
  f->parse_header(base + 8, header_len, file_size, base + 8 + header_len);
  return f;
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open_for_read(const std::string& path) {
  struct stat st {};
  int fd = open_regular(path, &st);
  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->fd_ = fd;  // closed by the destructor from here on
  f->path_ = path;
  f->identity_ = identity_of(st);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  uint8_t first8[8];
  pread_exact(fd, path, 0, 8, first8);
  const uint64_t header_len = header_length(path, first8, file_size);
  std::vector<uint8_t> header(header_len);
  pread_exact(fd, path, 8, header_len, header.data());
  f->parse_header(header.data(), header_len, file_size, nullptr);
  return f;
}

void SafetensorsFile::read(const TensorView& t, size_t off, size_t n, void* dst) const {
  if (fd_ < 0) throw std::runtime_error(path_ + ": not opened for reading");
  if (off > t.nbytes || n > t.nbytes - off) throw std::runtime_error(path_ + ": read past tensor '" + t.name + "'");
  pread_exact(fd_, path_, t.file_offset + off, n, dst);
}

FileIdentity SafetensorsFile::identity_now() const {
  struct stat st {};
  if (fd_ < 0 || fstat(fd_, &st) != 0) throw std::runtime_error(path_ + ": cannot stat the open file");
  return identity_of(st);
}

void SafetensorsFile::parse_header(const uint8_t* header_bytes, uint64_t header_len, uint64_t file_size,
                                   const uint8_t* data) {
  const std::string& path = path_;
  auto fail = [&](const std::string& what) -> void { throw std::runtime_error(path + ": " + what); };
  JsonValue header;
  try {
    header = parse_json(reinterpret_cast<const char*>(header_bytes), header_len);
  } catch (const std::exception& e) {
    fail(std::string("header is not valid JSON: ") + e.what());
  }
  if (header.kind != JsonValue::Kind::Object) fail("header is not a JSON object");
  const uint64_t data_len = file_size - 8 - header_len;
  const uint64_t data_start = 8 + header_len;
  struct Span { uint64_t begin, end; const std::string* name; };
  std::vector<Span> spans;
  for (auto& [name, entry] : header.object) {
    if (name == "__metadata__") {
      if (entry.kind != JsonValue::Kind::Object) fail("__metadata__ is not an object");
      for (auto& [k, v] : entry.object) {
        if (v.kind != JsonValue::Kind::String) fail("__metadata__." + k + " is not a string");
        metadata_[k] = v.str;
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
    t.data = data ? data + b[0] : nullptr;
    t.file_offset = data_start + b[0];
    t.nbytes = b[1] - b[0];
    auto [it, _] = tensors_.emplace(name, std::move(t));
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
}

}  // namespace loraplex
