//! x2v's flow UniPC and Euler schedulers against diffusers (`tools/fixtures/schedulers.py`):
//! timestep grids, sigma grids and the trajectory of a toy velocity field.

mod common;

use tch::Kind;
use x2v_models::schedulers::{
    FlowMatchEulerConfig, FlowMatchEulerScheduler, Scheduler, UniPcConfig, UniPcScheduler,
};

const SIGMA_TOL: f64 = 1e-6;
/// Per-step sample tolerance, relative to max(1, max|reference|).
const STEP_TOL: f64 = 1e-5;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    steps: usize,
    shift: f64,
}

#[test]
fn schedulers_match_diffusers() {
    let fx = common::fixture("schedulers");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 7);
    let toy = common::tensors(&fx.join("toy.safetensors"));
    let (x0, target) = (&toy["x0"], &toy["target"]);
    for case in cases {
        let want = common::tensors(&fx.join(format!("{}.safetensors", case.name)));
        let mut sched: Box<dyn Scheduler> = match case.kind.as_str() {
            "unipc" => {
                Box::new(UniPcScheduler::new(&UniPcConfig::wan(case.shift), case.steps).unwrap())
            }
            "euler" => {
                let c = FlowMatchEulerConfig { shift: case.shift, num_train_timesteps: 1000 };
                Box::new(FlowMatchEulerScheduler::new(&c, case.steps).unwrap())
            }
            other => panic!("unknown scheduler kind {other}"),
        };
        let want_t = Vec::<f64>::try_from(&want["timesteps"]).unwrap();
        assert_eq!(sched.timesteps(), want_t.as_slice(), "{}: timesteps", case.name);
        let want_s = Vec::<f32>::try_from(&want["sigmas"]).unwrap();
        assert_eq!(sched.sigmas().len(), want_s.len(), "{}: sigma count", case.name);
        for (i, (&got, &exp)) in sched.sigmas().iter().zip(&want_s).enumerate() {
            assert!(
                (got - f64::from(exp)).abs() <= SIGMA_TOL,
                "{}: sigma[{i}] {got} vs {exp}",
                case.name
            );
        }
        let mut x = x0.shallow_clone();
        let mut worst = 0f64;
        for i in 0..case.steps {
            let v = (&x - target) * 1.1 + x.sin() * 0.05;
            x = sched.step(&v, &x).unwrap();
            let reference = want["samples"].get(i as i64);
            let (diff, _) = common::max_abs_diff(&x, &reference);
            worst = worst.max(diff);
            common::assert_close(&format!("{} step {i}", case.name), &x, &reference, STEP_TOL);
        }
        eprintln!("{}: max |diff| over all steps {worst:.3e}", case.name);
        assert!(sched.step(&x, &x).is_err(), "{}: stepping past the end is an error", case.name);
        assert_eq!(x.kind(), Kind::Float);
    }
}

#[test]
fn bad_settings_are_rejected() {
    assert!(UniPcScheduler::new(&UniPcConfig::wan(5.0), 0).is_err());
    assert!(UniPcScheduler::new(&UniPcConfig::wan(-1.0), 10).is_err());
    let c = UniPcConfig { solver_order: 3, ..UniPcConfig::wan(5.0) };
    assert!(UniPcScheduler::new(&c, 10).unwrap_err().to_string().contains("solver_order"));
    let c = FlowMatchEulerConfig { shift: f64::NAN, num_train_timesteps: 1000 };
    assert!(FlowMatchEulerScheduler::new(&c, 10).is_err());
}
