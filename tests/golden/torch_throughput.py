"""PyTorch's three ways to get what `gradalign rank` computes with the default scorers
(gradalign-i, gradalign-ii, gradsign on the Conv/Linear weight columns), timed per architecture
on the same seeded NB201 architectures that `export_archs.py` exports:

  loop     batch-of-one train() loop (zero-cost-nas / GradSign style) + the three scores
  vmap     torch.func.vmap(grad(...)) over single samples, per-sample BatchNorm statistics
           (BN modules stop tracking running statistics, as torch.func requires) + the scores
  batched  one batched train() forward + backward of the same N images (summed gradient only):
           the arithmetic any per-sample method must at least do

Every timing includes building the model from its architecture string, as `rank` includes
loading the ONNX file. Float32, CPU, `--threads` intra-op threads.

    python3 tests/golden/torch_throughput.py --count 24 --seed 0 [--n 64] [--threads 2]

Prints one JSON line per architecture, then a summary line {"summary": ...}.
Used by `cargo xtask bench throughput`.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from export_archs import OPS  # noqa: E402
from make_fixtures import cifar_probe  # noqa: E402

EPS = 1e-6


def archs(count, seed):
    rng = np.random.default_rng(seed)
    for k in range(count):
        ops = [OPS[i] for i in rng.integers(0, 5, size=6)]
        yield k, "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|".format(*ops)


def weight_names(model):
    return [n + ".weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def scores(g, y):
    """The default scorers on per-sample weight gradients g [N, P] (sign-based, as gradalign)."""
    s = torch.sign(g)
    out = {"gradsign": float(s.sum(0).abs().sum())}
    ga1, ga2 = 0.0, 0.0
    for c in torch.unique(y):
        sc = s[y == c]
        ga1 += float((sc @ torch.sign(g[y == c].sum(0))).mean())
        k = (sc @ sc.T).double()
        d = torch.sqrt(torch.diag(k))
        outer = torch.outer(d, d)
        k = torch.where(outer > 0, k / torch.where(outer > 0, outer, torch.ones_like(outer)), torch.zeros_like(k))
        ga2 += float(torch.linalg.slogdet(k + EPS * torch.eye(len(sc), dtype=k.dtype))[1])
    out["gradalign-i"] = ga1
    out["gradalign-ii"] = ga2
    return out


def loop(arch, seed, x, y):
    model = nb201.build(arch, seed=seed).train()
    names = set(weight_names(model))
    params = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return scores(torch.stack(rows), y)


def vmap(arch, seed, x, y):
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap as tvmap
    model = nb201.build(arch, seed=seed).train()
    replace_all_batch_norm_modules_(model)
    names = weight_names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    wanted = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in wanted}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(w, xi, yi):
        out = functional_call(model, ({**rest, **w}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per = tvmap(grad(loss), in_dims=(None, 0, 0))(wanted, x, y)
    g = torch.cat([per[n].reshape(len(y), -1) for n in names], dim=1)
    return scores(g, y)


def batched(arch, seed, x, y):
    model = nb201.build(arch, seed=seed).train()
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ways", default="loop,vmap,batched")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, y = cifar_probe(a.n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    ways = {"loop": loop, "vmap": vmap, "batched": batched}
    chosen = a.ways.split(",")
    # One warm-up of each way (first-call dispatch and allocator set-up), not timed.
    for w in chosen:
        ways[w](next(archs(1, a.seed))[1], 0, x, y)
    total = {w: 0.0 for w in chosen}
    for k, arch in archs(a.count, a.seed):
        row = {"index": k, "arch": arch}
        for w in chosen:
            t0 = time.perf_counter()
            res = ways[w](arch, a.seed * 100000 + k, x, y)
            secs = time.perf_counter() - t0
            total[w] += secs
            row[w + "_seconds"] = secs
            if res is not None:
                row[w + "_scores"] = res
        print(json.dumps(row), flush=True)
    print(json.dumps({"summary": {w: total[w] / a.count for w in chosen}, "count": a.count,
                      "n": a.n, "threads": a.threads, "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
