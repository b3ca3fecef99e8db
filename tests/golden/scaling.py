"""How time and peak memory grow with the probe size N and the network width C, for one NB201
architecture: gradalign `score` (default scorers, whole process) against PyTorch's batch-of-one
loop, torch.func vmap (per-sample BN) and the batched train() step (summed gradient only, the
bound), each way in its own process so that its peak resident memory is its own.

    python3 tests/golden/scaling.py --gradalign target/release/gradalign --threads 2 \
        --out docs/results/scaling      # writes scaling.md, scaling.csv, scaling.svg

N runs over 16, 32, 64, 128, 256 at C = 16; C over 8, 16, 32, 64 at N = 64 (shipped CIFAR-10
probe, float32, CPU). PyTorch times include building the model, as gradalign's include loading
the ONNX file; each is measured once after one untimed warm-up call in the same process.
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

ARCH = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
SEED = 7
N_VALUES = [16, 32, 64, 128, 256]
C_VALUES = [8, 16, 32, 64]
WAYS = ["gradalign", "loop", "vmap", "batched"]


def worker(way, c, n, threads):
    """One PyTorch way in this process: prints seconds and peak RSS (MiB) as JSON."""
    import torch
    import nb201
    import torch_throughput as tt
    from make_fixtures import cifar_probe

    torch.set_num_threads(threads)
    orig = nb201.build
    nb201.build = lambda arch, seed: orig(arch, seed, C=c)
    x, y = cifar_probe(n)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    f = {"loop": tt.loop, "vmap": tt.vmap, "batched": tt.batched}[way]
    f(ARCH, SEED, x, y)  # warm-up
    t0 = time.perf_counter()
    f(ARCH, SEED, x, y)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_torch(way, c, n, threads):
    out = subprocess.run([sys.executable, __file__, "--worker", way, "--c", str(c), "--n", str(n),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_gradalign(binary, model, n, threads):
    env = dict(os.environ, GRADALIGN_THREADS=str(threads))
    t0 = time.perf_counter()
    out = subprocess.run([binary, "score", model, "--n", str(n), "--format", "json"], check=True,
                         capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "peak_mib": json.loads(out.stdout)["peak_rss_mib"]}


def svg(rows, path):
    """Two panels (seconds against N at C = 16, against C at N = 64), one polyline per way."""
    colours = {"gradalign": "#d62728", "loop": "#7f7f7f", "vmap": "#1f77b4", "batched": "#2ca02c"}
    w, h, pad = 360, 260, 45
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 20}" height="{h + 40}" '
             'font-family="sans-serif" font-size="11">']
    for p, (axis, xs, fixed) in enumerate([("n", N_VALUES, ("c", 16)), ("c", C_VALUES, ("n", 64))]):
        sel = [r for r in rows if r[fixed[0]] == fixed[1]]
        ymax = max(r["seconds"] for r in sel) * 1.1
        ox = p * (w + 20)
        parts.append(f'<text x="{ox + w / 2}" y="14" text-anchor="middle">seconds against {axis.upper()} '
                     f'({fixed[0].upper()} = {fixed[1]})</text>')
        parts.append(f'<line x1="{ox + pad}" y1="{h}" x2="{ox + w - 10}" y2="{h}" stroke="black"/>')
        parts.append(f'<line x1="{ox + pad}" y1="{h}" x2="{ox + pad}" y2="24" stroke="black"/>')

        def px(i, xs=xs, ox=ox):
            return ox + pad + i * (w - pad - 20) / (len(xs) - 1)

        def py(v, ymax=ymax):
            return h - v / ymax * (h - 30)
        for i, v in enumerate(xs):
            parts.append(f'<text x="{px(i)}" y="{h + 14}" text-anchor="middle">{v}</text>')
        for k in range(5):
            v = ymax * k / 4
            parts.append(f'<text x="{ox + pad - 4}" y="{py(v) + 4}" text-anchor="end">{v:.1f}</text>')
        for j, way in enumerate(WAYS):
            pts = " ".join(f"{px(xs.index(r[axis]))},{py(r['seconds'])}" for r in sel if r["way"] == way)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colours[way]}" stroke-width="2"/>')
            parts.append(f'<text x="{ox + pad + 8}" y="{34 + 13 * j}" fill="{colours[way]}">{way}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--c", type=int, default=16)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gradalign", default="target/release/gradalign")
    ap.add_argument("--out", default="docs/results/scaling")
    ap.add_argument("--report-only", action="store_true", help="rewrite scaling.md/.svg from scaling.csv")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.c, a.n, a.threads)
    configs = [(16, n) for n in N_VALUES] + [(c, 64) for c in C_VALUES if c != 16]
    if a.report_only:
        with open(os.path.join(a.out, "scaling.csv")) as f:
            next(f)
            rows = [dict(zip(["c", "n", "way", "seconds", "peak_mib"], line.strip().split(","))) for line in f]
        rows = [{**r, "c": int(r["c"]), "n": int(r["n"]), "seconds": float(r["seconds"]),
                 "peak_mib": float(r["peak_mib"])} for r in rows]
        return report(rows, configs, a)
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)
    from make_fixtures import export
    import nb201

    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp()
    rows = []
    for c, n in configs:
        model = os.path.join(tmp, f"c{c}.onnx")
        if not os.path.exists(model):
            export(nb201.build(ARCH, seed=SEED, C=c), model, (3, 32, 32))
        run_gradalign(a.gradalign, model, n, a.threads)  # warm-up (page cache, library load)
        for way in WAYS:
            r = run_gradalign(a.gradalign, model, n, a.threads) if way == "gradalign" else \
                run_torch(way, c, n, a.threads)
            rows.append({"c": c, "n": n, "way": way, **r})
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(a.out, "scaling.csv"), "w") as f:
        f.write("c,n,way,seconds,peak_mib\n")
        for r in rows:
            f.write(f"{r['c']},{r['n']},{r['way']},{r['seconds']:.3f},{r['peak_mib']:.0f}\n")
    report(rows, configs, a)


def report(rows, configs, a):
    import torch
    svg(rows, os.path.join(a.out, "scaling.svg"))
    md = ["# Scaling with the probe size N and the width C", "",
          f"One NB201 architecture (`{ARCH}`, seed {SEED}), default scorers, float32, CPU, "
          f"{a.threads} threads, torch {torch.__version__}. Each cell: seconds (whole "
          "`gradalign score` process; PyTorch: model construction + gradients + the three scores, "
          "after a warm-up) / peak resident MiB of that process; the last column is > 1 where "
          "gradalign is the faster. Written by "
          "`python3 tests/golden/scaling.py --threads "
          f"{a.threads} --out {a.out}`; raw rows in `scaling.csv`, plot `scaling.svg`.", "",
          "| C | N | " + " | ".join(WAYS) + " | vmap ÷ gradalign |", "|---|---|" + "---|" * (len(WAYS) + 1)]
    for c, n in configs:
        cell = {r["way"]: r for r in rows if r["c"] == c and r["n"] == n}
        md.append(f"| {c} | {n} | " + " | ".join(f"{cell[w]['seconds']:.2f} s / {cell[w]['peak_mib']:.0f}"
                                                  for w in WAYS)
                  + f" | {cell['vmap']['seconds'] / cell['gradalign']['seconds']:.2f}× |")
    with open(os.path.join(a.out, "scaling.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
