//! Reptile (Nichol, Achiam & Schulman 2018): for each task of a meta-batch, train a copy of θ for k
//! steps of Adam (β1 = 0) on mini-batches of the task's data, giving φ; then move θ towards the
//! tasks' mean, θ ← θ + ε·(mean φ − θ), with ε annealed linearly from ε0 to ε_final over training.
//!
//! The meta-update is not the gradient of a query loss, so Reptile takes it itself
//! ([`Reptile::meta_step`]) and registers no optimiser with the trainer. As in the official code
//! (openai/supervised-reptile), the inner Adam state (second moments and step count) is one state
//! that carries over from task to task and across meta-iterations: only the weights are reset to θ
//! before each task. It lives in the learner's [`State`] (`inner_adam.*`), so it is checkpointed
//! with everything else. At test time each task adapts from a copy of that state.
//!
//! Batch norm always uses the statistics of the batch it is given (the official model runs it in
//! training mode throughout). That makes evaluation a choice: *transductive* scores all queries
//! of a task in one batch; otherwise each query is scored in a batch made of the support set and
//! that one query, so no query sees another (the official `--transductive` flag and its default).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    AdaptedLinear, Classifier, Learner, Method, MethodConfig, OptimiserSpec, Preset, SharedFlags,
    State, StepCtx, StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::nn::head::{self, required_grad};
use crate::nn::{ops, Backbone, BackboneConfig, BnMode, Params, RunningStats, StridedConv4Config};
use crate::optim::StepDecay;
use crate::protocol::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReptileConfig {
    /// Classes per task: the width of the output layer.
    pub ways: usize,
    /// Inner Adam steps per training task (k).
    pub inner_steps: usize,
    /// Inner Adam steps when adapting to a test task.
    pub inner_steps_test: usize,
    /// Images per inner mini-batch during meta-training.
    pub inner_batch: usize,
    /// Images per inner mini-batch at test time.
    pub inner_batch_test: usize,
    /// Inner Adam learning rate.
    pub inner_lr: f64,
    /// Outer step size ε0 at the first meta-iteration.
    pub outer_step: f64,
    /// Outer step size reached (linearly) at the end of training.
    pub outer_step_final: f64,
    /// Score all queries of a test task in one batch (batch-norm statistics shared between them).
    pub transductive: bool,
    /// The number of meta-iterations ε is annealed over, when it differs from the run's length
    /// (a run extended with `--resume --episodes` keeps its original schedule). `None`: the run's
    /// length.
    #[serde(default)]
    pub schedule_total: Option<u64>,
    /// How the output layer starts (the official `tf.layers.dense`: Glorot-uniform weight, zero
    /// bias).
    #[serde(default)]
    pub head_init: head::HeadInit,
}

impl Default for ReptileConfig {
    /// The official 5-way Omniglot settings.
    fn default() -> Self {
        Self {
            ways: 5,
            inner_steps: 5,
            inner_steps_test: 50,
            inner_batch: 10,
            inner_batch_test: 5,
            inner_lr: 0.001,
            outer_step: 1.0,
            outer_step_final: 0.0,
            transductive: false,
            schedule_total: None,
            head_init: head::HeadInit::Torch,
        }
    }
}

impl ReptileConfig {
    /// ε at meta-iteration `step` of `total`: ε0 + (ε_final − ε0)·step/total, ε_final past `total`.
    pub fn outer_step_at(&self, step: u64, total: u64) -> f64 {
        let frac = if total == 0 { 0.0 } else { (step as f64 / total as f64).min(1.0) };
        frac * self.outer_step_final + (1.0 - frac) * self.outer_step
    }
}

/// Adam with β1 = 0, in TensorFlow's form (the official code's optimiser):
/// v ← β2·v + (1 − β2)·g²,  x ← x − lr·√(1 − β2^t)·g / (√v + ε).
#[derive(Debug, Clone)]
pub struct InnerAdam {
    pub lr: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Second moments, one per parameter in order.
    pub v: Vec<Tensor>,
    /// Steps taken so far.
    pub t: u64,
}

impl InnerAdam {
    /// Reads the state saved under `inner_adam.*` in `extra` for parameters `names`.
    fn from_extra(
        lr: f64,
        names: &[String],
        extra: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let get = |key: &str| {
            extra
                .get(key)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("Reptile's state has no `{key}`")))
        };
        let v = names.iter().map(|n| get(&format!("inner_adam.v.{n}"))).collect::<Result<_>>()?;
        let t = get("inner_adam.t")?.to_vec1::<i64>()?[0] as u64;
        Ok(Self { lr, beta2: 0.999, eps: 1e-8, v, t })
    }

    /// Saves the state under `inner_adam.*` in `extra`.
    fn to_extra(
        &self,
        names: &[String],
        extra: &mut std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for (n, v) in names.iter().zip(&self.v) {
            extra.insert(format!("inner_adam.v.{n}"), v.clone());
        }
        extra.insert("inner_adam.t".into(), Tensor::new(&[self.t as i64], &Device::Cpu)?);
        Ok(())
    }

    /// A fresh state for parameters shaped like `like`.
    pub fn new(lr: f64, like: &[Tensor]) -> Result<Self> {
        let v = like.iter().map(|t| t.zeros_like()).collect::<Result<Vec<_>>>()?;
        Ok(Self { lr, beta2: 0.999, eps: 1e-8, v, t: 0 })
    }

    /// One step from `x` with gradients `g`; returns the new (detached) values.
    pub fn step(&mut self, x: &[Tensor], g: &[Tensor]) -> Result<Vec<Tensor>> {
        self.t += 1;
        let lr_t = self.lr * (1.0 - self.beta2.powi(self.t as i32)).sqrt();
        let mut out = Vec::with_capacity(x.len());
        for ((xi, gi), vi) in x.iter().zip(g).zip(self.v.iter_mut()) {
            let gi = gi.detach();
            *vi = ((&*vi * self.beta2)? + (gi.sqr()? * (1.0 - self.beta2))?)?;
            let update = (gi / (vi.sqrt()? + self.eps)?)?;
            out.push((xi.detach() - (update * lr_t)?)?);
        }
        Ok(out)
    }
}

/// Reptile's outer update: θ + ε·(mean over tasks of φ − θ).
pub fn outer_update(theta: &[Tensor], phis: &[Vec<Tensor>], epsilon: f64) -> Result<Vec<Tensor>> {
    if phis.is_empty() {
        candle_core::bail!("a Reptile meta-batch needs at least one task")
    }
    let n = phis.len() as f64;
    theta
        .iter()
        .enumerate()
        .map(|(i, th)| {
            let mut sum = phis[0][i].clone();
            for phi in &phis[1..] {
                sum = (sum + &phi[i])?;
            }
            let mean = (sum / n)?;
            th + ((mean - th)? * epsilon)?
        })
        .collect()
}

/// The official mini-batch stream over `n` samples: shuffle, deal out `batch`-sized batches, and
/// reshuffle whenever the samples run out, until `count` batches (a batch may straddle two passes).
pub fn mini_batches(n: usize, batch: usize, count: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut out = Vec::with_capacity(count);
    let mut current = Vec::with_capacity(batch);
    if n == 0 || batch == 0 {
        return out;
    }
    while out.len() < count {
        order.shuffle(rng);
        for &i in &order {
            current.push(i);
            if current.len() == batch {
                out.push(std::mem::take(&mut current));
                if out.len() == count {
                    break;
                }
            }
        }
    }
    out
}

/// The outcome of training one task: φ and the mean loss / accuracy over its inner mini-batches.
pub struct TaskResult {
    pub phi: Vec<Tensor>,
    pub loss: f64,
    pub accuracy: f64,
}

/// Where training stands at one meta-update ([`Reptile::meta_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Meta-updates done before this one (0-based).
    pub step: u64,
    /// Meta-updates the run will take in all.
    pub total: u64,
    /// The run's seed, for the mini-batch order.
    pub seed: u64,
}

pub struct Reptile {
    pub config: ReptileConfig,
    backbone: Box<dyn Backbone>,
    state: State,
    names: Vec<String>,
}

/// Domain separation for the mini-batch RNG, so it never coincides with an episode's stream.
const MINI_BATCH_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

impl Reptile {
    /// A backbone for `height`×`width` inputs with a linear `ways`-unit output layer.
    pub fn new(
        config: ReptileConfig,
        backbone: &BackboneConfig,
        size: (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.inner_batch == 0 || config.inner_batch_test == 0 {
            candle_core::bail!(
                "Reptile's inner batch sizes must be at least 1; check --inner-batch / --inner-batch-test"
            )
        }
        let backbone = backbone.build();
        let params = head::init_linear_head_with(
            backbone.as_ref(),
            size,
            config.ways,
            config.head_init,
            rng,
            device,
        )?;
        let names: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
        let values: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().detach()).collect();
        let mut state = State::new(params, RunningStats::empty());
        InnerAdam::new(config.inner_lr, &values)?.to_extra(&names, &mut state.extra)?;
        Ok(Self { config, backbone, state, names })
    }

    /// The inner optimiser's state (carried across tasks, as in the official code).
    pub fn inner_state(&self) -> Result<InnerAdam> {
        InnerAdam::from_extra(self.config.inner_lr, &self.names, &self.state.extra)
    }

    /// [B, ways] logits with batch statistics of `x`.
    pub fn logits(&self, params: &Params, x: &Tensor) -> Result<Tensor> {
        head::linear_logits(self.backbone.as_ref(), params, x, BnMode::Batch(None))
    }

    fn theta(&self) -> Vec<Tensor> {
        self.state.params.iter().map(|(_, v)| v.as_tensor().detach()).collect()
    }

    /// Trains a copy of `theta` on `images`/`labels` for `steps` Adam steps on mini-batches of
    /// `batch`, advancing `state`.
    pub fn train_task(
        &self,
        theta: &[Tensor],
        state: &mut InnerAdam,
        images: &Tensor,
        labels: &[u32],
        (steps, batch): (usize, usize),
        rng: &mut ChaCha8Rng,
    ) -> Result<TaskResult> {
        let n = labels.len();
        let batch = batch.min(n);
        let mut current: Vec<Tensor> = theta.iter().map(|t| t.detach()).collect();
        let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
        for idx in mini_batches(n, batch, steps, rng) {
            let picked: Vec<u32> = idx.iter().map(|&i| labels[i as usize]).collect();
            let idx = Tensor::new(idx.as_slice(), images.device())?;
            let x = images.index_select(&idx, 0)?;
            let y = Tensor::new(picked.as_slice(), images.device())?;
            let vars = current.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
            let params =
                Params::from_names(&self.names, &vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
            let logits = self.logits(&params, &x)?;
            let loss = ops::cross_entropy(&logits, &y)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            acc_sum += ops::accuracy(&logits, &y)?;
            let store = loss.backward()?;
            let grads = vars
                .iter()
                .zip(&self.names)
                .map(|(v, name)| Ok(required_grad(&store, v.as_tensor(), name)?.detach()))
                .collect::<Result<Vec<_>>>()?;
            current = state.step(&current, &grads)?;
        }
        let k = steps.max(1) as f64;
        Ok(TaskResult { phi: current, loss: loss_sum / k, accuracy: acc_sum / k })
    }
}

impl Reptile {
    /// One meta-update over a meta-batch of tasks, applied to the parameters in place. Tasks run
    /// one after another: the inner Adam state flows from each task to the next. The reported
    /// loss and accuracy are those of the inner mini-batches (before each step).
    pub fn meta_step(&mut self, episodes: &[Episode], progress: Progress) -> Result<StepOutput> {
        let theta = self.theta();
        let c = self.config;
        let mut state = self.inner_state()?;
        let mut phis = Vec::with_capacity(episodes.len());
        let (mut loss, mut accuracy) = (0.0, 0.0);
        for (t, ep) in episodes.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(progress.seed ^ MINI_BATCH_SALT);
            rng.set_stream(
                progress.step.wrapping_mul(episodes.len() as u64).wrapping_add(t as u64),
            );
            let task = self.train_task(
                &theta,
                &mut state,
                &ep.support,
                &ep.support_labels,
                (c.inner_steps, c.inner_batch),
                &mut rng,
            )?;
            loss += task.loss;
            accuracy += task.accuracy;
            phis.push(task.phi);
        }
        let epsilon = c.outer_step_at(progress.step, progress.total);
        let updated = outer_update(&theta, &phis, epsilon)?;
        for ((_, var), value) in self.state.params.iter().zip(&updated) {
            var.set(value)?;
        }
        state.to_extra(&self.names, &mut self.state.extra)?;
        let n = episodes.len().max(1) as f64;
        Ok(StepOutput { loss: loss / n, accuracy: accuracy / n, lr: epsilon })
    }
}

impl Learner for Reptile {
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("Reptile", self.config.ways, ways)?;
        let mut state = self.inner_state()?;
        let mut rng = ChaCha8Rng::seed_from_u64(MINI_BATCH_SALT);
        let c = self.config;
        let task = self.train_task(
            &self.theta(),
            &mut state,
            support,
            labels,
            (c.inner_steps_test, c.inner_batch_test),
            &mut rng,
        )?;
        let params = Params::from_names(&self.names, &task.phi);
        let backbone = self.backbone.as_ref();
        Ok(Box::new(AdaptedLinear::new(backbone, params, support, c.transductive)))
    }

    /// Reptile's own meta-update; ε is annealed over the run's recorded schedule.
    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let episodes = ctx.episodes()?;
        let total = self.config.schedule_total.unwrap_or(ctx.total);
        let progress = Progress { step: ctx.step, total, seed: ctx.seed };
        let out = self.meta_step(&episodes, progress)?;
        if !out.loss.is_finite() {
            anyhow::bail!(
                "training diverged at episode {} (loss {}); lower the inner learning rate (--inner-lr)",
                ctx.step,
                out.loss
            );
        }
        Ok(out)
    }

    fn optimisers(&self) -> Vec<OptimiserSpec> {
        Vec::new()
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of Reptile (the inner-loop flags are shared: [`SharedFlags`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReptileFlags {
    /// Reptile: images per inner mini-batch during meta-training.
    #[arg(long)]
    pub inner_batch: Option<usize>,
    /// Reptile: images per inner mini-batch at test time.
    #[arg(long)]
    pub inner_batch_test: Option<usize>,
    /// Reptile: outer step size ε at the start of training (annealed linearly to --outer-step-final).
    #[arg(long, alias = "outer-lr")]
    pub outer_step: Option<f64>,
    /// Reptile: outer step size ε at the end of training.
    #[arg(long)]
    pub outer_step_final: Option<f64>,
    /// Reptile: score all queries of a test task in one batch (batch-norm statistics shared).
    #[arg(long)]
    pub transductive: bool,
}

impl Method for ReptileConfig {
    const NAMES: &'static [&'static str] = &["reptile"];
    type Flags = ReptileFlags;
    const READS_SHARED_FLAGS: bool = true;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "reptile"
    }

    fn apply(&mut self, flags: &ReptileFlags, shared: &SharedFlags) -> anyhow::Result<()> {
        self.inner_steps = shared.inner_steps.unwrap_or(self.inner_steps);
        self.inner_steps_test = shared.inner_steps_test.unwrap_or(self.inner_steps_test);
        self.inner_lr = shared.inner_lr.unwrap_or(self.inner_lr);
        self.inner_batch = flags.inner_batch.unwrap_or(self.inner_batch);
        self.inner_batch_test = flags.inner_batch_test.unwrap_or(self.inner_batch_test);
        self.outer_step = flags.outer_step.unwrap_or(self.outer_step);
        self.outer_step_final = flags.outer_step_final.unwrap_or(self.outer_step_final);
        self.transductive |= flags.transductive;
        if self.inner_batch == 0 || self.inner_batch_test == 0 {
            anyhow::bail!("--inner-batch and --inner-batch-test must be at least 1");
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        super::ensure_train_ways("reptile", self.ways, protocol)?;
        let size = protocol.data.image_size;
        Ok(Box::new(Reptile::new(*self, &protocol.backbone, (size, size), rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.ways)
    }

    fn transductive_mut(&mut self) -> Option<&mut bool> {
        Some(&mut self.transductive)
    }

    fn own_train_shots(&self) -> bool {
        true
    }

    /// ε keeps annealing over the run's original length, so an extension does not change the
    /// steps already taken; past that length it stays at ε_final.
    fn extend(&mut self, old_total: u64, new_total: u64) -> Option<String> {
        let total = *self.schedule_total.get_or_insert(old_total);
        Some(format!(
            "Reptile's outer step ε keeps its schedule: {} → {} over the first {total} meta-iterations, then {} for the rest of the {new_total}",
            self.outer_step, self.outer_step_final, self.outer_step_final
        ))
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "reptile-omniglot-5w1s",
                summary: "Nichol et al. 2018 / openai/supervised-reptile README, run_omniglot.py's split (1200 characters × 4 rotations to train, 423 unrotated to test), OmniglotModel (strided Conv4, 256-d), Pillow-nearest pixels not inverted, Omniglot 5-way 1-shot: 10 train shots per class, inner Adam (β1=0) lr 1e-3, 5 inner steps of batch 10, meta-batch 5, outer step 1→0 linearly over 100 000 meta-iterations; test: 50 steps of batch 5, 1 query per class, 10 000 tasks; non-transductive (--transductive for the transductive numbers)",
                build: || omniglot(5, 1),
            },
            Preset {
                name: "reptile-omniglot-5w5s",
                summary: "Nichol et al. 2018 / openai/supervised-reptile README, run_omniglot.py's split (1200 characters × 4 rotations to train, 423 unrotated to test), OmniglotModel (strided Conv4, 256-d), Pillow-nearest pixels not inverted, Omniglot 5-way 5-shot: 10 train shots per class, inner Adam (β1=0) lr 1e-3, 5 inner steps of batch 10, meta-batch 5, outer step 1→0 over 100 000 meta-iterations; test: 50 steps of batch 5, 1 query per class, 10 000 tasks; non-transductive",
                build: || omniglot(5, 5),
            },
            Preset {
                name: "reptile-omniglot-20w1s",
                summary: "Nichol et al. 2018 / openai/supervised-reptile README, run_omniglot.py's split (1200 characters × 4 rotations to train, 423 unrotated to test), OmniglotModel (strided Conv4, 256-d), Pillow-nearest pixels not inverted, Omniglot 20-way 1-shot: 10 train shots per class, inner Adam (β1=0) lr 5e-4, 10 inner steps of batch 20, meta-batch 5, outer step 1→0 over 200 000 meta-iterations; test: 50 steps of batch 10, 1 query per class, 10 000 tasks; non-transductive",
                build: || omniglot(20, 1),
            },
            Preset {
                name: "reptile-omniglot-20w5s",
                summary: "Nichol et al. 2018 / openai/supervised-reptile README, run_omniglot.py's split (1200 characters × 4 rotations to train, 423 unrotated to test), OmniglotModel (strided Conv4, 256-d), Pillow-nearest pixels not inverted, Omniglot 20-way 5-shot: 10 train shots per class, inner Adam (β1=0) lr 5e-4, 10 inner steps of batch 20, meta-batch 5, outer step 1→0 over 200 000 meta-iterations; test: 50 steps of batch 10, 1 query per class, 10 000 tasks; non-transductive",
                build: || omniglot(20, 5),
            },
        ]
    }
}

/// Reptile on Omniglot with the official README's settings (openai/supervised-reptile): training
/// tasks draw 10 images per class (`--train-shots 10`) and no query set, test tasks K shots and one
/// query per class. Classes: `run_omniglot.py`'s own split (our `reptile` split: Python's
/// `random.seed(0)` shuffle of the 1623 sorted characters, 1200 × 4 rotations to train on, the 423
/// others unrotated to test on); the network is `models.py`'s `OmniglotModel` (strided Conv4,
/// batch norm with scale, 256-d flattened features, Glorot-uniform dense head).
fn omniglot(ways: usize, shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data.split = "reptile".into();
    p.data.train_subset = "train".into();
    // `Image.open(f).resize((28, 28))` on the 1-bit PNGs (Pillow's NEAREST), not inverted.
    p.data.resize = crate::data::omniglot::Resize::Nearest;
    p.data.invert = false;
    p.backbone = BackboneConfig::Conv4Strided(StridedConv4Config::reptile_omniglot(1));
    p.train = EpisodeSpec::new(ways, 10, 0);
    p.meta_batch = 5;
    let reptile = if ways == 5 {
        ReptileConfig { ways, head_init: head::HeadInit::Glorot, ..ReptileConfig::default() }
    } else {
        ReptileConfig {
            ways,
            inner_steps: 10,
            inner_steps_test: 50,
            inner_batch: 20,
            inner_batch_test: 10,
            inner_lr: 0.0005,
            head_init: head::HeadInit::Glorot,
            ..ReptileConfig::default()
        }
    };
    p.episodes = if ways == 5 { 100_000 } else { 200_000 };
    p.schedule = StepDecay { lr: 0.0, step: 0, gamma: 1.0 };
    p.validation = None;
    p.test = EpisodeSpec::new(ways, shots, 1);
    p.test_episodes = 10_000;
    p.checkpoint_every = 500;
    (p, MethodConfig::Reptile(reptile))
}
