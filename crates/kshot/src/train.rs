//! The trainer: schedules training steps ([`Learner::train_step`] against a [`StepCtx`]),
//! validates, checkpoints atomically and resumes exactly. What a step is (an episode's query loss,
//! a batch of pairs, Reptile's own update) is the learner's business; the trainer keeps the
//! optimisers the learner registered and saves the learner's whole [`crate::methods::State`].
//!
//! A run directory holds `config.json` (how to reproduce it), `checkpoint.safetensors` (parameters,
//! buffers, optimiser state and progress, written in one atomic rename), `model.safetensors`
//! (parameters and buffers only, the last model) and `metrics.csv` (one line per episode).
//!
//! With early stopping ([`crate::protocol::EarlyStopping`]), every validation round that improves
//! the selection metric also writes `best_model.safetensors` (atomically) and `best.json` (its
//! episode and value); the count of rounds without improvement and the best value are part of the
//! checkpoint, so a resumed run selects and stops exactly as an uninterrupted one. Training stops
//! once more than `patience` rounds in a row have not improved; the `event` column of
//! `metrics.csv` says `best` on the rounds that saved a best model and `early-stop` on the last.
//! [`load_learner`] loads the best model when there is one ([`ModelChoice`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{load_tensors, save_tensors, write_atomic};
use crate::config::RunConfig;
use crate::data::{EpisodeSampler, ImageSet};
use crate::eval::mean_ci95;
use crate::methods::{Learner, Optimisers, StepCtx};
use crate::nn::ops;
use crate::protocol::{EarlyStopping, ValMetric, ValSet, Validation, LAKE_UNBENCHMARKED_ALPHABETS};

pub const CONFIG_FILE: &str = "config.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const METRICS_FILE: &str = "metrics.csv";
/// The model of the best validation round, when the run selects one (early stopping).
pub const BEST_MODEL_FILE: &str = "best_model.safetensors";
/// The episode, metric and value of [`BEST_MODEL_FILE`], as JSON.
pub const BEST_FILE: &str = "best.json";
const METRICS_HEADER: &str =
    "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95,val_loss,event";
/// The header of kshot 0.1's metrics files; resume appends the two new, empty columns.
const METRICS_HEADER_V0: &str = "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95";

/// The RNG stream that initialises parameters (episode streams count up from 0).
const INIT_STREAM: u64 = u64::MAX;

/// Where training stands, reported after every episode.
#[derive(Debug, Clone)]
pub struct Status {
    pub episode: u64,
    pub total: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub lr: f64,
    /// Training seconds so far, over all sessions of the run.
    pub seconds: f64,
    pub val_accuracy: Option<(f64, f64)>,
    /// Mean query cross-entropy of the validation round, when one ran at this episode.
    pub val_loss: Option<f64>,
    /// This validation round improved the selection metric and saved the best model.
    pub new_best: bool,
    /// Early stopping ends training at this episode.
    pub early_stop: bool,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub episodes_done: u64,
    pub seconds: f64,
    pub interrupted: bool,
    /// Training ended by early stopping (now or in an earlier session of the run).
    pub stopped_early: bool,
    /// The best validation round so far, when the run selects a model.
    pub best: Option<Best>,
}

/// The best validation round of a run that selects its model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Best {
    /// Training steps done when it was validated.
    pub episode: u64,
    /// Its selection metric.
    pub value: f64,
}

/// One validation round: mean query cross-entropy and accuracy (± 95% CI) over its episodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValReport {
    pub loss: f64,
    pub accuracy: f64,
    pub ci95: f64,
}

impl ValReport {
    pub fn metric(&self, metric: ValMetric) -> f64 {
        match metric {
            ValMetric::Loss => self.loss,
            ValMetric::Accuracy => self.accuracy,
        }
    }
}

/// Whether `value` is strictly better than `best` under `metric` (a NaN never is).
pub fn improves(metric: ValMetric, value: f64, best: Option<f64>) -> bool {
    match (best, metric) {
        _ if value.is_nan() => false,
        (None, _) => true,
        (Some(b), ValMetric::Loss) => value < b,
        (Some(b), ValMetric::Accuracy) => value > b,
    }
}

/// Scores `learner` on validation episodes 0..`episodes` of `sampler` under `seed` (the same
/// episodes every round): each episode's query cross-entropy and accuracy, in inference mode.
pub fn validate(
    learner: &dyn Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
) -> anyhow::Result<ValReport> {
    let device = Device::Cpu;
    let (mut losses, mut accs) = (Vec::with_capacity(episodes), Vec::with_capacity(episodes));
    for i in 0..episodes {
        let ep = sampler.episode(seed, i as u64, &device)?;
        let classifier = learner.adapt(&ep.support, &ep.support_labels, ep.spec.ways)?;
        let logits = classifier.logits(&ep.query)?;
        let labels = ep.query_labels_tensor()?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        losses.push(loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
        accs.push(ops::accuracy(&logits, &labels)?);
    }
    let (accuracy, ci95) = mean_ci95(&accs);
    Ok(ValReport { loss: losses.iter().sum::<f64>() / episodes.max(1) as f64, accuracy, ci95 })
}

/// Where early stopping stands; saved in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Selection {
    best: Option<Best>,
    /// Validation rounds in a row without improvement.
    wait: u64,
    stopped: bool,
}

/// Which trained model of a run to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelChoice {
    /// The best validation round's model when the run selected one, else the last.
    #[default]
    Selected,
    /// The model after the last training step.
    Last,
    /// The best validation round's model; an error when the run has none.
    Best,
}

/// The model file `choice` names in `run_dir`.
pub fn model_path(run_dir: &Path, choice: ModelChoice) -> anyhow::Result<std::path::PathBuf> {
    let best = run_dir.join(BEST_MODEL_FILE);
    match choice {
        ModelChoice::Last => Ok(run_dir.join(MODEL_FILE)),
        ModelChoice::Selected if best.exists() => Ok(best),
        ModelChoice::Selected => Ok(run_dir.join(MODEL_FILE)),
        ModelChoice::Best if best.exists() => Ok(best),
        ModelChoice::Best => bail!(
            "{} not found: the run selected no best model (it trained without early stopping); score the last model with --model last",
            best.display()
        ),
    }
}

/// A fresh learner for `config`, deterministic in its seed.
pub fn new_learner(config: &RunConfig) -> anyhow::Result<Box<dyn Learner>> {
    crate::autograd::init();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(INIT_STREAM);
    let learner = config.method.build(&config.protocol, &mut rng, &Device::Cpu)?;
    let p = &config.protocol;
    anyhow::ensure!(
        learner.uses_unlabelled() || (p.train.unlabelled == 0 && p.test.unlabelled == 0),
        "{} does not read unlabelled support images; drop --unlabelled (the gnn method does)",
        config.method.name()
    );
    Ok(learner)
}

/// Loads the trained learner of a run directory: its best model when it selected one, else the
/// last ([`ModelChoice::Selected`]).
pub fn load_learner(run_dir: &Path) -> anyhow::Result<(RunConfig, Box<dyn Learner>)> {
    load_learner_with(run_dir, RunConfig::load(&run_dir.join(CONFIG_FILE))?)
}

/// Loads the trained weights of a run directory ([`ModelChoice::Selected`]) into a learner built
/// from `config` (the run's own config with evaluation-time options changed, e.g. Reptile's
/// transductive scoring).
pub fn load_learner_with(
    run_dir: &Path,
    config: RunConfig,
) -> anyhow::Result<(RunConfig, Box<dyn Learner>)> {
    load_model(run_dir, config, ModelChoice::Selected)
}

/// Loads the model `choice` names in `run_dir` into a learner built from `config`.
pub fn load_model(
    run_dir: &Path,
    config: RunConfig,
    choice: ModelChoice,
) -> anyhow::Result<(RunConfig, Box<dyn Learner>)> {
    let mut learner = new_learner(&config)?;
    let path = model_path(run_dir, choice)?;
    let tensors = load_tensors(&path)?;
    learner.state_mut().load(&tensors, "", &tensors, "", &path)?;
    Ok((config, learner))
}

/// Trains a new run in `run_dir`, or resumes the one there when `resume` is set.
/// `train_set` and `val_set` must be the sets the config names. When `stop` is raised, the
/// trainer checkpoints after the current episode and returns.
pub fn train(
    run_dir: &Path,
    config: &RunConfig,
    train_set: &ImageSet,
    val_set: Option<&ImageSet>,
    resume: bool,
    stop: &AtomicBool,
    mut on_status: impl FnMut(&Status),
) -> anyhow::Result<Summary> {
    crate::autograd::init();
    let config = &fit_to_training_set(config, train_set)?;
    config.check()?;
    let mut learner = new_learner(config)?;
    let mut optimisers = Optimisers::new(learner.state(), &learner.optimisers(), config.adam)?;
    let checkpoint_path = run_dir.join(CHECKPOINT_FILE);
    let (mut done, mut seconds) = (0u64, 0f64);
    let early = config.validation.and_then(|v| v.early_stopping);
    let mut selection = Selection::default();
    if resume {
        check_resumable(run_dir)?;
        let tensors = load_tensors(&checkpoint_path)?;
        let buffers = strip_prefix(&tensors, "buffer.");
        learner.state_mut().load(&tensors, "param.", &buffers, "", &checkpoint_path)?;
        optimisers.load_state(&tensors, &checkpoint_path)?;
        (done, seconds) = read_progress(&tensors, &checkpoint_path)?;
        if early.is_some() {
            selection = read_selection(&tensors, &checkpoint_path)?;
        }
        truncate_metrics(&run_dir.join(METRICS_FILE), done)?;
    } else {
        if check_new_run_dir(run_dir)? == NewRunDir::FailedStart {
            remove_failed_start(run_dir)?;
        }
        config.save(&run_dir.join(CONFIG_FILE))?;
        write_atomic(&run_dir.join(METRICS_FILE), format!("{METRICS_HEADER}\n").as_bytes())?;
    }

    let sampler = EpisodeSampler::new(train_set, config.train, config.data.grouping)?
        .with_task_rotations(config.data.task_rotations)?;
    let val_sampler = match (config.validation, val_set) {
        (Some(v), Some(set)) => {
            let grouping = v.grouping.unwrap_or(config.data.grouping);
            Some((
                v,
                EpisodeSampler::new(set, v.spec, grouping)?
                    .with_task_rotations(config.data.task_rotations)?,
            ))
        }
        _ => None,
    };
    if early.is_some() && val_sampler.is_none() {
        bail!(
            "early stopping needs validation, but this run has no validation set; give it one (--val-every N) or drop --patience"
        );
    }
    let mut pending = String::new();
    let mut interrupted = false;
    while done < config.episodes && !selection.stopped {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let started = Instant::now();
        let lr = config.lr_at(done);
        let mut ctx = StepCtx::new(
            (done, config.episodes, config.seed),
            lr,
            config.meta_batch,
            &sampler,
            &mut optimisers,
        );
        let out = learner.train_step(&mut ctx)?;
        let (loss, accuracy, lr) = (out.loss, out.accuracy, out.lr);
        done += 1;
        seconds += started.elapsed().as_secs_f64();

        let mut val = None;
        let (mut new_best, mut early_stop) = (false, false);
        if let Some((v, vs)) = &val_sampler {
            if done % v.every == 0 || done == config.episodes {
                let report = validate(learner.as_ref(), vs, v.episodes, config.seed)?;
                val = Some(report);
                if let Some(es) = early {
                    let value = report.metric(es.metric);
                    if improves(es.metric, value, selection.best.map(|b| b.value)) {
                        let best = Best { episode: done, value };
                        save_best(run_dir, learner.as_ref(), best, &es)?;
                        selection.best = Some(best);
                        selection.wait = 0;
                        new_best = true;
                    } else {
                        selection.wait += 1;
                        if selection.wait > es.patience {
                            selection.stopped = true;
                            early_stop = true;
                        }
                    }
                }
            }
        }
        let (va, vc, vl) = val.map_or(Default::default(), |r| {
            (format!("{:.5}", r.accuracy), format!("{:.5}", r.ci95), format!("{:.6}", r.loss))
        });
        let event = if early_stop {
            "early-stop"
        } else if new_best {
            "best"
        } else {
            ""
        };
        pending.push_str(&format!(
            "{done},{loss:.6},{accuracy:.5},{lr:e},{seconds:.3},{va},{vc},{vl},{event}\n"
        ));
        on_status(&Status {
            episode: done,
            total: config.episodes,
            loss,
            accuracy,
            lr,
            seconds,
            val_accuracy: val.map(|r| (r.accuracy, r.ci95)),
            val_loss: val.map(|r| r.loss),
            new_best,
            early_stop,
        });

        let sel = early.map(|_| selection);
        if done % config.checkpoint_every == 0 || done == config.episodes || early_stop {
            let progress = Progress { done, seconds, selection: sel };
            save_checkpoint(run_dir, learner.as_ref(), &optimisers, progress, &mut pending)?;
        }
    }
    if interrupted {
        let progress = Progress { done, seconds, selection: early.map(|_| selection) };
        save_checkpoint(run_dir, learner.as_ref(), &optimisers, progress, &mut pending)?;
    }
    Ok(Summary {
        episodes_done: done,
        seconds,
        interrupted,
        stopped_early: selection.stopped,
        best: selection.best,
    })
}

/// What a directory given for a new run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewRunDir {
    /// Absent or empty.
    Fresh,
    /// A run whose start stopped before its first checkpoint: only what [`train`] writes before
    /// it (the config, a metrics file with only its header, best-model files, temporary files).
    /// Starting again replaces them.
    FailedStart,
}

/// Whether a new run may be written into `run_dir`: it must be absent, empty, or hold only what a
/// failed start left behind ([`NewRunDir::FailedStart`]); a run with a checkpoint (resume it) or
/// any other file is refused, so a run never overwrites files that are not its own.
pub fn check_new_run_dir(run_dir: &Path) -> anyhow::Result<NewRunDir> {
    let d = run_dir.display();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NewRunDir::Fresh),
        Err(_) if run_dir.exists() && !run_dir.is_dir() => {
            bail!("{d} is a file, not a directory; choose an empty or new --out directory")
        }
        Err(e) => bail!("cannot list {d} ({e}); check it is readable or choose another --out"),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {d}; choose another --out"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let has = |name: &str| names.iter().any(|n| n == name);
    if names.is_empty() {
        return Ok(NewRunDir::Fresh);
    }
    if has(CONFIG_FILE) && has(CHECKPOINT_FILE) {
        bail!("{d} already holds a run; continue it with `kshot train --resume {d}` or choose another --out");
    }
    let foreign = names.iter().find(|n| !left_by_failed_start(run_dir, n));
    match foreign {
        None if has(CONFIG_FILE) => Ok(NewRunDir::FailedStart),
        None => bail!(
            "{d} is not empty and is not a kshot run (found {}); choose an empty or new --out directory",
            names[0]
        ),
        Some(name) => bail!(
            "{d} is not empty and is not a kshot run (found {name}); choose an empty or new --out directory"
        ),
    }
}

/// Whether the file `name` in `run_dir` is one [`train`] writes before a run's first checkpoint.
fn left_by_failed_start(run_dir: &Path, name: &str) -> bool {
    match name {
        CONFIG_FILE | BEST_MODEL_FILE | BEST_FILE => true,
        METRICS_FILE => std::fs::read_to_string(run_dir.join(name)).is_ok_and(|text| {
            let mut lines = text.lines().filter(|l| !l.trim().is_empty());
            matches!(lines.next(), Some(METRICS_HEADER | METRICS_HEADER_V0))
                && lines.next().is_none()
        }),
        _ => crate::checkpoint::temp_target(name).is_some_and(|target| {
            [CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE, MODEL_FILE, BEST_MODEL_FILE, BEST_FILE]
                .contains(&target)
        }),
    }
}

/// Removes what a failed start left in `run_dir`, so none of it outlives the new start.
fn remove_failed_start(run_dir: &Path) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(run_dir).with_context(|| format!("cannot list {}", run_dir.display()))?
    {
        let path = entry.with_context(|| format!("cannot list {}", run_dir.display()))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if left_by_failed_start(run_dir, &name) {
            std::fs::remove_file(&path).with_context(|| {
                format!(
                    "cannot remove {} to start the run again; check it is writable",
                    path.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Refuses to resume a run directory whose run never reached its first checkpoint.
pub fn check_resumable(run_dir: &Path) -> anyhow::Result<()> {
    if run_dir.join(CONFIG_FILE).is_file() && !run_dir.join(CHECKPOINT_FILE).exists() {
        bail!(
            "{}'s run stopped before its first checkpoint; start it again with the same kshot train command (without --resume)",
            run_dir.display()
        );
    }
    Ok(())
}

/// Writes the best model and `best.json`, each atomically (the model first).
fn save_best(
    run_dir: &Path,
    learner: &dyn Learner,
    best: Best,
    es: &EarlyStopping,
) -> anyhow::Result<()> {
    let state = learner.state();
    let mut model = state.params.named_tensors("");
    model.extend(state.buffers()?);
    save_tensors(&run_dir.join(BEST_MODEL_FILE), &model)?;
    let json = serde_json::json!({
        "episode": best.episode,
        "metric": es.metric,
        "value": best.value,
        "model": BEST_MODEL_FILE,
    });
    write_atomic(&run_dir.join(BEST_FILE), format!("{json}\n").as_bytes())
}

/// How a run stands, from its checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub episodes_done: u64,
    /// The episodes the run is configured for.
    pub episodes: u64,
    pub stopped_early: bool,
    pub best: Option<Best>,
}

impl Outcome {
    /// Training is over: all episodes done, or stopped early.
    pub fn finished(&self) -> bool {
        self.stopped_early || self.episodes_done >= self.episodes
    }
}

/// The config and progress of the run in `run_dir`.
pub fn outcome(run_dir: &Path) -> anyhow::Result<(RunConfig, Outcome)> {
    let config = RunConfig::load(&run_dir.join(CONFIG_FILE))?;
    let path = run_dir.join(CHECKPOINT_FILE);
    let tensors = load_tensors(&path)?;
    let (done, _) = read_progress(&tensors, &path)?;
    let selection = if config.validation.and_then(|v| v.early_stopping).is_some() {
        read_selection(&tensors, &path)?
    } else {
        Selection::default()
    };
    let outcome = Outcome {
        episodes_done: done,
        episodes: config.episodes,
        stopped_early: selection.stopped,
        best: selection.best,
    };
    Ok((config, outcome))
}

/// The training steps of prototypical-networks' train+val retrain (`run_trainval.py`): the best
/// round's 0-based epoch index plus `patience` epochs, an epoch being one validation interval.
pub fn retrain_episodes(validation: &Validation, es: &EarlyStopping, best: Best) -> u64 {
    let best_epoch = best.episode.div_ceil(validation.every).saturating_sub(1);
    (best_epoch + es.patience) * validation.every
}

/// The config of the train+val retrain of the finished run in `run_dir`: the same protocol and
/// method trained on the split's `trainval` classes for [`retrain_episodes`] steps, without
/// validation (its last model is the one scored), as prototypical-networks' `run_trainval.py`.
pub fn retrain_config(run_dir: &Path) -> anyhow::Result<RunConfig> {
    let (mut c, outcome) = outcome(run_dir)?;
    let config_path = run_dir.join(CONFIG_FILE);
    let (v, es) = match c.validation {
        Some(v @ Validation { early_stopping: Some(es), .. }) => (v, es),
        _ => bail!(
            "{}: the run did not select a model on validation (no early stopping), so it has no best epoch to retrain for; train it with --patience N",
            config_path.display()
        ),
    };
    if !outcome.finished() {
        bail!(
            "{}: training has not finished ({} of {} episodes, not stopped early); continue it with `kshot train --resume {}` first",
            run_dir.display(),
            outcome.episodes_done,
            outcome.episodes,
            run_dir.display()
        );
    }
    let best = outcome.best.ok_or_else(|| {
        anyhow::anyhow!("{}: the run has no best validation round", run_dir.display())
    })?;
    let subsets = crate::data::split_subsets(&c.data.dataset, &c.data.split)?;
    if subsets.val.is_none() || v.set != ValSet::Split {
        bail!(
            "{}: {}/{} has no train+val subset to retrain on",
            config_path.display(),
            c.data.dataset,
            c.data.split
        );
    }
    c.data.train_subset = "trainval".into();
    c.validation = None;
    c.episodes = retrain_episodes(&v, &es, best);
    c.preset = c.preset.map(|p| format!("{p}+retrain-trainval"));
    Ok(c)
}

/// The validation classes of `config` under the data root `root`, if it validates: the split's
/// validation subset, or the unbenchmarked Lake alphabets ([`ValSet::LakeUnbenchmarked`]).
pub fn load_validation_set(root: &Path, config: &RunConfig) -> anyhow::Result<Option<ImageSet>> {
    let Some(v) = config.validation else { return Ok(None) };
    let d = &config.data;
    match v.set {
        ValSet::Split => match crate::data::split_subsets(&d.dataset, &d.split)?.val {
            Some(val) => {
                Ok(Some(crate::data::load_data(root, d, val, config.backbone.in_channels())?))
            }
            None => Ok(None),
        },
        ValSet::LakeUnbenchmarked { drawers } => {
            anyhow::ensure!(
                d.dataset == "omniglot",
                "validation on the unbenchmarked Lake alphabets needs --dataset omniglot"
            );
            let set = crate::data::load_with_pixels(
                root,
                "omniglot",
                "lake",
                "evaluation",
                d.image_size,
                d.pixels(),
            )?;
            lake_unbenchmarked(set, drawers)
        }
    }
}

/// The classes of `set` (Lake's evaluation alphabets) in [`LAKE_UNBENCHMARKED_ALPHABETS`], each
/// cut to its first `drawers` images (the loader keeps a class's images in drawer order).
pub fn lake_unbenchmarked(mut set: ImageSet, drawers: usize) -> anyhow::Result<Option<ImageSet>> {
    let len = set.image_len();
    set.classes.retain(|c| LAKE_UNBENCHMARKED_ALPHABETS.contains(&c.group.as_str()));
    let groups = set.groups().len();
    anyhow::ensure!(
        groups == LAKE_UNBENCHMARKED_ALPHABETS.len(),
        "{}: found {groups} of the {} unbenchmarked evaluation alphabets; is the Omniglot evaluation set complete?",
        set.name,
        LAKE_UNBENCHMARKED_ALPHABETS.len()
    );
    for c in &mut set.classes {
        anyhow::ensure!(
            c.pixels.len() >= drawers * len,
            "{}: class {} has fewer than {drawers} images",
            set.name,
            c.name
        );
        c.pixels.truncate(drawers * len);
    }
    set.name = format!("{} (unbenchmarked alphabets, drawers 1-{drawers})", set.name);
    Ok(Some(set))
}

/// Fills in what a config learns from its training set: the backbone's input channels (1 for
/// Omniglot, 3 for miniImageNet) and whatever the method learns from it (e.g. the number of base
/// classes of a Baseline head). A set that does not match a value already recorded is an error.
pub fn fit_to_training_set(config: &RunConfig, train_set: &ImageSet) -> anyhow::Result<RunConfig> {
    let mut c = config.clone();
    c.backbone.set_in_channels(train_set.channels);
    c.backbone.set_image_size(train_set.height);
    c.method.fit(train_set)?;
    Ok(c)
}

/// What the checkpoint records besides tensors.
struct Progress {
    done: u64,
    seconds: f64,
    /// Present when the run selects its model.
    selection: Option<Selection>,
}

fn save_checkpoint(
    run_dir: &Path,
    learner: &dyn Learner,
    optimisers: &Optimisers,
    progress: Progress,
    pending_metrics: &mut String,
) -> anyhow::Result<()> {
    let Progress { done, seconds, selection } = progress;
    let state = learner.state();
    let params = state.params.named_tensors("");
    let buffers = state.buffers()?;
    let mut all: Vec<(String, Tensor)> = Vec::new();
    all.extend(params.iter().map(|(n, t)| (format!("param.{n}"), t.clone())));
    all.extend(buffers.iter().map(|(n, t)| (format!("buffer.{n}"), t.clone())));
    all.extend(optimisers.state_tensors()?);
    all.push(("progress.episodes".into(), Tensor::new(&[done as i64], &Device::Cpu)?));
    all.push(("progress.seconds".into(), Tensor::new(&[seconds], &Device::Cpu)?));
    if let Some(s) = selection {
        let (episode, value) = s.best.map_or((-1, f64::NAN), |b| (b.episode as i64, b.value));
        let int = |v: i64| Tensor::new(&[v], &Device::Cpu);
        all.push(("progress.best_episode".into(), int(episode)?));
        all.push(("progress.best_value".into(), Tensor::new(&[value], &Device::Cpu)?));
        all.push(("progress.wait".into(), int(s.wait as i64)?));
        all.push(("progress.stopped".into(), int(s.stopped as i64)?));
    }
    // Metrics first: a crash before the checkpoint's rename leaves extra lines, which resume trims.
    append(&run_dir.join(METRICS_FILE), pending_metrics)?;
    pending_metrics.clear();
    save_tensors(&run_dir.join(CHECKPOINT_FILE), &all)?;
    let mut model = params;
    model.extend(buffers);
    save_tensors(&run_dir.join(MODEL_FILE), &model)
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot append to {}", path.display()))
}

fn read_progress(tensors: &HashMap<String, Tensor>, origin: &Path) -> anyhow::Result<(u64, f64)> {
    let get = |k: &str| {
        tensors.get(k).ok_or_else(|| {
            anyhow::anyhow!("{}: `{k}` is missing; the checkpoint is incomplete", origin.display())
        })
    };
    let done = get("progress.episodes")?.to_vec1::<i64>()?[0] as u64;
    let seconds = get("progress.seconds")?.to_vec1::<f64>()?[0];
    Ok((done, seconds))
}

fn read_selection(tensors: &HashMap<String, Tensor>, origin: &Path) -> anyhow::Result<Selection> {
    let get = |k: &str| {
        tensors.get(k).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: `{k}` is missing; the checkpoint holds no early-stopping state (was it written without early stopping?)",
                origin.display()
            )
        })
    };
    let episode = get("progress.best_episode")?.to_vec1::<i64>()?[0];
    let value = get("progress.best_value")?.to_vec1::<f64>()?[0];
    let best = (episode >= 0).then_some(Best { episode: episode as u64, value });
    let wait = get("progress.wait")?.to_vec1::<i64>()?[0] as u64;
    let stopped = get("progress.stopped")?.to_vec1::<i64>()?[0] != 0;
    Ok(Selection { best, wait, stopped })
}

fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
        .collect()
}

/// Drops metric lines past episode `done` (written before a crash that lost their checkpoint).
/// A metrics file that cannot be read is an error, never rewritten: it holds the run's history.
fn truncate_metrics(path: &Path, done: u64) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {}, the run's training history; restore it (or move it away to start a fresh history) and resume again",
            path.display()
        )
    })?;
    // A kshot 0.1 file gains the new columns, empty, so every line has as many as the header.
    let old = text.lines().next() == Some(METRICS_HEADER_V0);
    let kept: String = text
        .lines()
        .filter(|line| {
            line.split(',').next().and_then(|e| e.parse::<u64>().ok()).is_none_or(|e| e <= done)
        })
        .map(|l| match (old, l == METRICS_HEADER_V0) {
            (true, true) => format!("{METRICS_HEADER}\n"),
            (true, false) => format!("{l},,\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    write_atomic(path, kept.as_bytes())
}
