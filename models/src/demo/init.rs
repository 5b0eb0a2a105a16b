//! Seeded, portable initial values for the demo weights of every family.

use tch::Tensor;

/// Initial values of parameter `key`: embeddings unit normal, norm scales `1 + 0.1·n`, biases
/// `0.02·n`, modulation tables `0.1·n`, and every other weight `n / sqrt(fan_in)` so that
/// activations keep their scale through the stack.
pub(crate) fn init(key: &str, shape: &[i64], rng: &mut Normal) -> Tensor {
    const EMBEDDINGS: &[&str] = &[
        "shared.weight",
        "embed_tokens.weight",
        "relative_attention_bias.weight",
        "position_embedding.weight",
        "class_embedding",
    ];
    let numel: i64 = shape.iter().product();
    let (mean, std) = if EMBEDDINGS.iter().any(|e| key.ends_with(e)) {
        (0.0, 1.0)
    } else if key.ends_with("scale_shift_table") {
        (0.0, 0.1)
    } else if key.ends_with("bias") {
        (0.0, 0.02)
    } else if key.ends_with("gamma") || shape.len() == 1 {
        (1.0, 0.1)
    } else {
        (0.0, 1.0 / ((numel / shape[0].max(1)).max(1) as f64).sqrt())
    };
    let values: Vec<f32> = (0..numel).map(|_| (mean + std * rng.sample()) as f32).collect();
    Tensor::from_slice(&values).view(shape)
}

/// Standard normal draws from SplitMix64 through Box–Muller: portable and seeded per tensor, so
/// a file's bytes depend on the seed and the key only.
pub(crate) struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    pub(crate) fn new(seed: u64, key: &str) -> Self {
        // FNV-1a of the key, mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Normal { state: seed ^ h.rotate_left(17), spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `(0, 1]`.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u, v) = (self.uniform(), self.uniform());
        let r = (-2.0 * u.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * v;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_are_seeded_and_standard() {
        let draw = |seed, key| {
            let mut n = Normal::new(seed, key);
            (0..20_000).map(|_| n.sample()).collect::<Vec<f64>>()
        };
        let a = draw(3, "x");
        assert_eq!(a, draw(3, "x"));
        assert_ne!(a, draw(4, "x"));
        assert_ne!(a, draw(3, "y"));
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, var {var}");
    }
}
