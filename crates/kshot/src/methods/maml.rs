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
//! and dL_Q/dθ = v_0. First-order MAML stops at v_K. When the backbone has an explicit backward
//! pass the support and query gradients come from it, so each Hessian-vector product
//! differentiates only the forward pass and the fused backward ops (not candle's gradient
//! accumulators). Batch norm uses the statistics of the current batch at training and at test
//! time, as in the paper.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    AdaptedLinear, Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags,
    State, StepCtx, StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::nn::head::{self, Graph};
use crate::nn::{ops, Backbone, BackboneConfig, BnMode, Conv4Config, Params, RunningStats};
use crate::optim::StepDecay;
use crate::protocol::{DataConfig, Protocol};

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
    backbone: Box<dyn Backbone>,
    state: State,
}

impl Maml {
    /// A backbone for `height`×`width` inputs with a linear `ways`-unit output layer.
    pub fn new(
        config: MamlConfig,
        backbone: &BackboneConfig,
        size: (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let backbone = backbone.build();
        let params = head::init_linear_head(backbone.as_ref(), size, config.ways, rng, device)?;
        let state = State::new(params, RunningStats::empty());
        Ok(Self { config, parallel_tasks: true, backbone, state })
    }

    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    /// [B, ways] logits with batch statistics of `x`.
    pub fn logits(&self, params: &Params, x: &Tensor) -> Result<Tensor> {
        head::linear_logits(self.backbone.as_ref(), params, x, BnMode::Batch(None))
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
        Ok(Params::from_names(&names, &current))
    }

    /// The loss, gradient and logits at `values`, all detached from any graph.
    fn gradient(
        &self,
        names: &[String],
        values: &[Tensor],
        x: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>, Tensor)> {
        let params = Params::from_names(names, values);
        let out = head::linear_loss_and_grad(
            self.backbone.as_ref(),
            &params,
            x,
            labels,
            Graph::Detached,
        )?;
        let grads = names.iter().map(|n| Ok(out.grads.get(n)?.clone())).collect::<Result<_>>()?;
        Ok((out.loss, grads, out.logits))
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
            Params::from_names(names, &vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        let out = head::linear_loss_and_grad(
            self.backbone.as_ref(),
            &params,
            support,
            labels,
            Graph::Keep,
        )?;
        let grads = names.iter().map(|n| Ok(out.grads.get(n)?.clone())).collect::<Result<_>>()?;
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
            let hv = vars
                .iter()
                .zip(&names)
                .map(|(var, name)| head::required_grad(&store, var.as_tensor(), name))
                .collect::<Result<Vec<_>>>()?;
            v = sgd_step(&v, &hv, alpha)?;
        }
        Ok(TaskGradient { grads: Params::from_names(&names, &v), query_loss, query_accuracy })
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
        let mean = super::mean_gradient(&self.state.params, tasks.iter().map(|t| &t.grads))?;
        let query_loss = tasks.iter().map(|t| t.query_loss).sum::<f64>() / n;
        let accuracy = tasks.iter().map(|t| t.query_accuracy).sum::<f64>() / n;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.state.params, &mean, query_loss)?,
            accuracy,
        })
    }
}

/// x − α·g as new leaves-to-be: detached, since each step's result starts a graph of its own.
fn sgd_step(x: &[Tensor], g: &[Tensor], alpha: f64) -> Result<Vec<Tensor>> {
    x.iter().zip(g).map(|(x, g)| Ok((x - (g.detach() * alpha)?)?.detach())).collect()
}

impl Maml {
    /// The query loss of one training task; its gradient is the (first- or second-order)
    /// meta-gradient.
    pub fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        self.meta_batch_loss(std::slice::from_ref(episode))
    }

    /// The mean query loss of a meta-batch, whose gradient is the mean meta-gradient. Tasks run
    /// in parallel, one per thread, when [`Maml::parallel_tasks`] is set: with small support sets
    /// that keeps both cores busier than splitting each task's small ops.
    pub fn meta_batch_loss(&self, episodes: &[Episode]) -> Result<EpisodeOutput> {
        let theta = self.state.params.detached_values();
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
}

impl Learner for Maml {
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("MAML", self.config.ways, ways)?;
        let labels = Tensor::new(labels, support.device())?;
        let params = self.adapt_params(
            &self.state.params.detached_values(),
            support,
            &labels,
            self.config.inner_steps_test,
        )?;
        let backbone = self.backbone.as_ref();
        Ok(Box::new(AdaptedLinear::new(backbone, params, support, self.config.transductive)))
    }

    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        super::episodic_step(ctx, |episodes| self.meta_batch_loss(episodes))
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of MAML (the inner-loop flags are shared: [`SharedFlags`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MamlFlags {
    /// MAML: drop the second-order term (same as --method fomaml).
    #[arg(long)]
    pub first_order: bool,
}

impl Method for MamlConfig {
    const NAMES: &'static [&'static str] = &["maml", "fomaml"];
    type Flags = MamlFlags;
    const READS_SHARED_FLAGS: bool = true;

    fn named(name: &str) -> Self {
        Self { first_order: name == "fomaml", ..Self::default() }
    }

    fn name(&self) -> &'static str {
        if self.first_order {
            "fomaml"
        } else {
            "maml"
        }
    }

    fn set_name(&mut self, name: &str) {
        self.first_order = name == "fomaml";
    }

    fn apply(&mut self, flags: &MamlFlags, shared: &SharedFlags) -> anyhow::Result<()> {
        self.inner_steps = shared.inner_steps.unwrap_or(self.inner_steps);
        self.inner_steps_test = shared.inner_steps_test.unwrap_or(self.inner_steps_test);
        self.inner_lr = shared.inner_lr.unwrap_or(self.inner_lr);
        self.first_order |= flags.first_order;
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        super::ensure_train_ways("MAML", self.ways, protocol)?;
        if !self.first_order {
            anyhow::ensure!(
                crate::autograd::second_order_available(),
                "second-order MAML needs {} set to 1 before any backward pass (candle would silently drop the second-order terms); unset it or use --method fomaml",
                crate::autograd::KEEP_GRAPH_VAR
            );
        }
        let size = protocol.data.image_size;
        Ok(Box::new(Maml::new(*self, &protocol.backbone, (size, size), rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.ways)
    }

    fn transductive_mut(&mut self) -> Option<&mut bool> {
        Some(&mut self.transductive)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "maml-omniglot-5w1s",
                summary: "Finn et al. 2017, Omniglot 5-way 1-shot: 1 inner step α=0.4 (3 at test), meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 1 query per class (official code); 600 test tasks",
                build: || omniglot(5, 1),
            },
            Preset {
                name: "maml-omniglot-5w5s",
                summary: "Finn et al. 2017, Omniglot 5-way 5-shot: 1 inner step α=0.4 (3 at test), meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; 600 test tasks",
                build: || omniglot(5, 5),
            },
            Preset {
                name: "maml-omniglot-20w1s",
                summary: "Finn et al. 2017, Omniglot 20-way 1-shot: 5 inner steps α=0.1 (5 at test), meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 1 query per class; 600 test tasks",
                build: || omniglot(20, 1),
            },
            Preset {
                name: "maml-omniglot-20w5s",
                summary: "Finn et al. 2017, Omniglot 20-way 5-shot: 5 inner steps α=0.1 (5 at test), meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; 600 test tasks",
                build: || omniglot(20, 5),
            },
            Preset {
                name: "maml-miniimagenet-5w1s",
                summary: "Finn et al. 2017, miniImageNet 5-way 1-shot (Ravi split, train classes): Conv4 with 32 filters, 84×84, 5 inner steps α=0.01 (10 at test), meta-batch 4, 15 queries per class, Adam 1e-3, 60 000 meta-iterations; 600 test tasks",
                build: || mini_imagenet(1),
            },
            Preset {
                name: "maml-miniimagenet-5w5s",
                summary: "Finn et al. 2017, miniImageNet 5-way 5-shot (Ravi split, train classes): Conv4 with 32 filters, 84×84, 5 inner steps α=0.01 (10 at test), meta-batch 2, 15 queries per class, Adam 1e-3, 60 000 meta-iterations; 600 test tasks",
                build: || mini_imagenet(5),
            },
        ]
    }
}

/// MAML on Omniglot as in Finn et al. 2017 (Appendix A.1) and the official code: 1200 training
/// characters (our `trainval`: train + validation of the Vinyals split) with rotations, Conv4 with 64
/// filters and batch statistics at test time, K queries per class, 600 test tasks.
fn omniglot(ways: usize, shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data.train_subset = "trainval".into();
    p.train = EpisodeSpec::new(ways, shots, shots);
    p.meta_batch = if ways == 5 { 32 } else { 16 };
    p.episodes = 60_000;
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = None;
    p.test = EpisodeSpec::new(ways, shots, shots);
    p.test_episodes = 600;
    p.checkpoint_every = 100;
    let maml = if ways == 5 {
        MamlConfig {
            ways,
            inner_steps: 1,
            inner_steps_test: 3,
            inner_lr: 0.4,
            ..Default::default()
        }
    } else {
        MamlConfig {
            ways,
            inner_steps: 5,
            inner_steps_test: 5,
            inner_lr: 0.1,
            ..Default::default()
        }
    };
    (p, MethodConfig::Maml(maml))
}

/// MAML on miniImageNet as in Finn et al. 2017 (Section 5.1, Appendix A.1): Conv4 with 32 filters,
/// 5 inner steps of α = 0.01 (10 at test), meta-batch 4 tasks for 1-shot and 2 for 5-shot, 15
/// queries per class, trained on the 64 train classes; 600 test tasks.
fn mini_imagenet(shots: usize) -> (Protocol, MethodConfig) {
    let (mut p, _) = omniglot(5, shots);
    p.data = DataConfig::mini_imagenet();
    p.backbone = BackboneConfig::Conv4(Conv4Config { hidden: 32, ..Conv4Config::new(3) });
    p.train = EpisodeSpec::new(5, shots, 15);
    p.meta_batch = if shots == 1 { 4 } else { 2 };
    p.test = EpisodeSpec::new(5, shots, 15);
    p.test_episodes = 600;
    let maml = MamlConfig {
        ways: 5,
        inner_steps: 5,
        inner_steps_test: 10,
        inner_lr: 0.01,
        ..Default::default()
    };
    (p, MethodConfig::Maml(maml))
}
