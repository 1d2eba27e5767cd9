//! Evaluation on a fixed, seeded set of episodes: mean accuracy ± 95% confidence interval.

use candle_core::{Device, Result};
use serde::Serialize;

use crate::data::{EpisodeSampler, EpisodeSpec};
use crate::methods::{Learner, OnlineScorer};
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
    /// With unlabelled support images: the same episodes scored from their labelled images alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labelled_only: Option<LabelledOnly>,
    /// For learners with an online mode (MANN): accuracy at each presentation of a class.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub per_instance: Option<PerInstance>,
    #[serde(skip)]
    pub per_episode: Vec<f64>,
}

/// Accuracy on semi-supervised episodes with their unlabelled support images left out.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LabelledOnly {
    pub accuracy: f64,
    pub ci95: f64,
}

/// Online accuracy by presentation: entry k is the accuracy on the (k+1)-th image of a class in a
/// sequence, averaged over the classes of an episode, then over episodes (mean ± 95% CI).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerInstance {
    pub per_instance_accuracy: Vec<f64>,
    pub per_instance_ci95: Vec<f64>,
}

/// The RNG stream of an evaluation episode's presentation order, apart from its drawing stream.
const ONLINE_STREAM: u64 = 0x6f6e_6c69_6e65;

/// For each presentation k of a class (0-based), the fraction of the `ways` classes whose k-th
/// image was predicted right; `labels[t]` is the class of step t. Presentations that not every
/// class reaches are left out.
pub fn per_instance_accuracy(labels: &[u32], correct: &[bool], ways: usize) -> Vec<f64> {
    let mut seen = vec![0usize; ways];
    let mut right: Vec<Vec<bool>> = vec![Vec::new(); ways];
    for (&l, &c) in labels.iter().zip(correct) {
        seen[l as usize] += 1;
        right[l as usize].push(c);
    }
    let instances = seen.iter().copied().min().unwrap_or(0);
    (0..instances).map(|k| right.iter().filter(|r| r[k]).count() as f64 / ways as f64).collect()
}

/// One episode's support and query images as a sequence shuffled by (seed, index), scored online.
fn online_scores(
    online: &dyn OnlineScorer,
    ep: &crate::data::Episode,
    seed: u64,
) -> Result<Vec<f64>> {
    use crate::data::episode::{episode_rng, shuffled_sequence};
    let (images, labels) = ep.all_images()?;
    let mut rng = episode_rng(seed ^ ONLINE_STREAM, ep.index);
    let (images, labels) = shuffled_sequence(&images, &labels, &mut rng)?;
    let correct = online.online_correct(&images, &labels, ep.spec.ways, seed ^ ep.index)?;
    Ok(per_instance_accuracy(&labels, &correct, ep.spec.ways))
}

/// Scores `learner` on episodes 0..`episodes` of `sampler` under `seed`; `on_episode` is called
/// after each with the number done. Episodes are scored two at a time on separate threads (each
/// is a function of its index alone, so the result is the same as one after another): the small
/// tensors of a few-shot task leave a second core idle otherwise.
pub fn evaluate(
    learner: &dyn Learner,
    sampler: &EpisodeSampler,
    episodes: usize,
    seed: u64,
    on_episode: impl FnMut(usize) + Send,
) -> Result<EvalReport> {
    use rayon::prelude::*;
    crate::autograd::init();
    let start = std::time::Instant::now();
    let device = Device::Cpu;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let progress = std::sync::Mutex::new(on_episode);
    if sampler.spec().unlabelled > 0 && !learner.uses_unlabelled() {
        candle_core::bail!(
            "this method does not read unlabelled support images; evaluate it with --unlabelled 0"
        )
    }
    type Scores = (f64, Option<f64>, Option<Vec<f64>>);
    let score = |i: usize| -> Result<Scores> {
        let ep = sampler.episode(seed, i as u64, &device)?;
        let labels = ep.query_labels_tensor()?;
        let accuracy_with = |support: &candle_core::Tensor| -> Result<f64> {
            let classifier = learner.adapt(support, &ep.support_labels, ep.spec.ways)?;
            ops::accuracy(&classifier.logits(&ep.query)?, &labels)
        };
        let online = learner.online().map(|o| online_scores(o, &ep, seed)).transpose()?;
        let scores = match &ep.unlabelled {
            None => (accuracy_with(&ep.support)?, None, online),
            Some(u) => (
                accuracy_with(&candle_core::Tensor::cat(&[&ep.support, u], 0)?)?,
                Some(accuracy_with(&ep.support)?),
                online,
            ),
        };
        let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        (progress.lock().unwrap_or_else(|e| e.into_inner()))(n);
        Ok(scores)
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .map_err(|e| candle_core::Error::Msg(format!("could not start evaluation threads: {e}")))?;
    let scores: Vec<Scores> =
        pool.install(|| (0..episodes).into_par_iter().map(score).collect::<Result<_>>())?;
    let per_episode: Vec<f64> = scores.iter().map(|s| s.0).collect();
    let (accuracy, ci95) = mean_ci95(&per_episode);
    let labelled: Vec<f64> = scores.iter().filter_map(|s| s.1).collect();
    let labelled_only = (!labelled.is_empty()).then(|| {
        let (accuracy, ci95) = mean_ci95(&labelled);
        LabelledOnly { accuracy, ci95 }
    });
    let online: Vec<&Vec<f64>> = scores.iter().filter_map(|s| s.2.as_ref()).collect();
    let per_instance = (!online.is_empty()).then(|| {
        let instances = online.iter().map(|o| o.len()).min().unwrap_or(0);
        let (per_instance_accuracy, per_instance_ci95) = (0..instances)
            .map(|k| mean_ci95(&online.iter().map(|o| o[k]).collect::<Vec<_>>()))
            .unzip();
        PerInstance { per_instance_accuracy, per_instance_ci95 }
    });
    Ok(EvalReport {
        spec: sampler.spec(),
        episodes,
        accuracy,
        ci95,
        seconds: start.elapsed().as_secs_f64(),
        labelled_only,
        per_instance,
        per_episode,
    })
}

/// Why a run may not be scored on Lake's benchmark, if it may not: the benchmark's characters come
/// from Omniglot's 20 evaluation alphabets, so only a run trained on the 30 background alphabets
/// (`--split lake`, subset `background`) has never seen them.
pub fn lake_benchmark_ineligibility(config: &crate::config::RunConfig) -> Option<String> {
    let d = &config.data;
    if d.dataset == "omniglot" && d.split == "lake" && d.train_subset == "background" {
        None
    } else {
        Some(format!(
            "this run trained on {}/{} ({}), which is not Omniglot's background alphabets only; Lake's 20-way benchmark \
             uses the evaluation alphabets, so its score would be contaminated (train with --split lake)",
            d.dataset, d.split, d.train_subset
        ))
    }
}

/// Scores `learner` on every run of Lake's 20-way one-shot benchmark, each run as one 20-way 1-shot
/// task (support: the 20 training images, query: the 20 test images), at `image_size`×`image_size`
/// pixels, scored exactly as Lake's demo ([`crate::data::lake_runs::score_run`]).
pub fn evaluate_lake(
    learner: &dyn Learner,
    runs: &[crate::data::lake_runs::LakeRun],
    image_size: usize,
) -> anyhow::Result<crate::data::lake_runs::LakeReport> {
    crate::autograd::init();
    let device = Device::Cpu;
    let to_tensor = |images: &[crate::data::lake_runs::LumaImage]| -> Result<candle_core::Tensor> {
        let data: Vec<f32> =
            images.iter().flat_map(|im| im.ink(image_size)).map(|v| v as f32 / 255.0).collect();
        candle_core::Tensor::from_vec(data, (images.len(), 1, image_size, image_size), &device)
    };
    let mut errors = Vec::with_capacity(runs.len());
    for run in runs {
        let support = to_tensor(&run.train)?;
        let query = to_tensor(&run.test)?;
        let labels: Vec<u32> = (0..run.train.len() as u32).collect();
        let classifier = learner.adapt(&support, &labels, run.train.len())?;
        let logits =
            classifier.logits(&query)?.to_dtype(candle_core::DType::F64)?.to_vec2::<f64>()?;
        errors.push((run.name.clone(), crate::data::lake_runs::score_run(run, &logits)?));
    }
    Ok(crate::data::lake_runs::LakeReport::from_runs(errors))
}
