"""`gradalign grads` on PyTorch training-mode exports of NB201 architectures that the fixtures
and tests never used, with the 64-image CIFAR-10 probe, against PyTorch's batch-of-one train()
loop (float64, plus float32 for its own error).

    cargo build --release
    python3 tests/golden/check_grads.py [--k 4] [--seed 7] [--n 64] [--backend tract|ort]

Architectures: K indices drawn with numpy's default_rng(SEED) from the 15,625 NB201 cells
(data/nb201_accuracies.csv), skipping the fixtures.
Criteria (docs/results.md, Accuracy): f64 run: max|Δ| ≤ 1e-4·max|g| per layer; f32 run: per-sample
relative L2 ≤ max(1e-4, 3 × PyTorch-f32's own error) and per layer ≤ max(1e-4, 3 × PyTorch-f32's
layer error). Layers whose gradient is analytically zero (max|g| < 1e-7 of the global max) are
compared in absolute terms (≤ 1e-6 of the global max).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from make_fixtures import FIXTURES, ROOT, cifar_probe, export, per_sample_grads  # noqa: E402
import torch  # noqa: E402


def arch_strings():
    p = os.path.join(ROOT, "data", "nb201_accuracies.csv")
    return [l.split(",")[1] for l in open(p).read().splitlines()[1:]]


def run_cli(model, x, y, precision, d, backend):
    xp, yp = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
    np.save(xp, x), np.save(yp, y)
    g, l = os.path.join(d, f"g_{precision}.npy"), os.path.join(d, "l.json")
    subprocess.run([os.path.join(ROOT, "target", "release", "gradalign"), "grads", model, "--data", xp, "--labels", yp,
                    "--params", "all", "--precision", precision, "--backend", backend, "--out", g, "--layout", l],
                   check=True,
                   stderr=subprocess.DEVNULL)
    return np.load(g).astype(np.float64), json.load(open(l))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--backend", default="tract", help="f32 runs: tract, ort or auto (f64 runs use tract)")
    a = ap.parse_args()
    archs = arch_strings()
    rng = np.random.default_rng(a.seed)
    idx = [int(i) for i in rng.choice(len(archs), size=a.k + 5, replace=False) if archs[i] not in FIXTURES.values()][:a.k]
    x, y = cifar_probe(a.n)
    ok = True
    for i in idx:
        arch = archs[i]
        model = nb201.build(arch, seed=1000 + i)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            export(model, path, (3, 32, 32))
            names, g64, _ = per_sample_grads(model, x, y, torch.float64)
            _, g32, _ = per_sample_grads(model, x, y, torch.float32)
            sizes = [p.numel() for p in model.parameters()]
            offs = dict(zip(names, np.cumsum([0] + sizes[:-1])))
            gmax = np.abs(g64).max()
            res = {}
            for prec in ("f64", "f32"):
                ours, lay = run_cli(path, x, y, prec, d, a.backend if prec == "f32" else "tract")
                worst, worst_zero, violations = 0.0, 0.0, 0
                num = np.zeros(a.n); den = np.zeros(a.n)
                for e in lay:
                    o = offs[e["name"]]
                    A = ours[:, e["offset"]:e["offset"] + e["numel"]]
                    B = g64[:, o:o + e["numel"]]
                    C = g32[:, o:o + e["numel"]]
                    num += ((A - B) ** 2).sum(1); den += (B ** 2).sum(1)
                    m, dmax = np.abs(B).max(), np.abs(A - B).max()
                    if m < 1e-7 * gmax:
                        worst_zero = max(worst_zero, dmax / gmax)
                        violations += dmax > 1e-6 * gmax
                        continue
                    r = dmax / m
                    torch_r = np.abs(C - B).max() / m
                    allowed = 1e-4 if prec == "f64" else max(1e-4, 3 * torch_r)
                    violations += r > allowed
                    worst = max(worst, r)
                sample = np.sqrt(num / den)
                torch_sample = np.linalg.norm(g32 - g64, axis=1) / np.linalg.norm(g64, axis=1)
                if prec == "f32":
                    violations += int((sample > np.maximum(1e-4, 3 * torch_sample)).sum())
                res[prec] = dict(worst_layer=worst, worst_zero_layer=worst_zero, max_sample_l2=float(sample.max()),
                                 torch_f32_max_sample_l2=float(torch_sample.max()), violations=int(violations))
                ok &= violations == 0
            print(json.dumps({"index": i, "arch": arch, "params": int(sum(sizes)), **res}))
    print("ALL WITHIN TOLERANCE" if ok else "SOME OUT OF TOLERANCE")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
