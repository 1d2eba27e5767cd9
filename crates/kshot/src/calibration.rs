//! Probabilities a user can act on: temperature scaling (Guo, Pleiss, Sun & Weinberger 2017) of a
//! learner's query logits, fitted on validation episodes, and the expected calibration error.
//!
//! A few-shot classifier's softmax is rarely calibrated (ProtoNet's squared distances make it
//! over-confident); one scalar T, p = softmax(logits / T), fitted to minimise the negative
//! log-likelihood on held-out episodes, fixes most of it without changing any prediction.
//! `kshot predict --reject-below P` thresholds these probabilities.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::EpisodeSampler;
use crate::methods::Learner;

/// The file in a run directory that holds its fitted temperature.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// A fitted temperature and what it does on the episodes it was fitted on and on others.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub temperature: f64,
    /// Episodes and queries the temperature was fitted on.
    pub episodes: usize,
    pub queries: usize,
    /// Mean negative log-likelihood and expected calibration error (15 bins) before (T = 1)
    /// and after scaling, on the fitting episodes.
    pub nll_before: f64,
    pub nll_after: f64,
    pub ece_before: f64,
    pub ece_after: f64,
}

impl Calibration {
    /// A run's calibration, if it has one.
    pub fn of_run(run_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = run_dir.join(CALIBRATION_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)?;
        let c = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a calibration file ({e}); delete it and run `kshot calibrate` again",
                path.display()
            )
        })?;
        Ok(Some(c))
    }

    pub fn save(&self, run_dir: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::checkpoint::write_atomic(&run_dir.join(CALIBRATION_FILE), text.as_bytes())
    }
}

/// Query logits (one row per query) and labels of episodes 0..`episodes` under `seed`.
pub fn collect_logits(
    learner: &dyn Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
) -> anyhow::Result<(Vec<Vec<f32>>, Vec<u32>)> {
    crate::autograd::init();
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    for i in 0..episodes {
        let ep = sampler.episode(seed, i as u64, &Device::Cpu)?;
        let classifier = learner.adapt(&ep.support, &ep.support_labels, ep.spec.ways)?;
        rows.extend(classifier.logits(&ep.query)?.to_vec2::<f32>()?);
        labels.extend_from_slice(&ep.query_labels);
    }
    Ok((rows, labels))
}

/// softmax(logits / t) in f64.
pub fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 / t - max).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// Mean negative log-likelihood of the labels under softmax(logits / t).
pub fn nll(logits: &[Vec<f32>], labels: &[u32], t: f64) -> f64 {
    let total: f64 = logits
        .iter()
        .zip(labels)
        .map(|(row, &y)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
            let lse = row.iter().map(|&v| (v as f64 / t - max).exp()).sum::<f64>().ln() + max;
            lse - row[y as usize] as f64 / t
        })
        .sum();
    total / logits.len().max(1) as f64
}

/// Expected calibration error: the confidence-weighted gap between confidence and accuracy over
/// 15 equal-width bins of the top probability.
pub fn expected_calibration_error(logits: &[Vec<f32>], labels: &[u32], t: f64) -> f64 {
    const BINS: usize = 15;
    let mut count = [0usize; BINS];
    let mut conf = [0f64; BINS];
    let mut correct = [0f64; BINS];
    for (row, &y) in logits.iter().zip(labels) {
        let p = softmax(row, t);
        let (arg, top) = p.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        });
        let b = ((top * BINS as f64) as usize).min(BINS - 1);
        count[b] += 1;
        conf[b] += top;
        correct[b] += f64::from(u8::from(arg == y as usize));
    }
    let n = logits.len().max(1) as f64;
    (0..BINS).filter(|&b| count[b] > 0).map(|b| (conf[b] - correct[b]).abs() / n).sum()
}

/// The temperature minimising [`nll`]: golden-section search over log t in [ln 1e-3, ln 1e3]
/// (the NLL is unimodal in t for a fixed set of logits).
pub fn fit_temperature(logits: &[Vec<f32>], labels: &[u32]) -> f64 {
    let f = |log_t: f64| nll(logits, labels, log_t.exp());
    let (mut a, mut b) = ((1e-3f64).ln(), (1e3f64).ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - g * (b - a), a + g * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..80 {
        if fc < fd {
            (b, d, fd) = (d, c, fc);
            c = b - g * (b - a);
            fc = f(c);
        } else {
            (a, c, fc) = (c, d, fd);
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// Fits a temperature on episodes 0..`episodes` of `sampler` under `seed`.
pub fn calibrate(
    learner: &dyn Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
) -> anyhow::Result<Calibration> {
    let (logits, labels) = collect_logits(learner, sampler, episodes, seed)?;
    let t = fit_temperature(&logits, &labels);
    Ok(Calibration {
        temperature: t,
        episodes,
        queries: labels.len(),
        nll_before: nll(&logits, &labels, 1.0),
        nll_after: nll(&logits, &labels, t),
        ece_before: expected_calibration_error(&logits, &labels, 1.0),
        ece_after: expected_calibration_error(&logits, &labels, t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_temperature_of_calibrated_logits() {
        // Labels drawn from softmax(z) exactly: logits z·3 are over-confident by T = 3.
        let mut rng = crate::data::episode::episode_rng(7, 0);
        use rand::Rng;
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let z: Vec<f32> = (0..5).map(|_| rng.random_range(-2.0..2.0f32)).collect();
            let p = softmax(&z, 1.0);
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let y = p.iter().position(|&pi| {
                acc += pi;
                u < acc
            });
            labels.push(y.unwrap_or(4) as u32);
            logits.push(z.iter().map(|v| v * 3.0).collect());
        }
        let t = fit_temperature(&logits, &labels);
        assert!((t - 3.0).abs() < 0.15, "fitted T = {t}");
        assert!(nll(&logits, &labels, t) < nll(&logits, &labels, 1.0));
        assert!(
            expected_calibration_error(&logits, &labels, t)
                < expected_calibration_error(&logits, &labels, 1.0) / 3.0
        );
    }
}
