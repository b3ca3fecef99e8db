"""How much of the gap between our zico/fisher and their published values is protocol: the same
NB201 networks scored by the same images under our protocol and under the authors' code.

    python3 tests/golden/protocol_check.py --count 200 --seed 0 --out docs/results/protocols

Our protocol (docs/semantics.md): every BatchNorm normalises each image with its own statistics
(PyTorch train() on a batch of one), losses are per sample, and scores are built from the 64
per-sample gradients. The authors' code:
- fisher, NASLib / zero-cost-nas (`fisher.py`): one train() pass over the whole batch (BatchNorm
  with batch statistics, coupling the images), batch-mean cross-entropy, per layer and output
  channel ½·mean_n(Σ_spatial a·∂L/∂a)² from forward/backward hooks on Conv2d/Linear outputs.
- zico, SLDGroup/ZiCo (`ZeroShotProxy/compute_zico.py`): train() passes over 2 minibatches (32
  images each, shuffled), batch-mean cross-entropy, the Conv2d/Linear weight gradient recorded
  after each batch *without zeroing in between* (so the second record is the sum of both batch
  gradients), then Σ_layers log Σ mean|g|/std(g) over the records. `zico-zeroed` is the same with
  the gradient zeroed between batches, to separate that detail from the batch statistics.
Networks: tests/golden/nb201.py (PyTorch's default initialisation, seed = index); images: the
shipped CIFAR-10 probe (64, class-balanced); accuracy: CIFAR-10 test, data/nb201_accuracies.csv.
Writes scores.csv and report.md to --out.
"""
import argparse
import csv
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nb201  # noqa: E402
from make_fixtures import ROOT, cifar_probe  # noqa: E402

LAYERS = (nn.Conv2d, nn.Linear)


def hooks(net, store):
    hs = []
    for m in net.modules():
        if isinstance(m, LAYERS):
            def fwd(mod, inp, out):
                store.setdefault(mod, {})["act"] = out.detach()

            def bwd(mod, gin, gout):
                store[mod]["grad"] = gout[0].detach()
            hs.append(m.register_forward_hook(fwd))
            hs.append(m.register_full_backward_hook(bwd))
    return hs


def fisher_terms(store):
    """Per layer: Σ_spatial a·∂L/∂a, [N, channels]."""
    out = []
    for mod, d in store.items():
        a, g = d["act"], d["grad"]
        out.append((a * g).sum(dim=tuple(range(2, a.dim()))) if a.dim() > 2 else a * g)
    return out


def zico(records):
    """records: {layer: [R, numel]} → Σ_layers log Σ mean|g|/std(g) (ZiCo's caculate_zico)."""
    total = 0.0
    for g in records.values():
        std = g.std(axis=0)
        nz = std != 0
        s = (np.abs(g).mean(axis=0)[nz] / std[nz]).sum()
        if s != 0:
            total += np.log(s)
    return total


def weights(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, LAYERS)]


def ours(net, x, y):
    """Per-sample BatchNorm (batch of one), per-sample losses."""
    net.train()
    fisher = 0.0
    per_sample = {n: [] for n, _ in weights(net)}
    for i in range(len(x)):
        store = {}
        hs = hooks(net, store)
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for h in hs:
            h.remove()
        fisher += sum(0.5 * (t ** 2).sum().item() for t in fisher_terms(store))
        for n, m in weights(net):
            per_sample[n].append(m.weight.grad.detach().reshape(-1).numpy().copy())
    return fisher / len(x), zico({n: np.stack(v) for n, v in per_sample.items()})


def authors(net, x, y, perm):
    net.train()
    # fisher (NASLib): one pass over the batch, batch statistics, mean loss.
    store = {}
    hs = hooks(net, store)
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    for h in hs:
        h.remove()
    fisher = sum((0.5 * (t ** 2).mean(0)).sum().item() for t in fisher_terms(store))
    # zico (SLDGroup/ZiCo): two shuffled batches of 32; with and without zeroing in between.
    res = []
    for zero_between in (False, True):
        net.zero_grad()
        rec = {n: [] for n, _ in weights(net)}
        for b in range(2):
            idx = perm[b * 32:(b + 1) * 32]
            if zero_between:
                net.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            for n, m in weights(net):
                rec[n].append(m.weight.grad.detach().reshape(-1).numpy().copy())
        res.append(zico({n: np.stack(v) for n, v in rec.items()}))
    return fisher, res[0], res[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(ROOT, "data", "nb201_accuracies.csv")) as f:
        table = list(csv.DictReader(f))
    rng = np.random.default_rng(a.seed)
    picks = sorted(rng.choice(len(table), size=a.count, replace=False))
    xs, ys = cifar_probe(64)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    perm = torch.from_numpy(rng.permutation(64))
    path = os.path.join(a.out, "scores.csv")
    cols = ["index", "arch_str", "cifar10_test", "fisher_ours", "fisher_naslib", "zico_ours",
            "zico_authors", "zico_zeroed"]
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {r["index"]: r for r in csv.DictReader(f)}
    t0 = time.time()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if not done:
            w.writeheader()
        for k, i in enumerate(picks):
            row = table[i]
            if row["index"] in done:
                continue
            net = nb201.build(row["arch_str"], seed=int(row["index"]))
            fo, zo = ours(net, x, y)
            fn, za, zz = authors(net, x, y, perm)
            w.writerow({"index": row["index"], "arch_str": row["arch_str"],
                        "cifar10_test": row["cifar10_test"], "fisher_ours": fo,
                        "fisher_naslib": fn, "zico_ours": zo, "zico_authors": za,
                        "zico_zeroed": zz})
            f.flush()
            if k % 20 == 0:
                print(f"{k + 1}/{a.count} {time.time() - t0:.0f}s", flush=True)
    report(path, os.path.join(a.out, "report.md"), a)


def protocol_rows(rows, names):
    """Table rows `| score | protocol | τ-b | 95 % interval | ρ |` against CIFAR-10 test accuracy,
    the interval from 1,000 bootstrap resamples of the architectures (seed 1)."""
    acc = np.array([float(r["cifar10_test"]) for r in rows])
    rng = np.random.default_rng(1)
    boots = [rng.integers(0, len(rows), len(rows)) for _ in range(1000)]
    out = []
    for col, name, what in names:
        v = np.array([float(r[col]) for r in rows])
        tau = kendalltau(v, acc, variant="b")[0]
        bs = sorted(kendalltau(v[b], acc[b], variant="b")[0] for b in boots)
        rho = spearmanr(v, acc)[0]
        out.append(f"| {name} | {what} | {tau:.3f} | {bs[25]:.3f}–{bs[974]:.3f} | {rho:.3f} |")
    return out


def report(path, out, a):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    lines = [
        "# zico and fisher: our protocol vs the authors' code",
        "",
        f"{len(rows)} NB201 architectures (seeded sample, seed {a.seed}), each scored on the same "
        "64 shipped CIFAR-10 images and the same PyTorch-initialised weights under both protocols "
        "by `python3 tests/golden/protocol_check.py --count "
        f"{a.count} --seed {a.seed} --out docs/results/protocols` (what each protocol is: the "
        "script's header). Kendall τ-b and Spearman ρ with CIFAR-10 test accuracy; 95 % bootstrap "
        "interval of τ over architectures (1,000 resamples).",
        "",
        "| score | protocol | τ-b | 95 % interval | ρ |",
        "|---|---|---|---|---|",
    ]
    names = [("fisher_ours", "fisher", "ours: per-sample BN, per-sample losses"),
             ("fisher_naslib", "fisher", "NASLib: batch BN over 64, batch-mean loss"),
             ("zico_ours", "zico", "ours: 64 per-sample gradients, per-sample BN"),
             ("zico_authors", "zico", "ZiCo code: 2 batches of 32, batch BN, gradient not zeroed"),
             ("zico_zeroed", "zico", "as ZiCo code, gradient zeroed between batches")]
    lines += protocol_rows(rows, names)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
