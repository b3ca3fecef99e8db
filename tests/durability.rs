//! Reliability (issue 6): `rank` survives SIGKILL at random moments — every model exactly once,
//! no torn rows, the same values as an uninterrupted run — and results are bit-identical across
//! runs and across `--jobs`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const SCORERS: &str = "gradsign,gradalign-ii,naswot,params";

fn rank(models: &Path, out: &Path, jobs: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradalign"));
    c.arg("rank")
        .arg(models)
        .args([
            "--n",
            "8",
            "--backend",
            "tract",
            "--scorer",
            SCORERS,
            "--jobs",
        ])
        .arg(jobs.to_string())
        .arg("--out")
        .arg(out);
    c
}

/// model → score columns (the timing column dropped), checking the file is whole.
fn table(out: &Path) -> HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(out).unwrap();
    assert!(text.ends_with('\n'), "torn last row: {text:?}");
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("model,{},error,seconds", SCORERS)
    );
    let mut t = HashMap::new();
    for l in lines {
        let r = gradalign::results::rank::split_csv(l);
        assert_eq!(r.len(), 7, "{l}");
        assert!(
            t.insert(r[0].clone(), r[1..6].to_vec()).is_none(),
            "{} appears twice",
            r[0]
        );
    }
    t
}

/// `n` small NB201 networks (C = 4, one cell per stage), each with its own cell and weights,
/// so that a row landing on the wrong model would show.
fn setup(tag: &str, n: usize) -> (PathBuf, PathBuf) {
    use prost::Message;
    let d = std::env::temp_dir().join(format!("gradalign-{tag}-{}", std::process::id()));
    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let ops = [
        "none",
        "skip_connect",
        "nor_conv_1x1",
        "nor_conv_3x3",
        "avg_pool_3x3",
    ];
    for k in 0..n {
        let op = |e: usize| ops[(k * 7 + e * 3 + k / 5) % 5];
        let arch = format!(
            "|{}~0|+|{}~0|{}~1|+|{}~0|{}~1|{}~2|",
            op(0),
            op(1),
            op(2),
            op(3),
            op(4),
            op(5)
        );
        let proto = gradalign::tools::zoo::nb201_model(&arch, 1000 + k as u64, 4, 1).unwrap();
        std::fs::write(models.join(format!("m{k:02}.onnx")), proto.encode_to_vec()).unwrap();
    }
    (d, models)
}

#[test]
fn random_sigkills_lose_nothing_and_duplicate_nothing() {
    let (d, models) = setup("kills", 12);
    let reference = d.join("reference.csv");
    let t0 = Instant::now();
    let s = rank(&models, &reference, 1).output().unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let full = t0.elapsed();
    let want = table(&reference);
    assert_eq!(want.len(), 12);
    let distinct: std::collections::HashSet<&Vec<String>> = want.values().collect();
    assert!(distinct.len() >= 10, "the models should score differently");

    // A fixed pseudo-random schedule of kill moments, tied to progress rather than to the wall
    // clock (a loaded CI machine makes wall-clock schedules miss): wait until the results file
    // holds `r` rows (r in 0..12), then a further random fraction of one model's time, then
    // SIGKILL — sometimes twice in a row, with 1 or 2 jobs.
    let per_model = full / 12;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let rows = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| t.matches('\n').count().saturating_sub(1))
            .unwrap_or(0)
    };
    let (mut kills, mut interrupted) = (0, 0);
    for trial in 0..24 {
        let out = d.join(format!("trial{trial}.csv"));
        let jobs = 1 + (trial % 2);
        for _ in 0..1 + (next() % 2) {
            let target_rows = (next() % 12) as usize;
            let jitter = per_model.mul_f64((next() % 1000) as f64 / 1000.0);
            let mut child = rank(&models, &out, jobs)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            while rows(&out) < target_rows && child.try_wait().unwrap().is_none() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            std::thread::sleep(jitter);
            kills += 1;
            if child.try_wait().unwrap().is_none() {
                interrupted += 1;
            }
            child.kill().ok(); // SIGKILL
            child.wait().unwrap();
        }
        let res = rank(&models, &out, jobs).output().unwrap();
        assert!(
            res.status.success(),
            "trial {trial}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let got = table(&out);
        assert_eq!(got.len(), 12, "trial {trial}");
        for (m, v) in &want {
            assert_eq!(got.get(m), Some(v), "trial {trial}: {m}");
        }
    }
    println!("{interrupted} of {kills} kills hit a running process");
    assert!(
        interrupted >= 15 && 2 * interrupted >= kills,
        "only {interrupted} of {kills} kills hit a running process"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn scores_are_bit_identical_across_runs_and_jobs() {
    let (d, models) = setup("determinism", 6);
    let mut tables = vec![];
    for (k, jobs) in [1, 1, 3].iter().enumerate() {
        let out = d.join(format!("run{k}.csv"));
        let s = rank(&models, &out, *jobs).output().unwrap();
        assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
        tables.push(table(&out));
    }
    assert_eq!(tables[0], tables[1], "two runs differ");
    assert_eq!(tables[0], tables[2], "--jobs 3 differs from --jobs 1");

    // An NB201 fixture through `score` with every kind of input, twice per backend.
    for backend in ["tract", "ort"] {
        if backend == "ort" && !gradalign::runtime::ort::available() {
            common::skip("ORT part: ONNX Runtime library not found (cargo xtask fetch-ort)");
            continue;
        }
        let run = || {
            let o = Command::new(env!("CARGO_BIN_EXE_gradalign"))
                .arg("score")
                .arg(root().join("models/nb201_random_b.onnx"))
                .args(["--n", "16", "--format", "json", "--backend", backend])
                .args([
                    "--scorer",
                    "gradalign-i,gradalign-ii,gradsign,naswot,linear_regions,jacob_cov,synflow,fisher,zico",
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            // Everything but the measurements (timings, peak memory) must be identical.
            let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            v.as_object_mut().unwrap().remove("seconds").unwrap();
            v.as_object_mut().unwrap().remove("peak_rss_mib").unwrap();
            v
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b, "{backend}");
    }
    std::fs::remove_dir_all(&d).ok();
}
