//! The strided-convolution Conv4 of MAML's and Reptile's official Omniglot code: four blocks of
//! conv 3×3, stride 2, TensorFlow 'SAME' padding, with a bias → batch norm → ReLU, no pooling.
//! 28×28 inputs shrink 28→14→7→4→2 (each block gives ⌈n/2⌉).
//!
//! - MAML (cbfinn/maml, `utils.py` `conv_block` without `--max_pool`, `maml.py` `forward_conv`):
//!   `tf.contrib.layers.batch_norm` with its defaults (an offset but **no scale**, ε = 0.001, decay
//!   0.999), then the features averaged over space: 64-d ([`StridedConv4Config::maml_omniglot`]).
//! - Reptile (openai/supervised-reptile, `models.py` `OmniglotModel`): `tf.layers.batch_normalization`
//!   (scale and offset, ε = 0.001, momentum 0.99), then the 2·2·64 features flattened: 256-d
//!   ([`StridedConv4Config::reptile_omniglot`]).
//!
//! Both always normalise by the batch's statistics; the running averages kept here
//! ([`BnMode::Batch`] with `Some`) are for [`BnMode::Running`] inference only.
//!
//! The stride-2 convolution is a fused kernel family with exact derivatives of every order
//! ([`kernels::conv3x3_same_stride2`]).

use candle_core::{DType, Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, ops, BnMode, ExplicitBackward, ParamSet, Params, RunningStats, Tape};
use crate::kernels;

/// What the last block's [B, C, h, w] feature maps become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StridedFeatures {
    /// Averaged over space: [B, C] (MAML's `tf.reduce_mean(hidden4, [1, 2])`).
    Mean,
    /// Flattened: [B, C·h·w] (Reptile's reshape).
    Flatten,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StridedConv4Config {
    pub in_channels: usize,
    pub hidden: usize,
    pub blocks: usize,
    pub bn_eps: f64,
    /// Weight of the newest batch in the running statistics (PyTorch's `momentum`; TensorFlow's
    /// `1 - decay`).
    pub bn_momentum: f64,
    /// Whether batch norm has a learned scale γ (`bn{i}.weight`); without it γ = 1.
    pub bn_scale: bool,
    pub features: StridedFeatures,
    /// Use the fused kernels of [`crate::kernels`] (default) or candle's composite ops.
    #[serde(default = "default_true")]
    pub fast_kernels: bool,
}

fn default_true() -> bool {
    true
}

impl StridedConv4Config {
    /// MAML's Omniglot network: `tf.contrib.layers.batch_norm` defaults (center, no scale,
    /// ε = 1e-3, decay 0.999), spatial mean → 64-d.
    pub fn maml_omniglot(in_channels: usize) -> Self {
        Self {
            in_channels,
            hidden: 64,
            blocks: 4,
            bn_eps: 1e-3,
            bn_momentum: 1e-3,
            bn_scale: false,
            features: StridedFeatures::Mean,
            fast_kernels: true,
        }
    }

    /// Reptile's Omniglot network: `tf.layers.batch_normalization` defaults (center and scale,
    /// ε = 1e-3, momentum 0.99), flattened → 256-d for 28×28.
    pub fn reptile_omniglot(in_channels: usize) -> Self {
        Self {
            bn_momentum: 1e-2,
            bn_scale: true,
            features: StridedFeatures::Flatten,
            ..Self::maml_omniglot(in_channels)
        }
    }

    /// Spatial size of the last block's output for `height`×`width` inputs: ⌈n/2⌉ per block.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (mut h, mut w) = (height, width);
        for _ in 0..self.blocks {
            h = h.div_ceil(2);
            w = w.div_ceil(2);
        }
        (h, w)
    }

    /// Length of the embedding for `height`×`width` inputs (0 for empty inputs).
    pub fn embedding_dim(&self, height: usize, width: usize) -> usize {
        if height == 0 || width == 0 {
            return 0;
        }
        match self.features {
            StridedFeatures::Mean => self.hidden,
            StridedFeatures::Flatten => {
                let (h, w) = self.output_size(height, width);
                self.hidden * h * w
            }
        }
    }
}

/// TensorFlow's 'SAME' padding of a 3×3, stride-2 window over `n` positions: (before, after),
/// with a total of max((out − 1)·2 + 3 − n, 0) for out = ⌈n/2⌉ and the odd one after.
/// Even n: (0, 1); odd n: (1, 1).
pub fn same_padding(n: usize) -> (usize, usize) {
    let out = n.div_ceil(2);
    let total = ((out.max(1) - 1) * 2 + 3).saturating_sub(n);
    (total / 2, total - total / 2)
}

/// 3×3 convolution, stride 2, TensorFlow 'SAME' padding, no bias: [B, Ci, H, W] * [Co, Ci, 3, 3]
/// → [B, Co, ⌈H/2⌉, ⌈W/2⌉]: with `fast_kernels` the fused family
/// [`kernels::conv3x3_same_stride2`], without candle's `conv2d` with stride 2 over the input
/// padded by [`same_padding`].
pub fn conv3x3_same_stride2(x: &Tensor, w: &Tensor, fast_kernels: bool) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    if h == 0 || wd == 0 {
        candle_core::bail!("strided conv: empty {h}×{wd} input");
    }
    if fast_kernels {
        kernels::conv3x3_same_stride2(x, w)
    } else {
        let (top, bottom) = same_padding(h);
        let (left, right) = same_padding(wd);
        x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?.conv2d(w, 0, 2, 1, 1)
    }
}

#[derive(Debug, Clone)]
pub struct StridedConv4 {
    pub config: StridedConv4Config,
}

impl StridedConv4 {
    pub fn new(config: StridedConv4Config) -> Self {
        Self { config }
    }

    /// Fresh parameters, per block in this order: `conv{i}.weight` [C, Cin, 3, 3] Glorot-uniform
    /// (fan_in = Cin·9, fan_out = C·9), `conv{i}.bias` [C] zeros, `bn{i}.weight` [C] ones (only
    /// with `bn_scale`), `bn{i}.bias` [C] zeros.
    pub fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let c = &self.config;
        let mut p = ParamSet::new();
        let mut cin = c.in_channels;
        for i in 0..c.blocks {
            let shape = [c.hidden, cin, 3, 3];
            p.push(
                format!("conv{i}.weight"),
                init::glorot_uniform(rng, &shape, cin * 9, c.hidden * 9, device)?,
            )?;
            p.push(format!("conv{i}.bias"), Tensor::zeros(c.hidden, DType::F32, device)?)?;
            if c.bn_scale {
                p.push(format!("bn{i}.weight"), Tensor::ones(c.hidden, DType::F32, device)?)?;
            }
            p.push(format!("bn{i}.bias"), Tensor::zeros(c.hidden, DType::F32, device)?)?;
            cin = c.hidden;
        }
        Ok(p)
    }

    pub fn running_stats(&self) -> RunningStats {
        RunningStats::new((0..self.config.blocks).map(|i| (format!("bn{i}"), self.config.hidden)))
    }

    /// Embeds `x` [B, C, H, W] into [B, D].
    pub fn forward(&self, params: &Params, x: &Tensor, mut bn: BnMode) -> Result<Tensor> {
        let c = &self.config;
        let mut h = x.clone();
        for i in 0..c.blocks {
            let w = params.get(&format!("conv{i}.weight"))?;
            let bias = params.get(&format!("conv{i}.bias"))?;
            let beta = params.get(&format!("bn{i}.bias"))?;
            h = conv3x3_same_stride2(&h, w, c.fast_kernels)?
                .broadcast_add(&bias.reshape((1, c.hidden, 1, 1))?)?;
            // Without a learned scale γ is the constant 1: no gradient is taken for it.
            let ones;
            let gamma = if c.bn_scale {
                params.get(&format!("bn{i}.weight"))?
            } else {
                ones = Tensor::ones(c.hidden, h.dtype(), h.device())?;
                &ones
            };
            h = match &mut bn {
                BnMode::Batch(running) => {
                    let (y, stats) = if c.fast_kernels {
                        kernels::batch_norm_relu_train(&h, gamma, beta, c.bn_eps)?
                    } else {
                        let (y, s) = ops::batch_norm_train(&h, gamma, beta, c.bn_eps)?;
                        (y.relu()?, s)
                    };
                    if let Some(r) = running.as_deref_mut() {
                        r.update(i, &stats, c.bn_momentum);
                    }
                    y
                }
                BnMode::Running(r) if c.fast_kernels => {
                    kernels::batch_norm_relu_fixed(&h, r.mean(i), r.var(i), gamma, beta, c.bn_eps)?
                }
                BnMode::Running(r) => {
                    ops::batch_norm_fixed(&h, r.mean(i), r.var(i), gamma, beta, c.bn_eps)?.relu()?
                }
            };
        }
        match c.features {
            StridedFeatures::Mean => h.flatten_from(2)?.mean(2),
            StridedFeatures::Flatten => h.flatten_from(1),
        }
    }
}

/// A strided Conv4 forward pass kept for its explicit backward pass
/// ([`StridedConv4::forward_taped`]).
pub struct StridedConv4Tape {
    /// Each block's input and its batch norm.
    blocks: Vec<(Tensor, kernels::BnReluTrain)>,
    last_shape: Vec<usize>,
    features: StridedFeatures,
    bn_scale: bool,
    embedding: Tensor,
}

impl Tape for StridedConv4Tape {
    fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// The fused backward ops of every block (batch norm + ReLU, the strided convolution's input
    /// and weight gradients), all differentiable again.
    fn backward(&self, params: &Params, d_embedding: &Tensor) -> Result<Params> {
        let mut grads = Params::new();
        let shape = self.last_shape.as_slice();
        let mut d = match self.features {
            StridedFeatures::Flatten => d_embedding.reshape(shape)?,
            StridedFeatures::Mean => {
                let (h, w) = (shape[2], shape[3]);
                (d_embedding.unsqueeze(2)?.unsqueeze(3)?.broadcast_as(shape)? / (h * w) as f64)?
                    .contiguous()?
            }
        };
        for (i, (input, bn)) in self.blocks.iter().enumerate().rev() {
            let (d_pre, d_gamma, d_beta) = bn.vjp(&d)?;
            grads.insert(format!("conv{i}.bias"), d_pre.sum((0, 2, 3))?);
            if self.bn_scale {
                grads.insert(format!("bn{i}.weight"), d_gamma);
            }
            grads.insert(format!("bn{i}.bias"), d_beta);
            let weight = params.get(&format!("conv{i}.weight"))?;
            let (d_input, d_w) = kernels::conv3x3_same_stride2_vjp(input, weight, &d_pre, i > 0)?;
            grads.insert(format!("conv{i}.weight"), d_w);
            if let Some(d_input) = d_input {
                d = d_input;
            }
        }
        Ok(grads)
    }
}

impl StridedConv4 {
    /// The training-mode forward pass (batch statistics, folded into `running` when given) with
    /// what [`StridedConv4Tape::backward`] needs. Needs the fused kernels.
    pub fn forward_taped(
        &self,
        params: &Params,
        x: &Tensor,
        mut running: Option<&mut RunningStats>,
    ) -> Result<StridedConv4Tape> {
        let c = &self.config;
        if !c.fast_kernels {
            candle_core::bail!(
                "the explicit strided Conv4 backward pass needs the fused kernels (fast_kernels = true)"
            );
        }
        let mut blocks = Vec::with_capacity(c.blocks);
        let mut h = x.contiguous()?;
        for i in 0..c.blocks {
            let w = params.get(&format!("conv{i}.weight"))?;
            let bias = params.get(&format!("conv{i}.bias"))?;
            let beta = params.get(&format!("bn{i}.bias"))?;
            let gamma = if c.bn_scale {
                params.get(&format!("bn{i}.weight"))?.clone()
            } else {
                Tensor::ones(c.hidden, h.dtype(), h.device())?
            };
            let pre = kernels::conv3x3_same_stride2(&h, w)?
                .broadcast_add(&bias.reshape((1, c.hidden, 1, 1))?)?
                .contiguous()?;
            let bn = kernels::BnReluTrain::forward(&pre, &gamma, beta, c.bn_eps)?;
            if let Some(r) = running.as_deref_mut() {
                r.update(i, &bn.batch_stats()?, c.bn_momentum);
            }
            let out = bn.y.clone();
            blocks.push((h, bn));
            h = out;
        }
        let last_shape = h.dims().to_vec();
        let embedding = match c.features {
            StridedFeatures::Mean => h.flatten_from(2)?.mean(2)?,
            StridedFeatures::Flatten => h.flatten_from(1)?,
        };
        Ok(StridedConv4Tape {
            blocks,
            last_shape,
            features: c.features,
            bn_scale: c.bn_scale,
            embedding,
        })
    }
}

impl ExplicitBackward for StridedConv4 {
    fn forward_taped(
        &self,
        params: &Params,
        x: &Tensor,
        running: Option<&mut RunningStats>,
    ) -> Result<Box<dyn Tape>> {
        Ok(Box::new(StridedConv4::forward_taped(self, params, x, running)?))
    }
}

impl super::Backbone for StridedConv4 {
    fn kind(&self) -> &'static str {
        "conv4-strided"
    }

    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        StridedConv4::init(self, rng, device)
    }

    fn running_stats(&self) -> RunningStats {
        StridedConv4::running_stats(self)
    }

    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize> {
        let dim = self.config.embedding_dim(height, width);
        if dim == 0 {
            candle_core::bail!(
                "{height}×{width} images give the strided Conv4 an empty embedding (hidden = {})",
                self.config.hidden
            )
        }
        Ok(dim)
    }

    fn forward(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        StridedConv4::forward(self, params, x, bn)
    }

    fn explicit_backward(&self) -> Option<&dyn ExplicitBackward> {
        if self.config.fast_kernels {
            Some(self)
        } else {
            None
        }
    }
}
