"""Fixtures for gradalign's exporter tests: one small CNN per framework and exporter, exported
to ONNX by that framework's own tool, with reference per-sample gradients from that framework's
own autodiff in float64 (the exported float32 weights, upcast).

    python3 tests/golden/exporters.py          # writes tests/fixtures/exporters/<name>/

Needs torch + onnxscript, tensorflow-cpu + tf2onnx, jax + flax + jax2onnx (CI needs none of
them: the outputs are committed). Per fixture: model.onnx, ref/<k>.npy (float64 [N, *shape]
per-sample gradient of the softmax cross-entropy for ONNX initializer k) and ref.json naming
them and the probe. The probe is stored once: the channels-first models take
models/hostile/probe_x.npy (4×3×8×8, standard normal, seed 0), the channels-last ones its
transpose in tests/fixtures/exporters/probe/x_nhwc.npy; all take probe/y.npy's labels.
Exporters rename and re-lay-out weights (tf2onnx writes Keras' HWIO kernels as OIHW); each
framework weight is matched to the ONNX initializer holding the same values under the layout
change, and its gradient is written in the ONNX layout.
"""
import json
import os
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "exporters")
N, H, W, C, K = 4, 8, 8, 3, 5
# The hostile-input tests' probe: np.random.default_rng(0).standard_normal((4, 3, 8, 8)), float32.
X_NCHW_PATH = "models/hostile/probe_x.npy"
X_NHWC_PATH = "tests/fixtures/exporters/probe/x_nhwc.npy"
Y_PATH = "tests/fixtures/exporters/probe/y.npy"
X_NCHW = np.load(os.path.join(ROOT, X_NCHW_PATH))
assert X_NCHW.shape == (N, C, H, W) and X_NCHW.dtype == np.float32
Y = np.array([0, 1, 2, 4], dtype=np.int64)


def write_probe():
    os.makedirs(os.path.join(OUT, "probe"), exist_ok=True)
    np.save(os.path.join(ROOT, X_NHWC_PATH), X_NCHW.transpose(0, 2, 3, 1).copy())
    np.save(os.path.join(ROOT, Y_PATH), Y)

# Framework weight layout → ONNX layout candidates.
TRANSFORMS = [
    ("same", lambda a: a),
    ("hwio->oihw", lambda a: a.transpose(3, 2, 0, 1) if a.ndim == 4 else None),
    ("transpose", lambda a: a.T if a.ndim == 2 else None),
]


def write(name, model_proto, x, refs, framework, note=""):
    """refs: {onnx initializer name: float64 [N, *shape]}; x: X_NCHW or its NHWC transpose."""
    import onnx

    x_path = X_NCHW_PATH if x.shape == X_NCHW.shape else X_NHWC_PATH
    assert np.array_equal(np.load(os.path.join(ROOT, x_path)), x), x_path
    d = os.path.join(OUT, name)
    os.makedirs(os.path.join(d, "ref"), exist_ok=True)
    onnx.save(model_proto, os.path.join(d, "model.onnx"))
    files = {}
    for i, (k, g) in enumerate(sorted(refs.items())):
        f = f"ref/{i}.npy"
        np.save(os.path.join(d, f), g.astype(np.float64))
        files[k] = f
    with open(os.path.join(d, "ref.json"), "w") as fh:
        json.dump({"framework": framework, "note": note, "x": x_path, "y": Y_PATH, "params": files},
                  fh, indent=1)
    print(f"{name}: {len(files)} parameters, ops "
          f"{sorted(set(n.op_type for n in model_proto.graph.node))}")


def match(model_proto, weights, grads):
    """Map each framework weight (name → float32 array) to the ONNX initializer with the same
    values; returns {onnx name: per-sample grads in ONNX layout}. Every weight must match once."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model_proto.graph.initializer}
    out = {}
    for wname, w in weights.items():
        hits = []
        for tname, t in TRANSFORMS:
            tw = t(w)
            if tw is None:
                continue
            for iname, iv in inits.items():
                if iv.dtype == np.float32 and iv.size == tw.size and iv.size > 1 and \
                        np.array_equal(iv.reshape(-1), np.ascontiguousarray(tw).reshape(-1)):
                    hits.append((iname, t, iv.shape))
        if len({h[0] for h in hits}) != 1:
            sys.exit(f"weight {wname} {w.shape}: {len(hits)} ONNX initializers match: {hits}")
        iname, t, shape = hits[0]
        g = grads[wname]
        out[iname] = np.stack([np.ascontiguousarray(t(g[i])).reshape(shape) for i in range(N)])
    return out


def torch_per_sample_grads(m64, x):
    """PyTorch's own train() step on a batch of one, per sample, in float64: {name: [N, *shape]}."""
    import torch

    refs = {k: [] for k, _ in m64.named_parameters()}
    for i in range(N):
        m64.zero_grad()
        loss = torch.nn.functional.cross_entropy(m64(x[i:i + 1].double()),
                                                 torch.from_numpy(Y[i:i + 1]))
        loss.backward()
        for k, p in m64.named_parameters():
            refs[k].append(p.grad.detach().numpy().copy())
    return {k: np.stack(v) for k, v in refs.items()}


def torch_fixtures():
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.c1 = torch.nn.Conv2d(C, 8, 3, padding=1, bias=False)
            s.b1 = torch.nn.BatchNorm2d(8)
            s.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
            s.b2 = torch.nn.BatchNorm2d(8)
            s.fc = torch.nn.Linear(8, K)

        def forward(s, x):
            x = torch.relu(s.b1(s.c1(x)))
            x = torch.relu(s.b2(s.c2(x)))
            return s.fc(x.mean((2, 3)))

    m = Net().train()
    with torch.no_grad():  # non-trivial affine parameters, so their gradients are tested
        for b in (m.b1, m.b2):
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.5, 0.5)
    x = torch.from_numpy(X_NCHW)
    dyn = {"x": {0: torch.export.Dim("N")}}
    keep = torch.onnx.export(m, (x[:2],), dynamo=True, optimize=False, input_names=["x"],
                             dynamic_shapes=dyn).model_proto
    folded = torch.onnx.export(m, (x[:2],), dynamo=True, input_names=["x"],
                                dynamic_shapes=dyn).model_proto
    m64 = Net()
    m64.load_state_dict(m.state_dict())
    m64 = m64.double().train()
    refs = torch_per_sample_grads(m64, x)
    write("torch_dynamo_bn", keep, X_NCHW, refs, f"torch {torch.__version__}",
          "torch.onnx.export(train() model, dynamo=True, optimize=False): BatchNorm kept")
    write("torch_dynamo_bn_folded", folded, X_NCHW, {}, f"torch {torch.__version__}",
          "torch.onnx.export(train() model, dynamo=True): the exporter folds BatchNorm into the convolutions")



def legacy_training_export(m, x, name):
    """The legacy exporter in training mode (the recipe that keeps BatchNorm and drop masks as
    nodes), through a temporary file; returns the ModelProto."""
    import onnx
    import torch

    path = os.path.join(OUT, f"{name}.onnx.tmp")
    os.makedirs(OUT, exist_ok=True)
    torch.onnx.export(m, x[:2], path, dynamo=False, training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})
    proto = onnx.load(path)
    os.remove(path)
    return proto

def small_vit():
    import timm
    import torch

    torch.manual_seed(0)
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=C, num_classes=K, embed_dim=16, depth=2,
        num_heads=2, mlp_ratio=2.0).train()
    with torch.no_grad():  # timm starts the class token at ~1e-6: make its gradient visible
        m.cls_token.normal_(0, 0.5)
        m.pos_embed.normal_(0, 0.5)
    return m


def vit_fixture():
    """A small timm ViT through the legacy exporter: the class token is expanded over the batch,
    attention transposes q/k/v away from the sample axis and back, `x[:, 0]` picks the token."""
    import timm
    import torch

    m = small_vit()
    x = torch.from_numpy(X_NCHW)
    proto = legacy_training_export(m, x, "timm_vit_legacy")
    m64 = m.double()
    refs = torch_per_sample_grads(m64, x)
    write("timm_vit_legacy", proto, X_NCHW, refs, f"torch {torch.__version__}, timm {timm.__version__}",
          "timm VisionTransformer (8x8 input, patch 4, depth 2, 2 heads), legacy exporter, training mode")



def vit_dynamo_fixture():
    """The same ViT through the dynamo exporter (BatchNorm-free, so optimize=False changes
    nothing here but is the recipe): `k.transpose(-2, -1)` is written as a Reshape that merges
    the samples with the heads, a Transpose, and a Reshape back."""
    import timm
    import torch

    m = small_vit()
    x = torch.from_numpy(X_NCHW)
    proto = torch.onnx.export(m, (x[:2],), dynamo=True, optimize=False, input_names=["x"],
                              dynamic_shapes={"x": {0: torch.export.Dim("N")}}).model_proto
    refs = torch_per_sample_grads(m.double(), x)
    write("timm_vit_dynamo", proto, X_NCHW, refs, f"torch {torch.__version__}, timm {timm.__version__}",
          "timm VisionTransformer (8x8 input, patch 4, depth 2, 2 heads), dynamo exporter, optimize=False")

def stochastic_fixture():
    """A residual CNN with torchvision's StochasticDepth and a Dropout, through the legacy
    exporter in training mode: the drop masks arrive as RandomUniformLike → Less → Cast and as
    Dropout(training_mode=True). gradalign computes the deterministic eval path, so the reference
    is PyTorch with both turned off (the network has no BatchNorm, so eval() changes nothing else)."""
    import torch
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.c1 = torch.nn.Conv2d(C, 8, 3, padding=1)
            s.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            s.sd = StochasticDepth(0.2, "row")
            s.drop = torch.nn.Dropout(0.3)
            s.fc = torch.nn.Linear(8, K)

        def forward(s, x):
            h = torch.relu(s.c1(x))
            h = h + s.sd(torch.relu(s.c2(h)))
            return s.fc(s.drop(h.mean((2, 3))))

    m = Net().train()
    x = torch.from_numpy(X_NCHW)
    proto = legacy_training_export(m, x, "torch_stochastic_depth")
    ops = {n.op_type for n in proto.graph.node}
    assert {"RandomUniformLike", "Dropout"} <= ops, ops
    m64 = Net()
    m64.load_state_dict(m.state_dict())
    refs = torch_per_sample_grads(m64.double().eval(), x)
    write("torch_stochastic_depth", proto, X_NCHW, refs, f"torch {torch.__version__}",
          "legacy exporter, training mode: StochasticDepth(0.2, 'row') and Dropout(0.3) exported "
          "as random ops; reference: the same network with both off (eval path)")


def keras_fixture():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf2onnx

    def build(dtype):
        tf.keras.utils.set_random_seed(0)
        return tf.keras.Sequential([
            tf.keras.Input((H, W, C), dtype=dtype),
            tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu", dtype=dtype),
            tf.keras.layers.Conv2D(8, 3, strides=2, padding="same", dtype=dtype),
            tf.keras.layers.ReLU(dtype=dtype),
            tf.keras.layers.GlobalAveragePooling2D(dtype=dtype),
            tf.keras.layers.Dense(K, dtype=dtype),
        ])

    m = build("float32")
    # Non-zero biases: tf2onnx folds away an all-zero bias (Keras initialises them to zero).
    for layer in m.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.3, 0.3, layer.bias.shape).astype(np.float32))
    spec = (tf.TensorSpec((None, H, W, C), tf.float32, name="x"),)
    # from_keras fails on Keras 3 models (tf2onnx 1.17); converting the model's tf.function is
    # the path that works.
    fn = tf.function(lambda x: m(x, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=17)
    m64 = build("float64")
    m64.set_weights([w.astype(np.float64) for w in m.get_weights()])
    x = X_NCHW.transpose(0, 2, 3, 1).copy()  # Keras is channels-last
    grads = {w.path: [] for w in m64.trainable_weights}
    for i in range(N):
        with tf.GradientTape() as tape:
            z = m64(x[i:i + 1].astype(np.float64), training=True)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                Y[i:i + 1], z, from_logits=True))
        for w, g in zip(m64.trainable_weights, tape.gradient(loss, m64.trainable_weights)):
            grads[w.path].append(g.numpy())
    weights = {w.path: w.numpy() for w in m.trainable_weights}
    # m and m64 list their weights in the same order; key the float32 values by m64's paths.
    weights = dict(zip([w.path for w in m64.trainable_weights], weights.values()))
    grads = {k: np.stack(v) for k, v in grads.items()}
    write("keras_tf2onnx", proto, x, match(proto, weights, grads), f"tensorflow {tf.__version__}, tf2onnx {tf2onnx.__version__}",
          "Keras Sequential CNN (channels last, no BatchNorm), tf2onnx.convert.from_function, opset 17")


def flax_fixture():
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax2onnx import to_onnx

    class Net(nnx.Module):
        def __init__(s, rngs):
            s.c1 = nnx.Conv(C, 8, (3, 3), padding="SAME", rngs=rngs)
            s.c2 = nnx.Conv(8, 8, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
            s.fc = nnx.Linear(8, K, rngs=rngs)

        def __call__(s, x):
            x = jax.nn.relu(s.c1(x))
            x = jax.nn.relu(s.c2(x))
            return s.fc(x.mean(axis=(1, 2)))

    m = Net(nnx.Rngs(0))
    # Non-zero biases (Flax initialises them to zero), so their gradients are tested.
    key = jax.random.PRNGKey(1)
    for mod in (m.c1, m.c2, m.fc):
        key, sub = jax.random.split(key)
        mod.bias.value = 0.1 * jax.random.normal(sub, mod.bias.value.shape)
    proto = to_onnx(m, [("B", H, W, C)], opset=17, input_names=["x"])
    x = X_NCHW.transpose(0, 2, 3, 1).copy()
    graphdef, state = nnx.split(m, nnx.Param)
    flat = {"/".join(map(str, k)): np.asarray(v.value if hasattr(v, "value") else v)
            for k, v in nnx.to_flat_state(state)}
    jax.config.update("jax_enable_x64", True)
    state64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype=jnp.float64), state)

    def loss(st, xi, yi):
        z = nnx.merge(graphdef, st)(xi[None])
        return -jax.nn.log_softmax(z)[0, yi]

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(state64, jnp.asarray(x, jnp.float64),
                                                       jnp.asarray(Y))
    gflat = {"/".join(map(str, k)): np.asarray(v.value if hasattr(v, "value") else v)
             for k, v in nnx.to_flat_state(g)}
    write("flax_jax2onnx", proto, x, match(proto, flat, gflat), f"jax {jax.__version__}, flax (nnx)",
          "Flax NNX CNN (channels last, no BatchNorm), jax2onnx.to_onnx, opset 17")


if __name__ == "__main__":
    which = sys.argv[1:] or ["torch", "vit", "vit_dynamo", "stochastic", "keras", "flax"]
    write_probe()
    for w in which:
        {"torch": torch_fixtures, "vit": vit_fixture, "vit_dynamo": vit_dynamo_fixture, "stochastic": stochastic_fixture, "keras": keras_fixture,
         "flax": flax_fixture}[w]()
