//! Functional layers and backbones over explicit, named parameters.

pub mod conv4;
pub mod init;
pub mod lstm;
pub mod ops;
pub mod params;

pub use conv4::{BnMode, Conv4, Conv4Config, Conv4Tape, LossAndGrad, RunningStats};
pub use lstm::LstmCell;
pub use params::{ParamSet, Params};
