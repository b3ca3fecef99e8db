//! Writes the gradient graph: fresh tensor names, deduplicated constants and one helper per
//! standard ONNX op the builder needs (all opset 17, default domain).

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};

use crate::onnx::{attr, pb, DType, HostTensor, Node};

/// Opset of every graph we write.
pub const OPSET: i64 = 17;

/// The ONNX operator domain of gradalign's fused kernels (see the `fused` module).
pub const FUSED_DOMAIN: &str = "ai.gradalign";

pub struct Emitter {
    pub nodes: Vec<pb::NodeProto>,
    pub initializers: Vec<pb::TensorProto>,
    /// Float type of the graph (f32 normally, f64 for `--precision f64`).
    pub float: DType,
    counter: usize,
    const_cache: HashMap<(DType, Vec<usize>, Vec<u64>), String>,
    /// Start of every fresh name: `ga` in the builder, another one when a finished graph is
    /// rewritten (see the `fused` module) so that new names never meet the graph's own.
    prefix: &'static str,
}

impl Emitter {
    pub fn new(float: DType) -> Emitter {
        Emitter {
            nodes: vec![],
            initializers: vec![],
            float,
            counter: 0,
            const_cache: HashMap::new(),
            prefix: "ga",
        }
    }

    /// An emitter whose fresh names start with `prefix` instead of `ga`.
    pub fn with_prefix(float: DType, prefix: &'static str) -> Emitter {
        Emitter {
            prefix,
            ..Emitter::new(float)
        }
    }

    pub fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{}.{hint}.{}", self.prefix, self.counter)
    }

    /// Emit one node with a single fresh output.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        self.op_n(op, inputs, attrs, 1).pop().unwrap()
    }

    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n)
            .map(|_| self.fresh(&op.to_ascii_lowercase()))
            .collect();
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            name: format!("{}.{op}.{}", self.prefix, self.counter),
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }

    /// One node of gradalign's fused-kernel domain (the `fused` module) with `n` fresh outputs.
    pub fn fused(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        let outs = self.op_n(op, inputs, attrs, n);
        if let Some(node) = self.nodes.last_mut() {
            node.domain = FUSED_DOMAIN.into();
        }
        outs
    }

    /// Copy a forward node under its own tensor names.
    pub fn copy_node(&mut self, node: &Node) {
        self.nodes.push(pb::NodeProto {
            input: node.inputs.clone(),
            output: node.outputs.clone(),
            name: node.name.clone(),
            op_type: node.op.clone(),
            attribute: node.attrs.clone(),
            ..Default::default()
        });
    }

    pub fn initializer(&mut self, name: &str, t: &HostTensor) {
        self.initializers.push(t.to_proto(name));
    }

    /// A constant initializer, shared between identical uses.
    pub fn konst(&mut self, t: HostTensor) -> String {
        let bits: Vec<u64> = match &t {
            HostTensor::F32(a) => a.iter().map(|v| v.to_bits() as u64).collect(),
            HostTensor::F64(a) => a.iter().map(|v| v.to_bits()).collect(),
            HostTensor::I64(a) => a.iter().map(|&v| v as u64).collect(),
            HostTensor::Bool(a) => a.iter().map(|&v| v as u64).collect(),
        };
        let key = (t.dtype(), t.shape(), bits);
        if let Some(name) = self.const_cache.get(&key) {
            return name.clone();
        }
        let name = self.fresh("const");
        self.initializer(&name, &t);
        self.const_cache.insert(key, name.clone());
        name
    }

    pub fn i64s(&mut self, v: &[i64]) -> String {
        self.konst(HostTensor::i64_vec(v))
    }

    /// A float scalar of the graph's float type.
    pub fn scalar(&mut self, v: f64) -> String {
        let t = HostTensor::F64(ArrayD::from_elem(IxDyn(&[]), v)).cast(self.float);
        self.konst(t)
    }

    /// A float tensor of the graph's float type.
    pub fn floats(&mut self, a: ArrayD<f64>) -> String {
        let t = HostTensor::F64(a).cast(self.float);
        self.konst(t)
    }

    pub fn reshape(&mut self, x: &str, shape: &[usize]) -> String {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.i64s(&s);
        self.op("Reshape", &[x, &s], vec![])
    }
    pub fn transpose(&mut self, x: &str, perm: &[usize]) -> String {
        let p: Vec<i64> = perm.iter().map(|&d| d as i64).collect();
        self.op("Transpose", &[x], vec![attr::ints("perm", &p)])
    }
    pub fn reduce_sum(&mut self, x: &str, axes: &[usize], keepdims: bool) -> String {
        let a: Vec<i64> = axes.iter().map(|&d| d as i64).collect();
        let a = self.i64s(&a);
        self.op(
            "ReduceSum",
            &[x, &a],
            vec![attr::i("keepdims", keepdims as i64)],
        )
    }
    pub fn reduce_mean(&mut self, x: &str, axes: &[usize], keepdims: bool) -> String {
        let a: Vec<i64> = axes.iter().map(|&d| d as i64).collect();
        self.op(
            "ReduceMean",
            &[x],
            vec![attr::ints("axes", &a), attr::i("keepdims", keepdims as i64)],
        )
    }
    pub fn add(&mut self, a: &str, b: &str) -> String {
        self.op("Add", &[a, b], vec![])
    }
    pub fn sub(&mut self, a: &str, b: &str) -> String {
        self.op("Sub", &[a, b], vec![])
    }
    pub fn mul(&mut self, a: &str, b: &str) -> String {
        self.op("Mul", &[a, b], vec![])
    }
    pub fn div(&mut self, a: &str, b: &str) -> String {
        self.op("Div", &[a, b], vec![])
    }
    pub fn neg(&mut self, a: &str) -> String {
        self.op("Neg", &[a], vec![])
    }
    pub fn mul_scalar(&mut self, a: &str, v: f64) -> String {
        if v == 1.0 {
            return a.to_string();
        }
        let s = self.scalar(v);
        self.mul(a, &s)
    }
    pub fn matmul(&mut self, a: &str, b: &str) -> String {
        self.op("MatMul", &[a, b], vec![])
    }
    pub fn concat(&mut self, xs: &[String], axis: usize) -> String {
        if xs.len() == 1 {
            return xs[0].clone();
        }
        let refs: Vec<&str> = xs.iter().map(|s| s.as_str()).collect();
        self.op("Concat", &refs, vec![attr::i("axis", axis as i64)])
    }
    pub fn slice(
        &mut self,
        x: &str,
        starts: &[i64],
        ends: &[i64],
        axes: &[i64],
        steps: &[i64],
    ) -> String {
        let (s, e, a, st) = (
            self.i64s(starts),
            self.i64s(ends),
            self.i64s(axes),
            self.i64s(steps),
        );
        self.op("Slice", &[x, &s, &e, &a, &st], vec![])
    }
    /// Constant-mode Pad; `pads` in ONNX order (all begins, then all ends).
    pub fn pad(&mut self, x: &str, pads: &[i64], value: f64) -> String {
        if pads.iter().all(|&p| p == 0) {
            return x.to_string();
        }
        let p = self.i64s(pads);
        let v = self.scalar(value);
        self.op("Pad", &[x, &p, &v], vec![attr::s("mode", "constant")])
    }
    pub fn expand(&mut self, x: &str, shape: &[usize]) -> String {
        let s: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let s = self.i64s(&s);
        self.op("Expand", &[x, &s], vec![])
    }
    /// `Where(cond, a, b)`.
    pub fn where_(&mut self, cond: &str, a: &str, b: &str) -> String {
        self.op("Where", &[cond, a, b], vec![])
    }
    pub fn cast_float(&mut self, x: &str) -> String {
        let to = self.float.onnx_code() as i64;
        self.op("Cast", &[x], vec![attr::i("to", to)])
    }
}
