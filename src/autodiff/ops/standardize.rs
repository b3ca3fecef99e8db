//! The standard-op forms of per-sample standardisation, forward and backward: what the fused
//! `GaStandardize`, `GaStandardizeGrad`, `GaNormAffine` and `GaNormAffineGrad` nodes compute,
//! written out for runtimes without the kernels (see `autodiff::fused`).

use crate::autodiff::emit::Emitter;
use crate::onnx::DType;

/// `GaStandardize` in standard ops: two-pass mean and biased variance, outputs `x̂` and `1/σ`;
/// returns the mean.
pub fn expand_forward(
    em: &mut Emitter,
    name: &str,
    x: &str,
    outputs: &[String],
    axes: &[usize],
    eps: f64,
) -> String {
    let mean = em.reduce_mean(x, axes, true);
    let xc = em.sub(x, &mean);
    let var = if em.float == DType::F64 {
        // tract rewrites mean(x·x) into a mean-of-squares reduction that it evaluates in f32;
        // -mean(x·(-x)) is the same number and stays in f64.
        let neg = em.neg(&xc);
        let sq = em.mul(&xc, &neg);
        let m = em.reduce_mean(&sq, axes, true);
        em.neg(&m)
    } else {
        let sq = em.mul(&xc, &xc);
        em.reduce_mean(&sq, axes, true)
    };
    let e = em.scalar(eps);
    let ve = em.add(&var, &e);
    let sd = em.op("Sqrt", &[&ve], vec![]);
    let one = em.scalar(1.0);
    let inv = em.div(&one, &sd);
    em.nodes.push(crate::onnx::pb::NodeProto {
        input: vec![inv.clone()],
        output: vec![outputs[1].clone()],
        name: format!("{name}/inv"),
        op_type: "Identity".into(),
        ..Default::default()
    });
    em.nodes.push(crate::onnx::pb::NodeProto {
        input: vec![xc, inv],
        output: vec![outputs[0].clone()],
        name: format!("{name}/xhat"),
        op_type: "Mul".into(),
        ..Default::default()
    });
    mean
}

/// The gradient of `GaStandardize` in standard ops (the rule is `norm::backward`'s).
pub fn expand_backward(em: &mut Emitter, dxh: &str, xh: &str, inv: &str, axes: &[usize]) -> String {
    let m1 = em.reduce_mean(dxh, axes, true);
    let p = em.mul(dxh, xh);
    let m2 = em.reduce_mean(&p, axes, true);
    let t = em.mul(xh, &m2);
    let u = em.sub(dxh, &m1);
    let v = em.sub(&u, &t);
    em.mul(&v, inv)
}
