"""The Python API over `gradalign._native`: numpy in and out, Python exceptions and warnings."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np

from . import _native
from ._native import GradalignError

DEFAULT_SCORERS: str = _native.DEFAULT_SCORERS

# isolate=True runs each external scorer in a child process: `python -m gradalign._worker`.
if sys.executable:
    _native.set_worker_interpreter(sys.executable)

PathLike = Union[str, "os.PathLike[str]"]


class GradalignWarning(UserWarning):
    """A result that stands but must not be read without its caveat (e.g. all-zero
    per-sample gradients, a model that looks BatchNorm-folded)."""


@dataclass(frozen=True)
class Plugin:
    """An external scorer library (C ABI), loaded and checked by `load_plugin`."""

    path: str
    scorers: tuple = field(default_factory=tuple)

    def __fspath__(self) -> str:
        return self.path


def _model_arg(model: Any) -> Any:
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    raise TypeError(
        f"model must be a path, ONNX bytes or an onnx.ModelProto, not {type(model).__name__}"
    )


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _probe_args(data: Any, labels: Any) -> dict:
    args = {"data_path": None, "labels_path": None, "data": None, "labels": None}
    if data is not None:
        if isinstance(data, (str, os.PathLike)):
            args["data_path"] = os.fspath(data)
        else:
            a = np.ascontiguousarray(_to_numpy(data), dtype="<f4")
            if a.ndim < 2:
                raise GradalignError(f"data: expected an N×… array of images, got shape {a.shape}")
            args["data"] = (a.tobytes(), list(a.shape))
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            args["labels_path"] = os.fspath(labels)
        else:
            y = _to_numpy(labels)
            if y.ndim != 1:
                raise GradalignError(f"labels: expected a 1-D array, got shape {y.shape}")
            if y.size and not np.issubdtype(y.dtype, np.integer):
                raise GradalignError(f"labels: expected integer class indices, got {y.dtype}")
            args["labels"] = [int(v) for v in y.astype(np.int64)]
    return args


def _common(
    data, labels, n, bn, params, precision, backend, device, max_memory, input_layout, output
) -> dict:
    if n is not None and (not isinstance(n, (int, np.integer)) or n <= 0):
        raise GradalignError(f"n={n!r}: expected a positive number of probe samples")
    return dict(
        bn=bn,
        params=params,
        precision=precision,
        backend=backend,
        device=device,
        max_memory=None if max_memory is None else str(max_memory),
        n=None if n is None else int(n),
        input_layout=input_layout,
        output=None if output is None else str(output),
        **_probe_args(data, labels),
    )


def _plugin_paths(plugins: Iterable[Any]) -> list:
    return [os.fspath(p) for p in plugins]


def _warn_all(messages: Iterable[str], where: str) -> None:
    for m in messages:
        warnings.warn(f"{where}: {m}", GradalignWarning, stacklevel=3)


def score(
    model: Any,
    scorers: Union[str, Sequence[str], None] = None,
    data: Any = None,
    labels: Any = None,
    n: int | None = None,
    bn: str = "sample",
    params: str = "weights",
    precision: str = "f32",
    backend: str = "auto",
    device: str = "cpu",
    max_memory: Union[str, int, None] = None,
    plugins: Iterable[Any] = (),
    isolate: bool = False,
    input_layout: str = "auto",
    output: str | None = None,
) -> dict:
    """Score one model with the selected scorers (default: gradalign-i, gradalign-ii, gradsign).

    `model` is a path, ONNX bytes or an `onnx.ModelProto`. The probe is the shipped CIFAR-10
    one (class-balanced, `n` = 64) unless `data` is given: a CIFAR-10 .bin, a float32 .npy
    (with `labels` an int64 .npy), or arrays/tensors (N×C×H×W images, already normalised, and
    N integer labels). Options are the CLI's (`gradalign score --help`); `output` names the
    value taken as logits (`--output`).

    Returns a dict like the CLI's `score --format json` object: {"model", "scores": {name:
    float or None}, "errors": {name: message}, "warnings" (including plugin libraries that
    failed to load), "notes", "runtime", "seconds": {"inputs", "scorers", "total"}}. A scorer that fails leaves
    None with its error (and a warning); a model or probe that cannot be used raises
    `GradalignError`.
    """
    if scorers is None:
        scorers = DEFAULT_SCORERS
    elif not isinstance(scorers, str):
        scorers = ",".join(scorers)
    report = _native.score_report(
        _model_arg(model),
        scorers,
        _plugin_paths(plugins),
        bool(isolate),
        **_common(data, labels, n, bn, params, precision, backend, device, max_memory, input_layout,
                  output),
    )
    result = json.loads(report.to_json())
    if not report.ok:
        raise GradalignError(result["error"])
    where = result["model"]
    _warn_all(result["warnings"], where)
    _warn_all((f"scorer '{k}' failed: {v}" for k, v in result["errors"].items()), where)
    return result


def grads(
    model: Any,
    data: Any = None,
    labels: Any = None,
    n: int | None = None,
    bn: str = "sample",
    params: str = "weights",
    precision: str = "f32",
    backend: str = "auto",
    device: str = "cpu",
    max_memory: Union[str, int, None] = None,
    input_layout: str = "auto",
    return_logits: bool = False,
    output: str | None = None,
):
    """Per-sample gradients of the softmax cross-entropy: `(grads, layout)`, or
    `(grads, layout, logits)` with `return_logits=True`.

    `grads` is a numpy array N×P (float32; float64 with `precision="f64"`), row i the gradient
    of sample i's loss; `layout` lists the column blocks, one dict per parameter
    ({"name", "op_type", "node", "shape", "offset", "numel"}), so
    `grads[:, e["offset"]:e["offset"] + e["numel"]].reshape(-1, *e["shape"])` is parameter
    `e["name"]`'s per-sample gradient. Probe and options as in `score`.
    """
    (gb, gs, gt), (lb, ls, lt), meta = _native.grads(
        _model_arg(model),
        **_common(data, labels, n, bn, params, precision, backend, device, max_memory, input_layout,
                  output),
    )
    meta = json.loads(meta)
    _warn_all(meta["warnings"], str(model) if isinstance(model, (str, os.PathLike)) else "model")
    # Writable views of the bytearrays the extension filled: no further copy of N × P.
    g = np.frombuffer(gb, dtype=gt).reshape(gs)
    if not return_logits:
        return g, meta["layout"]
    logits = np.frombuffer(lb, dtype=lt).reshape(ls)
    return g, meta["layout"], logits


def cifar10_probe(n: int = 64) -> tuple:
    """The shipped CIFAR-10 probe exactly as the CLI feeds it: `n` test images, class-balanced
    (⌊n/10⌋ per class, the first n mod 10 classes one more), normalised with CIFAR-10's channel
    means and standard deviations. Returns (images float32 N×3×32×32, labels int64 N) — e.g. to
    resize for networks that need larger inputs, then pass as `data=`, `labels=`."""
    b, shape, labels = _native.shipped_probe(int(n))
    return np.frombuffer(b, dtype="<f4").reshape(shape).copy(), np.asarray(labels, dtype=np.int64)


def scorers(plugins: Iterable[Any] = ()) -> list:
    """Every scorer found (built-in and in `plugins`), as the CLI's `plugins` lists them:
    dicts with "name", "origin", "inputs" and "description"."""
    listing, errors = _native.list_scorers(_plugin_paths(plugins))
    for e in errors:
        warnings.warn(e, GradalignWarning, stacklevel=2)
    return json.loads(listing)


def load_plugin(path: PathLike) -> Plugin:
    """Load and check an external scorer library; pass the result in `plugins=[...]`.
    Raises `GradalignError` with the loader's message when the library cannot be used."""
    p = os.fspath(path)
    mine = tuple(_native.plugin_scorers(p))
    return Plugin(path=p, scorers=mine)


class _Progress:
    """A tqdm bar when tqdm is installed, else one self-redrawing line; off when stderr is
    not a terminal unless asked for."""

    def __init__(self, total: int, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.k, self.t0 = total, 0, time.monotonic()
        self.bar = None
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="model", file=sys.stderr)
            except ImportError:
                pass

    def update(self, name: str) -> None:
        self.k += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(Path(name).name, refresh=False)
            self.bar.update(1)
            return
        rate = (time.monotonic() - self.t0) / self.k
        sys.stderr.write(
            f"\r[{self.k}/{self.total}] ETA {rate * (self.total - self.k):.0f}s  {name}\x1b[K"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _read_results(out: PathLike, names: list) -> list:
    rows = []
    with open(out, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for r in reader:
            scores = {n: (float(v) if v else None) for n, v in zip(names, r[1:-2])}
            rows.append({"model": r[0], "scores": scores, "error": r[-2] or None,
                         "seconds": float(r[-1])})
    return rows


def rank(
    models: Union[PathLike, Iterable[PathLike]],
    scorers: Union[str, Sequence[str], None] = None,
    out: PathLike | None = None,
    progress: bool | None = None,
    data: Any = None,
    labels: Any = None,
    n: int | None = None,
    bn: str = "sample",
    params: str = "weights",
    precision: str = "f32",
    backend: str = "auto",
    device: str = "cpu",
    max_memory: Union[str, int, None] = None,
    plugins: Iterable[Any] = (),
    isolate: bool = False,
    input_layout: str = "auto",
    output: str | None = None,
) -> list:
    """Score many models (files, or folders searched for .onnx) and rank them by the first
    scorer, best first. A model that cannot be scored is kept with its error and ranked last.

    With `out`, rows go to the CLI's durable results CSV as models finish (fsync'ed), and a
    rerun resumes: models already in it are not scored again, and the returned ranking covers
    the whole file. Returns dicts {"model", "scores", "error", "seconds"}.
    """
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    paths = _native.collect_models([os.fspath(m) for m in models])
    if not paths:
        raise GradalignError("no .onnx models found in the given paths")
    spec = DEFAULT_SCORERS if scorers is None else (
        scorers if isinstance(scorers, str) else ",".join(scorers))
    plugin_paths = _plugin_paths(plugins)
    names = _native.resolve_scorers(spec, plugin_paths)
    opts = _common(data, labels, n, bn, params, precision, backend, device, max_memory,
                   input_layout, output)
    results = _native.ResultsCsv(os.fspath(out), names) if out is not None else None
    done = set(results.done()) if results is not None else set()
    todo = [p for p in paths if p not in done]
    rows = []
    bar = _Progress(len(todo), progress)
    try:
        for p in todo:
            report = _native.score_report(p, spec, plugin_paths, bool(isolate), **opts)
            if results is not None:
                results.append(report)
            r = json.loads(report.to_json())
            if report.ok:
                _warn_all(r["warnings"], p)
                msgs = [f"{k}: {v}" for k, v in r["errors"].items()]
                msgs += [f"warning: {w}" for w in r["warnings"]]
                rows.append({"model": p, "scores": r["scores"], "error": "; ".join(msgs) or None,
                             "seconds": report.seconds})
            else:
                rows.append({"model": p, "scores": {k: None for k in names}, "error": r["error"],
                             "seconds": report.seconds})
            bar.update(p)
    finally:
        bar.close()
    if results is not None:
        rows = _read_results(out, names)
    first = names[0]

    def key(r):
        v = r["scores"].get(first)
        return (v is None, -(v if v is not None else 0.0), r["model"])

    return sorted(rows, key=key)
