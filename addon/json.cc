#include "addon/json.h"

#include <cmath>
#include <cstdlib>
#include <limits>

namespace loraplex {
namespace {

class Parser {
 public:
  Parser(const char* d, size_t n, int max_depth) : d_(d), n_(n), max_depth_(max_depth) {}

  JsonValue parse_document() {
    JsonValue v = parse_value(0);
    skip_ws();
    if (i_ != n_) fail("trailing characters after JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(i_) + ": " + what);
  }
  void skip_ws() {
    while (i_ < n_ && (d_[i_] == ' ' || d_[i_] == '\t' || d_[i_] == '\n' || d_[i_] == '\r')) i_++;
  }
  bool consume(char c) {
    skip_ws();
    if (i_ < n_ && d_[i_] == c) { i_++; return true; }
    return false;
  }
  void expect(char c) {
    if (!consume(c)) fail(std::string("expected '") + c + "'");
  }
  void expect_word(const char* w) {
    for (const char* p = w; *p; ++p) {
      if (i_ >= n_ || d_[i_] != *p) fail(std::string("expected '") + w + "'");
      i_++;
    }
  }

  JsonValue parse_value(int depth) {
    if (depth > max_depth_) fail("nesting too deep");
    skip_ws();
    if (i_ >= n_) fail("unexpected end of input");
    JsonValue v;
    char c = d_[i_];
    if (c == '{') {
      i_++;
      v.kind = JsonValue::Kind::Object;
      if (consume('}')) return v;
      do {
        skip_ws();
        if (i_ >= n_ || d_[i_] != '"') fail("expected string key");
        std::string key = parse_string();
        expect(':');
        JsonValue member = parse_value(depth + 1);
        if (!v.object.emplace(std::move(key), std::move(member)).second) fail("duplicate key");
      } while (consume(','));
      expect('}');
    } else if (c == '[') {
      i_++;
      v.kind = JsonValue::Kind::Array;
      if (consume(']')) return v;
      do {
        v.array.push_back(parse_value(depth + 1));
      } while (consume(','));
      expect(']');
    } else if (c == '"') {
      v.kind = JsonValue::Kind::String;
      v.str = parse_string();
    } else if (c == 't') {
      expect_word("true");
      v.kind = JsonValue::Kind::Bool;
      v.boolean = true;
    } else if (c == 'f') {
      expect_word("false");
      v.kind = JsonValue::Kind::Bool;
    } else if (c == 'n') {
      expect_word("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      parse_number(v);
    } else {
      fail("unexpected character");
    }
    return v;
  }

  void parse_number(JsonValue& v) {
    size_t start = i_;
    bool integer = true;
    if (d_[i_] == '-') i_++;
    if (i_ >= n_ || !(d_[i_] >= '0' && d_[i_] <= '9')) fail("bad number");
    if (d_[i_] == '0') {
      i_++;
    } else {
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') i_++;
    }
    if (i_ < n_ && d_[i_] == '.') {
      integer = false;
      i_++;
      if (i_ >= n_ || !(d_[i_] >= '0' && d_[i_] <= '9')) fail("bad fraction");
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') i_++;
    }
    if (i_ < n_ && (d_[i_] == 'e' || d_[i_] == 'E')) {
      integer = false;
      i_++;
      if (i_ < n_ && (d_[i_] == '+' || d_[i_] == '-')) i_++;
      if (i_ >= n_ || !(d_[i_] >= '0' && d_[i_] <= '9')) fail("bad exponent");
      while (i_ < n_ && d_[i_] >= '0' && d_[i_] <= '9') i_++;
    }
    std::string text(d_ + start, i_ - start);
    v.kind = JsonValue::Kind::Number;
    v.number = std::strtod(text.c_str(), nullptr);
    if (integer) {
      errno = 0;
      char* end = nullptr;
      long long x = std::strtoll(text.c_str(), &end, 10);
      if (errno == 0 && end == text.c_str() + text.size()) {
        v.is_integer = true;
        v.integer = x;
      }
    }
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (i_ + 4 > n_) fail("short \\u escape");
    uint32_t cp = 0;
    for (int k = 0; k < 4; k++) {
      char h = d_[i_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= uint32_t(h - '0');
      else if (h >= 'a' && h <= 'f') cp |= uint32_t(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') cp |= uint32_t(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    i_++;  // opening quote
    std::string out;
    while (true) {
      if (i_ >= n_) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(d_[i_++]);
      if (c == '"') break;
      if (c < 0x20) fail("control character in string");
      if (c != '\\') {
        out += char(c);
        continue;
      }
      if (i_ >= n_) fail("unterminated escape");
      char e = d_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (i_ + 2 > n_ || d_[i_] != '\\' || d_[i_ + 1] != 'u') fail("lone surrogate");
            i_ += 2;
            uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("lone surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }

  const char* d_;
  size_t n_;
  size_t i_ = 0;
  int max_depth_;
};

}  // namespace

JsonValue parse_json(const char* data, size_t len, int max_depth) {
  return Parser(data, len, max_depth).parse_document();
}

}  // namespace loraplex
