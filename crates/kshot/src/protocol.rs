//! What a paper protocol fixes apart from the method: data, episodes, schedule, backbone,
//! validation and the test protocol. Presets ([`crate::presets`]) build one per paper; the run
//! config ([`crate::config::RunConfig`]) is a protocol plus the method's settings and provenance.

use serde::{Deserialize, Serialize};

use crate::data::{EpisodeSpec, Grouping};
use crate::nn::{BackboneConfig, Conv4Config};
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
    /// Omniglot: how the 105×105 originals are resized (`--resize`); older configs read as the
    /// exact area average.
    #[serde(default)]
    pub resize: crate::data::omniglot::Resize,
    /// Omniglot: ink = 1 on a 0 background (`--invert true`, older configs) or the PNG's own
    /// white background (`--invert false`).
    #[serde(default = "yes")]
    pub invert: bool,
}

fn yes() -> bool {
    true
}

impl DataConfig {
    /// The Omniglot pixel pipeline of these settings.
    pub fn pixels(&self) -> crate::data::omniglot::Pixels {
        crate::data::omniglot::Pixels { resize: self.resize, invert: self.invert }
    }
}

impl DataConfig {
    /// Omniglot, Vinyals split, 28×28.
    pub fn omniglot() -> Self {
        Self {
            dataset: "omniglot".into(),
            split: "vinyals".into(),
            train_subset: "train".into(),
            test_subset: "test".into(),
            image_size: 28,
            grouping: Grouping::Any,
            data_dir: None,
            resize: Default::default(),
            invert: true,
        }
    }

    /// miniImageNet, Ravi & Larochelle's split: 84×84 RGB, 64 train / 16 val / 20 test classes.
    pub fn mini_imagenet() -> Self {
        Self {
            dataset: "mini-imagenet".into(),
            split: "ravi".into(),
            train_subset: "train".into(),
            test_subset: "test".into(),
            image_size: 84,
            grouping: Grouping::Any,
            data_dir: None,
            resize: Default::default(),
            invert: true,
        }
    }
}

/// Periodic validation during training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub spec: EpisodeSpec,
    pub episodes: usize,
    pub every: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protocol {
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
    pub backbone: BackboneConfig,
    pub checkpoint_every: u64,
    pub validation: Option<Validation>,
    /// Test episodes of the protocol (what `kshot eval` uses unless told otherwise).
    pub test: EpisodeSpec,
    pub test_episodes: usize,
}

fn one() -> usize {
    1
}

impl Protocol {
    /// Snell et al.'s Omniglot protocol: Vinyals split, 60-way `shots`-shot 5-query training
    /// episodes, Adam 1e-3 halved every 2000 episodes for 20 000 episodes, Conv4 (64 filters),
    /// validation every 1000 episodes, 1000 test episodes of 5-way `shots`-shot 15-query.
    pub fn omniglot(shots: usize) -> Self {
        Self {
            data: DataConfig::omniglot(),
            train: EpisodeSpec::new(60, shots, 5),
            episodes: 20_000,
            meta_batch: 1,
            seed: 0,
            adam: AdamConfig::default(),
            schedule: StepDecay { lr: 1e-3, step: 2000, gamma: 0.5 },
            backbone: BackboneConfig::Conv4(Conv4Config::new(1)),
            checkpoint_every: 500,
            validation: Some(Validation {
                spec: EpisodeSpec::new(5, shots, 15),
                episodes: 200,
                every: 1000,
            }),
            test: EpisodeSpec::new(5, shots, 15),
            test_episodes: 1000,
        }
    }

    /// The intervals must be positive: a zero would divide by zero in the trainer.
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.checkpoint_every > 0,
            "checkpoint_every must be at least 1 (got 0); use --checkpoint-every N with N ≥ 1"
        );
        if let Some(v) = &self.validation {
            anyhow::ensure!(
                v.every > 0,
                "the validation interval must be at least 1 (got 0); use --val-every 0 to turn validation off"
            );
            anyhow::ensure!(v.episodes > 0, "validation needs at least 1 episode (--val-episodes)");
        }
        anyhow::ensure!(self.meta_batch > 0, "the meta-batch must hold at least 1 task");
        Ok(())
    }
}
