//! Normalisation layers: RMSNorm over the last dim (Wan's q/k norm across all heads), LayerNorm
//! computed in fp32 with or without affine parameters (diffusers' `FP32LayerNorm`).

use tch::{Kind, Tensor, nn};

use super::param;

/// `torch.nn.RMSNorm(dim, eps)` with a `[dim]` weight: `x / sqrt(mean(x²) + eps) · weight`.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    dim: i64,
    eps: f64,
}

impl RmsNorm {
    pub fn new(path: nn::Path, dim: i64, eps: f64, kind: Kind) -> Self {
        RmsNorm { weight: param(&path, "weight", &[dim], kind, &[]), dim, eps }
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

/// diffusers' `FP32LayerNorm` with affine parameters: normalises in fp32 and returns the input's
/// dtype. Its parameters are kept fp32 by the model's keep-list.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: param(&path, "weight", &[dim], Kind::Float, &[]),
            bias: param(&path, "bias", &[dim], Kind::Float, &[]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.to_kind(Kind::Float)
            .layer_norm(
                [dim],
                Some(self.weight.to_kind(Kind::Float)),
                Some(self.bias.to_kind(Kind::Float)),
                self.eps,
                false,
            )
            .to_kind(x.kind())
    }
}
