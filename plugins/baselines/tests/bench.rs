//! Timing of every baseline formula on inputs of NB201 size at N = 64 (per-sample gradients
//! 64 × 368,432, ReLU codes 64 × 100,000, input Jacobian 64 × 3072). Ignored by default:
//!
//! ```text
//! cargo test --release -p gradalign-baselines --test bench -- --ignored --nocapture
//! ```

use std::time::Instant;

use gradalign_baselines::math;
use gradalign_plugin_api::abi::role;
use gradalign_plugin_api::{Matrix, Param};

const N: usize = 64;
const P: usize = 368_432;
const UNITS: usize = 100_000;
const D: usize = 3072;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn param(
    name: &str,
    node: &str,
    r: u32,
    shape: &[usize],
    offset: usize,
    axis: Option<usize>,
) -> Param {
    Param {
        name: name.into(),
        node: node.into(),
        op_type: if shape.len() == 2 { "Gemm" } else { "Conv" }.into(),
        role: r,
        shape: shape.to_vec(),
        channel_axis: axis,
        offset,
        numel: shape.iter().product(),
    }
}

/// An NB201-like layout: stem, 3×3 convs of 16/32/64 channels each followed by BatchNorm, 1×1
/// reduction convs, the classifier and a filler block, P columns in all.
fn nb201_params() -> Vec<Param> {
    let mut ps = Vec::new();
    let mut off = 0;
    let mut push =
        |ps: &mut Vec<Param>, name: String, node: &str, r: u32, shape: &[usize], axis| {
            let p = param(&name, node, r, shape, off, axis);
            off += p.numel;
            ps.push(p);
        };
    push(
        &mut ps,
        "stem.w".into(),
        "stem",
        role::WEIGHT,
        &[16, 3, 3, 3],
        Some(0),
    );
    push(
        &mut ps,
        "stem.bn.w".into(),
        "stem.bn",
        role::OTHER,
        &[16],
        None,
    );
    push(
        &mut ps,
        "stem.bn.b".into(),
        "stem.bn",
        role::OTHER,
        &[16],
        None,
    );
    for (c, count) in [(16, 6), (32, 9), (64, 7)] {
        for k in 0..count {
            let node = format!("conv{c}_{k}");
            push(
                &mut ps,
                format!("{node}.w"),
                &node,
                role::WEIGHT,
                &[c, c, 3, 3],
                Some(0),
            );
            push(
                &mut ps,
                format!("{node}.bn.w"),
                &format!("{node}.bn"),
                role::OTHER,
                &[c],
                None,
            );
            push(
                &mut ps,
                format!("{node}.bn.b"),
                &format!("{node}.bn"),
                role::OTHER,
                &[c],
                None,
            );
        }
        if c > 16 {
            let node = format!("reduce{c}");
            push(
                &mut ps,
                format!("{node}.w"),
                &node,
                role::WEIGHT,
                &[c, c / 2, 1, 1],
                Some(0),
            );
        }
    }
    push(
        &mut ps,
        "fc.w".into(),
        "fc",
        role::WEIGHT,
        &[10, 64],
        Some(0),
    );
    push(&mut ps, "fc.b".into(), "fc", role::BIAS, &[10], None);
    let used: usize = ps.iter().map(|p| p.numel).sum();
    assert!(used <= P);
    push(
        &mut ps,
        "filler".into(),
        "filler",
        role::OTHER,
        &[P - used],
        None,
    );
    ps
}

fn time<R>(name: &str, reps: usize, mut f: impl FnMut() -> R) -> R {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    println!("{name:<24} {:>10.2} ms", best * 1e3);
    out.unwrap()
}

#[test]
#[ignore]
fn bench_baselines() {
    let mut rng = Rng(42);
    let params = nb201_params();
    let grads32: Vec<f32> = (0..N * P)
        .map(|_| {
            let v = rng.uniform();
            if v.abs() < 0.1 {
                0.0
            } else {
                (v * 1e-3) as f32
            }
        })
        .collect();
    let grads64: Vec<f64> = grads32.iter().map(|&v| v as f64).collect();
    let values: Vec<f64> = (0..P).map(|_| rng.uniform() * 0.1).collect();
    let batch: Vec<f64> = (0..P)
        .map(|j| (0..N).map(|i| grads32[i * P + j] as f64).sum())
        .collect();
    let codes: Vec<u8> = (0..N * UNITS).map(|_| (rng.next() >> 63) as u8).collect();
    let jac: Vec<f64> = (0..N * D).map(|_| rng.uniform()).collect();
    let g32 = Matrix {
        data: &grads32[..],
        rows: N,
        cols: P,
    };
    let g64 = Matrix {
        data: &grads64[..],
        rows: N,
        cols: P,
    };
    let c = Matrix {
        data: &codes[..],
        rows: N,
        cols: UNITS,
    };
    let j = Matrix {
        data: &jac[..],
        rows: N,
        cols: D,
    };
    let reps = 3;
    println!("N = {N}, P = {P}, units = {UNITS}, D = {D}; best of {reps}");
    let r = [
        time("grad_norm", reps, || math::grad_norm(&params, &batch)),
        time("snip", reps, || math::snip(&params, &values, &batch)),
        time("grasp", reps, || math::grasp(&params, &values, &batch)),
        time("fisher (f32)", reps, || {
            math::fisher(&params, &values, g32).unwrap()
        }),
        time("fisher (f64)", reps, || {
            math::fisher(&params, &values, g64).unwrap()
        }),
        time("zico (f32)", reps, || math::zico(&params, g32)),
        time("zico (f64)", reps, || math::zico(&params, g64)),
        time("ntk_cond (f32)", reps, || math::ntk_cond(g32).unwrap()),
        time("ntk_cond (f64)", reps, || math::ntk_cond(g64).unwrap()),
        time("naswot", reps, || math::naswot(c)),
        time("linear_regions", reps, || math::linear_regions(c)),
        time("jacob_cov", reps, || math::jacob_cov(j).unwrap()),
    ];
    println!("scores: {r:?}");

    // The fast Gram matrix and the textbook loop (the former ntk_cond) against the exact
    // value: f32 products are exact in f64, and a compensated (TwoSum) sum of them is exact to
    // within about one rounding of the result.
    let fast = gradalign_plugin_api::linalg::gram_rows(&grads32, N, P);
    let mut exact = vec![0.0f64; N * N];
    let mut textbook = vec![0.0f64; N * N];
    for a in 0..N {
        for b in a..N {
            let (mut s, mut comp, mut plain) = (0.0f64, 0.0f64, 0.0f64);
            for (&x, &y) in g32.row(a).iter().zip(g32.row(b)) {
                let p = x as f64 * y as f64;
                plain += p;
                let t = s + p;
                comp += if s.abs() >= p.abs() {
                    (s - t) + p
                } else {
                    (p - t) + s
                };
                s = t;
            }
            exact[a * N + b] = s + comp;
            textbook[a * N + b] = plain;
        }
    }
    let worst = |k: &[f64]| {
        let (mut scaled, mut rel) = (0.0f64, 0.0f64);
        for a in 0..N {
            for b in a..N {
                let (got, want) = (k[a * N + b], exact[a * N + b]);
                let scale = (exact[a * N + a] * exact[b * N + b]).sqrt();
                scaled = scaled.max((got - want).abs() / scale);
                rel = rel.max((got - want).abs() / want.abs());
            }
        }
        (scaled, rel)
    };
    let (mut vs_old_scaled, mut vs_old_rel) = (0.0f64, 0.0f64);
    for a in 0..N {
        for b in a..N {
            let (got, want) = (fast[a * N + b], textbook[a * N + b]);
            let scale = (textbook[a * N + a] * textbook[b * N + b]).sqrt();
            vs_old_scaled = vs_old_scaled.max((got - want).abs() / scale);
            vs_old_rel = vs_old_rel.max((got - want).abs() / want.abs());
        }
    }
    for (name, k) in [("fast (gram_rows)", &fast), ("textbook loop", &textbook)] {
        let (scaled, rel) = worst(k);
        println!(
            "Gram {name:<17} vs exact: max |diff|/sqrt(K_aa K_bb) = {scaled:.2e}, max |diff|/|K_ab| = {rel:.2e}"
        );
    }
    println!(
        "Gram fast vs textbook:          max |diff|/sqrt(K_aa K_bb) = {vs_old_scaled:.2e}, max |diff|/|K_ab| = {vs_old_rel:.2e}"
    );
}
