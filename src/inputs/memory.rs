//! Memory bounds (issue 6): an upper estimate of what a training graph needs, checked against
//! `--max-memory` before anything large is allocated, and the probe chunk size that fits.
//!
//! The estimate is 2 × (every tensor of the lowered forward graph) — the backward pass keeps the
//! forward activations and creates gradients of the same sizes — plus the N × P gradient
//! outputs, the weights three times (model, analysis, runtime) and a fixed process base. Sample-axis tensors scale with the batch, so a smaller batch (a chunk of the probe)
//! needs proportionally less.

use anyhow::{bail, Result};

use crate::autodiff::analysis::Analysis;
use crate::autodiff::Kind;

/// Resident memory of the process before any model: code, ONNX Runtime or tract, buffers.
pub const BASE_BYTES: u64 = 48 << 20;

/// Parse `4G`, `512M`, `1.5GiB`, `2048K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--max-memory '{s}': expected a size such as 4G or 512M"))?;
    let mult = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("--max-memory '{s}': unknown unit '{unit}' (use K, M, G or T)"),
    };
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        bail!("--max-memory '{s}': out of range");
    }
    Ok(bytes as u64)
}

/// Peak resident memory of this process in MiB (`VmHWM`), where the OS reports it (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

/// Three quarters of the memory this process may use: physical memory (Linux
/// `/proc/meminfo`), or the cgroup's limit when smaller (a container's or a Slurm/Kubernetes
/// job's memory limit, cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`), else 16 GiB.
pub fn default_limit() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    let physical = total.map(|kb| kb * 1024);
    let available = match (physical, cgroup_limit()) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    };
    available.map_or(16 << 30, |b| b / 4 * 3)
}

/// This process's cgroup memory limit, if one is set.
fn cgroup_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cgroup.lines() {
        // v2: "0::/path"; v1: "N:memory:/path" (or a list of controllers including memory).
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let file = if controllers.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else {
            continue;
        };
        let v = std::fs::read_to_string(&file)
            .or_else(|_| {
                // Inside a container the cgroup's own files are mounted at the root.
                let name = file.rsplit('/').next().unwrap_or_default();
                std::fs::read_to_string(if controllers.is_empty() {
                    format!("/sys/fs/cgroup/{name}")
                } else {
                    format!("/sys/fs/cgroup/memory/{name}")
                })
            })
            .ok()?;
        // "max" (v2) or a huge number (v1) mean no limit.
        return v.trim().parse::<u64>().ok().filter(|&b| b < 1 << 60);
    }
    None
}

pub fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// The estimate for the analysed batch, split into what scales with the batch and what does not.
#[derive(Clone, Debug)]
pub struct Estimate {
    /// Bytes per probe sample (activations and, with gradients, one gradient row).
    pub per_sample: u64,
    /// Bytes independent of the batch (parameter-only tensors).
    pub fixed: u64,
    /// The largest tensor: name, shape, bytes (for messages).
    pub largest: (String, Vec<usize>, u64),
}

impl Estimate {
    pub fn for_batch(&self, n: usize) -> Option<u64> {
        self.per_sample
            .checked_mul(n as u64)?
            .checked_add(self.fixed)
    }
}

/// Estimate the memory of the training graph of `an`, with `grad_columns` gradient columns per
/// sample. Fails only when a tensor's size overflows 64 bits.
pub fn estimate(an: &Analysis, grad_columns: usize) -> Result<Estimate> {
    let elem = if an.float == crate::onnx::DType::F64 {
        8
    } else {
        4
    };
    let mut per_batch: u64 = 0;
    let mut fixed: u64 = 0;
    let mut largest = (String::new(), vec![], 0u64);
    for (name, info) in &an.infos {
        if info.value.is_some() {
            continue;
        }
        let bytes = info
            .shape
            .iter()
            .try_fold(elem as u64, |a, &d| a.checked_mul(d as u64));
        let Some(bytes) = bytes else {
            bail!(
                "tensor '{name}' has shape {:?}, whose size overflows 64 bits",
                info.shape
            );
        };
        if bytes > largest.2 {
            largest = (name.clone(), info.shape.clone(), bytes);
        }
        let slot = if info.kind == Kind::Batched {
            &mut per_batch
        } else {
            &mut fixed
        };
        *slot = slot.saturating_add(bytes.saturating_mul(2));
    }
    // The process itself (code, runtime libraries) and the weights held three times over: the
    // loaded model, the analysis' copy and the runtime session's.
    let weights: u64 = an
        .params
        .iter()
        .map(|p| p.numel() as u64 * elem as u64)
        .sum();
    fixed = fixed
        .saturating_add(BASE_BYTES)
        .saturating_add(weights.saturating_mul(3));
    let per_sample = (per_batch / an.n.max(1) as u64)
        .saturating_add((grad_columns as u64).saturating_mul(elem as u64));
    Ok(Estimate {
        per_sample,
        fixed,
        largest,
    })
}

/// The largest batch (≤ n) whose estimate fits in `limit`, or an error naming the largest tensor.
pub fn batch_that_fits(an: &Analysis, grad_columns: usize, limit: u64) -> Result<usize> {
    let e = estimate(an, grad_columns)?;
    let fits = |k: usize| e.for_batch(k).is_some_and(|b| b <= limit);
    if fits(an.n) {
        return Ok(an.n);
    }
    if !fits(1) {
        let (name, shape, bytes) = &e.largest;
        bail!(
            "the training graph needs an estimated {} even for one probe sample (largest tensor \
             '{name}', shape {shape:?} for N = {}, {}), more than --max-memory {}; raise \
             --max-memory or use a smaller model/input",
            e.for_batch(1)
                .map_or("more than 2^64 bytes".into(), fmt_bytes),
            an.n,
            fmt_bytes(*bytes),
            fmt_bytes(limit)
        );
    }
    let per = e.per_sample.max(1);
    let k = (((limit - e.fixed) / per) as usize).clamp(1, an.n);
    // ONNX Runtime picks other kernels for a batch of one, whose last bits differ: keep chunks
    // of two or more whenever they fit, so chunked results equal unchunked ones.
    Ok(if k == 1 && an.n >= 2 && fits(2) { 2 } else { k })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2048").unwrap(), 2048);
        assert!(parse_size("4Q").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("").is_err());
        assert!(default_limit() > 1 << 28);
    }
}
