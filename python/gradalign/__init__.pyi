from typing import Any, Iterable, Literal, Optional, Sequence, Union, overload
import os

import numpy as np

PathLike = Union[str, os.PathLike[str]]
Model = Union[PathLike, bytes, Any]  # a path, ONNX bytes, or an onnx.ModelProto
Scorers = Union[str, Sequence[str], None]

__version__: str
DEFAULT_SCORERS: str

class GradalignError(Exception): ...
class GradalignWarning(UserWarning): ...

class Plugin:
    path: str
    scorers: tuple[str, ...]
    def __fspath__(self) -> str: ...

def score(model: Model, scorers: Scorers = None, data: Any = None, labels: Any = None,
          n: Optional[int] = None, bn: Literal["sample", "eval"] = "sample",
          params: str = "weights", precision: Literal["f32", "f64"] = "f32",
          backend: Literal["auto", "tract", "ort"] = "auto", device: str = "cpu",
          max_memory: Union[str, int, None] = None,
          plugins: Iterable[Union[PathLike, Plugin]] = (), isolate: bool = False,
          input_layout: Literal["auto", "nchw", "nhwc"] = "auto",
          output: Optional[str] = None) -> dict[str, Any]: ...
@overload
def grads(model: Model, data: Any = None, labels: Any = None, n: Optional[int] = None,
          bn: str = "sample", params: str = "weights", precision: str = "f32",
          backend: str = "auto", device: str = "cpu", max_memory: Union[str, int, None] = None,
          input_layout: str = "auto", return_logits: Literal[False] = False,
          output: Optional[str] = None) -> tuple[np.ndarray, list[dict[str, Any]]]: ...
@overload
def grads(model: Model, data: Any = None, labels: Any = None, n: Optional[int] = None,
          bn: str = "sample", params: str = "weights", precision: str = "f32",
          backend: str = "auto", device: str = "cpu", max_memory: Union[str, int, None] = None,
          input_layout: str = "auto", *, return_logits: Literal[True],
          output: Optional[str] = None
          ) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]: ...
def rank(models: Union[PathLike, Iterable[PathLike]], scorers: Scorers = None,
         out: Optional[PathLike] = None, progress: Optional[bool] = None, data: Any = None,
         labels: Any = None, n: Optional[int] = None, bn: str = "sample",
         params: str = "weights", precision: str = "f32", backend: str = "auto",
         device: str = "cpu", max_memory: Union[str, int, None] = None,
         plugins: Iterable[Union[PathLike, Plugin]] = (), isolate: bool = False,
         input_layout: str = "auto", output: Optional[str] = None) -> list[dict[str, Any]]: ...
def scorers(plugins: Iterable[Union[PathLike, Plugin]] = ()) -> list[dict[str, Any]]: ...
def load_plugin(path: PathLike) -> Plugin: ...
def from_torch(module: Any, example_input: Any, path: Optional[PathLike] = None,
               opset: int = 17) -> Any: ...
def cifar10_probe(n: int = 64) -> tuple[np.ndarray, np.ndarray]: ...
