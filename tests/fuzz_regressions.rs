//! Replays the fuzz corpus (the seed models fuzz/corpus.txt names) and every input that ever crashed the fuzz target
//! (fuzz/regressions, each with the panic it caused in a .txt beside it), then a short seeded
//! fuzz run: none may panic. The long run is `cargo xtask fuzz` (docs/reliability.md).

use std::path::PathBuf;

fn files(dir: &str) -> Vec<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    v.sort();
    v
}

fn corpus() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = gradalign::tools::fuzz::seed_paths(&root.join("fuzz/corpus.txt"), &root).unwrap();
    assert_eq!(seeds.len(), 10);
    seeds
}

#[test]
fn corpus_and_past_crashes_do_not_panic() {
    let regressions = files("fuzz/regressions");
    assert!(regressions.len() >= 3);
    for p in corpus().iter().chain(&regressions) {
        let bytes = std::fs::read(p).unwrap();
        let r = std::panic::catch_unwind(|| gradalign::tools::fuzz::target(&bytes));
        assert!(r.is_ok(), "{} panics", p.display());
    }
}

#[test]
fn short_seeded_fuzz_run_does_not_panic() {
    let seeds: Vec<Vec<u8>> = corpus().iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut rng = gradalign::tools::fuzz::rng(12345, 0);
    let mut ok = 0;
    for i in 0..20_000 {
        let a = &seeds[i % seeds.len()];
        let b = &seeds[(i * 7 + 3) % seeds.len()];
        let input = gradalign::tools::fuzz::mutate(a, b, &mut rng);
        match std::panic::catch_unwind(|| gradalign::tools::fuzz::target(&input)) {
            Ok(r) => ok += r.is_ok() as usize,
            Err(_) => {
                let p = std::env::temp_dir().join(format!("gradalign-fuzz-crash-{i}.onnx"));
                std::fs::write(&p, &input).unwrap();
                panic!("mutant {i} panics; saved to {}", p.display());
            }
        }
    }
    // Mutation must not be so destructive that nothing reaches graph building.
    assert!(ok > 100, "only {ok} mutants built a graph");
}
