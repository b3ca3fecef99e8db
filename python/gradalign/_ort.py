"""Finds ONNX Runtime's shared library the way the CLI does, plus the `onnxruntime` wheel.

The native module loads ONNX Runtime at first use from ORT_DYLIB_PATH, else from the copy
`cargo xtask fetch-ort` caches. A Python user usually has the `onnxruntime` wheel installed
instead, so when ORT_DYLIB_PATH is unset and that wheel is the release this build speaks
(1.31.x, C API 24), its library is used (by setting ORT_DYLIB_PATH; Linux wheels only). Otherwise the pure-Rust tract runtime is the fallback
(backend="auto"), and backend="ort" says why ORT is unavailable.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

ORT_RELEASE = "1.31."


def wheel_library() -> Path | None:
    """libonnxruntime.so.1.31.* from an installed `onnxruntime` wheel, if any (not imported)."""
    try:
        version = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not version.startswith(ORT_RELEASE):
        return None
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        libs = sorted((Path(folder) / "capi").glob("libonnxruntime.so.*"))
        if libs:
            return libs[-1]
    return None


def configure() -> None:
    if os.environ.get("ORT_DYLIB_PATH"):
        return
    lib = wheel_library()
    if lib is not None:
        os.environ["ORT_DYLIB_PATH"] = str(lib)
