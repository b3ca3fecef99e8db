"""How much of the gap between our grad_norm/snip and their published values is BatchNorm
protocol: the same NB201 networks and images under both.

    python3 tests/golden/protocol_grad_norm.py --count 300 --seed 0 --out docs/results/protocols

Both are zero-cost-nas's sums over Conv2d/Linear weights of the batch gradient g: grad_norm =
Σ_layers ‖g‖, snip = Σ |W ⊙ g|.
- zero-cost-nas (`grad_norm.py`, `snip.py`): one train() pass over the 64 images, so every
  BatchNorm normalises with the statistics of the whole batch (coupling the images); batch-mean
  cross-entropy.
- ours (docs/semantics.md): g = Σ_n ∂L_n/∂W with each image normalised by its own statistics
  (a train() pass on a batch of one). A BatchNorm on a batch of one is an instance norm with
  the BatchNorm's affine, so one pass with BatchNorm2d swapped for F.instance_norm gives the
  same Σ_n ∂L_n/∂W without the 64-pass loop (`--check K` compares the two on K networks).
Mean vs sum of the loss is a factor common to all networks and changes no ranking.
Networks: tests/golden/nb201.py (PyTorch's default initialisation, seed = index); images: the
shipped CIFAR-10 probe (64, class-balanced); accuracy: CIFAR-10 test, data/nb201_accuracies.csv.
Writes grad_norm_snip.csv and grad_norm_snip.md to --out.
"""
import argparse
import csv
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nb201  # noqa: E402
from make_fixtures import ROOT, cifar_probe  # noqa: E402
from protocol_check import protocol_rows  # noqa: E402

LAYERS = (nn.Conv2d, nn.Linear)


class PerSampleBN(nn.Module):
    """BatchNorm2d as train() on a batch of one: each image's own spatial statistics."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return F.instance_norm(x, weight=self.bn.weight, bias=self.bn.bias, eps=self.bn.eps)


def per_sample_bn(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, PerSampleBN(child))
        else:
            per_sample_bn(child)
    return module


def sums(net):
    layers = [m for m in net.modules() if isinstance(m, LAYERS)]
    gn = sum(m.weight.grad.double().norm().item() for m in layers)
    sn = sum((m.weight.detach().double() * m.weight.grad.double()).abs().sum().item()
             for m in layers)
    return gn, sn


def batch_protocol(net, x, y):
    net.train()
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return sums(net)


def our_protocol(net, x, y):
    net.train()
    net.zero_grad()
    F.cross_entropy(net(x), y, reduction="sum").backward()
    return sums(net)


def loop_protocol(net, x, y):
    """The definition itself: 64 train() passes on a batch of one, gradients summed."""
    net.train()
    net.zero_grad()
    for i in range(len(x)):
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
    return sums(net)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", type=int, default=0,
                    help="compare the instance-norm pass with the 64-pass loop on K networks")
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
    if a.check:
        # The equivalence is checked in f64, where the two must agree to rounding.
        for i in picks[:a.check]:
            row = table[i]
            net = nb201.build(row["arch_str"], seed=int(row["index"])).double()
            loop = loop_protocol(net, x.double(), y)
            fast = our_protocol(per_sample_bn(net), x.double(), y)
            rel = max(abs(p - q) / abs(q) for p, q in zip(fast, loop))
            print(f"arch {row['index']}: loop {loop} one pass {fast} max rel diff {rel:.1e}")
            assert rel < 1e-9, "the instance-norm pass is not the per-sample definition"
    rows = []
    for k, i in enumerate(picks):
        row = table[i]
        net = nb201.build(row["arch_str"], seed=int(row["index"]))
        gb, sb = batch_protocol(net, x, y)
        go, so = our_protocol(per_sample_bn(net), x, y)
        rows.append({"index": row["index"], "arch_str": row["arch_str"],
                     "cifar10_test": row["cifar10_test"], "grad_norm_ours": go,
                     "grad_norm_batch": gb, "snip_ours": so, "snip_batch": sb})
        if k % 50 == 0:
            print(f"{k + 1}/{a.count}", flush=True)
    path = os.path.join(a.out, "grad_norm_snip.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report(rows, os.path.join(a.out, "grad_norm_snip.md"), a)


def report(rows, out, a):
    lines = [
        "# grad_norm and snip: per-sample vs batch BatchNorm",
        "",
        f"{len(rows)} NB201 architectures (seeded sample, seed {a.seed}), each scored on the same "
        "64 shipped CIFAR-10 images and the same PyTorch-initialised weights (f32; the one-pass form is checked against the 64-pass loop in f64 on the first `--check` networks) under both "
        "protocols by `python3 tests/golden/protocol_grad_norm.py --count "
        f"{a.count} --seed {a.seed} --check {a.check} --out docs/results/protocols` (the "
        "protocols: the script's header). Kendall τ-b and Spearman ρ with CIFAR-10 test "
        "accuracy; 95 % bootstrap interval of τ over architectures (1,000 resamples).",
        "",
        "| score | protocol | τ-b | 95 % interval | ρ |",
        "|---|---|---|---|---|",
    ]
    names = [("grad_norm_ours", "grad_norm", "ours: Σ of 64 per-sample gradients, per-sample BN"),
             ("grad_norm_batch", "grad_norm", "zero-cost-nas: batch BN over 64"),
             ("snip_ours", "snip", "ours: Σ of 64 per-sample gradients, per-sample BN"),
             ("snip_batch", "snip", "zero-cost-nas: batch BN over 64")]
    lines += protocol_rows(rows, names)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
