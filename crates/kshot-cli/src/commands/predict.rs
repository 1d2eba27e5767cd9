//! `kshot predict`: which class of a support folder is each query image?

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use kshot::data::images::{self, Pipeline};
use kshot::models::ModelSource;
use kshot::predict::{self, Prediction, Support};
use kshot::train::ModelChoice;

#[derive(Args)]
pub struct PredictArgs {
    /// A built-in model (omniglot: handwritten characters and symbols, the default;
    /// mini-imagenet: photos; see `kshot models`) or a trained run directory.
    #[arg(long, default_value = kshot::models::DEFAULT, value_name = "NAME|RUN_DIR")]
    model: String,
    /// The labelled examples: one sub-folder per class (its name is the class), 1 or more
    /// images each.
    #[arg(long, value_name = "DIR")]
    support: PathBuf,
    /// Images to classify: files and/or folders (searched recursively).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    query: Vec<PathBuf>,
    /// Print JSON Lines, one object per query: {"query", "class", "probabilities"}.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV: query, class, then one probability column per class.
    #[arg(long)]
    csv: bool,
    /// Answer "none of these" (class null / empty) when the most probable class has a
    /// calibrated probability below P.
    #[arg(long, value_name = "P")]
    reject_below: Option<f64>,
    /// Use the model's raw softmax instead of its calibrated probabilities (temperature fitted
    /// on validation episodes; `kshot calibrate`).
    #[arg(long)]
    uncalibrated: bool,
    /// Also draw the support images by class and each query with its prediction as a PNG.
    #[arg(long, value_name = "FILE.png")]
    grid: Option<PathBuf>,
}

/// The label a query's prediction prints as.
pub const NONE_OF_THESE: &str = "none of these";

pub fn run(a: PredictArgs) -> anyhow::Result<()> {
    if let Some(p) = a.reject_below {
        if !(0.0..=1.0).contains(&p) {
            bail!("--reject-below {p}: a probability threshold is between 0 and 1");
        }
    }
    let source = ModelSource::parse(&a.model, ModelChoice::Selected)?;
    let mut config = source.config()?;
    // Each query is scored on its own: its answer must not depend on the other queries.
    if let Some(t) = config.method.transductive_mut() {
        *t = false;
    }
    let (config, learner) = source.load_with(config)?;
    if learner.generator().is_some() {
        bail!("this model is a few-shot face generator, not a classifier: render faces with `kshot generate --run RUN`");
    }
    let pipeline = Pipeline::of_run(&config.data, config.backbone.in_channels())?;
    let support = Support::load(&a.support, &pipeline)?;
    let queries = images::collect_files(&a.query)?;
    let calibration = if a.uncalibrated { None } else { source.calibration()? };
    let temperature = calibration.map_or(1.0, |c| c.temperature);
    let predictions = predict::predict(
        learner.as_ref(),
        &support,
        &queries,
        &pipeline,
        temperature,
        a.reject_below,
    )?;
    if a.json {
        for p in &predictions {
            println!("{}", json_line(p, &support));
        }
    } else if a.csv {
        print_csv(&predictions, &support);
    } else {
        let shots: usize = support.files.iter().map(Vec::len).sum();
        eprintln!(
            "{} ({}): {} classes, {shots} support images, {} queries; {}",
            source.describe(),
            config.method.name(),
            support.ways(),
            queries.len(),
            match (calibration, a.uncalibrated) {
                (Some(c), _) =>
                    format!("probabilities calibrated (temperature {:.2})", c.temperature),
                (None, true) => "raw softmax probabilities (--uncalibrated)".into(),
                (None, false) => {
                    "raw softmax probabilities (no calibration.json: run `kshot calibrate`)".into()
                }
            }
        );
        print_table(&predictions, &support);
    }
    if let Some(out) = &a.grid {
        crate::commands::predict_grid::draw(out, &support, &pipeline, &queries, &predictions)?;
        eprintln!("grid written to {}", out.display());
    }
    Ok(())
}

fn class_name(p: &Prediction, support: &Support) -> Option<String> {
    p.class.map(|c| support.classes[c].clone())
}

fn json_line(p: &Prediction, support: &Support) -> serde_json::Value {
    let probabilities: serde_json::Map<String, serde_json::Value> = support
        .classes
        .iter()
        .zip(&p.probabilities)
        .map(|(c, &v)| (c.clone(), serde_json::json!(v)))
        .collect();
    serde_json::json!({
        "query": p.query.display().to_string(),
        "class": class_name(p, support),
        "probabilities": probabilities,
    })
}

/// A CSV field, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn print_csv(predictions: &[Prediction], support: &Support) {
    let header: Vec<String> = ["query".to_string(), "class".to_string()]
        .into_iter()
        .chain(support.classes.iter().map(|c| format!("p_{c}")))
        .map(|h| csv_field(&h))
        .collect();
    println!("{}", header.join(","));
    for p in predictions {
        let mut row = vec![
            csv_field(&p.query.display().to_string()),
            csv_field(&class_name(p, support).unwrap_or_default()),
        ];
        row.extend(p.probabilities.iter().map(|v| format!("{v:.6}")));
        println!("{}", row.join(","));
    }
}

fn print_table(predictions: &[Prediction], support: &Support) {
    let width =
        predictions.iter().map(|p| p.query.display().to_string().len()).max().unwrap_or(5).max(5);
    for p in predictions {
        let mut ranked: Vec<(usize, f64)> = p.probabilities.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let answer = match p.class {
            Some(c) => format!("{} {:.2}", support.classes[c], p.probabilities[c]),
            None => format!(
                "{NONE_OF_THESE} (best: {} {:.2})",
                support.classes[p.best], p.probabilities[p.best]
            ),
        };
        let others: Vec<String> = ranked
            .iter()
            .filter(|(c, _)| Some(*c) != p.class && *c != p.best)
            .take(3)
            .map(|&(c, v)| format!("{} {v:.2}", support.classes[c]))
            .collect();
        println!(
            "{:<width$}  {answer}{}",
            p.query.display().to_string(),
            if others.is_empty() {
                String::new()
            } else {
                format!("   (then {})", others.join(", "))
            }
        );
    }
}
