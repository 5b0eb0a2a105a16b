//! Multi-head scaled dot-product attention on `[B, L, heads·head_dim]` activations.

use tch::Tensor;

/// Attention over `heads` heads without a mask: q `[B, Lq, H·D]`, k/v `[B, Lk, H·D]` →
/// `[B, Lq, H·D]`. Softmax scale `1/√D`. libtorch picks the kernel (flash / memory-efficient /
/// math) for the device and dtype.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64) -> Tensor {
    let split = |t: &Tensor| {
        let s = t.size();
        t.view([s[0], s[1], heads, s[2] / heads]).transpose(1, 2)
    };
    let (b, lq, d) = q.size3().expect("attention query is [B, L, C]");
    let out = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    );
    out.transpose(1, 2).reshape([b, lq, d])
}
