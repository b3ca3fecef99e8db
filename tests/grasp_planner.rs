//! GraSP on generated NB201 networks whose float64 gradient graph trips tract's planner (a
//! `Dummy` op left in the optimised and the decluttered plan): the Hessian pass must still
//! give a number. NB201 #2493 of `cargo xtask bench nb201 --seed 0` failed this way before.

use gradalign::autodiff::GradOptions;
use gradalign::inputs::probe::Probe;
use gradalign::onnx::Model;
use gradalign::runtime::{Backend, Device};
use gradalign::scorers::plugin::Registry;
use gradalign::scorers::score::score_model;

#[test]
fn grasp_is_defined_where_the_tract_f64_planner_left_a_dummy_op() {
    let arch = "|none~0|+|nor_conv_3x3~0|none~1|+|skip_connect~0|none~1|none~2|";
    let proto = gradalign::tools::zoo::nb201_model(arch, 2493, 16, 5).unwrap();
    let model = Model::from_proto(&proto, "nb201 #2493").unwrap();
    let reg = Registry::builtin();
    let scorers = reg.select("grasp").unwrap();
    let probe = Probe::shipped(64).unwrap();
    let r = score_model(
        &model,
        &probe,
        true,
        GradOptions::default(),
        Backend::Tract,
        Device::Cpu,
        &scorers,
    )
    .unwrap();
    let v = r.scores[0].1;
    assert!(
        v.is_some_and(f64::is_finite),
        "grasp: {v:?}, errors {:?}",
        r.errors
    );
}
