//! Layer functions composed from candle's own differentiable ops.
//!
//! These are the reference implementations: exact to first and second order (no op here uses
//! candle's `max_pool2d`, whose gradient is wrong). The fast kernels in [`crate::kernels`] are tested
//! against them.

use candle_core::{DType, Device, Result, Tensor, D};

/// 3×3 convolution, stride 1, padding 1, no bias. `x`: [B, Ci, H, W], `w`: [Co, Ci, 3, 3].
pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.conv2d(w, 1, 1, 1, 1)
}

/// 2×2 max-pool, stride 2, floor mode (7 → 3): a trailing odd row or column is dropped.
/// Built from narrow/reshape/max, whose gradient routes to the arg-max exactly.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let x = if h != 2 * ho { x.narrow(2, 0, 2 * ho)? } else { x.clone() };
    let x = if w != 2 * wo { x.narrow(3, 0, 2 * wo)? } else { x };
    x.reshape((b, c, ho, 2, wo, 2))?.max(5)?.max(3)
}

/// Per-channel statistics of one batch, accumulated in f64 (biased variance).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    /// Elements per channel that the statistics were taken over (B·H·W).
    pub count: usize,
}

fn per_channel(t: &Tensor) -> Result<Tensor> {
    let c = t.dim(0)?;
    t.reshape((1, c, 1, 1))
}

/// Training-mode batch norm over [B, C, H, W]: normalise by the batch's own mean and biased
/// variance, both accumulated in f64, then scale by `gamma` and shift by `beta` (each [C]).
/// The normalisation is differentiable through the statistics.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let dtype = x.dtype();
    let (b, _c, h, w) = x.dims4()?;
    let x64 = x.to_dtype(DType::F64)?;
    let mean = x64.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let centred = x64.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let normalised = centred.broadcast_mul(&inv_std)?.to_dtype(dtype)?;
    let y = normalised.broadcast_mul(&per_channel(gamma)?)?.broadcast_add(&per_channel(beta)?)?;
    let stats = BatchStats {
        mean: mean.flatten_all()?.to_vec1::<f64>()?,
        var: var.flatten_all()?.to_vec1::<f64>()?,
        count: b * h * w,
    };
    Ok((y, stats))
}

/// Evaluation-mode batch norm with fixed statistics (e.g. running averages).
pub fn batch_norm_fixed(
    x: &Tensor,
    mean: &[f64],
    var: &[f64],
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let c = mean.len();
    let dev = x.device();
    let scale: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let shift: Vec<f64> = mean.iter().zip(&scale).map(|(m, s)| -m * s).collect();
    let scale = Tensor::from_vec(scale, (1, c, 1, 1), dev)?.to_dtype(x.dtype())?;
    let shift = Tensor::from_vec(shift, (1, c, 1, 1), dev)?.to_dtype(x.dtype())?;
    x.broadcast_mul(&scale)?
        .broadcast_add(&shift)?
        .broadcast_mul(&per_channel(gamma)?)?
        .broadcast_add(&per_channel(beta)?)
}

/// [N, classes] f32 rows of zeros with a one at each of `labels`.
pub fn one_hot(labels: &[u32], classes: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; labels.len() * classes];
    for (row, &l) in labels.iter().enumerate() {
        if l as usize >= classes {
            candle_core::bail!("label {l} is out of range for {classes} classes");
        }
        m[row * classes + l as usize] = 1.0;
    }
    Tensor::from_vec(m, (labels.len(), classes), device)
}

/// Mean cross-entropy of `logits` [N, C] against integer `labels` [N] (u32).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let log_probs = log_softmax(logits)?;
    let picked = log_probs.gather(&labels.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// Softmax over the last dimension, shifted by the (constant) maximum.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `x` [R, Cin] · Wᵀ + b for parameters `{name}.weight` [Cout, Cin] and `{name}.bias` [Cout].
pub fn linear(x: &Tensor, params: &crate::nn::Params, name: &str) -> Result<Tensor> {
    let w = params.get(&format!("{name}.weight"))?;
    let b = params.get(&format!("{name}.bias"))?;
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Row-wise log-softmax of [N, C], shifted by the (constant) row maximum for stability.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Fraction of rows whose arg-max equals the label.
pub fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let predicted = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    let correct = predicted.eq(labels)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(correct / labels.dim(0)? as f64)
}

/// Squared Euclidean distances between the rows of `a` [N, D] and `b` [M, D]: [N, M].
pub fn squared_euclidean(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a2 = a.sqr()?.sum_keepdim(1)?;
    let b2 = b.sqr()?.sum_keepdim(1)?.t()?;
    let ab = a.matmul(&b.t()?)?;
    a2.broadcast_add(&b2)?.broadcast_sub(&(ab * 2.0)?)
}

/// Cosine similarities between the rows of `a` [N, D] and `b` [M, D]: [N, M].
pub fn cosine_similarity(a: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let an = a.broadcast_div(&(a.sqr()?.sum_keepdim(1)? + eps)?.sqrt()?)?;
    let bn = b.broadcast_div(&(b.sqr()?.sum_keepdim(1)? + eps)?.sqrt()?)?;
    an.matmul(&bn.t()?)
}
