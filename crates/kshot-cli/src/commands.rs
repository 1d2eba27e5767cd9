//! Subcommands. Each parses flags into library types and calls the library; no logic lives here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kshot::config::{RunConfig, Validation};
use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::methods::Distance;
use kshot::{eval, presets, train};

#[derive(Parser)]
#[command(
    name = "kshot",
    version,
    about = "Few-shot learning: train, evaluate and reproduce the papers"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Meta-train a learner (or continue one with --resume).
    Train(Box<TrainArgs>),
    /// Score a trained run on fixed, seeded test episodes: mean accuracy ± 95% CI.
    Eval(EvalArgs),
    /// Download and verify datasets.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// List the paper protocols that --preset accepts.
    Presets,
    /// Time the Conv4 workloads, side by side with the PyTorch reference (--pytorch PYTHON).
    Bench(crate::bench::BenchArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download a dataset's official archives into the data directory and verify them
    /// (miniImageNet has no public download: this checks the files placed by hand).
    Fetch {
        #[arg(value_enum)]
        dataset: FetchDataset,
        #[arg(long, env = "KSHOT_DATA")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum FetchDataset {
    Omniglot,
    #[value(name = "mini-imagenet")]
    MiniImagenet,
}

#[derive(Clone, Copy, ValueEnum)]
enum TwinArg {
    Conv4,
    Koch,
}

#[derive(Clone, Copy, ValueEnum)]
enum DistanceArg {
    Euclidean,
    Cosine,
}

#[derive(Args)]
struct TrainArgs {
    /// Continue the run in this directory exactly where it stopped.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["out", "preset", "method"])]
    resume: Option<PathBuf>,
    /// Directory for the new run (config, checkpoints, metrics).
    #[arg(long, value_name = "RUN_DIR", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Start from a paper protocol (see `kshot presets`); other flags override it.
    #[arg(long)]
    preset: Option<String>,
    /// protonet, matching, siamese, baseline, baseline++, maml, fomaml, reptile or meta-lstm.
    #[arg(long)]
    method: Option<String>,
    /// omniglot (default) or mini-imagenet; changing it also resets the split, image size and
    /// input channels to the dataset's defaults (vinyals, 28, 1 / ravi, 84, 3).
    #[arg(long)]
    dataset: Option<String>,
    /// omniglot: vinyals or lake; mini-imagenet: ravi.
    #[arg(long)]
    split: Option<String>,
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
    /// Classes per training episode (N of N-way); test episodes keep the preset's ways.
    #[arg(long)]
    train_ways: Option<usize>,
    /// Labelled examples per class in support sets (K of K-shot), training and test (Reptile:
    /// test only; it trains on --train-shots).
    #[arg(long)]
    shots: Option<usize>,
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
    /// ProtoNet: distance between query embeddings and prototypes.
    #[arg(long, value_enum)]
    distance: Option<DistanceArg>,
    /// Write a resumable checkpoint every this many episodes (and always when training stops).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Validate every this many episodes (0: never).
    #[arg(long)]
    val_every: Option<u64>,
    /// Episodes per validation.
    #[arg(long)]
    val_episodes: Option<usize>,
    /// Use candle's composite ops instead of kshot's fused kernels (slower; for checking).
    #[arg(long)]
    composite_kernels: bool,
    /// Episodes (tasks) per optimiser update.
    #[arg(long)]
    meta_batch: Option<usize>,
    /// MAML / Reptile / Meta-LSTM: inner steps (learner updates) during meta-training.
    #[arg(long)]
    inner_steps: Option<usize>,
    /// MAML / Reptile / Meta-LSTM: inner steps when adapting to a test task.
    #[arg(long)]
    inner_steps_test: Option<usize>,
    /// MAML: inner step size α. Reptile: inner Adam learning rate.
    #[arg(long)]
    inner_lr: Option<f64>,
    /// Reptile: images per inner mini-batch during meta-training.
    #[arg(long)]
    inner_batch: Option<usize>,
    /// Reptile: images per inner mini-batch at test time.
    #[arg(long)]
    inner_batch_test: Option<usize>,
    /// Reptile: outer step size ε at the start of training (annealed linearly to --outer-step-final).
    #[arg(long, alias = "outer-lr")]
    outer_step: Option<f64>,
    /// Reptile: outer step size ε at the end of training.
    #[arg(long)]
    outer_step_final: Option<f64>,
    /// Reptile: score all queries of a test task in one batch (batch-norm statistics shared).
    #[arg(long)]
    transductive: bool,
    /// Images per class in training episodes when it differs from --shots (Reptile's train shots).
    #[arg(long)]
    train_shots: Option<usize>,
    /// MAML: drop the second-order term (same as --method fomaml).
    #[arg(long)]
    first_order: bool,
    /// Matching Networks: full-context embeddings (biLSTM over the support, attention LSTM for queries).
    #[arg(long)]
    fce: bool,
    /// Matching Networks: read steps of the attention LSTM (with --fce).
    #[arg(long)]
    fce_steps: Option<usize>,
    /// Matching Networks: multiply cosine similarities by this before the attention softmax (paper: 1).
    #[arg(long)]
    attention_scale: Option<f64>,
    /// Siamese: the twin network (conv4: reduced, 28x28; koch: the paper's 105x105 network).
    #[arg(long, value_enum)]
    twin: Option<TwinArg>,
    /// Siamese: units of the sigmoid embedding layer.
    #[arg(long)]
    hidden: Option<usize>,
    /// Siamese: pairs per training step (half same, half different).
    #[arg(long)]
    pairs: Option<usize>,
    /// Siamese: fraction of the different pairs drawn from one alphabet.
    #[arg(long)]
    within_group_negatives: Option<f64>,
    /// Siamese: no affine distortions.
    #[arg(long)]
    no_augment: bool,
    /// Baseline / Baseline++: images per pretraining mini-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Baseline / Baseline++: fine-tuning epochs over each test support set.
    #[arg(long)]
    finetune_epochs: Option<usize>,
    /// Checkpoint and stop after this many minutes of this session (resume continues the run).
    #[arg(long, value_name = "MINUTES")]
    max_minutes: Option<f64>,
}

#[derive(Args)]
struct EvalArgs {
    /// The run directory to score.
    #[arg(long, value_name = "RUN_DIR")]
    run: PathBuf,
    /// Classes per test episode (default: the run's test protocol, as for the next three).
    #[arg(long)]
    ways: Option<usize>,
    /// Labelled examples per class in each test support set.
    #[arg(long)]
    shots: Option<usize>,
    /// Query images per class in each test episode.
    #[arg(long)]
    queries: Option<usize>,
    /// Number of test episodes (tasks) to average over.
    #[arg(long)]
    episodes: Option<usize>,
    /// Seed of the test episodes; the same seed draws the same episodes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Class subset to draw test episodes from (default: the split's test classes).
    #[arg(long)]
    subset: Option<String>,
    /// Draw every episode's classes from a single alphabet.
    #[arg(long)]
    within_alphabet: bool,
    /// Data root (holds omniglot/, mini-imagenet/). Defaults to $KSHOT_DATA.
    #[arg(long, env = "KSHOT_DATA")]
    data_dir: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Reptile, MAML: score all queries of a task in one batch (true) or each with the support set
    /// alone (false). Default: as the run was trained (MAML: true, as in the paper).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    transductive: Option<bool>,
    /// Score a fixed benchmark instead of random episodes (lake-20way: Lake et al.'s 20 runs of
    /// 20-way within-alphabet one-shot classification, omniglot/all_runs.zip).
    #[arg(long, value_enum)]
    benchmark: Option<BenchmarkArg>,
    /// Score the Lake benchmark even though the run trained on classes outside Omniglot's
    /// background alphabets (the score is then contaminated and reported as such).
    #[arg(long)]
    allow_contaminated: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchmarkArg {
    #[value(name = "lake-20way")]
    Lake20way,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => run_train(*args),
        Command::Eval(args) => run_eval(args),
        Command::Data {
            command: DataCommand::Fetch { dataset: FetchDataset::Omniglot, data_dir },
        } => {
            let root = data::resolve_root(data_dir.as_deref())?;
            data::download::fetch_omniglot(&root)?;
            eprintln!("Omniglot is ready in {}", root.join("omniglot").display());
            Ok(())
        }
        Command::Data {
            command: DataCommand::Fetch { dataset: FetchDataset::MiniImagenet, data_dir },
        } => {
            let root = data::resolve_root(data_dir.as_deref())?;
            if let Some(w) = data::download::fetch_mini_imagenet(&root)? {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "miniImageNet is in place in {} (placed by hand; it has no public download)",
                data::mini_imagenet::dataset_dir(&root).display()
            );
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args),
        Command::Presets => {
            for p in presets::PRESETS {
                println!("{:<30} {}", p.name, p.summary);
            }
            Ok(())
        }
    }
}

/// The run config a new `kshot train` describes: preset (or defaults), then flags.
fn new_config(a: &TrainArgs, data_root: &Path) -> anyhow::Result<RunConfig> {
    let mut c = match &a.preset {
        Some(name) => {
            let p = presets::find(name)?;
            let mut c = (p.build)();
            c.preset = Some(p.name.to_string());
            c
        }
        None => presets::default_config(),
    };
    c.command = std::env::args().collect();
    if let Some(m) = &a.method {
        if !kshot::methods::METHODS.contains(&m.as_str()) {
            bail!("unknown method `{m}`; choose one of: {}", kshot::methods::METHODS.join(", "));
        }
        c.method = m.clone();
    }
    if let Some(d) = &a.dataset {
        // Another dataset than the preset's: its own split, image size and channels.
        let defaults = data::dataset_defaults(d)?;
        if *d != c.data.dataset {
            c.data.dataset = d.clone();
            c.data.split = defaults.split.to_string();
            c.data.image_size = defaults.image_size;
            c.backbone.in_channels = defaults.channels;
        }
    }
    if let Some(s) = &a.split {
        c.data.split = s.clone();
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
    if subsets.val.is_none() {
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
    if let Some(w) = a.train_ways {
        c.train.ways = w;
    }
    if let Some(k) = a.shots {
        // Reptile trains on its own number of shots per class (the official --train-shots).
        if c.method != "reptile" {
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
    if let Some(d) = a.distance {
        c.protonet.distance = match d {
            DistanceArg::Euclidean => Distance::Euclidean,
            DistanceArg::Cosine => Distance::Cosine,
        };
    }
    if let Some(n) = a.checkpoint_every {
        c.checkpoint_every = n.max(1);
    }
    match (a.val_every, &mut c.validation) {
        (Some(0), _) => c.validation = None,
        (Some(n), Some(v)) => v.every = n,
        (Some(n), None) if subsets.val.is_some() => {
            c.validation = Some(Validation { spec: c.test, episodes: 200, every: n });
        }
        _ => {}
    }
    if let (Some(n), Some(v)) = (a.val_episodes, &mut c.validation) {
        v.episodes = n;
    }
    c.backbone.fast_kernels = !a.composite_kernels;
    if let Some(n) = a.meta_batch {
        c.meta_batch = n.max(1);
    }
    c.maml.ways = c.train.ways;
    c.reptile.ways = c.train.ways;
    c.meta_lstm.ways = c.train.ways;
    let reptile_only = [
        ("--inner-batch", a.inner_batch.is_some()),
        ("--inner-batch-test", a.inner_batch_test.is_some()),
        ("--outer-step", a.outer_step.is_some()),
        ("--outer-step-final", a.outer_step_final.is_some()),
        ("--transductive", a.transductive),
    ];
    if let Some((flag, _)) =
        reptile_only.iter().find(|(_, given)| *given).filter(|_| c.method != "reptile")
    {
        bail!("{flag} applies to --method reptile only (this run is {})", c.method);
    }
    match c.method.as_str() {
        "reptile" => {
            let r = &mut c.reptile;
            r.inner_steps = a.inner_steps.unwrap_or(r.inner_steps);
            r.inner_steps_test = a.inner_steps_test.unwrap_or(r.inner_steps_test);
            r.inner_lr = a.inner_lr.unwrap_or(r.inner_lr);
            r.inner_batch = a.inner_batch.unwrap_or(r.inner_batch);
            r.inner_batch_test = a.inner_batch_test.unwrap_or(r.inner_batch_test);
            r.outer_step = a.outer_step.unwrap_or(r.outer_step);
            r.outer_step_final = a.outer_step_final.unwrap_or(r.outer_step_final);
            r.transductive |= a.transductive;
            if r.inner_batch == 0 || r.inner_batch_test == 0 {
                bail!("--inner-batch and --inner-batch-test must be at least 1");
            }
        }
        "meta-lstm" => {
            if a.inner_lr.is_some() {
                bail!("--inner-lr does not apply to meta-lstm: its learning rates are the learned input gates");
            }
            let m = &mut c.meta_lstm;
            m.inner_steps = a.inner_steps.unwrap_or(m.inner_steps);
            m.inner_steps_test = a.inner_steps_test.unwrap_or(m.inner_steps_test);
        }
        _ => {
            if let Some(n) = a.inner_steps {
                c.maml.inner_steps = n;
            }
            if let Some(n) = a.inner_steps_test {
                c.maml.inner_steps_test = n;
            }
            if let Some(lr) = a.inner_lr {
                c.maml.inner_lr = lr;
            }
        }
    }
    c.maml.first_order |= a.first_order || c.method == "fomaml";
    if a.fce {
        c.matching.fce = true;
    }
    if let Some(k) = a.fce_steps {
        c.matching.fce_steps = k;
    }
    if let Some(s) = a.attention_scale {
        c.matching.attention_scale = s;
    }
    if let Some(t) = a.twin {
        c.siamese.twin = match t {
            TwinArg::Conv4 => kshot::methods::siamese::Twin::Conv4,
            TwinArg::Koch => kshot::methods::siamese::Twin::Koch,
        };
    }
    if let Some(h) = a.hidden {
        c.siamese.hidden = h;
    }
    if let Some(p) = a.pairs {
        c.siamese.pairs = p;
    }
    if let Some(f) = a.within_group_negatives {
        c.siamese.within_group_negatives = f;
    }
    if a.no_augment {
        c.siamese.augment = false;
    }
    if let Some(b) = a.batch_size {
        c.baseline.batch_size = b;
    }
    if let Some(e) = a.finetune_epochs {
        c.baseline.finetune_epochs = e;
    }
    Ok(c)
}

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let (run_dir, config, resume) = match &a.resume {
        Some(dir) => {
            let mut c = RunConfig::load(&dir.join(train::CONFIG_FILE))?;
            if let Some(e) = a.episodes {
                c.episodes = e;
                c.save(&dir.join(train::CONFIG_FILE))?;
            }
            (dir.clone(), c, true)
        }
        None => {
            let root = data::resolve_root(a.data_dir.as_deref())?;
            let out = a.out.clone().context("--out RUN_DIR is required")?;
            (out, new_config(&a, &root)?, false)
        }
    };
    let root = data_root_for(a.data_dir.as_deref(), &config)?;
    let d = &config.data;
    eprintln!("loading {}/{} ({}) from {}", d.dataset, d.split, d.train_subset, root.display());
    let train_set = data::load(&root, &d.dataset, &d.split, &d.train_subset, d.image_size)?;
    let val_set = match (&config.validation, data::split_subsets(&d.dataset, &d.split)?.val) {
        (Some(_), Some(val)) => Some(data::load(&root, &d.dataset, &d.split, val, d.image_size)?),
        _ => None,
    };
    // Siamese and Baseline own their training step: pairs and mini-batches, not episodes.
    let unit = match config.method.as_str() {
        "siamese" => format!("training steps of {} same/different pairs", config.siamese.pairs),
        "baseline" | "baseline++" => {
            format!("training mini-batches of {} images", config.baseline.batch_size)
        }
        _ if config.meta_batch > 1 => {
            format!("meta-iterations of {} episodes of {} each", config.meta_batch, config.train)
        }
        _ => format!("training episodes of {}", config.train),
    };
    eprintln!(
        "{} {}: {} classes, {} {unit}; run directory {}",
        if resume { "resuming" } else { "training" },
        config.method,
        train_set.classes.len(),
        config.episodes,
        run_dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
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
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs_f64(minutes * 60.0));
            stop.store(true, Ordering::SeqCst);
        });
    }

    let bar = ProgressBar::new(config.episodes);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} episodes ({eta} left) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let (mut avg_loss, mut avg_acc) = (None::<f64>, None::<f64>);
    let mut last_val = String::new();
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
    bar.finish();
    let per_episode = if summary.episodes_done > 0 {
        summary.seconds / summary.episodes_done as f64
    } else {
        0.0
    };
    eprintln!(
        "{} after {} episodes, {:.1} s of training ({:.3} s per episode); model in {}",
        if summary.interrupted { "stopped" } else { "done" },
        summary.episodes_done,
        summary.seconds,
        per_episode,
        run_dir.join(train::MODEL_FILE).display()
    );
    Ok(())
}

/// `--data-dir` / `$KSHOT_DATA` if given, else the directory the run was trained from.
fn data_root_for(flag: Option<&Path>, config: &RunConfig) -> anyhow::Result<PathBuf> {
    match (flag, &config.data.data_dir) {
        (Some(p), _) => Ok(p.to_path_buf()),
        (None, Some(recorded)) => Ok(PathBuf::from(recorded)),
        (None, None) => data::resolve_root(None),
    }
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    let mut config = RunConfig::load(&a.run.join(train::CONFIG_FILE))?;
    if let Some(t) = a.transductive {
        match config.method.as_str() {
            "reptile" => config.reptile.transductive = t,
            "maml" | "fomaml" => config.maml.transductive = t,
            other => bail!(
                "--transductive applies to reptile, maml and fomaml runs only ({} is a {other} run)",
                a.run.display()
            ),
        }
    }
    let (config, learner) = train::load_learner_with(&a.run, config)?;
    let root = data_root_for(a.data_dir.as_deref(), &config)?;
    if let Some(BenchmarkArg::Lake20way) = a.benchmark {
        return run_lake(&a, &config, learner.as_ref(), &root);
    }
    let d = &config.data;
    let subset = a.subset.clone().unwrap_or_else(|| d.test_subset.clone());
    let set = data::load(&root, &d.dataset, &d.split, &subset, d.image_size)?;
    let spec = EpisodeSpec {
        ways: a.ways.unwrap_or(config.test.ways),
        shots: a.shots.unwrap_or(config.test.shots),
        queries: a.queries.unwrap_or(config.test.queries),
    };
    let episodes = a.episodes.unwrap_or(config.test_episodes);
    let grouping = if a.within_alphabet { Grouping::WithinGroup } else { Grouping::Any };
    let sampler = EpisodeSampler::new(&set, spec, grouping)?;
    let bar = ProgressBar::new(episodes as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} test episodes ({eta} left)",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report = eval::evaluate(learner.as_ref(), &sampler, episodes, a.seed, |n| {
        bar.set_position(n as u64)
    })?;
    bar.finish_and_clear();
    if a.json {
        let json = serde_json::json!({
            "method": config.method,
            "dataset": d.dataset,
            "split": d.split,
            "subset": subset,
            "grouping": grouping,
            "ways": spec.ways,
            "shots": spec.shots,
            "queries": spec.queries,
            "episodes": episodes,
            "seed": a.seed,
            "accuracy": report.accuracy,
            "ci95": report.ci95,
            "seconds": report.seconds,
            "transductive": match config.method.as_str() {
                "reptile" => Some(config.reptile.transductive),
                "maml" | "fomaml" => Some(config.maml.transductive),
                _ => None,
            },
            "run": a.run.display().to_string(),
            "kshot_version": kshot::VERSION,
        });
        println!("{json}");
    } else {
        println!(
            "{} on {}/{} {subset}, {spec}, {episodes} episodes (seed {}): {:.2}% ± {:.2}%",
            config.method,
            d.dataset,
            d.split,
            a.seed,
            100.0 * report.accuracy,
            100.0 * report.ci95
        );
    }
    Ok(())
}

fn run_lake(
    a: &EvalArgs,
    config: &RunConfig,
    learner: &dyn kshot::methods::Learner,
    root: &Path,
) -> anyhow::Result<()> {
    let contaminated = eval::lake_benchmark_ineligibility(config);
    if let Some(why) = &contaminated {
        if !a.allow_contaminated {
            bail!("refusing --benchmark lake-20way: {why}; pass --allow-contaminated to score it anyway");
        }
        eprintln!("WARNING: CONTAMINATED SCORE: {why}");
    }
    let path = data::lake_runs::archive_path(root);
    let runs = data::lake_runs::load(&path)?;
    let report = eval::evaluate_lake(learner, &runs, config.data.image_size)?;
    if a.json {
        let json = serde_json::json!({
            "method": config.method,
            "benchmark": "lake-20way",
            "runs": report.runs.len(),
            "per_run_error": report.runs.iter().map(|r| r.1).collect::<Vec<_>>(),
            "error": report.error / 100.0,
            "accuracy": report.accuracy / 100.0,
            "contaminated": contaminated.is_some(),
            "run": a.run.display().to_string(),
            "kshot_version": kshot::VERSION,
        });
        println!("{json}");
    } else {
        for (name, err) in &report.runs {
            println!(" {name} (error {err:.1}%)");
        }
        println!(
            "{} on Lake's 20-way within-alphabet one-shot benchmark ({} runs): average error {:.2}%, accuracy {:.2}%{}",
            config.method,
            report.runs.len(),
            report.error,
            report.accuracy,
            if contaminated.is_some() { " (CONTAMINATED: not trained on the background alphabets only)" } else { "" }
        );
    }
    Ok(())
}
