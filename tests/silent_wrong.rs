//! Exported graphs that used to give silently wrong answers (exit 0 with zero or misleading
//! gradients) now give an error that names the node and the remedy, the right gradients, or a
//! warning in the notes.

mod common;
use common::*;
use gradalign::autodiff::{BnMode, ParamSelect};
use gradalign::inputs::engine::{per_sample_grads, WARNING};
use gradalign::onnx::HostTensor;
use ndarray::{ArrayD, IxDyn};

/// Conv whose 4×4 kernel turns a 4×4 image into a 1×1 map, then BatchNormalization, ReLU and a
/// Gemm head: the ImageNet-style network at a too-small input.
fn bn_on_one_value() -> (GraphSpec, String) {
    let mut g = GraphSpec::new(&[2, 4, 4], 3);
    let w = g.param("c.w", &[3, 2, 4, 4], 0.5);
    let c = g.node("Conv", &["x", &w], vec![]);
    let scale = g.param("bn.scale", &[3], 1.0);
    let bias = g.param("bn.bias", &[3], 1.0);
    let mean = g.param("bn.mean", &[3], 0.3);
    let var = g.tensor(
        "bn.var",
        HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5, 1.5, 2.0]).unwrap()),
    );
    let bn = g.node(
        "BatchNormalization",
        &[&c, &scale, &bias, &mean, &var],
        vec![a_f("epsilon", 1e-5)],
    );
    let r = g.node("Relu", &[&bn], vec![]);
    let f = g.node("Flatten", &[&r], vec![a_i("axis", 1)]);
    let hw = g.param("head.w", &[4, 3], 0.5);
    let z = g.node("Gemm", &[&f, &hw], vec![a_i("transB", 1)]);
    (g, z)
}

#[test]
fn per_sample_batch_norm_over_one_value_is_refused_with_the_remedy() {
    let (g, z) = bn_on_one_value();
    let model = g.model(&z);
    let probe = random_probe(&g.input_shape, 4, 4, 1);
    let err = per_sample_grads(
        &model,
        &probe,
        opts(BnMode::Sample, ParamSelect::Weights),
        false,
    )
    .err()
    .expect("per-sample BN over a 1×1 map must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("BatchNormalization"), "{msg}");
    assert!(msg.contains("--bn eval"), "{msg}");
    assert!(msg.contains("[4, 3, 1, 1]"), "names the shape: {msg}");
    // Running statistics are defined on a 1×1 map: the same model then has exact gradients.
    let worst = fd_check(&model, &probe, opts(BnMode::Eval, ParamSelect::All), 12);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
}

/// A small MLP whose logits `z` may be followed by `tail` (ops applied in order).
fn mlp_with_tail(tail: &[&str]) -> (GraphSpec, String, String) {
    let mut g = GraphSpec::new(&[6], 11);
    let w1 = g.param("w1", &[5, 6], 0.7);
    let h = g.node("Gemm", &["x", &w1], vec![a_i("transB", 1)]);
    let t = g.node("Tanh", &[&h], vec![]);
    let w2 = g.param("w2", &[3, 5], 0.7);
    let z = g.node("Gemm", &[&t, &w2], vec![a_i("transB", 1)]);
    let mut out = z.clone();
    for op in tail {
        out = match *op {
            "Softmax" => g.node("Softmax", &[&out], vec![a_i("axis", 1)]),
            "Cast" => g.node("Cast", &[&out], vec![a_i("to", 1)]),
            other => g.node(other, &[&out], vec![]),
        };
    }
    (g, z, out)
}

#[test]
fn softmax_behind_identity_and_cast_is_stripped_with_a_note() {
    let (g0, z0, _) = mlp_with_tail(&[]);
    let probe = random_probe(&g0.input_shape, 5, 3, 2);
    let o = opts(BnMode::Sample, ParamSelect::All);
    let want = per_sample_grads(&g0.model(&z0), &probe, o, false).unwrap();
    for tail in [
        &["Softmax", "Identity"][..],
        &["Softmax", "Cast", "Identity"][..],
    ] {
        let (g, _, out) = mlp_with_tail(tail);
        let got = per_sample_grads(&g.model(&out), &probe, o, false).unwrap();
        assert_eq!(
            got.grads.to_f64(),
            want.grads.to_f64(),
            "{tail:?}: the loss must be taken on the logits before the Softmax"
        );
        assert!(
            got.notes
                .iter()
                .any(|n| n.contains("Softmax") && n.contains(tail[1])),
            "{tail:?}: {:?}",
            got.notes
        );
    }
}

#[test]
fn all_zero_per_sample_gradients_are_a_warning() {
    // The weights only ever meet an input multiplied by zero: every gradient is exactly 0.
    let mut g = GraphSpec::new(&[4], 5);
    let zero = g.tensor("zero", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.0)));
    let x0 = g.node("Mul", &["x", &zero], vec![]);
    let w = g.param("w", &[3, 4], 0.5);
    let z = g.node("Gemm", &[&x0, &w], vec![a_i("transB", 1)]);
    let probe = random_probe(&g.input_shape, 6, 3, 4);
    let r = per_sample_grads(
        &g.model(&z),
        &probe,
        opts(BnMode::Sample, ParamSelect::Weights),
        false,
    )
    .unwrap();
    assert!(r.grads.to_f64().iter().all(|&v| v == 0.0));
    let warnings: Vec<&String> = r.notes.iter().filter(|n| n.starts_with(WARNING)).collect();
    assert_eq!(warnings.len(), 1, "{:?}", r.notes);
    assert!(
        warnings[0].contains("6 of 6") && warnings[0].contains("all of them"),
        "{}",
        warnings[0]
    );
    // A healthy model gets no warning.
    let (g1, z1, _) = mlp_with_tail(&[]);
    let ok = per_sample_grads(
        &g1.model(&z1),
        &random_probe(&g1.input_shape, 6, 3, 4),
        opts(BnMode::Sample, ParamSelect::Weights),
        false,
    )
    .unwrap();
    assert!(
        ok.notes.iter().all(|n| !n.starts_with(WARNING)),
        "{:?}",
        ok.notes
    );
}

#[test]
fn non_finite_gradients_are_a_warning() {
    // exp(60·x) overflows float32 for x > 1.48: the logits and their gradients are not finite.
    let mut g = GraphSpec::new(&[4], 8);
    let k = g.tensor("k", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 60.0)));
    let s = g.node("Mul", &["x", &k], vec![]);
    let e = g.node("Exp", &[&s], vec![]);
    let w = g.param("w", &[3, 4], 0.5);
    let z = g.node("Gemm", &[&e, &w], vec![a_i("transB", 1)]);
    let mut probe = random_probe(&g.input_shape, 4, 3, 4);
    probe.images.fill(2.0);
    let mut o = opts(BnMode::Sample, ParamSelect::Weights);
    o.precision = gradalign::autodiff::Precision::F32;
    let model = g.model(&z);
    let r = per_sample_grads(&model, &probe, o, false).unwrap();
    assert!(r.grads.to_f64().iter().any(|v| !v.is_finite()));
    // The one-pass sign path (what the default scorers read) says the same.
    let signs = gradalign::inputs::stream::per_sample_signs(
        &model,
        &probe,
        false,
        o,
        gradalign::runtime::Backend::Tract,
        gradalign::runtime::Device::Cpu,
        false,
    )
    .unwrap();
    for notes in [&r.notes, &signs.notes] {
        assert!(
            notes.iter().any(|n| n.starts_with(WARNING)
                && n.contains("12 of 12 gradient columns hold non-finite")),
            "{notes:?}"
        );
    }
}

#[test]
fn weights_reaching_matmul_through_a_transpose_are_weights() {
    // The legacy exporter's nn.Linear on token sequences: MatMul(x, Transpose(W)).
    let mut g = GraphSpec::new(&[6], 21);
    let w1 = g.param("lin1.weight", &[5, 6], 0.7);
    let t1 = g.node("Transpose", &[&w1], vec![a_ints("perm", &[1, 0])]);
    let h = g.node("MatMul", &["x", &t1], vec![]);
    let a = g.node("Tanh", &[&h], vec![]);
    let w2 = g.param("lin2.weight", &[3, 5], 0.7);
    let t2 = g.node("Transpose", &[&w2], vec![a_ints("perm", &[1, 0])]);
    let c2 = g.node("Identity", &[&t2], vec![]);
    let z = g.node("MatMul", &[&a, &c2], vec![]);
    let model = g.model(&z);
    let probe = random_probe(&g.input_shape, 5, 3, 6);
    let o = opts(BnMode::Sample, ParamSelect::Weights);
    let r = per_sample_grads(&model, &probe, o, false).unwrap();
    let names: Vec<&str> = r.layout.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["lin1.weight", "lin2.weight"], "default columns");
    assert_eq!(r.layout.iter().map(|e| e.numel).sum::<usize>(), 30 + 15);
    let worst = fd_check(&model, &probe, o, 16);
    assert!(worst < 1e-5, "worst relative error {worst:e}");
}

/// Two biased convolutions and no normalisation node: what a BN-folding exporter leaves.
fn conv_net(with_bn: bool, biased: bool) -> (GraphSpec, String) {
    let mut g = GraphSpec::new(&[2, 5, 5], 31);
    let w1 = g.param("c1.weight", &[3, 2, 3, 3], 0.5);
    let b1 = g.param("c1.bias", &[3], 0.5);
    let ins1: &[&str] = if biased {
        &["x", &w1, &b1]
    } else {
        &["x", &w1]
    };
    let mut h = g.node("Conv", ins1, vec![a_ints("pads", &[1, 1, 1, 1])]);
    if with_bn {
        let scale = g.param("bn.scale", &[3], 1.0);
        let bias = g.param("bn.bias", &[3], 1.0);
        let mean = g.param("bn.mean", &[3], 0.3);
        let var = g.tensor(
            "bn.var",
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[3]), vec![0.5, 1.5, 2.0]).unwrap()),
        );
        h = g.node(
            "BatchNormalization",
            &[&h, &scale, &bias, &mean, &var],
            vec![a_f("epsilon", 1e-5)],
        );
    }
    let r = g.node("Relu", &[&h], vec![]);
    let w2 = g.param("c2.weight", &[2, 3, 3, 3], 0.5);
    let b2 = g.param("c2.bias", &[2], 0.5);
    let ins2: &[&str] = if biased { &[&r, &w2, &b2] } else { &[&r, &w2] };
    let c2 = g.node("Conv", ins2, vec![]);
    let f = g.node("Flatten", &[&c2], vec![a_i("axis", 1)]);
    let hw = g.param("head.w", &[3, 2 * 3 * 3], 0.5);
    let z = g.node("Gemm", &[&f, &hw], vec![a_i("transB", 1)]);
    (g, z)
}

#[test]
fn a_bn_folded_looking_network_gets_a_warning_and_a_bn_network_does_not() {
    // No norm layer: convolutions that all carry a bias look folded, bias-free ones look like
    // their BatchNorm was dropped (torch's dynamo exporter does both). With BN: no warning.
    for (with_bn, biased, warned) in [
        (false, true, Some("folded")),
        (true, true, None),
        (
            false,
            false,
            Some("2 convolutions, 2 of them without a bias"),
        ),
        (true, false, None),
    ] {
        let (g, z) = conv_net(with_bn, biased);
        let probe = random_probe(&g.input_shape, 4, 3, 7);
        let r = per_sample_grads(
            &g.model(&z),
            &probe,
            opts(BnMode::Sample, ParamSelect::Weights),
            false,
        )
        .unwrap();
        let w: Vec<&String> = r.notes.iter().filter(|n| n.starts_with(WARNING)).collect();
        match warned {
            Some(text) => assert!(
                w.len() == 1 && w[0].contains(text),
                "with_bn {with_bn} biased {biased}: {:?}",
                r.notes
            ),
            None => assert!(w.is_empty(), "with_bn {with_bn}: {:?}", r.notes),
        }
    }
}

#[test]
fn a_classifier_with_a_label_head_is_scored_on_its_probability_output() {
    // skl2onnx's shape of a classifier: outputs [label, probabilities]; the label comes from
    // ArgMax and an ai.onnx.ml node, the probabilities from a Softmax.
    let (mut g, z, probs) = mlp_with_tail(&["Softmax"]);
    let am = g.node("ArgMax", &[&probs], vec![a_i("axis", 1)]);
    let label = g.fresh();
    g.nodes.push(gradalign::onnx::pb::NodeProto {
        input: vec![am],
        output: vec![label.clone()],
        name: "label_encoder".into(),
        op_type: "LabelEncoder".into(),
        domain: "ai.onnx.ml".into(),
        ..Default::default()
    });
    let probe = random_probe(&g.input_shape, 5, 3, 2);
    let o = opts(BnMode::Sample, ParamSelect::All);
    let got = per_sample_grads(&g.model_outputs(&[&label, &probs]), &probe, o, false).unwrap();
    let (g0, z0, _) = mlp_with_tail(&[]);
    assert_eq!(z, z0);
    let want = per_sample_grads(&g0.model(&z0), &probe, o, false).unwrap();
    assert_eq!(got.grads.to_f64(), want.grads.to_f64());
    assert!(
        got.notes
            .iter()
            .any(|n| n.contains(&format!("using '{probs}' as logits"))),
        "{:?}",
        got.notes
    );
    // When the output itself needs an ML-domain node, the error names node and domain.
    let zipped = g.fresh();
    g.nodes.push(gradalign::onnx::pb::NodeProto {
        input: vec![probs.clone()],
        output: vec![zipped.clone()],
        name: "zipmap".into(),
        op_type: "ZipMap".into(),
        domain: "ai.onnx.ml".into(),
        ..Default::default()
    });
    let err = per_sample_grads(&g.model_outputs(&[&zipped]), &probe, o, false)
        .err()
        .expect("a label output cannot be differentiated");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("zipmap") && msg.contains("ZipMap") && msg.contains("ai.onnx.ml"),
        "{msg}"
    );
}

#[test]
fn output_names_the_logits() {
    // Two supported outputs, an auxiliary head first: by default the first is taken (and a note
    // names it); `--output` picks the classifier's logits, or any value the graph computes.
    let (mut g, z, _) = mlp_with_tail(&[]);
    let two = g.tensor("two", HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 2.0)));
    let aux = g.node("Mul", &[&z, &two], vec![]);
    let probe = random_probe(&g.input_shape, 5, 3, 2);
    let o = opts(BnMode::Sample, ParamSelect::All);
    let (g0, z0, _) = mlp_with_tail(&[]);
    let want = per_sample_grads(&g0.model(&z0), &probe, o, false).unwrap();

    let both = g.model_outputs(&[&aux, &z]);
    let default = per_sample_grads(&both, &probe, o, false).unwrap();
    assert!(
        default
            .notes
            .iter()
            .any(|n| n.contains(&format!("using '{aux}' as logits"))),
        "{:?}",
        default.notes
    );
    assert_ne!(default.grads.to_f64(), want.grads.to_f64());

    let mut chosen = g.model_outputs(&[&aux, &z]);
    chosen.select_output(&z).unwrap();
    let got = per_sample_grads(&chosen, &probe, o, false).unwrap();
    assert_eq!(got.grads.to_f64(), want.grads.to_f64());

    // A value that is not a declared output: the logits before the auxiliary scaling.
    let mut inner = g.model(&aux);
    inner.select_output(&z).unwrap();
    let got = per_sample_grads(&inner, &probe, o, false).unwrap();
    assert_eq!(got.grads.to_f64(), want.grads.to_f64());

    let mut bad = g.model_outputs(&[&aux, &z]);
    let err = bad.select_output("logitz").unwrap_err().to_string();
    assert!(
        err.contains("--output logitz") && err.contains(&aux),
        "{err}"
    );
}
