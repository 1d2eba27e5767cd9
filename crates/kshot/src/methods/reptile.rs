//! Reptile (Nichol, Achiam & Schulman 2018): for each task of a meta-batch, train a copy of θ for k
//! steps of Adam (β1 = 0) on mini-batches of the task's data, giving φ; then move θ towards the
//! tasks' mean, θ ← θ + ε·(mean φ − θ), with ε annealed linearly from ε0 to ε_final over training.
//!
//! The meta-update is not the gradient of a query loss, so Reptile owns it ([`Learner::meta_step`]).
//! As in the official code (openai/supervised-reptile), the inner Adam state (second moments and
//! step count) is one state that carries over from task to task and across meta-iterations: only
//! the weights are reset to θ before each task. It is checkpointed as a buffer. At test time each
//! task adapts from a copy of that state.
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

use super::{AdaptedConv4, Classifier, EpisodeOutput, Learner, Progress, StepOutput};
use crate::data::Episode;
use crate::nn::{ops, BnMode, Conv4, Conv4Config, ParamSet, Params};

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
        }
    }
}

impl ReptileConfig {
    /// ε at meta-iteration `step` of `total`: ε0 + (ε_final − ε0)·step/total.
    pub fn outer_step_at(&self, step: u64, total: u64) -> f64 {
        let frac = if total == 0 { 0.0 } else { step as f64 / total as f64 };
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

pub struct Reptile {
    pub config: ReptileConfig,
    backbone: Conv4,
    params: ParamSet,
    names: Vec<String>,
    inner: InnerAdam,
}

/// Domain separation for the mini-batch RNG, so it never coincides with an episode's stream.
const MINI_BATCH_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

impl Reptile {
    /// A Conv4 backbone for `height`×`width` inputs with a linear `ways`-unit output layer.
    pub fn new(
        config: ReptileConfig,
        backbone: Conv4Config,
        (height, width): (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.inner_batch == 0 || config.inner_batch_test == 0 {
            candle_core::bail!(
                "Reptile's inner batch sizes must be at least 1; check --inner-batch / --inner-batch-test"
            )
        }
        let backbone = Conv4::new(backbone);
        let params = backbone.init_with_linear_head((height, width), config.ways, rng, device)?;
        let names: Vec<String> = params.iter().map(|(n, _)| n.to_string()).collect();
        let values: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().detach()).collect();
        let inner = InnerAdam::new(config.inner_lr, &values)?;
        Ok(Self { config, backbone, params, names, inner })
    }

    /// The inner optimiser's state (carried across tasks, as in the official code).
    pub fn inner_state(&self) -> &InnerAdam {
        &self.inner
    }

    fn to_params(&self, values: &[Tensor]) -> Params {
        let mut p = Params::new();
        for (n, t) in self.names.iter().zip(values) {
            p.insert(n.clone(), t.clone());
        }
        p
    }

    /// [B, ways] logits with batch statistics of `x`.
    pub fn logits(&self, params: &Params, x: &Tensor) -> Result<Tensor> {
        self.backbone.linear_head_logits(params, x, BnMode::Batch(None))
    }

    fn theta(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, v)| v.as_tensor().detach()).collect()
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
                self.to_params(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
            let logits = self.logits(&params, &x)?;
            let loss = ops::cross_entropy(&logits, &y)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            acc_sum += ops::accuracy(&logits, &y)?;
            let store = loss.backward()?;
            let grads = vars
                .iter()
                .map(|v| match store.get(v.as_tensor()) {
                    Some(g) => Ok(g.detach()),
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<Result<Vec<_>>>()?;
            current = state.step(&current, &grads)?;
        }
        let k = steps.max(1) as f64;
        Ok(TaskResult { phi: current, loss: loss_sum / k, accuracy: acc_sum / k })
    }
}

impl Learner for Reptile {
    fn method(&self) -> &'static str {
        "reptile"
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }

    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("Reptile", self.config.ways, ways)?;
        let mut state = self.inner.clone();
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
        let params = self.to_params(&task.phi);
        Ok(Box::new(AdaptedConv4::new(&self.backbone, params, support, c.transductive)))
    }

    fn episode_loss(&mut self, _episode: &Episode) -> Result<EpisodeOutput> {
        candle_core::bail!("Reptile's meta-update is not the gradient of a query loss; it is trained through meta_step")
    }

    fn owns_update(&self) -> bool {
        true
    }

    /// Tasks run one after another: the inner Adam state flows from each task to the next.
    /// The reported loss and accuracy are those of the inner mini-batches (before each step).
    fn meta_step(&mut self, episodes: &[Episode], progress: Progress) -> Result<StepOutput> {
        let theta = self.theta();
        let c = self.config;
        let mut state = self.inner.clone();
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
        for ((_, var), value) in self.params.iter().zip(&updated) {
            var.set(value)?;
        }
        self.inner = state;
        let n = episodes.len().max(1) as f64;
        Ok(StepOutput { loss: loss / n, accuracy: accuracy / n, step_size: epsilon })
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = self
            .names
            .iter()
            .zip(&self.inner.v)
            .map(|(n, v)| (format!("inner_adam.v.{n}"), v.clone()))
            .collect();
        out.push(("inner_adam.t".into(), Tensor::new(&[self.inner.t as i64], &Device::Cpu)?));
        Ok(out)
    }

    fn load_buffers(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        let get = |key: &str| {
            tensors.get(key).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: `{key}` is missing; the file was not written by a Reptile model",
                    origin.display()
                )
            })
        };
        for (i, name) in self.names.iter().enumerate() {
            let t = get(&format!("inner_adam.v.{name}"))?;
            anyhow::ensure!(
                t.dims() == self.inner.v[i].dims(),
                "{}: inner_adam.v.{name} has shape {:?}, the model expects {:?}",
                origin.display(),
                t.dims(),
                self.inner.v[i].dims()
            );
            self.inner.v[i] = t.to_dtype(self.inner.v[i].dtype())?;
        }
        self.inner.t = get("inner_adam.t")?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}
