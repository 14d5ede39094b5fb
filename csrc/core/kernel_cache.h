// The cache of kernels compiled at run time by NVRTC, and the compilation
// itself as far as both routes share it: the driver route (clip_driver.cc, the
// TF op's GPU kernel) uses it directly, the CuPy route (clipops/_nvrtc.py,
// CuPy's NVRTC) through clipops._core. One folder, one key, one set of trust
// checks, one recovery rule for both.
//
// What a cached binary is trusted for: it is loaded into the user's CUDA
// context, so it is code with all of that user's device memory in reach. It is
// read only from a folder owned by the effective user and writable by no one
// else (created 0700), and only if it is a regular file (not a link), owned by
// the effective user, with no group or other permission bits (written 0600).
// Anything else is ignored: the kernel is compiled in memory, and an untrusted
// folder is neither read nor written (one warning on stderr per folder).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "clipops.h"

namespace clipops {
namespace kernel_cache {

// ---- the compilation both routes make -----------------------------------------
// The NVRTC program: the kernel source included by name. Angle brackets, so
// that only the -I folders are searched: NVRTC resolves a quoted include of the
// program itself in the process's current directory, which would let a
// clip_kernel.cuh there replace the kernel.
// One program, one module per context: the clip kernel and the fused clip +
// optimizer update (optim_kernel.cuh), whose norm pass is the clip's own.
constexpr const char* kProgram = "#include <clip_kernel.cuh>\n#include <optim_kernel.cuh>\n";
constexpr const char* kProgramName = "clipops_kernel.cu";
constexpr const char* kKernelName = "clipops_clip_kernel";
constexpr const char* kUpdateKernelName = "clipops_update_kernel";

// The NVRTC options: the nvcc build's code generation (CMakeLists.txt:
// --fmad=false); every option that changes floating-point results is spelled out.
// \param[in] arch_option   "-arch=sm_XX" (a cubin) or "-arch=compute_XX" (PTX)
// \param[in] kernel_dir    the folder of clip_kernel.cuh and clip_math.h
// \param[in] include_dirs  the CUDA header folders, searched in this order
std::vector<std::string> nvrtc_options(const std::string& arch_option,
                                       const std::string& kernel_dir,
                                       const std::vector<std::string>& include_dirs);

// ---- the cache ----------------------------------------------------------------------
// The cache folder: $CLIPOPS_CACHE_DIR, else $XDG_CACHE_HOME/clipops, else
// ~/.cache/clipops; a relative path in either variable is not used (it would
// name a folder under whatever the current directory is). Read at each call.
std::string default_dir();

// SHA-256 of `data`, as 64 lowercase hex digits.
std::string sha256_hex(const std::string& data);

// The cache key of a compilation: SHA-256 over a format tag, the NVRTC
// version, the options with each include folder's path dropped, and the
// contents of every file the program can include from those folders (the
// kernel sources and the CUDA headers: each #include followed, whatever #if
// it sits under, so the set covers what NVRTC reads). Paths do not enter
// the key, contents do: moving a header changes nothing, editing one changes
// the key.
// \param[in] program   the program's source (kProgram)
// \param[in] options   the NVRTC options (nvrtc_options()); "-I<dir>" name the folders
// \param[in] nvrtc_major, nvrtc_minor  the NVRTC's version
// \param[out] key      64 hex digits
// \return kUnavailable naming the file when an include of `program` itself is
//         in no folder (a missing kernel source)
Status key(const std::string& program, const std::vector<std::string>& options, int nvrtc_major,
           int nvrtc_minor, std::string* key);

// The file name of a cached binary: "clipops_<key>.<kind>", kind "cubin" or "ptx".
std::string entry_name(const std::string& key, const std::string& kind);

// Makes `binary` from the cache or by compiling, the one policy of both routes:
//   1. if `dir` is trusted and holds a trusted `name`, that file is the
//      binary, and if `load` accepts it, done;
//   2. otherwise (no entry, an untrusted one, or one that `load` refuses: a
//      damaged or stale file) `compile` makes it afresh, in memory;
//   3. `load` must accept the fresh binary, else its status is returned (only
//      a fresh binary's refusal is reported: a cached one is recompiled);
//   4. the fresh binary is written to `dir` (if trusted): a file created 0600
//      under a random name in the folder, with O_EXCL and O_NOFOLLOW, then
//      renamed over `name`, so readers see a whole file or none.
// An untrusted folder (not owned by the effective user, group/other-writable,
// not a folder, a relative path) is not read or written; `dir` is created
// 0700 (with missing parents) if absent. An empty `dir` means no disk cache.
// \param[in] dir      the cache folder (default_dir()), or empty
// \param[in] name     the entry's file name (entry_name())
// \param[in] compile  makes the binary; its failure is returned as is
// \param[in] load     loads a binary (e.g. cuModuleLoadData), or null: accept any
// \param[out] binary  the binary that was loaded
Status get(const std::string& dir, const std::string& name,
           const std::function<Status(std::string*)>& compile,
           const std::function<Status(const std::string&)>& load, std::string* binary);

}  // namespace kernel_cache
}  // namespace clipops
