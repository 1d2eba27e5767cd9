//! Learners, one file per method. A learner with meta-parameters θ turns a support set into a
//! task classifier, f_θ(S) = m_ψ ([`Learner::adapt`], the one inference path of eval, Lake and
//! predict), and is trained one step at a time ([`Learner::train_step`]) against a [`StepCtx`]
//! that hands out the step's episodes or raw data and the optimisers the method registered.
//! Everything a learner must keep between steps is its [`State`], which the trainer saves and
//! restores whole, so exact resume needs nothing from a new method.
//!
//! A method is one file and one line of the [`methods!`] list below: the file defines its settings
//! (a [`Method`]: names, CLI flags, builder, presets) and its learner.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{Episode, EpisodeSampler, ImageSet};
use crate::nn::{ParamSet, Params, RunningStats};
use crate::optim::{Adam, AdamConfig};
use crate::protocol::Protocol;

pub use baseline::{Baseline, BaselineConfig, Head};
pub use fewshot_gan::{FewShotGan, FewShotGanConfig};
pub use gnn::{Gnn, GnnConfig, GraphNet, TrainGraphs, UnknownLabel};
pub use maml::{Maml, MamlConfig};
pub use mann::{LabelCode, Mann, MannConfig};
pub use matching::{MatchingConfig, MatchingNet};
pub use meta_lstm::{MetaLstm, MetaLstmConfig};
pub use metanet::{MetaNet, MetaNetConfig};
pub use protonet::{Distance, ProtoNet, ProtoNetConfig};
pub use reptile::{Reptile, ReptileConfig};
pub use siamese::{Siamese, SiameseConfig};

/// m_ψ: scores query images against the classes of one task.
pub trait Classifier {
    /// [M, C, H, W] → [M, ways] logits.
    fn logits(&self, query: &Tensor) -> Result<Tensor>;
}

pub trait Learner: Send + Sync {
    /// f_θ(S) = m_ψ, in inference mode. `labels` are in 0..ways and label the first
    /// `labels.len()` support images; any after them are unlabelled (only for a learner that
    /// [`Learner::uses_unlabelled`]).
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>>;

    /// One training step (an optimiser update, or the method's own update).
    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput>;

    /// Everything that must survive between steps: saved and restored whole by the trainer.
    fn state(&self) -> &State;
    fn state_mut(&mut self) -> &mut State;

    /// The optimisers the trainer keeps for this learner, each over a set of its parameters and
    /// stepped through [`StepCtx::minimise`]. Default: one Adam, `adam`, over every parameter.
    /// A learner that updates its parameters itself (Reptile) registers none.
    fn optimisers(&self) -> Vec<OptimiserSpec> {
        vec![OptimiserSpec::all("adam")]
    }

    /// Whether the learner reads unlabelled support images (semi-supervised episodes); a learner
    /// that does not is never given any.
    fn uses_unlabelled(&self) -> bool {
        false
    }

    /// The learner's online mode, when it has one (MANN).
    fn online(&self) -> Option<&dyn OnlineScorer> {
        None
    }

    /// The learner as a few-shot generator, when it is one (the few-shot GAN): its support set
    /// becomes a generator of new images rather than a classifier.
    fn generator(&self) -> Option<&dyn FewShotGenerator> {
        None
    }

    /// The meta-parameters θ.
    fn params(&self) -> &ParamSet {
        &self.state().params
    }

    /// [n, C, H, W] → [n, D] task-independent features of images, in inference mode: the
    /// embedding the learner's classifiers are built on (`kshot embed`). Learners that adapt
    /// their whole network to each task have none.
    fn embed(&self, _images: &Tensor) -> anyhow::Result<Tensor> {
        anyhow::bail!(
            "this method adapts its whole network to each task, so it has no task-independent embedding; embed with a protonet, matching, baseline or baseline++ model"
        )
    }
}

/// Online scoring, the sequence protocol of memory-augmented networks.
pub trait OnlineScorer {
    /// `images` [T, C, H, W] are shown in order with the label of each step revealed at the
    /// next; whether each step's prediction was right (by the method's own rule). `seed` fixes
    /// any per-sequence randomness (e.g. label codes).
    fn online_correct(
        &self,
        images: &Tensor,
        labels: &[u32],
        ways: usize,
        seed: u64,
    ) -> Result<Vec<bool>>;
}

/// Few-shot generation: a support set of one identity becomes a generator of that identity.
pub trait FewShotGenerator {
    /// `shots` [T, 2, S, S] (image ‖ landmark image) of one identity and `targets` [M, 1, S, S]
    /// landmark images → [M, 1, S, S] images of that identity in [0, 1], after fine-tuning on
    /// the shots for `finetune_steps` steps (0: feed-forward). Deterministic.
    fn generate(&self, shots: &Tensor, targets: &Tensor, finetune_steps: usize) -> Result<Tensor>;
    /// S, the side of the images it reads and renders.
    fn image_size(&self) -> usize;
    /// The fine-tuning steps of the run's settings.
    fn default_finetune_steps(&self) -> usize;
}

/// A learner's whole state between training steps.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Trainable parameters.
    pub params: ParamSet,
    /// Batch-norm running statistics.
    pub running: RunningStats,
    /// Any other tensors the learner keeps (e.g. Reptile's inner optimiser), saved verbatim.
    pub extra: BTreeMap<String, Tensor>,
}

impl State {
    pub fn new(params: ParamSet, running: RunningStats) -> Self {
        Self { params, running, extra: BTreeMap::new() }
    }

    /// Non-trainable tensors: running statistics, then `extra`.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.running.named_tensors("")?;
        out.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(out)
    }

    /// Overwrites the whole state from `params` and `buffers` (saved by [`State::buffers`]);
    /// every tensor the state holds must be there with its shape.
    pub fn load(
        &mut self,
        params: &std::collections::HashMap<String, Tensor>,
        param_prefix: &str,
        buffers: &std::collections::HashMap<String, Tensor>,
        buffer_prefix: &str,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        self.params.load_from(params, param_prefix, origin)?;
        self.running.load_from(buffers, buffer_prefix, origin)?;
        for (name, slot) in self.extra.iter_mut() {
            let key = format!("{buffer_prefix}{name}");
            let t = buffers.get(&key).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: tensor `{key}` is missing; the file was not written by this model",
                    origin.display()
                )
            })?;
            anyhow::ensure!(
                t.dims() == slot.dims(),
                "{}: `{key}` has shape {:?}, the model expects {:?}",
                origin.display(),
                t.dims(),
                slot.dims()
            );
            *slot = t.to_dtype(slot.dtype())?;
        }
        Ok(())
    }
}

/// An optimiser a learner registers: its name and the parameters it steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptimiserSpec {
    pub name: &'static str,
    /// Parameter names; `None`: all of them.
    pub params: Option<Vec<String>>,
}

impl OptimiserSpec {
    pub fn all(name: &'static str) -> Self {
        Self { name, params: None }
    }
}

/// The optimisers of one training run, by name, in the order the learner registered them.
pub struct Optimisers(Vec<Adam>);

impl Optimisers {
    pub fn new(state: &State, specs: &[OptimiserSpec], config: AdamConfig) -> Result<Self> {
        let mut list = Vec::with_capacity(specs.len());
        for spec in specs {
            let vars = state
                .params
                .iter()
                .filter(|(n, _)| spec.params.as_ref().is_none_or(|p| p.iter().any(|q| q == n)))
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            list.push(Adam::named(spec.name, vars, config)?);
        }
        Ok(Self(list))
    }

    pub fn get_mut(&mut self, name: &str) -> anyhow::Result<&mut Adam> {
        self.0
            .iter_mut()
            .find(|a| a.name() == name)
            .ok_or_else(|| anyhow::anyhow!("the learner registered no optimiser `{name}`"))
    }

    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for a in &self.0 {
            out.extend(a.state_tensors()?);
        }
        Ok(out)
    }

    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        self.0.iter_mut().try_for_each(|a| a.load_state(tensors, origin))
    }
}

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    pub loss: f64,
    pub accuracy: f64,
    /// The step size the update used (the schedule's learning rate, or the method's own).
    pub lr: f64,
}

/// The query loss of one training episode (or a meta-batch, or a mini-batch) and the accuracy
/// of its arg-max predictions; `loss` is differentiable with respect to the learner's parameters.
pub struct EpisodeOutput {
    pub loss: Tensor,
    pub accuracy: f64,
}

/// What a learner sees of training at one step.
pub struct StepCtx<'a> {
    /// Steps done before this one (0-based).
    pub step: u64,
    /// Steps the run takes in all.
    pub total: u64,
    /// The run's seed.
    pub seed: u64,
    /// The schedule's learning rate at this step.
    pub lr: f64,
    /// Episodes per step.
    pub meta_batch: usize,
    sampler: &'a EpisodeSampler<'a>,
    optimisers: &'a mut Optimisers,
    device: Device,
}

impl<'a> StepCtx<'a> {
    pub fn new(
        (step, total, seed): (u64, u64, u64),
        lr: f64,
        meta_batch: usize,
        sampler: &'a EpisodeSampler<'a>,
        optimisers: &'a mut Optimisers,
    ) -> Self {
        Self { step, total, seed, lr, meta_batch, sampler, optimisers, device: Device::Cpu }
    }

    /// The episodes of this step: indices step·B … step·B + B − 1 for a meta-batch of B, each
    /// drawn from (seed, index) alone.
    pub fn episodes(&self) -> Result<Vec<Episode>> {
        let batch = self.meta_batch.max(1) as u64;
        (self.step * batch..(self.step + 1) * batch)
            .map(|index| self.sampler.episode(self.seed, index, &self.device))
            .collect()
    }

    /// The training classes, for methods that draw their own batches.
    pub fn training_set(&self) -> &'a ImageSet {
        self.sampler.set()
    }

    /// The random stream of this step, for methods that draw their own batches: a function of
    /// (seed, step) alone, so a resumed run draws the same.
    pub fn rng(&self) -> ChaCha8Rng {
        crate::data::episode::episode_rng(self.seed, self.step)
    }

    /// Backpropagates `out.loss` and steps optimiser `name` at the schedule's learning rate.
    pub fn minimise_with(&mut self, name: &str, out: EpisodeOutput) -> anyhow::Result<StepOutput> {
        let lr = self.lr;
        self.minimise_at(name, out, lr)
    }

    /// [`StepCtx::minimise_with`] at learning rate `lr` (a second network's own rate).
    pub fn minimise_at(
        &mut self,
        name: &str,
        out: EpisodeOutput,
        lr: f64,
    ) -> anyhow::Result<StepOutput> {
        let loss = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            anyhow::bail!(
                "training diverged at episode {} (loss {loss}); lower the learning rate (--lr)",
                self.step
            );
        }
        let grads = out.loss.backward()?;
        self.optimisers.get_mut(name)?.step(&grads, lr)?;
        Ok(StepOutput { loss, accuracy: out.accuracy, lr })
    }

    /// [`StepCtx::minimise_with`] the default optimiser, `adam`.
    pub fn minimise(&mut self, out: EpisodeOutput) -> anyhow::Result<StepOutput> {
        self.minimise_with("adam", out)
    }
}

/// The episodic protocol (ProtoNet, Matching Networks, MAML, Meta-LSTM): draw the step's
/// meta-batch, take the learner's mean query loss over it, step Adam.
pub fn episodic_step(
    ctx: &mut StepCtx,
    query_loss: impl FnOnce(&[Episode]) -> Result<EpisodeOutput>,
) -> anyhow::Result<StepOutput> {
    let episodes = ctx.episodes()?;
    let out = query_loss(&episodes)?;
    ctx.minimise(out)
}

/// The mean of per-episode query losses over a meta-batch.
pub fn mean_episode_loss(
    episodes: &[Episode],
    mut loss: impl FnMut(&Episode) -> Result<EpisodeOutput>,
) -> Result<EpisodeOutput> {
    let mut total: Option<Tensor> = None;
    let mut accuracy = 0.0;
    for ep in episodes {
        let out = loss(ep)?;
        accuracy += out.accuracy;
        total = Some(match total {
            Some(t) => (t + out.loss)?,
            None => out.loss,
        });
    }
    let n = episodes.len().max(1) as f64;
    let total = total
        .ok_or_else(|| candle_core::Error::Msg("a meta-batch needs at least one episode".into()))?;
    Ok(EpisodeOutput { loss: (total / n)?, accuracy: accuracy / n })
}

/// [ways, n] weights whose product with [n, D] rows averages the rows of each label.
pub fn class_means_matrix(labels: &[u32], ways: usize, device: &Device) -> Result<Tensor> {
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

/// A backbone + linear head adapted to one task (MAML, Reptile), scored with batch statistics.
pub(crate) struct AdaptedLinear<'a> {
    backbone: &'a dyn crate::nn::Backbone,
    params: Params,
    /// Present for non-transductive scoring: each query is batched with these support images.
    support: Option<Tensor>,
}

impl<'a> AdaptedLinear<'a> {
    /// Transductive: all queries of a call share batch statistics. Otherwise each query is scored
    /// in a batch with `support` alone, so batch-norm statistics never mix queries.
    pub(crate) fn new(
        backbone: &'a dyn crate::nn::Backbone,
        params: Params,
        support: &Tensor,
        transductive: bool,
    ) -> Self {
        let support = if transductive { None } else { Some(support.clone()) };
        Self { backbone, params, support }
    }

    fn batch_logits(&self, x: &Tensor) -> Result<Tensor> {
        crate::nn::head::linear_logits(
            self.backbone,
            &self.params,
            x,
            crate::nn::BnMode::Batch(None),
        )
    }
}

impl Classifier for AdaptedLinear<'_> {
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
    if n == 0 {
        candle_core::bail!("a meta-batch needs at least one task")
    }
    let mut mean = Params::new();
    for (name, _) in params.iter() {
        let mut grads = tasks.clone().map(|g| g.get(name));
        let first = grads.next().expect("a non-empty meta-batch");
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

/// Fails unless training episodes are as wide as the output layer.
pub(crate) fn ensure_train_ways(
    method: &str,
    head: usize,
    protocol: &Protocol,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        head == protocol.train.ways,
        "{method}'s output layer has {head} units but training episodes are {}-way; set --train-ways and --ways alike",
        protocol.train.ways
    );
    Ok(())
}

/// A paper protocol by name: the protocol and the method's settings.
pub struct Preset {
    pub name: &'static str,
    pub summary: &'static str,
    pub build: fn() -> (Protocol, MethodConfig),
}

/// Flags that several methods read (the inner loop of the optimisation-based methods).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SharedFlags {
    /// MAML / Reptile / Meta-LSTM: inner steps (learner updates) during meta-training.
    #[arg(long)]
    pub inner_steps: Option<usize>,
    /// MAML / Reptile / Meta-LSTM: inner steps when adapting to a test task.
    #[arg(long)]
    pub inner_steps_test: Option<usize>,
    /// MAML: inner step size α. Reptile: inner Adam learning rate.
    #[arg(long)]
    pub inner_lr: Option<f64>,
}

/// The clap ids of the arguments of a flag group.
fn arg_ids<A: clap::Args>() -> Vec<String> {
    A::augment_args(clap::Command::new("flags"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect()
}

/// A method's settings: what it is called, its flags, how it builds its learner, its presets.
pub trait Method: Sized {
    /// The names `--method` accepts for it (e.g. `maml`, `fomaml`).
    const NAMES: &'static [&'static str];
    /// Its own `kshot train` flags (names unique across methods).
    type Flags: clap::Args;
    /// Whether it reads the inner-loop flags of [`SharedFlags`].
    const READS_SHARED_FLAGS: bool = false;

    /// The default settings of method `name` (one of [`Method::NAMES`]).
    fn named(name: &str) -> Self;
    /// The name of these settings (e.g. `fomaml` when first order).
    fn name(&self) -> &'static str;
    /// Becomes the variant `name` (one of [`Method::NAMES`]) keeping every other setting (e.g.
    /// `--preset maml-omniglot-5w1s --method fomaml`).
    fn set_name(&mut self, _name: &str) {}
    /// Applies the flags given on the command line.
    fn apply(&mut self, flags: &Self::Flags, shared: &SharedFlags) -> anyhow::Result<()>;
    /// A fresh learner, its parameters drawn from `rng`.
    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>>;
    /// The paper protocols of this method.
    fn presets() -> Vec<Preset>;

    /// Fills in what the settings learn from the training set (e.g. Baseline's class count).
    fn fit(&mut self, _train_set: &ImageSet) -> anyhow::Result<()> {
        Ok(())
    }
    /// The output-layer width, for methods whose classifier has one (it follows `--train-ways`).
    fn ways_mut(&mut self) -> Option<&mut usize> {
        None
    }
    /// Whether test queries share batch statistics, for methods where that is a choice.
    fn transductive_mut(&mut self) -> Option<&mut bool> {
        None
    }
    /// The inner steps a test task adapts with, for methods that adapt by steps
    /// (`kshot eval --each-inner-step`).
    fn test_steps_mut(&mut self) -> Option<&mut usize> {
        None
    }
    /// True when training episodes have their own number of shots (`--train-shots`, Reptile),
    /// so that `--shots` sets only the test shots.
    fn own_train_shots(&self) -> bool {
        false
    }
    /// Called when a run of `old_total` steps is extended to `new_total` (`--resume --episodes`);
    /// returns what the extension means for the method's schedule, if anything, for the user.
    fn extend(&mut self, _old_total: u64, _new_total: u64) -> Option<String> {
        None
    }
    /// What one training step is, for progress messages.
    fn step_unit(&self, protocol: &Protocol) -> String {
        if protocol.meta_batch > 1 {
            format!(
                "meta-iterations of {} episodes of {} each",
                protocol.meta_batch, protocol.train
            )
        } else {
            format!("training episodes of {}", protocol.train)
        }
    }
}

/// The methods: `Variant(Settings) = "name" in module`, each in `methods/module.rs`. Adding a
/// method is a new file and a line here: the module, the `MethodConfig` variant, the flag group,
/// the presets and the dispatch all come from that line.
macro_rules! methods {
    ($($variant:ident($settings:ty) = $tag:literal in $module:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// The method of a run and its settings, tagged by name in `config.json`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "name")]
        pub enum MethodConfig {
            $(#[serde(rename = $tag)] $variant($settings),)*
        }

        /// Every method's own flags, for `kshot train`.
        #[derive(Debug, Clone, clap::Args)]
        pub struct MethodFlags {
            #[command(flatten)]
            pub shared: SharedFlags,
            $(
                #[command(flatten)]
                pub $module: <$settings as Method>::Flags,
            )*
        }

        /// The names `kshot train --method` accepts.
        pub fn method_names() -> Vec<&'static str> {
            let mut names = Vec::new();
            $(names.extend_from_slice(<$settings as Method>::NAMES);)*
            names
        }

        impl MethodConfig {
            /// The default settings of the method called `name`.
            pub fn named(name: &str) -> anyhow::Result<Self> {
                $(
                    if <$settings as Method>::NAMES.contains(&name) {
                        return Ok(Self::$variant(<$settings as Method>::named(name)));
                    }
                )*
                anyhow::bail!(
                    "unknown method `{name}`; choose one of: {}",
                    method_names().join(", ")
                )
            }

            pub fn name(&self) -> &'static str {
                match self { $(Self::$variant(m) => m.name(),)* }
            }

            /// Switches to the method `name`: the same method under another of its names keeps
            /// its settings; another method starts from its defaults.
            pub fn switch_to(&mut self, name: &str) -> anyhow::Result<()> {
                match self {
                    $(Self::$variant(m) if <$settings as Method>::NAMES.contains(&name) => {
                        m.set_name(name);
                        Ok(())
                    })*
                    _ => {
                        *self = Self::named(name)?;
                        Ok(())
                    }
                }
            }

            pub fn apply(&mut self, flags: &MethodFlags) -> anyhow::Result<()> {
                match self { $(Self::$variant(m) => m.apply(&flags.$module, &flags.shared),)* }
            }

            pub fn build(
                &self,
                protocol: &Protocol,
                rng: &mut ChaCha8Rng,
                device: &Device,
            ) -> anyhow::Result<Box<dyn Learner>> {
                match self { $(Self::$variant(m) => m.build(protocol, rng, device),)* }
            }

            pub fn fit(&mut self, train_set: &ImageSet) -> anyhow::Result<()> {
                match self { $(Self::$variant(m) => m.fit(train_set),)* }
            }

            pub fn ways_mut(&mut self) -> Option<&mut usize> {
                match self { $(Self::$variant(m) => m.ways_mut(),)* }
            }

            pub fn transductive_mut(&mut self) -> Option<&mut bool> {
                match self { $(Self::$variant(m) => m.transductive_mut(),)* }
            }

            pub fn test_steps_mut(&mut self) -> Option<&mut usize> {
                match self { $(Self::$variant(m) => m.test_steps_mut(),)* }
            }

            pub fn own_train_shots(&self) -> bool {
                match self { $(Self::$variant(m) => m.own_train_shots(),)* }
            }

            pub fn step_unit(&self, protocol: &Protocol) -> String {
                match self { $(Self::$variant(m) => m.step_unit(protocol),)* }
            }

            pub fn extend(&mut self, old_total: u64, new_total: u64) -> Option<String> {
                match self { $(Self::$variant(m) => m.extend(old_total, new_total),)* }
            }

            /// The ids of the flags that `name` reads among all methods' flags: its own and,
            /// for the inner-loop methods, the shared ones. Any other method flag given with
            /// `--method name` is a mistake.
            pub fn flags_of(name: &str) -> Vec<String> {
                let mut out = Vec::new();
                $(
                    if <$settings as Method>::NAMES.contains(&name) {
                        out.extend(arg_ids::<<$settings as Method>::Flags>());
                        if <$settings as Method>::READS_SHARED_FLAGS {
                            out.extend(arg_ids::<SharedFlags>());
                        }
                    }
                )*
                out
            }

            /// The ids of every method flag (shared ones included).
            pub fn all_flags() -> Vec<String> {
                arg_ids::<MethodFlags>()
            }
        }

        /// Every method's presets, in the order of the list.
        pub fn presets() -> Vec<Preset> {
            let mut all = Vec::new();
            $(all.extend(<$settings as Method>::presets());)*
            all
        }
    };
}

methods! {
    ProtoNet(ProtoNetConfig) = "protonet" in protonet,
    Maml(MamlConfig) = "maml" in maml,
    Matching(MatchingConfig) = "matching" in matching,
    Siamese(SiameseConfig) = "siamese" in siamese,
    Baseline(BaselineConfig) = "baseline" in baseline,
    Reptile(ReptileConfig) = "reptile" in reptile,
    MetaLstm(MetaLstmConfig) = "meta-lstm" in meta_lstm,
    Gnn(GnnConfig) = "gnn" in gnn,
    Mann(MannConfig) = "mann" in mann,
    MetaNet(MetaNetConfig) = "metanet" in metanet,
    FewShotGan(FewShotGanConfig) = "fewshot-gan" in fewshot_gan,
}
