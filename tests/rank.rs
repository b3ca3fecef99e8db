//! `gradalign rank`: durable, resumable results. A run over 22 models is SIGKILLed part-way and
//! restarted; every model must then appear exactly once, with no torn rows. A broken model is
//! recorded with its error while the others are scored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rank(dir: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradalign"));
    c.args(["rank"])
        .arg(dir)
        .args([
            "--n",
            "10",
            "--backend",
            "tract",
            "--scorer",
            "gradsign,params",
            "--out",
        ])
        .arg(out);
    c
}

fn rows(out: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(out).unwrap();
    assert!(text.ends_with('\n'), "torn last row: {text:?}");
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "model,gradsign,params,error,seconds");
    lines.map(gradalign::results::rank::split_csv).collect()
}

#[test]
fn sigkill_half_way_then_resume_gives_every_model_exactly_once() {
    let d = std::env::temp_dir().join(format!("gradalign-rank-{}", std::process::id()));
    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let src = [
        root().join("models/nb201_all_none.onnx"),
        root().join("models/nb201_avg_pool_heavy.onnx"),
    ];
    for k in 0..21 {
        std::fs::copy(&src[k % 2], models.join(format!("m{k:02}.onnx"))).unwrap();
    }
    std::fs::write(models.join("m21_broken.onnx"), b"garbage").unwrap();
    let out = d.join("results.csv");

    let mut child = rank(&models, &out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(&out)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n >= 1 + 6 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "rank made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "rank finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = rows(&out).len();
    assert!(before >= 6 && before < 22, "killed after {before} rows");

    let res = rank(&models, &out).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(
        res.status.code(),
        Some(2),
        "one model is broken: exit 2\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("resuming: {before} of 22")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.lines().next().unwrap().contains("gradsign"),
        "{stdout}"
    );

    let rows = rows(&out);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        assert_eq!(r.len(), 5, "{r:?}");
        *seen.entry(r[0].clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 22);
    assert!(seen.values().all(|&c| c == 1), "{seen:?}");
    for r in &rows {
        if r[0].ends_with("m21_broken.onnx") {
            assert!(r[1].is_empty() && r[3].contains("m21_broken.onnx"), "{r:?}");
        } else {
            assert!(r[1].parse::<f64>().is_ok(), "{r:?}");
            let params: f64 = r[2].parse().unwrap();
            assert!(params == 73306.0 || params == 101306.0, "{r:?}");
            // The all-`none` cell passes no gradient to any weight: its zero scores carry the
            // warning beside them; the healthy model's row has none.
            if params == 73306.0 {
                assert_eq!(r[1], "0.0", "{r:?}");
                assert!(
                    r[3].starts_with("warning: 10 of 10 per-sample gradients are exactly zero"),
                    "{r:?}"
                );
            } else {
                assert!(r[3].is_empty(), "{r:?}");
            }
        }
    }
    // A third run has nothing left to do and changes nothing.
    let res = rank(&models, &out).output().unwrap();
    assert_eq!(res.status.code(), Some(0));
    assert_eq!(self::rows(&out), rows);
    std::fs::remove_dir_all(&d).ok();
}

/// A sweep split three ways and merged holds every model exactly once with the values of one
/// unsharded run; `merge --models` reports a missing shard, and overlapping shards are refused.
#[test]
fn sharded_sweep_merges_to_the_unsharded_result() {
    let d = std::env::temp_dir().join(format!("gradalign-shard-{}", std::process::id()));
    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let src = [
        root().join("models/nb201_all_none.onnx"),
        root().join("models/nb201_avg_pool_heavy.onnx"),
    ];
    for k in 0..9 {
        std::fs::copy(&src[k % 2], models.join(format!("m{k}.onnx"))).unwrap();
    }
    std::fs::write(models.join("m9_broken.onnx"), b"garbage").unwrap();
    let whole = d.join("whole.csv");
    assert_eq!(
        rank(&models, &whole).output().unwrap().status.code(),
        Some(2)
    );

    let drop_seconds = |rows: Vec<Vec<String>>| -> Vec<Vec<String>> {
        rows.into_iter()
            .map(|mut r| {
                r.pop();
                r
            })
            .collect()
    };
    for kind in ["hash", "count"] {
        let mut shards = vec![];
        let mut sizes = vec![];
        for i in 0..3 {
            let out = d.join(format!("{kind}-{i}.csv"));
            let res = rank(&models, &out)
                .args(["--shard", &format!("{kind}:{i}/3")])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&res.stderr);
            let n: usize = stderr
                .split(&format!("shard {kind}:{i}/3: "))
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("{stderr}"));
            assert_eq!(rows(&out).len(), n, "{stderr}");
            sizes.push(n);
            shards.push(out);
        }
        assert_eq!(sizes.iter().sum::<usize>(), 10, "{kind}: {sizes:?}");
        if kind == "count" {
            assert_eq!(sizes, [4, 3, 3]);
        }
        let merged = d.join(format!("{kind}-merged.csv"));
        let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
            .arg("merge")
            .arg(&merged)
            .args(&shards)
            .arg("--models")
            .arg(&models)
            .output()
            .unwrap();
        assert_eq!(
            res.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let mut want = drop_seconds(rows(&whole));
        want.sort();
        assert_eq!(drop_seconds(rows(&merged)), want, "{kind}");

        // Without one shard, --models names what is missing and the exit status is 2. Hash
        // shards of a temp folder's paths can be empty, so leave out the largest one.
        let gone = (0..3).max_by_key(|&k| sizes[k]).unwrap();
        let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
            .arg("merge")
            .arg(d.join(format!("partial-{kind}.csv")))
            .args(
                shards
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| k != gone)
                    .map(|(_, s)| s),
            )
            .arg("--models")
            .arg(&models)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("{} model(s) are in no shard", sizes[gone])),
            "{stderr}"
        );
    }
    // The same shard twice: refused, nothing written.
    let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("merge")
        .arg(d.join("dup.csv"))
        .arg(d.join("count-0.csv"))
        .arg(d.join("count-0.csv"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("appears twice"), "{stderr}");
    assert!(!d.join("dup.csv").exists());
    // Forgetting the output name would overwrite a shard: refused, the shard untouched.
    let before = std::fs::read(d.join("count-0.csv")).unwrap();
    let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("merge")
        .arg(d.join("count-0.csv"))
        .arg(d.join("count-1.csv"))
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&res.stderr).contains("exists"));
    assert_eq!(std::fs::read(d.join("count-0.csv")).unwrap(), before);
    std::fs::remove_dir_all(&d).ok();
}

/// `rank --ensemble`: the members are scored with the rest, RESULTS.ensemble.csv holds
/// Σ_members ln(rank / M) (recomputed here from the results CSV), the failed model has no
/// ensemble score and a note, and `merge --ensemble` over shards gives the same file.
#[test]
fn ensemble_is_the_log_rank_sum_of_its_members() {
    let d = std::env::temp_dir().join(format!("gradalign-ensemble-{}", std::process::id()));
    let models = d.join("models");
    std::fs::create_dir_all(&models).unwrap();
    for f in [
        "nb201_all_none",
        "nb201_avg_pool_heavy",
        "nb201_random_a",
        "nb201_resnet_like",
    ] {
        std::fs::copy(
            root().join(format!("models/{f}.onnx")),
            models.join(format!("{f}.onnx")),
        )
        .unwrap();
    }
    std::fs::write(models.join("zz_broken.onnx"), b"garbage").unwrap();
    let run = |extra: &[&str], out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_gradalign"))
            .arg("rank")
            .arg(&models)
            .args(["--n", "10", "--backend", "tract"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = d.join("results.csv");
    let res = run(
        &["--scorer", "gradsign", "--ensemble", "params,gradsign,swap"],
        &out,
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert_eq!(
        res.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        "model,gradsign,params,swap,error,seconds"
    );
    let rows: Vec<Vec<String>> = lines.map(gradalign::results::rank::split_csv).collect();
    let val = |r: &Vec<String>, c: usize| r[c].parse::<f64>().ok();
    let ok: Vec<&Vec<String>> = rows.iter().filter(|r| val(r, 1).is_some()).collect();
    assert_eq!(ok.len(), 4);
    let m = ok.len() as f64;
    let rank_of = |c: usize, x: f64| {
        let below = ok.iter().filter(|r| val(r, c).unwrap() < x).count() as f64;
        let equal = ok.iter().filter(|r| val(r, c).unwrap() == x).count() as f64;
        below + (equal + 1.0) / 2.0
    };
    let ens_text = std::fs::read_to_string(d.join("results.ensemble.csv")).unwrap();
    let mut ens = ens_text.lines();
    assert_eq!(
        ens.next().unwrap(),
        "model,ensemble,rank:params,rank:gradsign,rank:swap,note"
    );
    let ens: HashMap<String, Vec<String>> = ens
        .map(gradalign::results::rank::split_csv)
        .map(|r| (r[0].clone(), r))
        .collect();
    assert_eq!(ens.len(), 5);
    let mut best = (f64::NEG_INFINITY, String::new());
    for r in &ok {
        // Columns of the results file: gradsign 1, params 2, swap 3; members params, gradsign, swap.
        let want: f64 = [2, 1, 3]
            .iter()
            .map(|&c| (rank_of(c, val(r, c).unwrap()) / m).ln())
            .sum();
        let got: f64 = ens[&r[0]][1].parse().unwrap();
        assert!((got - want).abs() < 1e-12, "{}: {got} vs {want}", r[0]);
        if got > best.0 {
            best = (got, r[0].clone());
        }
    }
    let broken = ens.iter().find(|(k, _)| k.contains("zz_broken")).unwrap().1;
    assert_eq!(broken[1], "");
    assert_eq!(broken[5], "member params has no value");
    // The printed table is sorted by the ensemble: its first row is the best model.
    let first = stdout.lines().nth(1).unwrap();
    assert!(first.contains(&best.1), "{stdout}");

    // merge --ensemble over two count shards: the same ensemble file.
    let mut shards = vec![];
    for i in 0..2 {
        let s = d.join(format!("shard-{i}.csv"));
        run(
            &[
                "--scorer",
                "gradsign,params,swap",
                "--shard",
                &format!("count:{i}/2"),
            ],
            &s,
        );
        shards.push(s);
    }
    let merged = d.join("merged.csv");
    let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("merge")
        .arg(&merged)
        .args(&shards)
        .args(["--ensemble", "params,gradsign,swap"])
        .output()
        .unwrap();
    assert_eq!(
        res.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let mut a: Vec<String> = ens_text.lines().map(str::to_string).collect();
    let mut b: Vec<String> = std::fs::read_to_string(d.join("merged.ensemble.csv"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    // A member the results file does not hold: an error naming it, exit 1.
    let res = Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .arg("merge")
        .arg(d.join("merged2.csv"))
        .args(&shards)
        .args(["--ensemble", "params,naswot"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no column 'naswot'"), "{stderr}");
    std::fs::remove_dir_all(&d).ok();
}
