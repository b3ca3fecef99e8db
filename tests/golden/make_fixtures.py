"""Export the ONNX fixtures under models/ and the PyTorch golden per-sample gradients under
tests/golden/<fixture>/.

Exact command (from the repository root; torch 2.8.0 CPU is enough):

    pip install torch==2.8.0 onnx numpy
    python3 tests/golden/make_fixtures.py

Golden gradients are PyTorch's own protocol (docs/semantics.md): model.train(), a loop over single
images, softmax cross-entropy, in float64; the same loop in float32 gives the error PyTorch
itself makes on each sample (docs/results.md, Accuracy), saved next to them. BN-eval goldens use model.eval().
"""
import json
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(__file__))
import nb201  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODELS = os.path.join(ROOT, "models")
GOLDEN = os.path.join(ROOT, "tests", "golden")
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def cifar_probe(n, path=os.path.join(ROOT, "data", "cifar10_probe.bin")):
    """Class-balanced, like gradalign: ⌊n/10⌋ per class (+1 for the first n mod 10 classes),
    the first images of each class in file order, ordered by class."""
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    xs, ys = [], []
    for c in range(10):
        want = n // 10 + (1 if c < n % 10 else 0)
        rows = raw[raw[:, 0] == c][:want]
        img = rows[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        xs.append((img - MEAN[None, :, None, None]) / STD[None, :, None, None])
        ys.append(np.full(len(rows), c, dtype=np.int64))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def export(model, path, sample_shape):
    model.train()
    x = torch.zeros((2,) + tuple(sample_shape))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.onnx.export(
        model, (x,), path, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
        opset_version=17, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
    )
    # Tracing ran a training-mode forward that moved the BN running statistics: restore them,
    # then make the PyTorch model hold exactly the exported initializers.
    model.load_state_dict(state)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    sd = model.state_dict()
    for k in sd:
        if k.endswith("num_batches_tracked"):
            continue
        if k in inits:
            sd[k] = torch.from_numpy(inits[k].copy())
        else:
            raise SystemExit(f"{path}: parameter {k} not found among the ONNX initializers")
    model.load_state_dict(sd)


def per_sample_grads(model, x, y, dtype, train=True):
    # train() forwards update BN running statistics: restore them afterwards so that every
    # golden (and the eval-mode one in particular) sees exactly the exported weights.
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    m = model.to(dtype)
    m.train(train)
    names = [n for n, _ in m.named_parameters()]
    rows, logits = [], []
    for i in range(len(y)):
        m.zero_grad()
        out = m(torch.from_numpy(x[i:i + 1]).to(dtype))
        F.cross_entropy(out, torch.from_numpy(y[i:i + 1])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).detach().double().numpy())
        logits.append(out.detach().double().numpy()[0])
    model.float()
    model.load_state_dict(saved)
    return names, np.stack(rows), np.stack(logits)


def write_golden(name, model, x, y, sample_shape, probe):
    """probe: the folder (relative to the repository root) that holds x.npy and y.npy; fixtures
    that share a probe share the folder, so each probe is stored once."""
    os.makedirs(MODELS, exist_ok=True)
    path = os.path.join(MODELS, f"{name}.onnx")
    export(model, path, sample_shape)
    out = os.path.join(GOLDEN, name)
    os.makedirs(out, exist_ok=True)
    os.makedirs(os.path.join(ROOT, probe), exist_ok=True)
    np.save(os.path.join(ROOT, probe, "x.npy"), x)
    np.save(os.path.join(ROOT, probe, "y.npy"), y)
    meta = {"model": f"models/{name}.onnx", "probe": probe, "samples": int(len(y)), "params": []}
    names, g64, z64 = per_sample_grads(model, x, y, torch.float64)
    _, g32, _ = per_sample_grads(model, x, y, torch.float32)
    off = 0
    for n, p in zip(names, model.parameters()):
        blk = slice(off, off + p.numel())
        scale = np.abs(g64[:, blk]).max()
        # PyTorch's own f32 error on this layer, max|g32 - g64| / max|g64| (docs/results.md, Accuracy).
        err = float(np.abs(g32[:, blk] - g64[:, blk]).max() / scale) if scale > 0 else 0.0
        meta["params"].append({"name": n, "shape": list(p.shape), "offset": off, "numel": p.numel(),
                               "pytorch_f32_layer_error": err})
        off += p.numel()
    err32 = np.linalg.norm(g32 - g64, axis=1) / np.maximum(np.linalg.norm(g64, axis=1), 1e-300)
    meta["pytorch_f32_rel_l2_error"] = err32.tolist()
    np.save(os.path.join(out, "grads_sample.npy"), g64.astype(np.float32))
    np.save(os.path.join(out, "logits_sample.npy"), z64.astype(np.float32))
    if name in EVAL_GOLDEN:
        _, ge, ze = per_sample_grads(model, x, y, torch.float64, train=False)
        np.save(os.path.join(out, "grads_eval.npy"), ge.astype(np.float32))
        np.save(os.path.join(out, "logits_eval.npy"), ze.astype(np.float32))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: {off} parameters, PyTorch f32 per-sample error {err32.max():.2e} max")


class ToyMLP(nn.Module):
    """A small MLP/Transformer-ish block: Linear, LayerNorm, GELU, a residual, Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = F.gelu(self.ln(self.fc1(x)))
        h = h + torch.tanh(self.fc2(h))
        return self.head(torch.sigmoid(h) * h)


# BN-eval goldens. Not nb201_all_none: with every cell "none" the features reaching the last
# BatchNorm are zero in both modes, so its eval gradients equal its sample-mode ones exactly.
EVAL_GOLDEN = ("nb201_avg_pool_heavy",)

FIXTURES = {
    # name: (arch index in nb201_accuracies.csv, arch string, seed)
    "nb201_resnet_like": "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
    "nb201_all_none": "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
    "nb201_avg_pool_heavy": "|avg_pool_3x3~0|+|avg_pool_3x3~0|nor_conv_1x1~1|+|avg_pool_3x3~0|avg_pool_3x3~1|avg_pool_3x3~2|",
    "nb201_random_a": "|nor_conv_1x1~0|+|skip_connect~0|avg_pool_3x3~1|+|nor_conv_3x3~0|none~1|nor_conv_1x1~2|",
    "nb201_random_b": "|skip_connect~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|none~0|nor_conv_1x1~1|avg_pool_3x3~2|",
}


def main():
    x, y = cifar_probe(64)
    # Two samples of two classes keep the committed goldens small (the 64-image check is
    # tests/golden/check_grads.py, run against the CLI).
    pick = [0, 40]
    xs, ys = x[pick], y[pick]
    rows = ["name,seed,arch_str"]
    for i, (name, arch) in enumerate(FIXTURES.items()):
        write_golden(name, nb201.build(arch, seed=100 + i), xs, ys, (3, 32, 32), "tests/golden/nb201_probe")
        rows.append(f"{name},{100 + i},{arch}")
    with open(os.path.join(MODELS, "nb201_fixtures.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    torch.manual_seed(7)
    rng = np.random.default_rng(7)
    xm = rng.standard_normal((6, 12)).astype(np.float32)
    ym = np.array([0, 1, 2, 3, 4, 0], dtype=np.int64)
    write_golden("toy_mlp", ToyMLP(), xm, ym, (12,), "tests/golden/toy_mlp")


if __name__ == "__main__":
    main()
