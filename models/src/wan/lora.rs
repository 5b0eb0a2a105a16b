//! LoRA adapters on the Wan DiT, as diffusers' `WanLoraLoaderMixin` reads them:
//!
//! - diffusers/PEFT keys (`transformer.blocks.N.attn1.to_q.lora_A.weight`, the `transformer.`
//!   prefix optional), whose module names are the DiT's own;
//! - the original release's / LightX2V's keys (`diffusion_model.blocks.N.self_attn.q.lora_down.
//!   weight`, `lora_up`, `alpha`; `lora_A`/`lora_B` also), whose module names map as the
//!   checkpoint keys do ([`remap_key`]).
//!
//! Adapters are applied at run time on top of the untouched weights ([`set_loras`]); clearing
//! them ([`clear_loras`]) gives the base model back exactly.

use std::path::Path;
use std::rc::Rc;

use super::transformer::{WanTransformer3DModel, remap_key};
use crate::error::Error;
use crate::lora::LoraAdapter;
use crate::nn::LoraDelta;

/// The DiT module a key's module part names, in diffusers naming.
fn module_of(module: &str) -> Option<String> {
    if let Some(m) = module.strip_prefix("transformer.") {
        return Some(m.to_owned());
    }
    let original = module.strip_prefix("diffusion_model.").unwrap_or(module);
    // Original names map like checkpoint keys: map `<module>.weight` and take the suffix off.
    let mapped = remap_key(&format!("{original}.weight"))?;
    Some(mapped.strip_suffix(".weight")?.to_owned())
}

/// Reads a Wan LoRA adapter (either key format) from `path` under `name`.
pub fn load_adapter(name: &str, path: &Path) -> Result<LoraAdapter, Error> {
    LoraAdapter::load(name, path, module_of)
}

/// Checks that every layer of `adapter` lands on a layer of `dit` with matching sizes.
pub fn check_fits(dit: &WanTransformer3DModel, adapter: &LoraAdapter) -> Result<(), Error> {
    let bad = |message: String| Error::Lora { adapter: adapter.name().to_owned(), message };
    for (module, layer) in adapter.layers() {
        let (linear, _, rows) = dit.lora_target(module).ok_or_else(|| {
            bad(format!("targets `{module}`, which this DiT has no LoRA-able layer for"))
        })?;
        let (d_in, _) = linear.dims();
        let (down, up) = (layer.down.size(), layer.up.size());
        if down[1] != d_in || up[0] != rows {
            return Err(bad(format!(
                "layer `{module}` maps {} to {} features; this DiT's `{module}` maps {d_in} to \
                 {rows}: the adapter was made for another model",
                down[1], up[0]
            )));
        }
    }
    Ok(())
}

/// Applies `adapters` (each with its weight, in order) to `dit` in place of whatever was active:
/// all of them are checked first, so on an error the DiT is left as it was. The matrices are
/// copied to the DiT's device and dtype.
pub fn set_loras(
    dit: &WanTransformer3DModel,
    adapters: &[(Rc<LoraAdapter>, f64)],
) -> Result<(), Error> {
    for (adapter, weight) in adapters {
        if !weight.is_finite() {
            return Err(Error::Lora {
                adapter: adapter.name().to_owned(),
                message: format!("scale must be a finite number, got {weight}"),
            });
        }
        check_fits(dit, adapter)?;
    }
    let _guard = tch::no_grad_guard();
    clear_loras(dit);
    let (device, kind) = (dit.device(), dit.kind());
    for (adapter, weight) in adapters {
        for (module, layer) in adapter.layers() {
            let (linear, row, _) = dit.lora_target(module).expect("checked above");
            linear.push_lora(LoraDelta {
                down: layer.down.to_device(device).to_kind(kind),
                up: layer.up.to_device(device).to_kind(kind),
                scale: layer.alpha_scale() * weight,
                row,
            });
        }
    }
    Ok(())
}

/// Removes every adapter from `dit`: it computes with its own weights alone again.
pub fn clear_loras(dit: &WanTransformer3DModel) {
    for layer in dit.lora_layers() {
        layer.set_lora(Vec::new());
    }
}

/// How many adapter deltas `dit` applies in all (0: the base model).
pub fn active_deltas(dit: &WanTransformer3DModel) -> usize {
    dit.lora_layers().iter().map(|l| l.lora_count()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_key_formats_name_diffusers_modules() {
        assert_eq!(module_of("transformer.blocks.1.attn1.to_q").unwrap(), "blocks.1.attn1.to_q");
        assert_eq!(
            module_of("diffusion_model.blocks.0.self_attn.q").unwrap(),
            "blocks.0.attn1.to_q"
        );
        assert_eq!(
            module_of("diffusion_model.blocks.2.cross_attn.o").unwrap(),
            "blocks.2.attn2.to_out.0"
        );
        assert_eq!(module_of("blocks.2.cross_attn.k_img").unwrap(), "blocks.2.attn2.add_k_proj");
        assert_eq!(module_of("diffusion_model.blocks.0.ffn.2").unwrap(), "blocks.0.ffn.net.2");
        assert_eq!(module_of("diffusion_model.head.head").unwrap(), "proj_out");
    }
}
