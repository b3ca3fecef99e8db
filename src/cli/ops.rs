//! `gradalign ops`: the ONNX ops gradalign accepts, read from the op registry, so the list
//! users see is the list the code uses.

use gradalign::autodiff::ops::registry;
use gradalign::autodiff::rules::Slot;
use gradalign::onnx::Node;

/// One line per op: inputs taken, how gradients pass, and the role of each initializer slot.
pub fn list() -> anyhow::Result<i32> {
    let reg = registry();
    println!("{:<24} {:<8} {:<22} slots", "op", "inputs", "gradient");
    for &name in reg.supported() {
        let def = reg.get(name).expect("supported ops are registered");
        let a = def.arity;
        let inputs = match (a.min_in, a.max_in) {
            (lo, hi) if lo == hi => lo.to_string(),
            (lo, usize::MAX) => format!("{lo}+"),
            (lo, hi) => format!("{lo}-{hi}"),
        };
        let gradient = if !def.differentiable {
            "none (shape/compare)"
        } else if def.lower.is_some() && def.backward.is_none() {
            "via its lowering"
        } else if def.backward.is_some() {
            "rule"
        } else {
            "MISSING"
        };
        let node = Node::new(String::new(), name, vec![], vec![]);
        let shown = a.max_in.min(a.min_in.max(3)).min(5);
        let slots: Vec<&str> = (0..shown)
            .map(|s| match (def.slots)(&node, s, 2) {
                Slot::Data => "data",
                Slot::Weight { .. } => "weight",
                Slot::Bias => "bias",
                Slot::Fixed => "fixed",
            })
            .collect();
        println!("{name:<24} {inputs:<8} {gradient:<22} {}", slots.join(" "));
    }
    Ok(0)
}
