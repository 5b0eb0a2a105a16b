//! Checkpoint key layouts of the Wan2.1 DiT: the original release's names (`WanModel`) mapped to
//! diffusers' `WanTransformer3DModel` names, which are x2v's var-store paths. The rules are the
//! mapping of diffusers' `convert_wan_transformer_to_diffusers`, written as prefix rules.

/// Original Wan key prefixes → diffusers, outside the blocks.
const ORIGINAL_TOP_KEYS: &[(&str, &str)] = &[
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
];

/// Original Wan key prefixes → diffusers, inside `blocks.N.`.
const ORIGINAL_BLOCK_KEYS: &[(&str, &str)] = &[
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
];

/// Some single-file checkpoints carry this prefix on every key.
const WRAPPER_PREFIX: &str = "model.diffusion_model.";

/// Maps an original-release key to its diffusers name; unknown keys pass through unchanged (a
/// strict load then reports them).
pub fn remap_key(key: &str) -> Option<String> {
    let key = key.strip_prefix(WRAPPER_PREFIX).unwrap_or(key);
    if let Some((idx, tail)) = key.strip_prefix("blocks.").and_then(|r| r.split_once('.')) {
        for (from, to) in ORIGINAL_BLOCK_KEYS {
            if let Some(rest) = tail.strip_prefix(from) {
                return Some(format!("blocks.{idx}.{to}{rest}"));
            }
        }
        return Some(key.to_owned());
    }
    for (from, to) in ORIGINAL_TOP_KEYS {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    Some(key.to_owned())
}

/// diffusers-layout keys: strips the wrapper prefix and drops `norm_added_q` (unused, as in diffusers).
pub fn diffusers_key(key: &str) -> Option<String> {
    let key = key.strip_prefix(WRAPPER_PREFIX).unwrap_or(key);
    (!key.contains(".norm_added_q.")).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_keys_map_to_diffusers_names() {
        let cases = [
            ("model.diffusion_model.blocks.3.self_attn.o.weight", "blocks.3.attn1.to_out.0.weight"),
            ("blocks.0.cross_attn.norm_k_img.weight", "blocks.0.attn2.norm_added_k.weight"),
            ("blocks.12.norm3.bias", "blocks.12.norm2.bias"),
            ("blocks.1.modulation", "blocks.1.scale_shift_table"),
            ("blocks.1.ffn.0.weight", "blocks.1.ffn.net.0.proj.weight"),
            ("head.modulation", "scale_shift_table"),
            ("head.head.bias", "proj_out.bias"),
            ("img_emb.proj.4.weight", "condition_embedder.image_embedder.norm2.weight"),
            ("time_projection.1.weight", "condition_embedder.time_proj.weight"),
            ("patch_embedding.weight", "patch_embedding.weight"),
        ];
        for (orig, want) in cases {
            assert_eq!(remap_key(orig).as_deref(), Some(want), "{orig}");
        }
        assert_eq!(diffusers_key("blocks.0.attn2.norm_added_q.weight"), None);
    }
}
