//! The trainer: schedules training steps ([`Learner::train_step`] against a [`StepCtx`]),
//! validates, checkpoints atomically and resumes exactly. What a step is (an episode's query loss,
//! a batch of pairs, Reptile's own update) is the learner's business; the trainer keeps the
//! optimisers the learner registered and saves the learner's whole [`crate::methods::State`].
//!
//! A run directory holds `config.json` (how to reproduce it), `checkpoint.safetensors` (parameters,
//! buffers, optimiser state and progress, written in one atomic rename), `model.safetensors`
//! (parameters and buffers only) and `metrics.csv` (one line per episode).

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
use crate::eval::evaluate;
use crate::methods::{Learner, Optimisers, StepCtx};

pub const CONFIG_FILE: &str = "config.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";
pub const METRICS_FILE: &str = "metrics.csv";
const METRICS_HEADER: &str = "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95";

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
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub episodes_done: u64,
    pub seconds: f64,
    pub interrupted: bool,
}

/// A fresh learner for `config`, deterministic in its seed.
pub fn new_learner(config: &RunConfig) -> anyhow::Result<Box<dyn Learner>> {
    crate::autograd::init();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(INIT_STREAM);
    config.method.build(&config.protocol, &mut rng, &Device::Cpu)
}

/// Loads the trained learner of a run directory.
pub fn load_learner(run_dir: &Path) -> anyhow::Result<(RunConfig, Box<dyn Learner>)> {
    load_learner_with(run_dir, RunConfig::load(&run_dir.join(CONFIG_FILE))?)
}

/// Loads the trained weights of a run directory into a learner built from `config` (the run's own
/// config with evaluation-time options changed, e.g. Reptile's transductive scoring).
pub fn load_learner_with(
    run_dir: &Path,
    config: RunConfig,
) -> anyhow::Result<(RunConfig, Box<dyn Learner>)> {
    let mut learner = new_learner(&config)?;
    let path = run_dir.join(MODEL_FILE);
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
    if resume {
        let tensors = load_tensors(&checkpoint_path)?;
        let buffers = strip_prefix(&tensors, "buffer.");
        learner.state_mut().load(&tensors, "param.", &buffers, "", &checkpoint_path)?;
        optimisers.load_state(&tensors, &checkpoint_path)?;
        (done, seconds) = read_progress(&tensors, &checkpoint_path)?;
        truncate_metrics(&run_dir.join(METRICS_FILE), done)?;
    } else {
        if run_dir.join(CONFIG_FILE).exists() {
            bail!(
                "{} already holds a run; continue it with `kshot train --resume {}` or choose another --out",
                run_dir.display(),
                run_dir.display()
            );
        }
        config.save(&run_dir.join(CONFIG_FILE))?;
        write_atomic(&run_dir.join(METRICS_FILE), format!("{METRICS_HEADER}\n").as_bytes())?;
    }

    let sampler = EpisodeSampler::new(train_set, config.train, config.data.grouping)?
        .with_task_rotations(config.data.task_rotations)?;
    let val_sampler = match (config.validation, val_set) {
        (Some(v), Some(set)) => Some((
            v,
            EpisodeSampler::new(set, v.spec, config.data.grouping)?
                .with_task_rotations(config.data.task_rotations)?,
        )),
        _ => None,
    };
    let mut pending = String::new();
    let mut interrupted = false;
    while done < config.episodes {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let started = Instant::now();
        let lr = config.schedule.at(done);
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

        let mut val_accuracy = None;
        if let Some((v, vs)) = &val_sampler {
            if done % v.every == 0 || done == config.episodes {
                let report = evaluate(learner.as_ref(), vs, v.episodes, config.seed, |_| {})?;
                val_accuracy = Some((report.accuracy, report.ci95));
            }
        }
        let (va, vc) = val_accuracy.map_or((String::new(), String::new()), |(a, c)| {
            (format!("{a:.5}"), format!("{c:.5}"))
        });
        pending
            .push_str(&format!("{done},{loss:.6},{:.5},{lr:e},{seconds:.3},{va},{vc}\n", accuracy));
        on_status(&Status {
            episode: done,
            total: config.episodes,
            loss,
            accuracy,
            lr,
            seconds,
            val_accuracy,
        });

        if done % config.checkpoint_every == 0 || done == config.episodes {
            save_checkpoint(run_dir, learner.as_ref(), &optimisers, done, seconds, &mut pending)?;
        }
    }
    if interrupted {
        save_checkpoint(run_dir, learner.as_ref(), &optimisers, done, seconds, &mut pending)?;
    }
    Ok(Summary { episodes_done: done, seconds, interrupted })
}

/// Fills in what a config learns from its training set: the backbone's input channels (1 for
/// Omniglot, 3 for miniImageNet) and whatever the method learns from it (e.g. the number of base
/// classes of a Baseline head). A set that does not match a value already recorded is an error.
pub fn fit_to_training_set(config: &RunConfig, train_set: &ImageSet) -> anyhow::Result<RunConfig> {
    let mut c = config.clone();
    c.backbone.set_in_channels(train_set.channels);
    c.method.fit(train_set)?;
    Ok(c)
}

fn save_checkpoint(
    run_dir: &Path,
    learner: &dyn Learner,
    optimisers: &Optimisers,
    done: u64,
    seconds: f64,
    pending_metrics: &mut String,
) -> anyhow::Result<()> {
    let state = learner.state();
    let params = state.params.named_tensors("");
    let buffers = state.buffers()?;
    let mut all: Vec<(String, Tensor)> = Vec::new();
    all.extend(params.iter().map(|(n, t)| (format!("param.{n}"), t.clone())));
    all.extend(buffers.iter().map(|(n, t)| (format!("buffer.{n}"), t.clone())));
    all.extend(optimisers.state_tensors()?);
    all.push(("progress.episodes".into(), Tensor::new(&[done as i64], &Device::Cpu)?));
    all.push(("progress.seconds".into(), Tensor::new(&[seconds], &Device::Cpu)?));
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
    let kept: String = text
        .lines()
        .filter(|line| {
            line.split(',').next().and_then(|e| e.parse::<u64>().ok()).is_none_or(|e| e <= done)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}
