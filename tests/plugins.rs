//! The dynamic plugin path: built-in scorers loaded from their cdylibs give the same values as
//! the statically linked tables; an out-of-tree plugin builds, loads and scores; broken plugins
//! (other ABI version, panic, NaN, error, undeclared input, not a plugin) give clear messages
//! and leave the other scorers' results intact.

mod common;
use common::score_avg_pool_heavy as score;

use std::path::{Path, PathBuf};
use std::process::Command;

use gradalign::scorers::plugin::Registry;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
/// `target/<profile>/deps`, where cargo puts the cdylibs of (dev-)dependencies.
fn deps() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}
fn lib(name: &str) -> PathBuf {
    let p = deps().join(format!("lib{name}.so"));
    assert!(p.exists(), "{} not built", p.display());
    p
}
fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gradalign-plugins-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn builtin_cdylibs_load_and_equal_the_static_tables() {
    let mut dynamic = Registry::default();
    dynamic.load_library(&lib("gradalign_scorers")).unwrap();
    dynamic.load_library(&lib("gradalign_baselines")).unwrap();
    let stat = Registry::builtin();
    let names = |r: &Registry| r.scorers.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&dynamic), names(&stat));
    assert!(dynamic.scorers[0]
        .origin
        .ends_with("libgradalign_scorers.so"));
    let spec = "gradalign-i,gradalign-ii,gradsign,gradalign-i-cos,grad_norm,snip,zico,params";
    let (a, b) = (score(&dynamic, spec), score(&stat, spec));
    assert!(a.errors.is_empty(), "{:?}", a.errors);
    assert_eq!(
        a.scores, b.scores,
        "dynamic and static tables must agree bit for bit"
    );
}

#[test]
fn faulty_scorers_fail_alone() {
    let mut reg = Registry::builtin();
    reg.load_library(&lib("gradalign_faulty")).unwrap();
    let r = score(
        &reg,
        "gradsign,faulty_panics,faulty_nan,faulty_error,faulty_undeclared,faulty_ok",
    );
    let get = |n: &str| r.scores.iter().find(|(k, _)| k == n).unwrap().1;
    assert!(get("gradsign").unwrap() > 0.0);
    assert_eq!(get("faulty_ok"), Some(10.0));
    for n in [
        "faulty_panics",
        "faulty_nan",
        "faulty_error",
        "faulty_undeclared",
    ] {
        assert_eq!(get(n), None, "{n}");
    }
    let e = |n: &str| r.errors[n].clone();
    assert!(
        e("faulty_panics").contains("panicked: deliberate panic"),
        "{}",
        e("faulty_panics")
    );
    assert!(e("faulty_nan").contains("NaN"), "{}", e("faulty_nan"));
    assert_eq!(e("faulty_error"), "deliberate error");
    assert!(
        e("faulty_undeclared").contains("not provided"),
        "{}",
        e("faulty_undeclared")
    );
}

#[test]
fn other_abi_version_and_non_plugins_are_refused_clearly() {
    let mut reg = Registry::builtin();
    let e = reg
        .load_library(&lib("gradalign_faulty_abi"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ABI version 999") && e.contains("reads versions 2 to 7"),
        "{e}"
    );
    let d = tmpdir("notplugin");
    let junk = d.join("libjunk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    let e = reg.load_library(&junk).unwrap_err().to_string();
    assert!(
        e.contains("libjunk.so") && e.contains("not a loadable shared library"),
        "{e}"
    );
    // A real shared library without the table symbol.
    let other = d.join("libother.so");
    std::fs::copy(lib("gradalign_faulty_abi"), &other).unwrap();
    let e = reg.load_library(&other).unwrap_err().to_string();
    assert!(
        e.contains("exports neither") && e.contains("other_plugin_table"),
        "{e}"
    );
    let e = reg
        .load_library(&d.join("missing.so"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file"), "{e}");
    // Nothing was half-registered: the built-ins are all still there and nothing else.
    assert_eq!(reg.scorers.len(), Registry::builtin().scorers.len());
    std::fs::remove_dir_all(&d).ok();
}

/// Builds `plugins/example` exactly as its README says (its own workspace), into a private
/// target folder.
fn build_example() -> PathBuf {
    let target = deps()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("example-plugin");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--offline", "--manifest-path"])
        .arg(root().join("plugins/example/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release/libgradalign_example_plugin.so")
}

fn cli(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gradalign"));
    c.args(args).env_remove("GRADALIGN_PLUGIN_PATH");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn out_of_tree_example_builds_lists_and_scores() {
    let so = build_example();
    let model = root().join("models/nb201_all_none.onnx");
    let (code, out, err) = cli(&["plugins", "--plugin", so.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("mean_abs_grad"))
        .expect(&out);
    assert!(line.contains("libgradalign_example_plugin.so") && line.contains("per-sample-grads"));
    assert!(out
        .lines()
        .any(|l| l.starts_with("gradalign-ii ") && l.contains("built-in")));

    // Its value equals mean |g| of the gradients `gradalign grads` writes.
    let d = tmpdir("example");
    let g = d.join("g.npy");
    let args = ["--n", "10", "--backend", "tract"];
    let (code, _, err) = cli(
        &[
            &[
                "grads",
                model.to_str().unwrap(),
                "--out",
                g.to_str().unwrap(),
            ][..],
            &args,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let gradalign::onnx::HostTensor::F32(gm) = gradalign::inputs::npy::read(&g).unwrap() else {
        panic!()
    };
    let want = gm.iter().map(|v| v.abs() as f64).sum::<f64>() / gm.len() as f64;
    // Through GRADALIGN_PLUGIN_PATH (a folder) this time.
    let (code, out, err) = cli(
        &[
            &[
                "score",
                model.to_str().unwrap(),
                "--scorer",
                "mean_abs_grad,gradsign",
                "--format",
                "json",
            ][..],
            &args,
        ]
        .concat(),
        &[("GRADALIGN_PLUGIN_PATH", so.parent().unwrap())],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got = v["scores"]["mean_abs_grad"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-12 * want.max(1e-30),
        "{got} vs {want}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn score_cli_reports_plugin_failures_in_json_and_keeps_the_rest() {
    let model = root().join("models/nb201_all_none.onnx");
    let faulty = lib("gradalign_faulty");
    let abi = lib("gradalign_faulty_abi");
    let (code, out, err) = cli(
        &[
            "score",
            model.to_str().unwrap(),
            "--n",
            "10",
            "--backend",
            "tract",
            "--plugin",
            faulty.to_str().unwrap(),
            "--plugin",
            abi.to_str().unwrap(),
            "--scorer",
            "faulty_ok,faulty_panics,faulty_nan,params",
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 2, "some scorers failed: exit status 2\n{err}");
    assert!(err.contains("ABI version 999"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["scores"]["faulty_ok"], 10.0);
    assert_eq!(v["scores"]["params"], 73306.0);
    assert!(v["scores"]["faulty_panics"].is_null() && v["scores"]["faulty_nan"].is_null());
    assert!(v["errors"]["faulty_panics"]
        .as_str()
        .unwrap()
        .contains("panicked"));
    assert!(v["errors"]["faulty_nan"].as_str().unwrap().contains("NaN"));
    // Unknown scorer names list what exists.
    let (code, _, err) = cli(&["score", model.to_str().unwrap(), "--scorer", "nope"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown scorer 'nope'") && err.contains("gradalign-ii"),
        "{err}"
    );
}

/// `--isolate`: a plugin that aborts or segfaults kills only its worker process; the other
/// scorers (built-in and plugin) keep their results, and isolated results equal in-process ones
/// bit for bit. Without `--isolate` the same abort takes the whole process down.
#[test]
fn isolate_survives_aborting_and_segfaulting_plugins() {
    let model = root().join("models/nb201_random_a.onnx");
    let faulty = lib("gradalign_faulty");
    let base = |scorers: &str, isolate: bool| {
        let mut a = vec![
            "score",
            model.to_str().unwrap(),
            "--n",
            "8",
            "--backend",
            "tract",
            "--plugin",
            faulty.to_str().unwrap(),
            "--scorer",
            scorers,
            "--format",
            "json",
        ];
        if isolate {
            a.push("--isolate");
        }
        let a: Vec<String> = a.into_iter().map(String::from).collect();
        let r: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        cli(&r, &[])
    };
    let (code, out, err) = base(
        "gradsign,faulty_ok,faulty_grad_sum,faulty_abort,faulty_segfault,faulty_panics",
        true,
    );
    assert_eq!(code, 2, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["scores"]["faulty_ok"], 8.0);
    assert!(v["scores"]["gradsign"].as_f64().unwrap() > 0.0);
    let e = |k: &str| v["errors"][k].as_str().unwrap_or("").to_string();
    assert!(
        e("faulty_abort").contains("SIGABRT"),
        "{}",
        e("faulty_abort")
    );
    assert!(
        e("faulty_segfault").contains("SIGSEGV"),
        "{}",
        e("faulty_segfault")
    );
    assert!(
        e("faulty_panics").contains("panicked"),
        "{}",
        e("faulty_panics")
    );

    let (code, inproc, err) = base("gradsign,faulty_grad_sum", false);
    assert_eq!(code, 0, "{err}");
    let w: serde_json::Value = serde_json::from_str(&inproc).unwrap();
    assert_eq!(
        v["scores"]["faulty_grad_sum"].as_f64().unwrap().to_bits(),
        w["scores"]["faulty_grad_sum"].as_f64().unwrap().to_bits()
    );
    assert_eq!(v["scores"]["gradsign"], w["scores"]["gradsign"]);

    // In process, the abort is the end of everything.
    let out = Command::new(env!("CARGO_BIN_EXE_gradalign"))
        .args([
            "score",
            model.to_str().unwrap(),
            "--n",
            "8",
            "--backend",
            "tract",
        ])
        .arg("--plugin")
        .arg(&faulty)
        .args(["--scorer", "gradsign,faulty_abort"])
        .env_remove("GRADALIGN_PLUGIN_PATH")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(6), "SIGABRT without --isolate");
}
