//! `kshot predict --grid`: the support images by class and each query with its prediction.

use std::path::{Path, PathBuf};

use kshot::data::images::Pipeline;
use kshot::plot::{prediction_grid, GridQuery, PlotImage};
use kshot::predict::{Prediction, Support};

/// Queries drawn at most (the rest are still printed).
const MAX_QUERIES: usize = 64;

fn image(pixels: &[u8], pipeline: &Pipeline) -> PlotImage {
    PlotImage {
        pixels: pixels.to_vec(),
        channels: pipeline.channels,
        height: pipeline.size,
        width: pipeline.size,
    }
}

/// Draws what the model saw: its preprocessed inputs.
pub fn draw(
    out: &Path,
    support: &Support,
    pipeline: &Pipeline,
    queries: &[PathBuf],
    predictions: &[Prediction],
) -> anyhow::Result<()> {
    let n = pipeline.image_len();
    let mut offset = 0;
    let mut rows = Vec::new();
    for (class, files) in support.classes.iter().zip(&support.files) {
        let images = (0..files.len())
            .map(|i| image(&support.pixels[(offset + i) * n..(offset + i + 1) * n], pipeline))
            .collect();
        offset += files.len();
        rows.push((class.clone(), images));
    }
    let mut drawn = Vec::new();
    for (file, p) in queries.iter().zip(predictions).take(MAX_QUERIES) {
        let pixels = pipeline.load(file)?;
        let label = match p.class {
            Some(c) => format!("{} {:.2}", support.classes[c], p.probabilities[c]),
            None => format!("none ({} {:.2})", support.classes[p.best], p.probabilities[p.best]),
        };
        // A query in a folder named after a class is marked right or wrong.
        let truth = file.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str());
        let correct = truth
            .filter(|t| support.classes.iter().any(|c| c == t))
            .map(|t| p.class.is_some_and(|c| support.classes[c] == t));
        drawn.push(GridQuery { image: image(&pixels, pipeline), label, correct });
    }
    prediction_grid(&rows, &drawn, out)
}
