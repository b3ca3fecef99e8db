//! Plugins written in C: one against today's header (ABI 3: user_data, init, teardown, the size
//! and layout asserts of the header) and one as an ABI-2 plugin was built. Both are compiled here
//! with the system C compiler, loaded, and must give GradSign's built-in value exactly.

mod common;
use common::score_avg_pool_heavy as score;

use std::path::{Path, PathBuf};
use std::process::Command;

use gradalign::scorers::plugin::Registry;
use gradalign::scorers::score::ScoreReport;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh folder, removed when the test ends (also on panic).
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("gradalign-c-plugin-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Compiles one fixture into `lib<stem>.so` with `cc` (`CC` overrides), warnings as errors.
fn compile(dir: &Path, source: &str, stem: &str, defines: &[&str]) -> PathBuf {
    let out = dir.join(format!("lib{stem}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let res = Command::new(&cc)
        .args([
            "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
        ])
        .args(defines.iter().map(|d| format!("-D{d}")))
        .arg("-I")
        .arg(root().join("plugins/api/include"))
        .arg(root().join("tests/fixtures/c_plugin").join(source))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC): {e}"));
    assert!(
        res.status.success(),
        "{source} does not compile:\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    out
}

fn value(r: &ScoreReport, name: &str) -> f64 {
    r.scores
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{name}: no score ({:?})", r.errors))
}

#[test]
fn abi3_c_plugin_scores_with_user_data_init_and_teardown() {
    let d = TempDir::new("abi3");
    let lib = compile(&d.0, "gradsign_abi3.c", "gradsign_c", &[]);
    let marker = d.0.join("teardown.txt");
    // Read by the plugin's init (the test binary runs its tests in threads; this variable is
    // only read by this plugin).
    std::env::set_var("GA_C_PLUGIN_TEARDOWN_MARKER", &marker);
    let mut reg = Registry::builtin();
    reg.load_library(&lib).unwrap();
    let r = score(&reg, "gradsign,gradsign-c");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(value(&r, "gradsign-c"), value(&r, "gradsign"));
    assert!(!marker.exists(), "teardown ran while the plugin was loaded");
    drop(reg);
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "torn down",
        "teardown must run once the registry is gone"
    );
}

#[test]
fn abi2_c_plugin_still_loads_and_scores() {
    let d = TempDir::new("abi2");
    let lib = compile(&d.0, "gradsign_abi2.c", "gradsign_abi2", &[]);
    let mut reg = Registry::builtin();
    reg.load_library(&lib).unwrap();
    let r = score(&reg, "gradsign,gradsign-abi2");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(value(&r, "gradsign-abi2"), value(&r, "gradsign"));
}

#[test]
fn failing_init_and_missing_struct_size_are_load_errors_naming_the_cause() {
    let d = TempDir::new("bad");
    let cases = [
        (
            "GA_TEST_INIT_FAILS",
            "init failed (code 7): licence file not found",
        ),
        ("GA_TEST_NO_SIZE", "struct_size"),
    ];
    for (define, want) in cases {
        let lib = compile(&d.0, "gradsign_abi3.c", &define.to_lowercase(), &[define]);
        let mut reg = Registry::builtin();
        let err = format!("{:#}", reg.load_library(&lib).unwrap_err());
        assert!(err.contains(want), "{define}: {err}");
        assert!(
            err.contains(&lib.display().to_string()),
            "names the file: {err}"
        );
        assert!(reg.scorers.iter().all(|s| s.name != "gradsign-c"));
    }
}
