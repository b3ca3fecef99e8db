//! Memory-bounded gradients (issue 6): when the N × P per-sample gradients do not fit in
//! `--max-memory`, the probe runs in sample chunks and the parameters in groups, and only what the
//! sign-based scorers need is kept: the packed signs of every per-sample gradient (2 bits per
//! value), the signs of each class's mean gradient, the batch gradient (P f64) and the logits.
//! GradSign and GradAlign are integer sums over columns of these, so their scores are identical
//! to an unbounded run.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use gradalign_plugin_api::PackedSigns;

use crate::autodiff::analysis::Analysis;
use crate::autodiff::builder::{GradGraphBuilder, GraphSpec};
use crate::autodiff::GradOptions;
use crate::inputs::engine::LayoutEntry;
use crate::inputs::memory;
use crate::inputs::probe::Probe;
use crate::onnx::{DType, HostTensor, Model};
use crate::runtime::{self, Backend, Device, OutputData, OutputRef};

/// What a streamed run keeps.
pub struct StreamedGrads {
    pub layout: Vec<LayoutEntry>,
    /// N rows.
    pub signs: PackedSigns,
    /// One row per class present in the labels, ascending.
    pub class_signs: PackedSigns,
    /// Σ_i g_i, P (empty unless asked for).
    pub batch_grads: Vec<f64>,
    /// N × classes.
    pub logits: Vec<f64>,
    pub classes: usize,
    pub runtime: &'static str,
    pub notes: Vec<String>,
    pub phases: Phases,
}

/// Where one model's time went, in seconds: `prepare` = load checks, analysis and gradient-graph
/// building; `session` = runtime session creation; `run` = graph runs; `assemble` = reading the
/// outputs into signs, class sums and the batch gradient.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Phases {
    pub prepare: f64,
    pub session: f64,
    pub run: f64,
    pub assemble: f64,
}

/// Whether the N × P gradient matrix (with one sample's activations) fits `--max-memory`.
pub fn matrix_fits(model: &Model, probe: &Probe, opts: GradOptions) -> Result<bool> {
    let n = probe.len();
    let mut shape = vec![n];
    shape.extend(probe.sample_shape());
    let an = Analysis::new(model, &shape, opts)?;
    let cols: u64 = an
        .selected
        .iter()
        .map(|&i| an.params[i].numel() as u64)
        .sum();
    let elem = if an.float == DType::F64 { 8 } else { 4 };
    let limit = opts.max_memory.unwrap_or_else(memory::default_limit);
    let matrix = (n as u64).saturating_mul(cols).saturating_mul(elem);
    let one = memory::estimate(&an, cols as usize)?.for_batch(1);
    Ok(one.is_some_and(|o| matrix.saturating_add(o) <= limit))
}

pub fn per_sample_signs(
    model: &Model,
    probe: &Probe,
    shipped_probe: bool,
    opts: GradOptions,
    backend: Backend,
    device: Device,
    batch_grads: bool,
) -> Result<StreamedGrads> {
    let n = probe.len();
    let limit = opts.max_memory.unwrap_or_else(memory::default_limit);
    let mut shape = vec![n];
    shape.extend(probe.sample_shape());
    let mut phases = Phases::default();
    let mut clock = std::time::Instant::now();
    let mut lap = move || {
        let now = std::time::Instant::now();
        let secs = (now - clock).as_secs_f64();
        clock = now;
        secs
    };
    let an = Analysis::new(model, &shape, opts)?;
    if shipped_probe {
        crate::inputs::engine::check_classes(an.num_classes)?;
    }
    probe.check_labels(an.num_classes)?;
    let elem: u64 = if an.float == DType::F64 { 8 } else { 4 };
    let sel = an.selected.clone();
    let p: usize = sel.iter().map(|&i| an.params[i].numel()).sum();
    let mut by_class: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for (i, &y) in probe.labels.iter().enumerate() {
        by_class.entry(y).or_default().push(i);
    }
    let class_of: Vec<usize> = {
        let rank: BTreeMap<i64, usize> =
            by_class.keys().enumerate().map(|(k, &y)| (y, k)).collect();
        probe.labels.iter().map(|y| rank[y]).collect()
    };
    let nc = by_class.len();
    let words = p.div_ceil(64) as u64;
    // Kept for the whole run: both sign planes for N samples and the class means, the batch
    // gradient, the probe and logits.
    let kept = (2 * 8 * words * (n + nc) as u64)
        .saturating_add(8 * p as u64)
        .saturating_add((probe.images.len() as u64) * 4 * 2);
    if kept >= limit {
        bail!(
            "even the packed gradient signs ({}) exceed --max-memory {}",
            memory::fmt_bytes(kept),
            memory::fmt_bytes(limit)
        );
    }
    // A twentieth of the limit is left for what the plan does not count (allocator rounding,
    // the runtime's own buffers): --max-memory is a bound on the peak resident memory.
    let budget = (limit - limit / 20).saturating_sub(kept);
    // Each parameter group costs a whole forward and backward pass, a sample chunk only its
    // share of one: so the plan with the fewest groups wins, and among those the largest
    // chunk. A group column costs one gradient value per chunk sample (the runtime's output,
    // read in place), plus a class-sum accumulator per class when the probe runs in several
    // chunks (one chunk's class sums are formed block by block).
    let est = memory::estimate(&an, 0)?;
    let widest = sel.iter().map(|&i| an.params[i].numel()).max().unwrap_or(0) as u64;
    let cols_for = |chunk: usize| -> Option<u64> {
        let act = est.for_batch(chunk)?;
        let class_sums = if chunk < n { 8 * nc as u64 } else { 0 };
        let per_col = elem * chunk as u64 + class_sums;
        let cols = budget.checked_sub(act)? / per_col;
        (cols >= widest.max(1)).then_some(cols)
    };
    let group_params = |cols: u64| -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = vec![];
        let mut width = 0u64;
        for &i in &sel {
            let w = an.params[i].numel() as u64;
            if groups.is_empty() || width + w > cols {
                groups.push(vec![]);
                width = 0;
            }
            groups.last_mut().unwrap().push(i);
            width += w;
        }
        groups
    };
    // Chunks of two or more when they fit: ONNX Runtime's batch-of-one kernels round
    // differently, and chunked results should equal unchunked ones.
    let mut plan: Option<(usize, Vec<Vec<usize>>)> = None;
    let mut chunk = n;
    loop {
        if let Some(cols) = cols_for(chunk) {
            let groups = group_params(cols);
            if plan.as_ref().is_none_or(|(_, g)| groups.len() < g.len()) {
                plan = Some((chunk, groups));
            }
        }
        if chunk <= 2 {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    if plan.is_none() {
        plan = cols_for(1).map(|cols| (1, group_params(cols)));
    }
    let Some((chunk, groups)) = plan else {
        bail!(
            "one probe sample with the largest parameter's gradients needs more than --max-memory {}",
            memory::fmt_bytes(limit)
        )
    };

    let mut layout = vec![];
    let mut offset_of = BTreeMap::new();
    let mut offset = 0;
    for &i in &sel {
        let prm = &an.params[i];
        layout.push(LayoutEntry {
            name: prm.name.clone(),
            op_type: prm.op_type.clone(),
            node: prm.node.clone(),
            shape: prm.shape.clone(),
            offset,
            numel: prm.numel(),
        });
        offset_of.insert(i, offset);
        offset += prm.numel();
    }
    let mut signs = PackedSigns::zeros(n, p);
    let mut class_signs = PackedSigns::zeros(nc, p);
    let mut batch = vec![0.0f64; if batch_grads { p } else { 0 }];
    let mut non_finite = 0;
    let mut logits = vec![];
    let mut classes = 0;
    let mut runtime_name = "none";
    let mut chunk_shape = vec![chunk];
    chunk_shape.extend(probe.sample_shape());
    let images = probe.images_tensor().cast(an.float);
    // One analysis serves both the plan and the graph when the whole probe runs at once.
    let chunked;
    let ga = if chunk == n {
        &an
    } else {
        chunked = Analysis::new(model, &chunk_shape, opts)?;
        &chunked
    };
    for (gi, group) in groups.iter().enumerate() {
        // The backward pass for every selected parameter, outputs for this group only: the
        // same graph (and kernels) for every group, so values equal an unbounded run's.
        let gg = GradGraphBuilder::with_spec(ga, GraphSpec::default())
            .outputs_only(group.clone())
            .build()?;
        phases.prepare += lap();
        let runner = runtime::load(&gg.model, backend, device, ga.float == DType::F64)?;
        runtime_name = runner.name();
        phases.session += lap();
        let gcols: usize = group.iter().map(|&i| an.params[i].numel()).sum();
        let g0 = offset_of[&group[0]];
        // Class sums span the sample chunks only when there are several; one chunk's class
        // sums are formed block by block in a cache-sized buffer instead (the group-wide sums
        // of an 11 M-weight model are 0.9 GB of f64, re-read once per sample).
        let chunks = n.div_ceil(chunk);
        let mut class_sum = vec![0.0f64; if chunks > 1 { nc * gcols } else { 0 }];
        // The graph outputs in order: the logits, then the gradient of every parameter of the
        // group that reaches the loss.
        let targets: Vec<usize> = gg
            .grads
            .iter()
            .zip(group)
            .filter(|(go, _)| go.output.is_some())
            .map(|(_, &pi)| pi)
            .collect();
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let idx: Vec<usize> = (start..start + chunk).map(|i| i.min(end - 1)).collect();
            let ys = probe.labels.select(ndarray::Axis(0), &idx);
            let xs = match &images {
                HostTensor::F32(x) => HostTensor::F32(x.select(ndarray::Axis(0), &idx)),
                HostTensor::F64(x) => HostTensor::F64(x.select(ndarray::Axis(0), &idx)),
                _ => bail!("probe images have an unexpected type"),
            };
            let mut visit = |k: usize, out: OutputRef<'_>| -> Result<()> {
                if k == 0 {
                    phases.run += lap();
                    if gi == 0 {
                        let z = out.to_f64_vec();
                        classes = out.shape.get(1).copied().unwrap_or(0);
                        logits.extend_from_slice(&z[..(end - start) * classes]);
                    }
                    return Ok(());
                }
                let Some(&pi) = targets.get(k - 1) else {
                    bail!("the gradient graph has more outputs than gradients")
                };
                let numel = an.params[pi].numel();
                let col = offset_of[&pi];
                let acc = Accumulate {
                    start,
                    rows: end - start,
                    col,
                    numel,
                    class_of: &class_of,
                    classes: nc,
                    class_off: col - g0,
                    gcols,
                };
                let sinks = Sinks {
                    signs: &mut signs,
                    class_signs: &mut class_signs,
                    class_sum: &mut class_sum,
                    batch: batch_part(&mut batch),
                    non_finite: &mut non_finite,
                };
                match out.data {
                    OutputData::F32(b) => acc.add(part(b, chunk, numel)?, sinks),
                    OutputData::F64(b) => acc.add(part(b, chunk, numel)?, sinks),
                    OutputData::Bool(_) => bail!("gradient output has an unexpected type"),
                }
                Ok(())
            };
            runner.run_visit(&xs, &ys, &mut visit)?;
            phases.assemble += lap();
        }
        if chunks > 1 {
            for c in 0..nc {
                class_signs.set(c, g0, &class_sum[c * gcols..(c + 1) * gcols]);
            }
            // A non-finite value in any sample's gradient makes its class's sum non-finite.
            non_finite += (0..gcols)
                .filter(|&k| (0..nc).any(|c| !class_sum[c * gcols + k].is_finite()))
                .count();
        }
    }
    let mut notes = an.notes.clone();
    let zero = (0..n)
        .filter(|&i| {
            let w = signs.words;
            let row = i * w..(i + 1) * w;
            signs.pos[row.clone()].iter().all(|&b| b == 0) && signs.neg[row].iter().all(|&b| b == 0)
        })
        .count();
    notes.extend(crate::inputs::engine::zero_gradient_warning(zero, n));
    notes.extend(crate::inputs::engine::non_finite_warning(non_finite, p));
    if groups.len() > 1 || chunk < n {
        notes.push(format!(
            "the {n} × {p} gradients exceed --max-memory {}: streamed in {} parameter group(s) × {} \
             sample chunk(s), keeping packed signs only",
            memory::fmt_bytes(limit),
            groups.len(),
            n.div_ceil(chunk)
        ));
    }
    Ok(StreamedGrads {
        layout,
        signs,
        class_signs,
        batch_grads: batch,
        logits,
        classes,
        runtime: runtime_name,
        notes,
        phases,
    })
}

/// The batch-gradient accumulator when one is kept (it is empty otherwise).
fn batch_part(batch: &mut [f64]) -> Option<&mut [f64]> {
    (!batch.is_empty()).then_some(batch)
}

/// The `chunk × numel` gradient block of one output, whatever shape the graph gave it.
fn part<T>(b: &[T], chunk: usize, numel: usize) -> Result<&[T]> {
    if b.len() != chunk * numel {
        bail!(
            "gradient output holds {} values where {chunk} samples × {numel} were expected",
            b.len()
        );
    }
    Ok(b)
}

/// Where one gradient block's values go.
struct Sinks<'a> {
    signs: &'a mut PackedSigns,
    class_signs: &'a mut PackedSigns,
    /// Group-wide class sums when the probe runs in several chunks (empty otherwise).
    class_sum: &'a mut [f64],
    batch: Option<&'a mut [f64]>,
    non_finite: &'a mut usize,
}

/// Where one gradient block of a chunk goes: its rows' sign planes, the class sums and the batch
/// gradient. Generic over the graph's float type so f32 outputs are read in place.
struct Accumulate<'a> {
    start: usize,
    rows: usize,
    col: usize,
    numel: usize,
    class_of: &'a [usize],
    classes: usize,
    class_off: usize,
    gcols: usize,
}

/// Columns summed per class at a time: the classes' partial sums (10 × 2048 f64) stay in cache.
const BLOCK: usize = 2048;

/// Blocks smaller than this are read on one thread (a thread costs more than it saves).
const SPLIT_MIN: usize = 1 << 20;

impl Accumulate<'_> {
    /// The sign planes and the class sums read the same block but write disjoint state, so on
    /// a large block they run side by side (when this session has more than one core: under
    /// `rank --jobs`, the other jobs already use the rest).
    fn add<T: Copy + Into<f64> + Sync>(&self, block: &[T], sinks: Sinks<'_>) {
        let Sinks {
            signs,
            class_signs,
            class_sum,
            batch,
            non_finite,
        } = sinks;
        if block.len() >= SPLIT_MIN && runtime::intra_threads() > 1 {
            std::thread::scope(|s| {
                s.spawn(|| self.pack_signs(block, signs));
                self.sum_classes(block, class_signs, class_sum, batch, non_finite);
            });
        } else {
            self.pack_signs(block, signs);
            self.sum_classes(block, class_signs, class_sum, batch, non_finite);
        }
    }

    fn pack_signs<T: Copy + Into<f64>>(&self, block: &[T], signs: &mut PackedSigns) {
        for (r, row) in block.chunks_exact(self.numel).take(self.rows).enumerate() {
            signs.set(self.start + r, self.col, row);
        }
    }

    fn sum_classes<T: Copy + Into<f64>>(
        &self,
        block: &[T],
        class_signs: &mut PackedSigns,
        class_sum: &mut [f64],
        mut batch: Option<&mut [f64]>,
        non_finite: &mut usize,
    ) {
        let (numel, nc) = (self.numel, self.classes);
        let whole = class_sum.is_empty();
        let mut local = vec![0.0f64; if whole { nc * BLOCK.min(numel) } else { 0 }];
        for b0 in (0..numel).step_by(BLOCK) {
            let w = BLOCK.min(numel - b0);
            // Sums of this block: in `local` (one chunk: complete once the rows are read) or in
            // the group-wide sums (several chunks).
            let (sums, stride, base): (&mut [f64], usize, usize) = if whole {
                local[..nc * w].iter_mut().for_each(|v| *v = 0.0);
                (&mut local[..], w, 0)
            } else {
                (&mut class_sum[..], self.gcols, self.class_off + b0)
            };
            for r in 0..self.rows {
                let row = &block[r * numel + b0..r * numel + b0 + w];
                let i = self.start + r;
                let cs = &mut sums[self.class_of[i] * stride + base..][..w];
                match batch.as_deref_mut() {
                    Some(batch) => {
                        let bs = &mut batch[self.col + b0..self.col + b0 + w];
                        for ((c, b), &v) in cs.iter_mut().zip(bs).zip(row) {
                            let v: f64 = v.into();
                            *c += v;
                            *b += v;
                        }
                    }
                    None => {
                        for (c, &v) in cs.iter_mut().zip(row) {
                            *c += v.into();
                        }
                    }
                }
            }
            if whole {
                for c in 0..nc {
                    class_signs.set(c, self.col + b0, &local[c * w..(c + 1) * w]);
                }
                // A non-finite value in any sample's gradient makes its class's sum non-finite.
                *non_finite += (0..w)
                    .filter(|&k| (0..nc).any(|c| !local[c * w + k].is_finite()))
                    .count();
            }
        }
    }
}
