"""The norm pass per dtype, old library against new (README in this folder).

    for round in 1 2; do for v in old new; do
      PYTHONPATH=/tmp/ab/$v python dtypes_ab.py $v; done; done | tee dtypes_ab.txt

Four arrays of 8M, 4M, 3M and 1M elements per dtype (16M elements; 32 MB in
16-bit types, 128 MB in float64); the median of 25 calls of
clipops.numpy.global_norm, ms.
"""
import sys
import time

import ml_dtypes
import numpy as np

import clipops.numpy as cnp

rng = np.random.default_rng(0)
out = {}
for dt in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
    arrays = [(rng.standard_normal(n) * 0.01).astype(dt) for n in (8 << 20, 4 << 20, 3 << 20, 1 << 20)]
    for _ in range(3):
        cnp.global_norm(arrays)
    times = []
    for _ in range(25):
        t = time.perf_counter()
        cnp.global_norm(arrays)
        times.append(time.perf_counter() - t)
    out[np.dtype(dt).name] = round(float(np.median(times)) * 1e3, 3)
print(sys.argv[1], out)
