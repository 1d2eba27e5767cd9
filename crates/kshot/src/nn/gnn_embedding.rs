//! The embedding networks of Garcia & Bruna's official code (vgsatorras/few-shot-gnn,
//! `models/models.py`): blocks of conv3×3 (no bias) → batch norm → [2×2 max-pool] → LeakyReLU
//! [→ channel dropout], then a linear layer → batch norm [→ LeakyReLU].
//!
//! - Omniglot (`EmbeddingOmniglot`), 28×28: 64-64-64-64, padding 1, 1, 0, 0, pooling after the
//!   first two (28→14→7→5→3), LeakyReLU 0.1, fc 576 → 64 without bias, batch norm, LeakyReLU 0.01.
//! - miniImageNet (`EmbeddingImagenet`), 84×84: 64-96-128-256, padding 1, 0, 1, 1, pooling after
//!   each (84→42→40→20→10→5), LeakyReLU 0.2, `Dropout2d` 0.4 and 0.5 after the last two blocks,
//!   fc 6400 → 128 with bias, batch norm, no activation.
//!
//! An unpadded convolution is the interior of the padded one (the same weights see the same
//! pixels), so both run on kshot's fused 3×3 kernel.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, Backbone, BnMode, ParamSet, Params, RunningStats};
use crate::kernels;

/// One convolution block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GnnConvBlock {
    pub width: usize,
    /// Padding 1 (size kept) or none (size − 2).
    pub padded: bool,
    /// 2×2 max-pool after batch norm.
    pub pool: bool,
    /// Probability of dropping a whole channel in training (`Dropout2d`); 0 for none.
    pub dropout: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GnnEmbeddingConfig {
    pub in_channels: usize,
    /// The side of the square inputs, which fixes the linear layer's input size.
    pub image_size: usize,
    pub blocks: Vec<GnnConvBlock>,
    /// Negative slope of the blocks' LeakyReLU.
    pub leak: f64,
    /// The embedding length (the linear layer's width).
    pub embedding: usize,
    pub fc_bias: bool,
    /// Negative slope of the LeakyReLU after the last batch norm; `None` for no activation.
    pub out_leak: Option<f64>,
    pub bn_eps: f64,
    pub bn_momentum: f64,
}

impl GnnEmbeddingConfig {
    /// `EmbeddingOmniglot` (64-d embeddings of 28×28 images).
    pub fn omniglot(in_channels: usize) -> Self {
        let block = |padded, pool| GnnConvBlock { width: 64, padded, pool, dropout: 0.0 };
        Self {
            in_channels,
            image_size: 28,
            blocks: vec![
                block(true, true),
                block(true, true),
                block(false, false),
                block(false, false),
            ],
            leak: 0.1,
            embedding: 64,
            fc_bias: false,
            out_leak: Some(0.01),
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// `EmbeddingImagenet` (128-d embeddings of 84×84 images).
    pub fn mini_imagenet(in_channels: usize) -> Self {
        let block = |width, padded, dropout| GnnConvBlock { width, padded, pool: true, dropout };
        Self {
            in_channels,
            image_size: 84,
            blocks: vec![
                block(64, true, 0.0),
                block(96, false, 0.0),
                block(128, true, 0.4),
                block(256, true, 0.5),
            ],
            leak: 0.2,
            embedding: 128,
            fc_bias: true,
            out_leak: None,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// The flattened size of the last block's output for `height`×`width` inputs.
    pub fn features(&self, height: usize, width: usize) -> Option<usize> {
        let (mut h, mut w) = (height, width);
        for b in &self.blocks {
            if !b.padded {
                h = h.checked_sub(2)?;
                w = w.checked_sub(2)?;
            }
            if b.pool {
                (h, w) = (h / 2, w / 2);
            }
            if h == 0 || w == 0 {
                return None;
            }
        }
        Some(self.blocks.last().map_or(self.in_channels, |b| b.width) * h * w)
    }
}

#[derive(Debug, Clone)]
pub struct GnnEmbedding {
    pub config: GnnEmbeddingConfig,
    /// The name `--backbone` spells.
    kind: &'static str,
    /// The input size of the linear layer, for `image_size` inputs.
    features: Option<usize>,
}

impl GnnEmbedding {
    pub fn new(config: GnnEmbeddingConfig, kind: &'static str) -> Self {
        let features = config.features(config.image_size, config.image_size);
        Self { config, kind, features }
    }

    fn bn_leaky(
        &self,
        x: &Tensor,
        params: &Params,
        layer: usize,
        bn: &mut BnMode,
        leak: f64,
    ) -> Result<Tensor> {
        let c = &self.config;
        let gamma = params.get(&format!("bn{layer}.weight"))?;
        let beta = params.get(&format!("bn{layer}.bias"))?;
        match bn {
            BnMode::Batch(running) => {
                let (y, stats) =
                    kernels::batch_norm_leaky_relu_train(x, gamma, beta, c.bn_eps, leak)?;
                if let Some(r) = running.as_deref_mut() {
                    r.update(layer, &stats, c.bn_momentum);
                }
                Ok(y)
            }
            BnMode::Running(r) => kernels::batch_norm_leaky_relu_fixed(
                x,
                r.mean(layer),
                r.var(layer),
                gamma,
                beta,
                c.bn_eps,
                leak,
            ),
        }
    }

    fn forward_with(
        &self,
        params: &Params,
        x: &Tensor,
        mut bn: BnMode,
        mut dropout: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        self.embedding_dim(height, width)?;
        let mut h = x.clone();
        for (i, block) in self.config.blocks.iter().enumerate() {
            h = kernels::conv3x3(&h, params.get(&format!("conv{i}.weight"))?)?;
            if !block.padded {
                let (_, _, hh, ww) = h.dims4()?;
                h = h.narrow(2, 1, hh - 2)?.narrow(3, 1, ww - 2)?;
            }
            // LeakyReLU is increasing, so it commutes with the max-pool the code applies first.
            h = self.bn_leaky(&h, params, i, &mut bn, self.config.leak)?;
            if block.pool {
                h = kernels::max_pool2x2(&h)?;
            }
            if let Some(rng) = dropout.as_deref_mut() {
                h = channel_dropout(&h, block.dropout, rng)?;
            }
        }
        let b = h.dim(0)?;
        let mut y = h.reshape((b, ()))?.matmul(&params.get("fc.weight")?.t()?)?;
        if self.config.fc_bias {
            y = y.broadcast_add(params.get("fc.bias")?)?;
        }
        let d = self.config.embedding;
        let leak = self.config.out_leak.unwrap_or(1.0);
        let last = self.config.blocks.len();
        self.bn_leaky(&y.reshape((b, d, 1, 1))?, params, last, &mut bn, leak)?.reshape((b, d))
    }
}

/// `Dropout2d(p)` in training: each channel of each image is zeroed with probability `p`, the rest
/// scaled by 1/(1 − p).
pub fn channel_dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let (b, c, _, _) = x.dims4()?;
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> =
        (0..b * c).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    let mask = Tensor::from_vec(mask, (b, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&mask)
}

impl Backbone for GnnEmbedding {
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// conv0…conv3 weights and bn0…bn3, then fc (and its bias) and bn4; PyTorch's default
    /// initialisation (U(±1/√fan_in)), batch norm γ = 1, β = 0.
    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let c = &self.config;
        let Some(features) = self.features else {
            candle_core::bail!(
                "{0}×{0} images are too small for the GNN embedding network",
                c.image_size
            )
        };
        let mut p = ParamSet::new();
        let bn = |p: &mut ParamSet, layer: usize, width: usize| -> Result<()> {
            p.push(format!("bn{layer}.weight"), Tensor::ones(width, DType::F32, device)?)?;
            p.push(format!("bn{layer}.bias"), Tensor::zeros(width, DType::F32, device)?)
        };
        let mut cin = c.in_channels;
        for (i, block) in c.blocks.iter().enumerate() {
            let w = init::torch_default(rng, &[block.width, cin, 3, 3], 9 * cin, device)?;
            p.push(format!("conv{i}.weight"), w)?;
            bn(&mut p, i, block.width)?;
            cin = block.width;
        }
        p.push("fc.weight", init::torch_default(rng, &[c.embedding, features], features, device)?)?;
        if c.fc_bias {
            p.push("fc.bias", init::torch_default(rng, &[c.embedding], features, device)?)?;
        }
        bn(&mut p, c.blocks.len(), c.embedding)?;
        Ok(p)
    }

    fn running_stats(&self) -> RunningStats {
        let c = &self.config;
        let widths = c.blocks.iter().map(|b| b.width).chain([c.embedding]);
        RunningStats::new(widths.enumerate().map(|(i, w)| (format!("bn{i}"), w)))
    }

    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize> {
        match (self.config.features(height, width), self.features) {
            (Some(f), Some(built)) if f == built => Ok(self.config.embedding),
            (Some(_), _) => candle_core::bail!(
                "this GNN embedding network takes {0}×{0} images, not {height}×{width}; resize them with --image-size {0}",
                self.config.image_size
            ),
            (None, _) => candle_core::bail!(
                "{height}×{width} images are too small for the GNN embedding network"
            ),
        }
    }

    fn forward(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        self.forward_with(params, x, bn, None)
    }

    fn forward_train(
        &self,
        params: &Params,
        x: &Tensor,
        running: Option<&mut RunningStats>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        self.forward_with(params, x, BnMode::Batch(running), Some(rng))
    }
}
