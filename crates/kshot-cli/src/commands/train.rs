//! `kshot train`: a new run from a preset (or the defaults) and flags, or `--resume` of one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{ArgMatches, Args};
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use kshot::config::{RunConfig, Validation};
use kshot::data::{self, Grouping};
use kshot::methods::{MethodConfig, MethodFlags};
use kshot::nn::BackboneConfig;
use kshot::protocol::{EarlyStopping, ValMetric, ValSet};
use kshot::{presets, train};

use super::{data_root_for, flag, given_flags};

#[derive(Args)]
pub struct TrainArgs {
    /// Continue the run in this directory exactly where it stopped.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["out", "preset", "method", "retrain_trainval"])]
    resume: Option<PathBuf>,
    /// Stage 2 of prototypical-networks' procedure (run_trainval.py): retrain the finished,
    /// early-stopped run RUN_DIR's protocol from scratch on the split's train+val classes
    /// (Vinyals: 4800) for (best epoch + patience) epochs, an epoch being RUN_DIR's validation
    /// interval, with no validation; the new run (--out) is scored on its last model.
    /// Example: `kshot train --preset protonet-omniglot-1shot-official --out runs/a` then
    /// `kshot train --retrain-trainval runs/a --out runs/a-trainval`.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["preset", "method"])]
    retrain_trainval: Option<PathBuf>,
    /// Directory for the new run (config, checkpoints, metrics).
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Start from a paper protocol (see `kshot presets`); other flags override it.
    #[arg(long)]
    preset: Option<String>,
    /// protonet, maml, fomaml, matching, siamese, baseline, baseline++, reptile or meta-lstm.
    #[arg(long)]
    method: Option<String>,
    /// The network that embeds images: conv4 (default), conv4-strided (MAML's / Reptile's
    /// Omniglot net), koch (Koch et al.'s 105x105 twin) or resnet12.
    #[arg(long)]
    backbone: Option<String>,
    /// omniglot (default), mini-imagenet, or folder (your own images: --data-dir DIR holds one
    /// sub-folder per class, or DIR/<group>/<class>/); changing it also resets the split, image
    /// size and input channels to the dataset's defaults (vinyals, 28, 1 / ravi, 84, 3 /
    /// ratio:0.6,0.2,0.2, 84, 3).
    #[arg(long)]
    dataset: Option<String>,
    /// omniglot: vinyals, lake, maml (cbfinn/maml's shuffled 1100/100/423 characters, with
    /// per-task rotations) or reptile (run_omniglot.py's 1200 × 4 rotations / 423 unrotated);
    /// mini-imagenet: ravi; folder: ratio:TRAIN,VAL,TEST[@SEED] (classes shuffled by SEED),
    /// all, a spec file (JSON {"train": [...], "val": [...], "test": [...]} or CSV class,subset)
    /// or easyfsl's spec ({"class_names": [...], "class_roots": [...]}, or a folder of its
    /// train/val/test.json).
    #[arg(long)]
    split: Option<String>,
    /// Folder datasets: read images as 1 (grayscale) or 3 (RGB) channels (default 3).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3))]
    channels: Option<u64>,
    /// Folder datasets: as-is (default) or ink (drawings: background 0, ink 1 whatever their
    /// polarity or gray levels; grayscale only).
    #[arg(long, value_name = "POLARITY")]
    polarity: Option<kshot::data::images::Polarity>,
    /// Folder datasets: stretch (default: resize every image to --image-size) or exact (every
    /// image must already be --image-size square).
    #[arg(long, value_name = "FIT")]
    fit: Option<kshot::data::images::Fit>,
    /// Rotate each class of every episode by a random multiple of 90° (cbfinn/maml's Omniglot
    /// tasks). Default: on with --split maml, else the preset's.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    task_rotations: Option<bool>,
    /// Class subset of the split to train on (vinyals, ravi: train or trainval; lake: background).
    #[arg(long)]
    train_subset: Option<String>,
    /// Draw every episode's classes from a single alphabet.
    #[arg(long)]
    within_alphabet: bool,
    /// Data root (holds omniglot/, mini-imagenet/). Defaults to $KSHOT_DATA.
    #[arg(long, env = "KSHOT_DATA")]
    data_dir: Option<PathBuf>,
    /// Side of the square input images in pixels (Omniglot 28, miniImageNet 84).
    #[arg(long)]
    image_size: Option<usize>,
    /// Omniglot resize of the 105×105 originals: area (exact area average, default), nearest
    /// (Pillow on the 1-bit PNGs: MAML, Reptile, ProtoNet) or bilinear-crop (CloserLook: bilinear
    /// to ⌊1.15·size⌋, centre crop).
    #[arg(long, value_name = "MODE")]
    resize: Option<kshot::data::omniglot::Resize>,
    /// Omniglot: true = ink 1 on background 0 (default), false = the PNG's white background.
    #[arg(long, value_name = "BOOL")]
    invert: Option<bool>,
    /// Classes per training episode (N of N-way); test episodes keep the preset's ways.
    #[arg(long)]
    train_ways: Option<usize>,
    /// Labelled examples per class in support sets (K of K-shot), training and test (Reptile:
    /// test only; it trains on --train-shots).
    #[arg(long)]
    shots: Option<usize>,
    /// Images per class in training episodes when it differs from --shots (Reptile's train shots).
    #[arg(long)]
    train_shots: Option<usize>,
    /// Semi-supervised episodes (gnn): unlabelled support images per class beside the --shots
    /// labelled ones, in training, validation and test.
    #[arg(long, value_name = "K'")]
    unlabelled: Option<usize>,
    /// Query images per class in training episodes.
    #[arg(long)]
    queries: Option<usize>,
    /// Total training episodes (with --resume: extend the run to this many).
    #[arg(long)]
    episodes: Option<u64>,
    /// Seed of every random choice in the run (episodes, initialisation, augmentation).
    #[arg(long)]
    seed: Option<u64>,
    /// Adam learning rate at the start of training.
    #[arg(long)]
    lr: Option<f64>,
    /// Multiply the learning rate by --lr-gamma every this many episodes (0: constant).
    #[arg(long)]
    lr_step: Option<u64>,
    /// Factor applied to the learning rate every --lr-step episodes.
    #[arg(long)]
    lr_gamma: Option<f64>,
    /// Write a resumable checkpoint every this many episodes (and always when training stops);
    /// may be changed with --resume.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_every: Option<u64>,
    /// Validate every this many episodes (0: never).
    #[arg(long)]
    val_every: Option<u64>,
    /// Episodes per validation.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    val_episodes: Option<u64>,
    /// Early stopping: keep the model of the best validation round (best_model.safetensors,
    /// scored by `kshot eval`) and stop once more than N validation rounds in a row have not
    /// improved (prototypical-networks' `wait > patience`).
    #[arg(long, value_name = "N")]
    patience: Option<u64>,
    /// The validation number early stopping selects on: loss (default) or accuracy.
    #[arg(long, value_enum, value_name = "METRIC")]
    select_on: Option<ValMetric>,
    /// Use candle's composite ops instead of kshot's fused kernels (slower; for checking).
    #[arg(long)]
    composite_kernels: bool,
    /// Episodes (tasks) per optimiser update.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    meta_batch: Option<u64>,
    /// Checkpoint and stop after this many minutes of this session (resume continues the run).
    #[arg(long, value_name = "MINUTES")]
    max_minutes: Option<f64>,
    #[command(flatten)]
    method_flags: MethodFlags,
}

/// What `--resume` accepts besides the run directory: flags that do not change what is computed.
const RESUME_FLAGS: &[&str] =
    &["resume", "data_dir", "episodes", "max_minutes", "checkpoint_every"];

/// What `--retrain-trainval` accepts besides the first run's directory.
const RETRAIN_FLAGS: &[&str] =
    &["retrain_trainval", "out", "data_dir", "max_minutes", "checkpoint_every"];

/// The run config a new `kshot train` describes: preset (or defaults), then flags.
fn new_config(a: &TrainArgs, given: &[String], data_root: &Path) -> anyhow::Result<RunConfig> {
    let mut c = match &a.preset {
        Some(name) => presets::config(name)?,
        None => presets::default_config(),
    };
    c.command = std::env::args().collect();
    if let Some(m) = &a.method {
        c.method.switch_to(m)?;
    }
    check_method_flags(&c.method, given)?;
    if let Some(d) = &a.dataset {
        // Another dataset than the preset's: its own split, image size and channels.
        let defaults = data::dataset_defaults(d)?;
        if *d != c.data.dataset {
            c.data.dataset = d.clone();
            c.data.split = defaults.split.to_string();
            c.data.image_size = defaults.image_size;
            c.data.resize = Default::default();
            c.data.invert = true;
            c.backbone.set_in_channels(defaults.channels);
        }
    }
    let folder = c.data.dataset == "folder";
    for (flag, given) in [
        ("--channels", a.channels.is_some()),
        ("--polarity", a.polarity.is_some()),
        ("--fit", a.fit.is_some()),
    ] {
        if given && !folder {
            bail!("{flag} applies to --dataset folder; this run reads {}", c.data.dataset);
        }
    }
    if let Some(ch) = a.channels {
        c.backbone.set_in_channels(ch as usize);
    }
    if let Some(p) = a.polarity {
        c.data.polarity = p;
    }
    if let Some(f) = a.fit {
        c.data.fit = f;
    }
    if folder {
        kshot::data::images::Pipeline::folder(
            c.backbone.in_channels(),
            c.data.image_size,
            c.data.polarity,
            c.data.fit,
        )?;
    }
    if let Some(kind) = &a.backbone {
        if kind != c.backbone.kind() {
            c.backbone = BackboneConfig::named(kind, c.backbone.in_channels())?;
        }
    }
    if a.composite_kernels && !c.backbone.set_fast_kernels(false) {
        bail!("--composite-kernels: the {} backbone has no fused kernels", c.backbone.kind());
    }
    if let Some(s) = &a.split {
        c.data.split = s.clone();
        c.data.task_rotations = s == "maml";
    }
    if let Some(t) = a.task_rotations {
        c.data.task_rotations = t;
    }
    let subsets = data::split_subsets(&c.data.dataset, &c.data.split)?;
    // The preset's own training subset (e.g. MAML's `trainval`) stands unless the split changed.
    if a.dataset.is_some() || a.split.is_some() || a.preset.is_none() {
        c.data.train_subset = subsets.train.to_string();
    }
    if let Some(t) = &a.train_subset {
        c.data.train_subset = t.clone();
    }
    c.data.test_subset = subsets.test.to_string();
    // A split without validation classes validates only on a set of its own (Siamese's
    // unbenchmarked Lake alphabets).
    if subsets.val.is_none() && c.validation.is_some_and(|v| v.set == ValSet::Split) {
        c.validation = None;
    }
    if a.within_alphabet {
        c.data.grouping = Grouping::WithinGroup;
    }
    c.data.data_dir = Some(
        std::path::absolute(data_root).unwrap_or(data_root.to_path_buf()).display().to_string(),
    );
    if let Some(s) = a.image_size {
        c.data.image_size = s;
    }
    if let Some(r) = a.resize {
        c.data.resize = r;
    }
    if let Some(i) = a.invert {
        c.data.invert = i;
    }
    if let Some(w) = a.train_ways {
        c.train.ways = w;
    }
    if let Some(k) = a.shots {
        // Reptile trains on its own number of shots per class (the official --train-shots).
        if !c.method.own_train_shots() {
            c.train.shots = k;
        }
        c.test.shots = k;
        if let Some(v) = &mut c.validation {
            v.spec.shots = k;
        }
    }
    if let Some(k) = a.train_shots {
        c.train.shots = k;
    }
    if let Some(u) = a.unlabelled {
        c.train.unlabelled = u;
        c.test.unlabelled = u;
        if let Some(v) = &mut c.validation {
            v.spec.unlabelled = u;
        }
    }
    if let Some(q) = a.queries {
        c.train.queries = q;
    }
    if let Some(e) = a.episodes {
        c.episodes = e;
    }
    if let Some(s) = a.seed {
        c.seed = s;
    }
    if let Some(lr) = a.lr {
        c.schedule.lr = lr;
    }
    if let Some(s) = a.lr_step {
        c.schedule.step = s;
    }
    if let Some(g) = a.lr_gamma {
        c.schedule.gamma = g;
    }
    if let Some(n) = a.checkpoint_every {
        c.checkpoint_every = n;
    }
    match (a.val_every, &mut c.validation) {
        (Some(0), _) => c.validation = None,
        (Some(n), Some(v)) => v.every = n,
        (Some(n), None) if subsets.val.is_some() => {
            c.validation = Some(Validation::new(c.test, 200, n));
        }
        _ => {}
    }
    if let (Some(n), Some(v)) = (a.val_episodes, &mut c.validation) {
        v.episodes = n as usize;
    }
    if a.patience.is_some() || a.select_on.is_some() {
        let Some(v) = &mut c.validation else {
            bail!("--patience and --select-on need validation; this run has none (give --val-every N on a split with validation classes)");
        };
        let current = v.early_stopping;
        let patience = a.patience.or(current.map(|e| e.patience)).ok_or_else(|| {
            anyhow::anyhow!("--select-on needs --patience N (the run has no early stopping)")
        })?;
        let metric = a.select_on.or(current.map(|e| e.metric)).unwrap_or(ValMetric::Loss);
        v.early_stopping = Some(EarlyStopping { metric, patience });
    }
    if let Some(n) = a.meta_batch {
        c.meta_batch = n as usize;
    }
    let ways = c.train.ways;
    if let Some(w) = c.method.ways_mut() {
        *w = ways;
    }
    c.method.apply(&a.method_flags)?;
    c.check()?;
    Ok(c)
}

/// Refuses a method flag given for a method that does not read it.
fn check_method_flags(method: &MethodConfig, given: &[String]) -> anyhow::Result<()> {
    let own = MethodConfig::flags_of(method.name());
    let foreign = MethodConfig::all_flags().into_iter().filter(|id| !own.contains(id));
    match foreign.into_iter().find(|id| given.contains(id)) {
        Some(id) => bail!("{} does not apply to --method {}", flag(&id), method.name()),
        None => Ok(()),
    }
}

/// The config of the run in `dir`, with what `--resume` may change applied and saved.
fn resumed_config(a: &TrainArgs, given: &[String], dir: &Path) -> anyhow::Result<RunConfig> {
    if let Some(id) = given.iter().find(|id| !RESUME_FLAGS.contains(&id.as_str())) {
        bail!(
            "{} cannot change a run being resumed ({} fixes it); resume without it, or start a new run with --out",
            flag(id),
            dir.join(train::CONFIG_FILE).display()
        );
    }
    let path = dir.join(train::CONFIG_FILE);
    let mut c = RunConfig::load(&path)?;
    let mut changed = false;
    if let Some(e) = a.episodes.filter(|&e| e != c.episodes) {
        if let Some(note) = c.method.extend(c.episodes, e) {
            eprintln!("note: {note}");
        }
        c.episodes = e;
        changed = true;
    }
    if let Some(n) = a.checkpoint_every.filter(|&n| n != c.checkpoint_every) {
        c.checkpoint_every = n;
        changed = true;
    }
    if changed {
        c.command.push("--resume".into());
        c.command.extend(std::env::args().skip(1));
        c.save(&path)?;
    }
    Ok(c)
}

/// The config of the train+val retrain of the finished run `first`, with the flags it allows.
fn retrain_config(a: &TrainArgs, given: &[String], first: &Path) -> anyhow::Result<RunConfig> {
    if let Some(id) = given.iter().find(|id| !RETRAIN_FLAGS.contains(&id.as_str())) {
        bail!(
            "{} cannot be combined with --retrain-trainval: the retrain repeats {}'s protocol; change it in the first run",
            flag(id),
            first.join(train::CONFIG_FILE).display()
        );
    }
    let mut c = train::retrain_config(first)?;
    c.command = std::env::args().collect();
    if let Some(n) = a.checkpoint_every {
        c.checkpoint_every = n;
    }
    eprintln!(
        "retraining {} on {} for {} episodes (best epoch + patience; no validation)",
        first.display(),
        c.data.train_subset,
        c.episodes
    );
    Ok(c)
}

pub fn run(a: TrainArgs, matches: &ArgMatches) -> anyhow::Result<()> {
    let given = given_flags(matches);
    if let Some(dir) = &a.resume {
        train::check_resumable(dir)?;
    } else {
        let out = a.out.as_deref().context("--out RUN_DIR is required")?;
        if train::check_new_run_dir(out)? == train::NewRunDir::FailedStart {
            eprintln!(
                "note: starting again in {}: its earlier start stopped before the first checkpoint",
                out.display()
            );
        }
    }
    let (run_dir, config, resume) = match (&a.resume, &a.retrain_trainval) {
        (Some(dir), _) => (dir.clone(), resumed_config(&a, &given, dir)?, true),
        (None, Some(first)) => {
            let out = a.out.clone().context("--out RUN_DIR is required")?;
            (out, retrain_config(&a, &given, first)?, false)
        }
        (None, None) => {
            let root = data::resolve_root(a.data_dir.as_deref())?;
            let out = a.out.clone().context("--out RUN_DIR is required")?;
            (out, new_config(&a, &given, &root)?, false)
        }
    };
    let root = data_root_for(a.data_dir.as_deref(), &config)?;
    let d = &config.data;
    eprintln!("loading {}/{} ({}) from {}", d.dataset, d.split, d.train_subset, root.display());
    let train_set = data::load_data(&root, d, &d.train_subset, config.backbone.in_channels())?;
    let val_set = train::load_validation_set(&root, &config)?;
    eprintln!(
        "{} {}: {} classes, {} {}; run directory {}",
        if resume { "resuming" } else { "training" },
        config.method.name(),
        train_set.classes.len(),
        config.episodes,
        config.method.step_unit(&config.protocol),
        run_dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let out_of_time = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted: saving a checkpoint after this episode (Ctrl-C again to quit now)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    if let Some(minutes) = a.max_minutes {
        let (stop, out_of_time) = (stop.clone(), out_of_time.clone());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(minutes * 60.0));
            out_of_time.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        });
    }

    // Dropped unfinished (an error), the bar stays where training stopped instead of jumping to
    // its length.
    let bar = ProgressBar::new(config.episodes).with_finish(ProgressFinish::Abandon);
    bar.set_style(bar_style(" ({eta} left) {msg}"));
    let (mut avg_loss, mut avg_acc) = (None::<f64>, None::<f64>);
    let mut last_val = String::new();
    let mut first = true;
    let summary =
        train::train(&run_dir, &config, &train_set, val_set.as_ref(), resume, &stop, |s| {
            let ema =
                |avg: &mut Option<f64>, x: f64| *avg = Some(avg.map_or(x, |a| 0.98 * a + 0.02 * x));
            ema(&mut avg_loss, s.loss);
            ema(&mut avg_acc, s.accuracy);
            if let Some((acc, ci)) = s.val_accuracy {
                last_val = format!(" | val {:.2}% ± {:.2}", 100.0 * acc, 100.0 * ci);
                bar.println(format!(
                    "episode {}: validation {:.2}% ± {:.2}%",
                    s.episode,
                    100.0 * acc,
                    100.0 * ci
                ));
            }
            if std::mem::take(&mut first) {
                // Rate and ETA count from where the run stands (a resumed run is past 0).
                bar.set_position(s.episode - 1);
                bar.reset_eta();
            }
            bar.set_position(s.episode);
            if bar.is_hidden() && (s.episode % 100 == 0 || s.episode == s.total) {
                // stderr is not a terminal (a log file): a plain line now and then instead of a bar.
                eprintln!(
                    "episode {}/{}: loss {:.4} acc {:.2}% lr {:.1e} ({:.0} s){last_val}",
                    s.episode,
                    s.total,
                    avg_loss.unwrap_or(0.0),
                    100.0 * avg_acc.unwrap_or(0.0),
                    s.lr,
                    s.seconds
                );
            }
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% lr {:.1e}{last_val}",
                avg_loss.unwrap_or(0.0),
                100.0 * avg_acc.unwrap_or(0.0),
                s.lr
            ));
        })?;
    let stopped = if summary.stopped_early {
        Some(Stopped::EarlyStopping)
    } else if summary.interrupted && out_of_time.load(Ordering::SeqCst) {
        Some(Stopped::MaxMinutes(a.max_minutes.unwrap_or_default()))
    } else if summary.interrupted {
        Some(Stopped::Interrupted)
    } else {
        None
    };
    match stopped {
        Some(why) => {
            let message = why.message(&run_dir);
            if bar.is_hidden() {
                eprintln!("episode {}/{}, {message}", summary.episodes_done, config.episodes);
            }
            bar.set_style(bar_style(", {msg}"));
            bar.abandon_with_message(message);
        }
        None => bar.finish(),
    }
    if summary.stopped_early {
        let es = config.validation.and_then(|v| v.early_stopping);
        let (metric, patience) =
            es.map_or(("?".into(), 0), |e| (format!("{:?}", e.metric), e.patience));
        match summary.best {
            Some(b) => println!(
                "early stopping after episode {}: more than {patience} validation rounds without a better validation {}; best {:.5} at episode {} ({})",
                summary.episodes_done,
                metric.to_lowercase(),
                b.value,
                b.episode,
                run_dir.join(train::BEST_MODEL_FILE).display()
            ),
            None => println!("early stopping after episode {}", summary.episodes_done),
        }
    }
    let per_episode = if summary.episodes_done > 0 {
        summary.seconds / summary.episodes_done as f64
    } else {
        0.0
    };
    eprintln!(
        "{} after {} of {} episodes, {:.1} s of training ({:.3} s per episode); model in {}",
        if summary.interrupted || summary.stopped_early { "stopped" } else { "done" },
        summary.episodes_done,
        config.episodes,
        summary.seconds,
        per_episode,
        run_dir.join(train::MODEL_FILE).display()
    );
    eprintln!("plot the learning curves: kshot plot {}", run_dir.display());
    Ok(())
}

/// The bar's template with `tail` right after `N/M episodes`.
fn bar_style(tail: &str) -> ProgressStyle {
    let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} episodes{tail}");
    ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> ")
}

/// Why training stopped before its last episode.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stopped {
    /// `--max-minutes` ran out (its value).
    MaxMinutes(f64),
    /// Ctrl-C.
    Interrupted,
    /// Validation stopped improving (`--patience`).
    EarlyStopping,
}

impl Stopped {
    /// What the progress bar says after the count of episodes done.
    fn message(self, run_dir: &Path) -> String {
        let resume = format!("resume with kshot train --resume {}", run_dir.display());
        match self {
            Stopped::MaxMinutes(m) => format!("stopped (--max-minutes {m}); {resume}"),
            Stopped::Interrupted => format!("stopped (Ctrl-C); {resume}"),
            Stopped::EarlyStopping => "stopped early: validation stopped improving".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_bar_message_says_why_and_how_to_resume() {
        let dir = Path::new("runs/a");
        assert_eq!(
            Stopped::MaxMinutes(40.0).message(dir),
            "stopped (--max-minutes 40); resume with kshot train --resume runs/a"
        );
        assert_eq!(
            Stopped::MaxMinutes(0.5).message(dir),
            "stopped (--max-minutes 0.5); resume with kshot train --resume runs/a"
        );
        assert_eq!(
            Stopped::Interrupted.message(dir),
            "stopped (Ctrl-C); resume with kshot train --resume runs/a"
        );
        assert!(!Stopped::EarlyStopping.message(dir).contains("--resume"));
    }
}
