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
    /// Rotate each class of every episode by a random multiple of 90° (cbfinn/maml's Omniglot
    /// tasks, training and test); the split's classes are then unrotated characters.
    #[serde(default)]
    pub task_rotations: bool,
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
    /// Folder datasets: how gray levels are read (`--polarity`).
    #[serde(default)]
    pub polarity: crate::data::images::Polarity,
    /// Folder datasets: how image shapes become the square input (`--fit`).
    #[serde(default)]
    pub fit: crate::data::images::Fit,
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
            task_rotations: false,
            data_dir: None,
            resize: Default::default(),
            invert: true,
            polarity: Default::default(),
            fit: Default::default(),
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
            task_rotations: false,
            data_dir: None,
            resize: Default::default(),
            invert: true,
            polarity: Default::default(),
            fit: Default::default(),
        }
    }
}

/// Periodic validation during training, and optionally model selection on it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub spec: EpisodeSpec,
    pub episodes: usize,
    pub every: u64,
    /// The classes validation draws from (default: the split's validation subset).
    #[serde(default)]
    pub set: ValSet,
    /// How validation episodes group their classes (default: as training episodes do).
    #[serde(default)]
    pub grouping: Option<Grouping>,
    /// Keep-best and early stopping on a validation metric (default: none; the last model is the
    /// run's model and training runs all its episodes).
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

impl Validation {
    /// `episodes` episodes of `spec` every `every` training steps on the split's validation
    /// classes, logged only (no model selection).
    pub fn new(spec: EpisodeSpec, episodes: usize, every: u64) -> Self {
        Self { spec, episodes, every, set: ValSet::Split, grouping: None, early_stopping: None }
    }
}

/// Where validation classes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValSet {
    /// The validation subset of the run's split (Vinyals `val`, Ravi `val`).
    #[default]
    Split,
    /// Omniglot's 10 evaluation alphabets that Lake's 20-way benchmark (`all_runs.zip`) does not
    /// use ([`LAKE_UNBENCHMARKED_ALPHABETS`]), each character's first `drawers` drawers: disjoint
    /// from the background alphabets a Lake run trains on and from the benchmark's alphabets.
    LakeUnbenchmarked { drawers: usize },
}

/// The 10 of Omniglot's 20 evaluation alphabets that none of Lake's 20 benchmark runs draws from
/// (`omniglot/all_runs_sources.tsv` names the other 10).
pub const LAKE_UNBENCHMARKED_ALPHABETS: [&str; 10] = [
    "Angelic",
    "Atemayar_Qelisayer",
    "Aurek-Besh",
    "Avesta",
    "Keble",
    "Mongolian",
    "Oriya",
    "Sylheti",
    "Syriac_(Serto)",
    "ULOG",
];

/// The validation number that selects the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ValMetric {
    /// Mean query cross-entropy of the validation episodes (lower is better).
    Loss,
    /// Mean validation accuracy (higher is better).
    Accuracy,
}

/// Keep-best and early stopping, as prototypical-networks' `train.py`: after every validation
/// round, a strictly better `metric` saves the model as the run's best model and resets the count
/// of rounds without improvement; otherwise the count grows, and training stops as soon as it
/// exceeds `patience` (the official `wait > patience`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyStopping {
    pub metric: ValMetric,
    /// Validation rounds without improvement tolerated before training stops.
    pub patience: u64,
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
    /// Steps added to the step count before the schedule is read: with epochs of E steps, E makes
    /// the schedule PyTorch's StepLR stepped at the start of every epoch (the first decay comes
    /// one epoch early). Default 0: the decay falls exactly on multiples of `schedule.step`.
    #[serde(default)]
    pub lr_offset: u64,
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
            lr_offset: 0,
            backbone: BackboneConfig::Conv4(Conv4Config::new(1)),
            checkpoint_every: 500,
            validation: Some(Validation::new(EpisodeSpec::new(5, shots, 15), 200, 1000)),
            test: EpisodeSpec::new(5, shots, 15),
            test_episodes: 1000,
        }
    }

    /// The learning rate of the schedule at `step` (0-based), `lr_offset` included.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.schedule.at(step + self.lr_offset)
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
            if let ValSet::LakeUnbenchmarked { drawers } = v.set {
                anyhow::ensure!(
                    (1..=20).contains(&drawers),
                    "validation on the unbenchmarked Lake alphabets needs 1 to 20 drawers (got {drawers})"
                );
            }
        }
        anyhow::ensure!(self.meta_batch > 0, "the meta-batch must hold at least 1 task");
        Ok(())
    }
}
