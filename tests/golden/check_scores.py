"""`gradalign score` (default f32, --backend as given) on PyTorch training-mode exports of NB201
architectures the fixtures never used, with a 64-image .npy probe, against gradsign /
gradalign-i / gradalign-ii computed with the formulas of docs/semantics.md (tests/golden/scorers.py) from
PyTorch's float64 batch-of-one per-sample gradients of the same probe.

    cargo build --release
    python3 tests/golden/check_scores.py [--k 4] [--seed 11] [--backend auto|tract|ort]

Criterion (issue #3): ≤ 1e-3 relative, or ≤ 1e-3 absolute where |value| < 1.
"""
import argparse
import warnings
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
import scorers  # noqa: E402
from check_grads import arch_strings  # noqa: E402
from make_fixtures import FIXTURES, ROOT, cifar_probe, export, per_sample_grads  # noqa: E402
import torch  # noqa: E402


def main():
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    archs = arch_strings()
    rng = np.random.default_rng(a.seed)
    idx = [int(i) for i in rng.choice(len(archs), size=a.k + 5, replace=False) if archs[i] not in FIXTURES.values()][:a.k]
    x, y = cifar_probe(64)
    ok = True
    print(f"| arch index | scorer | PyTorch f64 grads | gradalign ({a.backend}, f32) | rel. diff |")
    print("| --- | --- | --- | --- | --- |")
    for i in idx:
        model = nb201.build(archs[i], seed=2000 + i)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            export(model, path, (3, 32, 32))
            xp, yp = os.path.join(d, "x.npy"), os.path.join(d, "y.npy")
            np.save(xp, x), np.save(yp, y)
            out = subprocess.run([os.path.join(ROOT, "target", "release", "gradalign"), "score", path, "--data", xp,
                                  "--labels", yp, "--backend", a.backend, "--format", "json"],
                                 check=True, capture_output=True, text=True).stdout
            ours = json.loads(out)["scores"]
            names, g, _ = per_sample_grads(model, x, y, torch.float64)
        m = model.double()
        blocks = scorers.weight_blocks(m)
        cols = np.concatenate([np.arange(sl.start, sl.stop) for _, _, sl in blocks])
        gw = g[:, cols]
        s = np.sign(gw)
        ref = {"gradalign-i": scorers.gradalign_i_dot(gw, s, y), "gradalign-ii": scorers.gradalign_ii(s, y, True),
               "gradsign": scorers.gradsign(s)}
        for k, v in ref.items():
            dlt = abs(ours[k] - v)
            rel = dlt if abs(v) < 1 else dlt / abs(v)
            ok &= rel <= 1e-3
            print(f"| {i} | {k} | {v:.8g} | {ours[k]:.8g} | {rel:.1e} |")
    print("ALL WITHIN 1e-3" if ok else "SOME ABOVE 1e-3")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
