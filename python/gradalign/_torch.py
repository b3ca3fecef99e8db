"""`from_torch`: export an `nn.Module` the way gradalign needs it, and check the export."""

from __future__ import annotations

import io
import os
from typing import Any

from ._native import GradalignError


def from_torch(module: Any, example_input: Any, path: str | os.PathLike | None = None,
               opset: int = 17) -> Any:
    """Export `module` (at its current weights) to ONNX with the settings that keep what
    gradalign differentiates: training-mode BatchNorm (not folded into the convolutions),
    every parameter as a named initializer (no constant folding), a free batch axis. Uses
    PyTorch's TorchScript exporter, since the default `dynamo=True` exporter folds BatchNorm
    even for a model in train() mode.

    `example_input` is one batch of the network's input (e.g. `torch.randn(2, 3, 32, 32)`).
    The module's own state is left as it was: its train/eval mode and its BatchNorm running
    statistics (which the export's trace would otherwise update).

    Checks that every trainable parameter reached the ONNX graph under its name and shape
    and that no BatchNorm was folded, raising `GradalignError` otherwise. Returns the
    `onnx.ModelProto`, also written to `path` when given.
    """
    try:
        import onnx
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise GradalignError(f"from_torch needs torch and onnx installed ({e})") from e

    # Restored afterwards: every submodule's own mode (a frozen-BN backbone in a train()-mode
    # model stays in eval), and every buffer (BN running statistics are updated by the trace).
    modes = {m: m.training for m in module.modules()}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    buf = io.BytesIO()
    try:
        module.train()
        torch.onnx.export(
            module,
            (example_input,),
            buf,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            dynamo=False,
        )
    except Exception as e:
        raise GradalignError(f"torch.onnx.export failed: {e}") from e
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes.items():
            m.training = training

    model = onnx.load_from_string(buf.getvalue())
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    lost = []
    seen = set()
    for name, p in module.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if inits.get(name) != tuple(p.shape):
            lost.append(f"{name} {tuple(p.shape)}")
    if lost:
        raise GradalignError(
            f"the export lost {len(lost)} trainable parameter(s) (folded, renamed or turned into "
            f"constants): {', '.join(lost[:5])}; gradalign would score a different set of "
            "weights"
        )
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    n_bn_onnx = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if n_bn_onnx < n_bn:
        raise GradalignError(
            f"the module has {n_bn} BatchNorm layers but the export has {n_bn_onnx}: BatchNorm "
            "was folded away, so per-sample BatchNorm cannot be applied"
        )
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model
