//! Every gradient rule against f64 central finite differences on small random graphs.
//! Each graph feeds the op under test from a parameterised layer, so the rule's input gradient
//! is exercised as well as its parameter gradient.

mod common;
use common::*;
use gradalign::autodiff::{BnMode, ParamSelect};
use gradalign::onnx::HostTensor;
use ndarray::{ArrayD, IxDyn};

const N: usize = 3;

fn check(g: &GraphSpec, logits: &str, classes: usize, bn: BnMode, params: ParamSelect) {
    let model = g.model(logits);
    let probe = random_probe(&g.input_shape, N, classes, 5);
    let worst = fd_check(&model, &probe, opts(bn, params), 12);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
}

/// Flatten + Gemm head so that any [N, ...] feature map becomes [N, classes] logits.
fn head(g: &mut GraphSpec, x: &str, features: usize, classes: usize) -> String {
    let f = g.node("Flatten", &[x], vec![a_i("axis", 1)]);
    let w = g.param("head.w", &[classes, features], 0.5);
    let b = g.param("head.b", &[classes], 0.5);
    g.node("Gemm", &[&f, &w, &b], vec![a_i("transB", 1)])
}

#[test]
fn conv_strided_padded_with_bias() {
    let mut g = GraphSpec::new(&[2, 7, 7], 1);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let w2 = g.param("c2.w", &[4, 3, 3, 3], 0.5);
    let b2 = g.param("c2.b", &[4], 0.5);
    // 7 + 1 - 3 = 5 → /2 + 1 = 3; the last input row is never read (ConvTranspose + pad).
    let c2 = g.node(
        "Conv",
        &[&c1, &w2, &b2],
        vec![a_ints("strides", &[2, 2]), a_ints("pads", &[1, 1, 0, 0])],
    );
    let z = head(&mut g, &c2, 4 * 3 * 3, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
}

/// A weight computed in the graph (here scaled by a constant) has no value while building, so
/// the input gradient flips it with graph ops instead of in Rust; a grouped second layer
/// exercises the per-group transpose of that path.
#[test]
fn conv_with_a_computed_weight() {
    let mut g = GraphSpec::new(&[2, 6, 6], 21);
    let w1 = g.param("c1.w", &[4, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let w2 = g.param("c2.w", &[4, 2, 3, 2], 0.5);
    let half = g.tensor("half", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.5)));
    let w2s = g.node("Mul", &[&w2, &half], vec![]);
    let c2 = g.node(
        "Conv",
        &[&c1, &w2s],
        vec![a_i("group", 2), a_ints("pads", &[1, 0, 1, 1])],
    );
    let z = head(&mut g, &c2, 4 * 6 * 6, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

#[test]
fn conv_grouped_dilated_asymmetric_pads() {
    let mut g = GraphSpec::new(&[4, 6, 6], 2);
    let w1 = g.param("c1.w", &[4, 2, 3, 3], 0.5);
    let c1 = g.node(
        "Conv",
        &["x", &w1],
        vec![
            a_i("group", 2),
            a_ints("dilations", &[2, 2]),
            a_ints("pads", &[2, 1, 2, 1]),
        ],
    );
    // out: 6 + 4 - 5 + 1 = 6 rows, 6 + 2 - 5 + 1 = 4 cols
    let w2 = g.param("c2.w", &[4, 1, 2, 2], 0.5); // depthwise
    let c2 = g.node(
        "Conv",
        &[&c1, &w2],
        vec![
            a_i("group", 4),
            a_ints("strides", &[2, 1]),
            a_ints("pads", &[0, 1, 1, 0]),
        ],
    );
    // rows: (6 + 1 - 2)/2 + 1 = 3, cols: (4 + 1 - 2)/1 + 1 = 4
    let z = head(&mut g, &c2, 4 * 3 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

#[test]
fn conv_auto_pad_same_upper_1d() {
    let mut g = GraphSpec::new(&[2, 9], 3);
    let w1 = g.param("c1.w", &[3, 2, 4], 0.5);
    let c1 = g.node(
        "Conv",
        &["x", &w1],
        vec![a_ints("strides", &[2]), pb_s("auto_pad", "SAME_UPPER")],
    );
    let z = head(&mut g, &c1, 3 * 5, 2);
    check(&g, &z, 2, BnMode::Sample, ParamSelect::All);
}

fn pb_s(name: &str, v: &str) -> gradalign::onnx::pb::AttributeProto {
    gradalign::onnx::attr::s(name, v)
}

#[test]
fn average_pool_without_padding_counts_and_ceil_mode() {
    let mut g = GraphSpec::new(&[2, 7, 7], 4);
    let w1 = g.param("c1.w", &[2, 2, 1, 1], 0.8);
    let c1 = g.node("Conv", &["x", &w1], vec![]);
    let p1 = g.node(
        "AveragePool",
        &[&c1],
        vec![
            a_ints("kernel_shape", &[3, 3]),
            a_ints("pads", &[1, 1, 1, 1]),
            a_i("count_include_pad", 0),
        ],
    );
    let p2 = g.node(
        "AveragePool",
        &[&p1],
        vec![
            a_ints("kernel_shape", &[2, 2]),
            a_ints("strides", &[2, 2]),
            a_i("ceil_mode", 1),
        ],
    );
    // 7 → ceil((7-2)/2)+1 = 4
    let p3 = g.node(
        "AveragePool",
        &[&p2],
        vec![
            a_ints("kernel_shape", &[3, 3]),
            a_ints("strides", &[2, 2]),
            a_ints("pads", &[1, 1, 1, 1]),
            a_i("count_include_pad", 1),
        ],
    );
    // 4 + 2 - 3 = 3 → /2 + 1 = 2
    let z = head(&mut g, &p3, 2 * 2 * 2, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

/// Stride 1 takes the AveragePool form of the gradient: asymmetric pads, a non-square kernel,
/// both padding-count modes.
#[test]
fn average_pool_stride_one_asymmetric_pads() {
    let mut g = GraphSpec::new(&[2, 6, 5], 9);
    let w1 = g.param("c1.w", &[2, 2, 1, 1], 0.8);
    let c1 = g.node("Conv", &["x", &w1], vec![]);
    let p1 = g.node(
        "AveragePool",
        &[&c1],
        vec![
            a_ints("kernel_shape", &[2, 3]),
            a_ints("pads", &[0, 1, 1, 2]),
            a_i("count_include_pad", 1),
        ],
    );
    // [6, 5] → [6 + 1 − 2 + 1, 5 + 3 − 3 + 1] = [6, 6]
    let p2 = g.node(
        "AveragePool",
        &[&p1],
        vec![
            a_ints("kernel_shape", &[3, 2]),
            a_ints("pads", &[2, 0, 0, 1]),
            a_i("count_include_pad", 0),
        ],
    );
    // [6, 6] → [6 + 2 − 3 + 1, 6 + 1 − 2 + 1] = [6, 6]
    let z = head(&mut g, &p2, 2 * 6 * 6, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

#[test]
fn max_pool_strided_padded() {
    let mut g = GraphSpec::new(&[2, 7, 7], 5);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let p1 = g.node(
        "MaxPool",
        &[&c1],
        vec![
            a_ints("kernel_shape", &[3, 3]),
            a_ints("strides", &[2, 2]),
            a_ints("pads", &[1, 1, 1, 1]),
        ],
    );
    // 7 + 2 - 3 = 6 → 4
    let p2 = g.node(
        "MaxPool",
        &[&p1],
        vec![a_ints("kernel_shape", &[2, 2]), a_ints("strides", &[1, 1])],
    );
    let z = head(&mut g, &p2, 3 * 3 * 3, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

#[test]
fn max_pool_ceil_mode_and_dilation() {
    let mut g = GraphSpec::new(&[2, 8, 9], 7);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    // [8, 9], kernel 3×3 dilated (1, 2), stride 2, pads (1, 0, 0, 1), ceil mode:
    // rows ceil((8 + 1 - 3) / 2) + 1 = 4, columns ceil((9 + 1 - 5) / 2) + 1 = 4 (the last
    // window of each reaches past the padded input).
    let p1 = g.node(
        "MaxPool",
        &[&c1],
        vec![
            a_ints("kernel_shape", &[3, 3]),
            a_ints("strides", &[2, 2]),
            a_ints("dilations", &[1, 2]),
            a_ints("pads", &[1, 0, 0, 1]),
            a_i("ceil_mode", 1),
        ],
    );
    let z = head(&mut g, &p1, 3 * 4 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

/// Some exporters pad with −∞ before a MaxPool instead of using its pads. Every window still
/// holds a finite maximum, so the gradient is finite and must reach it.
#[test]
fn max_pool_after_minus_infinity_padding() {
    let mut g = GraphSpec::new(&[2, 6, 6], 11);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let pads = g.ints(&[0, 0, 1, 1, 0, 0, 1, 1]);
    let ninf = g.tensor(
        "ninf",
        HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), f32::NEG_INFINITY)),
    );
    let padded = g.node("Pad", &[&c1, &pads, &ninf], vec![]);
    // [8, 8] → (8 − 3) / 2 + 1 = 3
    let p1 = g.node(
        "MaxPool",
        &[&padded],
        vec![a_ints("kernel_shape", &[3, 3]), a_ints("strides", &[2, 2])],
    );
    let z = head(&mut g, &p1, 3 * 3 * 3, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

fn bn_graph(seed: u64) -> (GraphSpec, String) {
    let mut g = GraphSpec::new(&[2, 5, 5], seed);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let scale = g.param("bn.scale", &[3], 1.0);
    let bias = g.param("bn.bias", &[3], 1.0);
    let mean = g.param("bn.mean", &[3], 0.3);
    let var = g.tensor(
        "bn.var",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5, 1.5, 2.0]).unwrap()),
    );
    let bn = g.node_n(
        "BatchNormalization",
        &[&c1, &scale, &bias, &mean, &var],
        vec![a_f("epsilon", 1e-5), a_i("training_mode", 1)],
        3,
    );
    let r = g.node("Relu", &[&bn[0]], vec![]);
    let w2 = g.param("c2.w", &[2, 3, 3, 3], 0.5);
    let c2 = g.node("Conv", &[&r, &w2], vec![]);
    let z = head(&mut g, &c2, 2 * 3 * 3, 3);
    (g, z)
}

#[test]
fn batch_norm_per_sample_statistics() {
    let (g, z) = bn_graph(6);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
}

#[test]
fn batch_norm_running_statistics() {
    let (g, z) = bn_graph(7);
    check(&g, &z, 3, BnMode::Eval, ParamSelect::All);
}

#[test]
fn concat_split_slice_pad_transpose() {
    let mut g = GraphSpec::new(&[4, 5, 5], 8);
    let w1 = g.param("c1.w", &[4, 4, 1, 1], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![]);
    let split = g.ints(&[1, 3]);
    let parts = g.node_n("Split", &[&c1, &split], vec![a_i("axis", 1)], 2);
    let w2 = g.param("c2.w", &[2, 3, 3, 3], 0.5);
    let c2 = g.node(
        "Conv",
        &[&parts[1], &w2],
        vec![a_ints("pads", &[1, 1, 1, 1])],
    );
    let cat = g.node("Concat", &[&parts[0], &c2, &c1], vec![a_i("axis", 1)]); // 1 + 2 + 4 = 7 channels
    let (s, e, a) = (g.ints(&[1, 0]), g.ints(&[5, 4]), g.ints(&[2, 3]));
    let sl = g.node("Slice", &[&cat, &s, &e, &a], vec![]); // [7, 4, 4]
    let pads = g.ints(&[0, 0, 1, 0, 0, 0, 0, 2]);
    let pd = g.node("Pad", &[&sl, &pads], vec![]); // [7, 5, 6]
    let tr = g.node("Transpose", &[&pd], vec![a_ints("perm", &[0, 3, 1, 2])]); // [6, 7, 5]
    let z = head(&mut g, &tr, 6 * 7 * 5, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

#[test]
fn gemm_both_layouts_and_matmul() {
    let mut g = GraphSpec::new(&[3, 4], 9);
    // MatMul with a rank-3 activation: [N,3,4]·[4,5]
    let w1 = g.param("mm.w", &[4, 5], 0.5);
    let m1 = g.node("MatMul", &["x", &w1], vec![]);
    let t = g.node("Tanh", &[&m1], vec![]);
    let f = g.node("Flatten", &[&t], vec![]);
    // Gemm, transB = 0: W is [in, out]
    let w2 = g.param("g0.w", &[15, 6], 0.4);
    let b2 = g.param("g0.b", &[6], 0.4);
    let h = g.node(
        "Gemm",
        &[&f, &w2, &b2],
        vec![a_f("alpha", 0.7), a_f("beta", 1.3)],
    );
    let s = g.node("Sigmoid", &[&h], vec![]);
    let w3 = g.param("g1.w", &[4, 6], 0.5);
    let b3 = g.param("g1.b", &[1, 4], 0.5);
    let z = g.node("Gemm", &[&s, &w3, &b3], vec![a_i("transB", 1)]);
    check(&g, &z, 4, BnMode::Sample, ParamSelect::All);
}

#[test]
fn mul_by_constant_zero_gives_exact_zero_gradient() {
    let mut g = GraphSpec::new(&[2, 4, 4], 10);
    let w1 = g.param("c1.w", &[2, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let zero = g.tensor("zero", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.0)));
    let dead = g.node("Mul", &[&c1, &zero], vec![]);
    let w2 = g.param("c2.w", &[2, 2, 1, 1], 0.5);
    let c2 = g.node("Conv", &["x", &w2], vec![]);
    let sum = g.node("Add", &[&dead, &c2], vec![]);
    let z = head(&mut g, &sum, 2 * 4 * 4, 2);
    let model = g.model(&z);
    let probe = random_probe(&g.input_shape, N, 2, 5);
    let o = opts(BnMode::Sample, ParamSelect::Weights);
    let res = gradalign::inputs::engine::per_sample_grads(&model, &probe, o, false).unwrap();
    let e = &res.layout[0];
    assert_eq!(e.name, "c1.w");
    let gr = res.grads.to_f64();
    assert!(gr
        .slice(ndarray::s![.., e.offset..e.offset + e.numel])
        .iter()
        .all(|&v| v == 0.0));
    assert!(gr.iter().any(|&v| v != 0.0));
    fd_check(&model, &probe, o, 8);
}

#[test]
fn elementwise_reductions_softmax_and_global_pool() {
    let mut g = GraphSpec::new(&[3, 4, 4], 11);
    let w1 = g.param("c1.w", &[3, 3, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let r = g.node("Relu", &[&c1], vec![]);
    let th = g.tensor("thr", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.1)));
    let mx = g.node("Max", &[&r, &th], vec![]);
    let e = g.node("Tanh", &[&mx], vec![]);
    let m = g.node(
        "ReduceMean",
        &[&c1],
        vec![a_ints("axes", &[2, 3]), a_i("keepdims", 1)],
    );
    let d = g.node("Sub", &[&e, &m], vec![]);
    let two = g.tensor("two", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 2.0)));
    let sq = g.node("Pow", &[&d, &two], vec![]);
    let one = g.tensor("one", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 1.0)));
    let den = g.node("Add", &[&sq, &one], vec![]);
    let q = g.node("Div", &[&c1, &den], vec![]);
    let sm = g.node("Softmax", &[&q], vec![a_i("axis", 1)]);
    let gp = g.node("GlobalAveragePool", &[&sm], vec![]);
    let s = g.node("Mul", &[&gp, &c1], vec![]);
    let ax = g.ints(&[3]);
    let rs = g.node("ReduceSum", &[&s, &ax], vec![a_i("keepdims", 0)]);
    let z = head(&mut g, &rs, 3 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::Weights);
}

/// Erf runs in f32 inside f64 graphs (tract has no f64 Erf), so finite differences use the
/// tanh form of GELU here; the Erf rule itself is checked against PyTorch (toy_mlp golden).
#[test]
fn layer_norm_gelu_tanh_block() {
    let mut g = GraphSpec::new(&[3, 6], 12);
    let w1 = g.param("fc1.w", &[6, 8], 0.5);
    let h = g.node("MatMul", &["x", &w1], vec![]);
    let s = g.param("ln.scale", &[8], 1.0);
    let b = g.param("ln.bias", &[8], 0.5);
    let ln = g.node("LayerNormalization", &[&h, &s, &b], vec![a_i("axis", -1)]);
    let ge = g.node(
        "Gelu",
        &[&ln],
        vec![gradalign::onnx::attr::s("approximate", "tanh")],
    );
    let res = g.node("Add", &[&ge, &h], vec![]);
    let z = head(&mut g, &res, 3 * 8, 4);
    check(&g, &z, 4, BnMode::Sample, ParamSelect::All);
}

/// MobileNetV3 / SELU-style activations (lowered to primitives), including PRelu's learnable
/// per-channel slope as a parameter.
#[test]
fn hard_sigmoid_hard_swish_elu_selu_prelu() {
    let mut g = GraphSpec::new(&[2, 5, 5], 12);
    // Inputs spread over the kinks of every activation (±3 for the hard ones, 0 for the rest).
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 1.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let hs = g.node("HardSwish", &[&c1], vec![]);
    let hg = g.node(
        "HardSigmoid",
        &[&c1],
        vec![a_f("alpha", 0.3), a_f("beta", 0.4)],
    );
    let e = g.node("Elu", &[&c1], vec![a_f("alpha", 0.7)]);
    let se = g.node("Selu", &[&c1], vec![]);
    let slope = g.param("prelu.slope", &[3, 1, 1], 0.5);
    let pr = g.node("PRelu", &[&c1, &slope], vec![]);
    let s1 = g.node("Add", &[&hs, &hg], vec![]);
    let s2 = g.node("Add", &[&e, &se], vec![]);
    let s3 = g.node("Mul", &[&s1, &s2], vec![]);
    let s4 = g.node("Add", &[&s3, &pr], vec![]);
    let z = head(&mut g, &s4, 3 * 5 * 5, 3);
    let model = g.model(&z);
    let probe = random_probe(&g.input_shape, N, 3, 5);
    let o = opts(BnMode::Sample, ParamSelect::All);
    let worst = fd_check(&model, &probe, o, 24);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
    let r = gradalign::inputs::engine::per_sample_grads(&model, &probe, o, false).unwrap();
    assert!(
        r.layout.iter().any(|e| e.name == "prelu.slope"),
        "PRelu's slope must be a parameter: {:?}",
        r.layout.iter().map(|e| &e.name).collect::<Vec<_>>()
    );
}

/// The lowered activations compute ONNX's definitions (finite differences alone would accept a
/// wrong forward): logits of a graph that is just the activation, against the formulas.
#[test]
fn piecewise_activations_match_their_onnx_definitions() {
    let xs = [-4.0, -3.0, -1.5, -0.25, 0.0, 0.25, 1.5, 3.0, 4.0, 90.0];
    let slope = [0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];
    type Def = (
        &'static str,
        Vec<gradalign::onnx::pb::AttributeProto>,
        fn(f64, usize) -> f64,
    );
    let cases: Vec<Def> = vec![
        (
            "HardSigmoid",
            vec![a_f("alpha", 0.3), a_f("beta", 0.4)],
            |x, _| (0.3f32 as f64 * x + 0.4f32 as f64).clamp(0.0, 1.0),
        ),
        ("HardSwish", vec![], |x, _| {
            x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
        }),
        ("Elu", vec![a_f("alpha", 0.7)], |x, _| {
            if x > 0.0 {
                x
            } else {
                0.7f32 as f64 * (x.exp() - 1.0)
            }
        }),
        ("Selu", vec![], |x, _| {
            1.050_701_022_148_132_3
                * if x > 0.0 {
                    x
                } else {
                    1.673_263_192_176_818_8 * (x.exp() - 1.0)
                }
        }),
        ("Softplus", vec![], |x, _| (1.0 + x.exp()).ln()),
        ("Mish", vec![], |x, _| x * (1.0 + x.exp()).ln().tanh()),
        ("PRelu", vec![], |x, k| {
            if x > 0.0 {
                x
            } else {
                [0.1, -0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0][k] * x
            }
        }),
    ];
    for (op, attrs, f) in cases {
        let mut g = GraphSpec::new(&[10], 1);
        let mut ins = vec!["x".to_string()];
        if op == "PRelu" {
            ins.push(g.tensor(
                "slope",
                HostTensor::F32(
                    ArrayD::from_shape_vec(IxDyn(&[10]), slope.map(|v| v as f32).to_vec()).unwrap(),
                ),
            ));
        }
        let refs: Vec<&str> = ins.iter().map(String::as_str).collect();
        let act = g.node(op, &refs, attrs);
        let model = g.model(&act);
        let mut probe = random_probe(&g.input_shape, 2, 10, 3);
        for (i, v) in probe.images.iter_mut().enumerate() {
            *v = xs[i % 10] as f32;
        }
        let r = gradalign::inputs::engine::per_sample_grads(
            &model,
            &probe,
            opts(BnMode::Sample, ParamSelect::All),
            false,
        )
        .unwrap();
        let logits = r.logits.to_f64();
        for (i, &got) in logits.iter().enumerate() {
            let x = xs[i % 10] as f32 as f64;
            let want = f(x, i % 10);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{op}({x}) = {got}, want {want}"
            );
        }
    }
}

/// Exporters cast on the data path (`Cast(to=FLOAT)`, opset-15 `CastLike`); in an f64 run those
/// casts keep f64 instead of dropping to f32 mid-graph, and the gradients stay exact.
#[test]
fn cast_and_cast_like_on_the_data_path_in_f64() {
    let mut g = GraphSpec::new(&[2, 4, 4], 13);
    let c = g.node("Cast", &["x"], vec![a_i("to", 1)]);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &[&c, &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let like = g.tensor("like", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.0)));
    let cl = g.node("CastLike", &[&c1, &like], vec![]);
    let t = g.node("Tanh", &[&cl], vec![]);
    let z = head(&mut g, &t, 3 * 4 * 4, 3);
    let model = g.model(&z);
    let probe = random_probe(&g.input_shape, N, 3, 5);
    let o = opts(BnMode::Sample, ParamSelect::Weights);
    let r = gradalign::inputs::engine::per_sample_grads(&model, &probe, o, false).unwrap();
    assert!(
        matches!(r.grads, HostTensor::F64(_)),
        "an f64 run stays f64 through the casts"
    );
    // Finite differences in f64 only agree to 1e-5 if no f32 rounding crept in.
    let worst = fd_check(&model, &probe, o, 16);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
}

/// Conv → `norm` (InstanceNormalization, GroupNormalization with `groups`, or per-sample
/// BatchNormalization) → Relu → head, with the same weights whichever the norm.
fn norm_graph(norm: &str, groups: i64) -> (GraphSpec, String) {
    let mut g = GraphSpec::new(&[2, 4, 4], 17);
    let w1 = g.param("c1.w", &[4, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let scale = g.param("n.scale", &[4], 1.0);
    let bias = g.param("n.bias", &[4], 1.0);
    let y = match norm {
        "BatchNormalization" => {
            let mean = g.tensor(
                "bn.mean",
                HostTensor::F32(ArrayD::from_elem(IxDyn(&[4]), 0.3)),
            );
            let var = g.tensor(
                "bn.var",
                HostTensor::F32(ArrayD::from_elem(IxDyn(&[4]), 1.0)),
            );
            g.node(
                norm,
                &[&c1, &scale, &bias, &mean, &var],
                vec![a_f("epsilon", 1e-5)],
            )
        }
        "GroupNormalization" => g.node(
            norm,
            &[&c1, &scale, &bias],
            vec![a_f("epsilon", 1e-5), a_i("num_groups", groups)],
        ),
        _ => g.node(norm, &[&c1, &scale, &bias], vec![a_f("epsilon", 1e-5)]),
    };
    let r = g.node("Relu", &[&y], vec![]);
    let z = head(&mut g, &r, 4 * 4 * 4, 3);
    (g, z)
}

#[test]
fn instance_and_group_normalization() {
    for (norm, groups) in [("InstanceNormalization", 0), ("GroupNormalization", 2)] {
        let (g, z) = norm_graph(norm, groups);
        check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
    }
    // Forward: InstanceNormalization is per-sample BatchNormalization, and GroupNormalization
    // with one group per channel is InstanceNormalization.
    let probe = random_probe(&[2, 4, 4], N, 3, 5);
    let o = opts(BnMode::Sample, ParamSelect::All);
    let logits = |norm: &str, groups: i64| {
        let (g, z) = norm_graph(norm, groups);
        gradalign::inputs::engine::per_sample_grads(&g.model(&z), &probe, o, false)
            .unwrap()
            .logits
            .to_f64()
    };
    let bn = logits("BatchNormalization", 0);
    assert_eq!(logits("InstanceNormalization", 0), bn);
    assert_eq!(logits("GroupNormalization", 4), bn);
    // Two groups of two channels really normalise over each group (not per channel).
    assert_ne!(logits("GroupNormalization", 2), bn);
}

/// GroupNormalization's statistics, by hand: the first conv's output normalised over groups of
/// channels equals the lowered graph's forward.
#[test]
fn group_normalization_forward_matches_its_definition() {
    let mut g = GraphSpec::new(&[4, 2, 3], 3);
    let scale = g.tensor(
        "s",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 2.0, -1.0, 0.5]).unwrap()),
    );
    let bias = g.tensor(
        "b",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.1, 0.2, 0.3, 0.4]).unwrap()),
    );
    let y = g.node(
        "GroupNormalization",
        &["x", &scale, &bias],
        vec![a_f("epsilon", 1e-3), a_i("num_groups", 2)],
    );
    let z = g.node("Flatten", &[&y], vec![a_i("axis", 1)]);
    let probe = random_probe(&[4, 2, 3], 2, 24, 9);
    let r = gradalign::inputs::engine::per_sample_grads(
        &g.model(&z),
        &probe,
        opts(BnMode::Sample, ParamSelect::All),
        false,
    )
    .unwrap();
    let got: Vec<f64> = r.logits.to_f64().iter().copied().collect();
    let x = probe.images.mapv(|v| v as f64);
    let (s, b) = (
        [1.0, 2.0, -1.0, 0.5],
        [0.1f32 as f64, 0.2f32 as f64, 0.3f32 as f64, 0.4f32 as f64],
    );
    for n in 0..2 {
        for grp in 0..2 {
            let vals: Vec<f64> = (0..12)
                .map(|k| x[[n, grp * 2 + k / 6, (k % 6) / 3, k % 3]])
                .collect();
            let mean = vals.iter().sum::<f64>() / 12.0;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 12.0;
            for k in 0..12 {
                let ch = grp * 2 + k / 6;
                let want = (vals[k] - mean) / (var + 1e-3f32 as f64).sqrt() * s[ch] + b[ch];
                let idx = n * 24 + ch * 6 + k % 6;
                assert!(
                    (got[idx] - want).abs() < 1e-9,
                    "n {n} channel {ch}: {} vs {want}",
                    got[idx]
                );
            }
        }
    }
}

/// Elu/Selu at inputs far above eˣ's float32 range: the forward is x and the gradient finite
/// (eˣ is taken of the non-positive part only; 0 · ∞ in its backward would give NaN).
#[test]
fn elu_and_selu_gradients_stay_finite_for_large_inputs() {
    for op in ["Elu", "Selu"] {
        let mut g = GraphSpec::new(&[4], 2);
        let w = g.param("w", &[3, 4], 0.5);
        let a = g.node(op, &["x"], vec![]);
        let z = g.node("Gemm", &[&a, &w], vec![a_i("transB", 1)]);
        let mut probe = random_probe(&g.input_shape, 3, 3, 1);
        probe.images.mapv_inplace(|v| 100.0 + v);
        let mut o = opts(BnMode::Sample, ParamSelect::Weights);
        o.precision = gradalign::autodiff::Precision::F32;
        let r =
            gradalign::inputs::engine::per_sample_grads(&g.model(&z), &probe, o, false).unwrap();
        assert!(
            r.grads.to_f64().iter().all(|v| v.is_finite()),
            "{op}: {:?}",
            r.notes
        );
        assert!(
            r.notes.iter().all(|n| !n.contains("non-finite")),
            "{op}: {:?}",
            r.notes
        );
    }
}

/// ONNX Max and Min are variadic: every operand of a three-way Min gets its gradient (a binary
/// rule alone would drop the third), and a one-operand Max is a copy.
#[test]
fn variadic_min_and_max() {
    let mut g = GraphSpec::new(&[2, 4, 4], 13);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let w2 = g.param("c2.w", &[3, 2, 1, 1], 0.5);
    let c2 = g.node("Conv", &["x", &w2], vec![]);
    let t = g.node("Tanh", &[&c1], vec![]);
    let m3 = g.node("Min", &[&c1, &c2, &t], vec![]);
    let m1 = g.node("Max", &[&m3], vec![]);
    let cap = g.param("cap", &[3, 1, 1], 0.5);
    let mx = g.node("Max", &[&m1, &cap, &c2], vec![]);
    let z = head(&mut g, &mx, 3 * 4 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
}

/// Attention's q/k/v split as exporters write it: Transpose(2, 0, 3, 1, 4) moves the sample
/// axis, then Slice (torch dynamo) or Split (legacy) plus Squeeze, or Gather (unbind), selects
/// along axis 0 and so moves it back. Rewritten into selections on the Transpose's input.
#[test]
fn qkv_split_through_a_sample_axis_transpose() {
    for how in ["slice", "split", "gather"] {
        let (t, h, d) = (3, 2, 2);
        let mut g = GraphSpec::new(&[t, 4], 17);
        let w = g.param("qkv.w", &[4, 3 * h * d], 0.5);
        let qkv = g.node("MatMul", &["x", &w], vec![]);
        let shape = g.ints(&[-1, t as i64, 3, h as i64, d as i64]);
        let r = g.node("Reshape", &[&qkv, &shape], vec![]);
        let p = g.node("Transpose", &[&r], vec![a_ints("perm", &[2, 0, 3, 1, 4])]);
        let zero = g.ints(&[0]);
        let parts: Vec<String> = match how {
            "slice" => (0..3)
                .map(|k| {
                    let (s, e) = (g.ints(&[k]), g.ints(&[k + 1]));
                    let sl = g.node("Slice", &[&p, &s, &e, &zero], vec![]);
                    g.node("Squeeze", &[&sl, &zero], vec![])
                })
                .collect(),
            "split" => {
                let outs = g.node_n("Split", &[&p], vec![a_i("axis", 0)], 3);
                outs.iter()
                    .map(|o| g.node("Squeeze", &[o, &zero], vec![]))
                    .collect()
            }
            _ => (0..3)
                .map(|k| {
                    let i = g.tensor(
                        &format!("idx{k}"),
                        HostTensor::I64(ArrayD::from_elem(IxDyn(&[]), k)),
                    );
                    g.node("Gather", &[&p, &i], vec![a_i("axis", 0)])
                })
                .collect(),
        };
        let kt = g.node(
            "Transpose",
            &[&parts[1]],
            vec![a_ints("perm", &[0, 1, 3, 2])],
        );
        let att = g.node("MatMul", &[&parts[0], &kt], vec![]);
        let sm = g.node("Softmax", &[&att], vec![a_i("axis", -1)]);
        let o = g.node("MatMul", &[&sm, &parts[2]], vec![]);
        let z = head(&mut g, &o, h * t * d, 3);
        check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
    }
}

/// Softplus and Mish (stable form through Log, Min, Exp), ReduceL2 and ReduceSumSquare, fed by
/// convolutions whose outputs reach |x| ≈ 5, so both branches of the stable form are used.
#[test]
fn softplus_mish_and_l2_reductions() {
    let mut g = GraphSpec::new(&[2, 4, 4], 19);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 1.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let sp = g.node("Softplus", &[&c1], vec![]);
    let mi = g.node("Mish", &[&c1], vec![]);
    let s = g.node("Add", &[&sp, &mi], vec![]);
    let l2 = g.node(
        "ReduceL2",
        &[&s],
        vec![a_ints("axes", &[2]), a_i("keepdims", 1)],
    );
    let ss = g.node(
        "ReduceSumSquare",
        &[&mi],
        vec![a_ints("axes", &[3]), a_i("keepdims", 0)],
    );
    let f1 = g.node("Flatten", &[&l2], vec![a_i("axis", 1)]);
    let f2 = g.node("Flatten", &[&ss], vec![a_i("axis", 1)]);
    let cat = g.node("Concat", &[&f1, &f2], vec![a_i("axis", 1)]);
    let z = head(&mut g, &cat, 3 * 4 + 3 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
}

/// ReduceMax and ReduceMin (squeeze-and-excitation and CBAM-style pooling): the gradient goes
/// to the extreme entry of each reduced group.
#[test]
fn reduce_max_and_min() {
    let mut g = GraphSpec::new(&[2, 4, 4], 23);
    let w1 = g.param("c1.w", &[3, 2, 3, 3], 0.5);
    let c1 = g.node("Conv", &["x", &w1], vec![a_ints("pads", &[1, 1, 1, 1])]);
    let mx = g.node(
        "ReduceMax",
        &[&c1],
        vec![a_ints("axes", &[2, 3]), a_i("keepdims", 1)],
    );
    let mn = g.node(
        "ReduceMin",
        &[&c1],
        vec![a_ints("axes", &[1]), a_i("keepdims", 0)],
    );
    let s = g.node("Mul", &[&c1, &mx], vec![]);
    let f1 = g.node("Flatten", &[&s], vec![a_i("axis", 1)]);
    let f2 = g.node("Flatten", &[&mn], vec![a_i("axis", 1)]);
    let cat = g.node("Concat", &[&f1, &f2], vec![a_i("axis", 1)]);
    let z = head(&mut g, &cat, 3 * 4 * 4 + 4 * 4, 3);
    check(&g, &z, 3, BnMode::Sample, ParamSelect::All);
}

/// Finite differences cannot see ties, so this pins the rule PyTorch uses: a window whose
/// maximum is taken at several positions passes its whole gradient to the first of them in
/// row-major order. Two input channels meet in a 1×1 Conv with weights (1, 1), so tied outputs
/// come from different channels and the Conv weight gradient says which position was chosen.
#[test]
fn max_pool_ties_route_to_the_first_maximum() {
    use gradalign::inputs::engine::per_sample_grads_with;
    use gradalign::inputs::probe::Probe;
    use gradalign::runtime::Backend;
    let mut g = GraphSpec::new(&[2, 2, 2], 3);
    let w = g.tensor(
        "c.w",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 1]), vec![1.0, 1.0]).unwrap()),
    );
    let c = g.node("Conv", &["x", &w], vec![]);
    let p = g.node(
        "MaxPool",
        &[&c],
        vec![a_ints("kernel_shape", &[2, 2]), a_ints("strides", &[2, 2])],
    );
    let z = head(&mut g, &p, 1, 2);
    let model = g.model(&z);
    // Sample 0: the maximum 1 at (0, 0) from channel 0 and at (0, 1) from channel 1.
    // Sample 1: the maximum 2 at (1, 0) from channel 1 and at (1, 1) from channel 0.
    let images = ArrayD::from_shape_vec(
        IxDyn(&[2, 2, 2, 2]),
        vec![
            1.0, 0.0, 0.0, 0.0, // sample 0, channel 0
            0.0, 1.0, 0.0, 0.0, // sample 0, channel 1
            0.0, 0.0, 0.0, 2.0, // sample 1, channel 0
            0.0, 0.0, 2.0, 0.0, // sample 1, channel 1
        ],
    )
    .unwrap();
    let probe = Probe {
        images,
        labels: ndarray::Array1::from(vec![0i64, 1]),
        source: "ties".into(),
    };
    let mut backends = vec![Backend::Tract];
    if gradalign::runtime::ort::unavailable_reason().is_none() {
        backends.push(Backend::Ort);
    }
    for backend in backends {
        let mut o = opts(BnMode::Sample, ParamSelect::Weights);
        if backend == Backend::Ort {
            // ONNX Runtime's CPU Conv is float32 only.
            o.precision = gradalign::autodiff::Precision::F32;
        }
        let r = per_sample_grads_with(&model, &probe, o, false, backend).unwrap();
        let e = r.layout.iter().find(|e| e.name == "c.w").unwrap();
        let a = r.grads.to_f64();
        let row = |s: usize| [a[[s, e.offset]], a[[s, e.offset + 1]]];
        // dL/dw_c = dL/dy at the chosen position · x_c there: only the first tied position's
        // channel may get a gradient.
        let (s0, s1) = (row(0), row(1));
        assert!(s0[0] != 0.0 && s0[1] == 0.0, "{backend:?}: sample 0 {s0:?}");
        assert!(s1[1] != 0.0 && s1[0] == 0.0, "{backend:?}: sample 1 {s1:?}");
    }
}
