//! The library's modules follow the data flow and never import each other in a circle. This
//! reads the source of every library module, collects the `crate::…` and `super::…` paths it
//! names outside its `#[cfg(test)]` tests, and checks (1) that each top-level module names only
//! itself and the ones before it in [`LAYERS`], and (2) that no two file modules reach each
//! other. A module may name its ancestors (`super::` items of a `mod.rs`): that is the shared
//! vocabulary of a folder, not a dependency between peers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The data flow, first to last (`rng` under everything); `tools` sits beside it and may use
/// all of it.
const LAYERS: &[&str] = &[
    "rng", "onnx", "autodiff", "runtime", "inputs", "scorers", "results", "tools",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/autodiff/ops/mod.rs` → `["autodiff", "ops"]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every `prefix::a::b…` path in `code`, as its segments.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segs = Vec::new();
        let mut tail = rest;
        loop {
            let len =
                tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            let len = len.unwrap_or(tail.len());
            if len == 0 {
                break;
            }
            segs.push(tail[..len].to_string());
            match tail[len..].strip_prefix("::") {
                Some(t) => tail = t,
                None => break,
            }
        }
        out.push(segs);
    }
    out
}

/// Module → the other modules it names, longest known prefix of each path.
fn module_graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut code = BTreeMap::new();
    for file in files {
        let path = module_path(&src, &file);
        // The binary's modules and this checker are not the library.
        if matches!(
            path.first().map(String::as_str),
            Some("main" | "cli" | "lib" | "layering")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let text = match text.find("#[cfg(test)]") {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        code.insert(path, text);
    }
    let known: BTreeSet<Vec<String>> = code.keys().cloned().collect();
    let resolve = |segs: Vec<String>| -> Option<Vec<String>> {
        (1..=segs.len())
            .rev()
            .map(|k| segs[..k].to_vec())
            .find(|p| known.contains(p))
    };
    let mut graph = BTreeMap::new();
    for (module, text) in &code {
        let mut deps = BTreeSet::new();
        for segs in paths_after(text, "crate::") {
            deps.extend(resolve(segs));
        }
        // `super::` is the enclosing folder module, for a mod.rs and a leaf file alike.
        let base = module[..module.len() - 1].to_vec();
        for segs in paths_after(text, "super::") {
            deps.extend(resolve([base.clone(), segs].concat()));
        }
        deps.retain(|d| d != module && !module.starts_with(d));
        graph.insert(module.clone(), deps);
    }
    graph
}

#[test]
fn top_level_modules_import_only_earlier_layers() {
    let layer = |m: &[String]| LAYERS.iter().position(|l| *l == m[0]);
    let mut wrong = Vec::new();
    for (module, deps) in module_graph() {
        let Some(mine) = layer(&module) else {
            panic!(
                "src/{} is in no layer of LAYERS; add it where the data flow puts it",
                module[0]
            );
        };
        for dep in deps {
            if layer(&dep).is_some_and(|theirs| theirs > mine) {
                wrong.push(format!("{} -> {}", module.join("::"), dep.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the data flow {LAYERS:?}: {wrong:#?}"
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = module_graph();
    // A module is on a cycle when it can reach itself.
    let mut cycles = Vec::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&Vec<String>> = graph[start].iter().collect();
        while let Some(m) = stack.pop() {
            if m == start {
                cycles.push(start.join("::"));
                break;
            }
            if seen.insert(m) {
                stack.extend(graph.get(m).into_iter().flatten());
            }
        }
    }
    assert!(cycles.is_empty(), "modules on an import cycle: {cycles:?}");
    // The checker itself must see the edges it is meant to judge.
    assert!(graph[&vec!["inputs".to_string(), "engine".to_string()]]
        .contains(&vec!["autodiff".to_string(), "builder".to_string()]));
}
