//! `--isolate`: external scorers run in a child process (`gradalign __scorer-worker`), so a
//! plugin that aborts or segfaults costs only its own result. The parent sends the scorer's
//! declared inputs over the child's stdin in a small little-endian format and reads
//! `ok <f64 bits>` or `err <message>` back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Result};
use gradalign_plugin_api::abi::inputs as flag;

use super::inputs::{InputData, ParamMeta};
use super::{Registry, ScorerInfo};
use crate::inputs::passes::{FeatureLayer, FeatureMaps};
use crate::onnx::HostTensor;

/// The hidden subcommand the worker runs as.
pub const WORKER_COMMAND: &str = "__scorer-worker";

struct W(Vec<u8>);

impl W {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn f64s(&mut self, v: &[f64]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn u64s(&mut self, v: &[u64]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn opt_f64s(&mut self, v: &Option<Vec<f64>>, on: bool) {
        match v {
            Some(v) if on => {
                self.u64(1);
                self.f64s(v);
            }
            _ => self.u64(0),
        }
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            bail!("truncated worker input");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }
    fn len(&mut self, elem: usize) -> Result<usize> {
        let n = self.u64()? as usize;
        if n.saturating_mul(elem) > self.0.len() {
            bail!("truncated worker input");
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.len(1)?;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String> {
        Ok(String::from_utf8(self.bytes()?)?)
    }
    fn f64s(&mut self) -> Result<Vec<f64>> {
        let n = self.len(8)?;
        let b = self.take(n * 8)?;
        Ok(b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    fn u64s(&mut self) -> Result<Vec<u64>> {
        let n = self.len(8)?;
        let b = self.take(n * 8)?;
        Ok(b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }
    fn opt_f64s(&mut self) -> Result<Option<Vec<f64>>> {
        Ok(if self.u64()? == 1 {
            Some(self.f64s()?)
        } else {
            None
        })
    }
}

/// The inputs `flags` declares, encoded.
pub fn encode(d: &InputData, flags: u64) -> Vec<u8> {
    let has = |f: u64| flags & f != 0;
    let mut w = W(vec![]);
    w.u64(d.n as u64);
    w.u64(d.classes as u64);
    w.u64(d.params.len() as u64);
    for p in &d.params {
        w.str(&p.name);
        w.str(&p.node);
        w.str(&p.op_type);
        w.u64(p.role as u64);
        w.u64(p.shape.len() as u64);
        for &s in &p.shape {
            w.u64(s as u64);
        }
        w.u64(p.channel_axis as u64);
        w.u64(p.offset as u64);
        w.u64(p.numel as u64);
    }
    match &d.grads {
        Some(HostTensor::F32(a)) if has(flag::PER_SAMPLE_GRADS) => {
            w.u64(1);
            w.u64(a.shape()[0] as u64);
            w.u64(a.shape()[1] as u64);
            let mut b = Vec::with_capacity(a.len() * 4);
            for x in a.iter() {
                b.extend_from_slice(&x.to_le_bytes());
            }
            w.bytes(&b);
        }
        Some(HostTensor::F64(a)) if has(flag::PER_SAMPLE_GRADS) => {
            w.u64(2);
            w.u64(a.shape()[0] as u64);
            w.u64(a.shape()[1] as u64);
            w.f64s(a.as_slice().expect("standard layout"));
        }
        _ => w.u64(0),
    }
    w.opt_f64s(&d.param_values, has(flag::PARAM_VALUES));
    w.opt_f64s(&d.batch_grads, has(flag::BATCH_GRADS));
    w.u64(d.labels.len() as u64);
    for &l in &d.labels {
        w.u64(l as u64);
    }
    w.opt_f64s(&d.logits, has(flag::LOGITS));
    match &d.relu_codes {
        Some((c, u)) if has(flag::RELU_CODES) => {
            w.u64(1);
            w.bytes(c);
            w.u64(*u as u64);
        }
        _ => w.u64(0),
    }
    match &d.input_jacobian {
        Some((j, n)) if has(flag::INPUT_JACOBIAN) => {
            w.u64(1);
            w.f64s(j);
            w.u64(*n as u64);
        }
        _ => w.u64(0),
    }
    w.opt_f64s(&d.synflow_grads, has(flag::SYNFLOW_GRADS));
    w.opt_f64s(&d.hessian_grad_product, has(flag::HESSIAN_GRAD_PRODUCT));
    w.0.extend_from_slice(&d.model_params.to_le_bytes());
    w.0.extend_from_slice(&d.model_flops.to_le_bytes());
    match &d.signs {
        Some((s, c)) if has(flag::SIGNS) => {
            w.u64(1);
            for p in [s, c] {
                w.u64(p.rows as u64);
                w.u64(p.cols as u64);
                w.u64s(&p.pos);
                w.u64s(&p.neg);
            }
        }
        _ => w.u64(0),
    }
    match &d.feature_maps {
        Some(f) if has(flag::FEATURE_MAPS) || has(flag::FEATURE_COVARIANCE) => {
            w.u64(1);
            w.opt_f64s(&f.data, has(flag::FEATURE_MAPS));
            w.opt_f64s(&f.covariance, has(flag::FEATURE_COVARIANCE));
            w.u64(f.units as u64);
            w.u64(f.layers.len() as u64);
            for l in &f.layers {
                w.str(&l.node);
                w.u64(l.channels as u64);
                w.u64(l.spatial as u64);
                w.u64(l.offset as u64);
                w.u64(u64::from(l.live));
            }
        }
        _ => w.u64(0),
    }
    match &d.logit_jacobian {
        Some(j) if has(flag::LOGIT_JACOBIAN) => {
            w.u64(1);
            w.u64(j.classes as u64);
            w.u64(j.tensors as u64);
            w.f64s(&j.data);
            w.f64s(&j.logits);
            for name in &j.names {
                w.str(name);
            }
        }
        _ => w.u64(0),
    }
    match &d.block_jacobian {
        Some(b) if has(flag::BLOCK_JACOBIAN) => {
            w.u64(1);
            w.f64s(&b.data);
            w.u64(b.pairs.len() as u64);
            for (p, (from, to)) in b.pairs.iter().zip(&b.names) {
                w.u64s(&[p.rows, p.cols, p.offset, p.identity]);
                w.str(from);
                w.str(to);
            }
        }
        _ => w.u64(0),
    }
    w.0
}

pub fn decode(b: &[u8]) -> Result<InputData> {
    let mut r = R(b);
    let mut d = InputData {
        n: r.u64()? as usize,
        classes: r.u64()? as usize,
        ..Default::default()
    };
    let np = r.len(8)?;
    for _ in 0..np {
        let (name, node, op_type) = (r.str()?, r.str()?, r.str()?);
        let role = r.u64()? as u32;
        let nd = r.len(8)?;
        let shape = (0..nd)
            .map(|_| r.u64().map(|v| v as usize))
            .collect::<Result<_>>()?;
        d.params.push(ParamMeta {
            name,
            node,
            op_type,
            role,
            shape,
            channel_axis: r.u64()? as i64,
            offset: r.u64()? as usize,
            numel: r.u64()? as usize,
        });
    }
    d.grads = match r.u64()? {
        0 => None,
        tag => {
            let (rows, cols) = (r.u64()? as usize, r.u64()? as usize);
            let shape = ndarray::IxDyn(&[rows, cols]);
            Some(if tag == 1 {
                let b = r.bytes()?;
                let v: Vec<f32> = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                HostTensor::F32(ndarray::ArrayD::from_shape_vec(shape, v)?)
            } else {
                HostTensor::F64(ndarray::ArrayD::from_shape_vec(shape, r.f64s()?)?)
            })
        }
    };
    d.param_values = r.opt_f64s()?;
    d.batch_grads = r.opt_f64s()?;
    let nl = r.len(8)?;
    d.labels = (0..nl)
        .map(|_| r.u64().map(|v| v as i64))
        .collect::<Result<_>>()?;
    d.logits = r.opt_f64s()?;
    if r.u64()? == 1 {
        let c = r.bytes()?;
        d.relu_codes = Some((c, r.u64()? as usize));
    }
    if r.u64()? == 1 {
        let j = r.f64s()?;
        d.input_jacobian = Some((j, r.u64()? as usize));
    }
    d.synflow_grads = r.opt_f64s()?;
    d.hessian_grad_product = r.opt_f64s()?;
    d.model_params = f64::from_bits(r.u64()?);
    d.model_flops = f64::from_bits(r.u64()?);
    if r.u64()? == 1 {
        let mut planes = vec![];
        for _ in 0..2 {
            let (rows, cols) = (r.u64()? as usize, r.u64()? as usize);
            let (pos, neg) = (r.u64s()?, r.u64s()?);
            let words = cols.div_ceil(64);
            if pos.len() != rows * words || neg.len() != rows * words {
                bail!("sign planes of the wrong size");
            }
            planes.push(gradalign_plugin_api::PackedSigns {
                pos,
                neg,
                rows,
                words,
                cols,
            });
        }
        let c = planes.pop().unwrap();
        d.signs = Some((planes.pop().unwrap(), c));
    }
    if r.u64()? == 1 {
        let data = r.opt_f64s()?;
        let covariance = r.opt_f64s()?;
        let units = r.u64()? as usize;
        let nl = r.len(40)?;
        let mut layers = vec![];
        for _ in 0..nl {
            let node = r.str()?;
            let (channels, spatial, offset) =
                (r.u64()? as usize, r.u64()? as usize, r.u64()? as usize);
            let live = r.u64()? != 0;
            if offset.saturating_add(channels.saturating_mul(spatial)) > units {
                bail!("feature layer {node} outside its row");
            }
            layers.push(FeatureLayer {
                node,
                channels,
                spatial,
                offset,
                live,
            });
        }
        if data
            .as_ref()
            .is_some_and(|v| v.len() != d.n.saturating_mul(units))
        {
            bail!("feature maps of the wrong size");
        }
        let cov_len: usize = layers
            .iter()
            .map(|l| l.channels.saturating_mul(l.channels))
            .fold(0, usize::saturating_add);
        if covariance.as_ref().is_some_and(|v| v.len() != cov_len) {
            bail!("feature covariance of the wrong size");
        }
        d.feature_maps = Some(FeatureMaps {
            data,
            units,
            layers,
            covariance,
        });
    }
    if r.u64()? == 1 {
        let classes = r.u64()? as usize;
        let tensors = r.len(8)?;
        let data = r.f64s()?;
        let logits = r.f64s()?;
        let names = (0..tensors).map(|_| r.str()).collect::<Result<Vec<_>>>()?;
        if data.len() != d.n.saturating_mul(classes).saturating_mul(tensors)
            || logits.len() != d.n.saturating_mul(classes)
        {
            bail!("logit Jacobian of the wrong size");
        }
        d.logit_jacobian = Some(crate::inputs::jacobian::LogitJacobian {
            data,
            logits,
            classes,
            tensors,
            names,
            runtime: "",
        });
    }
    if r.u64()? == 1 {
        let data = r.f64s()?;
        let count = r.len(32)?;
        let mut b = crate::inputs::block_jacobian::BlockJacobian {
            data,
            ..Default::default()
        };
        for _ in 0..count {
            let v = r.u64s()?;
            let &[rows, cols, offset, identity] = v.as_slice() else {
                bail!("block pair of {} fields", v.len());
            };
            let end = offset.saturating_add(rows.saturating_mul(cols));
            if end > b.data.len() as u64 {
                bail!("block pair outside the block Jacobian data");
            }
            b.pairs.push(crate::inputs::block_jacobian::BlockPair {
                rows,
                cols,
                offset,
                identity,
            });
            b.names.push((r.str()?, r.str()?));
        }
        d.block_jacobian = Some(b);
    }
    Ok(d)
}

/// A host that is not the `gradalign` executable (the Python extension, inside `python3`)
/// names the program that runs [`worker_main`], and the arguments before the worker's own.
static WORKER: std::sync::OnceLock<(PathBuf, Vec<std::ffi::OsString>)> = std::sync::OnceLock::new();

/// Sets the worker program for this process (first call wins): the worker is started as
/// `program args… __scorer-worker LIBRARY SCORER FLAGS`.
pub fn set_worker_program(program: PathBuf, args: Vec<std::ffi::OsString>) {
    let _ = WORKER.set((program, args));
}

/// The program the worker runs as, with its leading arguments: `GRADALIGN_BIN`, else the one
/// set by [`set_worker_program`], else this executable.
fn worker_exe() -> Result<(PathBuf, Vec<std::ffi::OsString>)> {
    if let Some(p) = std::env::var_os("GRADALIGN_BIN") {
        return Ok((PathBuf::from(p), vec![]));
    }
    if let Some(w) = WORKER.get() {
        return Ok(w.clone());
    }
    Ok((std::env::current_exe()?, vec![]))
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        _ => "signal",
    }
}

/// Run external scorer `s` on `d` in a child process.
pub fn call_isolated(s: &ScorerInfo, d: &InputData) -> std::result::Result<f64, String> {
    let run = || -> Result<std::result::Result<f64, String>> {
        let lib = s
            .library
            .as_ref()
            .ok_or_else(|| anyhow!("built-in scorers run in process"))?;
        let (program, leading) = worker_exe()?;
        let mut child = Command::new(program)
            .args(leading)
            .arg(WORKER_COMMAND)
            .arg(lib)
            .arg(&s.name)
            .arg(s.inputs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let payload = encode(d, s.inputs);
        let mut stdin = child.stdin.take().expect("piped");
        // A worker that dies early closes the pipe: the status below says why.
        let writer = std::thread::spawn(move || stdin.write_all(&payload));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(bits) = stdout.strip_prefix("ok ") {
            return Ok(Ok(f64::from_bits(bits.trim().parse()?)));
        }
        if let Some(msg) = stdout.strip_prefix("err ") {
            return Ok(Err(msg.trim_end().to_string()));
        }
        use std::os::unix::process::ExitStatusExt;
        let how = match out.status.signal() {
            Some(sig) => format!("was killed by {} ({sig})", signal_name(sig)),
            None => format!("exited with {}", out.status),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        Ok(Err(format!(
            "the isolated worker process for this scorer {how}{}; only this scorer's result is lost",
            if tail.is_empty() {
                String::new()
            } else {
                format!(" ({tail})")
            }
        )))
    };
    run().unwrap_or_else(|e| Err(format!("could not run the isolated worker: {e:#}")))
}

/// The worker's side: `__scorer-worker LIBRARY SCORER FLAGS`, inputs on stdin.
pub fn worker_main(lib: &Path, name: &str, flags: u64) -> i32 {
    let res = (|| -> Result<std::result::Result<f64, String>> {
        let mut buf = vec![];
        std::io::stdin().read_to_end(&mut buf)?;
        let d = decode(&buf)?;
        let mut reg = Registry::default();
        reg.load_library(lib)?;
        let s = reg
            .scorers
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("{}: no scorer '{name}'", lib.display()))?;
        let raw = d.raw();
        Ok(s.call(&super::inputs::masked(&raw.inputs, flags)))
    })();
    match res {
        Ok(Ok(v)) => println!("ok {}", v.to_bits()),
        Ok(Err(e)) => println!("err {e}"),
        Err(e) => println!("err {e:#}"),
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_round_trip() {
        let d = InputData {
            n: 2,
            classes: 3,
            params: vec![ParamMeta {
                name: "w".into(),
                node: "conv".into(),
                op_type: "Conv".into(),
                role: 1,
                shape: vec![1, 2],
                channel_axis: 0,
                offset: 0,
                numel: 2,
            }],
            grads: Some(HostTensor::F32(
                ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2]), vec![1., -2., 3., 4.5])
                    .unwrap(),
            )),
            param_values: Some(vec![0.5, -0.25]),
            labels: vec![0, 2],
            relu_codes: Some((vec![1, 0, 0, 1], 2)),
            feature_maps: Some(FeatureMaps {
                data: Some(vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0]),
                units: 3,
                layers: vec![FeatureLayer {
                    node: "conv".into(),
                    channels: 3,
                    spatial: 1,
                    offset: 0,
                    live: false,
                }],
                covariance: Some((0..9).map(f64::from).collect()),
            }),
            logit_jacobian: Some(crate::inputs::jacobian::LogitJacobian {
                data: (0..12).map(f64::from).collect(),
                logits: vec![0.5; 6],
                classes: 3,
                tensors: 2,
                names: vec!["w".into(), "b".into()],
                runtime: "",
            }),
            block_jacobian: Some(crate::inputs::block_jacobian::BlockJacobian {
                data: (0..8).map(f64::from).collect(),
                pairs: vec![crate::inputs::block_jacobian::BlockPair {
                    rows: 4,
                    cols: 2,
                    offset: 0,
                    identity: 1,
                }],
                names: vec![("a".into(), "b".into())],
                runtime: "",
            }),
            model_params: 2.0,
            model_flops: f64::NAN,
            ..Default::default()
        };
        let all = u64::MAX;
        let e = decode(&encode(&d, all)).unwrap();
        assert_eq!(e.params[0].shape, vec![1, 2]);
        assert_eq!(
            e.grads.as_ref().unwrap().to_f64_vec(),
            vec![1., -2., 3., 4.5]
        );
        assert_eq!(e.param_values, d.param_values);
        assert_eq!(e.labels, d.labels);
        assert_eq!(e.relu_codes, d.relu_codes);
        assert_eq!(e.feature_maps, d.feature_maps);
        assert_eq!(e.logit_jacobian, d.logit_jacobian);
        assert_eq!(e.block_jacobian, d.block_jacobian);
        // The covariance travels without the maps when only it was declared.
        let cov = decode(&encode(&d, flag::FEATURE_COVARIANCE)).unwrap();
        let f = cov.feature_maps.unwrap();
        assert!(f.data.is_none() && !f.layers[0].live);
        assert_eq!(f.covariance, d.feature_maps.as_ref().unwrap().covariance);
        assert!(e.model_flops.is_nan());
        // Undeclared inputs are not sent.
        let only_labels = decode(&encode(&d, flag::LABELS)).unwrap();
        assert!(only_labels.grads.is_none() && only_labels.param_values.is_none());
        assert!(only_labels.logit_jacobian.is_none());
        assert!(only_labels.block_jacobian.is_none());
        assert!(decode(&encode(&d, all)[..20]).is_err());
    }
}
