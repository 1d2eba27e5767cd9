//! ResNet-12, the standard few-shot backbone of MetaOptNet (Lee et al. 2019) and of Tian et al.
//! (2020, "Rethinking few-shot image classification"), without DropBlock (and without dropout).
//!
//! Four residual blocks of widths 64, 160, 320, 640. Each block:
//!
//! ```text
//! conv3×3 → BN → LeakyReLU(0.1) → conv3×3 → BN → LeakyReLU(0.1) → conv3×3 → BN ─┐
//! conv1×1 → BN (the shortcut) ───────────────────────────────────────────────── + → LeakyReLU(0.1)
//!                                                                                  → 2×2 max-pool
//! ```
//!
//! All convolutions have stride 1 and no bias; the max-pool is in floor mode (84 → 42 → 21 → 10 →
//! 5). After the last block a global average pool gives the embedding, [B, 640] (Tian et al.'s
//! `avgpool`; MetaOptNet flattens the 640×5×5 map instead).
//!
//! Initialisation as in both papers' code: `kaiming_normal_(w, mode='fan_out',
//! nonlinearity='leaky_relu')` for every convolution — with PyTorch's default a = 0 that is
//! N(0, 2/fan_out), fan_out = out channels · kernel area — and batch-norm scale 1, shift 0.
//!
//! Batch-norm statistics are accumulated in f64. With `fast_kernels` (the default) the layers run
//! as kshot's fused kernels ([`crate::kernels`]): 3×3 convolution, batch norm fused with its
//! LeakyReLU (or with none), the residual sum fused with its LeakyReLU, max-pool, and the 1×1
//! shortcut as one matmul. Otherwise they are candle's composite ops ([`ops`]), the reference the
//! fused path is tested against; they keep many more intermediate tensors alive for the backward
//! pass (a training step on 20 × 3×84×84 peaks at about 4 GB fused, and ran out of 23 GB with
//! composite batch norm). Gradients are candle's (there is no explicit backward pass).

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::{ops, Backbone, BnMode, ParamSet, Params, RunningStats};
use crate::kernels;

/// The number of residual blocks.
pub const BLOCKS: usize = 4;

/// Batch-norm layers per block, in running-statistics order: `bn0`, `bn1`, `bn2`, `shortcut_bn`.
const BN_PER_BLOCK: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResNet12Config {
    pub in_channels: usize,
    /// Output channels of the four blocks. (A literal 4 rather than [`BLOCKS`]: rustc 1.95 fails
    /// with an internal error on closures that capture this struct when the length is a constant.)
    #[serde(default = "default_widths")]
    pub widths: [usize; 4],
    #[serde(default = "default_bn_eps")]
    pub bn_eps: f64,
    /// Weight of the newest batch in the running statistics (PyTorch's `momentum`).
    #[serde(default = "default_bn_momentum")]
    pub bn_momentum: f64,
    /// Negative slope of the LeakyReLUs, in [0, 1] for the fused kernels.
    #[serde(default = "default_leak")]
    pub leak: f64,
    /// Use the fused kernels of [`crate::kernels`] (default) or candle's composite ops.
    #[serde(default = "default_true")]
    pub fast_kernels: bool,
}

fn default_widths() -> [usize; 4] {
    [64, 160, 320, 640]
}

fn default_bn_eps() -> f64 {
    1e-5
}

fn default_bn_momentum() -> f64 {
    0.1
}

fn default_leak() -> f64 {
    0.1
}

fn default_true() -> bool {
    true
}

impl ResNet12Config {
    pub fn new(in_channels: usize) -> Self {
        Self {
            in_channels,
            widths: default_widths(),
            bn_eps: default_bn_eps(),
            bn_momentum: default_bn_momentum(),
            leak: default_leak(),
            fast_kernels: true,
        }
    }

    /// The spatial size after the four max-pools, or None when an input side is too small (< 16).
    pub fn output_size(&self, height: usize, width: usize) -> Option<(usize, usize)> {
        let (h, w) = (height >> BLOCKS, width >> BLOCKS);
        (h > 0 && w > 0).then_some((h, w))
    }
}

impl Default for ResNet12Config {
    fn default() -> Self {
        Self::new(3)
    }
}

#[derive(Debug, Clone)]
pub struct ResNet12 {
    pub config: ResNet12Config,
}

/// N(0, std²) samples as an f32 tensor, drawn from `rng` in row-major order.
fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f64, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (z * std) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, device)
}

/// PyTorch's `kaiming_normal_(w, mode='fan_out', nonlinearity='leaky_relu')` with its default
/// a = 0: gain √2, std = √2 / √fan_out, fan_out = w.shape[0] · kernel area.
fn kaiming_normal_fan_out(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let fan_out: usize = shape[0] * shape[2..].iter().product::<usize>();
    normal(rng, shape, (2.0 / fan_out as f64).sqrt(), device)
}

/// LeakyReLU as candle ops: leak·x + (1 - leak)·relu(x).
fn leaky_relu(x: &Tensor, leak: f64) -> Result<Tensor> {
    (x.relu()? * (1.0 - leak))? + (x * leak)?
}

impl ResNet12 {
    pub fn new(config: ResNet12Config) -> Self {
        Self { config }
    }

    /// Input channels of block `b`.
    fn block_in(&self, b: usize) -> usize {
        if b == 0 {
            self.config.in_channels
        } else {
            self.config.widths[b - 1]
        }
    }

    fn conv3x3(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.config.fast_kernels {
            kernels::conv3x3(x, w)
        } else {
            ops::conv3x3(x, w)
        }
    }

    /// 1×1 convolution without bias: `w` [Co, Ci, 1, 1] over `x` [B, Ci, H, W].
    fn conv1x1(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.config.fast_kernels {
            let (b, ci, h, wd) = x.dims4()?;
            let co = w.dim(0)?;
            let y = w.reshape((co, ci))?.broadcast_matmul(&x.reshape((b, ci, h * wd))?)?;
            y.reshape((b, co, h, wd))
        } else {
            x.conv2d(w, 0, 1, 1, 1)
        }
    }

    fn max_pool(&self, x: &Tensor) -> Result<Tensor> {
        if self.config.fast_kernels {
            kernels::max_pool2x2(x)
        } else {
            ops::max_pool2x2(x)
        }
    }

    /// Batch norm of layer `layer` (running-statistics index) over `x`, followed by a LeakyReLU
    /// of negative slope `leak`; leak 1 is no activation.
    fn batch_norm(
        &self,
        x: &Tensor,
        (gamma, beta): (&Tensor, &Tensor),
        layer: usize,
        bn: &mut BnMode,
        leak: f64,
    ) -> Result<Tensor> {
        let c = &self.config;
        let fast = c.fast_kernels;
        let y = match bn {
            BnMode::Batch(running) => {
                let (y, stats) = if fast {
                    kernels::batch_norm_leaky_relu_train(x, gamma, beta, c.bn_eps, leak)?
                } else {
                    ops::batch_norm_train(x, gamma, beta, c.bn_eps)?
                };
                if let Some(r) = running.as_deref_mut() {
                    r.update(layer, &stats, c.bn_momentum);
                }
                y
            }
            BnMode::Running(r) => {
                let (mean, var) = (r.mean(layer), r.var(layer));
                if fast {
                    kernels::batch_norm_leaky_relu_fixed(x, mean, var, gamma, beta, c.bn_eps, leak)?
                } else {
                    ops::batch_norm_fixed(x, mean, var, gamma, beta, c.bn_eps)?
                }
            }
        };
        if fast || leak == 1.0 {
            Ok(y)
        } else {
            leaky_relu(&y, leak)
        }
    }

    /// Residual block `b` over `x`.
    fn block(&self, params: &Params, x: &Tensor, b: usize, bn: &mut BnMode) -> Result<Tensor> {
        let leak = self.config.leak;
        let first = b * BN_PER_BLOCK;
        let get = |name: String| params.get(&name);
        let bn_params = |name: &str| -> Result<(&Tensor, &Tensor)> {
            Ok((get(format!("block{b}.{name}.weight"))?, get(format!("block{b}.{name}.bias"))?))
        };
        let mut h = x.clone();
        for j in 0..3 {
            h = self.conv3x3(&h, get(format!("block{b}.conv{j}.weight"))?)?;
            let slope = if j < 2 { leak } else { 1.0 };
            h = self.batch_norm(&h, bn_params(&format!("bn{j}"))?, first + j, bn, slope)?;
        }
        let shortcut = self.conv1x1(x, get(format!("block{b}.shortcut.weight"))?)?;
        let shortcut = self.batch_norm(&shortcut, bn_params("shortcut_bn")?, first + 3, bn, 1.0)?;
        let y = if self.config.fast_kernels {
            kernels::add_leaky_relu(&h, &shortcut, leak)?
        } else {
            leaky_relu(&(h + shortcut)?, leak)?
        };
        self.max_pool(&y)
    }
}

impl Backbone for ResNet12 {
    fn kind(&self) -> &'static str {
        "resnet12"
    }

    /// Per block, in order: conv0..conv2 weights, each followed by its batch norm's scale and
    /// shift, then the shortcut's weight and its batch norm.
    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let mut p = ParamSet::new();
        let bn_params = |p: &mut ParamSet, prefix: String, width: usize| -> Result<()> {
            p.push(format!("{prefix}.weight"), Tensor::ones(width, DType::F32, device)?)?;
            p.push(format!("{prefix}.bias"), Tensor::zeros(width, DType::F32, device)?)
        };
        for (b, &width) in self.config.widths.iter().enumerate() {
            let mut cin = self.block_in(b);
            for j in 0..3 {
                let w = kaiming_normal_fan_out(rng, &[width, cin, 3, 3], device)?;
                p.push(format!("block{b}.conv{j}.weight"), w)?;
                bn_params(&mut p, format!("block{b}.bn{j}"), width)?;
                cin = width;
            }
            let w = kaiming_normal_fan_out(rng, &[width, self.block_in(b), 1, 1], device)?;
            p.push(format!("block{b}.shortcut.weight"), w)?;
            bn_params(&mut p, format!("block{b}.shortcut_bn"), width)?;
        }
        Ok(p)
    }

    fn running_stats(&self) -> RunningStats {
        RunningStats::new(self.config.widths.iter().enumerate().flat_map(|(b, &width)| {
            ["bn0", "bn1", "bn2", "shortcut_bn"].map(|n| (format!("block{b}.{n}"), width))
        }))
    }

    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize> {
        match self.config.output_size(height, width) {
            Some(_) => Ok(self.config.widths[BLOCKS - 1]),
            None => candle_core::bail!(
                "{height}×{width} images are too small for ResNet-12 (its four max-pools need at least 16×16)"
            ),
        }
    }

    fn forward(&self, params: &Params, x: &Tensor, mut bn: BnMode) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        self.embedding_dim(height, width)?;
        let mut h = x.clone();
        for b in 0..BLOCKS {
            h = self.block(params, &h, b, &mut bn)?;
        }
        h.flatten_from(2)?.mean(2)
    }
}
