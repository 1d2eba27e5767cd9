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
use crate::nn::{
    ops, Backbone, BackboneConfig, BnMode, Conv4Config, ConvInit, Params, RunningStats,
    StridedConv4Config,
};
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
    /// What the inner gradient is the gradient of ([`InnerLoss`]).
    #[serde(default)]
    pub inner_loss: InnerLoss,
    /// Adapt the batch-norm parameters (`bn*`) in the inner loop. cbfinn/maml does not: its
    /// batch-norm offset is a variable of the TF layer, not one of the `weights` the inner loop
    /// differentiates, so it is meta-learned only.
    #[serde(default = "transductive_default")]
    pub adapt_batch_norm: bool,
    /// How the output layer starts.
    #[serde(default)]
    pub head_init: head::HeadInit,
    /// Clip every component of the meta-gradient to ±c, where the gradient is that of cbfinn/maml's
    /// outer loss, Σ over tasks and queries of CE / K, divided by the meta-batch (its miniImageNet
    /// runs clip at 10). That loss is N·Q/K times kshot's mean query loss, so kshot clips its own
    /// gradient at ±c·K/(N·Q).
    #[serde(default)]
    pub clip_official: Option<f64>,
}

fn transductive_default() -> bool {
    true
}

/// The support loss whose gradient the inner step follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InnerLoss {
    /// The mean cross-entropy over the N·K support examples.
    #[default]
    Mean,
    /// cbfinn/maml's `xent / update_batch_size` fed to `tf.gradients` as a vector: the *sum* of
    /// the per-example cross-entropies divided by K, which is N × the mean. With it α = 0.4 is an
    /// inner step of 2.0 on the mean loss at 5 ways, α = 0.1 one of 2.0 at 20 ways.
    SumOverShots,
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
            inner_loss: InnerLoss::Mean,
            adapt_batch_norm: true,
            head_init: head::HeadInit::Torch,
            clip_official: None,
        }
    }
}

impl MamlConfig {
    /// The step size on the mean support loss that one inner step takes: α, or α·N when the
    /// inner loss is the official sum over the support set divided by K.
    pub fn mean_loss_step(&self) -> f64 {
        match self.inner_loss {
            InnerLoss::Mean => self.inner_lr,
            InnerLoss::SumOverShots => self.inner_lr * self.ways as f64,
        }
    }

    /// Whether the inner loop adapts parameter `name` (everything but batch norm's, unless
    /// [`MamlConfig::adapt_batch_norm`]).
    pub fn adapts(&self, name: &str) -> bool {
        self.adapt_batch_norm || !name.starts_with("bn")
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
        let params = head::init_linear_head_with(
            backbone.as_ref(),
            size,
            config.ways,
            config.head_init,
            rng,
            device,
        )?;
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
        let steps_by_param = self.step_sizes(&names);
        let mut current: Vec<Tensor> = theta.iter().map(|(_, t)| t.detach()).collect();
        for _ in 0..steps {
            let g = self.gradient(&names, &current, support, labels)?.1;
            current = sgd_step(&current, &g, &steps_by_param)?;
        }
        Ok(Params::from_names(&names, &current))
    }

    /// The inner step size of each parameter, on the gradient of the mean support loss: 0 for
    /// the ones the inner loop does not adapt.
    pub fn step_sizes(&self, names: &[String]) -> Vec<f64> {
        let alpha = self.config.mean_loss_step();
        names.iter().map(|n| if self.config.adapts(n) { alpha } else { 0.0 }).collect()
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
        let names: Vec<String> = theta.iter().map(|(n, _)| n.clone()).collect();
        let alphas = self.step_sizes(&names);
        let support_labels = episode.support_labels_tensor()?;
        let query_labels = episode.query_labels_tensor()?;

        let mut trajectory = Vec::with_capacity(steps);
        let mut current: Vec<Tensor> = theta.iter().map(|(_, t)| t.detach()).collect();
        for _ in 0..steps {
            if self.config.first_order {
                let g = self.gradient(&names, &current, &episode.support, &support_labels)?.1;
                current = sgd_step(&current, &g, &alphas)?;
            } else {
                let (vars, g) =
                    self.support_gradient(&names, &current, &episode.support, &support_labels)?;
                current = sgd_step(&current, &g, &alphas)?;
                trajectory.push((vars, g));
            }
        }

        let (loss, mut v, logits) =
            self.gradient(&names, &current, &episode.query, &query_labels)?;
        let query_loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let query_accuracy = ops::accuracy(&logits, &query_labels)?;

        // θ_{k+1} = θ_k − A∇L_S(θ_k) with A = diag(α_i), so v_k = (I − H_k A) v_{k+1}: the
        // Hessian-vector product of H_k with A·v_{k+1}. With one α for all it is factored out.
        let uniform = alphas.iter().all(|&a| a == alphas[0]).then_some(alphas[0]);
        for (vars, g) in trajectory.iter().rev() {
            let mut dot: Option<Tensor> = None;
            for ((gi, vi), &a) in g.iter().zip(&v).zip(&alphas) {
                if a == 0.0 {
                    continue;
                }
                let term = match uniform {
                    Some(_) => (gi * vi)?.sum_all()?,
                    None => ((gi * vi)?.sum_all()? * a)?,
                };
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
            let scale = vec![uniform.unwrap_or(1.0); v.len()];
            v = sgd_step(&v, &hv, &scale)?;
        }
        Ok(TaskGradient { grads: Params::from_names(&names, &v), query_loss, query_accuracy })
    }
}

impl Maml {
    /// A loss whose value is the mean query loss of `tasks` and whose gradient with respect to θ is
    /// their mean meta-gradient.
    fn surrogate(&self, tasks: &[TaskGradient], spec: EpisodeSpec) -> Result<EpisodeOutput> {
        if tasks.is_empty() {
            candle_core::bail!("a meta-batch needs at least one task")
        }
        let n = tasks.len() as f64;
        let mut mean = super::mean_gradient(&self.state.params, tasks.iter().map(|t| &t.grads))?;
        if let Some(c) = self.config.clip_official {
            let official_scale = (spec.ways * spec.queries) as f64 / spec.shots as f64;
            let bound = c / official_scale;
            let mut clipped = Params::new();
            for (name, g) in mean.iter() {
                clipped.insert(name.clone(), g.clamp(-bound, bound)?);
            }
            mean = clipped;
        }
        let query_loss = tasks.iter().map(|t| t.query_loss).sum::<f64>() / n;
        let accuracy = tasks.iter().map(|t| t.query_accuracy).sum::<f64>() / n;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.state.params, &mean, query_loss)?,
            accuracy,
        })
    }
}

/// x − α_i·g as new leaves-to-be: detached, since each step's result starts a graph of its own.
fn sgd_step(x: &[Tensor], g: &[Tensor], alphas: &[f64]) -> Result<Vec<Tensor>> {
    x.iter()
        .zip(g)
        .zip(alphas)
        .map(|((x, g), &a)| {
            if a == 0.0 {
                Ok(x.detach())
            } else {
                Ok((x - (g.detach() * a)?)?.detach())
            }
        })
        .collect()
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
        let spec = episodes.first().map_or(EpisodeSpec::new(1, 1, 1), |e| e.spec);
        self.surrogate(&tasks, spec)
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

    fn test_steps_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.inner_steps_test)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "maml-omniglot-5w1s",
                summary: "Finn et al. 2017 / cbfinn/maml, Omniglot 5-way 1-shot: strided Conv4 (stride-2 SAME conv + bias, BN offset only, ε 1e-3, spatial mean), head N(0,1), Pillow-nearest pixels, inverted; 1 inner step α=0.4 on Σ CE/K (= 2 on the mean), BN not adapted; meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 1 query per class; test: 600 tasks, 10 inner steps (eval --each-inner-step reports each). Classes: the paper's 1200 training characters × 4 rotations (Vinyals trainval); --split maml gives the code's shuffled 1100/100/423 with a random rotation per class per task. Departs: rotations are fixed classes unless --split maml; fresh tasks instead of 200 000 pre-drawn",
                build: || omniglot(5, 1),
            },
            Preset {
                name: "maml-omniglot-5w5s",
                summary: "Finn et al. 2017 / cbfinn/maml, Omniglot 5-way 5-shot: strided Conv4 (stride-2 SAME conv + bias, BN offset only, ε 1e-3, spatial mean), head N(0,1), Pillow-nearest pixels, inverted; 1 inner step α=0.4 on Σ CE/K (= 2 on the mean), BN not adapted; meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; test: 600 tasks, 10 inner steps (eval --each-inner-step reports each). Classes: the paper's 1200 training characters × 4 rotations (Vinyals trainval); --split maml gives the code's shuffled 1100/100/423 with a random rotation per class per task. Departs: rotations are fixed classes unless --split maml; fresh tasks instead of 200 000 pre-drawn",
                build: || omniglot(5, 5),
            },
            Preset {
                name: "maml-omniglot-20w1s",
                summary: "Finn et al. 2017 / cbfinn/maml, Omniglot 20-way 1-shot: strided Conv4 (stride-2 SAME conv + bias, BN offset only, ε 1e-3, spatial mean), head N(0,1), Pillow-nearest pixels, inverted; 5 inner steps α=0.1 on Σ CE/K (= 2 on the mean), BN not adapted; meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 1 query per class; test: 600 tasks, 10 inner steps (eval --each-inner-step reports each). Classes: the paper's 1200 training characters × 4 rotations (Vinyals trainval); --split maml gives the code's shuffled 1100/100/423 with a random rotation per class per task. Departs: rotations are fixed classes unless --split maml; fresh tasks instead of 200 000 pre-drawn",
                build: || omniglot(20, 1),
            },
            Preset {
                name: "maml-omniglot-20w5s",
                summary: "Finn et al. 2017 / cbfinn/maml, Omniglot 20-way 5-shot: strided Conv4 (stride-2 SAME conv + bias, BN offset only, ε 1e-3, spatial mean), head N(0,1), Pillow-nearest pixels, inverted; 5 inner steps α=0.1 on Σ CE/K (= 2 on the mean), BN not adapted; meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; test: 600 tasks, 10 inner steps (eval --each-inner-step reports each). Classes: the paper's 1200 training characters × 4 rotations (Vinyals trainval); --split maml gives the code's shuffled 1100/100/423 with a random rotation per class per task. Departs: rotations are fixed classes unless --split maml; fresh tasks instead of 200 000 pre-drawn",
                build: || omniglot(20, 5),
            },
            Preset {
                name: "maml-miniimagenet-5w1s",
                summary: "Finn et al. 2017 / cbfinn/maml, miniImageNet 5-way 1-shot (Ravi split; our train classes hold 300 of 600 images): Conv4 with 32 filters and max-pool, conv bias-free (BN follows), BN offset only, ε 1e-3, Glorot init; 5 inner steps α=0.01 on Σ CE/K (= 0.05 on the mean), BN not adapted; meta-batch 4, 15 queries per class in training, meta-gradient clipped to ±10 on the code's loss scale, Adam 1e-3, 60 000 meta-iterations; test: 600 tasks, 1 query per class, 10 inner steps. Departs: conv without bias (no effect before batch norm)",
                build: || mini_imagenet(1),
            },
            Preset {
                name: "maml-miniimagenet-5w5s",
                summary: "Finn et al. 2017 / cbfinn/maml, miniImageNet 5-way 5-shot (Ravi split; our train classes hold 300 of 600 images): Conv4 with 32 filters and max-pool, BN offset only, ε 1e-3, Glorot init; 5 inner steps α=0.01 on Σ CE/K (= 0.05 on the mean), BN not adapted; meta-batch 4 (the code's README; the paper says 2), 15 queries per class in training, meta-gradient clipped to ±10 on the code's loss scale, Adam 1e-3, 60 000 meta-iterations; test: 600 tasks, 5 queries per class, 10 inner steps. Departs: conv without bias (no effect before batch norm)",
                build: || mini_imagenet(5),
            },
        ]
    }
}

/// MAML on Omniglot as in Finn et al. 2017 (Appendix A.1) and cbfinn/maml (`main.py`, `maml.py`,
/// `utils.py`): the strided Conv4 with a spatial mean, batch statistics always, the batch-norm
/// offset meta-learned but not adapted, head N(0, 1), the inner gradient of Σ CE / K, K queries
/// per class, 10 test steps, 600 test tasks. Classes: the paper's 1200 training characters with
/// rotations (our `trainval`: train + validation of the Vinyals split, 4800 classes).
fn omniglot(ways: usize, shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data.train_subset = "trainval".into();
    // `Image.resize(…, LANCZOS)` on the 1-bit PNGs is Pillow's NEAREST; then `1.0 - image`.
    p.data.resize = crate::data::omniglot::Resize::Nearest;
    p.backbone = BackboneConfig::Conv4Strided(StridedConv4Config::maml_omniglot(1));
    p.train = EpisodeSpec::new(ways, shots, shots);
    p.meta_batch = if ways == 5 { 32 } else { 16 };
    p.episodes = 60_000;
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = None;
    p.test = EpisodeSpec::new(ways, shots, shots);
    p.test_episodes = 600;
    p.checkpoint_every = 100;
    let (inner_steps, inner_lr) = if ways == 5 { (1, 0.4) } else { (5, 0.1) };
    let maml = MamlConfig {
        ways,
        inner_steps,
        inner_steps_test: 10,
        inner_lr,
        inner_loss: InnerLoss::SumOverShots,
        adapt_batch_norm: false,
        head_init: head::HeadInit::Normal,
        ..Default::default()
    };
    (p, MethodConfig::Maml(maml))
}

/// MAML on miniImageNet as in Finn et al. 2017 (Section 5.1) and cbfinn/maml's README commands:
/// Conv4 with 32 filters and max-pool, batch-norm offset only (ε 1e-3), Glorot init, 5 inner steps
/// of α = 0.01 on Σ CE / K (10 at test), meta-batch 4, 15 queries per class in training and K at
/// test, the meta-gradient clipped at ±10; 600 test tasks.
fn mini_imagenet(shots: usize) -> (Protocol, MethodConfig) {
    let (mut p, _) = omniglot(5, shots);
    p.data = DataConfig::mini_imagenet();
    p.backbone = BackboneConfig::Conv4(Conv4Config {
        hidden: 32,
        bn_eps: 1e-3,
        bn_momentum: 1e-3,
        bn_scale: false,
        conv_init: ConvInit::Glorot,
        ..Conv4Config::new(3)
    });
    p.train = EpisodeSpec::new(5, shots, 15);
    p.meta_batch = 4;
    p.test = EpisodeSpec::new(5, shots, shots);
    p.test_episodes = 600;
    let maml = MamlConfig {
        ways: 5,
        inner_steps: 5,
        inner_steps_test: 10,
        inner_lr: 0.01,
        inner_loss: InnerLoss::SumOverShots,
        adapt_batch_norm: false,
        head_init: head::HeadInit::Glorot,
        clip_official: Some(10.0),
        ..Default::default()
    };
    (p, MethodConfig::Maml(maml))
}
