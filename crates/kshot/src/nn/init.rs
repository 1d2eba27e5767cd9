//! Parameter initialisation from our own seeded RNG (candle's CPU `set_seed` does not work).

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Uniform in [-bound, bound].
pub fn uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
    Tensor::from_vec(v, shape, device)
}

/// PyTorch's default for convolution and linear weights (Kaiming-uniform with a = √5), i.e.
/// U(−1/√fan_in, 1/√fan_in).
pub fn torch_default(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    fan_in: usize,
    device: &Device,
) -> Result<Tensor> {
    uniform(rng, shape, 1.0 / (fan_in as f64).sqrt(), device)
}

/// Normal N(mean, std²) (TensorFlow's `random_normal`).
pub fn normal(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    mean: f64,
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    let dist = Normal::new(mean, std)
        .map_err(|e| candle_core::Error::Msg(format!("normal init: bad std {std} ({e})")))?;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng) as f32).collect();
    Tensor::from_vec(v, shape, device)
}

/// Glorot/Xavier uniform: U(±√(6/(fan_in + fan_out))), TensorFlow's `xavier_initializer` and
/// `glorot_uniform`.
pub fn glorot_uniform(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    fan_in: usize,
    fan_out: usize,
    device: &Device,
) -> Result<Tensor> {
    uniform(rng, shape, (6.0 / (fan_in + fan_out) as f64).sqrt(), device)
}
