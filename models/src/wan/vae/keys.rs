//! The original releases' `Wan2.1_VAE.pth` and `Wan2.2_VAE.pth` key layouts mapped to diffusers
//! names.

use super::config::VaeConfig;

/// Original `WanVAE_` key prefixes → diffusers prefixes for `cfg` (models.md §2.5). Wan2.1: the
/// decoder's flat `upsamples.i` list groups into `up_blocks.b.{resnets.j, upsamplers.0}`. Wan2.2
/// (`is_residual`): each stage is one module, `encoder.downsamples.i.downsamples.j` (residual
/// blocks, then the downsampler) and `decoder.upsamples.i.upsamples.j` (likewise).
pub fn original_key_table(cfg: &VaeConfig) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> =
        vec![("conv1.".into(), "quant_conv.".into()), ("conv2.".into(), "post_quant_conv.".into())];
    let res = [
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    let res_block = |t: &mut Vec<(String, String)>, orig: &str, new: &str| {
        for (a, b) in res {
            t.push((format!("{orig}{a}"), format!("{new}{b}")));
        }
    };
    for part in ["encoder", "decoder"] {
        t.push((format!("{part}.conv1."), format!("{part}.conv_in.")));
        t.push((format!("{part}.head.0."), format!("{part}.norm_out.")));
        t.push((format!("{part}.head.2."), format!("{part}.conv_out.")));
        res_block(&mut t, &format!("{part}.middle.0."), &format!("{part}.mid_block.resnets.0."));
        res_block(&mut t, &format!("{part}.middle.2."), &format!("{part}.mid_block.resnets.1."));
        t.push((format!("{part}.middle.1."), format!("{part}.mid_block.attentions.0.")));
    }
    let stages = cfg.dim_mult.len();
    let nrb = cfg.num_res_blocks as usize;
    if cfg.is_residual {
        for s in 0..stages {
            for j in 0..nrb {
                let (orig, new) = ("encoder.downsamples", "encoder.down_blocks");
                res_block(
                    &mut t,
                    &format!("{orig}.{s}.downsamples.{j}."),
                    &format!("{new}.{s}.resnets.{j}."),
                );
            }
            for j in 0..=nrb {
                let (orig, new) = ("decoder.upsamples", "decoder.up_blocks");
                res_block(
                    &mut t,
                    &format!("{orig}.{s}.upsamples.{j}."),
                    &format!("{new}.{s}.resnets.{j}."),
                );
            }
            if s != stages - 1 {
                t.push((
                    format!("encoder.downsamples.{s}.downsamples.{nrb}."),
                    format!("encoder.down_blocks.{s}.downsampler."),
                ));
                t.push((
                    format!("decoder.upsamples.{s}.upsamples.{}.", nrb + 1),
                    format!("decoder.up_blocks.{s}.upsampler."),
                ));
            }
        }
        return t;
    }
    let mut i = 0;
    for s in 0..stages {
        for _ in 0..nrb {
            res_block(
                &mut t,
                &format!("encoder.downsamples.{i}."),
                &format!("encoder.down_blocks.{i}."),
            );
            i += 1;
        }
        if s != stages - 1 {
            t.push((format!("encoder.downsamples.{i}."), format!("encoder.down_blocks.{i}.")));
            i += 1;
        }
    }
    let mut i = 0;
    for b in 0..stages {
        for j in 0..=nrb {
            res_block(
                &mut t,
                &format!("decoder.upsamples.{i}."),
                &format!("decoder.up_blocks.{b}.resnets.{j}."),
            );
            i += 1;
        }
        if b != stages - 1 {
            t.push((
                format!("decoder.upsamples.{i}."),
                format!("decoder.up_blocks.{b}.upsamplers.0."),
            ));
            i += 1;
        }
    }
    t
}

/// Applies the longest matching prefix of `table` to `key` (unmatched keys pass through, so a
/// strict load reports them as unexpected).
pub fn remap_key(table: &[(String, String)], key: &str) -> String {
    table
        .iter()
        .filter(|(orig, _)| key.starts_with(orig.as_str()))
        .max_by_key(|(orig, _)| orig.len())
        .map(|(orig, new)| format!("{new}{}", &key[orig.len()..]))
        .unwrap_or_else(|| key.to_owned())
}
