"""gradalign's NB101 generator (Rust, src/tools/zoo/nb101.rs) against the independent PyTorch build
of tests/golden/nb101.py, with the same weights loaded by name: logits of a per-sample
train()-mode forward (f64 to 1e-9, f32 within PyTorch-f32's own rounding), per-sample
gradients in f64 to ≤ 1e-6 · max|g| on every layer, and in f32 per sample within
max(1e-4, 5 × PyTorch-f32's own error) in relative L2 (see below for why not 3×).
Six cells: 2, 5, 6 and 7 vertices, input→output edges, truncated summands.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradalign  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "golden"))
import nb101  # noqa: E402

CELLS = {
    # hash: (vertices, input→output edge, truncation)
    "043721b9c7fe8c5fad811d47d83132ec": "2 vertices, input→output only",
    "006a8c8225a795824292a06f371586e7": "5 vertices, input→output, truncation",
    "00040b38293651f17fb665401c671bbb": "6 vertices, truncation",
    "0006fafddf51f3b7d304e76e20bdd6a3": "6 vertices, input→output",
    "00005c142e6f48ac74fdcf73e3439874": "7 vertices",
    "000834cf25da3d33a8c0b0fed475d0f3": "7 vertices, input→output, truncation",
}
HW = 32  # NB101's own input size (at 16×16 the last stage's per-sample BN sees 16 values)


@pytest.fixture(scope="module")
def models(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb101")
    # GRADALIGN_XTASK: a prebuilt xtask binary (.ci/run sets it), else `cargo xtask`.
    xtask = os.environ.get("GRADALIGN_XTASK", "").split() or ["cargo", "xtask"]
    subprocess.run(xtask + ["gen-nb101", "--hash", ",".join(CELLS), "--input",
                            str(HW), "--out", str(out)], cwd=root, check=True)
    rows = {}
    for line in (root / "data/nb101_accuracies.csv").read_text().splitlines()[1:]:
        f = line.split(",")
        if f[0] in CELLS:
            rows[f[0]] = (f[2], f[3], int(f[6]))
    return out, rows


def torch_loop(net, x, y, names):
    net.train()
    params = dict(net.named_parameters())
    rows = []
    for i in range(len(x)):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append({n: params[n].grad.detach().double().numpy().copy() for n in names})
    return {n: np.stack([r[n] for r in rows]) for n in names}


def rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("cell", list(CELLS), ids=[f"{h[:8]} ({d})" for h, d in CELLS.items()])
def test_nb101_generator_equals_pytorch_build(models, cell):
    out, rows = models
    adjacency, ops, params = rows[cell]
    path = out / f"nb101-{cell}.onnx"
    m, ops = nb101.parse(adjacency, ops)
    net = nb101.load_onnx_weights(nb101.Network(m, ops), str(path))
    assert sum(p.numel() for p in net.parameters()) == params  # NB101's own count

    torch.manual_seed(1)
    x = torch.randn(2, 3, HW, HW)
    y = torch.tensor([3, 7])
    net64 = nb101.load_onnx_weights(nb101.Network(m, ops), str(path)).double()
    g32, layout, logits32 = gradalign.grads(path, data=x, labels=y, return_logits=True)
    g64, layout64, logits64 = gradalign.grads(path, data=x, labels=y, precision="f64",
                                              return_logits=True)
    want64 = nb101.per_sample_logits(net64, x.double()).numpy()
    want32 = nb101.per_sample_logits(net, x).numpy()
    assert rel(logits64, want64) <= 1e-9, rel(logits64, want64)
    # f32: within f32 rounding, i.e. no further from the f64 logits than PyTorch's own f32.
    assert rel(logits32, want64) <= max(1e-5, 3 * rel(want32, want64)), rel(logits32, want64)

    assert layout64 == layout
    names = [e["name"] for e in layout]
    assert set(names) == {n for n, p in net.named_parameters() if p.dim() >= 2}
    ref64 = torch_loop(net64, x.double(), y, names)
    ref32 = torch_loop(net, x, y, names)
    for e in layout:
        n = e["name"]
        a64 = g64[:, e["offset"]:e["offset"] + e["numel"]].reshape(-1, *e["shape"])
        assert rel(a64, ref64[n]) <= 1e-6, (n, rel(a64, ref64[n]))
    # f32, per sample (relative L2 over every column, the goldens' per-sample criterion). NB101
    # networks at initialisation are ill-conditioned in f32: PyTorch-f32 itself is off its f64
    # by up to ~6 % on single layers here, so the per-layer criterion would measure f32 noise,
    # not the generator (f64 checks that). PyTorch's CPU BatchNorm accumulates its statistics
    # in f64 and gradalign's f32 graph in f32, which measured up to 3.2× PyTorch-f32's error
    # here (2.2 % relative L2 at worst), hence 5× rather than the goldens' 3×.
    flat64 = np.concatenate([ref64[e["name"]].reshape(len(x), -1) for e in layout], axis=1)
    flat32 = np.concatenate([ref32[e["name"]].reshape(len(x), -1) for e in layout], axis=1)
    for i in range(len(x)):
        ours = np.linalg.norm(g32[i] - flat64[i]) / np.linalg.norm(flat64[i])
        torch_own = np.linalg.norm(flat32[i] - flat64[i]) / np.linalg.norm(flat64[i])
        assert ours <= max(1e-4, 5 * torch_own), (i, ours, torch_own)
