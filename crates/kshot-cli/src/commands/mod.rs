//! Subcommands, one file each: each parses flags into library types and calls the library.

mod calibrate;
mod data;
mod embed;
mod eval;
mod generate;
mod models;
mod plot;
mod predict;
mod predict_grid;
mod train;

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Parser, Subcommand};
use kshot::config::RunConfig;

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
    /// Which class is this image? Classify query images against a support folder of labelled
    /// examples (one sub-folder per class) with a built-in or trained model.
    Predict(predict::PredictArgs),
    /// List the built-in models: how each was trained, its preprocessing and its scores.
    Models(models::ModelsArgs),
    /// Write a model's embeddings of images (safetensors or .npy, with the file names).
    Embed(embed::EmbedArgs),
    /// Fit a run's probability temperature on validation episodes (for predict --reject-below).
    Calibrate(calibrate::CalibrateArgs),
    /// Meta-train a learner (or continue one with --resume).
    Train(Box<train::TrainArgs>),
    /// Score a trained run on fixed, seeded test episodes: mean accuracy ± 95% CI.
    Eval(eval::EvalArgs),
    /// Render a person's face in new poses from a few shots (a few-shot GAN run).
    Generate(generate::GenerateArgs),
    /// Download and verify datasets.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// List the paper protocols that --preset accepts.
    Presets,
    /// Time the training, prediction and evaluation workloads, side by side with the PyTorch
    /// reference (--pytorch PYTHON).
    Bench(crate::bench::BenchArgs),
    /// Draw a run's learning curves (metrics.csv) as a PNG.
    Plot(plot::PlotArgs),
}

/// Runs the parsed command; `matches` tells which flags were given on the command line.
pub fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => {
            let given = matches.subcommand_matches("train").expect("the train subcommand");
            train::run(*args, given)
        }
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Models(args) => models::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Data { command } => data::run(command),
        Command::Bench(args) => crate::bench::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Presets => {
            for p in kshot::presets::all() {
                println!("{:<30} {}", p.name, p.summary);
            }
            Ok(())
        }
    }
}

/// The flags (by clap id) given on the command line, as opposed to defaults or the environment.
fn given_flags(matches: &ArgMatches) -> Vec<String> {
    matches
        .ids()
        .filter(|id| {
            matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|id| id.to_string())
        .collect()
}

/// `--flag-name` for a clap id.
fn flag(id: &str) -> String {
    format!("--{}", id.replace('_', "-"))
}

/// `--data-dir` / `$KSHOT_DATA` if given, else the directory the run was trained from. A folder
/// run reads its own folder: `$KSHOT_DATA` (the Omniglot / miniImageNet root) does not replace it,
/// only an explicit `--data-dir` does.
fn data_root_for(flag: Option<&Path>, config: &RunConfig) -> anyhow::Result<PathBuf> {
    let from_env = flag.is_some()
        && std::env::var_os(kshot::data::DATA_ENV).map(PathBuf::from).as_deref() == flag;
    match (flag, &config.data.data_dir) {
        (Some(_), Some(recorded)) if from_env && config.data.dataset == "folder" => {
            Ok(PathBuf::from(recorded))
        }
        (Some(p), _) => Ok(p.to_path_buf()),
        (None, Some(recorded)) => Ok(PathBuf::from(recorded)),
        (None, None) => kshot::data::resolve_root(None),
    }
}
