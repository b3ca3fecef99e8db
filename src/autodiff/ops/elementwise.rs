//! Elementwise ops with numpy broadcasting: Add, Sub, Mul, Div, Pow (constant exponent), the
//! activations (Relu, LeakyRelu, Sigmoid, Tanh, Erf, Gelu → Erf/Tanh, Clip; HardSigmoid,
//! HardSwish, Elu, Selu, PRelu → primitives), Sqrt, Exp, Neg,
//! Abs, Reciprocal, Where and the comparisons (no gradient).
//!
//! Every rule forms the local gradient at the broadcast shape and then reduces it to the
//! operand with [`Backward::unbroadcast`], which keeps the sample axis for parameter operands.

use anyhow::{anyhow, bail, Result};
use ndarray::{ArrayD, IxDyn, Zip};

use super::{broadcast, check_batched_broadcast, input_info, Shapes};
use crate::autodiff::backward::Backward;
use crate::autodiff::rules::Lowering;
use crate::autodiff::rules::{arity, fixed_after_first, OpDef, MANY, OP};
use crate::autodiff::Info;
use crate::onnx::{attr, DType, HostTensor, Node};

/// Element-wise primitives: shapes broadcast, constants fold, one backward rule each.
const EW: OpDef = OpDef {
    infer: Some(infer),
    eval: Some(eval),
    backward: Some(backward),
    ..OP
};
const BIN: OpDef = OpDef {
    arity: arity(2, 2, 1, 1),
    scalar_is_constant: true,
    ..EW
};
const CMP: OpDef = OpDef {
    arity: arity(2, 2, 1, 1),
    differentiable: false,
    ..EW
};
/// Source ops rewritten into the primitives above.
const PIECEWISE: OpDef = OpDef {
    lower: Some(lower_piecewise),
    ..OP
};

/// Fused kernel: Relu's input gradient `dY · [y > 0]` from `y = Relu(x)` (positive exactly
/// where x is) and `dY`, in one pass.
pub const RELU_GRAD: &str = "GaReluGrad";

/// `GaReluGrad` in standard ops: dY times the {0, 1} mask of y > 0. The same numbers as
/// Where(x > 0, dY, 0) for finite dY and markedly cheaper in ONNX Runtime; a non-finite dY
/// stays non-finite instead of being masked, and is reported as such.
pub fn expand_relu_grad(em: &mut crate::autodiff::emit::Emitter, x: &str, dy: &str) -> String {
    let z = em.scalar(0.0);
    let m = em.op("Greater", &[x, &z], vec![]);
    let mf = em.cast_float(&m);
    em.mul(dy, &mf)
}

pub const OPS: &[OpDef] = &[
    OpDef { name: "Add", ..BIN },
    OpDef { name: "Sub", ..BIN },
    OpDef { name: "Mul", ..BIN },
    OpDef { name: "Div", ..BIN },
    OpDef { name: "Pow", ..BIN },
    // Variadic in ONNX: lowered to a chain of binary ones, each with its own rule.
    OpDef {
        name: "Max",
        arity: arity(1, MANY, 1, 1),
        lower: Some(lower_variadic),
        ..BIN
    },
    OpDef {
        name: "Min",
        arity: arity(1, MANY, 1, 1),
        lower: Some(lower_variadic),
        ..BIN
    },
    OpDef {
        name: "Where",
        arity: arity(3, 3, 1, 1),
        ..BIN
    },
    OpDef {
        name: "Equal",
        ..CMP
    },
    OpDef {
        name: "Greater",
        ..CMP
    },
    OpDef {
        name: "Less",
        ..CMP
    },
    OpDef { name: "Relu", ..EW },
    OpDef {
        name: "LeakyRelu",
        ..EW
    },
    OpDef { name: "Tanh", ..EW },
    OpDef { name: "Sqrt", ..EW },
    OpDef { name: "Exp", ..EW },
    OpDef { name: "Neg", ..EW },
    OpDef { name: "Abs", ..EW },
    OpDef {
        name: "Reciprocal",
        ..EW
    },
    OpDef {
        name: "Sigmoid",
        lower: Some(lower_f64_fallbacks),
        ..EW
    },
    OpDef {
        name: "Erf",
        lower: Some(lower_f64_fallbacks),
        ..EW
    },
    OpDef {
        name: "Clip",
        arity: arity(1, 3, 1, 1),
        lower: Some(lower_clip),
        slots: fixed_after_first,
        scalar_is_constant: true,
        ..EW
    },
    OpDef {
        name: "Gelu",
        lower: Some(lower_gelu),
        ..OP
    },
    OpDef {
        name: "HardSigmoid",
        ..PIECEWISE
    },
    OpDef {
        name: "HardSwish",
        ..PIECEWISE
    },
    OpDef {
        name: "Elu",
        ..PIECEWISE
    },
    OpDef {
        name: "Selu",
        ..PIECEWISE
    },
    OpDef {
        name: "PRelu",
        arity: arity(2, 2, 1, 1),
        ..PIECEWISE
    },
    OpDef { name: "Log", ..EW },
    OpDef {
        name: "Softplus",
        lower: Some(lower_softplus),
        ..OP
    },
    OpDef {
        name: "Mish",
        lower: Some(lower_softplus),
        ..OP
    },
];

const BINARY: &[&str] = &[
    "Add", "Sub", "Mul", "Div", "Pow", "Equal", "Greater", "Less", "Max", "Min",
];

/// tract has no f64 Sigmoid or Erf kernels: in f64 graphs Sigmoid becomes the exact
/// `0.5·(1 + tanh(x/2))`, and Erf is evaluated in f32 between casts (noted to the user).
pub fn lower_f64_fallbacks(lw: &mut Lowering, node: Node) -> Result<()> {
    if lw.float != DType::F64 {
        return lw.add(node);
    }
    let x = node.inputs[0].clone();
    let y = node.outputs[0].clone();
    if node.op == "Sigmoid" {
        let half = lw.scalar(0.5);
        let one = lw.scalar(1.0);
        let hx = lw.emit(&node.name, "Mul", vec![x, half.clone()], None, vec![])?;
        let t = lw.emit(&node.name, "Tanh", vec![hx], None, vec![])?;
        let p = lw.emit(&node.name, "Add", vec![t, one], None, vec![])?;
        lw.emit(&node.name, "Mul", vec![p, half], Some(y), vec![])?;
    } else {
        let to32 = lw.emit(
            &node.name,
            "Cast",
            vec![x],
            None,
            vec![attr::i("to", DType::F32.onnx_code() as i64)],
        )?;
        let e = lw.emit(&node.name, "Erf", vec![to32], None, vec![])?;
        lw.emit(
            &node.name,
            "Cast",
            vec![e],
            Some(y),
            vec![attr::i("to", DType::F64.onnx_code() as i64)],
        )?;
    }
    Ok(())
}

pub fn lower_gelu(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = node.inputs[0].clone();
    let y = node.outputs[0].clone();
    let approx = node.attr_s("approximate").unwrap_or_else(|| "none".into());
    let half = lw.scalar(0.5);
    let one = lw.scalar(1.0);
    let inner = if approx == "tanh" {
        let c = lw.scalar((2.0 / std::f64::consts::PI).sqrt());
        let k = lw.scalar(0.044715);
        let x2 = lw.emit(&node.name, "Mul", vec![x.clone(), x.clone()], None, vec![])?;
        let x3 = lw.emit(&node.name, "Mul", vec![x2, x.clone()], None, vec![])?;
        let kx3 = lw.emit(&node.name, "Mul", vec![x3, k], None, vec![])?;
        let s = lw.emit(&node.name, "Add", vec![x.clone(), kx3], None, vec![])?;
        let cs = lw.emit(&node.name, "Mul", vec![s, c], None, vec![])?;
        lw.emit(&node.name, "Tanh", vec![cs], None, vec![])?
    } else {
        let r2 = lw.scalar(std::f64::consts::FRAC_1_SQRT_2);
        let xs = lw.emit(&node.name, "Mul", vec![x.clone(), r2], None, vec![])?;
        // Through Erf's own lowering, which evaluates it in f32 in f64 graphs (tract has no
        // f64 Erf).
        let e = lw.fresh("gelu_erf");
        lower_f64_fallbacks(
            lw,
            Node::new(node.name.clone(), "Erf", vec![xs], vec![e.clone()]),
        )?;
        e
    };
    let p = lw.emit(&node.name, "Add", vec![inner, one], None, vec![])?;
    let hx = lw.emit(&node.name, "Mul", vec![x.clone(), half], None, vec![])?;
    lw.emit(&node.name, "Mul", vec![hx, p], Some(y), vec![])?;
    Ok(())
}

/// The piecewise activations of MobileNetV3, EfficientNet-style and SELU networks, lowered to
/// primitives whose rules already exist (so their gradients are the primitives' chain rule):
/// HardSigmoid = Clip(αx + β, 0, 1); HardSwish = x · HardSigmoid(x) with α = 1/6, β = 1/2;
/// Elu = Where(x > 0, x, α(eˣ − 1)); Selu = γ · Elu_α(x); PRelu = Where(x > 0, x, slope · x)
/// (slope broadcast as ONNX does, a parameter when it is an initializer).
pub fn lower_piecewise(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = node.inputs[0].clone();
    let y = node.outputs[0].clone();
    let base = node.name.clone();
    let attr = |name: &str, default: f64| node.attr_f(name).map_or(default, |v| v as f64);
    let hard_sigmoid = |lw: &mut Lowering, alpha: f64, beta: f64, out: Option<String>| {
        let a = lw.scalar(alpha);
        let b = lw.scalar(beta);
        let (lo, hi) = (lw.scalar(0.0), lw.scalar(1.0));
        let ax = lw.emit(&base, "Mul", vec![x.clone(), a], None, vec![])?;
        let s = lw.emit(&base, "Add", vec![ax, b], None, vec![])?;
        lw.emit(&base, "Clip", vec![s, lo, hi], out, vec![])
    };
    // Where(x > 0, x, negative) with the negative branch given.
    let positive_or = |lw: &mut Lowering, negative: String, out: Option<String>| {
        let zero = lw.scalar(0.0);
        let m = lw.emit(&base, "Greater", vec![x.clone(), zero], None, vec![])?;
        lw.emit(&base, "Where", vec![m, x.clone(), negative], out, vec![])
    };
    let elu = |lw: &mut Lowering, alpha: f64, out: Option<String>| {
        // eˣ of the non-positive part only: eˣ of a large positive x overflows, and its
        // backward (0 · ∞) would turn the whole gradient into NaN.
        let zero = lw.scalar(0.0);
        let m = lw.emit(
            &base,
            "Greater",
            vec![x.clone(), zero.clone()],
            None,
            vec![],
        )?;
        let xn = lw.emit(&base, "Where", vec![m, zero, x.clone()], None, vec![])?;
        let e = lw.emit(&base, "Exp", vec![xn], None, vec![])?;
        let one = lw.scalar(1.0);
        let em1 = lw.emit(&base, "Sub", vec![e, one], None, vec![])?;
        let a = lw.scalar(alpha);
        let neg = lw.emit(&base, "Mul", vec![em1, a], None, vec![])?;
        positive_or(lw, neg, out)
    };
    match node.op.as_str() {
        "HardSigmoid" => {
            hard_sigmoid(lw, attr("alpha", 0.2), attr("beta", 0.5), Some(y))?;
        }
        "HardSwish" => {
            let h = hard_sigmoid(lw, 1.0 / 6.0, 0.5, None)?;
            lw.emit(&base, "Mul", vec![x.clone(), h], Some(y), vec![])?;
        }
        "Elu" => {
            elu(lw, attr("alpha", 1.0), Some(y))?;
        }
        "Selu" => {
            let e = elu(lw, attr("alpha", 1.673_263_192_176_818_8), None)?;
            let g = lw.scalar(attr("gamma", 1.050_701_022_148_132_3));
            lw.emit(&base, "Mul", vec![e, g], Some(y), vec![])?;
        }
        "PRelu" => {
            let sx = lw.emit(
                &base,
                "Mul",
                vec![x.clone(), node.inputs[1].clone()],
                None,
                vec![],
            )?;
            positive_or(lw, sx, Some(y))?;
        }
        op => bail!("{}: {op} is not a piecewise activation", node.describe()),
    }
    Ok(())
}

/// Max/Min of any number of operands as a chain of binary ones (one operand: a copy), so the
/// backward rule sees two operands and none is left without a gradient.
fn lower_variadic(lw: &mut Lowering, node: Node) -> Result<()> {
    let y = node.outputs[0].clone();
    if node.inputs.len() == 1 {
        let copy = Node::new(node.name.clone(), "Identity", node.inputs.clone(), vec![y]);
        return lw.add(copy);
    }
    let last = node.inputs.len() - 1;
    let mut acc = node.inputs[0].clone();
    for (i, x) in node.inputs.iter().enumerate().skip(1) {
        let out = (i == last).then(|| y.clone());
        acc = lw.emit(&node.name, &node.op, vec![acc, x.clone()], out, vec![])?;
    }
    Ok(())
}

/// Softplus `ln(1 + eˣ)` and Mish `x·tanh(softplus(x))` as primitives, in the stable form
/// `max(x, 0) + ln(1 + e^(−|x|))` with `−|x| = min(x, −x)`: no overflow for large |x|, and at
/// x = 0 Min passes the gradient to x, so the derivative there is σ(0) = ½ exactly.
fn lower_softplus(lw: &mut Lowering, node: Node) -> Result<()> {
    let base = node.name.clone();
    let x = node.inputs[0].clone();
    let y = node.outputs[0].clone();
    let mish = node.op == "Mish";
    let nx = lw.emit(&base, "Neg", vec![x.clone()], None, vec![])?;
    let m = lw.emit(&base, "Min", vec![x.clone(), nx], None, vec![])?;
    let e = lw.emit(&base, "Exp", vec![m], None, vec![])?;
    let one = lw.scalar(1.0);
    let a = lw.emit(&base, "Add", vec![e, one], None, vec![])?;
    let l = lw.emit(&base, "Log", vec![a], None, vec![])?;
    let r = lw.emit(&base, "Relu", vec![x.clone()], None, vec![])?;
    let sp = lw.emit(&base, "Add", vec![r, l], (!mish).then(|| y.clone()), vec![])?;
    if mish {
        let t = lw.emit(&base, "Tanh", vec![sp], None, vec![])?;
        lw.emit(&base, "Mul", vec![x, t], Some(y), vec![])?;
    }
    Ok(())
}

pub fn lower_clip(lw: &mut Lowering, node: Node) -> Result<()> {
    let x = lw.input_info(&node, 0)?.clone();
    let (lo, hi) = if node.has_attr("min") || node.has_attr("max") {
        (
            node.attr_f("min").map(|v| v as f64),
            node.attr_f("max").map(|v| v as f64),
        )
    } else {
        (
            lw.const_input(&node, 1)?.and_then(|t| t.scalar_f64()),
            lw.const_input(&node, 2)?.and_then(|t| t.scalar_f64()),
        )
    };
    let lo = lw.konst(
        HostTensor::F64(ArrayD::from_elem(IxDyn(&[]), lo.unwrap_or(f32::MIN as f64))).cast(x.dtype),
    );
    let hi = lw.konst(
        HostTensor::F64(ArrayD::from_elem(IxDyn(&[]), hi.unwrap_or(f32::MAX as f64))).cast(x.dtype),
    );
    lw.add(Node::new(
        node.name.clone(),
        "Clip",
        vec![node.inputs[0].clone(), lo, hi],
        vec![node.outputs[0].clone()],
    ))
}

pub fn infer(node: &Node, ins: &[Option<&Info>]) -> Result<Shapes> {
    let x = input_info(node, ins, 0)?;
    let op = node.op.as_str();
    if BINARY.contains(&op) || op == "Where" {
        let mut out = x.shape.clone();
        for i in ins.iter().flatten().skip(1) {
            out = broadcast(node, &out, &i.shape)?;
        }
        check_batched_broadcast(node, ins, &out)?;
        let dt = match op {
            "Equal" | "Greater" | "Less" => DType::Bool,
            "Where" => input_info(node, ins, 1)?.dtype,
            _ => x.dtype,
        };
        return Ok(vec![(out, dt)]);
    }
    Ok(vec![(x.shape.clone(), x.dtype)])
}

fn binary_f64(op: &str, a: f64, b: f64) -> f64 {
    match op {
        "Add" => a + b,
        "Sub" => a - b,
        "Mul" => a * b,
        "Div" => a / b,
        "Pow" => a.powf(b),
        "Equal" => (a == b) as u8 as f64,
        "Greater" => (a > b) as u8 as f64,
        "Less" => (a < b) as u8 as f64,
        "Max" => a.max(b),
        "Min" => a.min(b),
        _ => unreachable!(),
    }
}

fn binary_i64(op: &str, a: i64, b: i64) -> Option<i64> {
    Some(match op {
        "Add" => a.wrapping_add(b),
        "Sub" => a.wrapping_sub(b),
        "Mul" => a.wrapping_mul(b),
        "Div" => a.checked_div(b)?,
        "Equal" => (a == b) as i64,
        "Greater" => (a > b) as i64,
        "Less" => (a < b) as i64,
        "Max" => a.max(b),
        "Min" => a.min(b),
        _ => return None,
    })
}

/// `Where(c, x, y)` on constants: exporters resolve `expand(B, -1, -1)`'s -1 entries with it.
fn where_eval(
    node: &Node,
    c: &HostTensor,
    vals: &[Option<&HostTensor>],
) -> Option<Result<Vec<HostTensor>>> {
    let (x, y) = (
        vals.get(1).copied().flatten()?,
        vals.get(2).copied().flatten()?,
    );
    let shape = match broadcast(node, &c.shape(), &x.shape())
        .and_then(|s| broadcast(node, &s, &y.shape()))
    {
        Ok(s) => s,
        Err(e) => return Some(Err(e)),
    };
    let cond = c.to_f64();
    let cond = cond.broadcast(IxDyn(&shape))?;
    let out = match (x, y) {
        (HostTensor::I64(a), HostTensor::I64(b)) => {
            let (a, b) = (a.broadcast(IxDyn(&shape))?, b.broadcast(IxDyn(&shape))?);
            HostTensor::I64(Zip::from(&cond).and(&a).and(&b).map_collect(|&c, &p, &q| {
                if c != 0.0 {
                    p
                } else {
                    q
                }
            }))
        }
        _ => {
            let (a, b) = (x.to_f64(), y.to_f64());
            let (a, b) = (a.broadcast(IxDyn(&shape))?, b.broadcast(IxDyn(&shape))?);
            HostTensor::F64(Zip::from(&cond).and(&a).and(&b).map_collect(|&c, &p, &q| {
                if c != 0.0 {
                    p
                } else {
                    q
                }
            }))
            .cast(x.dtype())
        }
    };
    Some(Ok(vec![out]))
}

pub fn eval(node: &Node, vals: &[Option<&HostTensor>]) -> Option<Result<Vec<HostTensor>>> {
    let op = node.op.as_str();
    let a = vals.first().copied().flatten()?;
    if BINARY.contains(&op) {
        let b = vals.get(1).copied().flatten()?;
        let shape = match broadcast(node, &a.shape(), &b.shape()) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        let cmp = matches!(op, "Equal" | "Greater" | "Less");
        let res = if a.dtype() == DType::I64 && b.dtype() == DType::I64 && op != "Pow" {
            let (HostTensor::I64(x), HostTensor::I64(y)) = (a, b) else {
                unreachable!()
            };
            let (x, y) = (x.broadcast(IxDyn(&shape))?, y.broadcast(IxDyn(&shape))?);
            let mut bad = false;
            let out = Zip::from(&x).and(&y).map_collect(|&p, &q| {
                binary_i64(op, p, q).unwrap_or_else(|| {
                    bad = true;
                    0
                })
            });
            if bad {
                return Some(Err(anyhow!(
                    "{}: integer division by zero while folding",
                    node.describe()
                )));
            }
            if cmp {
                HostTensor::I64(out).cast(DType::Bool)
            } else {
                HostTensor::I64(out)
            }
        } else {
            let (x, y) = (a.to_f64(), b.to_f64());
            let (x, y) = (x.broadcast(IxDyn(&shape))?, y.broadcast(IxDyn(&shape))?);
            let out = HostTensor::F64(
                Zip::from(&x)
                    .and(&y)
                    .map_collect(|&p, &q| binary_f64(op, p, q)),
            );
            if cmp {
                out.cast(DType::Bool)
            } else {
                out.cast(a.dtype())
            }
        };
        return Some(Ok(vec![res]));
    }
    if op == "Where" {
        return where_eval(node, a, vals);
    }
    let f: fn(f64) -> f64 = match op {
        "Neg" => |v| -v,
        "Sqrt" => f64::sqrt,
        "Exp" => f64::exp,
        "Abs" => f64::abs,
        "Reciprocal" => |v| 1.0 / v,
        "Log" => f64::ln,
        "Relu" => |v| v.max(0.0),
        _ => return None,
    };
    Some(Ok(
        vec![HostTensor::F64(a.to_f64().mapv(f)).cast(a.dtype())],
    ))
}

pub fn backward(
    b: &mut Backward,
    node: &Node,
    dys: &[Option<String>],
) -> Result<Vec<Option<String>>> {
    let Some(dy) = dys[0].clone() else {
        return Ok(vec![]);
    };
    let op = node.op.as_str();
    let y = node.outputs[0].clone();
    let out_shape = b.grad_shape(&y);
    let x = node.inputs[0].clone();
    let (n0, n1, n2) = (
        b.needs_input(node, 0),
        b.needs_input(node, 1),
        b.needs_input(node, 2),
    );
    let mut dx: Vec<Option<String>> = vec![None; node.inputs.len()];
    match op {
        "Add" | "Sub" => {
            if n0 {
                dx[0] = Some(b.unbroadcast(&dy, &out_shape, &x)?);
            }
            if n1 {
                let g = if op == "Sub" {
                    b.em.neg(&dy)
                } else {
                    dy.clone()
                };
                dx[1] = Some(b.unbroadcast(&g, &out_shape, &node.inputs[1])?);
            }
        }
        "Mul" => {
            if n0 {
                let g = b.em.mul(&dy, &node.inputs[1]);
                dx[0] = Some(b.unbroadcast(&g, &out_shape, &x)?);
            }
            if n1 {
                let g = b.em.mul(&dy, &x);
                dx[1] = Some(b.unbroadcast(&g, &out_shape, &node.inputs[1])?);
            }
        }
        "Div" => {
            let d = node.inputs[1].clone();
            if n0 {
                let g = b.em.div(&dy, &d);
                dx[0] = Some(b.unbroadcast(&g, &out_shape, &x)?);
            }
            if n1 {
                let t = b.em.mul(&dy, &y);
                let t = b.em.div(&t, &d);
                let g = b.em.neg(&t);
                dx[1] = Some(b.unbroadcast(&g, &out_shape, &d)?);
            }
        }
        "Pow" => {
            if n1 {
                bail!(
                    "{}: gradients through a Pow exponent are not supported",
                    node.describe()
                );
            }
            let e = b
                .info(&node.inputs[1])
                .value
                .as_ref()
                .and_then(|t| t.scalar_f64())
                .ok_or_else(|| {
                    anyhow!("{}: Pow needs a constant scalar exponent", node.describe())
                })?;
            if n0 {
                let local = if e == 2.0 {
                    b.em.mul_scalar(&x, 2.0)
                } else {
                    let em1 = b.em.scalar(e - 1.0);
                    let p = b.em.op("Pow", &[&x, &em1], vec![]);
                    b.em.mul_scalar(&p, e)
                };
                let g = b.em.mul(&dy, &local);
                dx[0] = Some(b.unbroadcast(&g, &out_shape, &x)?);
            }
        }
        "Where" => {
            let c = node.inputs[0].clone();
            let z = b.em.scalar(0.0);
            if n1 {
                let g = b.em.where_(&c, &dy, &z);
                dx[1] = Some(b.unbroadcast(&g, &out_shape, &node.inputs[1])?);
            }
            if n2 {
                let g = b.em.where_(&c, &z, &dy);
                dx[2] = Some(b.unbroadcast(&g, &out_shape, &node.inputs[2])?);
            }
        }
        "Max" | "Min" => {
            // The gradient goes to the larger (Max) or smaller (Min) operand, to the first on
            // ties.
            let (a, c) = (x.clone(), node.inputs[1].clone());
            let z = b.em.scalar(0.0);
            let second = if op == "Max" { "Less" } else { "Greater" };
            let lt = b.em.op(second, &[&a, &c], vec![]);
            if n0 {
                let g = b.em.where_(&lt, &z, &dy);
                dx[0] = Some(b.unbroadcast(&g, &out_shape, &a)?);
            }
            if n1 {
                let g = b.em.where_(&lt, &dy, &z);
                dx[1] = Some(b.unbroadcast(&g, &out_shape, &c)?);
            }
        }
        "Equal" | "Greater" | "Less" => {}
        _ if n0 => {
            let g = match op {
                // The mask from Relu's output (y > 0 exactly where x > 0): then nothing but
                // the Relu reads x, whose buffer the runtime can hand to y.
                "Relu" => {
                    b.em.fused(RELU_GRAD, &[&y, &dy], vec![], 1)
                        .pop()
                        .expect("one output")
                }
                "LeakyRelu" => {
                    let alpha = node.attr_f("alpha").unwrap_or(0.01) as f64;
                    let z = b.em.scalar(0.0);
                    let m = b.em.op("Greater", &[&x, &z], vec![]);
                    let s = b.em.mul_scalar(&dy, alpha);
                    b.em.where_(&m, &dy, &s)
                }
                "Clip" => {
                    let (lo, hi) = (node.inputs[1].clone(), node.inputs[2].clone());
                    let a = b.em.op("Greater", &[&x, &lo], vec![]);
                    let c = b.em.op("Less", &[&x, &hi], vec![]);
                    let m = b.em.op("And", &[&a, &c], vec![]);
                    let z = b.em.scalar(0.0);
                    b.em.where_(&m, &dy, &z)
                }
                "Sigmoid" => {
                    let one = b.em.scalar(1.0);
                    let om = b.em.sub(&one, &y);
                    let t = b.em.mul(&y, &om);
                    b.em.mul(&dy, &t)
                }
                "Tanh" => {
                    let one = b.em.scalar(1.0);
                    let y2 = b.em.mul(&y, &y);
                    let t = b.em.sub(&one, &y2);
                    b.em.mul(&dy, &t)
                }
                "Erf" => {
                    // Gradients are always in the graph's float type, even around the f32
                    // Erf of an f64 graph.
                    let x = if b.info(&x).dtype != b.em.float {
                        b.em.cast_float(&x)
                    } else {
                        x.clone()
                    };
                    let x2 = b.em.mul(&x, &x);
                    let nx2 = b.em.neg(&x2);
                    let e = b.em.op("Exp", &[&nx2], vec![]);
                    let t = b.em.mul_scalar(&e, 2.0 / std::f64::consts::PI.sqrt());
                    b.em.mul(&dy, &t)
                }
                "Sqrt" => {
                    let t = b.em.div(&dy, &y);
                    b.em.mul_scalar(&t, 0.5)
                }
                "Exp" => b.em.mul(&dy, &y),
                "Log" => b.em.div(&dy, &x),
                "Neg" => b.em.neg(&dy),
                "Abs" => {
                    let s = b.em.op("Sign", &[&x], vec![]);
                    b.em.mul(&dy, &s)
                }
                "Reciprocal" => {
                    let y2 = b.em.mul(&y, &y);
                    let t = b.em.mul(&dy, &y2);
                    b.em.neg(&t)
                }
                _ => bail!("no gradient rule for {}", node.describe()),
            };
            dx[0] = Some(g);
        }
        _ => {}
    }
    Ok(dx)
}
