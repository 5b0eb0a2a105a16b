//! Parity of x2v's Wan2.1 DiT with diffusers' `WanTransformer3DModel` on tiny random checkpoints
//! (`tools/fixtures/wan_dit.py`), loaded from both the diffusers and the original layouts.

mod common;

use std::path::Path;

use tch::{Device, Kind, Tensor};
use x2v_models::Error;
use x2v_models::wan::transformer::WanTransformer3DModel;

/// fp32 tolerance, relative to max(1, max|reference|).
const FP32_TOL: f64 = 1e-4;
/// bf16 tolerance on the relative L2 error against diffusers' own bf16 forward.
const BF16_REL_L2: f64 = 1e-2;

fn run(dir: &Path, io: &std::collections::HashMap<String, Tensor>, kind: Kind) -> Tensor {
    let model = WanTransformer3DModel::load(dir, Device::Cpu, kind).unwrap();
    model
        .forward(
            &io["hidden_states"],
            &io["timestep"],
            &io["encoder_hidden_states"],
            io.get("encoder_hidden_states_image"),
        )
        .unwrap()
        .to_kind(Kind::Float)
}

fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
    let num = (got - want).square().sum(Kind::Double).sqrt().double_value(&[]);
    num / want.square().sum(Kind::Double).sqrt().double_value(&[])
}

fn parity(name: &str) {
    let fx = common::fixture("wan_dit");
    let io = common::tensors(&fx.join(format!("{name}_io.safetensors")));
    for layout in ["diffusers", "original"] {
        let got = run(&fx.join(format!("{name}_{layout}")), &io, Kind::Float);
        let (diff, scale) = common::max_abs_diff(&got, &io["output"]);
        eprintln!("{name} {layout} fp32: max |diff| {diff:.3e} (reference scale {scale:.3e})");
        common::assert_close(&format!("{name} {layout} fp32"), &got, &io["output"], FP32_TOL);
    }
    let got = run(&fx.join(format!("{name}_diffusers")), &io, Kind::BFloat16);
    let err = rel_l2(&got, &io["output_bf16"]);
    let err_fp32 = rel_l2(&io["output_bf16"], &io["output"]);
    eprintln!(
        "{name} bf16: rel-L2 vs diffusers bf16 {err:.3e} (diffusers bf16 vs fp32: {err_fp32:.3e})"
    );
    assert!(err <= BF16_REL_L2, "{name} bf16 rel-L2 {err:.3e} exceeds {BF16_REL_L2:e}");
}

#[test]
fn t2v_matches_diffusers_from_both_layouts() {
    parity("t2v");
}

#[test]
fn i2v_matches_diffusers_from_both_layouts() {
    parity("i2v");
}

#[test]
fn incomplete_checkpoint_names_the_missing_key() {
    let fx = common::fixture("wan_dit");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fx.join("t2v_diffusers/config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors =
        common::tensors(&fx.join("t2v_diffusers/diffusion_pytorch_model.safetensors"));
    drop(tensors.remove("blocks.1.attn2.norm_k.weight").unwrap());
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&tensors, dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let err = WanTransformer3DModel::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(
        matches!(&err, Error::MissingKey { key, .. } if key == "blocks.1.attn2.norm_k.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("blocks.1.attn2.norm_k.weight"), "{err}");

    // A T2V config over I2V weights: the first unexpected key is named.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fx.join("t2v_original/config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = common::tensors(&fx.join("t2v_original/diffusion_pytorch_model.safetensors"));
    tensors.insert(
        "blocks.0.cross_attn.k_img.weight".into(),
        Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
    );
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&tensors, dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let err = WanTransformer3DModel::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(err.to_string().contains("unexpected key `blocks.0.attn2.add_k_proj.weight`"), "{err}");
}

#[test]
fn bad_inputs_are_rejected_with_a_message() {
    let fx = common::fixture("wan_dit");
    let model =
        WanTransformer3DModel::load(&fx.join("t2v_diffusers"), Device::Cpu, Kind::Float).unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let ctx = Tensor::zeros([1, 512, 48], opts);
    let t = Tensor::from_slice(&[500i64]);
    let cases = [
        (Tensor::zeros([1, 16, 3, 7, 8], opts), "height must be a positive multiple"),
        (Tensor::zeros([1, 36, 3, 8, 8], opts), "latents must be [B, 16, F, H, W]"),
        (Tensor::zeros([16, 3, 8, 8], opts), "latents must be"),
    ];
    for (x, want) in cases {
        let err = model.forward(&x, &t, &ctx, None).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    let x = Tensor::zeros([1, 16, 3, 8, 8], opts);
    let err = model.forward(&x, &t, &Tensor::zeros([1, 512, 40], opts), None).unwrap_err();
    assert!(err.to_string().contains("context must be [B, L, 48]"), "{err}");
    let img = Tensor::zeros([1, 257, 1280], opts);
    let err = model.forward(&x, &t, &ctx, Some(&img)).unwrap_err();
    assert!(err.to_string().contains("takes no image context"), "{err}");
}

/// LoRA parity: adapters in the diffusers/PEFT and the original Wan key formats, alone and
/// composed with weights, against diffusers' `load_lora_weights` + `set_adapters`
/// (`tools/fixtures/wan_lora.py`); clearing them gives the base model back bit for bit.
#[test]
fn lora_adapters_match_diffusers_and_leave_the_base_untouched() {
    use std::rc::Rc;
    use x2v_models::wan::lora::{active_deltas, clear_loras, load_adapter, set_loras};

    let fx = common::fixture("wan_lora");
    let io = common::tensors(&fx.join("io.safetensors"));
    let dit =
        WanTransformer3DModel::load(&fx.join("transformer"), Device::Cpu, Kind::Float).unwrap();
    let forward = || {
        dit.forward(&io["hidden_states"], &io["timestep"], &io["encoder_hidden_states"], None)
            .unwrap()
    };
    let base = forward();
    common::assert_close("base", &base, &io["base"], FP32_TOL);
    let style = Rc::new(load_adapter("style", &fx.join("loras/style.safetensors")).unwrap());
    let motion = Rc::new(load_adapter("motion", &fx.join("loras/motion.safetensors")).unwrap());
    // PEFT: 2 blocks x 5 layers, no alpha; original: 2 blocks x 4 layers, alpha 1 at rank 2.
    assert_eq!(style.layers().len(), 10);
    assert_eq!(motion.layers().len(), 8);
    assert!(motion.layers().values().all(|l| l.alpha_scale() == 0.5));

    set_loras(&dit, &[(style.clone(), 0.8)]).unwrap();
    common::assert_close("style at 0.8", &forward(), &io["style"], FP32_TOL);
    set_loras(&dit, &[(style.clone(), 0.8), (motion.clone(), 1.5)]).unwrap();
    assert_eq!(active_deltas(&dit), 18);
    let both = forward();
    common::assert_close("style 0.8 + motion 1.5", &both, &io["both"], FP32_TOL);
    // The check can fail: another weight is another output.
    set_loras(&dit, &[(style.clone(), 0.8), (motion.clone(), 1.0)]).unwrap();
    let (diff, _) = common::max_abs_diff(&forward(), &io["both"]);
    assert!(diff > 1e-2, "motion's weight made no difference ({diff})");

    clear_loras(&dit);
    assert_eq!(active_deltas(&dit), 0);
    assert!(forward().equal(&base), "the base model changed after its adapters were cleared");

    // An adapter made for another model is refused whole, naming it and the layer, and the
    // adapters active before stay as they were.
    set_loras(&dit, &[(style.clone(), 0.8)]).unwrap();
    let misfit = Rc::new(load_adapter("misfit", &fx.join("loras/misfit.safetensors")).unwrap());
    let err = set_loras(&dit, &[(misfit, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("`misfit`") && err.contains("blocks.0.attn1.to_q"), "{err}");
    common::assert_close("style kept", &forward(), &io["style"], FP32_TOL);
    let err = set_loras(&dit, &[(style, f64::NAN)]).unwrap_err().to_string();
    assert!(err.contains("finite"), "{err}");
}

#[test]
fn lora_files_that_are_not_adapters_are_refused_by_key() {
    use x2v_models::wan::lora::load_adapter;

    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, Tensor)]| {
        let path = tmp.path().join(name);
        Tensor::write_safetensors(tensors, &path).unwrap();
        path
    };
    let t = |dims: &[i64]| Tensor::ones(dims, (Kind::Float, Device::Cpu));
    let cases = [
        (
            write("diff.safetensors", &[("diffusion_model.blocks.0.self_attn.q.diff_b", t(&[4]))]),
            "diffusion_model.blocks.0.self_attn.q.diff_b",
        ),
        (
            write(
                "unknown.safetensors",
                &[
                    ("transformer.blocks.0.attn9.to_q.lora_A.weight", t(&[2, 4])),
                    ("transformer.blocks.0.attn9.to_q.lora_B.weight", t(&[4, 2])),
                ],
            ),
            "",
        ),
        (
            write("half.safetensors", &[("transformer.proj_out.lora_A.weight", t(&[2, 4]))]),
            "lacks its down or up",
        ),
        (
            write(
                "rank.safetensors",
                &[
                    ("transformer.proj_out.lora_A.weight", t(&[2, 4])),
                    ("transformer.proj_out.lora_B.weight", t(&[4, 3])),
                ],
            ),
            "rank-r pair",
        ),
    ];
    for (path, needle) in cases {
        match load_adapter("x", &path) {
            Err(e) => assert!(e.to_string().contains(needle), "{}: {e}", path.display()),
            // Module names the DiT does not have are caught when the adapter meets the model.
            Ok(a) => assert!(needle.is_empty() && a.layers().contains_key("blocks.0.attn9.to_q")),
        }
    }
    let err = load_adapter("x", &tmp.path().join("missing.safetensors")).unwrap_err();
    assert!(err.to_string().contains("missing.safetensors"), "{err}");
}

#[test]
fn the_adapter_store_reads_on_demand_and_evicts_least_recently_used() {
    use x2v_models::lora::LoraStore;
    use x2v_models::wan::lora::load_adapter;

    let fx = common::fixture("wan_lora");
    let dir = fx.join("loras");
    let style_bytes = load_adapter("style", &dir.join("style.safetensors")).unwrap().bytes();
    // Room for `style` and not for `style` and `motion` together.
    let store = LoraStore::new(&dir, style_bytes + 1, load_adapter).unwrap();
    assert_eq!(store.names(), ["misfit", "motion", "style"]);
    let style = store.get("style").unwrap();
    assert!(
        std::rc::Rc::ptr_eq(&style, &store.get("style").unwrap()),
        "a hit reads the file again"
    );
    store.get("motion").unwrap();
    assert_eq!(store.cached(), ["motion"]);
    // Evicted, yet still whole for whoever holds it; asked again, it is read again.
    assert_eq!(style.layers().len(), 10);
    assert!(!std::rc::Rc::ptr_eq(&style, &store.get("style").unwrap()));
    assert_eq!(store.cached(), ["style"]);

    let err = store.get("sketch").unwrap_err().to_string();
    assert!(err.contains("`sketch`") && err.contains("misfit, motion, style"), "{err}");
    let err = store.get("../style").unwrap_err().to_string();
    assert!(err.contains("must be"), "{err}");
    assert!(LoraStore::new(&dir.join("none"), 1, load_adapter).is_err());
}
