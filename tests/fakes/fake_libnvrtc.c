/* A fake libnvrtc.so.12 for tests/test_driver.py: records the program and
 * options the launcher compiles with and returns a stand-in cubin or PTX. The
 * version comes from FAKE_NVRTC_VERSION ("12.5"); FAKE_NVRTC_FAIL=1 fails the
 * compilation. While fake_nvrtc_hold is set (through ctypes), a compilation
 * waits (at most 60 s) with fake_nvrtc_in_compile set: a test can launch on
 * another context meanwhile. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int fake_nvrtc_compiles;
char fake_nvrtc_options[16384]; /* the last compilation's options, one per line */
char fake_nvrtc_source[256];    /* the last program's source */
volatile int fake_nvrtc_hold, fake_nvrtc_in_compile;

static const int archs[] = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90};
static const char cubin[64] = "\x7f" "ELF fake cubin"; /* an ELF header's size */
static const char ptx[] = "// fake ptx\n";
static const char log_text[] = "clip_kernel.cuh(1): error: fake compile error";

int nvrtcVersion(int* major, int* minor) {
  const char* v = getenv("FAKE_NVRTC_VERSION");
  if (!v || sscanf(v, "%d.%d", major, minor) != 2) { *major = 12; *minor = 5; }
  return 0;
}
int nvrtcGetNumSupportedArchs(int* n) { *n = (int)(sizeof archs / sizeof archs[0]); return 0; }
int nvrtcGetSupportedArchs(int* out) { memcpy(out, archs, sizeof archs); return 0; }
int nvrtcCreateProgram(void** prog, const char* src, const char* name, int n, const char* const* h,
                       const char* const* i) {
  (void)name; (void)n; (void)h; (void)i;
  snprintf(fake_nvrtc_source, sizeof fake_nvrtc_source, "%s", src);
  *prog = malloc(1);
  return 0;
}
int nvrtcCompileProgram(void* prog, int n, const char* const* options) {
  (void)prog;
  ++fake_nvrtc_compiles;
  fake_nvrtc_options[0] = 0;
  for (int k = 0; k < n; ++k) {
    strncat(fake_nvrtc_options, options[k], sizeof fake_nvrtc_options - strlen(fake_nvrtc_options) - 2);
    strcat(fake_nvrtc_options, "\n");
  }
  fake_nvrtc_in_compile = 1;
  for (int waited = 0; fake_nvrtc_hold && waited < 60000; ++waited) usleep(1000);
  fake_nvrtc_in_compile = 0;
  const char* fail = getenv("FAKE_NVRTC_FAIL");
  return fail && *fail == '1' ? 6 /* NVRTC_ERROR_COMPILATION */ : 0;
}
int nvrtcGetProgramLogSize(void* prog, size_t* n) { (void)prog; *n = sizeof log_text; return 0; }
int nvrtcGetProgramLog(void* prog, char* out) { (void)prog; memcpy(out, log_text, sizeof log_text); return 0; }
int nvrtcGetCUBINSize(void* prog, size_t* n) { (void)prog; *n = sizeof cubin; return 0; }
int nvrtcGetCUBIN(void* prog, char* out) { (void)prog; memcpy(out, cubin, sizeof cubin); return 0; }
int nvrtcGetPTXSize(void* prog, size_t* n) { (void)prog; *n = sizeof ptx; return 0; }
int nvrtcGetPTX(void* prog, char* out) { (void)prog; memcpy(out, ptx, sizeof ptx); return 0; }
int nvrtcDestroyProgram(void** prog) { free(*prog); *prog = 0; return 0; }
const char* nvrtcGetErrorString(int rc) { return rc == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR"; }
