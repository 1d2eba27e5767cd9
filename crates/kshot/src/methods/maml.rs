//! MAML (Finn, Abbeel & Levine 2017): θ is adapted to a task by K steps of SGD on the support loss,
//! φ = θ − α∇L_S(θ) (repeated), and meta-trained on the query loss of φ.
//!
//! The meta-gradient is exact to second order. candle drops the gradients of non-leaf tensors, so the
//! inner loop cannot be differentiated by unrolling it; instead the trajectory θ_0 … θ_K is kept as
//! leaves with their gradient graphs, and the meta-gradient is pulled back through each step with
//! Hessian-vector products:
//!
//!   v_K = ∇L_Q(θ_K),   v_k = (I − α H_k) v_{k+1} = v_{k+1} − α ∇_θ(∇L_S(θ_k) · v_{k+1}),
//!
//! and dL_Q/dθ = v_0. First-order MAML stops at v_K. With the fused kernels the support and query
//! gradients come from Conv4's explicit backward pass, so each Hessian-vector product differentiates
//! only the forward pass and the fused backward ops (not candle's gradient accumulators). Batch norm uses the statistics of the current
//! batch at training and at test time, as in the paper.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{AdaptedConv4, Classifier, EpisodeOutput, Learner};
use crate::data::Episode;
use crate::nn::{ops, BnMode, Conv4, Conv4Config, ParamSet, Params};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MamlConfig {
    /// Classes per task: the width of the output layer.
    pub ways: usize,
    /// Inner SGD steps during meta-training.
    pub inner_steps: usize,
    /// Inner SGD steps when adapting to a test task.
    pub inner_steps_test: usize,
    /// Inner step size α.
    pub inner_lr: f64,
    /// Drop the second-order term (FOMAML).
    pub first_order: bool,
    /// Batch norm always uses the statistics of the batch at hand (the paper): the support set in
    /// the inner loop, the query set for the query loss. At test time this scores all of a task's
    /// queries in one batch, so they share statistics (transductive, the paper's and the official
    /// code's evaluation); with `false` each query is scored in a batch with the support set alone.
    #[serde(default = "transductive_default")]
    pub transductive: bool,
}

fn transductive_default() -> bool {
    true
}

impl Default for MamlConfig {
    fn default() -> Self {
        Self {
            ways: 5,
            inner_steps: 1,
            inner_steps_test: 3,
            inner_lr: 0.4,
            first_order: false,
            transductive: true,
        }
    }
}

/// The meta-gradient of one task, by parameter name.
pub struct TaskGradient {
    pub grads: Params,
    pub query_loss: f64,
    pub query_accuracy: f64,
}

pub struct Maml {
    pub config: MamlConfig,
    /// Run the tasks of a meta-batch in parallel (the result is the same either way).
    pub parallel_tasks: bool,
    backbone: Conv4,
    params: ParamSet,
}

impl Maml {
    /// A Conv4 backbone for `height`×`width` inputs with a linear `ways`-unit output layer.
    pub fn new(
        config: MamlConfig,
        backbone: Conv4Config,
        (height, width): (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let backbone = Conv4::new(backbone);
        let params = backbone.init_with_linear_head((height, width), config.ways, rng, device)?;
        Ok(Self { config, parallel_tasks: true, backbone, params })
    }

    pub fn backbone(&self) -> &Conv4 {
        &self.backbone
    }

    /// [B, ways] logits with batch statistics of `x`.
    pub fn logits(&self, params: &Params, x: &Tensor) -> Result<Tensor> {
        self.backbone.linear_head_logits(params, x, BnMode::Batch(None))
    }

    fn loss(&self, params: &Params, x: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.logits(params, x)?;
        Ok((ops::cross_entropy(&logits, labels)?, logits))
    }

    /// φ after `steps` inner SGD steps from `theta`, without a graph back to θ (for inference).
    pub fn adapt_params(
        &self,
        theta: &Params,
        support: &Tensor,
        labels: &Tensor,
        steps: usize,
    ) -> Result<Params> {
        let names: Vec<String> = theta.iter().map(|(n, _)| n.clone()).collect();
        let mut current: Vec<Tensor> = theta.iter().map(|(_, t)| t.detach()).collect();
        for _ in 0..steps {
            let g = self.gradient(&names, &current, support, labels)?.1;
            current = sgd_step(&current, &g, self.config.inner_lr)?;
        }
        Ok(to_params(&names, &current))
    }

    /// The loss, logits and gradient at `values`, all detached from any graph.
    fn gradient(
        &self,
        names: &[String],
        values: &[Tensor],
        x: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>, Tensor)> {
        if self.backbone.config.fast_kernels {
            let values: Vec<Tensor> = values.iter().map(|v| v.detach()).collect();
            let out =
                self.backbone.linear_head_loss_and_grad(&to_params(names, &values), x, labels)?;
            let grads =
                names.iter().map(|n| Ok(out.grads.get(n)?.detach())).collect::<Result<Vec<_>>>()?;
            return Ok((out.loss.detach(), grads, out.logits.detach()));
        }
        let vars = values.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let params =
            to_params(names, &vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        let (loss, logits) = self.loss(&params, x, labels)?;
        let store = loss.backward()?;
        let grads = vars
            .iter()
            .map(|v| Ok(grad_or_zeros(&store, v)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Ok((loss.detach(), grads, logits.detach()))
    }

    /// Leaves at `values` and the support-loss gradient there, still attached to its graph.
    fn support_gradient(
        &self,
        names: &[String],
        values: &[Tensor],
        support: &Tensor,
        labels: &Tensor,
    ) -> Result<(Vec<Var>, Vec<Tensor>)> {
        let vars = values.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
        let params =
            to_params(names, &vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        if self.backbone.config.fast_kernels {
            let out = self.backbone.linear_head_loss_and_grad(&params, support, labels)?;
            let grads =
                names.iter().map(|n| Ok(out.grads.get(n)?.clone())).collect::<Result<Vec<_>>>()?;
            return Ok((vars, grads));
        }
        let (loss, _) = self.loss(&params, support, labels)?;
        let store = loss.backward()?;
        let grads = vars.iter().map(|v| grad_or_zeros(&store, v)).collect::<Result<Vec<_>>>()?;
        Ok((vars, grads))
    }

    /// dL_Q(φ(θ))/dθ for one task, with `steps` inner steps from `theta`.
    pub fn task_gradient(
        &self,
        theta: &Params,
        episode: &Episode,
        steps: usize,
    ) -> Result<TaskGradient> {
        let alpha = self.config.inner_lr;
        let names: Vec<String> = theta.iter().map(|(n, _)| n.clone()).collect();
        let support_labels = episode.support_labels_tensor()?;
        let query_labels = episode.query_labels_tensor()?;

        let mut trajectory = Vec::with_capacity(steps);
        let mut current: Vec<Tensor> = theta.iter().map(|(_, t)| t.detach()).collect();
        for _ in 0..steps {
            if self.config.first_order {
                let g = self.gradient(&names, &current, &episode.support, &support_labels)?.1;
                current = sgd_step(&current, &g, alpha)?;
            } else {
                let (vars, g) =
                    self.support_gradient(&names, &current, &episode.support, &support_labels)?;
                current = sgd_step(&current, &g, alpha)?;
                trajectory.push((vars, g));
            }
        }

        let (loss, mut v, logits) =
            self.gradient(&names, &current, &episode.query, &query_labels)?;
        let query_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let query_accuracy = ops::accuracy(&logits, &query_labels)?;

        for (vars, g) in trajectory.iter().rev() {
            let mut dot: Option<Tensor> = None;
            for (gi, vi) in g.iter().zip(&v) {
                let term = (gi * vi)?.sum_all()?;
                dot = Some(match dot {
                    Some(d) => (d + term)?,
                    None => term,
                });
            }
            let Some(dot) = dot else { break };
            let store = dot.backward()?;
            let hv =
                vars.iter().map(|var| grad_or_zeros(&store, var)).collect::<Result<Vec<_>>>()?;
            v = sgd_step(&v, &hv, alpha)?;
        }
        Ok(TaskGradient { grads: to_params(&names, &v), query_loss, query_accuracy })
    }
}

impl Maml {
    /// A loss whose value is the mean query loss of `tasks` and whose gradient with respect to θ is
    /// their mean meta-gradient.
    fn surrogate(&self, tasks: &[TaskGradient]) -> Result<EpisodeOutput> {
        if tasks.is_empty() {
            candle_core::bail!("a meta-batch needs at least one task")
        }
        let n = tasks.len() as f64;
        let mean = super::mean_gradient(&self.params, tasks.iter().map(|t| &t.grads))?;
        let query_loss = tasks.iter().map(|t| t.query_loss).sum::<f64>() / n;
        let accuracy = tasks.iter().map(|t| t.query_accuracy).sum::<f64>() / n;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.params, &mean, query_loss)?,
            accuracy,
        })
    }
}

fn to_params(names: &[String], values: &[Tensor]) -> Params {
    let mut p = Params::new();
    for (n, t) in names.iter().zip(values) {
        p.insert(n.clone(), t.clone());
    }
    p
}

fn grad_or_zeros(store: &candle_core::backprop::GradStore, var: &Var) -> Result<Tensor> {
    match store.get(var.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => var.as_tensor().zeros_like(),
    }
}

/// x − α·g as new leaves-to-be: detached, since each step's result starts a graph of its own.
fn sgd_step(x: &[Tensor], g: &[Tensor], alpha: f64) -> Result<Vec<Tensor>> {
    x.iter().zip(g).map(|(x, g)| Ok((x - (g.detach() * alpha)?)?.detach())).collect()
}

impl Learner for Maml {
    fn method(&self) -> &'static str {
        if self.config.first_order {
            "fomaml"
        } else {
            "maml"
        }
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
        super::ensure_ways("MAML", self.config.ways, ways)?;
        let labels = Tensor::new(labels, support.device())?;
        let params = self.adapt_params(
            &self.params.detached_values(),
            support,
            &labels,
            self.config.inner_steps_test,
        )?;
        Ok(Box::new(AdaptedConv4::new(&self.backbone, params, support, self.config.transductive)))
    }

    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let theta = self.params.detached_values();
        let task = self.task_gradient(&theta, episode, self.config.inner_steps)?;
        self.surrogate(&[task])
    }

    /// Tasks run in parallel, one per thread, when [`Maml::parallel_tasks`] is set: with small
    /// support sets that keeps both cores busier than splitting each task's small ops.
    fn meta_batch_loss(&mut self, episodes: &[Episode]) -> Result<EpisodeOutput> {
        let theta = self.params.detached_values();
        let steps = self.config.inner_steps;
        let tasks: Vec<TaskGradient> = if self.parallel_tasks && episodes.len() > 1 {
            episodes
                .par_iter()
                .map(|ep| self.task_gradient(&theta, ep, steps))
                .collect::<Result<_>>()?
        } else {
            episodes
                .iter()
                .map(|ep| self.task_gradient(&theta, ep, steps))
                .collect::<Result<_>>()?
        };
        self.surrogate(&tasks)
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    fn load_buffers(
        &mut self,
        _tensors: &std::collections::HashMap<String, Tensor>,
        _origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        Ok(())
    }
}
