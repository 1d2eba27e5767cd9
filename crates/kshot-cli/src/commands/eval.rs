//! `kshot eval`: score a trained run on fixed, seeded test episodes, or on Lake's benchmark.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kshot::config::RunConfig;
use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::{eval, train};

use super::data_root_for;

#[derive(Args)]
pub struct EvalArgs {
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
    /// MAML: adapt each test task with this many inner steps instead of the run's own.
    #[arg(long, value_name = "N")]
    inner_steps_test: Option<usize>,
    /// MAML: score the same test tasks after 0, 1, …, T inner steps (T: the run's test steps, or
    /// --inner-steps-test) and report every step's accuracy, as cbfinn/maml's test does.
    #[arg(long)]
    each_inner_step: bool,
    /// Which model of the run to score: selected (default: the best validation round's model
    /// when the run trained with early stopping, else the last), best, or last.
    #[arg(long, value_enum, default_value = "selected")]
    model: ModelArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModelArg {
    Selected,
    Best,
    Last,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchmarkArg {
    #[value(name = "lake-20way")]
    Lake20way,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let mut config = RunConfig::load(&a.run.join(train::CONFIG_FILE))?;
    if let Some(t) = a.transductive {
        let method = config.method.name();
        match config.method.transductive_mut() {
            Some(slot) => *slot = t,
            None => bail!(
                "--transductive applies to methods whose test queries can share batch statistics (reptile, maml, fomaml); {} is a {method} run",
                a.run.display()
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
            "--inner-steps-test and --each-inner-step apply to methods that adapt by inner steps (maml, fomaml); {} is a {method} run",
            a.run.display()
        ),
    };
    let choice = match a.model {
        ModelArg::Selected => train::ModelChoice::Selected,
        ModelArg::Best => train::ModelChoice::Best,
        ModelArg::Last => train::ModelChoice::Last,
    };
    let model_file = train::model_path(&a.run, choice)?;
    let (config, learner) = train::load_model(&a.run, config, choice)?;
    let model_name = model_file.file_name().map(|n| n.to_string_lossy().to_string());
    let root = data_root_for(a.data_dir.as_deref(), &config)?;
    if let Some(BenchmarkArg::Lake20way) = a.benchmark {
        return run_lake(&a, &config, learner.as_ref(), &root, model_name.as_deref());
    }
    let d = &config.data;
    let subset = a.subset.clone().unwrap_or_else(|| d.test_subset.clone());
    let set =
        data::load_with_pixels(&root, &d.dataset, &d.split, &subset, d.image_size, d.pixels())?;
    let spec = EpisodeSpec {
        ways: a.ways.unwrap_or(config.test.ways),
        shots: a.shots.unwrap_or(config.test.shots),
        queries: a.queries.unwrap_or(config.test.queries),
    };
    let episodes = a.episodes.unwrap_or(config.test_episodes);
    let grouping = if a.within_alphabet { Grouping::WithinGroup } else { Grouping::Any };
    let sampler =
        EpisodeSampler::new(&set, spec, grouping)?.with_task_rotations(d.task_rotations)?;
    if a.each_inner_step {
        let last = own_steps.unwrap_or(0);
        let mut rows = Vec::new();
        for steps in 0..=last {
            let mut c = config.clone();
            *c.method.test_steps_mut().expect("checked above") = steps;
            let (_, learner) = train::load_model(&a.run, c, choice)?;
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
                "each_inner_step": rows, "run": a.run.display().to_string(), "model": model_name,
                "kshot_version": kshot::VERSION,
            });
            println!("{json}");
        }
        return Ok(());
    }
    let report = score(learner.as_ref(), &sampler, episodes, a.seed)?;
    if a.json {
        let json = serde_json::json!({
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
            "seconds": report.seconds,
            "transductive": config.clone().method.transductive_mut().map(|t| *t),
            "run": a.run.display().to_string(),
            "model": model_name,
            "kshot_version": kshot::VERSION,
        });
        println!("{json}");
    } else {
        println!(
            "{} on {}/{} {subset}, {spec}, {episodes} episodes (seed {}): {:.2}% ± {:.2}%",
            config.method.name(),
            d.dataset,
            d.split,
            a.seed,
            100.0 * report.accuracy,
            100.0 * report.ci95
        );
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

fn run_lake(
    a: &EvalArgs,
    config: &RunConfig,
    learner: &dyn kshot::methods::Learner,
    root: &Path,
    model_name: Option<&str>,
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
            "run": a.run.display().to_string(),
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
