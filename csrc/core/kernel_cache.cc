// The compiled-kernel cache of both NVRTC routes (kernel_cache.h): where it
// is, what its key covers, when a file in it is trusted, how it is written.
#include "kernel_cache.h"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <utility>

namespace clipops {
namespace kernel_cache {
namespace {

// Bump when the way binaries are made changes without the inputs changing.
constexpr const char* kFormat = "clipops-kernel-cache-2";
// A cached file larger than this is not a kernel (ours are tens of KiB).
constexpr off_t kMaxEntryBytes = off_t(256) << 20;

// ---- SHA-256 (FIPS 180-4) -------------------------------------------------------------
class Sha256 {
 public:
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    bits_ += uint64_t(n) * 8;
    while (n > 0) {
      const size_t take = std::min(n, sizeof(block_) - used_);
      std::memcpy(block_ + used_, p, take);
      used_ += take;
      p += take;
      n -= take;
      if (used_ == sizeof(block_)) {
        compress();
        used_ = 0;
      }
    }
  }
  void update(const std::string& s) { update(s.data(), s.size()); }
  // A length-prefixed field, so that no two sequences of fields hash alike.
  void field(const std::string& s) {
    const std::string n = std::to_string(s.size()) + ":";
    update(n);
    update(s);
  }

  std::string hex() {
    const uint64_t bits = bits_;
    const unsigned char pad = 0x80;
    update(&pad, 1);
    const unsigned char zero = 0;
    while (used_ != 56) update(&zero, 1);
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    update(len, 8);
    char out[65];
    for (int i = 0; i < 8; ++i) std::snprintf(out + 8 * i, 9, "%08x", h_[i]);
    return std::string(out, 64);
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void compress() {
    static constexpr uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(block_[4 * i]) << 24 | uint32_t(block_[4 * i + 1]) << 16 |
             uint32_t(block_[4 * i + 2]) << 8 | uint32_t(block_[4 * i + 3]);
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6],
             h = h_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t used_ = 0;
  uint64_t bits_ = 0;
};

// ---- files ------------------------------------------------------------------------------
bool read_all(int fd, size_t size, std::string* out) {
  out->assign(size, '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, &(*out)[got], size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}

bool write_all(int fd, const std::string& data) {
  size_t put = 0;
  while (put < data.size()) {
    const ssize_t n = ::write(fd, data.data() + put, data.size() - put);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    put += static_cast<size_t>(n);
  }
  return true;
}

// A header for the key's include scan (a regular file, followed through links:
// NVRTC follows them too).
bool read_header(const std::string& path, std::string* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return false;
  struct stat st;
  const bool ok = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
                  read_all(fd, static_cast<size_t>(st.st_size), out);
  ::close(fd);
  return ok;
}

std::string dirname_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash);
}

// A name inside the folder: no path separator, not . or ..
bool plain_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos;
}

// The cache folder, opened once and checked on the open descriptor; every file
// operation is relative to that descriptor, so renaming or replacing the path
// after the check changes nothing.
class Folder {
 public:
  Folder(const std::string& path, bool create) {
    if (path.empty()) return;
    if (path[0] != '/') {
      why_ = "it is not an absolute path";
      return;
    }
    if (create) make_dirs(path);
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd_ < 0) {
      why_ = std::string("it cannot be opened: ") + std::strerror(errno);
      return;
    }
    struct stat st;
    const uid_t me = ::geteuid();
    if (::fstat(fd_, &st) != 0)
      why_ = std::string("fstat failed: ") + std::strerror(errno);
    else if (!S_ISDIR(st.st_mode))
      why_ = "it is not a folder";
    else if (st.st_uid != me)
      why_ = "it is owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
             std::to_string(me) + ")";
    else if (st.st_mode & (S_IWGRP | S_IWOTH)) {
      char mode[8];
      std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
      why_ = std::string("others can write to it (mode ") + mode + ")";
    }
    if (!why_.empty()) {
      ::close(fd_);
      fd_ = -1;
    }
  }
  ~Folder() {
    if (fd_ >= 0) ::close(fd_);
  }
  Folder(const Folder&) = delete;
  Folder& operator=(const Folder&) = delete;

  bool trusted() const { return fd_ >= 0; }
  const std::string& why() const { return why_; }

  // The entry, if it is a regular file of ours that no one else can have written.
  bool read(const std::string& name, std::string* out) const {
    if (!trusted() || !plain_name(name)) return false;
    const int fd = ::openat(fd_, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return false;
    struct stat st;
    // 0600 exactly as we write them: a file with any other bit set (a copy, a
    // checkout) was not written by this cache.
    const bool ok = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
                    (st.st_mode & 077) == 0 && st.st_size > 0 && st.st_size <= kMaxEntryBytes &&
                    read_all(fd, static_cast<size_t>(st.st_size), out);
    ::close(fd);
    return ok;
  }

  // Whole or not at all: a fresh file under a random name (O_EXCL|O_NOFOLLOW:
  // nothing planted there is followed or reused), renamed over the entry.
  bool write(const std::string& name, const std::string& data) const {
    if (!trusted() || !plain_name(name)) return false;
    std::random_device random;
    for (int attempt = 0; attempt < 8; ++attempt) {
      char tmp[64];
      std::snprintf(tmp, sizeof(tmp), ".clipops_tmp_%08x%08x", random(), random());
      const int fd = ::openat(fd_, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
      if (fd < 0) {
        if (errno == EEXIST) continue;
        return false;
      }
      bool ok = ::fchmod(fd, 0600) == 0 && write_all(fd, data);  // 0600 whatever the umask
      ok = (::close(fd) == 0) && ok;
      ok = ok && ::renameat(fd_, tmp, fd_, name.c_str()) == 0;
      if (!ok) ::unlinkat(fd_, tmp, 0);
      return ok;
    }
    return false;
  }

 private:
  // mkdir -p with mode 0700 for every folder it creates; existing ones are left as they are.
  static void make_dirs(const std::string& path) {
    for (size_t at = path.find('/', 1); ; at = path.find('/', at + 1)) {
      const std::string prefix = path.substr(0, at);
      if (!prefix.empty() && ::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) return;
      if (at == std::string::npos) return;
    }
  }

  int fd_ = -1;
  std::string why_;
};

// Once per folder and process (per library: each holds its own copy of the core).
void warn_untrusted(const std::string& dir, const std::string& why) {
  static std::mutex mu;
  static std::set<std::string> warned;
  std::lock_guard<std::mutex> lock(mu);
  if (!warned.insert(dir).second) return;
  std::fprintf(stderr,
               "clipops: not using the kernel cache folder '%s' (%s): compiled kernels are loaded "
               "as code, so they are read only from a folder of your own that no one else can "
               "write. Compiling in memory instead; set CLIPOPS_CACHE_DIR to such a folder, or "
               "`chmod 700` this one if it is yours.\n",
               dir.c_str(), why.c_str());
}

// ---- the key's include scan -------------------------------------------------------------
struct Include {
  bool quoted;
  std::string name;
};

// The #include (and #include_next) directives of a file, in order, whatever
// #if they sit under: a superset of what the preprocessor reads. Includes by
// macro name are not followed (none is in the kernel's or CUDA's
// cooperative_groups headers; Thrust has some).
std::vector<Include> includes_of(const std::string& text) {
  std::vector<Include> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    size_t i = pos;
    auto skip_space = [&] {
      while (i < end && (text[i] == ' ' || text[i] == '\t')) ++i;
    };
    skip_space();
    if (i < end && text[i] == '#') {
      ++i;
      skip_space();
      if (text.compare(i, 7, "include") == 0) {
        i += 7;
        if (text.compare(i, 5, "_next") == 0) i += 5;
        skip_space();
        if (i < end && (text[i] == '<' || text[i] == '"')) {
          const char close = text[i] == '<' ? '>' : '"';
          const size_t stop = text.find(close, i + 1);
          if (stop != std::string::npos && stop < end && stop > i + 1)
            out.push_back({close == '"', text.substr(i + 1, stop - i - 1)});
        }
      }
    }
    pos = end + 1;
  }
  return out;
}

class IncludeScan {
 public:
  IncludeScan(std::vector<std::string> dirs, Sha256* hash) : dirs_(std::move(dirs)), hash_(hash) {}

  // Hashes every file reachable from `text`; the includes of `text` itself that
  // no folder holds are returned in `missing`.
  void run(const std::string& text, std::vector<std::string>* missing) {
    struct Pending {
      Include inc;
      std::string from_dir;  // the includer's folder: a quoted include looks there first
      bool root;
    };
    std::vector<Pending> stack;
    auto push_includes = [&](const std::string& body, const std::string& dir, bool root) {
      const std::vector<Include> incs = includes_of(body);
      for (auto it = incs.rbegin(); it != incs.rend(); ++it) stack.push_back({*it, dir, root});
    };
    push_includes(text, std::string(), true);  // the program has no folder: -I only
    while (!stack.empty()) {
      const Pending p = stack.back();
      stack.pop_back();
      std::vector<std::string> where;
      if (p.inc.quoted && !p.from_dir.empty()) where.push_back(p.from_dir);
      where.insert(where.end(), dirs_.begin(), dirs_.end());
      bool found = false;
      for (const std::string& d : where) {
        const std::string path = d + "/" + p.inc.name;
        std::string body;
        if (!read_header(path, &body)) continue;
        found = true;
        char* real = ::realpath(path.c_str(), nullptr);
        const std::string id = real != nullptr ? real : path;
        std::free(real);
        if (seen_.insert(id).second) {
          // the name as included and the contents; never the folder's path
          hash_->field(p.inc.quoted ? "\"" + p.inc.name : "<" + p.inc.name);
          hash_->field(body);
          push_includes(body, dirname_of(path), false);
        }
        break;
      }
      if (!found && p.root) missing->push_back(p.inc.name);
    }
  }

 private:
  std::vector<std::string> dirs_;
  Sha256* hash_;
  std::set<std::string> seen_;
};

}  // namespace

std::vector<std::string> nvrtc_options(const std::string& arch_option,
                                       const std::string& kernel_dir,
                                       const std::vector<std::string>& include_dirs) {
  std::vector<std::string> options = {"-std=c++17", "-I" + kernel_dir};
  for (const std::string& d : include_dirs) options.push_back("-I" + d);
  options.push_back(arch_option);
  for (const char* o : {"--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"})
    options.push_back(o);
  return options;
}

std::string default_dir() {
  auto absolute = [](const char* v) { return v != nullptr && v[0] == '/'; };
  const char* env = std::getenv("CLIPOPS_CACHE_DIR");
  // An explicit but relative choice is passed on, and refused by the trust checks with a reason.
  if (env != nullptr && env[0] != '\0') return env;
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (absolute(xdg)) return std::string(xdg) + "/clipops";  // the XDG spec: ignore a relative one
  const char* home = std::getenv("HOME");
  if (!absolute(home)) {
    const passwd* pw = ::getpwuid(::geteuid());
    home = pw != nullptr ? pw->pw_dir : nullptr;
  }
  if (!absolute(home)) return std::string();
  return std::string(home) + "/.cache/clipops";
}

std::string sha256_hex(const std::string& data) {
  Sha256 h;
  h.update(data);
  return h.hex();
}

Status key(const std::string& program, const std::vector<std::string>& options, int nvrtc_major,
           int nvrtc_minor, std::string* out) {
  Sha256 hash;
  hash.field(kFormat);
  hash.field("nvrtc " + std::to_string(nvrtc_major) + "." + std::to_string(nvrtc_minor));
  std::vector<std::string> dirs;
  for (size_t i = 0; i < options.size(); ++i) {
    const std::string& o = options[i];
    if (o == "-I" || o == "--include-path") {  // the folder is the next option
      if (i + 1 < options.size()) dirs.push_back(options[++i]);
      hash.field("-I");
    } else if (o.compare(0, 2, "-I") == 0) {
      dirs.push_back(o.substr(2));
      hash.field("-I");
    } else if (o.compare(0, 15, "--include-path=") == 0) {
      dirs.push_back(o.substr(15));
      hash.field("-I");
    } else {
      hash.field(o);
    }
  }
  hash.field(program);
  std::vector<std::string> missing;
  IncludeScan(dirs, &hash).run(program, &missing);
  if (!missing.empty()) {
    std::string where;
    for (const std::string& d : dirs) where += (where.empty() ? "'" : ", '") + d + "'";
    return Status::Unavailable("clipops' kernel source " + missing.front() +
                               " is missing from the include folders (" + where +
                               "); reinstall clipops");
  }
  *out = hash.hex();
  return Status::Ok();
}

std::string entry_name(const std::string& key, const std::string& kind) {
  return "clipops_" + key + "." + kind;
}

Status get(const std::string& dir, const std::string& name,
           const std::function<Status(std::string*)>& compile,
           const std::function<Status(const std::string&)>& load, std::string* binary) {
  const Folder folder(dir, /*create=*/true);
  if (!dir.empty() && !folder.trusted()) warn_untrusted(dir, folder.why());
  if (folder.read(name, binary) && (!load || load(*binary).ok())) return Status::Ok();
  // No entry, or one the driver refused (damaged, or stale): compile afresh, once.
  binary->clear();
  Status status = compile(binary);
  if (!status.ok()) return status;
  if (load && !(status = load(*binary)).ok()) return status;
  folder.write(name, *binary);  // a failed write costs a compilation per process
  return Status::Ok();
}

}  // namespace kernel_cache
}  // namespace clipops
