"""The PyTorch reference protocol, timed: per-sample gradients of an NB201 network by a loop
over single images in train() mode (zero-cost-nas / GradSign style), float32, CPU.

    python3 tests/golden/torch_loop.py ARCH_STR [--n 64] [--threads T] [--seed S]

Prints one JSON line: {"arch", "n", "params", "seconds", "batched_seconds", "peak_rss_mib",
"threads"}; "batched_seconds" is one batched forward + backward of the same images (the bound).
Used by `cargo xtask bench-grads`.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402
from make_fixtures import cifar_probe  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("arch")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = nb201.build(a.arch, seed=a.seed)
    model.train()
    x, y = cifar_probe(a.n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    params = [p for p in model.parameters()]
    t0 = time.perf_counter()
    rows = []
    for i in range(a.n):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    g = torch.stack(rows)
    secs = time.perf_counter() - t0
    # The bound any per-sample method must beat: one batched train() forward + backward of the
    # same N images (summed gradients only, batch-statistics BN; same FLOPs as the per-sample
    # forward/backward, without the N × P output). One warm-up, then the median of 3.
    batched = []
    for k in range(4):
        t1 = time.perf_counter()
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        batched.append(time.perf_counter() - t1)
    batched = sorted(batched[1:])[1]
    print(json.dumps({"arch": a.arch, "n": a.n, "params": int(g.shape[1]), "seconds": secs,
                      "batched_seconds": batched,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "threads": a.threads}))


if __name__ == "__main__":
    main()
