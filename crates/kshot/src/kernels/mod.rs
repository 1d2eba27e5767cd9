//! Fast fused CPU kernels as candle custom ops, for f32 and f64 tensors on the CPU.
//!
//! Each op's backward pass is written in differentiable candle ops or in other ops of this module
//! that have their own backward, so gradients stay exact to second order (MAML). The composite
//! reference ops in [`crate::nn::ops`] compute the same functions; `tests/kernels.rs` holds the two
//! together.

mod activation;
mod batch_norm;
mod conv;
mod conv_each;
mod conv_stride2;
mod coordinatewise;
mod cpu;
mod distance;
mod lstm_cell;
mod mann;
mod meta_lstm;
mod pool;
mod simd;

use candle_core::{Result, Tensor};

use crate::nn::ops::BatchStats;

pub use conv_each::conv3x3_each;
pub use coordinatewise::{coordinate_lstm, coordinate_mlp, LstmLayout, MlpLayout};
pub use mann::{least_used_slots, mann_recurrence, MannLayout};
pub use meta_lstm::{MetaLstmGrads, MetaLstmUnroll, MetaLstmWeights};

/// 3×3 convolution, stride 1, padding 1, no bias: [B, Ci, H, W] * [Co, Ci, 3, 3] → [B, Co, H, W].
pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    conv::conv3x3(x, w)
}

/// Training-mode batch norm followed by ReLU: y = relu(γ·(x - μ)/√(σ² + ε) + β) over [B, C, H, W],
/// with the per-channel mean and biased variance summed in f64.
pub fn batch_norm_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    batch_norm::batch_norm_relu_train(x, gamma, beta, eps)
}

/// Training-mode batch norm followed by a LeakyReLU of negative slope `leak`: leak 0 is
/// [`batch_norm_relu_train`], leak 1 plain batch norm without an activation.
pub fn batch_norm_leaky_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    leak: f64,
) -> Result<(Tensor, BatchStats)> {
    batch_norm::batch_norm_leaky_relu_train(x, gamma, beta, eps, leak)
}

pub use batch_norm::BnReluTrain;

/// The gradients of [`conv3x3`] for the output gradient `dy`: (d/dx, d/dw), as differentiable ops
/// (the op's own backward). d/dx is skipped (None) when `want_dx` is false.
pub fn conv3x3_vjp(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let dx = if want_dx { Some(conv::conv3x3(dy, &conv::flip_t(w)?)?) } else { None };
    Ok((dx, conv::weight_grad(x, dy)?))
}

/// 3×3 convolution, stride 2, TensorFlow 'SAME' padding, no bias: [B, Ci, H, W] * [Co, Ci, 3, 3] →
/// [B, Co, ⌈H/2⌉, ⌈W/2⌉] (MAML's and Reptile's Omniglot network).
pub fn conv3x3_same_stride2(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    conv_stride2::conv3x3_same_stride2(x, w)
}

/// The gradients of [`conv3x3_same_stride2`] for the output gradient `dy`: (d/dx, d/dw), as
/// differentiable ops (the op's own backward). d/dx is skipped (None) when `want_dx` is false.
pub fn conv3x3_same_stride2_vjp(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let (_, _, h, wd) = x.dims4()?;
    let dx = if want_dx { Some(conv_stride2::transposed(dy, w, (h, wd))?) } else { None };
    Ok((dx, conv_stride2::weight_grad(x, dy)?))
}

/// The gradient of [`max_pool2x2`] at `x` for the output gradient `dy`, as a differentiable op.
pub fn max_pool2x2_vjp(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    pool::unpool(x, dy)
}

/// 2×2 max-pool, stride 2, floor mode (7 → 3): a trailing odd row or column is dropped. Ties go
/// to the first maximum of the window in row-major order.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    pool::max_pool2x2(x)
}

/// Evaluation-mode batch norm followed by ReLU, with fixed per-channel statistics.
pub fn batch_norm_relu_fixed(
    x: &Tensor,
    mean: &[f64],
    var: &[f64],
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm::batch_norm_relu_fixed(x, mean, var, gamma, beta, eps)
}

/// Evaluation-mode batch norm followed by a LeakyReLU of negative slope `leak` (0: ReLU; 1: none).
pub fn batch_norm_leaky_relu_fixed(
    x: &Tensor,
    mean: &[f64],
    var: &[f64],
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    leak: f64,
) -> Result<Tensor> {
    batch_norm::batch_norm_leaky_relu_fixed(x, mean, var, gamma, beta, eps, leak)
}

/// leaky_relu(a + b) with negative slope `leak` in [0, 1], element-wise over equal shapes (a
/// residual sum and its activation); only the output is kept for the backward pass.
pub fn add_leaky_relu(a: &Tensor, b: &Tensor, leak: f64) -> Result<Tensor> {
    activation::add_leaky_relu(a, b, leak)
}

/// Pairwise squared Euclidean distances between the rows of `a` [N, D] and `b` [M, D]: [N, M].
pub fn squared_euclidean(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    distance::squared_euclidean(a, b)
}

/// Meta-LSTM's meta-learner over the learner's weights `c0` (P elements), to be stepped with the
/// learner's gradient and loss ([`MetaLstmUnroll::step`]) and, with `keep_tape`, differentiated back
/// to c_0 and `weights` ([`MetaLstmUnroll::backward`]). Not a candle op: its gradient is explicit.
pub fn meta_lstm_unroll(
    weights: &MetaLstmWeights,
    c0: &Tensor,
    preprocess_p: f64,
    keep_tape: bool,
) -> Result<MetaLstmUnroll> {
    MetaLstmUnroll::new(weights, c0, preprocess_p, keep_tape)
}
