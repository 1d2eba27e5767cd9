//! Parameter initialisation from our own seeded RNG (candle's CPU `set_seed` does not work).

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

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
