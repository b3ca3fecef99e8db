"""Export K seeded random NAS-Bench-201 architectures as PyTorch training-mode ONNX files
(used by scripts/gpu-check.sh for throughput; any torch with the TorchScript exporter).

    python3 tests/golden/export_archs.py --count 200 --seed 0 --out DIR
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from make_fixtures import export  # noqa: E402

OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    for k in range(a.count):
        ops = [OPS[i] for i in rng.integers(0, 5, size=6)]
        arch = "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops)
        path = os.path.join(a.out, f"arch_{k:04d}.onnx")
        export(nb201.build(arch, seed=a.seed * 100000 + k), path, (3, 32, 32))
    print(f"exported {a.count} architectures to {a.out}")


if __name__ == "__main__":
    main()
