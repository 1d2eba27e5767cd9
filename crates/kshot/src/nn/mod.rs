//! Functional layers and backbones over explicit, named parameters.

pub mod backbone;
pub mod conv4;
pub mod gan_nets;
pub mod gnn_embedding;
pub mod head;
pub mod init;
pub mod koch;
pub mod lstm;
pub mod metanet_nets;
pub mod ops;
pub mod params;
pub mod resnet12;
pub mod running;
pub mod strided_conv4;

pub use backbone::{Backbone, BackboneConfig, ExplicitBackward, Tape, BACKBONES};
pub use conv4::{Conv4, Conv4Config, Conv4Tape, ConvInit};
pub use gnn_embedding::{GnnConvBlock, GnnEmbedding, GnnEmbeddingConfig};
pub use head::{Graph, LossAndGrad};
pub use koch::{KochConfig, KochNet};
pub use lstm::LstmCell;
pub use params::{ParamSet, Params};
pub use resnet12::{ResNet12, ResNet12Config};
pub use running::{BnLayerStats, BnMode, RunningStats};
pub use strided_conv4::{StridedConv4, StridedConv4Config, StridedFeatures};
