//! Fuzzing support (issue 6): the target — ONNX decoding, validation, analysis and
//! gradient-graph building on arbitrary bytes — and a mutator that knows the ONNX structure, so
//! mutants get past the protobuf decoder and into the analysis. `cargo xtask fuzz` drives them;
//! tests/fuzz_regressions.rs replays the committed corpus and every input that ever crashed.
//! Bad input must give an `Err`; a panic or a hang is a bug.

use anyhow::{bail, Result};
use prost::Message;

use crate::autodiff::builder::GraphSpec;
use crate::autodiff::{BnMode, GradOptions, ParamSelect, Precision};
use crate::inputs::engine::build_graph_with;
use crate::onnx::{pb, Model};
use crate::tools::zoo::Rng;

/// Budget for one fuzz input's graph (the memory check refuses anything larger).
const FUZZ_MEMORY: u64 = 256 << 20;

/// The seed models listed in a corpus file (one path per line, relative to `root`; `#` starts a
/// comment): the committed list is `fuzz/corpus.txt`.
pub fn seed_paths(
    list: &std::path::Path,
    root: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>> {
    let text = std::fs::read_to_string(list)
        .map_err(|e| anyhow::anyhow!("fuzz corpus list {}: {e}", list.display()))?;
    let paths: Vec<std::path::PathBuf> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| root.join(l))
        .collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        anyhow::bail!(
            "{} names {}, which does not exist",
            list.display(),
            missing.display()
        );
    }
    Ok(paths)
}

/// The fuzz target: decode, validate, analyse and build the training graph for a 2-sample
/// probe of the model's declared input shape (symbolic or huge dimensions get small stand-ins),
/// in every BN mode and parameter selection the CLI offers.
pub fn target(bytes: &[u8]) -> Result<()> {
    let proto = pb::ModelProto::decode(bytes)?;
    let model = Model::from_proto(&proto, "fuzz input")?;
    let Some(input) = model.inputs.first() else {
        bail!("no input");
    };
    let sample: Vec<usize> = match &input.dims {
        Some(d) if !d.is_empty() => d[1..]
            .iter()
            .map(|x| x.map_or(4, |v| v.clamp(1, 64) as usize))
            .collect(),
        _ => vec![3, 8, 8],
    };
    for (bn, params, precision) in [
        (BnMode::Sample, ParamSelect::Weights, Precision::F32),
        (BnMode::Eval, ParamSelect::All, Precision::F64),
    ] {
        let opts = GradOptions {
            bn,
            params,
            precision,
            max_memory: Some(FUZZ_MEMORY),
        };
        let spec = GraphSpec {
            input_grad: true,
            relu_codes: true,
            ..Default::default()
        };
        let (_, gg) = build_graph_with(&model, &sample, 2, opts, spec)?;
        // The graph must serialise (what export-grad-graph and the runtimes consume).
        let _ = gg.model.encode_to_vec();
    }
    Ok(())
}

const OPS: &[&str] = &[
    "Conv",
    "Relu",
    "Add",
    "Mul",
    "BatchNormalization",
    "AveragePool",
    "MaxPool",
    "Gemm",
    "MatMul",
    "Concat",
    "Split",
    "Slice",
    "Reshape",
    "Flatten",
    "Transpose",
    "Pad",
    "Softmax",
    "GlobalAveragePool",
    "ReduceMean",
    "Squeeze",
    "Unsqueeze",
    "Gather",
    "Expand",
    "Shape",
    "ConstantOfShape",
    "Range",
    "Cast",
    "Sub",
    "Div",
    "Identity",
    "Dropout",
    "LayerNormalization",
    "Clip",
    "Sigmoid",
    "Constant",
    "Where",
    "Tile",
    "NoSuchOp",
];

fn interesting(rng: &mut Rng) -> i64 {
    const V: &[i64] = &[
        0,
        1,
        -1,
        2,
        3,
        -2,
        7,
        64,
        255,
        256,
        1 << 16,
        1 << 31,
        -(1 << 31),
        1 << 40,
        i64::MAX,
        i64::MIN,
        i64::MAX - 1,
    ];
    V[rng.below(V.len())]
}

/// One structural mutation of `m` (a no-op when the chosen part is absent).
fn mutate_model(m: &mut pb::ModelProto, rng: &mut Rng) {
    if rng.below(16) == 0 {
        if let Some(o) = m.opset_import.first_mut() {
            o.version = [1, 6, 7, 11, 13, 17, 18, 21, 22, 23, 99][rng.below(11)];
        }
        return;
    }
    let Some(g) = m.graph.as_mut() else { return };
    let names: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .chain(g.input.iter().map(|i| i.name.clone()))
        .collect();
    let pick_name = |rng: &mut Rng| -> String {
        if names.is_empty() || rng.below(8) == 0 {
            String::new()
        } else {
            names[rng.below(names.len())].clone()
        }
    };
    match rng.below(12) {
        0 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            g.node[k].op_type = OPS[rng.below(OPS.len())].to_string();
        }
        1 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            let nd = &mut g.node[k];
            if nd.input.is_empty() || rng.below(4) == 0 {
                nd.input.push(pick_name(rng));
            } else {
                let j = rng.below(nd.input.len());
                match rng.below(3) {
                    0 => {
                        nd.input.remove(j);
                    }
                    _ => nd.input[j] = pick_name(rng),
                }
            }
        }
        2 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            let nd = &mut g.node[k];
            if nd.attribute.is_empty() {
                let name = [
                    "axis",
                    "kernel_shape",
                    "strides",
                    "pads",
                    "group",
                    "perm",
                    "to",
                ][rng.below(7)];
                nd.attribute
                    .push(crate::onnx::attr::ints(name, &[interesting(rng), 1]));
            } else {
                let j = rng.below(nd.attribute.len());
                let a = &mut nd.attribute[j];
                match rng.below(4) {
                    0 => a.i = interesting(rng),
                    1 => {
                        if a.ints.is_empty() {
                            a.ints.push(interesting(rng));
                        } else {
                            let t = rng.below(a.ints.len());
                            a.ints[t] = interesting(rng);
                        }
                    }
                    2 => {
                        let n = a.ints.len();
                        a.ints.truncate(rng.below(n + 1));
                    }
                    _ => a.f = [0.0, -1.0, f32::NAN, f32::INFINITY, 1e30][rng.below(5)],
                }
            }
        }
        3 if !g.initializer.is_empty() => {
            let k = rng.below(g.initializer.len());
            let t = &mut g.initializer[k];
            if t.dims.is_empty() || rng.below(4) == 0 {
                t.dims.push(interesting(rng));
            } else {
                let j = rng.below(t.dims.len());
                t.dims[j] = interesting(rng);
            }
        }
        4 if !g.initializer.is_empty() => {
            let k = rng.below(g.initializer.len());
            let t = &mut g.initializer[k];
            match rng.below(3) {
                0 => t.data_type = [0, 1, 2, 6, 7, 9, 10, 11, 16, 99][rng.below(10)],
                1 => {
                    let n = t.raw_data.len();
                    t.raw_data.truncate(rng.below(n + 1));
                }
                _ => {
                    let v = interesting(rng);
                    if t.int64_data.is_empty() {
                        t.int64_data.push(v);
                    } else {
                        let j = rng.below(t.int64_data.len());
                        t.int64_data[j] = v;
                    }
                }
            }
        }
        5 if !g.input.is_empty() => {
            let k = rng.below(g.input.len());
            if let Some(pb::type_proto::Value::TensorType(tt)) =
                g.input[k].r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                match tt.shape.as_mut() {
                    Some(s) if !s.dim.is_empty() && rng.below(4) != 0 => {
                        let j = rng.below(s.dim.len());
                        s.dim[j].value = Some(pb::tensor_shape_proto::dimension::Value::DimValue(
                            interesting(rng),
                        ));
                    }
                    Some(s) => {
                        let n = s.dim.len();
                        s.dim.truncate(rng.below(n + 1));
                    }
                    None => tt.elem_type = rng.below(17) as i32,
                }
            }
        }
        6 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            g.node.remove(k);
        }
        7 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            let n = g.node[k].clone();
            let at = rng.below(g.node.len() + 1);
            g.node.insert(at, n);
        }
        8 if g.node.len() > 1 => {
            let (a, b) = (rng.below(g.node.len()), rng.below(g.node.len()));
            g.node.swap(a, b);
        }
        9 if !g.node.is_empty() => {
            let k = rng.below(g.node.len());
            let nd = &mut g.node[k];
            if nd.output.is_empty() || rng.below(3) == 0 {
                nd.output.push(pick_name(rng));
            } else {
                let j = rng.below(nd.output.len());
                nd.output[j] = pick_name(rng);
            }
        }
        10 if !g.output.is_empty() => {
            let k = rng.below(g.output.len());
            g.output[k].name = pick_name(rng);
        }
        _ => {
            if !g.initializer.is_empty() {
                let k = rng.below(g.initializer.len());
                g.initializer.remove(k);
            }
        }
    }
}

/// A mutant of `seed`: usually 1–4 structural mutations, sometimes raw byte damage, sometimes
/// a splice with `other`.
pub fn mutate(seed: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    if rng.below(4) != 0 {
        if let Ok(mut m) = pb::ModelProto::decode(seed) {
            for _ in 0..1 + rng.below(4) {
                mutate_model(&mut m, rng);
            }
            return m.encode_to_vec();
        }
    }
    let mut b = seed.to_vec();
    match rng.below(5) {
        0 if !b.is_empty() => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 if !b.is_empty() => {
            let i = rng.below(b.len());
            b[i] = [0, 0x7f, 0x80, 0xff][rng.below(4)];
        }
        2 => {
            let n = b.len();
            b.truncate(rng.below(n + 1));
        }
        3 if !b.is_empty() && !other.is_empty() => {
            let cut = rng.below(b.len());
            let from = rng.below(other.len());
            b.truncate(cut);
            b.extend_from_slice(&other[from..]);
        }
        _ => {
            let i = rng.below(b.len() + 1);
            let junk: Vec<u8> = (0..1 + rng.below(16))
                .map(|_| rng.below(256) as u8)
                .collect();
            b.splice(i..i, junk);
        }
    }
    b
}

/// A fresh generator for fuzz worker `k` of a run seeded `seed`.
pub fn rng(seed: u64, k: u64) -> Rng {
    Rng(seed ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
