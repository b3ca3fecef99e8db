//! Test helpers: build small ONNX graphs in code and check gradients by finite differences.
#![allow(dead_code)]

use gradalign::autodiff::{BnMode, GradOptions, ParamSelect, Precision};
use gradalign::inputs::engine::{per_sample_grads, PerSampleGrads};
use gradalign::inputs::probe::Probe;
use gradalign::onnx::{attr, pb, HostTensor, Model};
use ndarray::{Array1, ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct GraphSpec {
    pub nodes: Vec<pb::NodeProto>,
    pub inits: Vec<pb::TensorProto>,
    pub input_shape: Vec<usize>,
    pub rng: StdRng,
    counter: usize,
}

pub fn a_i(name: &str, v: i64) -> pb::AttributeProto {
    attr::i(name, v)
}
pub fn a_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    attr::ints(name, v)
}
pub fn a_f(name: &str, v: f32) -> pb::AttributeProto {
    attr::f(name, v)
}

impl GraphSpec {
    /// `sample_shape` excludes the batch axis.
    pub fn new(sample_shape: &[usize], seed: u64) -> GraphSpec {
        GraphSpec {
            nodes: vec![],
            inits: vec![],
            input_shape: sample_shape.to_vec(),
            rng: StdRng::seed_from_u64(seed),
            counter: 0,
        }
    }
    pub fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("t{}", self.counter)
    }
    pub fn param(&mut self, name: &str, shape: &[usize], scale: f64) -> String {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (self.rng.random::<f64>() * 2.0 - 1.0) as f32 * scale as f32)
            .collect();
        self.tensor(
            name,
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap()),
        )
    }
    pub fn tensor(&mut self, name: &str, t: HostTensor) -> String {
        self.inits.push(t.to_proto(name));
        name.to_string()
    }
    pub fn ints(&mut self, v: &[i64]) -> String {
        let name = self.fresh();
        self.tensor(&name, HostTensor::i64_vec(v))
    }
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        self.node_n(op, inputs, attrs, 1).pop().unwrap()
    }
    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|_| self.fresh()).collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name: format!("{op}_{}", self.counter),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }
    /// Finish with `logits` as the output.
    pub fn model(&self, logits: &str) -> Model {
        self.model_outputs(&[logits])
    }
    /// Finish with several graph outputs, in order (an `ai.onnx.ml` opset is imported too).
    pub fn model_outputs(&self, outputs: &[&str]) -> Model {
        use pb::tensor_shape_proto::{dimension::Value, Dimension};
        let mut dims = vec![Dimension {
            value: Some(Value::DimParam("N".into())),
            ..Default::default()
        }];
        dims.extend(self.input_shape.iter().map(|&d| Dimension {
            value: Some(Value::DimValue(d as i64)),
            ..Default::default()
        }));
        let vi = |name: &str, dims: Vec<Dimension>| pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(pb::TensorShapeProto { dim: dims }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto {
                    domain: String::new(),
                    version: 17,
                },
                pb::OperatorSetIdProto {
                    domain: "ai.onnx.ml".into(),
                    version: 3,
                },
            ],
            graph: Some(pb::GraphProto {
                node: self.nodes.clone(),
                initializer: self.inits.clone(),
                input: vec![vi("x", dims)],
                output: outputs.iter().map(|o| vi(o, vec![])).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Model::from_proto(&proto, "test graph").unwrap()
    }
}

pub fn random_probe(sample_shape: &[usize], n: usize, classes: usize, seed: u64) -> Probe {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shape = vec![n];
    shape.extend(sample_shape);
    let numel: usize = shape.iter().product();
    let images = ArrayD::from_shape_vec(
        IxDyn(&shape),
        (0..numel)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect(),
    )
    .unwrap();
    let labels = Array1::from_iter((0..n).map(|i| (i % classes) as i64));
    Probe {
        images,
        labels,
        source: "random".into(),
    }
}

pub fn opts(bn: BnMode, params: ParamSelect) -> GradOptions {
    GradOptions {
        bn,
        params,
        precision: Precision::F64,
        ..Default::default()
    }
}

/// Per-sample cross-entropy of f64 logits.
pub fn per_sample_ce(logits: &HostTensor, labels: &Array1<i64>) -> Vec<f64> {
    let z = logits.to_f64();
    let n = labels.len();
    let k = z.len() / n;
    let z = z.into_shape_with_order((n, k)).unwrap();
    (0..n)
        .map(|i| {
            let row = z.row(i);
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            lse - row[labels[i] as usize]
        })
        .collect()
}

fn with_param_value(model: &Model, name: &str, j: usize, delta: f64) -> Model {
    let mut m = model.clone();
    let (_, t) = m.initializers.iter_mut().find(|(n, _)| n == name).unwrap();
    let mut v = t.to_f64();
    let flat = v.as_slice_mut().unwrap();
    flat[j] += delta;
    *t = HostTensor::F64(v);
    m
}

/// Central differences in f64 of every sample's loss with respect to up to `max_coords`
/// coordinates of every parameter column, against the analytic per-sample gradients.
/// Returns the worst error relative to the layer's largest gradient.
pub fn fd_check(model: &Model, probe: &Probe, o: GradOptions, max_coords: usize) -> f64 {
    let g: PerSampleGrads = per_sample_grads(model, probe, o, false).unwrap();
    let grads = g.grads.to_f64();
    let n = probe.len();
    let h: f64 = std::env::var("FD_H")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1e-6);
    let mut worst: f64 = 0.0;
    let mut rng = StdRng::seed_from_u64(99);
    assert!(!g.layout.is_empty(), "no parameters selected");
    for e in &g.layout {
        let coords: Vec<usize> = if e.numel <= max_coords {
            (0..e.numel).collect()
        } else {
            (0..max_coords)
                .map(|_| rng.random_range(0..e.numel))
                .collect()
        };
        let layer_max = (0..n)
            .flat_map(|i| (0..e.numel).map(move |j| (i, j)))
            .map(|(i, j)| grads[[i, e.offset + j]].abs())
            .fold(0.0, f64::max)
            .max(1e-8);
        for &j in &coords {
            let lp =
                per_sample_grads(&with_param_value(model, &e.name, j, h), probe, o, false).unwrap();
            let lm = per_sample_grads(&with_param_value(model, &e.name, j, -h), probe, o, false)
                .unwrap();
            let (lp, lm) = (
                per_sample_ce(&lp.logits, &probe.labels),
                per_sample_ce(&lm.logits, &probe.labels),
            );
            for i in 0..n {
                let fd = (lp[i] - lm[i]) / (2.0 * h);
                let an = grads[[i, e.offset + j]];
                let err = (fd - an).abs() / layer_max;
                assert!(err < 1e-5, "{} [{j}] sample {i}: analytic {an:e} vs finite difference {fd:e} (layer max {layer_max:e})", e.name);
                worst = worst.max(err);
            }
        }
    }
    worst
}

/// The NB201 `avg_pool_heavy` fixture scored with `spec` from `reg`: shipped probe, N = 10, tract
/// (the plugin tests' common ground).
pub fn score_avg_pool_heavy(
    reg: &gradalign::scorers::plugin::Registry,
    spec: &str,
) -> gradalign::scorers::score::ScoreReport {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = Model::load(&root.join("models/nb201_avg_pool_heavy.onnx")).unwrap();
    let probe = Probe::shipped(10).unwrap();
    let scorers = reg.select(spec).unwrap();
    gradalign::scorers::score::score_model(
        &model,
        &probe,
        true,
        GradOptions::default(),
        gradalign::runtime::Backend::Tract,
        gradalign::runtime::Device::Cpu,
        &scorers,
    )
    .unwrap()
}

/// A test that cannot run here (no ONNX Runtime library, no Python onnx) says so and passes —
/// except under `CI=true` (set by `.ci/run`), where a skip would hide a test that never ran.
pub fn skip(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why} — CI=true, so this is a failure, not a skip");
    }
    println!("SKIPPED: {why}");
}
