"""Per-layer agreement of two gradient matrices written by `gradalign grads` (same layout):
max |A − B| / max |A| per parameter block, and the worst per-sample relative L2.

    python3 tests/golden/compare_grads.py A.npy B.npy layout.json [--tol 1e-4]
"""
import json
import sys

import numpy as np


def main():
    a, b = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
    layout = json.load(open(sys.argv[3]))
    tol = float(sys.argv[sys.argv.index("--tol") + 1]) if "--tol" in sys.argv else 1e-4
    gmax = np.abs(a).max()
    worst, worst_name = 0.0, ""
    for e in layout:
        s = slice(e["offset"], e["offset"] + e["numel"])
        m = np.abs(a[:, s]).max()
        d = np.abs(a[:, s] - b[:, s]).max()
        # analytically-zero blocks are judged against the global scale
        r = d / m if m > 1e-7 * gmax else (d / gmax if gmax > 0 else d)
        if r > worst:
            worst, worst_name = r, e["name"]
    per_sample = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
    ok = worst <= tol
    print(f"max per-layer rel {worst:.2e} ({worst_name}), worst per-sample rel L2 {per_sample.max():.2e}, "
          f"median {np.median(per_sample):.2e} -> {'OK' if ok else 'ABOVE'} tol {tol:g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
