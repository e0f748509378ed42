// Strict safetensors reader: mmap (model weights) or pread (adapters: a file truncated while it
// is read gives an error, never SIGBUS).
// Every check runs before any tensor byte is touched: header length cap, JSON object, known dtypes,
// sorted/contiguous/in-bounds offsets, no trailing bytes, byte size == shape x dtype size.
// Thread safety: a SafetensorsFile is immutable after open(); any thread may read it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace loraplex {

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

const char* dtype_name(DType d);
size_t dtype_size(DType d);

struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping (open()); valid while the file is alive
  uint64_t file_offset = 0;       // of the first data byte in the file (both modes)
  size_t nbytes = 0;
  int64_t numel() const;
  std::string shape_str() const;
};

// What identifies a file's content without reading it: a file rewritten, replaced or truncated
// gets a new (ino, size, mtime, ctime); ctime cannot be set back by unprivileged tools.
struct FileIdentity {
  uint64_t dev = 0, ino = 0, size = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool operator==(const FileIdentity& o) const {
    return dev == o.dev && ino == o.ino && size == o.size && mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
  }
};

class SafetensorsFile {
 public:
  static constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

  // Throws std::runtime_error("<path>: <problem>") on any violation. Maps the whole file.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  // Reads and checks only the header; tensor bytes come through read() (TensorView::data is null).
  static std::shared_ptr<SafetensorsFile> open_for_read(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const TensorView* find(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }
  const FileIdentity& identity() const { return identity_; }

  // open_for_read() files: n bytes of t's data from byte `off` into dst; throws if the file came
  // up short (truncated since open).
  void read(const TensorView& t, size_t off, size_t n, void* dst) const;
  // The file's identity now, through the open descriptor (open_for_read() files).
  FileIdentity identity_now() const;

 private:
  SafetensorsFile() = default;
  void parse_header(const uint8_t* header, uint64_t header_len, uint64_t file_size, const uint8_t* data);
  std::string path_;
  int fd_ = -1;
  FileIdentity identity_;
  void* map_ = nullptr;
  size_t map_len_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace loraplex
