//! Backbones are values: a method is given a [`Backbone`] (built from the run's [`BackboneConfig`])
//! and never names a concrete network. A backbone embeds images [B, C, H, W] into [B, D] over
//! explicit, named parameters; an explicit backward pass is an optional capability
//! ([`Backbone::explicit_backward`]) that MAML, ProtoNet and Meta-LSTM use when present.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    BnMode, Conv4, Conv4Config, GnnEmbedding, GnnEmbeddingConfig, KochConfig, KochNet, ParamSet,
    Params, ResNet12, ResNet12Config, RunningStats, StridedConv4, StridedConv4Config,
};

pub trait Backbone: std::fmt::Debug + Send + Sync {
    /// The name `--backbone` spells.
    fn kind(&self) -> &'static str;

    /// Fresh parameters, drawn from `rng` in a fixed order.
    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet>;

    /// Fresh running statistics for its batch-norm layers (empty without batch norm).
    fn running_stats(&self) -> RunningStats;

    /// The embedding length D for `height`×`width` inputs; an error when they are too small.
    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize>;

    /// Embeds `x` [B, C, H, W] into [B, D], differentiable with respect to `params`.
    fn forward(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor>;

    /// An explicit backward pass, when the backbone has one (faster than candle's, and its
    /// gradients can be differentiated again).
    fn explicit_backward(&self) -> Option<&dyn ExplicitBackward> {
        None
    }

    /// The training-mode forward pass (batch statistics, folded into `running` when given) with
    /// the backbone's dropout drawn from `rng`; the same as [`Backbone::forward`] without dropout.
    fn forward_train(
        &self,
        params: &Params,
        x: &Tensor,
        running: Option<&mut RunningStats>,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        self.forward(params, x, BnMode::Batch(running))
    }
}

/// A backbone that computes its own parameter gradients.
pub trait ExplicitBackward: Send + Sync {
    /// The training-mode forward pass (batch statistics, folded into `running` when given), kept
    /// for [`Tape::backward`].
    fn forward_taped(
        &self,
        params: &Params,
        x: &Tensor,
        running: Option<&mut RunningStats>,
    ) -> Result<Box<dyn Tape>>;
}

/// A forward pass kept for an explicit backward pass.
pub trait Tape {
    /// [B, D]
    fn embedding(&self) -> &Tensor;

    /// d/d(parameter) of a loss whose gradient with respect to the embedding is `d_embedding`,
    /// for every parameter of the backbone. The gradients are built from differentiable ops of
    /// `params`, so they can be differentiated again (Hessian-vector products).
    fn backward(&self, params: &Params, d_embedding: &Tensor) -> Result<Params>;
}

/// Which backbone a run uses, with its settings (`--backbone`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BackboneConfig {
    /// Four blocks of conv3×3 → batch norm → ReLU → 2×2 max-pool (Vinyals et al., Snell et al.).
    Conv4(Conv4Config),
    /// Koch et al.'s Siamese twin for 105×105 images.
    Koch(KochConfig),
    /// MAML's and Reptile's Omniglot net: four blocks of stride-2 'SAME' conv3×3 (+ bias) → batch
    /// norm → ReLU, no pooling; spatial mean or flattened.
    Conv4Strided(StridedConv4Config),
    /// ResNet-12 (MetaOptNet, Tian et al. 2020), without DropBlock; 640-d embeddings.
    Resnet12(ResNet12Config),
    /// Garcia & Bruna's Omniglot embedding network (64-d).
    GnnOmniglot(GnnEmbeddingConfig),
    /// Garcia & Bruna's miniImageNet embedding network (64-96-128-256, dropout, 128-d).
    GnnMiniimagenet(GnnEmbeddingConfig),
}

/// The names `--backbone` accepts.
pub const BACKBONES: &[&str] =
    &["conv4", "koch", "conv4-strided", "resnet12", "gnn-omniglot", "gnn-miniimagenet"];

impl BackboneConfig {
    pub fn build(&self) -> Box<dyn Backbone> {
        match self {
            Self::Conv4(c) => Box::new(Conv4::new(*c)),
            Self::Koch(c) => Box::new(KochNet::new(*c)),
            Self::Conv4Strided(c) => Box::new(StridedConv4::new(*c)),
            Self::Resnet12(c) => Box::new(ResNet12::new(*c)),
            Self::GnnOmniglot(c) | Self::GnnMiniimagenet(c) => {
                Box::new(GnnEmbedding::new(c.clone(), self.kind()))
            }
        }
    }

    /// The default settings of backbone `kind` for `in_channels` input channels.
    pub fn named(kind: &str, in_channels: usize) -> anyhow::Result<Self> {
        match kind {
            "conv4" => Ok(Self::Conv4(Conv4Config::new(in_channels))),
            "koch" => Ok(Self::Koch(KochConfig { in_channels })),
            "conv4-strided" => {
                Ok(Self::Conv4Strided(StridedConv4Config::maml_omniglot(in_channels)))
            }
            "resnet12" => Ok(Self::Resnet12(ResNet12Config::new(in_channels))),
            "gnn-omniglot" => Ok(Self::GnnOmniglot(GnnEmbeddingConfig::omniglot(in_channels))),
            "gnn-miniimagenet" => {
                Ok(Self::GnnMiniimagenet(GnnEmbeddingConfig::mini_imagenet(in_channels)))
            }
            other => {
                anyhow::bail!("unknown backbone `{other}`; choose one of: {}", BACKBONES.join(", "))
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Conv4(_) => "conv4",
            Self::Koch(_) => "koch",
            Self::Conv4Strided(_) => "conv4-strided",
            Self::Resnet12(_) => "resnet12",
            Self::GnnOmniglot(_) => "gnn-omniglot",
            Self::GnnMiniimagenet(_) => "gnn-miniimagenet",
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Self::Conv4(c) => c.in_channels,
            Self::Koch(c) => c.in_channels,
            Self::Conv4Strided(c) => c.in_channels,
            Self::Resnet12(c) => c.in_channels,
            Self::GnnOmniglot(c) | Self::GnnMiniimagenet(c) => c.in_channels,
        }
    }

    pub fn set_in_channels(&mut self, channels: usize) {
        match self {
            Self::Conv4(c) => c.in_channels = channels,
            Self::Koch(c) => c.in_channels = channels,
            Self::Conv4Strided(c) => c.in_channels = channels,
            Self::Resnet12(c) => c.in_channels = channels,
            Self::GnnOmniglot(c) | Self::GnnMiniimagenet(c) => c.in_channels = channels,
        }
    }

    /// Records the side of the square inputs, for backbones whose size depends on it (the GNN
    /// embeddings' linear layer).
    pub fn set_image_size(&mut self, size: usize) {
        if let Self::GnnOmniglot(c) | Self::GnnMiniimagenet(c) = self {
            c.image_size = size;
        }
    }

    /// Switches between kshot's fused kernels and candle's composite ops (`--composite-kernels`);
    /// false for a backbone that has no fused kernels.
    pub fn set_fast_kernels(&mut self, fast: bool) -> bool {
        match self {
            Self::Conv4(c) => c.fast_kernels = fast,
            Self::Conv4Strided(c) => c.fast_kernels = fast,
            Self::Resnet12(c) => c.fast_kernels = fast,
            Self::Koch(_) | Self::GnnOmniglot(_) | Self::GnnMiniimagenet(_) => return false,
        }
        true
    }

    /// The Conv4 settings, for code that tunes Conv4 alone (widths, depth).
    pub fn conv4_mut(&mut self) -> Option<&mut Conv4Config> {
        match self {
            Self::Conv4(c) => Some(c),
            _ => None,
        }
    }
}

impl Backbone for Conv4 {
    fn kind(&self) -> &'static str {
        "conv4"
    }

    fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        Conv4::init(self, rng, device)
    }

    fn running_stats(&self) -> RunningStats {
        Conv4::running_stats(self)
    }

    fn embedding_dim(&self, height: usize, width: usize) -> Result<usize> {
        let dim = self.config.embedding_dim(height, width);
        if dim == 0 {
            candle_core::bail!(
                "{height}×{width} images are too small for a {}-block Conv4 (each block halves them); use larger images or fewer blocks",
                self.config.blocks
            )
        }
        Ok(dim)
    }

    fn forward(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        Conv4::forward(self, params, x, bn)
    }

    fn explicit_backward(&self) -> Option<&dyn ExplicitBackward> {
        if self.config.fast_kernels {
            Some(self)
        } else {
            None
        }
    }
}

impl ExplicitBackward for Conv4 {
    fn forward_taped(
        &self,
        params: &Params,
        x: &Tensor,
        running: Option<&mut RunningStats>,
    ) -> Result<Box<dyn Tape>> {
        Ok(Box::new(Conv4::forward_taped(self, params, x, running)?))
    }
}
