"""Time and peak memory on a ResNet-18-sized model: torchvision resnet18 (num_classes = 10) with a
CIFAR stem (3x3 stride-1 first convolution, no max-pool; 11.17 M weights), seeded, exported in
training mode. gradalign `score` (default scorers, whole process, with and without --max-memory)
against torch.func vmap (per-sample BN, per-sample gradients of the Conv/Linear weights + the
default scores) and PyTorch's batched train() step (summed gradient only), every way in its own
process so that each peak resident memory is its own.

    /tmp/tv/bin/python tests/golden/resnet18.py --gradalign target/release/gradalign \
        --n 64 --threads 2 --out docs/results/resnet18      # writes resnet18.md, resnet18.csv

The PyTorch times include building the model, as gradalign's include loading the ONNX file; each
is measured once after one untimed warm-up call in the same process. The report also states the
two sizes the memory goal is stated in: the N x P float32 gradient matrix and the activations
(every leaf module's float32 output for the N probe images, summed).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

SEED = 0


def build(seed=SEED):
    import torch
    import torch.nn as nn
    import torchvision

    torch.manual_seed(seed)
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m.train()


def worker(way, n, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torch_throughput as tt
    from make_fixtures import cifar_probe

    torch.set_num_threads(threads)
    x, y = cifar_probe(n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def vmap():
        from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap as tvmap
        model = build()
        replace_all_batch_norm_modules_(model)
        names = tt.weight_names(model)
        params = {k: p.detach() for k, p in model.named_parameters()}
        wanted = {k: params[k] for k in names}
        rest = {k: p for k, p in params.items() if k not in wanted}
        buffers = dict(model.named_buffers())

        def loss(w, xi, yi):
            out = functional_call(model, ({**rest, **w}, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        per = tvmap(grad(loss), in_dims=(None, 0, 0))(wanted, x, y)
        g = torch.cat([per[k].reshape(len(y), -1) for k in names], dim=1)
        return tt.scores(g, y)

    def batched():
        model = build()
        model.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()

    def sizes():
        model = build()
        total = [0]

        def hook(_m, _i, out):
            total[0] += out.numel() * 4

        for m in model.modules():
            if len(list(m.children())) == 0:
                m.register_forward_hook(hook)
        with torch.no_grad():
            model(x)
        p = sum(w.numel() for k, w in model.named_parameters() if k in set(tt.weight_names(model)))
        return {"weights": p, "grad_matrix_mib": n * p * 4 / 2**20, "activations_mib": total[0] / 2**20}

    if way == "sizes":
        print(json.dumps(sizes()))
        return
    f = {"vmap": vmap, "batched": batched}[way]
    f()  # warm-up
    t0 = time.perf_counter()
    res = f()
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "scores": res}))


def run_torch(way, n, threads):
    out = subprocess.run([sys.executable, __file__, "--worker", way, "--n", str(n), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_gradalign(binary, model, n, threads, extra):
    env = dict(os.environ, GRADALIGN_THREADS=str(threads))
    t0 = time.perf_counter()
    out = subprocess.run([binary, "score", model, "--n", str(n), "--format", "json"] + extra, check=True,
                         capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    js = json.loads(out.stdout)
    return {"seconds": secs, "peak_mib": js["peak_rss_mib"], "scores": js.get("scores"),
            "phases": js.get("seconds")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradalign", default="target/release/gradalign")
    ap.add_argument("--model", help="reuse this export instead of exporting to a temporary folder")
    ap.add_argument("--ways", default="sizes,gradalign,gradalign-4G,gradalign-2G,vmap,batched")
    ap.add_argument("--out", default="docs/results/resnet18")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.n, a.threads)
    import warnings
    warnings.filterwarnings("ignore")
    model = a.model
    if not model:
        from make_fixtures import export
        model = os.path.join(tempfile.mkdtemp(), "resnet18_cifar.onnx")
        export(build(), model, (3, 32, 32))
    rows = {}
    for way in a.ways.split(","):
        if way == "sizes":
            rows[way] = run_torch("sizes", a.n, a.threads)
        elif way.startswith("gradalign"):
            extra = ["--max-memory", way.split("-")[1]] if "-" in way else []
            rows[way] = run_gradalign(a.gradalign, model, a.n, a.threads, extra)
        else:
            rows[way] = run_torch(way, a.n, a.threads)
        print(json.dumps({"way": way, **rows[way]}), flush=True)
    os.makedirs(a.out, exist_ok=True)
    import torch
    meta = {"n": a.n, "threads": a.threads, "torch": torch.__version__, "rows": rows}
    with open(os.path.join(a.out, "resnet18.json"), "w") as f:
        json.dump(meta, f, indent=1)
    report(meta, os.path.join(a.out, "resnet18.md"))


def report(meta, path):
    rows = meta["rows"]
    sz = rows["sizes"]
    bound = 1.5 * (sz["grad_matrix_mib"] + sz["activations_mib"])
    vmap = rows["vmap"]["seconds"]
    lines = [
        "# A ResNet-18-sized model: time and peak memory",
        "",
        f"torchvision `resnet18(num_classes=10)` with a CIFAR stem, {sz['weights']:,} Conv/Linear "
        f"weights, N = {meta['n']} shipped CIFAR-10 probe images, float32, CPU, "
        f"{meta['threads']} threads, PyTorch {meta['torch']}. Every way in its own process "
        "(`tests/golden/resnet18.py`, command in its docstring); gradalign is the whole "
        "`gradalign score` process with the default scorers.",
        "",
        f"The N × P float32 gradient matrix is {sz['grad_matrix_mib']:.0f} MiB and the activations "
        f"(every leaf module's output for the N images) {sz['activations_mib']:.0f} MiB; 1.5× their "
        f"sum is {bound:.0f} MiB.",
        "",
        "| way | seconds | peak RSS (MiB) | vmap ÷ this way | within |",
        "|---|---|---|---|---|",
    ]
    for way, r in rows.items():
        if way == "sizes":
            continue
        if way.startswith("gradalign-"):
            limit = float(way.split("-")[1].rstrip("G")) * 1024
            within = f"--max-memory {way.split('-')[1]}: {'yes' if r['peak_mib'] <= limit else 'NO'}"
        elif way == "gradalign":
            within = f"1.5 × (matrix + activations): {'yes' if r['peak_mib'] <= bound else 'NO'}"
        else:
            within = ""
        label = {"gradalign": "`gradalign score` (default options)", "vmap": "PyTorch torch.func vmap",
                 "batched": "PyTorch batched train() step (summed gradient only)"}.get(
            way, f"`gradalign score --max-memory {way.split('-')[-1]}`")
        lines.append(f"| {label} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {vmap / r['seconds']:.2f}× | {within} |")
    g = rows.get("gradalign", {})
    if g.get("phases"):
        ph = g["phases"]["phases"]
        lines += ["", "gradalign's phases (seconds): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()) +
                  f", scorers {g['phases']['scorers']:.2f}."]
    if g.get("scores") and rows.get("vmap", {}).get("scores"):
        lines += ["", "Scores, gradalign (f32, ONNX Runtime) and vmap (f32):", ""]
        for k in g["scores"]:
            lines.append(f"- {k}: {g['scores'][k]:.6g} and {rows['vmap']['scores'][k]:.6g}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
