"""Golden linear-region counts from PyTorch for the TE-NAS thin NB201 network (tests/linear_regions.rs).

Exact command (from the repository root; torch 2.8.0 CPU is enough):

    pip install torch==2.8.0 onnx numpy
    python3 tests/golden/linear_regions.py

For each fixture architecture it exports the thin network (nb201.ThinNetwork, PyTorch default
initialisation, seeded) to tests/golden/linear_regions/<name>.onnx in training mode, and counts
distinct ReLU activation patterns on tests/golden/linear_regions/inputs.npy (1000 × 1×3×3,
standard normal, numpy seed 0) two ways, in float64:

- "tenas": TE-NAS's collector (VITA-Group/TENAS lib/procedures/linear_region_counter.py):
  model.train(), forward hooks on every nn.ReLU whose input is 4-D keeping sign(output), the
  inputs in 2 batches of 500 (batch-statistics BN per batch), count Σ 1/multiplicity.
- "sample": the same patterns with a loop over single samples in train() (per-sample BN, the
  gradalign default), all ReLUs.

"margin" is the smallest non-zero |ReLU input| seen; far from 0 means float32 cannot flip a sign
(exact zeros, from `none` edges, are zero in any precision).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from make_fixtures import export  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "golden", "linear_regions")
BATCHES = 2


def tenas_count(codes):
    # TE-NAS's calc_LR, in float64: two rows are the same region when they agree everywhere.
    a = torch.from_numpy(codes).double()
    res = a @ (1 - a).T
    res = res + res.T
    res = 1 - torch.sign(res)
    return float((1.0 / res.sum(1)).sum())


def collect(model, xs, batched):
    feats, inputs = [], []

    def hook(mod, inp, out):
        if batched and inp[0].dim() != 4:
            return
        feats.append(out.detach())
        inputs.append(inp[0].detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    rows, margin = [], float("inf")
    chunks = np.split(xs, BATCHES) if batched else [xs[i:i + 1] for i in range(len(xs))]
    with torch.no_grad():
        for c in chunks:
            feats.clear()
            inputs.clear()
            model(torch.from_numpy(c).double())
            rows.append(torch.cat([f.reshape(len(c), -1) for f in feats], 1).sign().numpy())
            nz = [i.abs()[i != 0] for i in inputs]
            margin = min([margin] + [float(v.min()) for v in nz if v.numel()])
    for h in handles:
        h.remove()
    return np.concatenate(rows), margin


def main():
    os.makedirs(OUT, exist_ok=True)
    xs = np.random.default_rng(0).standard_normal((1000, 1, 3, 3)).astype(np.float32)
    np.save(os.path.join(OUT, "inputs.npy"), xs)
    golden = {}
    with open(os.path.join(ROOT, "models", "nb201_fixtures.csv")) as f:
        fixtures = [l.strip().split(",") for l in f.readlines()[1:]]
    for name, seed, arch in fixtures:
        name = name.replace("nb201_", "thin_")
        torch.manual_seed(int(seed))
        model = nb201.ThinNetwork(arch)
        export(model, os.path.join(OUT, f"{name}.onnx"), (1, 3, 3))
        model = model.double().train()
        codes_b, margin_b = collect(model, xs, batched=True)
        codes_s, margin_s = collect(model, xs, batched=False)
        golden[name] = {
            "arch": arch,
            "tenas": tenas_count(codes_b),
            "tenas_distinct": int(len(np.unique(codes_b, axis=0))),
            "sample": int(len(np.unique(codes_s, axis=0))),
            "margin": None if min(margin_b, margin_s) == float("inf") else min(margin_b, margin_s),
        }
        print(name, golden[name])
    with open(os.path.join(OUT, "counts.json"), "w") as f:
        json.dump(golden, f, indent=1)


if __name__ == "__main__":
    main()
