//! "Which of these classes is this image?": a support folder of labelled images adapts a trained
//! learner ([`Learner::adapt`], the inference path of every method), and each query image gets a
//! probability for every class, optionally rejected as none of them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::calibration;
use crate::data::folder;
use crate::data::images::Pipeline;
use crate::methods::Learner;

/// The labelled images of a prediction task, as the model sees them.
#[derive(Debug, Clone)]
pub struct Support {
    /// Class names (the sub-folder names), in label order.
    pub classes: Vec<String>,
    /// The image files of each class.
    pub files: Vec<Vec<PathBuf>>,
    /// Preprocessed pixels, class after class, image after image ([C, H, W] u8 each).
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Support {
    /// `dir` holds one sub-folder per class with one or more images each (or, as a folder
    /// dataset, groups of class folders).
    pub fn load(dir: &Path, pipeline: &Pipeline) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "--support {}: not a folder; it should hold one sub-folder of labelled images per class",
                dir.display()
            );
        }
        let classes = folder::scan(dir)?;
        if classes.len() < 2 {
            bail!(
                "--support {} has 1 class folder; a prediction needs at least 2 classes, one sub-folder of images each",
                dir.display()
            );
        }
        let set = folder::decode(&dir.display().to_string(), &classes, pipeline)?;
        let labels = (0..set.classes.len())
            .flat_map(|l| std::iter::repeat_n(l as u32, set.num_images(l)))
            .collect();
        Ok(Support {
            pixels: set.classes.iter().flat_map(|c| c.pixels.iter().copied()).collect(),
            labels,
            classes: classes.iter().map(|c| c.name.clone()).collect(),
            files: classes.into_iter().map(|c| c.files).collect(),
        })
    }

    pub fn ways(&self) -> usize {
        self.classes.len()
    }
}

/// The prediction for one query image.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub query: PathBuf,
    /// The most probable class's label, or `None` when its probability is below the rejection
    /// threshold ("none of these").
    pub class: Option<usize>,
    /// The most probable class's label, whether or not it was rejected.
    pub best: usize,
    /// One probability per class, in label order; they sum to 1.
    pub probabilities: Vec<f64>,
}

/// u8 pixels of `n` images as a [n, C, H, W] f32 tensor in [0, 1].
pub fn tensor(pixels: &[u8], pipeline: &Pipeline) -> Result<Tensor> {
    let n = pixels.len() / pipeline.image_len();
    let data: Vec<f32> = pixels.iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_vec(data, (n, pipeline.channels, pipeline.size, pipeline.size), &Device::Cpu)?)
}

/// Images decoded and scored in one forward pass at most.
pub const BATCH: usize = 256;

/// Decodes `files` in parallel through `pipeline` into one [n, C, H, W] tensor.
pub fn load_batch(files: &[PathBuf], pipeline: &Pipeline) -> Result<Tensor> {
    let pixels: Vec<Vec<u8>> = files.par_iter().map(|f| pipeline.load(f)).collect::<Result<_>>()?;
    tensor(&pixels.concat(), pipeline)
}

/// Adapts `learner` to `support` once and scores every query file: probabilities are
/// softmax(logits / `temperature`); a query whose top probability is below `reject_below` is
/// rejected. Query files are decoded in parallel, a batch at a time.
pub fn predict(
    learner: &dyn Learner,
    support: &Support,
    queries: &[PathBuf],
    pipeline: &Pipeline,
    temperature: f64,
    reject_below: Option<f64>,
) -> Result<Vec<Prediction>> {
    crate::autograd::init();
    let classifier =
        learner.adapt(&tensor(&support.pixels, pipeline)?, &support.labels, support.ways())?;
    let mut out = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(BATCH) {
        let logits = classifier.logits(&load_batch(chunk, pipeline)?)?.to_vec2::<f32>()?;
        for (query, row) in chunk.iter().zip(logits) {
            let probabilities = calibration::softmax(&row, temperature);
            let best = probabilities
                .iter()
                .enumerate()
                .fold((0, f64::NEG_INFINITY), |b, (i, &p)| if p > b.1 { (i, p) } else { b })
                .0;
            let rejected = reject_below.is_some_and(|t| probabilities[best] < t);
            out.push(Prediction {
                query: query.clone(),
                class: (!rejected).then_some(best),
                best,
                probabilities,
            });
        }
    }
    Ok(out)
}
