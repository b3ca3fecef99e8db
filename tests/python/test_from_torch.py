"""`from_torch` on torchvision and timm networks: gradalign's per-sample gradients equal
PyTorch's own batch-of-one loop (train() mode, so BatchNorm uses each sample's statistics),
judged as tests/golden_pytorch.rs judges the NB201 goldens: f64 to max|Δ| ≤ 1e-6 · max|g| per
layer; f32 per layer to max(1e-4, 3 × PyTorch-f32's own error on that layer) · max|g|.

One correction to the f64 reference: ONNX stores HardSigmoid's `alpha` as a float32 attribute,
so PyTorch's exact 1/6 becomes 0.16666667163 in the exported graph, and gradalign computes what
the graph says. The f64 reference uses the same constant (without it, MobileNetV3's f64
gradients differ by ~2e-5 relative — from the exported model, not from gradalign).
"""

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import gradalign  # noqa: E402


ALPHA_F32 = float(np.float32(1 / 6))


def hardsigmoid_as_exported(t, inplace=False):
    return torch.clamp(t * ALPHA_F32 + 0.5, 0.0, 1.0)


def torch_loop(model, x, y, names, as_exported=False):
    if as_exported:
        saved = torch.nn.functional.hardsigmoid
        torch.nn.functional.hardsigmoid = hardsigmoid_as_exported
        try:
            return torch_loop(model, x, y, names)
        finally:
            torch.nn.functional.hardsigmoid = saved
    model.train()
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append({n: params[n].grad.detach().double().numpy().copy() for n in names})
    return {n: np.stack([r[n] for r in rows]) for n in names}


def blocks(g, layout):
    return {e["name"]: g[:, e["offset"]:e["offset"] + e["numel"]].reshape(-1, *e["shape"])
            .astype(np.float64) for e in layout}


def rel(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


NETWORKS = [
    ("torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=10), 96),
    ("timm resnet10t", lambda: timm.create_model("resnet10t", num_classes=10), 96),
    # Dropout off: PyTorch's reference loop runs in train() mode, gradalign's Dropout is the
    # identity (the deterministic eval path).
    ("torchvision mobilenet_v3_small",
     lambda: torchvision.models.mobilenet_v3_small(num_classes=10, dropout=0.0), 96),
    ("torchvision squeezenet1_1",
     lambda: torchvision.models.squeezenet1_1(num_classes=10, dropout=0.0), 96),
    ("timm mobilenetv3_small_050", lambda: timm.create_model("mobilenetv3_small_050",
                                                             num_classes=10), 96),
]


@pytest.mark.parametrize("name,make,hw", NETWORKS, ids=[n for n, _, _ in NETWORKS])
def test_from_torch_gradients_equal_pytorch_loop(name, make, hw):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, 3, hw, hw)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = gradalign.from_torch(model, x[:2])
    # The module is left as it was: eval mode, running statistics untouched.
    assert not model.training
    for k, v in model.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k

    g64, layout = gradalign.grads(onx, data=x, labels=y, precision="f64")
    g32, layout32 = gradalign.grads(onx, data=x, labels=y)
    assert layout32 == layout
    names = [e["name"] for e in layout]
    conv_linear = {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert set(names) == conv_linear, "the default columns are every conv/linear weight"
    ref64 = torch_loop(copy.deepcopy(model).double(), x.double(), y, names, as_exported=True)
    ref32 = torch_loop(model, x, y, names)
    a64, a32 = blocks(g64, layout), blocks(g32, layout)
    for n in names:
        assert rel(a64[n], ref64[n]) <= 1e-6, (name, n, rel(a64[n], ref64[n]))
        slack = max(1e-4, 3 * rel(ref32[n], ref64[n]))
        assert rel(a32[n], ref64[n]) <= slack, (name, n, rel(a32[n], ref64[n]), slack)


def test_from_torch_refuses_an_export_that_loses_parameters():
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)
            self.spare = torch.nn.Linear(8, 4)  # never called: the export drops it

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(gradalign.GradalignError, match="lost 2 trainable parameter.*spare"):
        gradalign.from_torch(Unused(), torch.randn(2, 8))


def test_from_torch_restores_every_submodule_mode():
    net = torchvision.models.resnet18(num_classes=10)
    net.train()
    net.layer1.eval()  # a frozen-BN block inside a training model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gradalign.from_torch(net, torch.randn(2, 3, 64, 64))
    assert net.training and not net.layer1.training and not net.layer1[0].bn1.training
    assert net.layer2.training
