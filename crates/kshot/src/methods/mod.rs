//! Learners, one file per method. A learner with meta-parameters θ turns a support set into a
//! task classifier, f_θ(S) = m_ψ, and is meta-trained on the query loss of that classifier.

pub mod baseline;
pub mod maml;
pub mod matching;
pub mod meta_lstm;
pub mod protonet;
pub mod reptile;
pub mod siamese;

use candle_core::{Result, Tensor};

use crate::data::{Episode, ImageSet};
use crate::nn::{BnMode, Conv4, ParamSet, Params};

pub use baseline::{Baseline, BaselineConfig, Head};
pub use maml::{Maml, MamlConfig};
pub use matching::{MatchingConfig, MatchingNet};
pub use meta_lstm::{MetaLstm, MetaLstmConfig};
pub use protonet::{Distance, ProtoNet, ProtoNetConfig};
pub use reptile::{Reptile, ReptileConfig};
pub use siamese::{Siamese, SiameseConfig};

/// m_ψ: scores query images against the classes of one task.
pub trait Classifier {
    /// [M, C, H, W] → [M, ways] logits.
    fn logits(&self, query: &Tensor) -> Result<Tensor>;
}

/// The query loss of one training episode and the accuracy of its arg-max predictions.
pub struct EpisodeOutput {
    pub loss: Tensor,
    pub accuracy: f64,
}

/// Where training stands when a learner takes its own meta-update ([`Learner::meta_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Meta-updates done before this one (0-based).
    pub step: u64,
    /// Meta-updates the run will take in all.
    pub total: u64,
    /// The run's seed, for any randomness of the update itself (e.g. mini-batch order).
    pub seed: u64,
}

/// What a self-updating learner reports for one meta-update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    pub loss: f64,
    pub accuracy: f64,
    /// The step size the update used (logged in place of the trainer's learning rate).
    pub step_size: f64,
}

pub trait Learner {
    /// The method's name as the CLI spells it.
    fn method(&self) -> &'static str;

    /// The meta-parameters θ.
    fn params(&self) -> &ParamSet;

    /// f_θ(S) = m_ψ, in inference mode. `labels` are in 0..ways.
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>>;

    /// Query loss of one training episode, differentiable with respect to [`Learner::params`].
    /// Training mode: may update non-trainable state such as batch-norm running statistics.
    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput>;

    /// The mean query loss of a meta-batch of episodes. Learners whose tasks are independent
    /// override this to run them in parallel.
    fn meta_batch_loss(&mut self, episodes: &[Episode]) -> Result<EpisodeOutput> {
        let mut total: Option<Tensor> = None;
        let mut accuracy = 0.0;
        for ep in episodes {
            let out = self.episode_loss(ep)?;
            accuracy += out.accuracy;
            total = Some(match total {
                Some(t) => (t + out.loss)?,
                None => out.loss,
            });
        }
        let n = episodes.len().max(1) as f64;
        let total = total.ok_or_else(|| {
            candle_core::Error::Msg("a meta-batch needs at least one episode".into())
        })?;
        Ok(EpisodeOutput { loss: (total / n)?, accuracy: accuracy / n })
    }

    /// Methods whose training is not the query loss of episodes own their training step: Siamese
    /// networks train on same/different pairs, Baseline / Baseline++ on ordinary mini-batches of
    /// the base classes. Such a method returns the loss of training step `step`, drawn from `set`
    /// deterministically in (`seed`, `step`) so that resume stays exact; the trainer then takes the
    /// same gradient step, checkpoints and resumes as for episodic learners.
    /// `None` (the default): the trainer draws an episode and calls [`Learner::episode_loss`].
    fn own_training_step(
        &mut self,
        _set: &ImageSet,
        _seed: u64,
        _step: u64,
    ) -> Result<Option<EpisodeOutput>> {
        Ok(None)
    }

    /// True for methods whose meta-update is not "backprop the query loss, step Adam" (Reptile).
    /// The trainer then calls [`Learner::meta_step`] instead, and takes no optimiser step of its
    /// own; any optimiser state the learner keeps must be in [`Learner::buffers`] so that it is
    /// checkpointed and resume stays exact.
    fn owns_update(&self) -> bool {
        false
    }

    /// One meta-update over a meta-batch of episodes, applied to [`Learner::params`] in place.
    /// Only called when [`Learner::owns_update`] is true.
    fn meta_step(&mut self, _episodes: &[Episode], _progress: Progress) -> Result<StepOutput> {
        candle_core::bail!("{} is trained through its query loss, not meta_step", self.method())
    }

    /// Non-trainable state saved beside the parameters (e.g. batch-norm running statistics).
    fn buffers(&self) -> Result<Vec<(String, Tensor)>>;

    fn load_buffers(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> anyhow::Result<()>;
}

/// [ways, n] weights whose product with [n, D] rows averages the rows of each label.
pub fn class_means_matrix(
    labels: &[u32],
    ways: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n = labels.len();
    let mut counts = vec![0f32; ways];
    for &l in labels {
        counts[l as usize] += 1.0;
    }
    let mut m = vec![0f32; ways * n];
    for (j, &l) in labels.iter().enumerate() {
        m[l as usize * n + j] = 1.0 / counts[l as usize];
    }
    Tensor::from_vec(m, (ways, n), device)
}

/// A Conv4 + linear head adapted to one task (MAML, Reptile), scored with batch statistics.
pub(crate) struct AdaptedConv4<'a> {
    backbone: &'a Conv4,
    params: Params,
    /// Present for non-transductive scoring: each query is batched with these support images.
    support: Option<Tensor>,
}

impl<'a> AdaptedConv4<'a> {
    /// Transductive: all queries of a call share batch statistics. Otherwise each query is scored
    /// in a batch with `support` alone, so batch-norm statistics never mix queries.
    pub(crate) fn new(
        backbone: &'a Conv4,
        params: Params,
        support: &Tensor,
        transductive: bool,
    ) -> Self {
        let support = if transductive { None } else { Some(support.clone()) };
        Self { backbone, params, support }
    }

    fn batch_logits(&self, x: &Tensor) -> Result<Tensor> {
        self.backbone.linear_head_logits(&self.params, x, BnMode::Batch(None))
    }
}

impl Classifier for AdaptedConv4<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let Some(support) = &self.support else {
            return self.batch_logits(query);
        };
        let n_support = support.dim(0)?;
        let rows = (0..query.dim(0)?)
            .map(|i| {
                let batch = Tensor::cat(&[support, &query.narrow(0, i, 1)?], 0)?;
                self.batch_logits(&batch)?.narrow(0, n_support, 1)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
}

/// The element-wise mean over tasks of per-task gradients, one per parameter of `params`.
pub(crate) fn mean_gradient<'a>(
    params: &ParamSet,
    tasks: impl Clone + ExactSizeIterator<Item = &'a Params>,
) -> Result<Params> {
    let n = tasks.len();
    let mut mean = Params::new();
    for (name, _) in params.iter() {
        let mut grads = tasks.clone().map(|g| g.get(name));
        let Some(first) = grads.next() else {
            candle_core::bail!("a meta-batch needs at least one task")
        };
        let sum = grads.try_fold(first?.clone(), |acc, g| acc + g?)?;
        mean.insert(name, (sum / n as f64)?);
    }
    Ok(mean)
}

/// A loss whose value is `value` and whose gradient with respect to `params` is `grads`, for
/// learners that compute their gradient themselves: Σ θ·stop(g) − stop(Σ θ·g) + value.
pub(crate) fn surrogate_loss(params: &ParamSet, grads: &Params, value: f64) -> Result<Tensor> {
    let mut linear: Option<Tensor> = None;
    for (name, var) in params.iter() {
        let g = grads.get(name)?.detach().to_dtype(var.dtype())?;
        let term = (var.as_tensor() * g)?.sum_all()?;
        linear = Some(match linear {
            Some(l) => (l + term)?,
            None => term,
        });
    }
    let linear =
        linear.ok_or_else(|| candle_core::Error::Msg("the learner has no parameters".into()))?;
    let value = Tensor::new(value, linear.device())?.to_dtype(linear.dtype())?;
    (&linear - linear.detach())? + value
}

/// Fails unless a task has as many classes as a model's output layer (MAML, Reptile, Meta-LSTM).
pub(crate) fn ensure_ways(model: &str, head: usize, ways: usize) -> Result<()> {
    if ways != head {
        candle_core::bail!(
            "this {model} model has a {head}-way output layer; evaluate it with --ways {head}"
        )
    }
    Ok(())
}

/// The query loss and accuracy of an episode scored through [`Learner::adapt`], for methods that do
/// not train on episodes (Siamese, Baseline): not differentiable with respect to their parameters.
pub(crate) fn adapted_query_loss(
    learner: &dyn Learner,
    episode: &Episode,
) -> Result<EpisodeOutput> {
    let classifier = learner.adapt(&episode.support, &episode.support_labels, episode.spec.ways)?;
    let logits = classifier.logits(&episode.query)?;
    let labels = episode.query_labels_tensor()?;
    Ok(EpisodeOutput {
        loss: crate::nn::ops::cross_entropy(&logits, &labels)?,
        accuracy: crate::nn::ops::accuracy(&logits, &labels)?,
    })
}

/// The methods `kshot train --method` accepts.
pub const METHODS: &[&str] = &[
    "protonet",
    "matching",
    "siamese",
    "baseline",
    "baseline++",
    "maml",
    "fomaml",
    "reptile",
    "meta-lstm",
];

/// A fresh learner for `config`, its parameters drawn from `rng`.
pub fn build(
    config: &crate::config::RunConfig,
    rng: &mut rand_chacha::ChaCha8Rng,
    device: &candle_core::Device,
) -> anyhow::Result<Box<dyn Learner>> {
    match config.method.as_str() {
        "protonet" => Ok(Box::new(ProtoNet::new(config.protonet, config.backbone, rng, device)?)),
        "maml" | "fomaml" => {
            let maml = MamlConfig {
                first_order: config.method == "fomaml" || config.maml.first_order,
                ..config.maml
            };
            anyhow::ensure!(
                maml.ways == config.train.ways,
                "MAML's output layer has {} units but training episodes are {}-way; set --train-ways and --ways alike",
                maml.ways,
                config.train.ways
            );
            if !maml.first_order {
                anyhow::ensure!(
                    crate::autograd::second_order_available(),
                    "second-order MAML needs {} set before any backward pass; use --method fomaml for first order",
                    crate::autograd::KEEP_GRAPH_VAR
                );
            }
            let size = config.data.image_size;
            Ok(Box::new(Maml::new(maml, config.backbone, (size, size), rng, device)?))
        }
        "matching" => {
            let size = config.data.image_size;
            Ok(Box::new(MatchingNet::new(config.matching, config.backbone, size, rng, device)?))
        }
        "siamese" => {
            let size = config.data.image_size;
            Ok(Box::new(Siamese::new(config.siamese, config.backbone, size, rng, device)?))
        }
        "baseline" | "baseline++" => {
            let head = if config.method == "baseline" { Head::Linear } else { Head::Cosine };
            let size = config.data.image_size;
            Ok(Box::new(Baseline::new(config.baseline, head, config.backbone, size, rng, device)?))
        }
        "reptile" => {
            ensure_head(config.reptile.ways, config)?;
            let size = config.data.image_size;
            Ok(Box::new(Reptile::new(config.reptile, config.backbone, (size, size), rng, device)?))
        }
        "meta-lstm" => {
            ensure_head(config.meta_lstm.ways, config)?;
            let size = config.data.image_size;
            Ok(Box::new(MetaLstm::new(
                config.meta_lstm,
                config.backbone,
                (size, size),
                rng,
                device,
            )?))
        }
        other => anyhow::bail!("unknown method `{other}`; choose one of: {}", METHODS.join(", ")),
    }
}

fn ensure_head(ways: usize, config: &crate::config::RunConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        ways == config.train.ways,
        "{}'s output layer has {ways} units but training episodes are {}-way; set --train-ways and --ways alike",
        config.method,
        config.train.ways
    );
    Ok(())
}
