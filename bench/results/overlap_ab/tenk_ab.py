"""micro.py's 10,000 small tensors through the NumPy front end, in a process
where TF has clipped them once (as in micro.py): the copying clip with its
outputs freed inside the timed call (as micro.py times it), the same with the
outputs kept past it (freed in the untimed setup), and in place. Medians (ms)
of 50 calls after 10. Usage: python tenk_ab.py LABEL (printed first)."""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for micro.py
import micro  # noqa: E402
import tensorflow as tf  # noqa: E402

import clipops  # noqa: E402
import clipops.numpy as cnp  # noqa: E402

cases = {c.name: c for c in micro.build_cases(False)}
d = micro.make_data(cases["small_10k"], 0)
clipops.clip_by_global_norm(d.tensors, d.clip_norm)
tf.clip_by_global_norm(d.tensors, d.clip_norm)


def timed(fn, setup=None, n=60):
    ts = []
    for _ in range(n):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[10:]) * 1e3


kept = []
res = {
    "copy": timed(lambda: cnp.clip_by_global_norm(d.arrays, d.clip_norm)),
    "copy_no_free": timed(lambda: kept.append(cnp.clip_by_global_norm(d.arrays, d.clip_norm)),
                          setup=kept.clear),
    "inplace": timed(lambda: cnp.clip_by_global_norm(d.work, d.clip_norm, in_place=True),
                     setup=lambda: micro._restore(d)),
}
library = Path(clipops.__file__).parent.parent.name  # the --target folder's name
print(sys.argv[1], library, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
