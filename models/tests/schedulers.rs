//! x2v's flow UniPC and Euler schedulers against diffusers (`tools/fixtures/schedulers.py`):
//! timestep grids, sigma grids and the trajectory of a toy velocity field; Euler with Qwen-Image's
//! dynamic shift from its `scheduler_config.json`, with fp32 and bf16 latents.

mod common;

use tch::{Kind, Tensor};
use x2v_models::qwen_image::latents;
use x2v_models::schedulers::{
    FlowMatchDynamicConfig, FlowMatchEulerConfig, FlowMatchEulerScheduler, Scheduler, UniPcConfig,
    UniPcScheduler, calculate_shift,
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

#[derive(serde::Deserialize)]
struct DynamicCase {
    name: String,
    config: String,
    steps: usize,
    height: i64,
    width: i64,
    image_seq_len: usize,
}

/// The toy trajectory of `case` with latents in `kind`, each step against the reference.
fn check_trajectory(
    case: &DynamicCase,
    sched: &mut FlowMatchEulerScheduler,
    kind: Kind,
    toy: &std::collections::HashMap<String, Tensor>,
    want: &Tensor,
) -> f64 {
    let (x0, target) = (&toy["x0"], &toy["target"]);
    let mut x = x0.to_kind(kind);
    let mut worst = 0f64;
    for i in 0..case.steps {
        let xf = x.to_kind(Kind::Float);
        let v = ((&xf - target) * 1.1 + xf.sin() * 0.05).to_kind(kind);
        x = sched.step(&v, &x).unwrap();
        assert_eq!(x.kind(), kind);
        let reference = want.get(i as i64);
        worst = worst.max(common::max_abs_diff(&x, &reference).0);
        // bf16 arithmetic is deterministic on the CPU: both sides round the same values.
        common::assert_close(&format!("{} {kind:?} step {i}", case.name), &x, &reference, STEP_TOL);
    }
    assert!(sched.step(&x, &x).is_err(), "{}: stepping past the end is an error", case.name);
    worst
}

#[test]
fn dynamic_shift_matches_diffusers() {
    let fx = common::fixture("schedulers");
    let cases: Vec<DynamicCase> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("dynamic_cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 8);
    let toy = common::tensors(&fx.join("toy.safetensors"));
    for case in &cases {
        let want = common::tensors(&fx.join(format!("dynamic_{}.safetensors", case.name)));
        let file = fx.join(format!("scheduler_config_{}.json", case.config));
        let cfg = FlowMatchDynamicConfig::from_file(&file).unwrap();
        if case.config == "qwen" {
            assert_eq!(cfg, FlowMatchDynamicConfig::qwen_image());
        }
        let seq = latents::image_seq_len(case.height, case.width).unwrap();
        assert_eq!(seq, case.image_seq_len, "{}: image_seq_len", case.name);
        let mu = cfg.mu(seq);
        assert_eq!(mu, want["mu"].double_value(&[0]), "{}: mu", case.name);
        let sched = FlowMatchEulerScheduler::dynamic(&cfg, case.steps, seq).unwrap();
        let want_t = Vec::<f64>::try_from(&want["timesteps"]).unwrap();
        assert_eq!(sched.timesteps(), want_t.as_slice(), "{}: timesteps", case.name);
        let want_s: Vec<f64> =
            Vec::<f32>::try_from(&want["sigmas"]).unwrap().into_iter().map(f64::from).collect();
        assert_eq!(sched.sigmas(), want_s.as_slice(), "{}: sigmas", case.name);
        for (kind, tag) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
            let fed: Vec<Tensor> = sched
                .timesteps()
                .iter()
                .map(|&t| latents::timestep_input(t, 1, kind, tch::Device::Cpu))
                .collect();
            let reference = &want[&format!("model_timesteps_{tag}")];
            assert_eq!(reference.kind(), kind);
            assert!(Tensor::cat(&fed, 0).equal(reference), "{}: model timesteps {tag}", case.name);
            let mut fresh = FlowMatchEulerScheduler::dynamic(&cfg, case.steps, seq).unwrap();
            let worst =
                check_trajectory(case, &mut fresh, kind, &toy, &want[&format!("samples_{tag}")]);
            eprintln!("{} {tag}: max |diff| over all steps {worst:.3e}", case.name);
        }
        let _ = sched.step_index();
    }
}

#[test]
fn dynamic_shift_reference_values() {
    // models.md §4.3: N = 50 at 1024² and 1328².
    let cfg = FlowMatchDynamicConfig::qwen_image();
    assert!((calculate_shift(4096, 256, 8192, 0.5, 0.9) - 0.693548).abs() < 1e-6);
    let s = FlowMatchEulerScheduler::dynamic(&cfg, 50, 4096).unwrap();
    assert_eq!(s.sigmas().len(), 51);
    assert!((s.sigmas()[1] - 0.989701).abs() < 1e-6);
    assert!((s.sigmas()[49] - 0.02).abs() < 1e-7 && s.sigmas()[50] == 0.0);
    assert!((cfg.mu(6889) - 0.834325).abs() < 1e-6);
}

#[test]
fn bad_dynamic_settings_are_rejected() {
    let cfg = FlowMatchDynamicConfig::qwen_image();
    assert!(FlowMatchEulerScheduler::dynamic(&cfg, 0, 4096).is_err());
    // One step leaves the last sigma at 1: nothing to stretch to shift_terminal.
    assert!(FlowMatchEulerScheduler::dynamic(&cfg, 1, 4096).is_err());
    assert!(FlowMatchEulerScheduler::from_sigmas(&cfg, &[1.0, 0.0], 0.7).is_err());
    assert!(FlowMatchEulerScheduler::from_sigmas(&cfg, &[1.0, 0.5], f64::NAN).is_err());
    let c = FlowMatchDynamicConfig { stochastic_sampling: true, ..cfg.clone() };
    let err = FlowMatchEulerScheduler::dynamic(&c, 10, 4096).unwrap_err().to_string();
    assert!(err.contains("stochastic_sampling"), "{err}");
    let c = FlowMatchDynamicConfig { time_shift_type: "cosine".into(), ..cfg };
    assert!(FlowMatchEulerScheduler::dynamic(&c, 10, 4096).is_err());
}
