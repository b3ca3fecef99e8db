"""gradalign: exact per-sample gradients of ONNX models at initialisation, and the
training-free NAS scorers built on them (GradAlign-I/II and the zero-cost baselines).

    import gradalign
    result = gradalign.score("model.onnx")            # shipped CIFAR-10 probe, default scorers
    result["scores"]["gradalign-i"]
    g, layout = gradalign.grads("model.onnx", n=16)   # numpy N×P, one dict per parameter block
    onnx_model = gradalign.from_torch(net, torch.randn(2, 3, 32, 32))
    table = gradalign.rank(["candidates/"], out="results.csv")

Every computation is the Rust library's (the `gradalign` CLI's engine); errors are
`GradalignError` with the CLI's messages, and warnings about a result (e.g. all-zero gradients)
are issued as `GradalignWarning` as well as returned.
"""

from __future__ import annotations

from . import _ort

_ort.configure()

from ._api import (  # noqa: E402
    DEFAULT_SCORERS,
    GradalignError,
    GradalignWarning,
    Plugin,
    cifar10_probe,
    grads,
    load_plugin,
    rank,
    score,
    scorers,
)
from ._torch import from_torch  # noqa: E402

# Pickled by reference (multiprocessing workers raise it): name it where users import it from.
GradalignError.__module__ = "gradalign"
from ._native import VERSION as __version__  # noqa: E402

__all__ = [
    "DEFAULT_SCORERS",
    "GradalignError",
    "GradalignWarning",
    "Plugin",
    "cifar10_probe",
    "from_torch",
    "grads",
    "load_plugin",
    "rank",
    "score",
    "scorers",
]
