"""Check a training graph written by `gradalign export-grad-graph` with the Python tools:
onnx.checker (full_check, i.e. with shape inference) and onnxruntime, whose per-sample
gradients must equal the ones `gradalign grads` wrote (per layer max|Δ| ≤ 1e-4 · max|g|).

    python3 tests/golden/check_export.py GRAD.onnx X.npy Y.npy G.npy LAYOUT.json

Needs `pip install onnx onnxruntime numpy`. Exit status 0 when everything matches.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    graph, xp, yp, gp, lp = sys.argv[1:6]
    model = onnx.load(graph)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input": np.load(xp), "labels": np.load(yp)})))
    g = np.load(gp).astype(np.float64)
    gmax = np.abs(g).max()
    worst = 0.0
    for e in json.load(open(lp)):
        ours = g[:, e["offset"]:e["offset"] + e["numel"]]
        key = "grad:" + e["name"]
        theirs = outs[key].astype(np.float64) if key in outs else np.zeros_like(ours)
        m = np.abs(ours).max()
        d = np.abs(ours - theirs).max()
        r = d / m if m > 1e-7 * gmax else d / gmax
        worst = max(worst, r)
    print(json.dumps({"nodes": len(model.graph.node), "outputs": len(names), "worst_layer": worst}))
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
