//! CLIP ViT-H/14 vision tower, Wan I2V's image encoder: penultimate-layer hidden states
//! (`hidden_states[-2]`, no post-LN, CLS kept), plus the `CLIPImageProcessor` preprocessing.
//!
//! Reference: transformers `models/clip/modeling_clip.py` (`CLIPVisionModel`; module paths follow
//! its `vision_model.*` state dict) and `image_processing_pil_clip.py`; diffusers
//! `pipeline_wan_i2v.py` `encode_image`. The original release is `Wan-Video/Wan2.1`
//! `wan/modules/clip.py` (`visual(x, use_31_block=True)`), whose `visual.*` keys (fused
//! `to_qkv`) are converted by [`convert_original`].
//!
//! Boundary shapes: `pixel_values [B, 3, 224, 224]` (normalised) → `[B, 257, 1280]` for ViT-H/14.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor, nn};

use crate::config::{ModelConfig, checked, read_config};
use crate::error::{Component, Error};
use crate::nn::{Builder, LayerNorm, Linear};
use crate::weights::{self, Checkpoint, Entry, LoadOptions};

/// `CLIPVisionConfig` fields the tower uses (unknown keys ignored; a full `CLIPConfig` keeps
/// them under `vision_config`, which [`ClipVisionConfig::from_file`] also accepts).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// Transformer width.
    pub hidden_size: i64,
    /// MLP inner size.
    pub intermediate_size: i64,
    /// Transformer layers (the output is taken after `num_hidden_layers - 1`).
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Input resolution (square).
    pub image_size: i64,
    /// Patch size of the stem convolution.
    pub patch_size: i64,
    /// Input channels.
    pub num_channels: i64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP activation: `gelu` (exact, ViT-H) or `quick_gelu`.
    pub hidden_act: String,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self::vit_h_14()
    }
}

impl ClipVisionConfig {
    /// `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` vision tower (Wan2.1 I2V).
    pub fn vit_h_14() -> Self {
        ClipVisionConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            num_channels: 3,
            layer_norm_eps: 1e-5,
            hidden_act: "gelu".into(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        crate::config::read_config_file(path)
    }

    /// Tokens per image: patches plus CLS (257 for ViT-H/14 at 224²).
    pub fn num_positions(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

impl ModelConfig for ClipVisionConfig {
    const COMPONENT: Component = Component::ImageEncoder;

    fn validate(&self) -> Result<(), String> {
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(format!(
                "hidden_act = {:?}; supported: \"gelu\", \"quick_gelu\"",
                self.hidden_act
            ));
        }
        if self.num_hidden_layers < 2 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "num_hidden_layers {} (need ≥ 2 for the penultimate layer), hidden_size {} not divisible by {} heads",
                self.num_hidden_layers, self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    fn select(mut json: serde_json::Value) -> serde_json::Value {
        match json.get_mut("vision_config") {
            Some(inner) => inner.take(),
            None => json,
        }
    }
}

/// Converts a checkpoint to `vision_model.*` keys: transformers saves with or without the
/// `vision_model.` prefix; the original Wan `visual.*` keys are renamed and the fused `to_qkv`
/// split into q/k/v. Keys the penultimate output never uses (last layer, post-LN, projection,
/// the text tower) are dropped.
pub fn convert_original(ckpt: Checkpoint, cfg: &ClipVisionConfig) -> Checkpoint {
    let last_layer = cfg.num_hidden_layers - 1;
    let unused = |k: &str| {
        k.starts_with("post_layernorm.")
            || k.starts_with("visual_projection.")
            || k.starts_with(&format!("encoder.layers.{last_layer}."))
    };
    ckpt.transform(|key, t| {
        let renamed: Vec<(String, Entry)> = if let Some(k) = key.strip_prefix("visual.") {
            original_visual_key(k, t)
        } else if let Some(k) = key.strip_prefix("vision_model.") {
            vec![(k.to_owned(), t)]
        } else if key.starts_with("textual.")
            || key == "log_scale"
            || key == "visual_projection.weight"
        {
            vec![]
        } else {
            vec![(key.to_owned(), t)]
        };
        renamed
            .into_iter()
            .filter(|(k, _)| !unused(k))
            .map(|(k, t)| (format!("vision_model.{k}"), t))
            .collect()
    })
}

/// Original `visual.*` fragments → transformers `vision_model.*` fragments (models.md §3.2).
const ORIGINAL_LAYER_KEYS: &[(&str, &str)] = &[
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.proj.", "self_attn.out_proj."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
];

fn original_visual_key(k: &str, t: Entry) -> Vec<(String, Entry)> {
    match k {
        "patch_embedding.weight" => vec![("embeddings.patch_embedding.weight".into(), t)],
        "cls_embedding" => {
            let n = t.shape().iter().product::<i64>();
            vec![("embeddings.class_embedding".into(), t.reshape(&[n]))]
        }
        "pos_embedding" => {
            // `[1, positions, width]` → `[positions, width]`.
            let shape: Vec<i64> = match t.shape() {
                [1, rest @ ..] => rest.to_vec(),
                other => other.to_vec(),
            };
            vec![("embeddings.position_embedding.weight".into(), t.reshape(&shape))]
        }
        "head" => vec![],
        _ => {
            if let Some(rest) = k.strip_prefix("pre_norm.") {
                return vec![(format!("pre_layrnorm.{rest}"), t)];
            }
            if let Some(rest) = k.strip_prefix("post_norm.") {
                return vec![(format!("post_layernorm.{rest}"), t)];
            }
            let Some((idx, tail)) = k.strip_prefix("transformer.").and_then(|r| r.split_once('.'))
            else {
                return vec![(k.to_owned(), t)];
            };
            let layer = format!("encoder.layers.{idx}.");
            if let Some(kind) = tail.strip_prefix("attn.to_qkv.") {
                let parts = t.chunk0(3);
                return ["q", "k", "v"]
                    .iter()
                    .zip(parts)
                    .map(|(n, p)| (format!("{layer}self_attn.{n}_proj.{kind}"), p))
                    .collect();
            }
            let tail = ORIGINAL_LAYER_KEYS
                .iter()
                .find_map(|(a, b)| tail.strip_prefix(a).map(|r| format!("{b}{r}")))
                .unwrap_or_else(|| tail.to_owned());
            vec![(format!("{layer}{tail}"), t)]
        }
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn new(p: Builder, cfg: &ClipVisionConfig) -> Self {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let a = &p / "self_attn";
        let m = &p / "mlp";
        EncoderLayer {
            layer_norm1: LayerNorm::new(&p / "layer_norm1", d, eps),
            q_proj: Linear::new(&a / "q_proj", d, d),
            k_proj: Linear::new(&a / "k_proj", d, d),
            v_proj: Linear::new(&a / "v_proj", d, d),
            out_proj: Linear::new(&a / "out_proj", d, d),
            layer_norm2: LayerNorm::new(&p / "layer_norm2", d, eps),
            fc1: Linear::new(&m / "fc1", d, cfg.intermediate_size),
            fc2: Linear::new(&m / "fc2", cfg.intermediate_size, d),
        }
    }

    fn forward(&self, x: &Tensor, heads: i64, quick_gelu: bool) -> Tensor {
        let [b, l, _] = x.size()[..] else { unreachable!("3-D hidden states") };
        let n = self.layer_norm1.forward(x);
        let split = |t: Tensor| t.view([b, l, heads, -1]).transpose(1, 2);
        let (q, k, v) = (
            split(self.q_proj.forward(&n)),
            split(self.k_proj.forward(&n)),
            split(self.v_proj.forward(&n)),
        );
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let x = x + self.out_proj.forward(&a.transpose(1, 2).reshape([b, l, -1]));
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = if quick_gelu { &h * (&h * 1.702).sigmoid() } else { h.gelu("none") };
        &x + self.fc2.forward(&h)
    }
}

/// The CLIP vision tower up to its penultimate layer, with transformers module paths
/// (`vision_model.embeddings.*`, `vision_model.pre_layrnorm`, `vision_model.encoder.layers.N.*`).
#[derive(Debug)]
pub struct ClipVisionModel {
    cfg: ClipVisionConfig,
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    /// Layers `0..num_hidden_layers-1`: the last one does not contribute to `hidden_states[-2]`.
    layers: Vec<EncoderLayer>,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

impl ClipVisionModel {
    /// The tower for `cfg` with empty parameters in `kind` on `device`.
    pub fn build(cfg: &ClipVisionConfig, device: Device, kind: Kind) -> Result<Self, Error> {
        let cfg = checked(cfg.clone())?;
        let vs = nn::VarStore::new(device);
        let v = Builder::new(&vs, kind, &[]) / "vision_model";
        let e = &v / "embeddings";
        let d = cfg.hidden_size;
        let ps = cfg.patch_size;
        Ok(ClipVisionModel {
            patch_embedding: (&e / "patch_embedding")
                .param("weight", &[d, cfg.num_channels, ps, ps]),
            class_embedding: e.param("class_embedding", &[d]),
            position_embedding: (&e / "position_embedding")
                .param("weight", &[cfg.num_positions(), d]),
            pre_layrnorm: LayerNorm::new(&v / "pre_layrnorm", d, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers - 1)
                .map(|i| EncoderLayer::new(&v / "encoder" / "layers" / i, &cfg))
                .collect(),
            cfg,
            vs,
        })
    }

    /// Loads from a transformers `image_encoder/` directory, a safetensors file, or the original
    /// `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` (layout detected from the keys).
    /// `cfg` defaults to the directory's `config.json`, else the ViT-H/14 preset.
    pub fn load(
        path: &Path,
        cfg: Option<ClipVisionConfig>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        let cfg = match cfg {
            Some(c) => c,
            None => read_config(path, ClipVisionConfig::vit_h_14)?,
        };
        let ckpt = convert_original(Checkpoint::open(path)?, &cfg);
        let model = Self::build(&cfg, device, kind)?;
        weights::load_into(&model.vs, &ckpt, &LoadOptions::strict())?;
        weights::log_loaded(Component::ImageEncoder, &ckpt, &model.vs, kind, started);
        Ok(model)
    }

    /// Its parameters, by checkpoint key.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// `CLIPVisionModel(pixel_values, output_hidden_states=True).hidden_states[-2]`:
    /// `[B, num_positions, hidden_size]`.
    pub fn penultimate(&self, pixel_values: &Tensor) -> Result<Tensor, Error> {
        let size = pixel_values.size();
        let (c, s) = (self.cfg.num_channels, self.cfg.image_size);
        if size.len() != 4 || size[1] != c || size[2] != s || size[3] != s || size[0] == 0 {
            return Err(Error::input(
                Component::ImageEncoder,
                format!("pixel_values must be [B, {c}, {s}, {s}], got shape {size:?}"),
            ));
        }
        let _guard = tch::no_grad_guard();
        let w = &self.patch_embedding;
        let x = pixel_values.to_device(w.device()).to_kind(w.kind());
        let ps = self.cfg.patch_size;
        let patches = x.conv2d(w, None::<&Tensor>, [ps, ps], [0, 0], [1, 1], 1);
        let patches = patches.flatten(2, 3).transpose(1, 2);
        let b = size[0];
        let cls =
            self.class_embedding.view([1, 1, -1]).expand([b, 1, -1], false).to_kind(patches.kind());
        let mut h = Tensor::cat(&[cls, patches], 1) + &self.position_embedding;
        h = self.pre_layrnorm.forward(&h);
        let quick = self.cfg.hidden_act == "quick_gelu";
        for layer in &self.layers {
            h = layer.forward(&h, self.cfg.num_attention_heads, quick);
        }
        Ok(h)
    }
}

/// `CLIPImageProcessor` settings (Wan I2V `image_processor/`: OpenAI CLIP mean/std, 224).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// The shorter side is resized to this (bicubic), keeping the aspect ratio.
    pub shortest_edge: i64,
    /// Then the centre `crop × crop` is taken.
    pub crop: i64,
    /// Per-channel mean after scaling to `[0, 1]`.
    pub mean: [f64; 3],
    /// Per-channel std after scaling to `[0, 1]`.
    pub std: [f64; 3],
}

impl Default for ClipPreprocess {
    fn default() -> Self {
        ClipPreprocess {
            shortest_edge: 224,
            crop: 224,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }
}

impl ClipPreprocess {
    /// An RGB image `uint8 [H, W, 3]` → `pixel_values [1, 3, crop, crop]` (fp32).
    ///
    /// Resizing uses libtorch's antialiased bicubic (`a = -0.5`, PIL's kernel) on floats, rounded
    /// back to bytes as PIL returns them; PIL filters in two separable passes with 8-bit rounding
    /// in between, so individual pixels may differ from transformers' PIL path by a level or two.
    /// The output size follows transformers: the long side becomes `int(edge · long / short)`.
    pub fn apply(&self, image: &Tensor) -> Result<Tensor, Error> {
        let size = image.size();
        if size.len() != 3 || size[2] != 3 || image.kind() != Kind::Uint8 {
            return Err(Error::input(
                Component::ImageEncoder,
                format!("the image must be uint8 [H, W, 3], got {:?} {size:?}", image.kind()),
            ));
        }
        let (h, w) = (size[0], size[1]);
        if h.min(w) == 0 {
            return Err(Error::input(
                Component::ImageEncoder,
                format!("empty image: shape {size:?}"),
            ));
        }
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = (self.shortest_edge as f64 * long as f64 / short as f64) as i64;
        let (nh, nw) =
            if w <= h { (new_long, self.shortest_edge) } else { (self.shortest_edge, new_long) };
        if nh < self.crop || nw < self.crop {
            return Err(Error::input(
                Component::ImageEncoder,
                format!("resized image {nh}×{nw} is smaller than the {c}×{c} crop", c = self.crop),
            ));
        }
        let _guard = tch::no_grad_guard();
        let x = image.permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float);
        let x = if (nh, nw) == (h, w) {
            x
        } else {
            x.internal_upsample_bicubic2d_aa([nh, nw], false, None, None).round().clamp(0.0, 255.0)
        };
        let (top, left) = ((nh - self.crop) / 2, (nw - self.crop) / 2);
        let x = x.narrow(2, top, self.crop).narrow(3, left, self.crop);
        let mean = Tensor::from_slice(&self.mean).to_kind(Kind::Float).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&self.std).to_kind(Kind::Float).view([1, 3, 1, 1]);
        Ok(((x * (1.0 / 255.0)) - mean) / std)
    }
}
