//! Normalisation layers: RMSNorm over the last dim (Wan's q/k norm across all heads), LayerNorm in
//! the model dtype (CLIP), and LayerNorm computed in fp32 with or without affine parameters
//! (diffusers' `FP32LayerNorm`).

use tch::{Kind, Tensor};

use super::Builder;

/// `torch.nn.RMSNorm(dim, eps)` with a `[dim]` weight: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    dim: i64,
    eps: f64,
}

impl RmsNorm {
    pub fn new(b: Builder, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: b.param("weight", &[dim]), dim, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.rms_norm([self.dim], Some(&self.weight), self.eps)
    }
}

/// LayerNorm without parameters, computed in fp32 and returned in fp32.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Tensor {
    let dim = *x.size().last().expect("layer norm input has at least one dim");
    x.to_kind(Kind::Float).layer_norm([dim], None::<Tensor>, None::<Tensor>, eps, false)
}

/// `torch.nn.LayerNorm(dim, eps)` in the dtype of its input and parameters.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(b: Builder, dim: i64, eps: f64) -> Self {
        LayerNorm { weight: b.param("weight", &[dim]), bias: b.param("bias", &[dim]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// diffusers' `FP32LayerNorm` with affine parameters: fp32 parameters, normalises in fp32 and
/// returns the input's dtype.
#[derive(Debug)]
pub struct Fp32LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Fp32LayerNorm {
    pub fn new(b: Builder, dim: i64, eps: f64) -> Self {
        Fp32LayerNorm {
            weight: b.param_f32("weight", &[dim]),
            bias: b.param_f32("bias", &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.to_kind(Kind::Float)
            .layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, false)
            .to_kind(x.kind())
    }
}
