//! kshot: few-shot learning in Rust.
//!
//! Data flows one way: [`data`] (datasets, episodes) → [`nn`] (functional backbones over explicit
//! parameters, built on [`kernels`]) → [`methods`] (one file per learner) → [`train`] / [`eval`]
//! / [`predict`]. [`models`] holds the built-in trained models.

pub mod autograd;
pub mod bench;
pub mod calibration;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod data;
pub mod eval;
pub mod generate;
pub mod image_metrics;
pub mod judges;
pub mod kernels;
pub mod methods;
pub mod models;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod predict;
pub mod presets;
pub mod protocol;
pub mod train;

pub use candle_core::{DType, Device, Tensor, Var};

/// The crate version, recorded in every run config.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Sizes the thread pool of kshot's kernels (call before any work; the default is one per core).
pub fn set_threads(threads: usize) -> anyhow::Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot size the thread pool to {threads}: {e}"))
}
