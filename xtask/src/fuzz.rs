//! `cargo xtask fuzz`: mutation fuzzing of gradalign's ONNX front end and gradient-graph builder
//! (`gradalign::tools::fuzz::target`), in process, with crash and hang capture.
//!
//! No coverage instrumentation (that needs nightly `cargo fuzz`): instead a mutant joins the
//! pool when it reaches an outcome not seen before (success, or a new error message shape),
//! which steers mutation past the decoder into analysis and graph building.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Options {
    pub execs: u64,
    pub seconds: u64,
    pub seed: u64,
    pub jobs: usize,
    pub corpus: PathBuf,
    pub crashes: PathBuf,
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// An error message with digits and quoted names removed: the "shape" of an outcome.
fn outcome_class(r: &Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => {
            let s = format!("{e:#}");
            let mut out = String::new();
            let mut quoted = false;
            for c in s.chars().take(160) {
                match c {
                    '\'' | '"' => {
                        quoted = !quoted;
                        out.push('_');
                    }
                    _ if quoted => {}
                    c if c.is_ascii_digit() => {}
                    c => out.push(c),
                }
            }
            out
        }
    }
}

fn save(dir: &Path, prefix: &str, data: &[u8], note: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let p = dir.join(format!("{prefix}-{h:016x}.onnx"));
    std::fs::write(&p, data)?;
    std::fs::write(p.with_extension("txt"), note)?;
    Ok(p)
}

pub fn run(o: &Options) -> Result<()> {
    let mut seeds: Vec<Vec<u8>> = vec![];
    // A folder of .onnx seeds, or a list file naming them (the default, fuzz/corpus.txt).
    let entries: Vec<PathBuf> = if o.corpus.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&o.corpus)
            .with_context(|| format!("corpus {}", o.corpus.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
            .collect();
        v.sort();
        v
    } else {
        gradalign::tools::fuzz::seed_paths(&o.corpus, &crate::root())?
    };
    for p in &entries {
        seeds.push(std::fs::read(p)?);
    }
    if seeds.is_empty() {
        bail!("no .onnx seeds in {}", o.corpus.display());
    }
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("{info}");
        LAST_PANIC.with(|p| *p.borrow_mut() = msg);
    }));
    let pool = Mutex::new(seeds.clone());
    let classes: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let crashes: Mutex<Vec<(String, PathBuf)>> = Mutex::new(vec![]);
    let execs = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let jobs = o.jobs.max(1);
    // Per worker: start of the running execution (ms since t0, 0 = idle) and its input.
    let started: Vec<AtomicU64> = (0..jobs).map(|_| AtomicU64::new(0)).collect();
    let current: Vec<Mutex<Vec<u8>>> = (0..jobs).map(|_| Mutex::new(vec![])).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(500));
                let now = t0.elapsed().as_millis() as u64;
                for (k, st) in started.iter().enumerate() {
                    let at = st.load(Ordering::SeqCst);
                    if at != 0 && now.saturating_sub(at) > 20_000 {
                        let data = current[k].lock().unwrap().clone();
                        let p = save(&o.crashes, "hang", &data, "ran for more than 20 s");
                        eprintln!("\nHANG: one input ran for more than 20 s, saved to {p:?}");
                        std::process::exit(3);
                    }
                }
                let n = execs.load(Ordering::SeqCst);
                let el = t0.elapsed().as_secs_f64();
                eprint!(
                    "\r{n} execs, {:.0}/s, {} outcome classes, pool {}, crashes {}\x1b[K",
                    n as f64 / el,
                    classes.lock().unwrap().len(),
                    pool.lock().unwrap().len(),
                    crashes.lock().unwrap().len()
                );
            }
        });
        let workers: Vec<_> = (0..jobs)
            .map(|k| {
                let (pool, classes, crashes, execs) = (&pool, &classes, &crashes, &execs);
                let (st, cur) = (&started[k], &current[k]);
                s.spawn(move || {
                    let mut rng = gradalign::tools::fuzz::rng(o.seed, k as u64);
                    loop {
                        let n = execs.fetch_add(1, Ordering::SeqCst);
                        if n >= o.execs || t0.elapsed().as_secs() >= o.seconds {
                            break;
                        }
                        let (a, b) = {
                            let p = pool.lock().unwrap();
                            (p[rng.below(p.len())].clone(), p[rng.below(p.len())].clone())
                        };
                        let input = gradalign::tools::fuzz::mutate(&a, &b, &mut rng);
                        cur.lock().unwrap().clone_from(&input);
                        st.store(t0.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
                        let r = std::panic::catch_unwind(|| gradalign::tools::fuzz::target(&input));
                        st.store(0, Ordering::SeqCst);
                        match r {
                            Ok(res) => {
                                let class = outcome_class(&res);
                                if classes.lock().unwrap().insert(class) {
                                    let mut p = pool.lock().unwrap();
                                    if p.len() < 4000 {
                                        p.push(input);
                                    }
                                }
                            }
                            Err(_) => {
                                let msg = LAST_PANIC.with(|p| p.borrow().clone());
                                let loc = msg.lines().next().unwrap_or("").to_string();
                                let mut c = crashes.lock().unwrap();
                                if !c.iter().any(|(l, _)| *l == loc) {
                                    if let Ok(p) = save(&o.crashes, "crash", &input, &msg) {
                                        eprintln!("\nCRASH: {loc}\n  saved to {}", p.display());
                                        c.push((loc, p));
                                    }
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        stop.store(true, Ordering::SeqCst);
    });
    let _ = std::panic::take_hook();
    let n = execs.load(Ordering::SeqCst).min(o.execs);
    let el = t0.elapsed().as_secs_f64();
    let c = crashes.into_inner().unwrap();
    eprintln!(
        "\nfuzz: {n} executions in {el:.0} s ({:.0}/s, {} jobs, seed {}), {} outcome classes, {} distinct crashes",
        n as f64 / el,
        jobs,
        o.seed,
        classes.into_inner().unwrap().len(),
        c.len()
    );
    if !c.is_empty() {
        for (loc, p) in &c {
            eprintln!("  {loc} — {}", p.display());
        }
        bail!("{} distinct crashes", c.len());
    }
    Ok(())
}
