//! Evaluation on a fixed, seeded set of episodes: mean accuracy ± 95% confidence interval.

use candle_core::{Device, Result};
use serde::Serialize;

use crate::data::{EpisodeSampler, EpisodeSpec};
use crate::methods::Learner;
use crate::nn::ops;

/// Mean and 95% confidence half-width 1.96 · s / √n, with s the sample standard deviation
/// (n − 1 in the denominator). Fewer than two values give a half-width of 0.
pub fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, 1.96 * var.sqrt() / (n as f64).sqrt())
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    #[serde(flatten)]
    pub spec: EpisodeSpec,
    pub episodes: usize,
    /// Mean per-episode accuracy, a fraction in [0, 1].
    pub accuracy: f64,
    /// 95% confidence half-width of `accuracy`, a fraction.
    pub ci95: f64,
    pub seconds: f64,
    #[serde(skip)]
    pub per_episode: Vec<f64>,
}

/// Scores `learner` on episodes 0..`episodes` of `sampler` under `seed`; `on_episode` is called
/// after each with the number done.
pub fn evaluate(
    learner: &dyn Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
    mut on_episode: impl FnMut(usize),
) -> Result<EvalReport> {
    crate::autograd::init();
    let start = std::time::Instant::now();
    let device = Device::Cpu;
    let mut per_episode = Vec::with_capacity(episodes);
    for i in 0..episodes {
        let ep = sampler.episode(seed, i as u64, &device)?;
        let classifier = learner.adapt(&ep.support, &ep.support_labels, ep.spec.ways)?;
        let logits = classifier.logits(&ep.query)?;
        per_episode.push(ops::accuracy(&logits, &ep.query_labels_tensor()?)?);
        on_episode(i + 1);
    }
    let (accuracy, ci95) = mean_ci95(&per_episode);
    Ok(EvalReport {
        spec: sampler.spec(),
        episodes,
        accuracy,
        ci95,
        seconds: start.elapsed().as_secs_f64(),
        per_episode,
    })
}
