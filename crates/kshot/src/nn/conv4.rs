//! Conv4: four blocks of conv3×3 (64 channels) → batch norm → ReLU → 2×2 max-pool, flattened.
//! 28×28 inputs give a 64-d embedding (28→14→7→3→1), 84×84 inputs 1600-d (84→42→21→10→5).
//!
//! Convolutions have no bias: batch norm subtracts the channel mean right after, which cancels it.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, ops, ParamSet, Params};
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

/// Running batch-norm statistics, one (mean, var) pair of f64 vectors per block.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    pub mean: Vec<Vec<f64>>,
    pub var: Vec<Vec<f64>>,
}

impl RunningStats {
    pub fn new(blocks: usize, channels: usize) -> Self {
        Self { mean: vec![vec![0.0; channels]; blocks], var: vec![vec![1.0; channels]; blocks] }
    }

    /// PyTorch's update: biased batch variance for normalising, unbiased for the running average.
    fn update(&mut self, block: usize, stats: &ops::BatchStats, momentum: f64) {
        let n = stats.count as f64;
        let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        for c in 0..stats.mean.len() {
            let m = &mut self.mean[block][c];
            *m = (1.0 - momentum) * *m + momentum * stats.mean[c];
            let v = &mut self.var[block][c];
            *v = (1.0 - momentum) * *v + momentum * stats.var[c] * unbias;
        }
    }

    pub fn named_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, (m, v)) in self.mean.iter().zip(&self.var).enumerate() {
            out.push((
                format!("{prefix}bn{i}.running_mean"),
                Tensor::new(m.as_slice(), &Device::Cpu)?,
            ));
            out.push((
                format!("{prefix}bn{i}.running_var"),
                Tensor::new(v.as_slice(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    pub fn load_from(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        for i in 0..self.mean.len() {
            for (kind, dst) in
                [("running_mean", &mut self.mean[i]), ("running_var", &mut self.var[i])]
            {
                let key = format!("{prefix}bn{i}.{kind}");
                let t = tensors.get(&key).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: tensor `{key}` is missing; the file was not written by this model",
                        origin.display()
                    )
                })?;
                let v = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                anyhow::ensure!(
                    v.len() == dst.len(),
                    "{}: `{key}` has {} channels, the model expects {}",
                    origin.display(),
                    v.len(),
                    dst.len()
                );
                *dst = v;
            }
        }
        Ok(())
    }
}

/// The loss of a Conv4 with a linear output layer and its gradient, from
/// [`Conv4::linear_head_loss_and_grad`].
pub struct LossAndGrad {
    pub loss: Tensor,
    pub logits: Tensor,
    /// d loss / d parameter, by parameter name.
    pub grads: Params,
}

/// A Conv4 forward pass kept for an explicit backward pass, from [`Conv4::forward_taped`].
pub struct Conv4Tape {
    /// Each block's input and its batch norm.
    blocks: Vec<(Tensor, kernels::BnReluTrain)>,
    pooled_shape: Vec<usize>,
    /// [B, D]
    pub embedding: Tensor,
}

impl Conv4Tape {
    /// d/d(parameter) of a loss whose gradient with respect to the embedding is `d_embedding`
    /// [B, D], for every convolution and batch-norm parameter.
    ///
    /// These are the fused ops candle's backward pass would run, called directly: without candle's
    /// zero-filled gradient accumulators and, when differentiated again, without their add nodes.
    pub fn backward(&self, params: &Params, d_embedding: &Tensor) -> Result<Params> {
        let mut grads = Params::new();
        let mut d = d_embedding.reshape(self.pooled_shape.as_slice())?;
        for (i, (input, bn)) in self.blocks.iter().enumerate().rev() {
            let (d_conv, d_gamma, d_beta) = bn.vjp(&kernels::max_pool2x2_vjp(&bn.y, &d)?)?;
            let w = params.get(&format!("conv{i}.weight"))?;
            let (d_input, d_w) = kernels::conv3x3_vjp(input, w, &d_conv, i > 0)?;
            grads.insert(format!("conv{i}.weight"), d_w);
            grads.insert(format!("bn{i}.weight"), d_gamma);
            grads.insert(format!("bn{i}.bias"), d_beta);
            if let Some(d_input) = d_input {
                d = d_input;
            }
        }
        Ok(grads)
    }
}

/// How batch norm gets its statistics in a forward pass.
pub enum BnMode<'a> {
    /// Statistics of the current batch; folded into the running averages when given.
    Batch(Option<&'a mut RunningStats>),
    /// Fixed running averages (inference on one image at a time).
    Running(&'a RunningStats),
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
            p.push(format!("conv{i}.weight"), init::torch_default(rng, &shape, cin * 9, device)?)?;
            p.push(
                format!("bn{i}.weight"),
                Tensor::ones(c.hidden, candle_core::DType::F32, device)?,
            )?;
            p.push(
                format!("bn{i}.bias"),
                Tensor::zeros(c.hidden, candle_core::DType::F32, device)?,
            )?;
            cin = c.hidden;
        }
        Ok(p)
    }

    /// Fresh parameters of Conv4 for `height`×`width` inputs followed by a linear `ways`-unit
    /// output layer (`head.weight` [ways, D], `head.bias` [ways], PyTorch-default init), drawn in
    /// that order from `rng`.
    pub fn init_with_linear_head(
        &self,
        (height, width): (usize, usize),
        ways: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<ParamSet> {
        let dim = self.config.embedding_dim(height, width);
        if dim == 0 {
            candle_core::bail!(
                "{height}×{width} images are too small for a {}-block Conv4 (each block halves them); use larger images or fewer blocks",
                self.config.blocks
            )
        }
        let mut p = self.init(rng, device)?;
        p.push("head.weight", init::torch_default(rng, &[ways, dim], dim, device)?)?;
        p.push("head.bias", init::torch_default(rng, &[ways], dim, device)?)?;
        Ok(p)
    }

    /// [B, ways] logits of the linear output layer of [`Conv4::init_with_linear_head`] over the
    /// embedding of `x`.
    pub fn linear_head_logits(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        let emb = self.forward(params, x, bn)?;
        emb.matmul(&params.get("head.weight")?.t()?)?.broadcast_add(params.get("head.bias")?)
    }

    /// Mean cross-entropy of the linear-head logits of `x` (batch statistics) against `labels` [B]
    /// (u32), and its gradient with respect to each parameter, by an explicit backward pass
    /// ([`Conv4::forward_taped`], [`Conv4Tape::backward`]).
    ///
    /// The gradients stay attached to the graph of `params`, so Hessian-vector products through
    /// them are exact (MAML); with detached `params` nothing is recorded at all. Needs the fused
    /// kernels.
    pub fn linear_head_loss_and_grad(
        &self,
        params: &Params,
        x: &Tensor,
        labels: &Tensor,
    ) -> Result<LossAndGrad> {
        let tape = self.forward_taped(params, x, None)?;
        let emb = &tape.embedding;
        let (head_w, head_b) = (params.get("head.weight")?, params.get("head.bias")?);
        let logits = emb.matmul(&head_w.t()?)?.broadcast_add(head_b)?;
        let log_probs = ops::log_softmax(&logits)?;
        let loss = log_probs.gather(&labels.unsqueeze(1)?, 1)?.neg()?.mean_all()?;

        let (n, ways) = logits.dims2()?;
        let d_logits = ((log_probs.exp()?
            - ops::one_hot(&labels.to_vec1::<u32>()?, ways, labels.device())?
                .to_dtype(logits.dtype())?)?
            / n as f64)?;
        let mut grads = tape.backward(params, &d_logits.matmul(head_w)?)?;
        grads.insert("head.weight".to_string(), d_logits.t()?.matmul(emb)?);
        grads.insert("head.bias".to_string(), d_logits.sum(0)?);
        Ok(LossAndGrad { loss, logits, grads })
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
            let gamma = params.get(&format!("bn{i}.weight"))?;
            let beta = params.get(&format!("bn{i}.bias"))?;
            let bn =
                kernels::BnReluTrain::forward(&kernels::conv3x3(&h, w)?, gamma, beta, c.bn_eps)?;
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

    pub fn running_stats(&self) -> RunningStats {
        RunningStats::new(self.config.blocks, self.config.hidden)
    }

    /// Embeds `x` [B, C, H, W] into [B, D].
    pub fn forward(&self, params: &Params, x: &Tensor, mut bn: BnMode) -> Result<Tensor> {
        let c = &self.config;
        let mut h = x.clone();
        for i in 0..c.blocks {
            let w = params.get(&format!("conv{i}.weight"))?;
            let gamma = params.get(&format!("bn{i}.weight"))?;
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
                BnMode::Running(r) if c.fast_kernels => kernels::batch_norm_relu_fixed(
                    &h, &r.mean[i], &r.var[i], gamma, beta, c.bn_eps,
                )?,
                BnMode::Running(r) => {
                    ops::batch_norm_fixed(&h, &r.mean[i], &r.var[i], gamma, beta, c.bn_eps)?
                        .relu()?
                }
            };
            h = if c.fast_kernels { kernels::max_pool2x2(&h)? } else { ops::max_pool2x2(&h)? };
        }
        h.flatten_from(1)
    }
}
