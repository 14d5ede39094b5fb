/* A fake libcuda.so.1 for tests/test_driver.py: the driver API calls of
 * csrc/core/clip_driver.cc, with no GPU. "Device" memory is host memory, so a
 * copy really copies and the test can read the tensor table back. What the GPU
 * is like comes from environment variables read at each call; what the
 * launcher did is recorded in the fake_* globals, read through ctypes.
 *
 * Contexts: each stream is its own context, at the address stream + 1.
 * fake_recreate_contexts() destroys them all and makes new ones at the same
 * addresses (as the driver reuses a freed context's address): cuCtxGetId then
 * gives new ids, and modules loaded before are gone. Built with
 * -DFAKE_CUDA_11, it lacks cuCtxGetId (CUDA 12.0), as a CUDA 11 driver does.
 * Built with -DFAKE_MARKER=n, cuInit sets fake_marker to n (which copy of
 * the library a process loaded). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;

static int env_int(const char* name, int fallback) {
  const char* v = getenv(name);
  return v && *v ? atoi(v) : fallback;
}

#ifndef FAKE_MARKER
#define FAKE_MARKER 1
#endif

/* what the launcher did */
int fake_init_calls, fake_module_loads, fake_copies, fake_launches, fake_ctx_depth, fake_max_depth;
int fake_host_allocs, fake_marker;
unsigned fake_generation; /* how many times the contexts were recreated */
unsigned fake_grid[3], fake_block[3], fake_shared;
uintptr_t fake_launch_stream, fake_launch_function;
unsigned char fake_params[21][8]; /* the first 8 bytes behind each kernel parameter */
/* clipops_update_kernel's launches: its five pointer/integer parameters (8 bytes
 * each) and its UpdateParams (176 bytes, by value) */
int fake_update_launches;
unsigned char fake_update_params[5][8];
unsigned char fake_update_struct[176];
unsigned char fake_loaded_head[64];  /* the first bytes of the last module image */

CUresult cuInit(unsigned flags) {
  (void)flags;
  ++fake_init_calls;
  fake_marker = FAKE_MARKER;
  return env_int("FAKE_CUDA_INIT_ERROR", 0);
}
CUresult cuDriverGetVersion(int* v) { *v = env_int("FAKE_CUDA_DRIVER_VERSION", 12020); return 0; }
CUresult cuGetErrorString(CUresult err, const char** text) {
  static char buf[64];
  snprintf(buf, sizeof buf, "fake error %d", err);
  *text = buf;
  return 0;
}
/* each stream is its own context (its own GPU, as far as the launcher knows) */
CUresult cuStreamGetCtx(void* stream, void** ctx) { *ctx = (void*)((uintptr_t)stream + 1); return 0; }
CUresult cuCtxPushCurrent_v2(void* ctx) {
  (void)ctx;
  if (++fake_ctx_depth > fake_max_depth) fake_max_depth = fake_ctx_depth;
  return 0;
}
CUresult cuCtxPopCurrent_v2(void** ctx) { *ctx = 0; --fake_ctx_depth; return 0; }
CUresult cuCtxGetDevice(int* dev) { *dev = 0; return 0; }
void fake_recreate_contexts(void) { ++fake_generation; }
#ifndef FAKE_CUDA_11
CUresult cuCtxGetId(void* ctx, unsigned long long* id) {
  *id = ((unsigned long long)(uintptr_t)ctx << 16) | fake_generation;  /* unique per context */
  return 0;
}
#endif
CUresult cuDeviceGetAttribute(int* value, int attr, int dev) {
  (void)dev;
  const int cc = env_int("FAKE_CUDA_CC", 80);
  switch (attr) {
    case 16: *value = env_int("FAKE_CUDA_SMS", 4); return 0;   /* multiprocessors */
    case 75: *value = cc / 10; return 0;                       /* compute capability */
    case 76: *value = cc % 10; return 0;
    case 95: *value = env_int("FAKE_CUDA_COOP", 1); return 0;  /* cooperative launch */
    default: return 1;
  }
}
/* Loads an ELF image (a 64-byte header) or PTX (a C string); anything else
 * is refused as a damaged image would be (CUDA_ERROR_INVALID_IMAGE). */
CUresult cuModuleLoadData(void** module, const void* image) {
  ++fake_module_loads;
  const char* text = (const char*)image;
  const int elf = memcmp(image, "\x7f" "ELF", 4) == 0;
  const size_t n = elf ? sizeof fake_loaded_head : strnlen(text, sizeof fake_loaded_head - 1) + 1;
  memset(fake_loaded_head, 0, sizeof fake_loaded_head);
  memcpy(fake_loaded_head, image, n);
  if (!elf && strncmp(text, "//", 2) != 0) return 200;
  *module = (void*)(uintptr_t)(0x5000 + 0x10000 * fake_generation);
  return env_int("FAKE_CUDA_LOAD_ERROR", 0);
}
/* The function of a module loaded in this generation of contexts; a module of
 * a destroyed context is gone (CUDA_ERROR_INVALID_HANDLE). */
/* Two kernels per module: the clip's at module + 0x1000, the update's at
 * module + 0x2000. */
static int is_update_function(const void* fn) { return ((uintptr_t)fn & 0xffff) == 0x7000; }
CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
  uintptr_t offset;
  if (strcmp(name, "clipops_clip_kernel") == 0) offset = 0x1000;
  else if (strcmp(name, "clipops_update_kernel") == 0) offset = 0x2000;
  else return 500; /* not found */
  if ((uintptr_t)module != 0x5000 + 0x10000 * fake_generation) return 400;
  *fn = (void*)((uintptr_t)module + offset);
  return 0;
}
/* the update kernel holds more registers: its own blocks per SM */
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* fn, int threads, size_t smem) {
  (void)smem;
  const int per_sm = is_update_function(fn) ? env_int("FAKE_CUDA_UPDATE_BLOCKS_PER_SM", 1)
                                            : env_int("FAKE_CUDA_BLOCKS_PER_SM", 2);
  *blocks = threads == 256 ? per_sm : 0;
  return 0;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned flags) {
  (void)flags;
  ++fake_host_allocs;
  *p = malloc(bytes);
  return *p ? 0 : 2;
}
CUresult cuMemcpyHtoDAsync_v2(unsigned long long dst, const void* src, size_t bytes, void* stream) {
  (void)stream;
  ++fake_copies;
  memcpy((void*)(uintptr_t)dst, src, bytes);
  return 0;
}
CUresult cuEventCreate(void** ev, unsigned flags) { (void)flags; *ev = malloc(1); return 0; }
CUresult cuEventRecord(void* ev, void* stream) { (void)ev; (void)stream; return 0; }
CUresult cuEventQuery(void* ev) { (void)ev; return 0; }
CUresult cuLaunchCooperativeKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, unsigned shared, void* stream,
                                   void** params) {
  ++fake_launches;
  fake_launch_function = (uintptr_t)fn;
  fake_grid[0] = gx; fake_grid[1] = gy; fake_grid[2] = gz;
  fake_block[0] = bx; fake_block[1] = by; fake_block[2] = bz;
  fake_shared = shared;
  fake_launch_stream = (uintptr_t)stream;
  if (is_update_function(fn)) {
    ++fake_update_launches;
    for (int i = 0; i < 5; ++i) memcpy(fake_update_params[i], params[i], 8);
    memcpy(fake_update_struct, params[5], sizeof fake_update_struct);
  } else {
    for (int i = 0; i < 21; ++i) memcpy(fake_params[i], params[i], 8);
  }
  return env_int("FAKE_CUDA_LAUNCH_ERROR", 0);
}
