//! Koch, Zemel & Salakhutdinov's (2015) Siamese twin for 105×105 images: conv 64@10×10, max-pool,
//! 128@7×7, max-pool, 128@4×4, max-pool, 256@4×4, each convolution with a bias and ReLU, flattened
//! (256·6·6 = 9216 features at 105×105). No batch norm.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, ops, Backbone, BnMode, ParamSet, Params, RunningStats};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KochConfig {
    pub in_channels: usize,
}

/// The convolutional layers: (out channels, kernel).
const CONVS: [(usize, usize); 4] = [(64, 10), (128, 7), (128, 4), (256, 4)];

#[derive(Debug, Clone)]
pub struct KochNet {
    pub config: KochConfig,
}

impl KochNet {
    pub fn new(config: KochConfig) -> Self {
        Self { config }
    }

    /// (channels, side) of the features for `side`×`side` inputs, if they are large enough.
    fn output_side(side: usize) -> Option<usize> {
        let mut side = side;
        for (i, &(_, k)) in CONVS.iter().enumerate() {
            side = side.checked_sub(k - 1).filter(|&s| s > 0)?;
            if i + 1 < CONVS.len() {
                side /= 2;
            }
        }
        Some(side).filter(|&s| s > 0)
    }
}

impl Backbone for KochNet {
    fn kind(&self) -> &'static str {
        "koch"
    }

    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let mut params = ParamSet::new();
        let mut cin = self.config.in_channels;
        for (i, &(cout, k)) in CONVS.iter().enumerate() {
            let fan_in = cin * k * k;
            params.push(
                format!("koch.conv{i}.weight"),
                init::torch_default(rng, &[cout, cin, k, k], fan_in, device)?,
            )?;
            params.push(
                format!("koch.conv{i}.bias"),
                init::torch_default(rng, &[cout], fan_in, device)?,
            )?;
            cin = cout;
        }
        Ok(params)
    }

    fn running_stats(&self) -> RunningStats {
        RunningStats::empty()
    }

    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize> {
        match (Self::output_side(height), Self::output_side(width)) {
            (Some(h), Some(w)) => Ok(CONVS[CONVS.len() - 1].0 * h * w),
            _ => candle_core::bail!(
                "the koch backbone needs larger images (105×105; got {height}×{width})"
            ),
        }
    }

    fn forward(&self, params: &Params, x: &Tensor, _bn: BnMode) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..CONVS.len() {
            let w = params.get(&format!("koch.conv{i}.weight"))?;
            let b = params.get(&format!("koch.conv{i}.bias"))?;
            h = h.conv2d(w, 0, 1, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?.relu()?;
            if i + 1 < CONVS.len() {
                h = ops::max_pool2x2(&h)?;
            }
        }
        h.flatten_from(1)
    }
}

/// Values drawn from N(`mean`, `std`²).
pub fn normal(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    mean: f64,
    std: f64,
    device: &Device,
) -> Result<Tensor> {
    use rand_distr::Distribution;
    let dist = rand_distr::Normal::new(mean, std)
        .map_err(|e| candle_core::Error::Msg(format!("normal({mean}, {std}): {e}")))?;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng) as f32).collect();
    Tensor::from_vec(v, shape, device)
}

/// Koch et al.'s (2015, §3.3) initialisation of a Siamese twin, drawn from `rng` in the order of
/// `params`: convolution weights (4-d) N(0, 0.01²); fully connected weights (`embed.weight`,
/// `head.alpha`) N(0, 0.2²); every bias N(0.5, 0.01²). Batch-norm parameters (`bn*`, of a reduced
/// twin) keep their values. The standard deviations are the paper's; N(0, 0.2²) for the fully
/// connected weights is as the paper is usually quoted (not confirmed against it).
pub fn paper_init(params: &ParamSet, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
    let mut out = ParamSet::new();
    for (name, var) in params.iter() {
        let dims = var.dims().to_vec();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let is_bn = name.split('.').any(|part| part.starts_with("bn"));
        let value = if is_bn {
            var.as_tensor().copy()?
        } else if leaf == "bias" {
            normal(rng, &dims, 0.5, 0.01, device)?
        } else if dims.len() == 4 {
            normal(rng, &dims, 0.0, 0.01, device)?
        } else {
            normal(rng, &dims, 0.0, 0.2, device)?
        };
        out.push(name, value)?;
    }
    Ok(out)
}
