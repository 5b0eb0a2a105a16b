//! Shared layers for x2v's models, written against `tch` tensors directly so that the dtype of
//! every intermediate is explicit (the references cast some of them to fp32).
//!
//! Every parameter is made by a [`Builder`]: empty (never initialised: [`crate::weights::load_into`]
//! fills it, and a strict load guarantees none is left unset), under its checkpoint key, in its
//! final dtype on the var store's device. The model dtype applies unless the key matches the
//! model's fp32 keep-list, so half-precision weights are never first made in fp32.

pub mod attention;
pub mod embeddings;
pub mod norm;

use std::cell::RefCell;
use std::ops::Div;

use tch::{Device, Kind, Tensor, nn};

pub use attention::sdpa;
pub use embeddings::timestep_sinusoid;
pub use norm::{Fp32LayerNorm, LayerNorm, RmsNorm, layer_norm_no_affine};

/// Makes the parameters of one model: a position in the var store (the checkpoint key so far),
/// the model dtype, and the key fragments whose parameters stay fp32 whatever the model dtype.
#[derive(Debug, Clone)]
pub struct Builder<'a> {
    path: nn::Path<'a>,
    kind: Kind,
    keep_f32: &'static [&'static str],
}

impl<'a> Builder<'a> {
    /// The root of `vs`, for a model computing in `kind`.
    pub fn new(vs: &'a nn::VarStore, kind: Kind, keep_f32: &'static [&'static str]) -> Self {
        Builder { path: vs.root(), kind, keep_f32 }
    }

    /// The model dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.path.device()
    }

    /// The dtype a parameter `name` here gets: fp32 when its key matches the keep-list.
    pub fn kind_of(&self, name: &str) -> Kind {
        let full = self.path.path(name);
        if self.keep_f32.iter().any(|p| full.contains(p)) { Kind::Float } else { self.kind }
    }

    /// An empty parameter `name` of shape `dims` in [`Builder::kind_of`] its key.
    pub fn param(&self, name: &str, dims: &[i64]) -> Tensor {
        self.param_in(name, dims, self.kind_of(name))
    }

    /// An empty parameter that is fp32 whatever the model dtype (the reference keeps it so).
    pub fn param_f32(&self, name: &str, dims: &[i64]) -> Tensor {
        self.param_in(name, dims, Kind::Float)
    }

    fn param_in(&self, name: &str, dims: &[i64], kind: Kind) -> Tensor {
        self.path.add(name, Tensor::empty(dims, (kind, self.device())), false)
    }
}

impl<'a, T: std::string::ToString> Div<T> for &Builder<'a> {
    type Output = Builder<'a>;

    fn div(self, rhs: T) -> Builder<'a> {
        Builder { path: &self.path / rhs, kind: self.kind, keep_f32: self.keep_f32 }
    }
}

impl<'a, T: std::string::ToString> Div<T> for Builder<'a> {
    type Output = Builder<'a>;

    fn div(self, rhs: T) -> Builder<'a> {
        &self / rhs
    }
}

/// A dense layer `y = x·Wᵀ + b` with PyTorch's `nn.Linear` keys (`weight` `[out, in]`, `bias`),
/// plus the low-rank deltas of the LoRA adapters active on it ([`Linear::set_lora`]).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Applied at run time on top of the untouched weight, in order: `y[.., rows] += s·B(A x)`.
    lora: RefCell<Vec<LoraDelta>>,
}

/// One adapter's low-rank update of (a row range of) a [`Linear`]'s output.
#[derive(Debug)]
pub struct LoraDelta {
    /// `lora_A` / `lora_down`: `[rank, in]`, in the layer's dtype and device.
    pub down: Tensor,
    /// `lora_B` / `lora_up`: `[rows, rank]`.
    pub up: Tensor,
    /// `alpha / rank` times the adapter's weight in the request.
    pub scale: f64,
    /// First output row the update adds to (a fused layer holds several targets).
    pub row: i64,
}

impl Linear {
    fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, lora: RefCell::new(Vec::new()) }
    }

    pub fn new(b: Builder, d_in: i64, d_out: i64) -> Self {
        let weight = b.param("weight", &[d_out, d_in]);
        let bias = Some(b.param("bias", &[d_out]));
        Linear::from_parts(weight, bias)
    }

    /// `nn.Linear(..., bias=False)`.
    pub fn no_bias(b: Builder, d_in: i64, d_out: i64) -> Self {
        Linear::from_parts(b.param("weight", &[d_out, d_in]), None)
    }

    /// `(in, out)` features.
    pub fn dims(&self) -> (i64, i64) {
        let s = self.weight.size();
        (s[1], s[0])
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        let deltas = self.lora.borrow();
        if deltas.is_empty() {
            return y;
        }
        let _guard = tch::no_grad_guard();
        let (d_in, out) = self.dims();
        // y += s·(x Aᵀ) Bᵀ as one GEMM accumulating into y (BLAS beta = 1), with the scale folded
        // into the rank-wide intermediate: no output-sized temporary and no separate add pass.
        let y2 = y.view([-1, out]);
        let x2 = x.reshape([-1, d_in]);
        for d in deltas.iter() {
            let h = x2.matmul(&d.down.tr()) * d.scale;
            let rows = d.up.size()[0];
            let _ = y2.narrow(1, d.row, rows).addmm_(&h, &d.up.tr());
        }
        y
    }

    /// Replaces the LoRA deltas applied on top of the weight (none: the plain layer). The weight
    /// itself is never modified, so clearing them restores the base layer exactly.
    pub fn set_lora(&self, deltas: Vec<LoraDelta>) {
        *self.lora.borrow_mut() = deltas;
    }

    /// Adds one adapter's delta after those already set.
    pub fn push_lora(&self, delta: LoraDelta) {
        self.lora.borrow_mut().push(delta);
    }

    /// How many adapter deltas the layer applies.
    pub fn lora_count(&self) -> usize {
        self.lora.borrow().len()
    }

    /// Concatenates the output rows of several layers into one, so one GEMM replaces several.
    ///
    /// The source parameters are re-pointed at views of the fused storage, so the var store keeps
    /// its keys and no weight memory is duplicated.
    pub fn fuse(parts: &[&Linear]) -> Linear {
        let _guard = tch::no_grad_guard();
        let weight = Tensor::cat(&parts.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0);
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0));
        let mut row = 0;
        for part in parts {
            let n = part.weight.size()[0];
            part.weight.shallow_clone().set_data(&weight.narrow(0, row, n));
            if let (Some(b), Some(fused)) = (&part.bias, &bias) {
                b.shallow_clone().set_data(&fused.narrow(0, row, n));
            }
            row += n;
        }
        Linear::from_parts(weight, bias)
    }
}

/// `nn.Embedding(n, dim)`: row lookup in a `[n, dim]` `weight`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(b: Builder, n: i64, dim: i64) -> Self {
        Embedding { weight: b.param("weight", &[n, dim]) }
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// `nn.Conv2d` with a square kernel, a stride and no padding (CLIP's patch embedding, the VAE's
/// 1×1 projections).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
}

impl Conv2d {
    pub fn new(b: Builder, c_in: i64, c_out: i64, k: i64, stride: i64, bias: bool) -> Self {
        Conv2d {
            weight: b.param("weight", &[c_out, c_in, k, k]),
            bias: bias.then(|| b.param("bias", &[c_out])),
            stride,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [0, 0], [1, 1], 1)
    }
}

/// Which GELU a feed-forward layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `0.5·x·(1 + erf(x/√2))`.
    Exact,
    /// The tanh approximation (`approximate="tanh"`).
    Tanh,
}

impl Gelu {
    pub fn apply(self, x: &Tensor) -> Tensor {
        x.gelu(if self == Gelu::Tanh { "tanh" } else { "none" })
    }
}

/// diffusers' `FeedForward`: `net.2(GELU(net.0.proj(x)))` (`net.1` is a parameterless dropout).
#[derive(Debug)]
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
    act: Gelu,
}

impl FeedForward {
    pub fn new(b: Builder, dim: i64, hidden: i64, d_out: i64, act: Gelu) -> Self {
        let net = &b / "net";
        FeedForward {
            proj_in: Linear::new(&net / 0 / "proj", dim, hidden),
            proj_out: Linear::new(&net / 2, hidden, d_out),
            act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out.forward(&self.act.apply(&self.proj_in.forward(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_made_in_their_final_dtype_under_their_keys() {
        let vs = nn::VarStore::new(Device::Cpu);
        let b = Builder::new(&vs, Kind::BFloat16, &["time_embedder."]);
        let _a = Linear::new(&b / "blocks" / 0 / "proj", 4, 8);
        let _t = Linear::no_bias(&b / "time_embedder" / "linear_1", 4, 8);
        let _n = Fp32LayerNorm::new(&b / "norm", 8, 1e-6);
        let vars = vs.variables();
        assert_eq!(vars["blocks.0.proj.weight"].kind(), Kind::BFloat16);
        assert_eq!(vars["blocks.0.proj.weight"].size(), [8, 4]);
        assert_eq!(vars["time_embedder.linear_1.weight"].kind(), Kind::Float);
        assert!(!vars.contains_key("time_embedder.linear_1.bias"));
        assert_eq!(vars["norm.weight"].kind(), Kind::Float);
    }
}
