"""The Python package against the CLI: same engine, same numbers, same errors.

    python3 -m pytest tests/python        (after `pip install .` and `cargo build --release`)
"""

import json
import subprocess
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gradalign

FIXTURE = "models/nb201_random_a.onnx"


def cli_json(cli, root, *args):
    res = subprocess.run([str(cli), "score", *args, "--format", "json"], cwd=root,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("backend", ["tract", "auto"])
def test_score_gives_the_cli_numbers(root, cli, backend):
    want = cli_json(cli, root, FIXTURE, "--n", "16", "--backend", backend,
                    "--scorer", "gradalign-i,gradalign-ii,gradsign,synflow,params")
    got = gradalign.score(root / FIXTURE, n=16, backend=backend,
                          scorers=["gradalign-i", "gradalign-ii", "gradsign", "synflow", "params"])
    assert got["errors"] == {} and got["warnings"] == []
    assert got["runtime"] == want["runtime"]
    # Same library, same inputs, same runtime: bit-identical.
    assert got["scores"] == want["scores"]
    assert got["scores"]["params"] == 372346.0  # every parameter of the network


def test_model_as_path_bytes_or_modelproto_is_the_same_model(root):
    path = root / FIXTURE
    proto = onnx.load(str(path))
    a = gradalign.score(path, n=8, backend="tract")["scores"]
    b = gradalign.score(proto, n=8, backend="tract")["scores"]
    c = gradalign.score(path.read_bytes(), n=8, backend="tract")["scores"]
    assert a == b == c


def test_grads_match_the_cli_npy_and_layout(root, cli, tmp_path):
    res = subprocess.run([str(cli), "grads", FIXTURE, "--n", "8", "--backend", "tract",
                          "--out", str(tmp_path / "g.npy"), "--layout", str(tmp_path / "l.json"),
                          "--logits", str(tmp_path / "z.npy")],
                         cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    g, layout, logits = gradalign.grads(root / FIXTURE, n=8, backend="tract", return_logits=True)
    assert g.dtype == np.float32 and g.shape[0] == 8
    np.testing.assert_array_equal(g, np.load(tmp_path / "g.npy"))
    np.testing.assert_array_equal(logits, np.load(tmp_path / "z.npy"))
    assert layout == json.loads((tmp_path / "l.json").read_text())
    assert sum(e["numel"] for e in layout) == g.shape[1]
    g64, _ = gradalign.grads(root / FIXTURE, n=8, precision="f64")
    assert g64.dtype == np.float64 and g64.shape == g.shape
    assert np.corrcoef(g64.ravel(), g.ravel())[0, 1] > 0.9999


def test_probe_as_arrays_equals_probe_as_npy_files(root):
    x = np.load(root / "models/hostile/probe_x.npy")
    y = np.load(root / "models/hostile/probe_y.npy")
    model = root / "models/hostile/valid.onnx"
    from_files, _ = gradalign.grads(model, data=root / "models/hostile/probe_x.npy",
                                    labels=root / "models/hostile/probe_y.npy", backend="tract")
    from_arrays, _ = gradalign.grads(model, data=x, labels=list(y), backend="tract")
    np.testing.assert_array_equal(from_files, from_arrays)
    torch = pytest.importorskip("torch")
    from_tensors, _ = gradalign.grads(model, data=torch.from_numpy(x), labels=torch.from_numpy(y),
                                      backend="tract", n=2)
    np.testing.assert_array_equal(from_tensors, from_arrays[:2])


def test_shipped_probe_is_the_clis(root):
    x, y = gradalign.cifar10_probe(20)
    assert x.shape == (20, 3, 32, 32) and x.dtype == np.float32
    assert list(y) == [c for c in range(10) for _ in range(2)]
    # Fed explicitly, it gives the scores of the default probe.
    a = gradalign.score(root / FIXTURE, n=20, backend="tract")["scores"]
    b = gradalign.score(root / FIXTURE, data=x, labels=y, backend="tract")["scores"]
    assert a == b


def test_rank_resumes_its_csv_and_keeps_failures_last(root, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ["nb201_random_a", "nb201_random_b", "nb201_resnet_like"]:
        (models / f"{name}.onnx").write_bytes((root / f"models/{name}.onnx").read_bytes())
    (models / "zz_broken.onnx").write_bytes(b"not onnx")
    out = tmp_path / "results.csv"
    first = gradalign.rank(models, scorers="gradsign,params", out=out, n=8, backend="tract",
                           progress=False)
    assert [r["model"].rsplit("/", 1)[1] for r in first][-1] == "zz_broken.onnx"
    assert "not a valid ONNX model" in first[-1]["error"]
    scores = [r["scores"]["gradsign"] for r in first[:-1]]
    assert scores == sorted(scores, reverse=True) and all(s is not None for s in scores)
    rows = out.read_text().splitlines()
    assert rows[0] == "model,gradsign,params,error,seconds" and len(rows) == 5
    # A second run scores nothing and returns the same ranking from the file.
    again = gradalign.rank(models, scorers="gradsign,params", out=out, n=8, backend="tract",
                           progress=False)
    assert [(r["model"], r["scores"]) for r in again] == [(r["model"], r["scores"]) for r in first]
    assert out.read_text().splitlines() == rows


def test_plugins_load_list_and_score(root, c_plugin):
    p = gradalign.load_plugin(c_plugin)
    assert p.scorers == ("gradsign-c",)
    names = {s["name"]: s for s in gradalign.scorers(plugins=[p])}
    assert "signs" in names["gradsign"]["inputs"]
    assert names["gradsign-c"]["origin"].endswith("libgradsign_c.so")
    r = gradalign.score(root / FIXTURE, scorers="gradsign,gradsign-c", plugins=[p], n=8,
                        backend="tract")
    assert r["scores"]["gradsign-c"] == r["scores"]["gradsign"]
    iso = gradalign.score(root / FIXTURE, scorers="gradsign-c", plugins=[p], n=8,
                          backend="tract", isolate=True)
    assert iso["scores"]["gradsign-c"] == r["scores"]["gradsign"]


def test_errors_are_exceptions_with_the_cli_messages(root, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(gradalign.GradalignError, match="not a valid ONNX model"):
        gradalign.score(bad)
    with pytest.raises(gradalign.GradalignError, match="cannot read model file"):
        gradalign.score(tmp_path / "missing.onnx")
    x = np.load(root / "models/hostile/probe_x.npy")
    with pytest.raises(gradalign.GradalignError, match="first axis must match"):
        gradalign.score(root / "models/hostile/valid.onnx", data=x, labels=[0])
    with pytest.raises(gradalign.GradalignError, match="needs labels"):
        gradalign.grads(root / "models/hostile/valid.onnx", data=x)
    with pytest.raises(gradalign.GradalignError, match="unknown scorer|no scorer"):
        gradalign.score(root / FIXTURE, scorers="no-such-scorer")
    with pytest.raises(gradalign.GradalignError, match="bn=.*sample"):
        gradalign.score(root / FIXTURE, bn="running")
    with pytest.raises(gradalign.GradalignError):
        gradalign.load_plugin(bad)
    # A missing op: the error names the operator and the node.
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
         helper.make_node("Acosh", ["h"], ["logits"], name="odd_activation")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.ones(32, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(gradalign.GradalignError, match="Acosh") as e:
        gradalign.grads(model, data=np.ones((4, 8), np.float32), labels=[0, 1, 2, 3])
    assert "odd_activation" in str(e.value)


def test_output_names_the_logits(root):
    # Two outputs, an auxiliary head first: `output` picks the logits, like the CLI's --output.
    w = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="fc"),
         helper.make_node("Mul", ["logits", "two"], ["aux"], name="aux_head")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], w.ravel()),
         helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    y = [0, 1, 2, 3]
    g_aux, _ = gradalign.grads(model, data=x, labels=y, precision="f64")
    g_logits, _ = gradalign.grads(model, data=x, labels=y, precision="f64", output="logits")
    # Cross-entropy gradient of the logits by hand: (softmax(xw) - onehot(y)) outer x.
    z = x.astype(np.float64) @ w.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), y] -= 1
    want = np.einsum("ni,nk->nik", x.astype(np.float64), p).reshape(4, -1)
    np.testing.assert_allclose(g_logits, want, rtol=1e-9, atol=1e-12)
    assert not np.allclose(g_aux, want)
    with pytest.raises(gradalign.GradalignError, match="--output nope"):
        gradalign.score(model, data=x, labels=y, output="nope")


def test_all_zero_gradients_warn(root):
    with pytest.warns(gradalign.GradalignWarning, match="exactly zero"):
        r = gradalign.score(root / "models/nb201_all_none.onnx", scorers="gradsign", n=8,
                            backend="tract")
    assert r["warnings"] and r["scores"]["gradsign"] == 0.0


def test_errors_pickle_for_multiprocessing(root):
    import pickle

    try:
        gradalign.score(root / "missing.onnx")
    except gradalign.GradalignError as e:
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is gradalign.GradalignError and str(again) == str(e)
    else:
        pytest.fail("no error")


def test_load_plugin_ignores_unrelated_plugin_path(root, c_plugin, tmp_path, monkeypatch):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a library")
    monkeypatch.setenv("GRADALIGN_PLUGIN_PATH", str(broken))
    assert gradalign.load_plugin(c_plugin).scorers == ("gradsign-c",)
