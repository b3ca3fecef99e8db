//! ONNX Runtime kernels for the fused nodes of [`crate::autodiff::fused`], registered from Rust
//! as the custom-op domain `ai.gradalign` on every CPU session.
//!
//! Each kernel is one or two passes over memory where the standard form makes five to ten, and
//! its sums accumulate in f64 (eight independent lanes, so that they vectorise). Rows are
//! independent and spread over the session's intra-op threads.

use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput,
    OperatorOutput, ShapeInferenceContext,
};
use ort::value::{PrimitiveTensorElementType, Shape, SymbolicDimensions, ValueType};

use crate::autodiff::fused::DOMAIN;
use crate::autodiff::ops::norm_affine::{NORM_AFFINE, NORM_AFFINE_GRAD};
use crate::autodiff::ops::{elementwise::RELU_GRAD, norm::STANDARDIZE, norm::STANDARDIZE_GRAD};

mod rows;
pub use rows::*;

/// A pointer that kernel rows write through from several threads, each to its own rows.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// # Safety
    /// `start..start + len` lies inside the buffer and no other thread touches it meanwhile.
    unsafe fn rows(self, start: usize, len: usize) -> &'static mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

fn err(node: &str, what: impl std::fmt::Display) -> ort::Error {
    ort::Error::new(format!("{DOMAIN}.{node}: {what}"))
}

/// `(rows, row length)` of a tensor whose statistics run over its last `axes.len()` axes.
fn row_split(shape: &[i64], axes: &[i64], node: &str) -> ort::Result<(usize, usize)> {
    let r = shape.len();
    let k = axes.len();
    let trailing = k > 0
        && k <= r
        && axes
            .iter()
            .enumerate()
            .all(|(i, &a)| a == (r - k + i) as i64 || a == (i as i64 - k as i64));
    if !trailing {
        return Err(err(
            node,
            format!("axes {axes:?} are not the trailing axes of a rank-{r} input"),
        ));
    }
    let inner: usize = shape[r - k..].iter().map(|&d| d as usize).product();
    let outer: usize = shape[..r - k].iter().map(|&d| d as usize).product();
    Ok((outer, inner))
}

fn input<'c, T: Float + PrimitiveTensorElementType>(
    ctx: &'c ComputeContext,
    i: usize,
    node: &str,
) -> ort::Result<(Vec<i64>, &'c [T])> {
    let v = ctx
        .input(i)?
        .ok_or_else(|| err(node, format!("input {i} missing")))?;
    let (shape, data) = v.try_extract_tensor::<T>()?;
    let shape = shape.to_vec();
    // The value borrows the context's input, which outlives this compute call.
    let data: &'c [T] = unsafe { std::slice::from_raw_parts(data.as_ptr(), data.len()) };
    Ok((shape, data))
}

fn output<T: Float + PrimitiveTensorElementType>(
    ctx: &ComputeContext,
    i: usize,
    shape: Vec<i64>,
    node: &str,
) -> ort::Result<Shared<T>> {
    let mut v = ctx
        .output(i, shape)?
        .ok_or_else(|| err(node, format!("output {i} missing")))?;
    let (_, data) = v.try_extract_tensor_mut::<T>()?;
    Ok(Shared(data.as_mut_ptr()))
}

/// `shape` with its last `k` axes set to 1.
fn kept_shape(shape: &[i64], k: usize) -> Vec<i64> {
    let r = shape.len();
    (0..r)
        .map(|i| if i + k < r { shape[i] } else { 1 })
        .collect()
}

/// Runs `row(r)` for every row over the session's intra-op threads, a few thousand elements
/// per task so that small tensors stay on one thread.
fn for_rows(
    ctx: &ComputeContext,
    rows: usize,
    row_len: usize,
    row: impl Fn(usize) + Sync + Send,
) -> ort::Result<()> {
    let per = (16_384 / row_len.max(1)).max(1);
    let tasks = rows.div_ceil(per).max(1);
    ctx.par_for(tasks, tasks, |t| {
        for r in t * per..((t + 1) * per).min(rows) {
            row(r);
        }
    })
}

/// Output `out` has input 0's type and shape. Declared shapes let ONNX Runtime's memory planner
/// reuse dead buffers for these outputs and everything downstream of them; without them every
/// output is a fresh allocation (twice the page faults, measured on NB201).
fn same_as_input(ctx: &mut ShapeInferenceContext, out: usize) -> ort::Result<()> {
    let ins = ctx.inputs();
    let x = ins
        .first()
        .ok_or_else(|| ort::Error::new("shape inference without inputs"))?;
    ctx.set_output(out, x)
}

/// A statistic's shape: input 0's shape with the normalised (trailing) axes kept as 1.
fn kept_dims(ctx: &mut ShapeInferenceContext, out: usize) -> ort::Result<()> {
    let axes: Vec<i64> = ctx.attr("axes")?;
    let ins = ctx.inputs();
    if let Some(ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    }) = ins.first()
    {
        let r = shape.len();
        let k = axes.len().min(r);
        let dims: Vec<i64> = (0..r)
            .map(|i| if i >= r - k { 1 } else { shape[i] })
            .collect();
        let symbols = (0..r).map(|i| match dimension_symbols.get(i) {
            Some(s) if i < r - k => s.clone(),
            _ => String::new(),
        });
        let kept = ValueType::Tensor {
            ty: *ty,
            shape: Shape::new(dims),
            dimension_symbols: SymbolicDimensions::new(symbols),
        };
        ctx.set_output(out, &kept)?;
    }
    Ok(())
}

struct Standardize<T>(std::marker::PhantomData<T>);
struct StandardizeGrad<T>(std::marker::PhantomData<T>);
struct ReluGrad<T>(std::marker::PhantomData<T>);

impl<T: Float + PrimitiveTensorElementType> Operator for Standardize<T> {
    type Kernel<'a> = BoxedKernel<'a>;
    fn name(&self) -> &str {
        STANDARDIZE
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(T::TYPE)]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(T::TYPE),
            OperatorOutput::required(T::TYPE),
        ]
    }
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 0)?;
        kept_dims(ctx, 1)
    }
    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<BoxedKernel<'a>> {
        let axes: Vec<i64> = kctx
            .get("axes")
            .ok_or_else(|| err(STANDARDIZE, "no axes"))?;
        let eps = kctx.get::<f32>("epsilon").unwrap_or(1e-5) as f64;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let (shape, x) = input::<T>(ctx, 0, STANDARDIZE)?;
            let (rows, len) = row_split(&shape, &axes, STANDARDIZE)?;
            let kept = kept_shape(&shape, axes.len());
            let xh = output::<T>(ctx, 0, shape.clone(), STANDARDIZE)?;
            let inv = output::<T>(ctx, 1, kept, STANDARDIZE)?;
            for_rows(ctx, rows, len, |r| {
                // SAFETY: row r of x̂ and entry r of 1/σ belong to this task alone.
                let (o, s) = unsafe { (xh.rows(r * len, len), inv.rows(r, 1)) };
                s[0] = standardize_row(&x[r * len..(r + 1) * len], eps, o);
            })
        }))
    }
}

impl<T: Float + PrimitiveTensorElementType> Operator for StandardizeGrad<T> {
    type Kernel<'a> = BoxedKernel<'a>;
    fn name(&self) -> &str {
        STANDARDIZE_GRAD
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(T::TYPE),
            OperatorInput::required(T::TYPE),
            OperatorInput::required(T::TYPE),
        ]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::TYPE)]
    }
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 0)
    }
    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<BoxedKernel<'a>> {
        let axes: Vec<i64> = kctx
            .get("axes")
            .ok_or_else(|| err(STANDARDIZE_GRAD, "no axes"))?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let (shape, dxh) = input::<T>(ctx, 0, STANDARDIZE_GRAD)?;
            let (xshape, xh) = input::<T>(ctx, 1, STANDARDIZE_GRAD)?;
            let (_, inv) = input::<T>(ctx, 2, STANDARDIZE_GRAD)?;
            let (rows, len) = row_split(&shape, &axes, STANDARDIZE_GRAD)?;
            if xshape != shape || inv.len() != rows {
                return Err(err(
                    STANDARDIZE_GRAD,
                    format!("dx̂ {shape:?}, x̂ {xshape:?} and {} σ⁻¹ disagree", inv.len()),
                ));
            }
            let dx = output::<T>(ctx, 0, shape.clone(), STANDARDIZE_GRAD)?;
            for_rows(ctx, rows, len, |r| {
                let s = r * len..(r + 1) * len;
                // SAFETY: row r of dx belongs to this task alone.
                let o = unsafe { dx.rows(r * len, len) };
                standardize_grad_row(&dxh[s.clone()], &xh[s], inv[r], o);
            })
        }))
    }
}

impl<T: Float + PrimitiveTensorElementType> Operator for ReluGrad<T> {
    type Kernel<'a> = BoxedKernel<'a>;
    fn name(&self) -> &str {
        RELU_GRAD
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(T::TYPE),
            OperatorInput::required(T::TYPE),
        ]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::TYPE)]
    }
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 0)
    }
    fn create_kernel<'a>(&self, _: &KernelContext<'a>) -> ort::Result<BoxedKernel<'a>> {
        Ok(Box::new(move |ctx: &ComputeContext| {
            let (shape, y) = input::<T>(ctx, 0, RELU_GRAD)?;
            let (dshape, dy) = input::<T>(ctx, 1, RELU_GRAD)?;
            if dshape != shape {
                return Err(err(
                    RELU_GRAD,
                    format!("y {shape:?} and dY {dshape:?} differ"),
                ));
            }
            let out = output::<T>(ctx, 0, shape, RELU_GRAD)?;
            // Stretches of CHUNK elements are the "rows" here.
            const CHUNK: usize = 16_384;
            let n = y.len();
            for_rows(ctx, n.div_ceil(CHUNK), CHUNK, |t| {
                let s = (t * CHUNK).min(n)..((t + 1) * CHUNK).min(n);
                // SAFETY: this stretch of the output belongs to this task alone.
                let o = unsafe { out.rows(s.start, s.len()) };
                relu_grad(&y[s.clone()], &dy[s], o);
            })
        }))
    }
}

struct NormAffine<T>(std::marker::PhantomData<T>);
struct NormAffineGrad<T>(std::marker::PhantomData<T>);

/// Per-channel γ and β of rows `(sample, channel)`: row r is channel `r % C`.
fn channels(rows: usize, scale: usize, bias: usize, node: &str) -> ort::Result<usize> {
    if scale == 0 || rows % scale != 0 || bias != scale {
        return Err(err(
            node,
            format!("{rows} rows do not split into channels of γ ({scale}) and β ({bias})"),
        ));
    }
    Ok(scale)
}

impl<T: Float + PrimitiveTensorElementType> Operator for NormAffine<T> {
    type Kernel<'a> = BoxedKernel<'a>;
    fn name(&self) -> &str {
        NORM_AFFINE
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(T::TYPE),
            OperatorInput::required(T::TYPE),
            OperatorInput::required(T::TYPE),
        ]
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(T::TYPE),
            OperatorOutput::required(T::TYPE),
            OperatorOutput::required(T::TYPE),
        ]
    }
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 0)?;
        kept_dims(ctx, 1)?;
        kept_dims(ctx, 2)
    }
    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<BoxedKernel<'a>> {
        let axes: Vec<i64> = kctx
            .get("axes")
            .ok_or_else(|| err(NORM_AFFINE, "no axes"))?;
        let eps = kctx.get::<f32>("epsilon").unwrap_or(1e-5) as f64;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let (shape, x) = input::<T>(ctx, 0, NORM_AFFINE)?;
            let (_, gamma) = input::<T>(ctx, 1, NORM_AFFINE)?;
            let (_, beta) = input::<T>(ctx, 2, NORM_AFFINE)?;
            let (rows, len) = row_split(&shape, &axes, NORM_AFFINE)?;
            let c = channels(rows, gamma.len(), beta.len(), NORM_AFFINE)?;
            let kept = kept_shape(&shape, axes.len());
            let y = output::<T>(ctx, 0, shape.clone(), NORM_AFFINE)?;
            let mean = output::<T>(ctx, 1, kept.clone(), NORM_AFFINE)?;
            let inv = output::<T>(ctx, 2, kept, NORM_AFFINE)?;
            for_rows(ctx, rows, len, |r| {
                // SAFETY: row r of y and entry r of the statistics belong to this task.
                let (o, m, s) = unsafe { (y.rows(r * len, len), mean.rows(r, 1), inv.rows(r, 1)) };
                let row = &x[r * len..(r + 1) * len];
                (m[0], s[0]) = norm_affine_row(row, eps, gamma[r % c], beta[r % c], o);
            })
        }))
    }
}

impl<T: Float + PrimitiveTensorElementType> Operator for NormAffineGrad<T> {
    type Kernel<'a> = BoxedKernel<'a>;
    fn name(&self) -> &str {
        NORM_AFFINE_GRAD
    }
    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..5).map(|_| OperatorInput::required(T::TYPE))
    }
    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(T::TYPE)]
    }
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        same_as_input(ctx, 0)
    }
    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<BoxedKernel<'a>> {
        let axes: Vec<i64> = kctx
            .get("axes")
            .ok_or_else(|| err(NORM_AFFINE_GRAD, "no axes"))?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let node = NORM_AFFINE_GRAD;
            let (shape, dy) = input::<T>(ctx, 0, node)?;
            let (xshape, x) = input::<T>(ctx, 1, node)?;
            let (_, mean) = input::<T>(ctx, 2, node)?;
            let (_, inv) = input::<T>(ctx, 3, node)?;
            let (_, gamma) = input::<T>(ctx, 4, node)?;
            let (rows, len) = row_split(&shape, &axes, node)?;
            let c = channels(rows, gamma.len(), gamma.len(), node)?;
            if xshape != shape || mean.len() != rows || inv.len() != rows {
                return Err(err(
                    node,
                    format!(
                        "dY {shape:?}, x {xshape:?}, {} means and {} σ⁻¹ disagree",
                        mean.len(),
                        inv.len()
                    ),
                ));
            }
            let dx = output::<T>(ctx, 0, shape.clone(), node)?;
            for_rows(ctx, rows, len, |r| {
                let s = r * len..(r + 1) * len;
                // SAFETY: row r of dx belongs to this task alone.
                let o = unsafe { dx.rows(r * len, len) };
                norm_affine_grad_row(&dy[s.clone()], &x[s], mean[r], inv[r], gamma[r % c], o);
            })
        }))
    }
}

/// The `ai.gradalign` domain with every kernel in f32 and f64.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(Standardize::<f32>(Default::default()))?
        .add(Standardize::<f64>(Default::default()))?
        .add(StandardizeGrad::<f32>(Default::default()))?
        .add(StandardizeGrad::<f64>(Default::default()))?
        .add(NormAffine::<f32>(Default::default()))?
        .add(NormAffine::<f64>(Default::default()))?
        .add(NormAffineGrad::<f32>(Default::default()))?
        .add(NormAffineGrad::<f64>(Default::default()))?
        .add(ReluGrad::<f32>(Default::default()))?
        .add(ReluGrad::<f64>(Default::default()))
}
