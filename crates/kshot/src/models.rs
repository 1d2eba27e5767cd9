//! Built-in models, embedded in the binary so that `kshot predict` works seconds after install:
//! each is a kshot run (its `config.json` and trained `model.safetensors`) plus a model card
//! (`card.json`: the command that trained it, its data and preprocessing, its scores under the
//! papers' protocols, its calibration). The files live in `crates/kshot/models/<name>/`.
//!
//! [`resolve`] turns what a user passes to `--model` into a learner: a built-in name or a run
//! directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::calibration::Calibration;
use crate::config::RunConfig;
use crate::methods::Learner;
use crate::train::{self, ModelChoice};

/// The model `kshot predict` uses when `--model` is not given.
pub const DEFAULT: &str = "omniglot";

/// One embedded model.
pub struct BuiltinModel {
    pub name: &'static str,
    config: &'static str,
    weights: &'static [u8],
    card: &'static str,
}

/// What `kshot models` shows for a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub summary: String,
    /// The command that trained it, from a checkout with the data in ../shared/data.
    pub trained_with: String,
    /// Training wall time and where.
    pub training_time: String,
    pub training_data: String,
    pub preprocessing: String,
    pub scores: Vec<Score>,
    pub calibration: Calibration,
}

/// One score under a paper's protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Score {
    /// e.g. `5-way 1-shot`.
    pub setting: String,
    pub accuracy: f64,
    pub ci95: f64,
    pub episodes: usize,
    /// The paper's number for this setting (percent), if it has one.
    pub paper: Option<f64>,
    pub command: String,
}

macro_rules! builtin {
    ($name:literal) => {
        BuiltinModel {
            name: $name,
            config: include_str!(concat!("../models/", $name, "/config.json")),
            weights: include_bytes!(concat!("../models/", $name, "/model.safetensors")),
            card: include_str!(concat!("../models/", $name, "/card.json")),
        }
    };
}

/// Every built-in model, the default first.
pub fn all() -> Vec<BuiltinModel> {
    vec![builtin!("omniglot"), builtin!("mini-imagenet")]
}

/// The built-in model called `name`.
pub fn find(name: &str) -> Option<BuiltinModel> {
    all().into_iter().find(|m| m.name == name)
}

impl BuiltinModel {
    /// Where errors say the model came from.
    pub fn origin(&self) -> PathBuf {
        PathBuf::from(format!("built-in model `{}`", self.name))
    }

    pub fn config(&self) -> Result<RunConfig> {
        serde_json::from_str(self.config)
            .with_context(|| format!("the built-in model `{}` has an unreadable config", self.name))
    }

    pub fn card(&self) -> Result<ModelCard> {
        serde_json::from_str(self.card)
            .with_context(|| format!("the built-in model `{}` has an unreadable card", self.name))
    }

    /// Size of the embedded weights in bytes.
    pub fn weight_bytes(&self) -> usize {
        self.weights.len()
    }

    /// The trained learner.
    pub fn load(&self) -> Result<(RunConfig, Box<dyn Learner>)> {
        let config = self.config()?;
        self.load_with(config)
    }

    /// The trained weights in a learner built from `config` (the model's own, with
    /// evaluation-time options changed).
    pub fn load_with(&self, config: RunConfig) -> Result<(RunConfig, Box<dyn Learner>)> {
        let mut learner = train::new_learner(&config)?;
        let origin = self.origin();
        let tensors = crate::checkpoint::tensors_from_bytes(self.weights, &origin)?;
        learner.state_mut().load(&tensors, "", &tensors, "", &origin)?;
        Ok((config, learner))
    }
}

/// A model a command was pointed at: a built-in one or a run directory.
pub enum ModelSource {
    Builtin(BuiltinModel),
    Run { dir: PathBuf, choice: ModelChoice },
}

impl ModelSource {
    /// `--model NAME|RUN_DIR`: a built-in name, else an existing run directory.
    pub fn parse(spec: &str, choice: ModelChoice) -> Result<Self> {
        if let Some(m) = find(spec) {
            return Ok(ModelSource::Builtin(m));
        }
        let dir = Path::new(spec);
        if dir.join(train::CONFIG_FILE).is_file() {
            return Ok(ModelSource::Run { dir: dir.to_path_buf(), choice });
        }
        let names: Vec<&str> = all().iter().map(|m| m.name).collect();
        if dir.exists() {
            bail!(
                "{spec} has no {}; --model takes a built-in model ({}) or a kshot run directory",
                train::CONFIG_FILE,
                names.join(", ")
            );
        }
        bail!(
            "--model {spec}: no built-in model of that name ({}) and no such run directory",
            names.join(", ")
        )
    }

    /// What it is, for messages and JSON: the built-in name or the run directory.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Builtin(m) => m.name.to_string(),
            ModelSource::Run { dir, .. } => dir.display().to_string(),
        }
    }

    pub fn config(&self) -> Result<RunConfig> {
        match self {
            ModelSource::Builtin(m) => m.config(),
            ModelSource::Run { dir, .. } => RunConfig::load(&dir.join(train::CONFIG_FILE)),
        }
    }

    /// The trained learner built from `config` (from [`ModelSource::config`], possibly changed).
    pub fn load_with(&self, config: RunConfig) -> Result<(RunConfig, Box<dyn Learner>)> {
        match self {
            ModelSource::Builtin(m) => m.load_with(config),
            ModelSource::Run { dir, choice } => train::load_model(dir, config, *choice),
        }
    }

    /// Its fitted temperature, if any (a built-in card's, or the run's `calibration.json`).
    pub fn calibration(&self) -> Result<Option<Calibration>> {
        match self {
            ModelSource::Builtin(m) => Ok(Some(m.card()?.calibration)),
            ModelSource::Run { dir, .. } => Calibration::of_run(dir),
        }
    }
}
