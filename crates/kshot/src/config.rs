//! The run config: everything needed to reproduce a training run, saved as `RUN_DIR/config.json`.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::data::{EpisodeSpec, Grouping};
use crate::methods::{
    BaselineConfig, MamlConfig, MatchingConfig, MetaLstmConfig, ProtoNetConfig, ReptileConfig,
    SiameseConfig,
};
use crate::nn::Conv4Config;
use crate::optim::{AdamConfig, StepDecay};

/// Which data a run trains and validates on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    pub dataset: String,
    pub split: String,
    /// The class subset of the split that training episodes come from (e.g. `train`, `trainval`).
    pub train_subset: String,
    /// The subset that `kshot eval` scores by default (e.g. `test`).
    pub test_subset: String,
    pub image_size: usize,
    pub grouping: Grouping,
    /// The data root as given when the run started (informational; `--data-dir` overrides it).
    pub data_dir: Option<String>,
}

/// Periodic validation during training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub spec: EpisodeSpec,
    pub episodes: usize,
    pub every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub kshot_version: String,
    /// The command line that started the run.
    pub command: Vec<String>,
    pub preset: Option<String>,
    pub method: String,
    pub data: DataConfig,
    /// Training episodes.
    pub train: EpisodeSpec,
    /// Total training steps (optimiser updates). Each step draws `meta_batch` episodes.
    pub episodes: u64,
    /// Episodes (tasks) per optimiser update; the step's loss is their mean.
    #[serde(default = "one")]
    pub meta_batch: usize,
    pub seed: u64,
    pub adam: AdamConfig,
    pub schedule: StepDecay,
    pub backbone: Conv4Config,
    pub protonet: ProtoNetConfig,
    #[serde(default)]
    pub maml: MamlConfig,
    #[serde(default)]
    pub matching: MatchingConfig,
    #[serde(default)]
    pub siamese: SiameseConfig,
    #[serde(default)]
    pub baseline: BaselineConfig,
    #[serde(default)]
    pub reptile: ReptileConfig,
    #[serde(default)]
    pub meta_lstm: MetaLstmConfig,
    pub checkpoint_every: u64,
    pub validation: Option<Validation>,
    /// Test episodes of the protocol (what `kshot eval` uses unless told otherwise).
    pub test: EpisodeSpec,
    pub test_episodes: usize,
}

impl RunConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read {}; is this a kshot run directory?", path.display())
        })?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid kshot run config ({e}); was it edited by hand?",
                path.display()
            )
        })
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }
}

fn one() -> usize {
    1
}
