//! Conv4: four blocks of conv3×3 (64 channels) → batch norm → ReLU → 2×2 max-pool, flattened.
//! 28×28 inputs give a 64-d embedding (28→14→7→3→1), 84×84 inputs 1600-d (84→42→21→10→5).
//!
//! Convolutions have no bias: batch norm subtracts the channel mean right after, which cancels it.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::head::{self, LossAndGrad};
use super::{init, ops, BnMode, ParamSet, Params, RunningStats, Tape};
use crate::kernels;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Conv4Config {
    pub in_channels: usize,
    pub hidden: usize,
    pub blocks: usize,
    pub bn_eps: f64,
    /// Weight of the newest batch in the running statistics (PyTorch's `momentum`).
    pub bn_momentum: f64,
    /// Use the fused kernels of [`crate::kernels`] (default) or candle's composite ops.
    #[serde(default = "default_true")]
    pub fast_kernels: bool,
    /// Whether batch norm has a learned scale γ (`bn{i}.weight`); without it γ = 1, as
    /// `tf.contrib.layers.batch_norm`'s default (cbfinn/maml).
    #[serde(default = "default_true")]
    pub bn_scale: bool,
    /// How the convolution weights start.
    #[serde(default)]
    pub conv_init: ConvInit,
}

/// Initialisation of convolution weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvInit {
    /// PyTorch's default, U(±1/√(9·C_in)).
    #[default]
    Torch,
    /// Glorot uniform, TensorFlow's `xavier_initializer_conv2d` (cbfinn/maml).
    Glorot,
}

fn default_true() -> bool {
    true
}

impl Conv4Config {
    pub fn new(in_channels: usize) -> Self {
        Self {
            in_channels,
            hidden: 64,
            blocks: 4,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
            fast_kernels: true,
            bn_scale: true,
            conv_init: ConvInit::Torch,
        }
    }

    /// Length of the embedding for `height`×`width` inputs.
    pub fn embedding_dim(&self, height: usize, width: usize) -> usize {
        let (mut h, mut w) = (height, width);
        for _ in 0..self.blocks {
            h /= 2;
            w /= 2;
        }
        self.hidden * h * w
    }
}

/// A Conv4 forward pass kept for an explicit backward pass, from [`Conv4::forward_taped`].
pub struct Conv4Tape {
    /// Each block's input and its batch norm.
    blocks: Vec<(Tensor, kernels::BnReluTrain)>,
    pooled_shape: Vec<usize>,
    /// [B, D]
    pub embedding: Tensor,
}

impl Tape for Conv4Tape {
    fn embedding(&self) -> &Tensor {
        &self.embedding
    }

    /// d/d(parameter) for every convolution and batch-norm parameter: the fused ops candle's
    /// backward pass would run, called directly, without candle's zero-filled gradient accumulators
    /// and, when differentiated again, without their add nodes.
    fn backward(&self, params: &Params, d_embedding: &Tensor) -> Result<Params> {
        let mut grads = Params::new();
        let mut d = d_embedding.reshape(self.pooled_shape.as_slice())?;
        for (i, (input, bn)) in self.blocks.iter().enumerate().rev() {
            let (d_conv, d_gamma, d_beta) = bn.vjp(&kernels::max_pool2x2_vjp(&bn.y, &d)?)?;
            let w = params.get(&format!("conv{i}.weight"))?;
            let (d_input, d_w) = kernels::conv3x3_vjp(input, w, &d_conv, i > 0)?;
            grads.insert(format!("conv{i}.weight"), d_w);
            if params.get(&format!("bn{i}.weight")).is_ok() {
                grads.insert(format!("bn{i}.weight"), d_gamma);
            }
            grads.insert(format!("bn{i}.bias"), d_beta);
            if let Some(d_input) = d_input {
                d = d_input;
            }
        }
        Ok(grads)
    }
}

#[derive(Debug, Clone)]
pub struct Conv4 {
    pub config: Conv4Config,
}

impl Conv4 {
    pub fn new(config: Conv4Config) -> Self {
        Self { config }
    }

    /// Fresh parameters: PyTorch-default uniform convolution weights, BN scale 1 and shift 0.
    pub fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let c = &self.config;
        let mut p = ParamSet::new();
        let mut cin = c.in_channels;
        for i in 0..c.blocks {
            let shape = [c.hidden, cin, 3, 3];
            let w = match c.conv_init {
                ConvInit::Torch => init::torch_default(rng, &shape, cin * 9, device)?,
                ConvInit::Glorot => {
                    init::glorot_uniform(rng, &shape, cin * 9, c.hidden * 9, device)?
                }
            };
            p.push(format!("conv{i}.weight"), w)?;
            if c.bn_scale {
                p.push(
                    format!("bn{i}.weight"),
                    Tensor::ones(c.hidden, candle_core::DType::F32, device)?,
                )?;
            }
            p.push(
                format!("bn{i}.bias"),
                Tensor::zeros(c.hidden, candle_core::DType::F32, device)?,
            )?;
            cin = c.hidden;
        }
        Ok(p)
    }

    /// Fresh parameters followed by a linear `ways`-unit output layer ([`head::init_linear_head`]).
    pub fn init_with_linear_head(
        &self,
        size: (usize, usize),
        ways: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<ParamSet> {
        head::init_linear_head(self, size, ways, rng, device)
    }

    /// [B, ways] logits of the linear output layer ([`head::linear_logits`]).
    pub fn linear_head_logits(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        head::linear_logits(self, params, x, bn)
    }

    /// Cross-entropy of the linear-head logits and its gradient by the explicit backward pass,
    /// attached to the graph of `params` ([`head::linear_loss_and_grad`]).
    pub fn linear_head_loss_and_grad(
        &self,
        params: &Params,
        x: &Tensor,
        labels: &Tensor,
    ) -> Result<LossAndGrad> {
        head::linear_loss_and_grad(self, params, x, labels, head::Graph::Keep)
    }

    /// The training-mode forward pass (batch statistics, folded into `running` when given) with
    /// what [`Conv4Tape::backward`] needs. Needs the fused kernels.
    pub fn forward_taped(
        &self,
        params: &Params,
        x: &Tensor,
        mut running: Option<&mut RunningStats>,
    ) -> Result<Conv4Tape> {
        let c = &self.config;
        if !c.fast_kernels {
            candle_core::bail!(
                "the explicit Conv4 backward pass needs the fused kernels (fast_kernels = true)"
            );
        }
        let mut blocks = Vec::with_capacity(c.blocks);
        let mut h = x.contiguous()?;
        for i in 0..c.blocks {
            let w = params.get(&format!("conv{i}.weight"))?;
            let gamma = self.gamma(params, i, &h)?;
            let beta = params.get(&format!("bn{i}.bias"))?;
            let bn =
                kernels::BnReluTrain::forward(&kernels::conv3x3(&h, w)?, &gamma, beta, c.bn_eps)?;
            if let Some(r) = running.as_deref_mut() {
                r.update(i, &bn.batch_stats()?, c.bn_momentum);
            }
            let pooled = kernels::max_pool2x2(&bn.y)?;
            blocks.push((h, bn));
            h = pooled;
        }
        let pooled_shape = h.dims().to_vec();
        Ok(Conv4Tape { blocks, pooled_shape, embedding: h.flatten_from(1)? })
    }

    /// Block `i`'s batch-norm scale: the parameter, or ones without [`Conv4Config::bn_scale`].
    fn gamma(&self, params: &Params, i: usize, like: &Tensor) -> Result<Tensor> {
        if self.config.bn_scale {
            Ok(params.get(&format!("bn{i}.weight"))?.clone())
        } else {
            Tensor::ones(self.config.hidden, like.dtype(), like.device())
        }
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
            let gamma = &self.gamma(params, i, &h)?;
            let beta = params.get(&format!("bn{i}.bias"))?;
            h = if c.fast_kernels { kernels::conv3x3(&h, w)? } else { ops::conv3x3(&h, w)? };
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
            h = if c.fast_kernels { kernels::max_pool2x2(&h)? } else { ops::max_pool2x2(&h)? };
        }
        h.flatten_from(1)
    }
}
