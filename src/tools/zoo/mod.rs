//! NAS-Bench-201 networks as ONNX, generated in Rust (no Python): the xautodl `TinyNetwork`
//! topology described in docs/results.md (NAS-Bench-201) (stem Conv3×3+BN, three stages of N = 5 cells with ResNet reduction
//! blocks, lastact BN+ReLU, global pool, Linear), training-mode BatchNormalization, PyTorch's
//! default initialisation distributions, seeded. Initializer names and order follow PyTorch's
//! `state_dict` of `tests/golden/nb201.py`, so a PyTorch export's weights load by name.

pub mod nb101;

use anyhow::{bail, Result};
use ndarray::{ArrayD, IxDyn};

use crate::onnx::value_info;
use crate::onnx::{attr, pb, DType, HostTensor};

pub const NB201_OPS: [&str; 5] = [
    "none",
    "skip_connect",
    "nor_conv_1x1",
    "nor_conv_3x3",
    "avg_pool_3x3",
];

/// `|a~0|+|b~0|c~1|+|d~0|e~1|f~2|` → per node, its (op, source node) edges.
pub fn parse_arch(arch: &str) -> Result<Vec<Vec<(String, usize)>>> {
    let mut nodes = vec![];
    for (j, part) in arch.split('+').enumerate() {
        let mut edges = vec![];
        for e in part.split('|').filter(|s| !s.is_empty()) {
            let Some((op, src)) = e.split_once('~') else {
                bail!("arch '{arch}': edge '{e}' is not op~source");
            };
            let src: usize = src
                .parse()
                .map_err(|_| anyhow::anyhow!("arch '{arch}': bad source in '{e}'"))?;
            if !NB201_OPS.contains(&op) {
                bail!(
                    "arch '{arch}': unknown op '{op}' (NB201 ops: {})",
                    NB201_OPS.join(", ")
                );
            }
            if src > j {
                bail!("arch '{arch}': node {} reads node {src}", j + 1);
            }
            edges.push((op.to_string(), src));
        }
        nodes.push(edges);
    }
    if nodes.len() != 3 || nodes.iter().enumerate().any(|(j, e)| e.len() != j + 1) {
        bail!("arch '{arch}': an NB201 cell has 3 nodes with 1, 2 and 3 edges");
    }
    Ok(nodes)
}

pub use crate::rng::Rng;

/// How the zoo draws Conv and Linear weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Init {
    /// PyTorch's defaults: Kaiming-uniform a = √5, U(±1/√fan_in), for weights and the Linear
    /// bias.
    #[default]
    PyTorch,
    /// Kaiming-normal, fan-in, ReLU gain: N(0, 2/fan_in) weights and zero Linear bias, as
    /// VKDNW's and AZ-NAS's code re-initialise every network before scoring
    /// (`init_model(..., 'kaiming_norm_fanin')`). BatchNorm stays γ = 1, β = 0.
    KaimingNormalFanIn,
}

impl Init {
    /// A weight of fan-in `fan_in`.
    fn weight(self, r: &mut Rng, fan_in: usize) -> f32 {
        match self {
            Init::PyTorch => r.uniform(1.0 / (fan_in as f64).sqrt()),
            Init::KaimingNormalFanIn => (r.normal() * (2.0 / fan_in as f64).sqrt()) as f32,
        }
    }
}

struct Gen {
    init: Init,
    rng: Rng,
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    count: usize,
    /// ReLU output per input tensor: two ReLUConvBN edges leaving one cell node share one Relu,
    /// as in PyTorch's ONNX export (its common-subexpression pass merges them).
    relus: std::collections::HashMap<String, String>,
    /// ONNX's `momentum` of every BatchNormalization (0.9 = PyTorch's default 0.1).
    bn_momentum: f32,
}

impl Gen {
    /// An empty graph whose weights are drawn from `seed`.
    fn new(seed: u64, bn_momentum: f32) -> Gen {
        Gen {
            init: Init::PyTorch,
            rng: Rng(seed),
            nodes: vec![],
            inits: vec![],
            count: 0,
            relus: Default::default(),
            bn_momentum,
        }
    }

    fn tensor(&mut self, name: &str, shape: &[usize], f: impl FnMut(&mut Rng) -> f32) -> String {
        let mut f = f;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| f(&mut self.rng)).collect();
        let t = HostTensor::F32(ArrayD::from_shape_vec(IxDyn(shape), data).unwrap());
        self.inits.push(t.to_proto(name));
        name.to_string()
    }
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        self.count += 1;
        let out = format!("t{}_{}", self.count, op.to_ascii_lowercase());
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("n{}_{op}", self.count),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out
    }
    /// Conv2d, bias=False, Kaiming-uniform a=√5: U(±1/√fan_in).
    fn conv(
        &mut self,
        x: &str,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> String {
        let (init, fan_in) = (self.init, cin * k * k);
        let w = self.tensor(name, &[cout, cin, k, k], |r| init.weight(r, fan_in));
        let p = pad as i64;
        self.node(
            "Conv",
            &[x, &w],
            vec![
                attr::ints("dilations", &[1, 1]),
                attr::i("group", 1),
                attr::ints("kernel_shape", &[k as i64, k as i64]),
                attr::ints("pads", &[p, p, p, p]),
                attr::ints("strides", &[stride as i64, stride as i64]),
            ],
        )
    }
    /// BatchNorm2d (γ = 1, β = 0, running statistics 0 and 1), training mode as PyTorch exports.
    fn bn(&mut self, x: &str, prefix: &str, c: usize) -> String {
        let g = self.tensor(&format!("{prefix}.weight"), &[c], |_| 1.0);
        let b = self.tensor(&format!("{prefix}.bias"), &[c], |_| 0.0);
        let m = self.tensor(&format!("{prefix}.running_mean"), &[c], |_| 0.0);
        let v = self.tensor(&format!("{prefix}.running_var"), &[c], |_| 1.0);
        let y = self.node(
            "BatchNormalization",
            &[x, &g, &b, &m, &v],
            vec![
                attr::f("epsilon", 1e-5),
                attr::f("momentum", self.bn_momentum),
                attr::i("training_mode", 1),
            ],
        );
        // PyTorch's export also names the updated running statistics.
        let last = self.nodes.last_mut().unwrap();
        last.output.push(format!("{y}_mean"));
        last.output.push(format!("{y}_var"));
        y
    }
    fn relu_conv_bn(
        &mut self,
        x: &str,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> String {
        let r = match self.relus.get(x) {
            Some(r) => r.clone(),
            None => {
                let r = self.node("Relu", &[x], vec![]);
                self.relus.insert(x.to_string(), r.clone());
                r
            }
        };
        let c = self.conv(
            &r,
            &format!("{prefix}.op.1.weight"),
            cin,
            cout,
            k,
            stride,
            pad,
        );
        self.bn(&c, &format!("{prefix}.op.2"), cout)
    }
    fn avg_pool(&mut self, x: &str, k: i64, stride: i64, pad: i64) -> String {
        self.pool("AveragePool", x, k, stride, pad)
    }
    /// A square AveragePool (padding excluded from the count, as PyTorch's) or MaxPool.
    fn pool(&mut self, op: &str, x: &str, k: i64, stride: i64, pad: i64) -> String {
        let mut attrs = vec![
            attr::i("ceil_mode", 0),
            attr::ints("kernel_shape", &[k, k]),
            attr::ints("pads", &[pad, pad, pad, pad]),
            attr::ints("strides", &[stride, stride]),
        ];
        if op == "AveragePool" {
            attrs.insert(1, attr::i("count_include_pad", 0));
        }
        self.node(op, &[x], attrs)
    }
}

/// The ONNX model of NB201 cell `arch` with channels `c`, `n` cells per stage, 10 classes, and
/// weights drawn with `seed`.
pub fn nb201_model(arch: &str, seed: u64, c: usize, n: usize) -> Result<pb::ModelProto> {
    nb201_model_init(arch, seed, c, n, Init::PyTorch)
}

/// [`nb201_model`] with the weights drawn by `init`.
pub fn nb201_model_init(
    arch: &str,
    seed: u64,
    c: usize,
    n: usize,
    init: Init,
) -> Result<pb::ModelProto> {
    build(
        arch,
        seed,
        Layout {
            c,
            n,
            stem: true,
            depth: None,
            input: [3, 32, 32],
            init,
        },
    )
}

/// TE-NAS's thin network for counting linear regions (`prune_tenas.py`, `model_config_thin`:
/// C = 1, N = 1, depth = 1, no stem): one cell on a 1×3×3 input, then BN, ReLU, global pooling
/// and the 10-way classifier.
pub fn nb201_tenas_thin(arch: &str, seed: u64) -> Result<pb::ModelProto> {
    build(
        arch,
        seed,
        Layout {
            c: 1,
            n: 1,
            stem: false,
            depth: Some(1),
            input: [1, 3, 3],
            init: Init::PyTorch,
        },
    )
}

struct Layout {
    c: usize,
    n: usize,
    stem: bool,
    /// Keep only the first `depth` cells (TE-NAS's `depth`).
    depth: Option<usize>,
    input: [usize; 3],
    init: Init,
}

fn build(arch: &str, seed: u64, layout: Layout) -> Result<pb::ModelProto> {
    let Layout { c, n, .. } = layout;
    let cell = parse_arch(arch)?;
    let mut g = Gen::new(seed, 0.9);
    g.init = layout.init;
    let zero = "ga.zero".to_string();
    let mut x = if layout.stem {
        let stem = g.conv("input", "stem.0.weight", layout.input[0], c, 3, 1, 1);
        g.bn(&stem, "stem.1", c)
    } else {
        "input".to_string()
    };
    let mut chans = vec![c; n];
    chans.push(2 * c);
    chans.extend(vec![2 * c; n]);
    chans.push(4 * c);
    chans.extend(vec![4 * c; n]);
    let mut c_prev = c;
    let mut uses_zero = false;
    for (k, &cc) in chans.iter().enumerate() {
        if layout.depth.is_some_and(|d| k >= d) {
            break;
        }
        let reduction = k == n || k == 2 * n + 1;
        let p = format!("cells.{k}");
        if reduction {
            let a = g.relu_conv_bn(&x, &format!("{p}.conv_a"), c_prev, cc, 3, 2, 1);
            let b = g.relu_conv_bn(&a, &format!("{p}.conv_b"), cc, cc, 3, 1, 1);
            let pooled = g.avg_pool(&x, 2, 2, 0);
            let d = g.conv(
                &pooled,
                &format!("{p}.downsample.1.weight"),
                c_prev,
                cc,
                1,
                1,
                0,
            );
            x = g.node("Add", &[&d, &b], vec![]);
        } else {
            let mut nodes = vec![x.clone()];
            let mut layer = 0;
            for edges in &cell {
                let mut sum: Option<String> = None;
                for (op, src) in edges {
                    let lp = format!("{p}.layers.{layer}");
                    layer += 1;
                    let inp = nodes[*src].clone();
                    let y = match op.as_str() {
                        "none" => {
                            uses_zero = true;
                            g.node("Mul", &[&inp, &zero], vec![])
                        }
                        "skip_connect" => inp,
                        "nor_conv_1x1" => g.relu_conv_bn(&inp, &lp, cc, cc, 1, 1, 0),
                        "nor_conv_3x3" => g.relu_conv_bn(&inp, &lp, cc, cc, 3, 1, 1),
                        _ => g.avg_pool(&inp, 3, 1, 1),
                    };
                    sum = Some(match sum {
                        None => y,
                        Some(s) => g.node("Add", &[&s, &y], vec![]),
                    });
                }
                nodes.push(sum.unwrap());
            }
            x = nodes.pop().unwrap();
        }
        c_prev = cc;
    }
    let a = g.bn(&x, "lastact.0", c_prev);
    let r = g.node("Relu", &[&a], vec![]);
    if uses_zero {
        let z = HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), 0.0));
        g.inits.push(z.to_proto(&zero));
    }
    Ok(g.finish(&r, c_prev, 10, &format!("nb201 {arch}"), layout.input))
}

impl Gen {
    /// Global average pool, the Linear classifier (PyTorch's default init) and the model, with
    /// a dynamic batch axis like a PyTorch export with dynamic_axes.
    fn finish(
        mut self,
        x: &str,
        c_prev: usize,
        classes: usize,
        name: &str,
        input: [usize; 3],
    ) -> pb::ModelProto {
        let g = &mut self;
        let pooled = g.node("GlobalAveragePool", &[x], vec![]);
        let flat = g.node("Flatten", &[&pooled], vec![attr::i("axis", 1)]);
        let bound = 1.0 / (c_prev as f64).sqrt();
        let init = g.init;
        let w = g.tensor("classifier.weight", &[classes, c_prev], |r| {
            init.weight(r, c_prev)
        });
        let b = g.tensor("classifier.bias", &[classes], |r| match init {
            Init::PyTorch => r.uniform(bound),
            Init::KaimingNormalFanIn => 0.0,
        });
        g.count += 1;
        g.nodes.push(pb::NodeProto {
            input: vec![flat, w, b],
            output: vec!["logits".into()],
            name: "classifier".into(),
            op_type: "Gemm".into(),
            attribute: vec![
                attr::f("alpha", 1.0),
                attr::f("beta", 1.0),
                attr::i("transB", 1),
            ],
            ..Default::default()
        });
        let [ic, ih, iw] = input;
        let mut vi = value_info("input", DType::F32, &[1, ic, ih, iw]);
        if let Some(pb::type_proto::Value::TensorType(t)) =
            vi.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            if let Some(s) = t.shape.as_mut() {
                s.dim[0].value = Some(pb::tensor_shape_proto::dimension::Value::DimParam(
                    "N".into(),
                ));
            }
        }
        pb::ModelProto {
            ir_version: 8,
            producer_name: "gradalign-zoo".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(pb::GraphProto {
                name: name.into(),
                node: self.nodes,
                initializer: self.inits,
                input: vec![vi],
                output: vec![value_info("logits", DType::F32, &[1, classes])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths 64…512 × 4) on `hw`×`hw` RGB images with a
/// CIFAR-style stem (3×3 conv, no max-pool), training-mode BN and PyTorch's default init:
/// ≈23.5 M parameters. The memory-bounded demonstration model (`cargo xtask gen-resnet50`).
pub fn resnet50_model(seed: u64, hw: usize, classes: usize) -> pb::ModelProto {
    let mut g = Gen::new(seed, 0.9);
    let stem = g.conv("input", "conv1.weight", 3, 64, 3, 1, 1);
    let b = g.bn(&stem, "bn1", 64);
    let mut x = g.node("Relu", &[&b], vec![]);
    let mut cin = 64;
    for (stage, (&blocks, &width)) in [3usize, 4, 6, 3]
        .iter()
        .zip(&[64usize, 128, 256, 512])
        .enumerate()
    {
        for k in 0..blocks {
            let stride = if k == 0 && stage > 0 { 2 } else { 1 };
            let p = format!("layer{}.{k}", stage + 1);
            let c1 = g.conv(&x, &format!("{p}.conv1.weight"), cin, width, 1, 1, 0);
            let b1 = g.bn(&c1, &format!("{p}.bn1"), width);
            let r1 = g.node("Relu", &[&b1], vec![]);
            let c2 = g.conv(
                &r1,
                &format!("{p}.conv2.weight"),
                width,
                width,
                3,
                stride,
                1,
            );
            let b2 = g.bn(&c2, &format!("{p}.bn2"), width);
            let r2 = g.node("Relu", &[&b2], vec![]);
            let c3 = g.conv(&r2, &format!("{p}.conv3.weight"), width, 4 * width, 1, 1, 0);
            let b3 = g.bn(&c3, &format!("{p}.bn3"), 4 * width);
            let short = if k == 0 {
                let d = g.conv(
                    &x,
                    &format!("{p}.downsample.0.weight"),
                    cin,
                    4 * width,
                    1,
                    stride,
                    0,
                );
                g.bn(&d, &format!("{p}.downsample.1"), 4 * width)
            } else {
                x.clone()
            };
            let sum = g.node("Add", &[&b3, &short], vec![]);
            x = g.node("Relu", &[&sum], vec![]);
            cin = 4 * width;
        }
    }
    g.finish(&x, cin, classes, "resnet50", [3, hw, hw])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_arch_strings() {
        let a = parse_arch(
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
        )
        .unwrap();
        assert_eq!(a[2][1], ("none".to_string(), 1));
        assert!(parse_arch("|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|").is_err());
        assert!(parse_arch("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|").is_err());
        assert!(parse_arch("|none~0|+|none~0|").is_err());
    }

    #[test]
    fn kaiming_normal_fan_in_init() {
        let arch =
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|";
        let m = nb201_model_init(arch, 7, 16, 5, Init::KaimingNormalFanIn).unwrap();
        let g = m.graph.as_ref().unwrap();
        let get = |name: &str| {
            let t = g.initializer.iter().find(|t| t.name == name).unwrap();
            let HostTensor::F32(a) = HostTensor::from_proto(t).unwrap() else {
                panic!()
            };
            a
        };
        // Conv weights N(0, 2 / fan_in): the first cell's 3×3 conv has 16 · 9 = 144 inputs.
        let w = get("cells.0.layers.0.op.1.weight");
        let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let want = 2.0 / 144.0;
        assert!((var - want).abs() < 0.1 * want, "{var} vs {want}");
        assert!(
            w.iter().any(|v| v.abs() > 1.0 / 144f32.sqrt()),
            "not the uniform bound"
        );
        assert!(get("classifier.bias").iter().all(|&v| v == 0.0));
        // Same architecture and seed, other init: different weights, same graph.
        let d = nb201_model(arch, 7, 16, 5).unwrap();
        assert_eq!(d.graph.as_ref().unwrap().node, g.node);
        assert_ne!(d, m);
    }

    #[test]
    fn init_bounds_and_seeding() {
        let m = nb201_model(
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
            7,
            16,
            5,
        )
        .unwrap();
        let g = m.graph.as_ref().unwrap();
        let stem = g
            .initializer
            .iter()
            .find(|t| t.name == "stem.0.weight")
            .unwrap();
        let w = HostTensor::from_proto(stem).unwrap();
        let HostTensor::F32(a) = w else { panic!() };
        let b = 1.0 / 27f32.sqrt();
        assert!(a.iter().all(|v| v.abs() <= b));
        // Uniform on [-b, b]: variance b²/3.
        let var = a.iter().map(|v| v * v).sum::<f32>() / a.len() as f32;
        assert!((var - b * b / 3.0).abs() < 0.2 * b * b / 3.0, "{var}");
        let again = nb201_model(
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
            7,
            16,
            5,
        )
        .unwrap();
        assert_eq!(m, again);
        let other = nb201_model(
            "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
            8,
            16,
            5,
        )
        .unwrap();
        assert_ne!(m, other);
    }
}
