#!/usr/bin/env bash
# GPU-only checks of the CUDA kernels through clipops.cupy, both routes
# (nvcc-compiled and NVRTC): the clip kernel and the fused update kernel.
#   1. compute-sanitizer memcheck, racecheck, synccheck and initcheck over a
#      workload that covers every dtype, mixed lists, sizes around the chunk,
#      in place, use_norm, device scalars and an empty list, with every array
#      and output in an allocation of its own: clean = exit 0 and "0 errors";
#      and over the update (sgd_update, adam_update, adamw_update): every rule
#      and clip, float32 and float16 gradients, sizes around the chunk, a
#      device step counter and learning rate, a skipped step, per-tensor norms
#      and an empty list;
#   2. Nsight Compute (ncu): exactly ONE kernel launch, clipops_clip_kernel,
#      per clip_by_global_norm / global_norm call, for lists of 1, 110 and 5000
#      tensors (allocations launch nothing; the table copy is a memcpy), and
#      none for an empty list (its 0-d norm is a copy from the host); exactly
#      ONE launch, clipops_update_kernel, per adamw_update call (device step
#      and learning rate) for 0, 1, 110 and 5000 tensors (with none it still
#      writes the norm and advances the step);
#   3. (ncu, reported, not judged) DRAM bytes per parameter of one adamw_update
#      call on bench/cases.py's MNIST MLP and ResNet-50 lists, caches flushed
#      first (ncu's default): 32 B when the gradients are read twice from DRAM,
#      28 B when the second read hits the L2 cache (issue 25's stretch).
# Prints a PASS/FAIL/SKIP/INFO line per check and a summary; exits 1 on any FAIL.
#
# Usage (on a machine with a GPU and clipops installed, e.g. after
# `pip install --no-deps --no-build-isolation .`):
#   bash tests/gpu_checks.sh            # everything
#   bash tests/gpu_checks.sh sanitize   # only compute-sanitizer
#   bash tests/gpu_checks.sh ncu        # only the launch counts and DRAM bytes
# Environment: PYTHON (default python3), CUDA_HOME (default /usr/local/cuda).
set -u -o pipefail

PYTHON=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
WHAT=${1:-all}
# bench/cases.py (the benchmarks' lists), for the DRAM measurement
export CLIPOPS_BENCH_DIR=${CLIPOPS_BENCH_DIR:-$(cd "$(dirname "$0")/../bench" 2>/dev/null && pwd)}
WORK=$(mktemp -d -t clipops_gpu_checks.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Run from an empty folder: a ./clipops source folder would shadow the
# installed package (which has the compiled core).
cd "$WORK" || exit 1

RESULTS=()
FAILED=0
record() {  # record STATUS NAME DETAIL
  RESULTS+=("$1  $2${3:+  ($3)}")
  echo "[$1] $2${3:+  ($3)}"
  [ "$1" = FAIL ] && FAILED=1
  return 0
}

find_tool() {  # the path of a CUDA tool, or nothing
  local name=$1 p
  p=$(command -v "$name" 2>/dev/null) && { echo "$p"; return; }
  for p in "$CUDA_HOME/bin/$name" "$CUDA_HOME/$name/$name" "$CUDA_HOME"/nsight-compute*/"$name"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
}

cat > "$WORK/workload.py" <<'PY'
"""Exercises clipops' CUDA kernel for the GPU checks (see gpu_checks.sh)."""
import os
import sys

import numpy as np
import cupy
import clipops._common as common
import clipops.cupy as ccp

EDGE = [0, 1, 1023, 1024, 1025, 16383, 16384, 16385, 3 * 16384 + 1]
SMALL = [0, 1, 5, 300, 1023, 1024, 1025]


def arrays(sizes, dtypes, seed):
    rng = np.random.default_rng(seed)
    return [cupy.asarray(rng.standard_normal(n).astype(dtypes[i % len(dtypes)]))
            for i, n in enumerate(sizes)]


def set_route(route):
    if route == "nvrtc":
        os.environ["CLIPOPS_FORCE_NVRTC"] = "1"
    else:
        os.environ.pop("CLIPOPS_FORCE_NVRTC", None)
        if not common.load_core().cuda_compiled():
            sys.exit(f"ROUTE UNAVAILABLE: this build has no nvcc-compiled kernel")


def sanitize(route):
    # One cudaMalloc per array, so that memcheck knows every array's bounds
    # (CuPy's pool would hide an overrun inside one of its large blocks), and
    # per output: by default the outputs share one padded buffer, where an
    # overrun would land in the next output or the padding.
    cupy.cuda.set_allocator(None)
    os.environ["CLIPOPS_SEPARATE_ALLOCATIONS"] = "1"
    # Not covered: the workspace is one allocation (the core takes one pointer),
    # so an overrun of the tensor table into the partials, which follow it,
    # goes unseen; one past the partials' end is caught.
    set_route(route)
    f16, f32, f64 = np.float16, np.float32, np.float64
    lists = [(EDGE, [f32]), (EDGE, [f16]), (EDGE, [f64]), (EDGE, [f16, f32, f64]),
             ([16385], [f32]), ([0], [f32]), ([SMALL[i % 7] for i in range(110)], [f32, f16]),
             ([], [f32])]
    for k, (sizes, dtypes) in enumerate(lists):
        xs = arrays(sizes, dtypes, k)
        out, norm = ccp.clip_by_global_norm(xs, 0.5)
        out, norm = ccp.clip_by_global_norm(xs, cupy.asarray(0.5), use_norm=cupy.asarray(2.0))
        norm = ccp.global_norm(xs)
        out, norm = ccp.clip_by_global_norm(xs, 0.5, use_norm=3.0, in_place=True)
        out, norm = ccp.clip_by_global_norm(xs, 0.25, in_place=True)
    cupy.cuda.runtime.deviceSynchronize()
    print("WORKLOAD OK")


def state(sizes, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return [cupy.asarray((rng.standard_normal(n) * scale).astype(np.float32)) for n in sizes]


def sanitize_update(route):
    # One cudaMalloc per array (variables, gradients, m, v, the device
    # scalars, the norms and the workspace each their own), as for the clip.
    cupy.cuda.set_allocator(None)
    set_route(route)
    f16, f32 = np.float16, np.float32
    lists = [(EDGE, [f32]), (EDGE, [f16, f32]), ([SMALL[i % 7] for i in range(110)], [f32, f16]),
             ([16385], [f16]), ([0], [f32]), ([], [f32])]
    clips = [{"global_clipnorm": 0.5}, {"clipnorm": 0.25}, {"clipvalue": 0.01}, {}]
    for k, (sizes, dtypes) in enumerate(lists):
        grads = arrays(sizes, dtypes, 100 + k)
        ps, ms, vs = state(sizes, k, 1.0), state(sizes, k + 1), [abs(v) for v in state(sizes, k + 2)]
        step = cupy.zeros((), cupy.int64)
        lr = cupy.asarray(np.float32(1e-3))
        for clip in clips:
            ccp.adamw_update(ps, grads, ms, vs, step=step, learning_rate=lr, **clip)
            ccp.adam_update(ps, grads, ms, vs, step=3, return_norms=True, **clip)
            ccp.sgd_update(ps, grads, ms, learning_rate=lr, momentum=0.9, nesterov=True,
                           weight_decay=0.01, **clip)
            ccp.sgd_update(ps, grads, return_norms=True, **clip)
        ccp.adamw_update(ps, grads, ms, vs, step=step, global_clipnorm=1.0,
                         unscale=cupy.asarray(np.float32(0.5)))
        if sizes and sizes[-1]:
            bad = [g.copy() for g in grads]
            bad[-1][-1] = np.inf
            ccp.adamw_update(ps, bad, ms, vs, step=step, nonfinite="skip")
    cupy.cuda.runtime.deviceSynchronize()
    print("WORKLOAD OK")


def count(route, n, op):
    set_route(route)
    sizes = [16385] if n == 1 else [SMALL[i % 7] + 16384 * (i % 3) for i in range(n)]
    xs = arrays(sizes, [np.float32, np.float16], n)
    if op == "adamw_update":
        ps, ms, vs = state(sizes, 1, 1.0), state(sizes, 2), state(sizes, 3)
        step = cupy.zeros((), cupy.int64)
        lr = cupy.asarray(np.float32(1e-3))  # float32: no cast kernel
        call = lambda: ccp.adamw_update(ps, xs, ms, vs, step=step, learning_rate=lr,  # noqa: E731
                                        global_clipnorm=1.0)
    elif op == "global_norm":
        call = lambda: ccp.global_norm(xs)  # noqa: E731
    else:
        call = lambda: ccp.clip_by_global_norm(xs, 1.0)  # noqa: E731
    call()  # warm: the kernel is loaded (or compiled) and the pool holds the memory
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStart()
    call()
    cupy.cuda.runtime.profilerStop()
    cupy.cuda.runtime.deviceSynchronize()
    print("WORKLOAD OK")


def dram(route, name):
    """One adamw_update call on a benchmark list (float32), profiled alone."""
    sys.path.insert(0, os.environ["CLIPOPS_BENCH_DIR"])
    import cases
    shapes = {"mnist_mlp": cases.mnist_shapes, "resnet50": cases.resnet50_shapes}[name]()
    set_route(route)
    sizes = [int(np.prod(s)) for s in shapes]
    ps, gs = state(sizes, 1, 1.0), state(sizes, 2, 0.01)
    ms, vs = state(sizes, 3, 0.0), state(sizes, 4, 0.0)
    step = cupy.zeros((), cupy.int64)
    lr = cupy.asarray(np.float32(1e-3))
    call = lambda: ccp.adamw_update(ps, gs, ms, vs, step=step, learning_rate=lr,  # noqa: E731
                                    weight_decay=0.01, global_clipnorm=1.0)
    call()
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.runtime.profilerStart()
    call()
    cupy.cuda.runtime.profilerStop()
    cupy.cuda.runtime.deviceSynchronize()
    print("PARAMETERS", sum(sizes))
    print("WORKLOAD OK")


if __name__ == "__main__":
    if sys.argv[1] == "sanitize":
        sanitize(sys.argv[2])
    elif sys.argv[1] == "sanitize_update":
        sanitize_update(sys.argv[2])
    elif sys.argv[1] == "dram":
        dram(sys.argv[2], sys.argv[3])
    else:
        count(sys.argv[2], int(sys.argv[3]), sys.argv[4])
PY

cat > "$WORK/count_kernels.py" <<'PY'
"""Reads ncu's CSV: prints the number of kernels and their names."""
import csv
import sys

ids, names = set(), set()
with open(sys.argv[1], newline="") as f:
    rows = [r for r in csv.reader(f) if r and r[0].isdigit()]  # skip ==PROF== lines and the header
with open(sys.argv[1], newline="") as f:
    header = next((r for r in csv.reader(f) if r and r[0] == "ID"), None)
name_col = header.index("Kernel Name") if header and "Kernel Name" in header else 4
for r in rows:
    ids.add(r[0])
    names.add(r[name_col])
print(len(ids), ",".join(sorted(names)) or "-")
PY

cat > "$WORK/dram_bytes.py" <<'PY'
"""Reads ncu's CSV (--print-units base): prints the kernels, and the DRAM bytes
read and written summed over them."""
import csv
import sys

with open(sys.argv[1], newline="") as f:
    rows = list(csv.reader(f))
header = next((r for r in rows if r and r[0] == "ID"), None)
if header is None:
    sys.exit("no ncu table")
col = {name: header.index(name) for name in ("Kernel Name", "Metric Name", "Metric Value")}
total, kernels = {"dram__bytes_read.sum": 0.0, "dram__bytes_write.sum": 0.0}, set()
for r in rows:
    if r and r[0].isdigit() and r[col["Metric Name"]] in total:
        kernels.add((r[0], r[col["Kernel Name"]]))
        total[r[col["Metric Name"]]] += float(r[col["Metric Value"]].replace(",", ""))
print(len(kernels), int(total["dram__bytes_read.sum"]), int(total["dram__bytes_write.sum"]))
PY

if ! "$PYTHON" -c "import cupy, clipops.cupy; cupy.cuda.runtime.getDeviceCount()" >"$WORK/env.log" 2>&1; then
  cat "$WORK/env.log"
  record FAIL "environment" "clipops.cupy cannot reach a GPU with $PYTHON"
else
  ROUTES="compiled nvrtc"
  if ! "$PYTHON" -c "import clipops._common as c; assert c.load_core().cuda_compiled()" 2>/dev/null; then
    ROUTES="nvrtc"
    record SKIP "compiled route" "this build has no nvcc-compiled kernel"
  fi

  if [ "$WHAT" = all ] || [ "$WHAT" = sanitize ]; then
    SAN=$(find_tool compute-sanitizer)
    if [ -z "$SAN" ]; then
      record SKIP "compute-sanitizer" "not found in PATH or $CUDA_HOME"
    else
      for route in $ROUTES; do
        for kernel in sanitize sanitize_update; do
          what=$([ "$kernel" = sanitize ] && echo "clip" || echo "update")
          for tool in memcheck racecheck synccheck initcheck; do
            log="$WORK/san_${kernel}_${tool}_${route}.log"
            "$SAN" --tool "$tool" --error-exitcode 1 "$PYTHON" "$WORK/workload.py" "$kernel" "$route" >"$log" 2>&1
            rc=$?
            summary=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
            if [ $rc -eq 0 ] && grep -q "WORKLOAD OK" "$log" && grep -qE "SUMMARY: 0 (errors|hazards)" "$log"; then
              record PASS "compute-sanitizer $tool, $what kernel, $route route" "$summary"
            else
              tail -40 "$log"
              record FAIL "compute-sanitizer $tool, $what kernel, $route route" "exit $rc; ${summary:-no summary}; log above"
            fi
          done
        done
      done
    fi
  fi

  if [ "$WHAT" = all ] || [ "$WHAT" = ncu ]; then
    NCU=$(find_tool ncu)
    if [ -z "$NCU" ]; then
      record SKIP "ncu launch count" "ncu not found in PATH or $CUDA_HOME"
    else
      for route in $ROUTES; do
        for n in 0 1 110 5000; do
          for op in clip_by_global_norm global_norm adamw_update; do
            if [ "$op" = adamw_update ]; then want="1 clipops_update_kernel"
            elif [ "$n" = 0 ]; then want="0 -"
            else want="1 clipops_clip_kernel"; fi
            csv="$WORK/ncu_${route}_${n}_${op}.csv"
            # Only the profiled range (one call) is captured; launch__grid_size is
            # a launch statistic, so no hardware counters are needed.
            "$NCU" --profile-from-start off --metrics launch__grid_size --csv --log-file "$csv" \
              "$PYTHON" "$WORK/workload.py" count "$route" "$n" "$op" >"$csv.out" 2>&1
            rc=$?
            read -r kernels names < <("$PYTHON" "$WORK/count_kernels.py" "$csv" 2>/dev/null || echo "? ?")
            if [ $rc -eq 0 ] && grep -q "WORKLOAD OK" "$csv.out" && [ "$kernels $names" = "$want" ]; then
              record PASS "launches per call: $op, $n tensors, $route route" "$kernels kernel(s): $names"
            else
              tail -20 "$csv.out"; tail -5 "$csv" 2>/dev/null
              record FAIL "launches per call: $op, $n tensors, $route route" "exit $rc; $kernels kernel(s): $names; want $want"
            fi
          done
        done
        # DRAM traffic of the fused update: reported (the stretch target), not judged
        for case in mnist_mlp resnet50; do
          csv="$WORK/dram_${route}_${case}.csv"
          "$NCU" --profile-from-start off --print-units base \
            --metrics dram__bytes_read.sum,dram__bytes_write.sum --csv --log-file "$csv" \
            "$PYTHON" "$WORK/workload.py" dram "$route" "$case" >"$csv.out" 2>&1
          rc=$?
          params=$(sed -n 's/^PARAMETERS //p' "$csv.out")
          read -r kernels rd wr < <("$PYTHON" "$WORK/dram_bytes.py" "$csv" 2>/dev/null || echo "? ? ?")
          if [ $rc -eq 0 ] && grep -q "WORKLOAD OK" "$csv.out" && [ "$kernels" = 1 ] && [ -n "$params" ]; then
            per=$("$PYTHON" -c "print(f'{($rd + $wr) / $params:.2f}')")
            record INFO "DRAM bytes per parameter, adamw_update, $case, $route route" \
              "$per B (read $rd, written $wr, $params parameters; 32 = gradients read twice, 28 = once)"
          elif grep -q "ERR_NVGPUCTRPERM" "$csv.out" "$csv" 2>/dev/null; then
            record SKIP "DRAM bytes, adamw_update, $case, $route route" "no permission for GPU performance counters"
          else
            tail -20 "$csv.out"; tail -5 "$csv" 2>/dev/null
            record FAIL "DRAM bytes, adamw_update, $case, $route route" "exit $rc; $kernels kernel(s) measured"
          fi
        done
      done
    fi
  fi
fi

echo
echo "==== clipops GPU checks: summary ===="
for r in "${RESULTS[@]}"; do echo "$r"; done
if [ $FAILED -ne 0 ]; then
  echo "RESULT: FAIL"
  exit 1
fi
echo "RESULT: PASS"
