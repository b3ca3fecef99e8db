//! NAS-Bench-101 networks as ONNX, generated in Rust: google-research/nasbench's
//! `model_builder.py` network for a cell (adjacency matrix + vertex ops), with training-mode
//! BatchNormalization (ε = 1e-5, momentum 0.997 as NB101) and PyTorch's default initialisation
//! (Kaiming-uniform convolutions, as for NB201; NB101 itself trained from TensorFlow's
//! variance-scaling init), seeded.
//!
//! The network: stem conv3×3-BN-ReLU (128 channels); 3 stacks of 3 cells, a 2×2 max-pool
//! (stride 2) and twice the channels before stacks 2 and 3; global average pool; dense to 10.
//! In a cell, interior vertex t sums its interior predecessors (each truncated to t's channel
//! count, which NB101's channel rule makes at most one channel fewer) and, when the cell input
//! feeds it, a 1×1 conv-BN-ReLU projection of the input; then applies its op. The output
//! concatenates the interior vertices that feed it, plus a projection of the input when the
//! input feeds the output directly. Initializer names follow the PyTorch build of
//! `tests/golden/nb101.py`, so its weights load by name.

use anyhow::{bail, ensure, Result};

use super::{attr, pb, Gen};

/// An NB101 cell: a DAG of 2–7 vertices (upper-triangular adjacency, vertex 0 the input, the
/// last the output) and the op of each interior vertex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nb101Cell {
    pub matrix: Vec<Vec<bool>>,
    /// One per vertex: `input`, `conv3x3-bn-relu`, `conv1x1-bn-relu`, `maxpool3x3`, `output`.
    pub ops: Vec<String>,
}

impl Nb101Cell {
    /// From NB101's row-major adjacency string (`0100110…`, V² digits) and `|`-separated ops.
    pub fn parse(adjacency: &str, ops: &str) -> Result<Nb101Cell> {
        let ops: Vec<String> = ops.split('|').map(str::to_string).collect();
        let v = ops.len();
        ensure!(
            (2..=7).contains(&v),
            "NB101 cell with {v} vertices (2 to 7 expected)"
        );
        ensure!(
            adjacency.len() == v * v && adjacency.bytes().all(|b| b == b'0' || b == b'1'),
            "adjacency '{adjacency}' is not {v}×{v} zeros and ones"
        );
        let b = adjacency.as_bytes();
        let matrix: Vec<Vec<bool>> = (0..v)
            .map(|i| (0..v).map(|j| b[i * v + j] == b'1').collect())
            .collect();
        for (i, row) in matrix.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                ensure!(
                    !e || i < j,
                    "adjacency has an edge {i}→{j}: not upper-triangular"
                );
            }
        }
        ensure!(
            ops[0] == "input" && ops[v - 1] == "output",
            "the first op must be 'input' and the last 'output'"
        );
        for (t, op) in ops.iter().enumerate().take(v - 1).skip(1) {
            ensure!(
                matches!(
                    op.as_str(),
                    "conv3x3-bn-relu" | "conv1x1-bn-relu" | "maxpool3x3"
                ),
                "vertex {t}: unknown NB101 op '{op}'"
            );
            // A pruned cell (as NB101 stores them): every interior vertex is reachable and
            // reaches the output.
            ensure!(
                (0..t).any(|s| matrix[s][t]) && (t + 1..v).any(|d| matrix[t][d]),
                "vertex {t} is dangling: NB101 cells are pruned"
            );
        }
        ensure!(
            v > 2 || matrix[0][1],
            "a 2-vertex cell must connect its input to its output"
        );
        Ok(Nb101Cell { matrix, ops })
    }

    fn v(&self) -> usize {
        self.ops.len()
    }

    /// nasbench's `compute_vertex_channels`: the output's channels split evenly over the
    /// vertices feeding the output (remainder to the first ones), every other vertex the
    /// largest of its successors'.
    pub fn vertex_channels(&self, cin: usize, cout: usize) -> Vec<usize> {
        let v = self.v();
        let m = &self.matrix;
        let mut vc = vec![0; v];
        vc[0] = cin;
        vc[v - 1] = cout;
        if v == 2 {
            return vc;
        }
        let fan_in = (1..v).filter(|&s| m[s][v - 1]).count();
        let interior = cout / fan_in;
        let mut correction = cout % fan_in;
        for t in 1..v - 1 {
            if m[t][v - 1] {
                vc[t] = interior;
                if correction > 0 {
                    vc[t] += 1;
                    correction -= 1;
                }
            }
        }
        for t in (1..v.saturating_sub(2)).rev() {
            if !m[t][v - 1] {
                for d in t + 1..v - 1 {
                    if m[t][d] {
                        vc[t] = vc[t].max(vc[d]);
                    }
                }
            }
        }
        vc
    }

    /// NB101's `trainable_parameters` of the network: convolution kernels, BatchNorm γ and β,
    /// the dense layer's weights and biases.
    pub fn trainable_parameters(&self) -> usize {
        let v = self.v();
        let m = &self.matrix;
        let conv_bn = |cin: usize, cout: usize, k: usize| k * k * cin * cout + 2 * cout;
        let mut p = conv_bn(3, 128, 3);
        let mut c = 128;
        for stack in 0..3 {
            let cout = if stack == 0 { c } else { 2 * c };
            for _ in 0..3 {
                let vc = self.vertex_channels(c, cout);
                for t in 1..v - 1 {
                    if m[0][t] {
                        p += conv_bn(c, vc[t], 1);
                    }
                    p += match self.ops[t].as_str() {
                        "conv3x3-bn-relu" => conv_bn(vc[t], vc[t], 3),
                        "conv1x1-bn-relu" => conv_bn(vc[t], vc[t], 1),
                        _ => 0,
                    };
                }
                if m[0][v - 1] {
                    p += conv_bn(c, cout, 1);
                }
                c = cout;
            }
        }
        p + c * 10 + 10
    }
}

impl Gen {
    /// Conv (no bias) → BN → ReLU, named `{prefix}.conv.weight`, `{prefix}.bn.*`.
    fn conv_bn_relu(&mut self, x: &str, prefix: &str, cin: usize, cout: usize, k: usize) -> String {
        let pad = k / 2;
        let c = self.conv(x, &format!("{prefix}.conv.weight"), cin, cout, k, 1, pad);
        let b = self.bn(&c, &format!("{prefix}.bn"), cout);
        self.node("Relu", &[&b], vec![])
    }

    fn max_pool(&mut self, x: &str, k: i64, stride: i64, pad: i64) -> String {
        self.pool("MaxPool", x, k, stride, pad)
    }

    /// The first `c` channels of `x` (nasbench's `truncate`).
    fn first_channels(&mut self, x: &str, c: usize) -> String {
        let name = format!("trunc{}_{c}", self.count);
        let starts = self.const_i64(&format!("{name}.starts"), &[0]);
        let ends = self.const_i64(&format!("{name}.ends"), &[c as i64]);
        let axes = self.const_i64(&format!("{name}.axes"), &[1]);
        self.node("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    fn const_i64(&mut self, name: &str, v: &[i64]) -> String {
        self.inits
            .push(crate::onnx::HostTensor::i64_vec(v).to_proto(name));
        name.to_string()
    }

    fn nb101_cell(
        &mut self,
        x: &str,
        cell: &Nb101Cell,
        prefix: &str,
        cin: usize,
        cout: usize,
    ) -> String {
        let v = cell.v();
        let m = &cell.matrix;
        let vc = cell.vertex_channels(cin, cout);
        let mut out: Vec<String> = vec![x.to_string()];
        let mut concat = vec![];
        for t in 1..v - 1 {
            let mut add_in = vec![];
            for (s, value) in out.iter().enumerate().skip(1) {
                if m[s][t] {
                    add_in.push(if vc[s] > vc[t] {
                        self.first_channels(value, vc[t])
                    } else {
                        value.clone()
                    });
                }
            }
            if m[0][t] {
                add_in.push(self.conv_bn_relu(x, &format!("{prefix}.proj.{t}"), cin, vc[t], 1));
            }
            let mut sum = add_in[0].clone();
            for a in &add_in[1..] {
                sum = self.node("Add", &[&sum, a], vec![]);
            }
            let y = match cell.ops[t].as_str() {
                "conv3x3-bn-relu" => {
                    self.conv_bn_relu(&sum, &format!("{prefix}.ops.{t}"), vc[t], vc[t], 3)
                }
                "conv1x1-bn-relu" => {
                    self.conv_bn_relu(&sum, &format!("{prefix}.ops.{t}"), vc[t], vc[t], 1)
                }
                _ => self.max_pool(&sum, 3, 1, 1),
            };
            if m[t][v - 1] {
                concat.push(y.clone());
            }
            out.push(y);
        }
        let proj_out = |g: &mut Gen| g.conv_bn_relu(x, &format!("{prefix}.proj_out"), cin, cout, 1);
        if concat.is_empty() {
            return proj_out(self);
        }
        let mut y = if concat.len() == 1 {
            concat[0].clone()
        } else {
            let refs: Vec<&str> = concat.iter().map(String::as_str).collect();
            self.node("Concat", &refs, vec![attr::i("axis", 1)])
        };
        if m[0][v - 1] {
            let p = proj_out(self);
            y = self.node("Add", &[&y, &p], vec![]);
        }
        y
    }
}

/// The ONNX model of NB101 `cell` on 3×`hw`×`hw` images (NB101: 32), 10 classes, weights drawn
/// with `seed`.
pub fn nb101_model(cell: &Nb101Cell, seed: u64, hw: usize) -> Result<pb::ModelProto> {
    if hw % 4 != 0 || hw == 0 {
        bail!("NB101 input size {hw}: must be a positive multiple of 4 (two 2×2 pools)");
    }
    let mut g = Gen::new(seed, 0.997);
    let mut x = g.conv_bn_relu("input", "stem", 3, 128, 3);
    let mut c = 128;
    for stack in 0..3 {
        let cout = if stack == 0 { c } else { 2 * c };
        if stack > 0 {
            x = g.max_pool(&x, 2, 2, 0);
        }
        for module in 0..3 {
            x = g.nb101_cell(&x, cell, &format!("stacks.{stack}.{module}"), c, cout);
            c = cout;
        }
    }
    let name = format!("nb101 {}", cell.ops.join("|"));
    Ok(g.finish(&x, c, 10, &name, [3, hw, hw]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vertex_channels_follow_nasbench() {
        // 0→1→2→out, 0→3→out: output 128 over two feeders = 64 each; vertex 1 takes vertex
        // 2's 64.
        let cell = Nb101Cell::parse(
            "0101000010000000100100000100000",
            "input|conv3x3-bn-relu|conv1x1-bn-relu|maxpool3x3|output",
        );
        assert!(cell.is_err(), "a 31-digit matrix is refused");
        let cell = Nb101Cell::parse(
            "0101000100000010000100000",
            "input|conv3x3-bn-relu|conv1x1-bn-relu|maxpool3x3|output",
        )
        .unwrap();
        assert_eq!(cell.vertex_channels(128, 128), vec![128, 64, 64, 64, 128]);
        // An odd split: 3 feeders of 128 → 43, 43, 42.
        let cell = Nb101Cell::parse(
            "0111000001000010000100000",
            "input|conv3x3-bn-relu|conv3x3-bn-relu|conv3x3-bn-relu|output",
        )
        .unwrap();
        assert_eq!(cell.vertex_channels(128, 128), vec![128, 43, 43, 42, 128]);
        assert!(Nb101Cell::parse("0110", "input|output").is_err());
        assert!(Nb101Cell::parse("0000", "input|output").is_err());
        assert!(Nb101Cell::parse("0100", "input|output").is_ok());
        assert!(Nb101Cell::parse("011001000", "input|conv5x5|output").is_err());
    }
}
