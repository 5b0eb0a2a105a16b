//! Shared layers for x2v's diffusion transformers, written against `tch` tensors directly so that
//! the dtype of every intermediate is explicit (the reference casts some of them to fp32).
//!
//! Parameters are created uninitialised in the var store under their checkpoint key and must be
//! filled by [`crate::weights::load_into`]; a strict load guarantees none is left unset.

pub mod attention;
pub mod embeddings;
pub mod norm;

use tch::{Kind, Tensor, nn};

pub use attention::sdpa;
pub use embeddings::timestep_sinusoid;
pub use norm::{LayerNorm, RmsNorm, layer_norm_no_affine};

/// Creates an uninitialised, non-trainable parameter `name` under `path`.
///
/// `keep_f32` lists key fragments whose parameters stay fp32 whatever `kind` is (see
/// [`crate::weights::LoadOptions::keep_f32`]).
pub fn param(path: &nn::Path, name: &str, dims: &[i64], kind: Kind, keep_f32: &[&str]) -> Tensor {
    let full = path.path(name);
    let kind = if keep_f32.iter().any(|p| full.contains(p)) { Kind::Float } else { kind };
    path.add(name, Tensor::empty(dims, (kind, path.device())), false)
}

/// A dense layer `y = x·Wᵀ + b` with PyTorch's `nn.Linear` keys (`weight` `[out, in]`, `bias`).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(path: nn::Path, d_in: i64, d_out: i64, kind: Kind, keep_f32: &[&str]) -> Self {
        let weight = param(&path, "weight", &[d_out, d_in], kind, keep_f32);
        let bias = Some(param(&path, "bias", &[d_out], kind, keep_f32));
        Linear { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
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
        Linear { weight, bias }
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
    proj_in: Linear,
    proj_out: Linear,
    act: Gelu,
}

impl FeedForward {
    pub fn new(path: nn::Path, dim: i64, hidden: i64, d_out: i64, act: Gelu, kind: Kind) -> Self {
        let net = &path / "net";
        FeedForward {
            proj_in: Linear::new(&net / 0 / "proj", dim, hidden, kind, &[]),
            proj_out: Linear::new(&net / 2, hidden, d_out, kind, &[]),
            act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.proj_out.forward(&self.act.apply(&self.proj_in.forward(x)))
    }
}
