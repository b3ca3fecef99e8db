//! The durable results file of `gradalign rank`: one CSV row per model, appended, flushed and
//! fsync'ed as each model finishes, so a run killed at any point can resume — models already in
//! the file are skipped and a torn last line is cut off.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::score::ScoreReport;

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
    Ok(out)
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
}
