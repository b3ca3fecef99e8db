"""The worked example of docs/python.md: score a handful of torchvision and timm candidates
with gradalign and plot score against parameter count.

    pip install . torch torchvision timm matplotlib
    python scripts/python_example.py      # writes docs/results/python/candidates.{csv,png}

Prints one line per candidate; a candidate gradalign cannot score exactly is reported with the
reason instead of a number.
"""

import csv
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision

import gradalign

OUT = Path(__file__).resolve().parents[1] / "docs/results/python"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)

# ImageNet-style networks reach a 1×1 feature map at 32×32, where per-sample BatchNorm is
# undefined (gradalign refuses it, as PyTorch does); at 64×64 the last stage is 2×2.
x, y = gradalign.cifar10_probe(n=32)
x = torch.nn.functional.interpolate(torch.from_numpy(x), size=64, mode="bilinear",
                                    align_corners=False)

candidates = {
    "tv/resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv/resnet34": lambda: torchvision.models.resnet34(num_classes=10),
    "tv/mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "tv/shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),
    "tv/squeezenet1_1": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "timm/resnet10t": lambda: timm.create_model("resnet10t", num_classes=10),
    "timm/mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050",
                                                            num_classes=10),
    "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=10),
}

rows = []
for name, make in candidates.items():
    net = make()
    params = sum(p.numel() for p in net.parameters())
    t = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            model = gradalign.from_torch(net, x[:2])
        r = gradalign.score(model, data=x, labels=y)
        scores, error = r["scores"], "; ".join(r["warnings"]) or None
    except gradalign.GradalignError as e:
        scores, error = {}, str(e)
    secs = time.time() - t
    rows.append({"model": name, "params": params, **scores, "seconds": round(secs, 2),
                 "error": error})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) or f"not scored: {error}"
    print(f"{name:28s} {params / 1e6:6.2f} M params  {secs:5.1f} s  {shown}")

names = ["gradalign-i", "gradalign-ii", "gradsign"]
with open(OUT / "candidates.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["model", "params", *names, "seconds", "error"])
    w.writeheader()
    w.writerows(rows)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, s in zip(axes, ["gradalign-i", "gradalign-ii"]):
    ok = [r for r in rows if r.get(s) is not None]
    ax.scatter([r["params"] / 1e6 for r in ok], [r[s] for r in ok])
    for r in ok:
        ax.annotate(r["model"], (r["params"] / 1e6, r[s]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(s)
    if s == "gradalign-i":
        ax.set_yscale("log")
fig.suptitle("gradalign scores of torchvision/timm candidates at initialisation "
             "(32 CIFAR-10 images at 64×64)")
fig.tight_layout()
fig.savefig(OUT / "candidates.png", dpi=120)
print(f"wrote {OUT / 'candidates.csv'} and {OUT / 'candidates.png'}")
