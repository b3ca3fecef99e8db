"""Hostile ONNX models for the reliability tests (tests/hostile.rs, docs/reliability.md).

Exact command (from the repository root; only the `onnx` package is needed):

    pip install onnx==1.23.2 numpy
    python3 tests/golden/make_hostile.py

Each file is a small, deliberately broken model under models/hostile/. They are written with
onnx.helper and never passed through the checker (most would fail it: that is the point).
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "models", "hostile")


def conv_model(name, weight, nodes=None, inputs=None, opset=17, outputs=None, extra_inits=()):
    x = inputs or [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])]
    nodes = nodes or [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flat"),
    ]
    outputs = outputs or [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])]
    g = helper.make_graph(nodes, name, x, outputs, initializer=[weight, *extra_inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def w(shape=(4, 3, 3, 3), dtype=np.float32, name="w"):
    return numpy_helper.from_array((np.arange(np.prod(shape)) % 7 - 3).astype(dtype).reshape(shape) / 10
                                   if dtype == np.float32 else
                                   (np.arange(np.prod(shape)) % 7 - 3).astype(dtype).reshape(shape), name)


def save(m, name):
    onnx.save(m, os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    # 1. Declared dims whose product overflows 64 bits, with no data behind them.
    big = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 31, 1 << 31, 1 << 31])
    save(conv_model("overflow_dims", big), "overflow_dims.onnx")
    # 2. Activations that need far more than any --max-memory: Pad grows 8×8 images to 131080².
    # 2b. Pads so large that the padded size overflows 64 bits.
    for name, p in [("huge_activations", 1 << 16), ("overflow_pads", (1 << 62) + 1)]:
        pads = numpy_helper.from_array(np.array([0, 0, p, p, 0, 0, p, p], np.int64), "pads")
        save(conv_model(name, w(), nodes=[
            helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
            helper.make_node("Conv", ["padded", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["logits"], name="flat"),
        ], extra_inits=[pads]), f"{name}.onnx")
    # 2c. A folded shape constant of 2^40 elements (ConstantOfShape) feeding a Reshape.
    shape = numpy_helper.from_array(np.array([1 << 40], np.int64), "big_shape")
    save(conv_model("huge_constant", w(), nodes=[
        helper.make_node("ConstantOfShape", ["big_shape"], ["zeros"], name="zeros"),
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Shape", ["zeros"], ["zs"], name="zshape"),
        helper.make_node("Cast", ["zs"], ["zsf"], name="zcast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["zsf"], ["zsum"], name="zsum", keepdims=0),
        helper.make_node("Mul", ["zsum", "f"], ["logits"], name="scale"),
    ], extra_inits=[shape]), "huge_constant.onnx")
    # 3. A cycle: a reads b's output, b reads a's.
    save(conv_model("cyclic", w(), nodes=[
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "b_out"], ["a_out"], name="a"),
        helper.make_node("Relu", ["a_out"], ["b_out"], name="b"),
        helper.make_node("GlobalAveragePool", ["b_out"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flat"),
    ]), "cyclic.onnx")
    # 4. A node reading a tensor nothing defines.
    save(conv_model("undefined_tensor", w(), nodes=[
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "ghost"], ["a"], name="add_ghost"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flat"),
    ]), "undefined_tensor.onnx")
    # 5. Two nodes writing the same tensor name.
    save(conv_model("duplicate_outputs", w(), nodes=[
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["c"], name="relu_again"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flat"),
    ]), "duplicate_outputs.onnx")
    # 6. External data outside the model's folder (path traversal) and 7. missing.
    for name, loc in [("external_traversal", "../../../etc/passwd"),
                      ("external_absolute", "/etc/passwd"),
                      ("external_missing", "external_missing.weights")]:
        t = w()
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in [("location", loc), ("offset", "0"), ("length", str(4 * 4 * 3 * 3 * 3))]:
            e = t.external_data.add()
            e.key, e.value = k, v
        save(conv_model(name, t), f"{name}.onnx")
    # A well-formed external-data model, to show the supported case works.
    t = w()
    raw = t.raw_data
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in [("location", "external_ok.weights"), ("offset", "16"), ("length", str(len(raw)))]:
        e = t.external_data.add()
        e.key, e.value = k, v
    with open(os.path.join(OUT, "external_ok.weights"), "wb") as f:
        f.write(b"\0" * 16 + raw)
    save(conv_model("external_ok", t), "external_ok.onnx")
    # 8. An opset newer than any gradalign knows.
    save(conv_model("opset_future", w(), opset=99), "opset_future.onnx")
    # 9. Integer Conv weights.
    save(conv_model("int_weights", w(dtype=np.int64)), "int_weights.onnx")
    # 10. Data shorter than the declared dims.
    short = w()
    short.raw_data = short.raw_data[:40]
    save(conv_model("truncated_weights", short), "truncated_weights.onnx")
    # The valid reference model the broken ones derive from.
    save(conv_model("valid", w()), "valid.onnx")
    # Probes: 0 samples, and labels out of range for the 4-class model.
    np.save(os.path.join(OUT, "probe_empty_x.npy"), np.zeros((0, 3, 8, 8), np.float32))
    np.save(os.path.join(OUT, "probe_empty_y.npy"), np.zeros((0,), np.int64))
    np.save(os.path.join(OUT, "probe_x.npy"), np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    np.save(os.path.join(OUT, "probe_bad_y.npy"), np.array([0, 1, 4, 2], np.int64))
    np.save(os.path.join(OUT, "probe_y.npy"), np.array([0, 1, 3, 2], np.int64))


if __name__ == "__main__":
    main()
