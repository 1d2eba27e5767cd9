//! Fast fused CPU kernels as candle custom ops. Until they land, these forward to the composite
//! reference ops in [`crate::nn::ops`], which are exact to second order.

use candle_core::{Result, Tensor};

use crate::nn::ops::{self, BatchStats};

/// 3×3 convolution, stride 1, padding 1, no bias.
pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    ops::conv3x3(x, w)
}

/// Training-mode batch norm (f64 statistics) followed by ReLU.
pub fn batch_norm_relu_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, BatchStats)> {
    let (y, s) = ops::batch_norm_train(x, gamma, beta, eps)?;
    Ok((y.relu()?, s))
}

/// 2×2 max-pool, stride 2, floor mode.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    ops::max_pool2x2(x)
}
