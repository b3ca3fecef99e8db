//! `cargo xtask bench-grads [--n 64] [--repeat R] [--backends tract,ort] [--out FILE]`
//! `cargo xtask fetch-ort` (ONNX Runtime's shared library from the PyPI wheel)
//!
//! Seconds per NB201 architecture for per-sample gradients of N probe images with gradalign
//! (each backend), next to PyTorch's batch-of-one train() loop measured in the same run when `torch`
//! is importable (`pip install torch==2.8.0 numpy`). Architectures: the NB201 fixtures listed
//! in models/nb201_fixtures.csv. Peak memory: gradalign's own VmHWM, PyTorch's ru_maxrss.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod ensemble;
mod fuzz;
mod nb101;
mod nb201;
mod regions;
mod seeds;
mod select;
mod throughput;
mod tune;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Ours {
    secs: f64,
    build: f64,
    /// In-process engine time from the CLI's summary: load + build + run + assemble (what the
    /// PyTorch column times, too: no interpreter start, no output file).
    engine: f64,
    rss: String,
}

struct Row {
    name: String,
    params: String,
    /// One entry per backend, in `backends` order.
    ours: Vec<Ours>,
    torch_s: Option<f64>,
    torch_batched_s: Option<f64>,
    torch_rss: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn field<'a>(line: &'a str, after: &str, until: char) -> Option<&'a str> {
    let i = line.find(after)? + after.len();
    let rest = &line[i..];
    Some(rest[..rest.find(until).unwrap_or(rest.len())].trim())
}

fn bench_grads(n: usize, repeat: usize, backends: &[String], out: Option<&Path>) -> Result<()> {
    let root = root();
    let status = Command::new("cargo")
        .args(["build", "--release", "--bin", "gradalign"])
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building gradalign failed");
    }
    let bin = root.join("target/release/gradalign");
    let fixtures = std::fs::read_to_string(root.join("models/nb201_fixtures.csv"))
        .context("models/nb201_fixtures.csv")?;
    let has_torch = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_torch {
        eprintln!(
            "torch is not importable: PyTorch column skipped (pip install torch==2.8.0 numpy)"
        );
    }
    let tmp = std::env::temp_dir().join(format!("gradalign-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut rows = vec![];
    for line in fixtures.lines().skip(1) {
        let mut parts = line.splitn(3, ',');
        let (name, seed, arch) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let model = root.join("models").join(format!("{name}.onnx"));
        let mut ours = vec![];
        let mut params = String::from("?");
        for backend in backends {
            let (mut times, mut builds, mut engines, mut summary) =
                (vec![], vec![], vec![], String::new());
            for _ in 0..repeat {
                let t0 = Instant::now();
                let o = Command::new(&bin)
                    .args([
                        "grads",
                        model.to_str().unwrap(),
                        "--n",
                        &n.to_string(),
                        "--backend",
                        backend,
                        "--out",
                    ])
                    .arg(tmp.join("g.npy"))
                    .output()?;
                times.push(t0.elapsed().as_secs_f64());
                if !o.status.success() {
                    bail!(
                        "gradalign --backend {backend} failed on {name}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                summary = String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string();
                let part = |name: &str| -> f64 {
                    field(&summary, name, 's')
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN)
                };
                builds.push(part("build "));
                engines.push(part("load ") + part("build ") + part("run ") + part("assemble "));
            }
            params = field(&summary, "samples × ", ' ')
                .unwrap_or("?")
                .to_string();
            let rss = field(&summary, "peak RSS ", ' ').unwrap_or("?").to_string();
            ours.push(Ours {
                secs: median(times),
                build: median(builds),
                engine: median(engines),
                rss,
            });
        }
        let (mut torch_s, mut torch_batched_s, mut torch_rss) = (None, None, None);
        if has_torch {
            let (mut ts, mut tb) = (vec![], vec![]);
            for _ in 0..repeat {
                let o = Command::new("python3")
                    .arg(root.join("tests/golden/torch_loop.py"))
                    .args([arch, "--n", &n.to_string(), "--seed", seed])
                    .output()?;
                if !o.status.success() {
                    bail!(
                        "torch_loop.py failed: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                let line = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_string();
                ts.push(
                    field(&line, "\"seconds\": ", ',')
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN),
                );
                tb.push(
                    field(&line, "\"batched_seconds\": ", ',')
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN),
                );
                torch_rss = field(&line, "\"peak_rss_mib\": ", ',').and_then(|v| v.parse().ok());
            }
            torch_s = Some(median(ts));
            torch_batched_s = Some(median(tb));
        }
        let row = Row {
            name: name.into(),
            params,
            ours,
            torch_s,
            torch_batched_s,
            torch_rss,
        };
        eprintln!(
            "{name}: gradalign {:?} s, PyTorch loop {:?}",
            row.ours.iter().map(|o| o.secs).collect::<Vec<_>>(),
            row.torch_s
        );
        rows.push(row);
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut md = format!(
        "# bench-grads: per-sample gradients, N = {n}, NB201 fixtures\n\nMachine: {cpu}, {cores} cores. Median of {repeat} run(s).\n\
         gradalign: whole CLI process (load, build the graph, create the runtime session, run, write the .npy); \
         tract on one thread, ONNX Runtime (`ort`) on {cores} intra-op threads.\n\
         PyTorch: `tests/golden/torch_loop.py` (batch-of-one train() loop, float32, {cores} threads), timed loop only.\n\
         Speed-up = PyTorch loop seconds / gradalign seconds; engine = gradalign's in-process time (load + build + run + assemble, \
         i.e. without process start and the fsync'd .npy write, like the PyTorch loop's timing).\n\
         PyTorch batched = one batched train() forward + backward of the same N images (summed gradients only): \
         per-sample gradients need at least its arithmetic, so loop / batched is the most any per-sample method \
         running at PyTorch's batched speed could gain over the loop on this machine.\n\n| architecture | params |"
    );
    for b in backends {
        md += &format!(" {b} s (build) | {b} speed-up | {b} engine s | {b} engine speed-up | {b} peak RSS MiB |");
    }
    md +=
        " PyTorch loop s | PyTorch batched s | loop / batched | PyTorch peak RSS MiB |\n|---|---|";
    md += &"---|---|---|---|---|".repeat(backends.len());
    md += "---|---|---|---|\n";
    let opt = |v: Option<f64>, unit: &str| v.map(|t| format!("{t:.2}{unit}")).unwrap_or("—".into());
    for r in &rows {
        md += &format!("| {} | {} |", r.name, r.params);
        for o in &r.ours {
            let sp = |t: f64| opt(r.torch_s.map(|l| l / t), "×");
            md += &format!(
                " {:.2} ({:.2}) | {} | {:.2} | {} | {} |",
                o.secs,
                o.build,
                sp(o.secs),
                o.engine,
                sp(o.engine),
                o.rss
            );
        }
        md += &format!(
            " {} | {} | {} | {} |\n",
            opt(r.torch_s, ""),
            opt(r.torch_batched_s, ""),
            opt(r.torch_s.zip(r.torch_batched_s).map(|(l, b)| l / b), "×"),
            r.torch_rss.map(|t| format!("{t:.0}")).unwrap_or("—".into())
        );
    }
    println!("{md}");
    if let Some(out) = out {
        std::fs::write(out, &md)?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// Download the `onnxruntime` (or, with `gpu`, `onnxruntime-gpu`) wheel from PyPI with pip and
/// extract its shared libraries into the cache folder gradalign looks in
/// (~/.cache/gradalign/onnxruntime[-gpu]-<ver>/). The GPU wheel adds the CUDA provider libraries;
/// the CUDA 13 / cuDNN 9 runtime itself comes from the NVIDIA pip packages or the system.
fn fetch_ort(gpu: bool) -> Result<()> {
    const VERSION: &str = "1.31.0";
    let (package, pyver) = if gpu {
        ("onnxruntime-gpu", "3.12")
    } else {
        ("onnxruntime", "3.11")
    };
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = home.join("gradalign").join(format!("{package}-{VERSION}"));
    let lib = dir.join(format!("libonnxruntime.so.{VERSION}"));
    let mut members = vec![format!("libonnxruntime.so.{VERSION}")];
    if gpu {
        members.push("libonnxruntime_providers_shared.so".into());
        members.push("libonnxruntime_providers_cuda.so".into());
    }
    if members.iter().all(|m| dir.join(m).exists()) {
        println!("{}", lib.display());
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let dl = dir.join("wheel");
    std::fs::create_dir_all(&dl)?;
    let ok = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--python-version", pyver])
        .args([
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_27_x86_64",
        ])
        .args(["--platform", "manylinux_2_17_x86_64"])
        .arg(format!("{package}=={VERSION}"))
        .arg("-d")
        .arg(&dl)
        .status()
        .with_context(|| format!("running pip (python3 -m pip) to download the {package} wheel"))?;
    if !ok.success() {
        bail!("pip could not download {package}=={VERSION}");
    }
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("no wheel downloaded")?;
    // A wheel is a zip file: let Python's zipfile extract the members we need.
    let script = "import zipfile,sys,os\nz=zipfile.ZipFile(sys.argv[1])\nfor m in sys.argv[3:]:\n    open(os.path.join(sys.argv[2],m),'wb').write(z.read('onnxruntime/capi/'+m))";
    let ok = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(&dir)
        .args(&members)
        .status()?;
    if !ok.success() {
        bail!("could not extract {members:?} from {}", wheel.display());
    }
    std::fs::remove_dir_all(&dl).ok();
    println!("{}", lib.display());
    Ok(())
}

fn parse_backend(b: Option<&str>) -> Result<gradalign::runtime::Backend> {
    use gradalign::runtime::Backend;
    Ok(match b {
        None | Some("auto") => Backend::Auto,
        Some("tract") => Backend::Tract,
        Some("ort") => Backend::Ort,
        Some(b) => bail!("--backend {b}: use auto, tract or ort"),
    })
}

/// `jobs` parallel architectures share the cores: each runtime gets cores / jobs threads
/// (unless GRADALIGN_THREADS says otherwise).
fn jobs_with_threads(jobs: usize) -> usize {
    if jobs > 1 && std::env::var_os("GRADALIGN_THREADS").is_none() {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("GRADALIGN_THREADS", (cores / jobs).max(1).to_string());
    }
    jobs
}

/// The flags each command reads: anything else is refused, so that a misspelt flag is an error
/// rather than silently ignored.
fn known_flags(cmd: &str, sub: Option<&str>) -> Option<&'static [&'static str]> {
    Some(match (cmd, sub) {
        ("bench-grads", _) => &["--n", "--repeat", "--backends", "--out"],
        ("fetch-ort", _) => &["--gpu"],
        ("gen-resnet50", _) => &["--out", "--input"],
        ("gen-nb201", _) => &[
            "--out",
            "--count",
            "--seed",
            "--index",
            "--channels",
            "--cells",
        ],
        ("gen-nb101", _) => &["--out", "--hash", "--sample", "--seed", "--input"],
        ("fuzz", _) => &[
            "--execs",
            "--seconds",
            "--seed",
            "--jobs",
            "--corpus",
            "--crashes",
        ],
        ("bench", Some("throughput")) => &["--count", "--seed", "--n", "--threads", "--out"],
        ("bench", Some("linear-regions")) => &[
            "--sample",
            "--seed",
            "--n",
            "--repeats",
            "--sigmas",
            "--backend",
            "--jobs",
            "--out",
            "--report-only",
        ],
        ("select", _) => &["--reps", "--seed", "--out"],
        ("ensemble", _) => &["--members", "--reps", "--seed", "--out", "--tables"],
        ("ensemble-tune", _) => &[
            "--candidates",
            "--max-members",
            "--min-gain",
            "--reps",
            "--seed",
            "--out",
        ],
        ("bench", Some("nb101")) => &[
            "--pool",
            "--sample",
            "--seed",
            "--n",
            "--scorers",
            "--backend",
            "--jobs",
            "--max-memory",
            "--out",
            "--report-only",
        ],
        ("bench", Some("seeds")) => &[
            "--sample",
            "--seeds",
            "--probes",
            "--n",
            "--scorers",
            "--backend",
            "--jobs",
            "--out",
            "--report-only",
        ],
        ("bench", Some("nb201" | "naslib-check")) => &[
            "--sample",
            "--seed",
            "--all",
            "--n",
            "--scorers",
            "--backend",
            "--jobs",
            "--out",
            "--init",
            "--report-only",
        ],
        _ => return None,
    })
}

fn check_flags(args: &[String]) -> Result<()> {
    let Some(cmd) = args.first() else {
        return Ok(());
    };
    let Some(known) = known_flags(cmd, args.get(1).map(String::as_str)) else {
        return Ok(());
    };
    for a in args.iter().filter(|a| a.starts_with("--")) {
        if !known.contains(&a.as_str()) {
            bail!(
                "cargo xtask {}: unknown flag {a} (this command takes {})",
                args.iter()
                    .take_while(|x| !x.starts_with("--"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" "),
                known.join(", ")
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    check_flags(&args)?;
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(|s| s.as_str()) {
        Some("bench-grads") => {
            let n = get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64);
            let repeat = get("--repeat").map(|v| v.parse()).transpose()?.unwrap_or(1);
            let backends: Vec<String> = get("--backends").unwrap_or_else(|| "tract,ort".into()).split(',').map(String::from).collect();
            bench_grads(n, repeat, &backends, get("--out").as_deref().map(Path::new))
        }
        Some("fetch-ort") => fetch_ort(args.iter().any(|a| a == "--gpu")),
        Some("gen-resnet50") => {
            use prost::Message;
            let out = get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("target/resnet50.onnx"));
            let hw: usize = get("--input").map(|v| v.parse()).transpose()?.unwrap_or(32);
            let proto = gradalign::tools::zoo::resnet50_model(0, hw, 10);
            let m = gradalign::onnx::Model::from_proto(&proto, "resnet50")?;
            let params: usize = m.initializers.iter().filter(|(n, _)| !n.contains("running")).map(|(_, t)| t.len()).sum();
            std::fs::write(&out, proto.encode_to_vec())?;
            eprintln!("wrote {} (ResNet-50, 3×{hw}×{hw} input, {params} parameters)", out.display());
            Ok(())
        }
        Some("gen-nb201") => {
            // Seeded NB201 networks as ONNX files, for sweeps and the cluster tests: the same
            // sample and weight seeds as `bench nb201`, so a file here is that run's model.
            use prost::Message;
            let count: usize = get("--count").map(|v| v.parse()).transpose()?.unwrap_or(40);
            let seed: u64 = get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0);
            let c: usize = get("--channels").map(|v| v.parse()).transpose()?.unwrap_or(16);
            let cells: usize = get("--cells").map(|v| v.parse()).transpose()?.unwrap_or(5);
            let out = get("--out").map(PathBuf::from).context("gen-nb201 needs --out DIR")?;
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let archs = nb201::load_archs(&root())?;
            // --index exports named architectures (e.g. one row of a `bench nb201` table) with
            // the weights that run gave them, instead of a seeded sample.
            if get("--index").is_some() && get("--count").is_some() {
                bail!("gen-nb201: --index names the architectures; --count draws a sample: give one of them");
            }
            let picked: Vec<usize> = match get("--index") {
                Some(list) => list
                    .split(',')
                    .map(|v| {
                        let i: usize = v.trim().parse().with_context(|| format!("--index: '{v}' is not an architecture index"))?;
                        anyhow::ensure!(i < archs.len(), "--index {i}: NB201 has {} architectures (0..{})", archs.len(), archs.len() - 1);
                        Ok(i)
                    })
                    .collect::<Result<_>>()?,
                None => nb201::sample(archs.len(), count, seed),
            };
            for &i in &picked {
                let a = &archs[i];
                let proto = gradalign::tools::zoo::nb201_model(&a.arch, nb201::weight_seed(seed, a.index), c, cells)?;
                let path = out.join(format!("nb201-{:05}.onnx", a.index));
                std::fs::write(&path, proto.encode_to_vec()).with_context(|| format!("cannot write {}", path.display()))?;
            }
            eprintln!("wrote {} NB201 models (C = {c}, {cells} cells per stage, seed {seed}) to {}", picked.len(), out.display());
            Ok(())
        }
        Some("gen-nb101") => {
            // NB101 networks by hash (comma-separated) or a seeded sample of the 30,001
            // validation cells, from data/nb101_accuracies.csv.
            use prost::Message;
            let seed: u64 = get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0);
            let hw: usize = get("--input").map(|v| v.parse()).transpose()?.unwrap_or(32);
            let out = get("--out").map(PathBuf::from).context("gen-nb101 needs --out DIR")?;
            let text = std::fs::read_to_string(root().join("data/nb101_accuracies.csv"))
                .context("data/nb101_accuracies.csv")?;
            let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split(',').collect()).collect();
            let picked: Vec<&Vec<&str>> = match (get("--hash"), get("--sample")) {
                (Some(h), None) => h
                    .split(',')
                    .map(|h| rows.iter().find(|r| r[0] == h).with_context(|| format!("--hash {h}: not in data/nb101_accuracies.csv")))
                    .collect::<Result<_>>()?,
                (None, Some(k)) => {
                    let val: Vec<&Vec<&str>> = rows.iter().filter(|r| !r[4].is_empty()).collect();
                    nb201::sample(val.len(), k.parse()?, seed).into_iter().map(|i| val[i]).collect()
                }
                _ => bail!("gen-nb101 needs exactly one of --hash H[,H…] or --sample K"),
            };
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            for r in &picked {
                let cell = gradalign::tools::zoo::nb101::Nb101Cell::parse(r[2], r[3])?;
                let wseed = nb201::weight_seed(seed, u64::from_str_radix(&r[0][..12], 16)? as usize);
                let proto = gradalign::tools::zoo::nb101::nb101_model(&cell, wseed, hw)?;
                let path = out.join(format!("nb101-{}.onnx", r[0]));
                std::fs::write(&path, proto.encode_to_vec()).with_context(|| format!("cannot write {}", path.display()))?;
            }
            eprintln!("wrote {} NB101 models ({hw}×{hw} input, seed {seed}) to {}", picked.len(), out.display());
            Ok(())
        }
        Some("fuzz") => fuzz::run(&fuzz::Options {
            execs: get("--execs").map(|v| v.parse()).transpose()?.unwrap_or(1_000_000),
            seconds: get("--seconds").map(|v| v.parse()).transpose()?.unwrap_or(1800),
            seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
            jobs: get("--jobs").map(|v| v.parse()).transpose()?.unwrap_or(1),
            corpus: get("--corpus").map(PathBuf::from).unwrap_or_else(|| root().join("fuzz/corpus.txt")),
            crashes: get("--crashes").map(PathBuf::from).unwrap_or_else(|| root().join("fuzz/crashes")),
        }),
        Some("bench") if args.get(1).map(String::as_str) == Some("throughput") => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            throughput::run(
                &root(),
                &throughput::Options {
                    count: get("--count").map(|v| v.parse()).transpose()?.unwrap_or(24),
                    seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
                    n: get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64),
                    threads: get("--threads").map(|v| v.parse()).transpose()?.unwrap_or(cores),
                    out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/throughput.md")),
                },
            )
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("linear-regions") => {
            let archs = nb201::load_archs(&root())?.len();
            let seed: u64 = get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0);
            let k: usize = get("--sample").map(|v| v.parse()).transpose()?.unwrap_or(200);
            let backend = parse_backend(get("--backend").as_deref())?;
            let jobs = jobs_with_threads(get("--jobs").map(|v| v.parse()).transpose()?.unwrap_or(1));
            let sigmas = get("--sigmas")
                .unwrap_or_else(|| "1e-4,1e-3,1e-2".into())
                .split(',')
                .map(|v| v.parse::<f64>().with_context(|| format!("--sigmas: '{v}' is not a number")))
                .collect::<Result<Vec<f64>>>()?;
            if sigmas.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
                bail!("--sigmas: each σ must be a positive number");
            }
            let o = regions::Options {
                indices: nb201::sample(archs, k, seed),
                seed,
                n: get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64),
                repeats: get("--repeats").map(|v| v.parse()).transpose()?.unwrap_or(3),
                sigmas,
                backend,
                jobs,
                out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("target/bench-linear-regions")),
                desc: args[2..].iter().filter(|a| *a != "--report-only").cloned().collect::<Vec<_>>().join(" "),
            };
            if args.iter().any(|a| a == "--report-only") {
                return regions::report(&o, &nb201::load_archs(&root())?);
            }
            gradalign::runtime::check_backend(backend)?;
            regions::run(&root(), &o)
        }
        Some("select") => select::run(&root(), &select::Options {
            reps: get("--reps").map(|v| v.parse()).transpose()?.unwrap_or(500),
            seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
            out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/selection.md")),
        }),
        Some("ensemble") if get("--tables").is_some() && get("--out").is_none() => {
            bail!("ensemble --tables: give --out FILE too (the default, docs/results/nb201/ensemble.md, is the committed report of the default tables)")
        }
        Some("ensemble") => ensemble::run(&root(), &ensemble::Options {
            members: get("--members").unwrap_or_else(ensemble::default_members),
            reps: get("--reps").map(|v| v.parse()).transpose()?.unwrap_or(1000),
            seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
            out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/nb201/ensemble.md")),
            provenance: None,
            tables: get("--tables").map(|t| t.split(',').map(|s| s.trim().to_string()).collect()),
        }),
        Some("ensemble-tune") => tune::run(&root(), &tune::Options {
            candidates: get("--candidates").unwrap_or_default(),
            max_members: get("--max-members").map(|v| v.parse()).transpose()?.unwrap_or(6),
            min_gain: get("--min-gain").map(|v| v.parse()).transpose()?.unwrap_or(0.005),
            reps: get("--reps").map(|v| v.parse()).transpose()?.unwrap_or(1000),
            seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
            out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/ensemble-tune.md")),
            nb201_out: root().join("docs/results/nb201/ensemble-tuned.md"),
        }),
        Some("bench") if args.get(1).map(String::as_str) == Some("nb101") => {
            let jobs = jobs_with_threads(get("--jobs").map(|v| v.parse()).transpose()?.unwrap_or(1));
            nb101::run(&root(), &nb101::Options {
                pool: get("--pool").unwrap_or_else(|| "test".into()),
                sample: get("--sample").map(|v| v.parse()).transpose()?.unwrap_or(1000),
                seed: get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0),
                n: get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64),
                scorers: get("--scorers").unwrap_or_else(|| {
                    "gradalign-i,gradalign-ii,gradsign,gradalign-ii-raw,gradalign-i-cos,grad_norm,snip,synflow,naswot,swap,jacob_cov,params,flops".into()
                }),
                backend: get("--backend").unwrap_or_else(|| "auto".into()),
                jobs,
                max_memory: get("--max-memory"),
                out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/nb101")),
                report_only: args.iter().any(|a| a == "--report-only"),
            })
        }
        Some("bench") if args.get(1).map(String::as_str) == Some("seeds") => {
            let backend = parse_backend(get("--backend").as_deref())?;
            let jobs = jobs_with_threads(get("--jobs").map(|v| v.parse()).transpose()?.unwrap_or(1));
            gradalign::runtime::check_backend(backend)?;
            seeds::run(&root(), &seeds::Options {
                archs: get("--sample").map(|v| v.parse()).transpose()?.unwrap_or(200),
                seeds: get("--seeds").map(|v| v.parse()).transpose()?.unwrap_or(5),
                probes: get("--probes").map(|v| v.parse()).transpose()?.unwrap_or(3),
                n: get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64),
                scorers: get("--scorers").unwrap_or_else(|| "gradalign-i,gradalign-ii,gradsign".into()),
                backend,
                jobs,
                out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join("docs/results/seeds")),
                report_only: args.iter().any(|a| a == "--report-only"),
            })
        }
        Some("bench") if matches!(args.get(1).map(String::as_str), Some("nb201" | "naslib-check")) => {
            let archs = nb201::load_archs(&root())?.len();
            let seed: u64 = get("--seed").map(|v| v.parse()).transpose()?.unwrap_or(0);
            let (indices, desc) = if args.iter().any(|a| a == "--all") {
                ((0..archs).collect(), "--all".to_string())
            } else {
                let k: usize = get("--sample").map(|v| v.parse()).transpose()?.unwrap_or(100);
                (nb201::sample(archs, k, seed), format!("--sample {k} --seed {seed}"))
            };
            let backend = parse_backend(get("--backend").as_deref())?;
            let jobs = jobs_with_threads(get("--jobs").map(|v| v.parse()).transpose()?.unwrap_or(1));
            let o = nb201::Options {
                indices,
                seed,
                n: get("--n").map(|v| v.parse()).transpose()?.unwrap_or(64),
                scorers: get("--scorers").unwrap_or_else(|| {
                    "gradalign-ii,gradalign-i,gradsign,gradalign-ii-raw,gradalign-i-cos,grad_norm,snip,synflow,naswot,jacob_cov,zico,ntk_cond,fisher,params,flops".into()
                }),
                backend,
                jobs,
                out: get("--out").map(PathBuf::from).unwrap_or_else(|| root().join(format!("target/bench-{}", args[1]))),
                init: match get("--init").as_deref() {
                    None | Some("pytorch") => gradalign::tools::zoo::Init::PyTorch,
                    Some("kaiming-normal") => gradalign::tools::zoo::Init::KaimingNormalFanIn,
                    Some(v) => bail!("--init {v}: expected pytorch or kaiming-normal"),
                },
                report_only: args.iter().any(|a| a == "--report-only"),
                sample_desc: if args[1] == "naslib-check" {
                    args[2..].join(" ")
                } else {
                    format!("{desc} [{}]", args[2..].join(" "))
                },
            };
            gradalign::runtime::check_backend(backend)?;
            if args[1] == "naslib-check" {
                nb201::naslib_check(&root(), &o)
            } else {
                nb201::run(&root(), &o)
            }
        }
        _ => bail!("usage: cargo xtask gen-resnet50 [--out FILE] [--input 32] | cargo xtask gen-nb201 --out DIR [--count 40 | --index I,J] [--seed 0] [--channels 16] [--cells 5] | cargo xtask gen-nb101 --out DIR (--hash H[,H…] | --sample K) [--seed 0] [--input 32] | cargo xtask fuzz [--execs 1000000] [--seconds 1800] [--seed S] [--jobs J] [--corpus DIR|LIST] [--crashes DIR] | cargo xtask bench-grads [--n 64] [--repeat R] [--backends tract,ort] [--out FILE] | cargo xtask fetch-ort [--gpu] | cargo xtask bench nb201|naslib-check [--sample K --seed S | --all] [--n 64] [--scorers a,b] [--backend auto|tract|ort] [--jobs J] [--out DIR] [--init pytorch|kaiming-normal] [--report-only] | cargo xtask bench throughput [--count 24] [--seed 0] [--n 64] [--threads T] [--out FILE] | cargo xtask select [--reps 500] [--seed 0] [--out FILE] | cargo xtask ensemble [--members a,b] [--tables A.csv,B.csv] [--reps 1000] [--seed 0] [--out FILE] | cargo xtask ensemble-tune [--candidates a,b] [--max-members 6] [--min-gain 0.005] [--reps 1000] [--seed 0] [--out FILE] | cargo xtask bench nb101 [--pool test|val] [--sample 1000] [--seed 0] [--n 64] [--scorers a,b] [--backend …] [--jobs J] [--max-memory SIZE] [--out DIR] [--report-only] | cargo xtask bench seeds [--sample 200] [--seeds 5] [--probes 3] [--n 64] [--scorers a,b] [--backend …] [--jobs J] [--out DIR] [--report-only] | cargo xtask bench linear-regions [--sample 200] [--seed 0] [--n 64] [--repeats 3] [--sigmas 1e-4,1e-3,1e-2] [--backend …] [--jobs J] [--out DIR] [--report-only]"),
    }
}
