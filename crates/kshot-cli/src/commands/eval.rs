//! `kshot eval`: score a trained run on fixed, seeded test episodes, or on Lake's benchmark.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kshot::config::RunConfig;
use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::models::ModelSource;
use kshot::{eval, train};

use super::data_root_for;

#[derive(Args)]
pub struct EvalArgs {
    /// The run directory to score (or --model NAME|RUN_DIR).
    #[arg(long, value_name = "RUN_DIR")]
    run: Option<PathBuf>,
    /// Classes per test episode (default: the run's test protocol, as for the next three).
    #[arg(long)]
    ways: Option<usize>,
    /// Labelled examples per class in each test support set.
    #[arg(long)]
    shots: Option<usize>,
    /// Unlabelled support images per class beside the labelled ones (gnn; default: the run's).
    #[arg(long, value_name = "K'")]
    unlabelled: Option<usize>,
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
    /// MAML: adapt each test task with this many inner steps instead of the run's own.
    #[arg(long, value_name = "N")]
    inner_steps_test: Option<usize>,
    /// MAML: score the same test tasks after 0, 1, …, T inner steps (T: the run's test steps, or
    /// --inner-steps-test) and report every step's accuracy, as cbfinn/maml's test does.
    #[arg(long)]
    each_inner_step: bool,
    /// A built-in model (omniglot, mini-imagenet; see `kshot models`) or a run directory to
    /// score; with --run, which of the run's models: selected (default: the best validation
    /// round's model when the run trained with early stopping, else the last), best, or last.
    #[arg(long, value_name = "MODEL")]
    model: Option<String>,
    /// Score on another dataset than the model's: omniglot, mini-imagenet, or folder (your own
    /// images: --data-dir DIR with one sub-folder per class, all of them test classes unless
    /// --split says otherwise), read the way the model reads images.
    #[arg(long)]
    dataset: Option<String>,
    /// With --dataset: its split (folder: all (default), ratio:TRAIN,VAL,TEST[@SEED] or a spec
    /// file, as `kshot train --split`).
    #[arg(long)]
    split: Option<String>,
    /// Few-shot GAN: fine-tuning steps on each person's shots before rendering (default: the
    /// run's; 0 scores the feed-forward model).
    #[arg(long, value_name = "S")]
    finetune_steps: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchmarkArg {
    #[value(name = "lake-20way")]
    Lake20way,
}

/// What `--run` / `--model` point at.
fn model_source(a: &EvalArgs) -> anyhow::Result<ModelSource> {
    match (&a.run, a.model.as_deref()) {
        (Some(run), choice) => {
            let choice = match choice.unwrap_or("selected") {
                "selected" => train::ModelChoice::Selected,
                "best" => train::ModelChoice::Best,
                "last" => train::ModelChoice::Last,
                other => bail!(
                    "--model {other} with --run: choose selected, best or last (or drop --run to score a built-in model or another run)"
                ),
            };
            Ok(ModelSource::Run { dir: run.clone(), choice })
        }
        (None, Some(spec)) => ModelSource::parse(spec, train::ModelChoice::Selected),
        (None, None) => bail!(
            "say what to score: --run RUN_DIR, or --model with a built-in model ({}) or a run directory",
            kshot::models::all().iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let source = model_source(&a)?;
    let label = source.describe();
    let mut config = source.config()?;
    if let Some(t) = a.transductive {
        let method = config.method.name();
        match config.method.transductive_mut() {
            Some(slot) => *slot = t,
            None => bail!(
                "--transductive applies to methods whose test queries can share batch statistics (reptile, maml, fomaml); {label} is a {method} run"
            ),
        }
    }
    let method = config.method.name();
    let own_steps = match (config.method.test_steps_mut(), a.inner_steps_test, a.each_inner_step) {
        (Some(slot), Some(n), _) => {
            *slot = n;
            Some(n)
        }
        (Some(slot), None, _) => Some(*slot),
        (None, None, false) => None,
        (None, _, _) => bail!(
            "--inner-steps-test and --each-inner-step apply to methods that adapt by inner steps (maml, fomaml); {label} is a {method} run"
        ),
    };
    let model_name = match &source {
        ModelSource::Run { dir, choice } => {
            train::model_path(dir, *choice)?.file_name().map(|n| n.to_string_lossy().to_string())
        }
        ModelSource::Builtin(m) => Some(format!("built-in:{}", m.name)),
    };
    let (config, learner) = source.load_with(config)?;
    let channels = config.backbone.in_channels();
    // Another dataset than the model's is read the way the model reads images.
    let data = match &a.dataset {
        None => config.data.clone(),
        Some(dataset) => {
            let mut d = config.data.clone();
            let defaults = data::dataset_defaults(dataset)?;
            if *dataset != d.dataset && *dataset != "folder" {
                d.resize = Default::default();
                d.invert = true;
                anyhow::ensure!(
                    defaults.channels == channels,
                    "{label} reads {channels}-channel images; {dataset} has {}",
                    defaults.channels
                );
            }
            d.split = a.split.clone().unwrap_or_else(|| {
                if *dataset == "folder" {
                    "all".into()
                } else {
                    defaults.split.into()
                }
            });
            d.test_subset = data::split_subsets(dataset, &d.split)?.test.to_string();
            d.dataset = dataset.clone();
            d.task_rotations = false;
            d
        }
    };
    if a.split.is_some() && a.dataset.is_none() {
        bail!("--split goes with --dataset (the model's own split is {})", config.data.split);
    }
    let root = match (&a.dataset, a.data_dir.as_deref()) {
        (Some(_), Some(dir)) => dir.to_path_buf(),
        (Some(_), None) => bail!("--dataset needs --data-dir DIR (or KSHOT_DATA)"),
        (None, dir) => data_root_for(dir, &config)?,
    };
    if let Some(generator) = learner.generator() {
        return run_generation(&a, &config, generator, &root, &label);
    }
    if a.finetune_steps.is_some() {
        bail!("--finetune-steps applies to few-shot generators (fewshot-gan); {label} is a {method} run");
    }
    if let Some(BenchmarkArg::Lake20way) = a.benchmark {
        return run_lake(&a, &config, learner.as_ref(), &root, model_name.as_deref(), &label);
    }
    let d = &data;
    let subset = a.subset.clone().unwrap_or_else(|| d.test_subset.clone());
    let set = if d.dataset == "folder" && config.data.dataset != "folder" {
        // A folder read through the model's own pixel pipeline.
        let pipeline = data::images::Pipeline::of_run(&config.data, channels)?;
        data::folder::load(&root, &d.split, &subset, &pipeline)?
    } else {
        data::load_data(&root, d, &subset, channels)?
    };
    let fingerprint = set.fingerprint();
    let data_root = std::path::absolute(&root).unwrap_or(root.clone()).display().to_string();
    let spec = EpisodeSpec {
        ways: a.ways.unwrap_or(config.test.ways),
        shots: a.shots.unwrap_or(config.test.shots),
        queries: a.queries.unwrap_or(config.test.queries),
        unlabelled: a.unlabelled.unwrap_or(config.test.unlabelled),
    };
    let episodes = a.episodes.unwrap_or(config.test_episodes);
    let grouping = if a.within_alphabet { Grouping::WithinGroup } else { Grouping::Any };
    let skipped = skipped_groups(&set, grouping, spec.ways);
    if let Some(note) = &skipped {
        eprintln!("note: {note}");
    }
    let sampler =
        EpisodeSampler::new(&set, spec, grouping)?.with_task_rotations(d.task_rotations)?;
    if a.each_inner_step {
        let last = own_steps.unwrap_or(0);
        let mut rows = Vec::new();
        for steps in 0..=last {
            let mut c = config.clone();
            *c.method.test_steps_mut().expect("checked above") = steps;
            let (_, learner) = source.load_with(c)?;
            let report = score(learner.as_ref(), &sampler, episodes, a.seed)?;
            if !a.json {
                println!(
                    "{method} after {steps} inner steps: {:.2}% ± {:.2}%",
                    100.0 * report.accuracy,
                    100.0 * report.ci95
                );
            }
            rows.push(serde_json::json!({
                "inner_steps": steps, "accuracy": report.accuracy, "ci95": report.ci95,
                "seconds": report.seconds,
            }));
        }
        if a.json {
            let json = serde_json::json!({
                "method": method, "dataset": d.dataset, "split": d.split, "subset": subset,
                "task_rotations": d.task_rotations, "ways": spec.ways, "shots": spec.shots,
                "queries": spec.queries, "episodes": episodes, "seed": a.seed,
                "each_inner_step": rows, "run": label, "model": model_name,
                "data_root": data_root, "data_fingerprint": fingerprint,
                "kshot_version": kshot::VERSION,
            });
            println!("{json}");
        }
        return Ok(());
    }
    let report = score(learner.as_ref(), &sampler, episodes, a.seed)?;
    if a.json {
        let mut json = serde_json::json!({
            "method": config.method.name(),
            "dataset": d.dataset,
            "split": d.split,
            "subset": subset,
            "grouping": grouping,
            "task_rotations": d.task_rotations,
            "inner_steps_test": own_steps,
            "ways": spec.ways,
            "shots": spec.shots,
            "queries": spec.queries,
            "episodes": episodes,
            "seed": a.seed,
            "accuracy": report.accuracy,
            "ci95": report.ci95,
            "unlabelled": spec.unlabelled,
            "labelled_only": report.labelled_only,
            "per_instance_accuracy": report.per_instance.as_ref().map(|p| &p.per_instance_accuracy),
            "per_instance_ci95": report.per_instance.as_ref().map(|p| &p.per_instance_ci95),
            "seconds": report.seconds,
            "transductive": config.clone().method.transductive_mut().map(|t| *t),
            "run": label,
            "model": model_name,
            "data_root": data_root,
            "data_fingerprint": fingerprint,
            "groups_skipped": skipped,
            "kshot_version": kshot::VERSION,
        });
        if report.per_instance.is_none() {
            if let Some(o) = json.as_object_mut() {
                o.remove("per_instance_accuracy");
                o.remove("per_instance_ci95");
            }
        }
        println!("{json}");
    } else {
        println!(
            "{} ({label}) on {}/{} {subset} at {data_root} (data {fingerprint}), {spec}, {episodes} episodes (seed {}): {:.2}% ± {:.2}%",
            config.method.name(),
            d.dataset,
            d.split,
            a.seed,
            100.0 * report.accuracy,
            100.0 * report.ci95
        );
        if let Some(l) = report.labelled_only {
            println!(
                "  the same episodes without their unlabelled images ({}-shot labelled only): {:.2}% ± {:.2}%",
                spec.shots,
                100.0 * l.accuracy,
                100.0 * l.ci95
            );
        }
        if let Some(p) = &report.per_instance {
            let cells: Vec<String> = p
                .per_instance_accuracy
                .iter()
                .zip(&p.per_instance_ci95)
                .enumerate()
                .map(|(k, (a, c))| format!("{}: {:.1} ± {:.1}", k + 1, 100.0 * a, 100.0 * c))
                .collect();
            println!("  online, by presentation of a class (%): {}", cells.join(", "));
        }
    }
    Ok(())
}

/// Scores `episodes` test episodes with a progress bar.
fn score(
    learner: &dyn kshot::methods::Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
) -> anyhow::Result<eval::EvalReport> {
    let bar = ProgressBar::new(episodes as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} test episodes ({eta} left)",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report = eval::evaluate(learner, sampler, episodes, seed, |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    Ok(report)
}

/// A note naming the groups that within-group episodes cannot use (fewer classes than ways).
fn skipped_groups(set: &data::ImageSet, grouping: Grouping, ways: usize) -> Option<String> {
    if grouping != Grouping::WithinGroup {
        return None;
    }
    let groups = set.groups();
    let small: Vec<String> = groups
        .iter()
        .filter(|(_, c)| c.len() < ways)
        .map(|(g, c)| format!("{} ({})", if g.is_empty() { "(no group)" } else { g }, c.len()))
        .collect();
    (!small.is_empty()).then(|| {
        format!(
            "{} of {} groups have fewer than {ways} classes and are skipped by within-group episodes: {}",
            small.len(),
            groups.len(),
            small.join(", ")
        )
    })
}

fn run_lake(
    a: &EvalArgs,
    config: &RunConfig,
    learner: &dyn kshot::methods::Learner,
    root: &Path,
    model_name: Option<&str>,
    label: &str,
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
            "method": config.method.name(),
            "benchmark": "lake-20way",
            "runs": report.runs.len(),
            "per_run_error": report.runs.iter().map(|r| r.1).collect::<Vec<_>>(),
            "error": report.error / 100.0,
            "accuracy": report.accuracy / 100.0,
            "contaminated": contaminated.is_some(),
            "run": label,
            "model": model_name,
            "kshot_version": kshot::VERSION,
        });
        println!("{json}");
    } else {
        for (name, err) in &report.runs {
            println!(" {name} (error {err:.1}%)");
        }
        println!(
            "{} on Lake's 20-way within-alphabet one-shot benchmark ({} runs): average error {:.2}%, accuracy {:.2}%{}",
            config.method.name(),
            report.runs.len(),
            report.error,
            report.accuracy,
            if contaminated.is_some() { " (CONTAMINATED: not trained on the background alphabets only)" } else { "" }
        );
    }
    Ok(())
}

/// `kshot eval` of a few-shot generator: every held-out person with T shots, against the
/// baselines.
fn run_generation(
    a: &EvalArgs,
    config: &RunConfig,
    generator: &dyn kshot::methods::FewShotGenerator,
    root: &Path,
    label: &str,
) -> anyhow::Result<()> {
    use kshot::data::orl;
    let shots = a.shots.unwrap_or(config.test.shots);
    let steps = a.finetune_steps.unwrap_or(generator.default_finetune_steps());
    let run_dir = a
        .run
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("score a few-shot generator with --run RUN_DIR"))?;
    let faces = orl::load_orl(root, generator.image_size())?;
    let subset = |people: Vec<String>| orl::Faces {
        size: faces.size,
        faces: faces.faces.iter().filter(|f| people.contains(&f.person)).cloned().collect(),
    };
    let judges =
        kshot::generate::judges_for_run(run_dir, &subset(orl::meta_train_people()), |m| {
            eprintln!("{m}")
        })?;
    let held_out = subset(orl::held_out_people());
    let bar = ProgressBar::new(held_out.people().len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} people ({eta} left) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let report =
        kshot::generate::evaluate(generator, &held_out, &judges, shots, steps, a.seed, |p| {
            bar.set_message(p.to_string());
            bar.inc(1);
        })?;
    bar.finish_and_clear();
    if a.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some(o) = json.as_object_mut() {
            o.insert("method".into(), config.method.name().into());
            o.insert("run".into(), label.into());
            o.insert("kshot_version".into(), kshot::VERSION.into());
        }
        println!("{json}");
    } else {
        println!(
            "{} ({label}) on {} held-out people, {shots} shots, {steps} fine-tuning steps, {} images (seed {}):",
            config.method.name(),
            report.people.len(),
            report.images,
            a.seed
        );
        println!(
            "  {:<16} {:>7} {:>7} {:>7} {:>13} {:>9} {:>14}",
            "", "SSIM", "L1", "PSNR", "landmark NME", "identity", "identity other"
        );
        for (name, s) in [
            ("model", &report.model),
            ("nearest support", &report.nearest_support),
            ("support mean", &report.support_mean),
            ("real (judges)", &report.real),
        ] {
            println!(
                "  {name:<16} {:>7.4} {:>7.4} {:>7.2} {:>13.4} {:>9.4} {:>14.4}",
                s.ssim,
                s.l1,
                s.psnr,
                s.landmark_nme,
                s.identity_similarity,
                s.identity_similarity_other
            );
        }
    }
    Ok(())
}
