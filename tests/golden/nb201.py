"""NAS-Bench-201 networks in PyTorch: the xautodl `TinyNetwork` topology (docs/results.md, NAS-Bench-201).

Re-implemented here (no xautodl dependency) from D-X-Y/AutoDL-Projects
`xautodl/models/cell_searchs/` + `cell_operations.py` (TinyNetwork, InferCell, ResNetBasicblock,
ReLUConvBN, POOLING, Zero, Identity), with C=16, N=5, 10 classes, affine BN with running stats.
"""
import torch
import torch.nn as nn

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


def parse_arch(arch_str):
    """'|a~0|+|b~0|c~1|+|...|' -> [[(op, src), ...] per node]."""
    nodes = []
    for part in arch_str.split("+"):
        ops = [x for x in part.split("|") if x]
        nodes.append([(o.split("~")[0], int(o.split("~")[1])) for o in ops])
    return nodes


class ReLUConvBN(nn.Module):
    def __init__(self, c_in, c_out, k, stride, pad, dilation=1):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out, affine=True, track_running_stats=True),
        )

    def forward(self, x):
        return self.op(x)


class Zero(nn.Module):
    def forward(self, x):
        return x.mul(0.0)


class Pool(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x):
        return self.op(x)


def make_op(name, c):
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(c, c, 1, 1, 0)
    if name == "nor_conv_3x3":
        return ReLUConvBN(c, c, 3, 1, 1)
    if name == "avg_pool_3x3":
        return Pool()
    raise ValueError(name)


class InferCell(nn.Module):
    def __init__(self, arch, c):
        super().__init__()
        self.nodes = arch
        self.layers = nn.ModuleList()
        self.node_IN = []
        self.node_IX = []
        for node in arch:
            idx, ins = [], []
            for op, src in node:
                self.layers.append(make_op(op, c))
                idx.append(len(self.layers) - 1)
                ins.append(src)
            self.node_IX.append(idx)
            self.node_IN.append(ins)

    def forward(self, x):
        nodes = [x]
        for ix, ins in zip(self.node_IX, self.node_IN):
            nodes.append(sum(self.layers[i](nodes[j]) for i, j in zip(ix, ins)))
        return nodes[-1]


class ResNetBasicblock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x):
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class TinyNetwork(nn.Module):
    def __init__(self, arch_str, C=16, N=5, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        chans = [C] * N + [C * 2] + [C * 2] * N + [C * 4] + [C * 4] * N
        reds = [False] * N + [True] + [False] * N + [True] + [False] * N
        arch = parse_arch(arch_str)
        self.cells = nn.ModuleList()
        c_prev = C
        for c, red in zip(chans, reds):
            self.cells.append(ResNetBasicblock(c_prev, c) if red else InferCell(arch, c))
            c_prev = c
        self.lastact = nn.Sequential(nn.BatchNorm2d(c_prev), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x):
        f = self.stem(x)
        for cell in self.cells:
            f = cell(f)
        out = self.global_pooling(self.lastact(f))
        out = out.view(out.size(0), -1)
        return self.classifier(out)


def build(arch_str, seed, C=16, N=5):
    """PyTorch default initialisation (Kaiming-uniform a=sqrt(5)), seeded."""
    torch.manual_seed(seed)
    return TinyNetwork(arch_str, C=C, N=N)


class ThinNetwork(nn.Module):
    """TE-NAS's thin network for counting linear regions (VITA-Group/TENAS prune_tenas.py,
    `model_config_thin`: C=1, N=1, depth=1, use_stem=False): one cell straight on the 1-channel
    input, then lastact BN + ReLU, global pooling and the classifier."""

    def __init__(self, arch_str, num_classes=10):
        super().__init__()
        self.cells = nn.ModuleList([InferCell(parse_arch(arch_str), 1)])
        self.lastact = nn.Sequential(nn.BatchNorm2d(1), nn.ReLU(inplace=False))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1, num_classes)

    def forward(self, x):
        f = self.cells[0](x)
        out = self.global_pooling(self.lastact(f))
        return self.classifier(out.view(out.size(0), -1))
