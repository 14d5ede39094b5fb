"""The scale pass alone (use_norm given: no norm pass) of micro.py's mixed list
and ResNet-50 list through the NumPy front end, copying and in place: medians
(ms) of 50 calls after 10. Usage: python scale_only.py LABEL (printed first)."""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for micro.py
import clipops  # noqa: E402
import clipops.numpy as cnp  # noqa: E402
import micro  # noqa: E402

cases = {c.name: c for c in micro.build_cases(False)}
res = {}
for name in ("mixed_f16_f32", "resnet50"):
    d = micro.make_data(cases[name], 0)

    def copy():
        return cnp.clip_by_global_norm(d.arrays, d.clip_norm, use_norm=d.norm64)

    def inplace():
        return cnp.clip_by_global_norm(d.work, d.clip_norm, use_norm=d.norm64, in_place=True)

    for label, fn, setup in (("copy", copy, None), ("inplace", inplace, lambda: micro._restore(d))):
        ts = []
        for _ in range(60):
            if setup:
                setup()
            t0 = time.perf_counter()
            r = fn()
            ts.append(time.perf_counter() - t0)
            del r
        res[f"{name}/{label}"] = statistics.median(ts[10:]) * 1e3
library = Path(clipops.__file__).parent.parent.name  # the --target folder's name
print(sys.argv[1], library, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
