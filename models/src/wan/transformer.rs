//! Wan diffusion transformer (DiT): text-to-video and image-to-video (Wan2.1, Wan2.2).
//!
//! Paper: "Wan: Open and Advanced Large-Scale Video Generative Models" (Wan Team, 2025).
//! Reference: diffusers `models/transformers/transformer_wan.py` (`WanTransformer3DModel`); var-store
//! paths equal its state-dict keys. The original release's keys are remapped by [`remap_key`]
//! (`transformer_keys.rs`).
//!
//! Boundary: latent `[B, C_in, F, H, W]` (C_in 16, 36 for Wan2.1 I2V, 48 for Wan2.2 TI2V-5B),
//! timestep `[B]` or, per token as TI2V-5B takes it, `[B, L]` (`L` the patch count), text
//! context `[B, 512, text_dim]`, I2V image context `[B, 257, image_dim]` → velocity
//! `[B, C_out, F, H, W]` in the model dtype. Modulation and the time embedder run in fp32 (see
//! [`KEEP_F32`]); per-token timesteps are embedded once per distinct value.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::config::{Config, Layout};
use super::rope::RopeTables;
pub use super::transformer_keys::{diffusers_key, remap_key};
use crate::error::{Component, Error};
use crate::nn::{Builder, FeedForward, Fp32LayerNorm, Gelu, Linear, RmsNorm, layer_norm_no_affine};
use crate::nn::{sdpa, timestep_sinusoid};
use crate::weights::{Checkpoint, LoadOptions, load_into};

/// Parameters that stay fp32 in a bf16/fp16 model (diffusers' `_keep_in_fp32_modules`).
pub const KEEP_F32: &[&str] =
    &["condition_embedder.time_embedder.", "scale_shift_table", "norm1.", "norm2.", "norm3."];

#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    /// I2V: `(add_k_proj, add_v_proj, norm_added_k)` over the image context.
    added: Option<(Linear, Linear, RmsNorm)>,
    /// `to_q|to_k|to_v` (self-attention) or `to_k|to_v` (cross-attention), built after loading.
    fused: Option<Linear>,
    fused_added: Option<Linear>,
    heads: i64,
}

impl Attention {
    fn new(p: Builder, cfg: &Config, added_kv: Option<i64>) -> Self {
        let dim = cfg.dim();
        let lin = |name: &str, d_in| Linear::new(&p / name, d_in, dim);
        let added = added_kv.map(|d| {
            (
                lin("add_k_proj", d),
                lin("add_v_proj", d),
                RmsNorm::new(&p / "norm_added_k", dim, cfg.eps),
            )
        });
        Attention {
            to_q: lin("to_q", dim),
            to_k: lin("to_k", dim),
            to_v: lin("to_v", dim),
            to_out: Linear::new(&p / "to_out" / 0, dim, dim),
            norm_q: RmsNorm::new(&p / "norm_q", dim, cfg.eps),
            norm_k: RmsNorm::new(&p / "norm_k", dim, cfg.eps),
            added,
            fused: None,
            fused_added: None,
            heads: cfg.num_attention_heads,
        }
    }

    fn fuse(&mut self, is_self: bool) {
        self.fused = Some(if is_self {
            Linear::fuse(&[&self.to_q, &self.to_k, &self.to_v])
        } else {
            Linear::fuse(&[&self.to_k, &self.to_v])
        });
        self.fused_added = self.added.as_ref().map(|(k, v, _)| Linear::fuse(&[k, v]));
    }

    /// Self-attention with RoPE on q and k.
    fn self_attn(&self, x: &Tensor, rope: &RopeTables) -> Tensor {
        let (q, k, v) = match &self.fused {
            Some(qkv) => {
                let c = qkv.forward(x).chunk(3, -1);
                (c[0].shallow_clone(), c[1].shallow_clone(), c[2].shallow_clone())
            }
            None => (self.to_q.forward(x), self.to_k.forward(x), self.to_v.forward(x)),
        };
        let rotate = |t: Tensor| {
            let s = t.size();
            rope.apply(&t.view([s[0], s[1], self.heads, -1])).view([s[0], s[1], s[2]])
        };
        let q = rotate(self.norm_q.forward(&q));
        let k = rotate(self.norm_k.forward(&k));
        self.to_out.forward(&sdpa(&q, &k, &v, self.heads))
    }

    /// Keys and values of the text (and I2V image) context, after the k norms.
    fn context_kv(&self, text: &Tensor, image: Option<&Tensor>) -> BlockContext {
        let (k, v) = match &self.fused {
            Some(kv) => {
                let c = kv.forward(text).chunk(2, -1);
                (c[0].shallow_clone(), c[1].shallow_clone())
            }
            None => (self.to_k.forward(text), self.to_v.forward(text)),
        };
        let image = match (&self.added, image) {
            (Some((add_k, add_v, norm)), Some(img)) => {
                let (ki, vi) = match &self.fused_added {
                    Some(kv) => {
                        let c = kv.forward(img).chunk(2, -1);
                        (c[0].shallow_clone(), c[1].shallow_clone())
                    }
                    None => (add_k.forward(img), add_v.forward(img)),
                };
                Some((norm.forward(&ki), vi.contiguous()))
            }
            _ => None,
        };
        BlockContext { text: (self.norm_k.forward(&k), v.contiguous()), image }
    }

    /// Cross-attention to the prepared text context, plus the image context for I2V.
    fn cross_attn(&self, x: &Tensor, ctx: &BlockContext) -> Tensor {
        let q = self.norm_q.forward(&self.to_q.forward(x));
        let mut out = sdpa(&q, &ctx.text.0, &ctx.text.1, self.heads);
        if let Some((k, v)) = &ctx.image {
            out = sdpa(&q, k, v, self.heads) + out;
        }
        self.to_out.forward(&out)
    }
}

/// One block's cross-attention keys and values `[B, L, dim]`.
#[derive(Debug)]
struct BlockContext {
    text: (Tensor, Tensor),
    image: Option<(Tensor, Tensor)>,
}

/// The conditioning of one request projected once: every block's cross-attention keys and values.
/// They do not depend on the latents or the timestep, so a sampling loop computes them once
/// (memory: `2·layers·B·(512 [+257])·dim` values).
#[derive(Debug)]
pub struct PreparedContext {
    blocks: Vec<BlockContext>,
    batch: i64,
}

impl PreparedContext {
    /// Batch size the context was prepared for.
    pub fn batch(&self) -> i64 {
        self.batch
    }
}

#[derive(Debug)]
struct Block {
    attn1: Attention,
    attn2: Attention,
    norm2: Option<Fp32LayerNorm>,
    ffn: FeedForward,
    /// `[1, 6, dim]` fp32: (shift, scale, gate, c_shift, c_scale, c_gate).
    scale_shift_table: Tensor,
    eps: f64,
}

impl Block {
    fn new(p: Builder, cfg: &Config) -> Self {
        let dim = cfg.dim();
        Block {
            attn1: Attention::new(&p / "attn1", cfg, None),
            attn2: Attention::new(&p / "attn2", cfg, cfg.added_kv_proj_dim),
            norm2: cfg.cross_attn_norm.then(|| Fp32LayerNorm::new(&p / "norm2", dim, cfg.eps)),
            ffn: FeedForward::new(&p / "ffn", dim, cfg.ffn_dim, dim, Gelu::Tanh),
            scale_shift_table: p.param("scale_shift_table", &[1, 6, dim]),
            eps: cfg.eps,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        time: &TimeRows,
        ctx: &BlockContext,
        rope: &RopeTables,
    ) -> Tensor {
        let kind = x.kind();
        let table = &self.scale_shift_table + time.proj.to_kind(Kind::Float);
        let m: Vec<Tensor> = (0..6).map(|i| time.per_token(&table.select(1, i))).collect();
        let modulate = |x: &Tensor, shift: &Tensor, scale: &Tensor| {
            (layer_norm_no_affine(x, self.eps) * (scale + 1.0) + shift).to_kind(kind)
        };
        let a = self.attn1.self_attn(&modulate(x, &m[0], &m[1]), rope);
        let x = (x.to_kind(Kind::Float) + a * &m[2]).to_kind(kind);
        let n2 = match &self.norm2 {
            Some(norm) => norm.forward(&x.to_kind(Kind::Float)).to_kind(kind),
            None => x.shallow_clone(),
        };
        let x = &x + self.attn2.cross_attn(&n2, ctx);
        let f = self.ffn.forward(&modulate(&x, &m[3], &m[4]));
        (x.to_kind(Kind::Float) + f.to_kind(Kind::Float) * &m[5]).to_kind(kind)
    }
}

/// The time embedding of each distinct timestep value, and which value each token takes.
struct TimeRows {
    /// `[U, dim]` in the model dtype: `time_embedder(sinusoid(t))`.
    temb: Tensor,
    /// `[U, 6, dim]`: `time_proj(silu(temb))`.
    proj: Tensor,
    /// `[B, N]` int64 rows of the `U` values: `N = 1` (one timestep per sample) or the patch count.
    index: Tensor,
}

impl TimeRows {
    /// `rows [U, dim]` as `[B, N, dim]`, the row of each sample's (or token's) timestep.
    fn per_token(&self, rows: &Tensor) -> Tensor {
        let [b, n] = self.index.size()[..] else { unreachable!("[B, N] index") };
        rows.index_select(0, &self.index.reshape([-1])).view([b, n, -1])
    }
}

/// The Wan DiT with weights loaded (see the module docs for shapes).
#[derive(Debug)]
pub struct WanTransformer3DModel {
    config: Config,
    kind: Kind,
    device: Device,
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_1: Linear,
    time_2: Linear,
    time_proj: Linear,
    text_1: Linear,
    text_2: Linear,
    /// I2V: `(norm1, ff, norm2)`.
    image_embedder: Option<(Fp32LayerNorm, FeedForward, Fp32LayerNorm)>,
    blocks: Vec<Block>,
    /// `[1, 2, dim]` fp32: (shift, scale) of the output head.
    scale_shift_table: Tensor,
    proj_out: Linear,
    rope: RefCell<HashMap<[i64; 3], RopeTables>>,
    /// Owns the parameters (the fields above are handles into it).
    vs: nn::VarStore,
}

/// The fused layer and the first row of a target in it, or the target's own layer before fusion.
fn pick<'m>(fused: Option<&'m Linear>, unfused: &'m Linear, row: i64) -> (&'m Linear, i64) {
    match fused {
        Some(f) => (f, row),
        None => (unfused, 0),
    }
}

/// RoPE tables kept per token grid; a server sees few distinct resolutions.
const ROPE_CACHE_ENTRIES: usize = 8;

/// A parameter only a DiT with CLIP image attention (Wan2.1 I2V) has, by its diffusers name.
const IMAGE_EMBEDDER_KEY: &str = "condition_embedder.image_embedder.norm1.weight";

impl WanTransformer3DModel {
    /// Loads a DiT from a directory holding `config.json` and its safetensors weights (a single
    /// file or a shard index), in the diffusers or the original layout.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, Error> {
        let (config, layout) = Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        let ckpt = match layout {
            Layout::Diffusers => ckpt.remap(diffusers_key),
            Layout::Original => ckpt.remap(remap_key),
        };
        // Wan2.1 and Wan2.2 I2V share `model_type = "i2v"`; only Wan2.1's has the CLIP branch.
        let config = if layout == Layout::Original
            && config.takes_image_embeds()
            && !ckpt.contains(IMAGE_EMBEDDER_KEY)
        {
            config.without_image_attention()
        } else {
            config
        };
        Self::from_checkpoint(config, &ckpt, device, kind)
    }

    /// Builds the model for `config` and strictly loads `ckpt` (diffusers key names) into it.
    /// `kind` is the compute dtype; [`KEEP_F32`] parameters stay fp32.
    pub fn from_checkpoint(
        config: Config,
        ckpt: &Checkpoint,
        device: Device,
        kind: Kind,
    ) -> Result<Self, Error> {
        let started = std::time::Instant::now();
        config.validate().map_err(|message| {
            Error::config(Component::Transformer, Some(Path::new(ckpt.description())), message)
        })?;
        let vs = nn::VarStore::new(device);
        let mut model = Self::build(vs, config, kind);
        load_into(&model.vs, ckpt, &LoadOptions::strict())?;
        for block in &mut model.blocks {
            block.attn1.fuse(true);
            block.attn2.fuse(false);
        }
        crate::weights::log_loaded(Component::Transformer, ckpt, &model.vs, kind, started);
        Ok(model)
    }

    /// The parameters a model for `config` has, by checkpoint key (diffusers names), with their
    /// shapes, sorted by key.
    pub fn parameter_shapes(config: &Config) -> Vec<(String, Vec<i64>)> {
        let model = Self::build(nn::VarStore::new(Device::Cpu), config.clone(), Kind::Float);
        let mut shapes: Vec<(String, Vec<i64>)> =
            model.vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
        shapes.sort();
        shapes
    }

    fn build(vs: nn::VarStore, config: Config, kind: Kind) -> Self {
        let root = Builder::new(&vs, kind, KEEP_F32);
        let cfg = &config;
        let dim = cfg.dim();
        let [pt, ph, pw] = cfg.patch_size;
        let pe = &root / "patch_embedding";
        let ce = &root / "condition_embedder";
        let te = &ce / "time_embedder";
        let tx = &ce / "text_embedder";
        let image_embedder = cfg.image_dim.map(|d| {
            let ie = &ce / "image_embedder";
            (
                Fp32LayerNorm::new(&ie / "norm1", d, 1e-5),
                FeedForward::new(&ie / "ff", d, d, dim, Gelu::Exact),
                Fp32LayerNorm::new(&ie / "norm2", dim, 1e-5),
            )
        });
        WanTransformer3DModel {
            kind,
            device: root.device(),
            patch_weight: pe.param("weight", &[dim, cfg.in_channels, pt, ph, pw]),
            patch_bias: pe.param("bias", &[dim]),
            time_1: Linear::new(&te / "linear_1", cfg.freq_dim, dim),
            time_2: Linear::new(&te / "linear_2", dim, dim),
            time_proj: Linear::new(&ce / "time_proj", dim, 6 * dim),
            text_1: Linear::new(&tx / "linear_1", cfg.text_dim, dim),
            text_2: Linear::new(&tx / "linear_2", dim, dim),
            image_embedder,
            blocks: (0..cfg.num_layers).map(|i| Block::new(&root / "blocks" / i, cfg)).collect(),
            scale_shift_table: root.param("scale_shift_table", &[1, 2, dim]),
            proj_out: Linear::new(&root / "proj_out", dim, cfg.out_channels * pt * ph * pw),
            rope: RefCell::new(HashMap::new()),
            config,
            vs,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes held by the loaded parameters.
    pub fn parameter_bytes(&self) -> u64 {
        crate::weights::parameter_bytes(&self.vs)
    }

    /// The layer a LoRA target (a diffusers module name, e.g. `blocks.3.attn1.to_k`) runs on, the
    /// first of its output rows there and how many rows are its own (q, k and v run fused in one
    /// layer). Targets are the blocks' attention projections and feed-forward layers and the
    /// output projection.
    pub(crate) fn lora_target(&self, module: &str) -> Option<(&Linear, i64, i64)> {
        if module == "proj_out" {
            return Some((&self.proj_out, 0, self.proj_out.dims().1));
        }
        let (index, rest) = module.strip_prefix("blocks.")?.split_once('.')?;
        let block = self.blocks.get(index.parse::<usize>().ok()?)?;
        let dim = self.config.dim();
        let (attn, name) = match rest.split_once('.')? {
            ("ffn", "net.0.proj") => {
                return Some((&block.ffn.proj_in, 0, block.ffn.proj_in.dims().1));
            }
            ("ffn", "net.2") => return Some((&block.ffn.proj_out, 0, block.ffn.proj_out.dims().1)),
            ("attn1", name) => (&block.attn1, name),
            ("attn2", name) => (&block.attn2, name),
            _ => return None,
        };
        // Self-attention fuses q|k|v, cross-attention k|v (its q reads the latents, not the text).
        let self_attn = std::ptr::eq(attn, &block.attn1);
        let fused = attn.fused.as_ref();
        let (linear, row) = match name {
            "to_q" if self_attn => pick(fused, &attn.to_q, 0),
            "to_q" => (&attn.to_q, 0),
            "to_k" => pick(fused, &attn.to_k, if self_attn { dim } else { 0 }),
            "to_v" => pick(fused, &attn.to_v, if self_attn { 2 * dim } else { dim }),
            "to_out.0" => (&attn.to_out, 0),
            "add_k_proj" => pick(attn.fused_added.as_ref(), &attn.added.as_ref()?.0, 0),
            "add_v_proj" => pick(attn.fused_added.as_ref(), &attn.added.as_ref()?.1, dim),
            _ => return None,
        };
        // Every attention projection has `dim` outputs, fused or not.
        Some((linear, row, dim))
    }

    /// Every layer a LoRA target can land on (see [`Self::lora_target`]).
    pub(crate) fn lora_layers(&self) -> Vec<&Linear> {
        let mut layers = vec![&self.proj_out];
        for b in &self.blocks {
            for attn in [&b.attn1, &b.attn2] {
                layers.extend([&attn.to_q, &attn.to_k, &attn.to_v, &attn.to_out]);
                layers.extend(attn.fused.iter().chain(&attn.fused_added));
                layers.extend(attn.added.iter().flat_map(|(k, v, _)| [k, v]));
            }
            layers.extend([&b.ffn.proj_in, &b.ffn.proj_out]);
        }
        layers
    }

    /// Predicts the flow velocity. `timestep` is `[B]` (any numeric dtype) or a scalar;
    /// `image_context` is required for I2V models and rejected for T2V ones.
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        image_context: Option<&Tensor>,
    ) -> Result<Tensor, Error> {
        let ctx = self.prepare_context(context, image_context)?;
        self.forward_prepared(latents, timestep, &ctx)
    }

    /// Embeds the text context `[B, L, text_dim]` (and the I2V image context `[B, L_img,
    /// image_dim]`) and projects every block's cross-attention keys and values.
    pub fn prepare_context(
        &self,
        context: &Tensor,
        image_context: Option<&Tensor>,
    ) -> Result<PreparedContext, Error> {
        let _guard = tch::no_grad_guard();
        let batch = self.check_context(context, image_context)?;
        let (kind, dev) = (self.kind, self.device);
        let text = context.to_device(dev).to_kind(kind);
        let text = self.text_2.forward(&self.text_1.forward(&text).gelu("tanh"));
        let image = match (&self.image_embedder, image_context) {
            (Some((n1, ff, n2)), Some(img)) => {
                Some(n2.forward(&ff.forward(&n1.forward(&img.to_device(dev).to_kind(kind)))))
            }
            _ => None,
        };
        let blocks =
            self.blocks.iter().map(|b| b.attn2.context_kv(&text, image.as_ref())).collect();
        Ok(PreparedContext { blocks, batch })
    }

    /// [`Self::forward`] with the context prepared by [`Self::prepare_context`].
    pub fn forward_prepared(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        ctx: &PreparedContext,
    ) -> Result<Tensor, Error> {
        let _guard = tch::no_grad_guard();
        let (b, grid) = self.check_latents(latents, timestep)?;
        let tokens = grid.iter().product::<i64>();
        if b != ctx.batch {
            return Err(Error::input(
                Component::Transformer,
                format!("latent batch {b} differs from the context batch {}", ctx.batch),
            ));
        }
        let cfg = &self.config;
        let dim = cfg.dim();
        let kind = self.kind;
        let dev = self.device;

        let x = latents.to_device(dev).to_kind(kind);
        let x = x.conv3d(&self.patch_weight, Some(&self.patch_bias), cfg.patch_size, 0, 1, 1);
        let x = x.flatten(2, -1).transpose(1, 2).contiguous(); // [B, L, dim]

        let (values, index) = if timestep.dim() == 2 {
            // TI2V-5B: one timestep per token, of a few distinct values (0 for the clean frame).
            let (values, inverse) =
                timestep.to_device(dev).reshape([-1]).internal_unique(true, true);
            (values, inverse.view([b, tokens]))
        } else {
            let t = timestep.to_device(dev).reshape([-1]).expand([b], false);
            (t, Tensor::arange(b, (Kind::Int64, dev)).view([b, 1]))
        };
        let temb = self
            .time_2
            .forward(&self.time_1.forward(&timestep_sinusoid(&values, cfg.freq_dim)).silu())
            .to_kind(kind);
        let proj = self.time_proj.forward(&temb.silu()).view([-1, 6, dim]);
        let time = TimeRows { temb, proj, index };

        let mut cache = self.rope.borrow_mut();
        if !cache.contains_key(&grid) && cache.len() >= ROPE_CACHE_ENTRIES {
            cache.clear();
        }
        let rope =
            cache.entry(grid).or_insert_with(|| RopeTables::new(cfg.attention_head_dim, grid, dev));

        let mut x = x;
        for (block, bctx) in self.blocks.iter().zip(&ctx.blocks) {
            x = block.forward(&x, &time, bctx, rope);
        }

        let head = &self.scale_shift_table + time.temb.unsqueeze(1).to_kind(Kind::Float);
        let (shift, scale) =
            (time.per_token(&head.select(1, 0)), time.per_token(&head.select(1, 1)));
        let x = (layer_norm_no_affine(&x, cfg.eps) * (scale + 1.0) + shift).to_kind(kind);
        let x = self.proj_out.forward(&x);
        let [pt, ph, pw] = cfg.patch_size;
        let [f, h, w] = grid;
        let x =
            x.reshape([b, f, h, w, pt, ph, pw, cfg.out_channels]).permute([0, 7, 1, 4, 2, 5, 3, 6]);
        Ok(x.reshape([b, cfg.out_channels, f * pt, h * ph, w * pw]))
    }

    /// Validates the latents and timestep; returns the batch size and the token grid `[F', H', W']`.
    fn check_latents(&self, latents: &Tensor, timestep: &Tensor) -> Result<(i64, [i64; 3]), Error> {
        let cfg = &self.config;
        let bad = |m: String| Err(Error::input(Component::Transformer, m));
        let s = latents.size();
        if s.len() != 5 || s[1] != cfg.in_channels {
            return bad(format!("latents must be [B, {}, F, H, W], got {s:?}", cfg.in_channels));
        }
        let b = s[0];
        let mut grid = [0; 3];
        for (i, axis) in ["frames", "height", "width"].iter().enumerate() {
            let (n, p) = (s[2 + i], cfg.patch_size[i]);
            if n <= 0 || n % p != 0 {
                return bad(format!(
                    "latent {axis} must be a positive multiple of the patch size {p}, got {n}"
                ));
            }
            if n / p > cfg.rope_max_seq_len {
                return bad(format!("latent {axis} {n} exceeds {} patches", cfg.rope_max_seq_len));
            }
            grid[i] = n / p;
        }
        let tn = timestep.numel() as i64;
        let tokens = grid.iter().product::<i64>();
        let per_token = timestep.size() == [b, tokens];
        if !per_token && (timestep.dim() > 1 || (tn != b && tn != 1)) {
            return bad(format!(
                "timestep must be a scalar, [{b}] or per token [{b}, {tokens}], got {:?}",
                timestep.size()
            ));
        }
        Ok((b, grid))
    }

    /// Validates the text and image contexts; returns the batch size.
    fn check_context(
        &self,
        context: &Tensor,
        image_context: Option<&Tensor>,
    ) -> Result<i64, Error> {
        let cfg = &self.config;
        let bad = |m: String| Err(Error::input(Component::Transformer, m));
        let c = context.size();
        if c.len() != 3 || c[1] < 1 || c[2] != cfg.text_dim {
            return bad(format!("context must be [B, L, {}], got {c:?}", cfg.text_dim));
        }
        let b = c[0];
        match (cfg.image_dim, image_context) {
            (Some(d), Some(img)) => {
                let i = img.size();
                if i.len() != 3 || i[0] != b || i[1] < 1 || i[2] != d {
                    return bad(format!("image context must be [{b}, L, {d}], got {i:?}"));
                }
            }
            (Some(_), None) => return bad("this I2V model needs an image context".into()),
            (None, Some(_)) => return bad("this T2V model takes no image context".into()),
            (None, None) => {}
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_projection_shares_storage_with_the_parameters() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = Builder::new(&vs, Kind::Float, &[]);
        let parts: Vec<Linear> = (0..3).map(|i| Linear::new(&root / i, 4, 2)).collect();
        for (i, p) in parts.iter().enumerate() {
            let _guard = tch::no_grad_guard();
            let _ = p.weight.shallow_clone().fill_(i as f64);
            let _ = p.bias.as_ref().unwrap().shallow_clone().fill_(10.0 + i as f64);
        }
        let fused = Linear::fuse(&parts.iter().collect::<Vec<_>>());
        let x = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
        let y: Vec<f32> = fused.forward(&x).view([-1]).try_into().unwrap();
        assert_eq!(y, vec![10.0, 10.0, 15.0, 15.0, 20.0, 20.0]);
        assert_eq!(parts[1].weight.data_ptr(), fused.weight.narrow(0, 2, 2).data_ptr());
        assert_eq!(vs.variables()["2.bias"].double_value(&[0]), 12.0);
    }
}
