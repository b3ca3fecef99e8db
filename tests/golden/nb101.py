"""An independent PyTorch build of NAS-Bench-101 networks, to check gradalign's Rust generator
(src/tools/zoo/nb101.rs) — written from google-research/nasbench `model_builder.py` and `base_ops.py`,
not from the Rust code.

    cargo xtask gen-nb101 --hash 000834cf25da3d33a8c0b0fed475d0f3 --out /tmp/nb101
    python tests/golden/nb101.py /tmp/nb101/nb101-000834cf25da3d33a8c0b0fed475d0f3.onnx \
        0100001001000000010010000101000001000000010000000 \
        "input|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|output"

builds the cell's network in PyTorch and loads the ONNX file's weights by name (every
trainable parameter and BN statistic must be there with its shape, and every float initializer
must be used). The comparisons — logits of a per-sample train()-mode forward and per-sample
gradients, against gradalign on the same file — are in tests/python/test_nb101.py
(`python -m pytest tests/python/test_nb101.py`).
"""

import sys

import numpy as np
import torch
from torch import nn


def compute_vertex_channels(cin, cout, m):
    """nasbench `model_builder.compute_vertex_channels`."""
    v = len(m)
    vc = [0] * v
    vc[0], vc[v - 1] = cin, cout
    if v == 2:
        return vc
    in_degree = [sum(m[s][d] for s in range(1, v)) for d in range(v)]
    interior, correction = divmod(cout, in_degree[v - 1])
    for t in range(1, v - 1):
        if m[t][v - 1]:
            vc[t] = interior + (1 if correction else 0)
            correction -= 1 if correction else 0
    for t in range(v - 3, 0, -1):
        if not m[t][v - 1]:
            for d in range(t + 1, v - 1):
                if m[t][d]:
                    vc[t] = max(vc[t], vc[d])
    return vc


class ConvBnRelu(nn.Sequential):
    """nasbench `base_ops.conv_bn_relu`: conv without bias, BN (NB101: momentum 0.997 in TF's
    sense, ε 1e-5), ReLU."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.003)
        self.relu = nn.ReLU()


class Cell(nn.Module):
    """nasbench `build_module`."""

    def __init__(self, m, ops, cin, cout):
        super().__init__()
        self.m, self.v = m, len(ops)
        self.vc = compute_vertex_channels(cin, cout, m)
        self.proj = nn.ModuleDict({str(t): ConvBnRelu(cin, self.vc[t], 1)
                                   for t in range(1, self.v - 1) if m[0][t]})
        self.ops = nn.ModuleDict()
        for t in range(1, self.v - 1):
            if ops[t] == "conv3x3-bn-relu":
                self.ops[str(t)] = ConvBnRelu(self.vc[t], self.vc[t], 3)
            elif ops[t] == "conv1x1-bn-relu":
                self.ops[str(t)] = ConvBnRelu(self.vc[t], self.vc[t], 1)
            else:
                self.ops[str(t)] = nn.MaxPool2d(3, stride=1, padding=1)
        if m[0][self.v - 1]:
            self.proj_out = ConvBnRelu(cin, cout, 1)

    def forward(self, x):
        m, v, vc = self.m, self.v, self.vc
        tensors, concat = [x], []
        for t in range(1, v - 1):
            # nasbench `truncate`: the first vc[t] channels of a wider predecessor.
            add_in = [tensors[s][:, :vc[t]] for s in range(1, t) if m[s][t]]
            if m[0][t]:
                add_in.append(self.proj[str(t)](x))
            y = add_in[0]
            for a in add_in[1:]:
                y = y + a
            y = self.ops[str(t)](y)
            tensors.append(y)
            if m[t][v - 1]:
                concat.append(y)
        if not concat:
            return self.proj_out(x)
        out = concat[0] if len(concat) == 1 else torch.cat(concat, 1)
        if m[0][v - 1]:
            out = out + self.proj_out(x)
        return out


class Network(nn.Module):
    """nasbench `build_model_fn`: stem, 3 stacks of 3 cells with 2×2 max-pool and doubled
    channels before stacks 2 and 3, global average pool, dense."""

    def __init__(self, m, ops, classes=10):
        super().__init__()
        self.stem = ConvBnRelu(3, 128, 3)
        stacks, c = [], 128
        for s in range(3):
            cout = c if s == 0 else 2 * c
            cells = []
            for _ in range(3):
                cells.append(Cell(m, ops, c, cout))
                c = cout
            stacks.append(nn.ModuleList(cells))
        self.stacks = nn.ModuleList(stacks)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for s, cells in enumerate(self.stacks):
            if s > 0:
                x = nn.functional.max_pool2d(x, 2, 2)
            for cell in cells:
                x = cell(x)
        return self.classifier(x.mean(dim=(2, 3)))


def parse(adjacency, ops):
    ops = ops.split("|")
    v = len(ops)
    m = [[int(adjacency[i * v + j]) for j in range(v)] for i in range(v)]
    return m, ops


def load_onnx_weights(net, onnx_path):
    """Every parameter and BN statistic of `net` from the ONNX initializer of the same name."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer}
    state = net.state_dict()
    missing = []
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        if k not in inits or tuple(inits[k].shape) != tuple(v.shape):
            missing.append(k)
            continue
        state[k] = torch.from_numpy(inits[k].copy())
    assert not missing, f"not in the ONNX file (or another shape): {missing[:5]}"
    net.load_state_dict(state)
    unused = [k for k, a in inits.items() if a.dtype == np.float32 and k not in state]
    assert not unused, f"ONNX float initializers with no PyTorch parameter: {unused[:5]}"
    return net


def per_sample_logits(net, x):
    net.train()
    with torch.no_grad():
        return torch.cat([net(x[i:i + 1]) for i in range(len(x))])


if __name__ == "__main__":
    path, adjacency, ops = sys.argv[1:4]
    m, ops = parse(adjacency, ops)
    net = load_onnx_weights(Network(m, ops), path)
    print(f"{path}: {sum(p.numel() for p in net.parameters())} trainable parameters; "
          "weights loaded by name")
