//! The durable results file of `gradalign rank`: one CSV row per model, appended, flushed and
//! fsync'ed as each model finishes, so a run killed at any point can resume — models already in
//! the file are skipped and a torn last line is cut off.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::scorers::score::ScoreReport;

pub fn header(scorers: &[String]) -> String {
    let mut h = vec!["model".to_string()];
    h.extend(scorers.iter().cloned());
    h.extend(["error".to_string(), "seconds".to_string()]);
    h.join(",")
}

/// CSV field quoting (RFC 4180): quote when needed, double inner quotes, no newlines kept.
pub fn csv_field(s: &str) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.contains([',', '"']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Splits one CSV line (as written by `csv_field`).
pub fn split_csv(line: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Formats a score so that it reads back to the same f64.
pub fn fmt_score(v: Option<f64>) -> String {
    v.map(|v| format!("{v:?}")).unwrap_or_default()
}

pub struct ResultsFile {
    path: PathBuf,
    file: File,
    pub done: HashSet<String>,
}

impl ResultsFile {
    /// Opens (or creates) `path` for the given header; returns the models already recorded.
    pub fn open(path: &Path, header: &str) -> Result<ResultsFile> {
        let mut done = HashSet::new();
        if path.exists() {
            let text =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            // Everything after the last newline is a row torn by a kill: drop it.
            let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if complete < text.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot repair {}", path.display()))?;
                f.set_len(complete as u64)?;
                f.sync_all()?;
            }
            let text = String::from_utf8_lossy(&text[..complete]);
            let mut lines = text.lines();
            match lines.next() {
                Some(h) if h == header => {}
                Some(h) => bail!(
                    "{} holds results for other columns ({h}); pass the same --scorer list as \
                     before or another --out",
                    path.display()
                ),
                None => {}
            }
            for line in lines {
                if let Some(model) = split_csv(line).into_iter().next() {
                    done.insert(model);
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {} for appending", path.display()))?;
        // One writer per results file: a second `rank` on the same file (a duplicated job, a
        // replacement pod started before the old one died) would interleave rows.
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
            bail!(
                "another process is writing {} (a second `gradalign rank` with the same --out?); \
                 wait for it or pass another --out",
                path.display()
            );
        }
        if file.metadata()?.len() == 0 {
            writeln!(file, "{header}")?;
            file.sync_all()?;
        }
        Ok(ResultsFile {
            path: path.to_path_buf(),
            file,
            done,
        })
    }

    /// Appends one row in a single write, then fsyncs.
    pub fn append(
        &mut self,
        model: &str,
        scorers: &[String],
        result: &Result<ScoreReport>,
        seconds: f64,
    ) -> Result<()> {
        let mut fields = vec![csv_field(model)];
        match result {
            Ok(r) => {
                for name in scorers {
                    let v = r
                        .scores
                        .iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, v)| *v);
                    fields.push(fmt_score(v));
                }
                // Warnings share the error column: the scores stand, but must not be read
                // without them.
                let errs: Vec<String> = r
                    .errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .chain(r.warnings().iter().map(|w| format!("warning: {w}")))
                    .collect();
                fields.push(csv_field(&errs.join("; ")));
            }
            Err(e) => {
                fields.extend(scorers.iter().map(|_| String::new()));
                fields.push(csv_field(&format!("{e:#}")));
            }
        }
        fields.push(format!("{seconds:.3}"));
        let line = fields.join(",") + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.done.insert(model.to_string());
        Ok(())
    }
}

/// `.onnx` files named directly or found (recursively, sorted) under named directories.
pub fn collect_models(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "onnx") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = vec![];
    for a in args {
        if a.is_dir() {
            walk(a, &mut out)?;
        } else if a.is_file() {
            out.push(a.clone());
        } else {
            bail!("{}: no such file or directory", a.display());
        }
    }
    // A model named twice (a file and its folder) is scored once.
    let mut seen = HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// One slice of a sweep split across machines, as in `cargo nextest --partition`:
/// - `I/N` (or `hash:I/N`): the models whose key (the path as written in the results file)
///   hashes to `I` modulo `N`. A model's shard depends on its own key only, never on the rest of
///   the list, so it is the same on every machine and in every rerun even when models are added
///   while the sweep runs; shard sizes vary by about ±√(M/N).
/// - `count:I/N`: every N-th model of the sorted list, starting at the I-th: sizes differ by at
///   most one, but a model's shard moves when the list changes, so every task must see the same
///   list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    pub by_count: bool,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let bad = || {
            format!(
                "'{s}': expected I/N, hash:I/N or count:I/N with 0 <= I < N, e.g. 0/4 \
                 (Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
            )
        };
        let (by_count, spec) = match s.split_once(':') {
            Some(("hash", rest)) => (false, rest),
            Some(("count", rest)) => (true, rest),
            Some(_) => return Err(bad()),
            None => (false, s),
        };
        let (i, n) = spec.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard {
            index,
            count,
            by_count,
        })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.by_count { "count" } else { "hash" };
        write!(f, "{kind}:{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The keys of `keys` this shard scores, in their given order.
    pub fn select<'a>(&self, keys: &'a [String]) -> Vec<&'a String> {
        if self.by_count {
            let mut sorted: Vec<&String> = keys.iter().collect();
            sorted.sort();
            sorted.dedup();
            let mine: std::collections::HashSet<&String> = sorted
                .into_iter()
                .skip(self.index)
                .step_by(self.count)
                .collect();
            keys.iter().filter(|k| mine.contains(k)).collect()
        } else {
            keys.iter()
                .filter(|k| shard_hash(k) % self.count as u64 == self.index as u64)
                .collect()
        }
    }
}

/// FNV-1a over the key's bytes, then the splitmix64 finaliser so that every bit of the hash
/// depends on every byte (plain FNV's low bits are weak for `% N`). Fixed forever: changing it
/// would reassign models between shards of a sweep in progress.
pub fn shard_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The shard results files of one sweep, checked and combined.
#[derive(Debug)]
pub struct Merged {
    pub header: String,
    /// (model key, CSV line without its newline), sorted by key.
    pub rows: Vec<(String, String)>,
    /// Rows whose error column holds an error and whose scores are all empty.
    pub failed: usize,
    /// Shard files whose last line was torn by a kill; the torn row is not merged (the shard,
    /// rerun, scores that model again).
    pub torn: Vec<PathBuf>,
}

/// For shard files named as the job scripts name them (`shard-I-of-N.csv`, one N), the
/// indices of the missing ones: a task that never started leaves no file to merge.
pub fn missing_shard_files(shards: &[PathBuf]) -> Option<(usize, Vec<usize>)> {
    let mut n0 = None;
    let mut have = HashSet::new();
    for p in shards {
        let name = p.file_name()?.to_str()?;
        let rest = name.strip_prefix("shard-")?.strip_suffix(".csv")?;
        let (i, n) = rest.split_once("-of-")?;
        let (i, n): (usize, usize) = (i.parse().ok()?, n.parse().ok()?);
        if *n0.get_or_insert(n) != n {
            return None;
        }
        have.insert(i);
    }
    let n = n0?;
    Some((n, (0..n).filter(|i| !have.contains(i)).collect()))
}

/// Reads every shard file: the headers must agree (same scorer list), every row must have the
/// header's number of fields, and no model may appear twice — in one file or across files —
/// since that means the shards overlapped (different N, or one file passed twice).
pub fn merge(shards: &[PathBuf]) -> Result<Merged> {
    if shards.is_empty() {
        bail!("no shard files given");
    }
    let mut header: Option<(String, &Path)> = None;
    let mut seen: std::collections::HashMap<String, (PathBuf, usize)> = Default::default();
    let mut rows = vec![];
    let mut torn = vec![];
    let mut failed = 0;
    for path in shards {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            torn.push(path.clone());
        }
        let text = std::str::from_utf8(&bytes[..complete])
            .with_context(|| format!("{}: not a UTF-8 results file", path.display()))?;
        let mut lines = text.lines();
        let Some(h) = lines.next() else {
            bail!(
                "{}: empty file (no header): not a `gradalign rank` results file",
                path.display()
            );
        };
        if !h.starts_with("model,") || !h.ends_with(",error,seconds") {
            bail!(
                "{}: header '{h}' is not a `gradalign rank` results header",
                path.display()
            );
        }
        match &header {
            None => header = Some((h.to_string(), path)),
            Some((h0, p0)) if h0 != h => bail!(
                "{} has columns '{h}' but {} has '{h0}': the shards were scored with different \
                 --scorer lists; rerun them with the same list",
                path.display(),
                p0.display()
            ),
            Some(_) => {}
        }
        let width = split_csv(h).len();
        for (i, line) in lines.enumerate() {
            let lineno = i + 2;
            let fields = split_csv(line);
            if fields.len() != width {
                bail!(
                    "{}:{lineno}: {} fields where the header has {width}",
                    path.display(),
                    fields.len()
                );
            }
            let key = fields[0].clone();
            if let Some((p0, l0)) = seen.get(&key) {
                if p0 == path {
                    bail!(
                        "model '{key}' appears twice in {} (lines {l0} and {lineno}): two \
                         processes wrote that file at once",
                        path.display()
                    );
                }
                bail!(
                    "model '{key}' appears twice: {}:{l0} and {}:{lineno}; shards must not \
                     overlap (same N in every --shard I/N, each file passed once)",
                    p0.display(),
                    path.display()
                );
            }
            seen.insert(key.clone(), (path.clone(), lineno));
            let scores = &fields[1..width - 2];
            if scores.iter().all(|v| v.is_empty()) && !fields[width - 2].is_empty() {
                failed += 1;
            }
            rows.push((key, line.to_string()));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Merged {
        header: header.map(|(h, _)| h).unwrap_or_default(),
        rows,
        failed,
        torn,
    })
}

impl Merged {
    /// Writes the merged file whole (temporary file, fsync, rename): a reader never sees half
    /// of it.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut text = self.header.clone() + "\n";
        for (_, line) in &self.rows {
            text += line;
            text.push('\n');
        }
        let tmp = out.with_extension("csv.partial");
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip() {
        let f = ["a,b", "say \"hi\"", "plain"].map(csv_field).join(",");
        assert_eq!(split_csv(&f), vec!["a,b", "say \"hi\"", "plain"]);
        assert_eq!(
            fmt_score(Some(0.1 + 0.2)).parse::<f64>().unwrap(),
            0.1 + 0.2
        );
    }

    #[test]
    fn torn_last_line_is_dropped_and_done_models_read() {
        let dir = std::env::temp_dir().join(format!("ga-rank-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.csv");
        let h = header(&["s".into()]);
        std::fs::write(&p, format!("{h}\nm1.onnx,1.0,,0.1\nm2.onnx,2.")).unwrap();
        let r = ResultsFile::open(&p, &h).unwrap();
        assert!(r.done.contains("m1.onnx") && !r.done.contains("m2.onnx"));
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{h}\nm1.onnx,1.0,,0.1\n")
        );
        assert!(ResultsFile::open(&p, "model,other,error,seconds").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shards_partition_every_model_exactly_once() {
        let keys: Vec<String> = (0..1000)
            .map(|i| format!("models/arch-{i:05}.onnx"))
            .collect();
        for n in [1, 2, 4, 7] {
            for kind in ["hash", "count"] {
                let mut owner = std::collections::HashMap::new();
                let mut sizes = vec![];
                for i in 0..n {
                    let sh: Shard = format!("{kind}:{i}/{n}").parse().unwrap();
                    let mine = sh.select(&keys);
                    sizes.push(mine.len() as f64);
                    for k in mine {
                        assert!(
                            owner.insert(k.clone(), i).is_none(),
                            "{k} in two {kind} shards"
                        );
                    }
                }
                assert_eq!(owner.len(), keys.len(), "{kind}/{n}: a model in no shard");
                let mean = 1000.0 / n as f64;
                let tol = if kind == "count" {
                    1.0
                } else {
                    // Within sampling noise of a uniform hash (±5σ).
                    5.0 * (mean * (1.0 - 1.0 / n as f64)).sqrt() + 1e-9
                };
                assert!(
                    sizes.iter().all(|s| (s - mean).abs() <= tol),
                    "{kind}/{n}: {sizes:?}"
                );
            }
        }
        // A hash shard does not depend on the rest of the list.
        let sh: Shard = "1/4".parse().unwrap();
        let some: Vec<String> = keys[..10].to_vec();
        let from_some: Vec<&String> = sh.select(&some);
        let from_all: Vec<&String> = sh
            .select(&keys)
            .into_iter()
            .filter(|k| some.contains(k))
            .collect();
        assert_eq!(from_some, from_all);
        // Pinned (independently computed): a change of hash would reassign the models of a
        // sweep in progress.
        assert_eq!(shard_hash("models/arch-00000.onnx"), 0x281c_32cc_0da0_ee6e);
        assert_eq!(shard_hash("models/arch-00001.onnx"), 0xdb37_abca_9644_f015);
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_refuses_overlaps_and_mismatched_columns() {
        let dir = std::env::temp_dir().join(format!("ga-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let h = header(&["s".into()]);
        let a = dir.join("a.csv");
        let b = dir.join("b.csv");
        std::fs::write(
            &a,
            format!("{h}\nm2.onnx,2.0,,0.1\nm9.onnx,,\"load: bad, file\",0.0\n"),
        )
        .unwrap();
        std::fs::write(&b, format!("{h}\nm1.onnx,1.0,,0.1\nm3.onnx,3.")).unwrap();
        let m = merge(&[a.clone(), b.clone()]).unwrap();
        let keys: Vec<&str> = m.rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(keys, ["m1.onnx", "m2.onnx", "m9.onnx"]);
        assert_eq!((m.failed, m.torn.clone()), (1, vec![b.clone()]));
        let out = dir.join("all.csv");
        m.write(&out).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            format!("{h}\nm1.onnx,1.0,,0.1\nm2.onnx,2.0,,0.1\nm9.onnx,,\"load: bad, file\",0.0\n")
        );
        let e = merge(&[a.clone(), a.clone()]).unwrap_err().to_string();
        assert!(e.contains("appears twice") && e.contains("m2.onnx"), "{e}");
        let c = dir.join("c.csv");
        std::fs::write(&c, format!("{}\nm5.onnx,1.0,,0.1\n", header(&["t".into()]))).unwrap();
        let e = merge(&[a.clone(), c]).unwrap_err().to_string();
        assert!(e.contains("different") && e.contains("--scorer"), "{e}");
        let d = dir.join("d.csv");
        std::fs::write(&d, format!("{h}\nm7.onnx,1.0\n")).unwrap();
        let e = merge(&[d]).unwrap_err().to_string();
        assert!(e.contains("d.csv:2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
