//! Meta-LSTM (Ravi & Larochelle 2017, "Optimization as a model for few-shot learning"): the learner's
//! weights are the cell state of an LSTM. Every coordinate of the learner is updated by the same
//! small two-layer meta-learner (its weights shared across coordinates):
//!
//! - layer 1, an ordinary LSTM (hidden size 20) over the preprocessed gradient and loss
//!   x_t = [pre(∇_t), pre(L_t)] (Andrychowicz et al. 2016: (log|x|/p, sgn x) when |x| ≥ e^−p, else
//!   (−1, e^p·x); p = 10);
//! - layer 2, the cell whose state is the weights: c_t = f_t ⊙ c_{t−1} − i_t ⊙ ∇_t, with
//!   i_t = σ(W_I·[h_t, x_t, c_{t−1}, i_{t−1}] + b_I) and f_t = σ(W_F·[h_t, x_t, c_{t−1}, f_{t−1}] + b_F).
//!
//! The initial weights c_0 are meta-learned too. Each of the T inner steps takes the gradient of the
//! learner's loss on the whole support set; the meta-learner is trained on the query loss of c_T.
//!
//! **First order, as in the paper**: the learner's loss L_t and gradient ∇_t enter the meta-learner
//! as inputs with no gradient path back to c_{t−1} (the second-derivative terms are dropped); the
//! meta-gradient flows through c_{t−1} → c_t (the forget term, the gates' dependence on c_{t−1}) and
//! into W, b and c_0. Batch norm uses the statistics of the current batch at each inner step and
//! for the training queries; test queries are scored with running statistics gathered over the
//! support steps, as the official code's `evaluate` mode does ([`TestBn::SupportRunning`]; the
//! older transductive scoring is [`TestBn::Batch`]). The learner's gradient enters the
//! meta-learner as ∇(mean CE)/B, as in the official code ([`MetaLstmConfig::grad_over_batch`]).
//!
//! Known departures from the official code (twitter/meta-learning-lstm) that the fused kernel
//! fixes: the gates see [h_t, x_t, c_{t−1}, gate_{t−1}] (the official gates see [h_t, c_{t−1},
//! gate_{t−1}], without the preprocessed x_t), and the previous gate is fed back after the
//! sigmoid (the official code feeds back the pre-sigmoid value). The learner's convolutions have
//! no bias (the official ones do; their gradient is zero in front of batch norm).
//!
//! The meta-learner runs in a fused kernel ([`kernels::meta_lstm_unroll`]) with an explicit
//! backward pass; the learner's gradients come from its backbone's explicit backward pass when it
//! has one. Training
//! returns a surrogate loss whose value is the query loss and whose gradient is the meta-gradient,
//! clipped in norm as in the paper's code ([`MetaLstmConfig::grad_clip`]). The candle-graph
//! implementation ([`MetaLstm::reference_query_loss`]) computes the same function and is kept as
//! the tests' oracle.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::kernels::{self, MetaLstmGrads, MetaLstmUnroll, MetaLstmWeights};
use crate::nn::head::{self, Graph};
use crate::nn::RunningStats;
use crate::nn::{init, ops, Backbone, BackboneConfig, BnMode, Conv4Config, ParamSet, Params};
use crate::optim::StepDecay;
use crate::protocol::{DataConfig, Protocol, Validation};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetaLstmConfig {
    /// Classes per task: the width of the learner's output layer.
    pub ways: usize,
    /// Learner updates T during meta-training.
    pub inner_steps: usize,
    /// Learner updates when adapting to a test task.
    pub inner_steps_test: usize,
    /// Hidden units of the first (ordinary) LSTM layer.
    pub hidden: usize,
    /// The preprocessing constant p.
    pub preprocess_p: f64,
    /// The meta-gradient (all meta-parameters together, c_0 included) is scaled down to this norm
    /// when longer, as in the paper's code (0.25); 0 turns clipping off. Configs written before this
    /// setting existed trained without clipping and read as 0.
    #[serde(default)]
    pub grad_clip: f64,
    /// Batch-norm statistics of the learner when a test task's queries are scored. Configs written
    /// before this setting existed scored with the queries' batch statistics and read as `batch`.
    #[serde(default)]
    pub test_bn: TestBn,
    /// Divide the learner's gradient fed to the meta-learner by the support-batch size, as the
    /// official code does (`gradParameters:div(inputs:size(1))` after the mean CE's backward:
    /// ∇(mean CE)/B). Older configs read as false (∇ mean CE).
    #[serde(default)]
    pub grad_over_batch: bool,
    /// The official code's initialisation: layer 1 U(±0.01), forget-gate bias U(4, 5), the
    /// learner's batch-norm scale U(0, 1). False (older configs): layer 1 U(±1/√H), forget-gate
    /// bias U(4, 6), batch-norm scale 1.
    #[serde(default)]
    pub official_init: bool,
}

/// Where the learner's batch norm takes its statistics when a test task's queries are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TestBn {
    /// The query batch's own statistics (transductive: a query's score depends on the others).
    #[default]
    Batch,
    /// The official code's `evaluate` mode: running averages reset to (0, 1) at each task and
    /// updated by each of the T support steps' forward passes (with the backbone's momentum, the
    /// newest batch weighted by it), then fixed for the queries: a query's score does not depend
    /// on the other queries.
    SupportRunning,
}

impl Default for MetaLstmConfig {
    fn default() -> Self {
        Self {
            ways: 5,
            inner_steps: 12,
            inner_steps_test: 12,
            hidden: 20,
            preprocess_p: 10.0,
            grad_clip: 0.25,
            test_bn: TestBn::SupportRunning,
            grad_over_batch: true,
            official_init: true,
        }
    }
}

/// The learner's loss and (detached) gradient at one inner step: the meta-learner's inputs.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// [P] or [P, 1], in the order of c.
    pub grad: Tensor,
    pub loss: f64,
}

/// The first-order meta-gradient of one episode's query loss, by meta-parameter name.
pub struct MetaGradient {
    pub grads: Params,
    pub query_loss: f64,
    pub query_accuracy: f64,
}

/// Andrychowicz et al.'s preprocessing of each entry of `x` ([N] or [N, 1]) into [N, 2]:
/// (log|x|/p, sgn x) when |x| ≥ e^−p, else (−1, e^p·x).
pub fn preprocess(x: &Tensor, p: f64) -> Result<Tensor> {
    let x = x.flatten_all()?;
    let abs = x.abs()?;
    let big = abs.ge((-p).exp())?;
    let first = big.where_cond(&(abs.log()? / p)?, &x.ones_like()?.neg()?)?;
    let second = big.where_cond(&x.sign()?, &(&x * p.exp())?)?;
    Tensor::stack(&[first, second], 1)
}

/// σ(z·w + b): one gate value per row of `z` [P, n], with `w` [n, 1] and `b` [1].
pub fn gate(z: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    sigmoid(&z.matmul(w)?.broadcast_add(b)?)
}

/// The weights-as-cell-state update c_t = f ⊙ c_{t−1} − i ⊙ ∇.
pub fn cell_update(c_prev: &Tensor, grad: &Tensor, i: &Tensor, f: &Tensor) -> Result<Tensor> {
    (f * c_prev)? - (i * grad)?
}

/// σ(x) = (1 + tanh(x/2)) / 2: three ops where 1/(1 + e^−x) takes four (every op of the unrolled
/// graph is kept for the backward pass, [P, 4H] at a time).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    x.affine(0.5, 0.0)?.tanh()?.affine(0.5, 0.5)
}

/// The names of the meta-learner's shared weights, in [`MetaLstmWeights`]' field order.
const WEIGHT_NAMES: [&str; 7] = [
    "lstm.w_ih",
    "lstm.w_hh",
    "lstm.bias",
    "gate_i.weight",
    "gate_i.bias",
    "gate_f.weight",
    "gate_f.bias",
];

fn weights_of(meta: &Params) -> Result<MetaLstmWeights> {
    let [w_ih, w_hh, bias, gate_i_weight, gate_i_bias, gate_f_weight, gate_f_bias] =
        WEIGHT_NAMES.map(|n| meta.get(n).map(Tensor::detach));
    Ok(MetaLstmWeights {
        w_ih: w_ih?,
        w_hh: w_hh?,
        bias: bias?,
        gate_i_weight: gate_i_weight?,
        gate_i_bias: gate_i_bias?,
        gate_f_weight: gate_f_weight?,
        gate_f_bias: gate_f_bias?,
    })
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

pub struct MetaLstm {
    pub config: MetaLstmConfig,
    backbone: Box<dyn Backbone>,
    state: State,
    /// The learner's parameters (without the `learner.` prefix) and their shapes, in c's order.
    learner: Vec<(String, Vec<usize>)>,
}

impl MetaLstm {
    /// A Conv4 learner for `height`×`width` inputs with a linear `ways`-unit output layer, and the
    /// meta-learner over its coordinates.
    pub fn new(
        config: MetaLstmConfig,
        backbone: &BackboneConfig,
        size: (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.hidden == 0 {
            candle_core::bail!("the meta-learner LSTM needs at least 1 hidden unit")
        }
        let backbone = backbone.build();
        let learner_init =
            head::init_linear_head(backbone.as_ref(), size, config.ways, rng, device)?;
        let mut params = ParamSet::new();
        let mut learner = Vec::new();
        for (name, var) in learner_init.iter() {
            learner.push((name.to_string(), var.dims().to_vec()));
            // Torch's BatchNormalization init draws its scale from U(0, 1) (bias 0).
            let t = if config.official_init && name.starts_with("bn") && name.ends_with(".weight")
            {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(0.0..1.0)).collect();
                Tensor::from_vec(v, var.dims(), device)?
            } else {
                var.as_tensor().detach()
            };
            params.push(format!("learner.{name}"), t)?;
        }
        let h = config.hidden;
        // Layer 1, gate order i, f, g, o: the official U(±0.01) for every meta-parameter
        // (meta-learner-lstm.lua:120-124), or PyTorch's LSTM initialisation U(−1/√H, 1/√H).
        let bound = if config.official_init { 0.01 } else { 1.0 / (h as f64).sqrt() };
        params.push("lstm.w_ih", init::uniform(rng, &[4, 4 * h], bound, device)?)?;
        params.push("lstm.w_hh", init::uniform(rng, &[h, 4 * h], bound, device)?)?;
        params.push("lstm.bias", init::uniform(rng, &[4 * h], bound, device)?)?;
        // Layer 2 as in the paper's code: small weights, the forget gate starting near 1 and the
        // input gate (the learning rate) near 0.
        let n = h + 6;
        params.push("gate_i.weight", init::uniform(rng, &[n, 1], 0.01, device)?)?;
        params.push("gate_f.weight", init::uniform(rng, &[n, 1], 0.01, device)?)?;
        let bi: f32 = rng.random_range(-5.0..-4.0);
        let bf_max = if config.official_init { 5.0 } else { 6.0 };
        let bf: f32 = rng.random_range(4.0..bf_max);
        params.push("gate_i.bias", Tensor::new(&[bi], device)?)?;
        params.push("gate_f.bias", Tensor::new(&[bf], device)?)?;
        let state = State::new(params, RunningStats::empty());
        Ok(Self { config, backbone, state, learner })
    }

    /// The number of learner coordinates P.
    pub fn learner_size(&self) -> usize {
        self.learner.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// c_0 as [P], from `meta`'s `learner.*` tensors.
    pub fn initial_cell(&self, meta: &Params) -> Result<Tensor> {
        self.flatten_learner(meta, "learner.")
    }

    /// The tensors `{prefix}{name}` of `tensors` for the learner's parameters, concatenated in c's order.
    fn flatten_learner(&self, tensors: &Params, prefix: &str) -> Result<Tensor> {
        let parts = self
            .learner
            .iter()
            .map(|(n, _)| tensors.get(&format!("{prefix}{n}"))?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// The learner's named parameters, cut out of `c` ([P] or [P, 1]).
    pub fn learner_params(&self, c: &Tensor) -> Result<Params> {
        let mut p = Params::new();
        let mut offset = 0;
        for (name, shape) in &self.learner {
            let n: usize = shape.iter().product();
            p.insert(name.clone(), c.narrow(0, offset, n)?.reshape(shape.as_slice())?);
            offset += n;
        }
        Ok(p)
    }

    /// [B, ways] logits of the learner with weights `c`, batch statistics of `x`.
    pub fn logits(&self, c: &Tensor, x: &Tensor) -> Result<Tensor> {
        self.logits_with(c, x, BnMode::Batch(None))
    }

    /// [B, ways] logits of the learner with weights `c`, batch norm as `bn` says.
    pub fn logits_with(&self, c: &Tensor, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        let params = self.learner_params(c)?;
        head::linear_logits(self.backbone.as_ref(), &params, x, bn)
    }

    /// The learner's gradient as the meta-learner sees it: ∇(mean CE), divided by the support
    /// batch size `batch` when [`MetaLstmConfig::grad_over_batch`] is set.
    fn meta_input_grad(&self, grad: Tensor, batch: usize) -> Result<Tensor> {
        if self.config.grad_over_batch {
            grad / batch.max(1) as f64
        } else {
            Ok(grad)
        }
    }

    /// Folds the batch statistics of the learner at `c` on `images` into `running` (a
    /// training-mode forward pass, as the official code's gradient net makes at every step).
    fn gather_stats(&self, c: &Tensor, images: &Tensor, running: &mut RunningStats) -> Result<()> {
        let params = self.learner_params(&c.detach())?;
        self.backbone.forward(&params, images, BnMode::Batch(Some(running)))?;
        Ok(())
    }

    /// The learner's loss at `c` (detached from anything before it), its gradient with respect to
    /// c (shaped like c) and its logits: by the backbone's explicit backward pass, or by candle's.
    fn loss_and_grad(
        &self,
        c: &Tensor,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<(f64, Tensor, Tensor)> {
        if self.backbone.explicit_backward().is_none() {
            return self.graph_loss_and_grad(c, images, labels);
        }
        let params = self.learner_params(&c.detach())?;
        let out = head::linear_loss_and_grad(
            self.backbone.as_ref(),
            &params,
            images,
            labels,
            Graph::Detached,
        )?;
        let grad = self.flatten_learner(&out.grads, "")?.reshape(c.shape())?;
        Ok((scalar(&out.loss)?, grad, out.logits))
    }

    /// [`MetaLstm::loss_and_grad`] by candle's backward pass.
    fn graph_loss_and_grad(
        &self,
        c: &Tensor,
        images: &Tensor,
        labels: &Tensor,
    ) -> Result<(f64, Tensor, Tensor)> {
        let var = Var::from_tensor(&c.detach())?;
        let logits = self.logits(var.as_tensor(), images)?;
        let loss = ops::cross_entropy(&logits, labels)?;
        let store = loss.backward()?;
        let grad = head::required_grad(&store, var.as_tensor(), "learner")?.detach();
        Ok((scalar(&loss)?, grad, logits.detach()))
    }

    /// The meta-learner after `steps` updates of the learner from c_0 on the support set, and the
    /// inputs it saw at each step. With `frozen`, those inputs are replayed instead of computed (to
    /// check that the meta-gradient ignores them). With `keep_tape` it can be differentiated.
    /// With `running`, each step's support batch statistics are folded into it.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        meta: &Params,
        support: &Tensor,
        labels: &Tensor,
        steps: usize,
        frozen: Option<&[StepInputs]>,
        keep_tape: bool,
        mut running: Option<&mut RunningStats>,
    ) -> Result<(MetaLstmUnroll, Vec<StepInputs>)> {
        let c0 = self.initial_cell(meta)?.detach();
        let mut unroll = kernels::meta_lstm_unroll(
            &weights_of(meta)?,
            &c0,
            self.config.preprocess_p,
            keep_tape,
        )?;
        let mut seen = Vec::with_capacity(steps);
        for t in 0..steps {
            let inputs = match frozen {
                Some(f) => f.get(t).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("no frozen inputs for step {t}"))
                })?,
                None => {
                    let c = unroll.cell()?;
                    if let Some(r) = running.as_deref_mut() {
                        self.gather_stats(&c, support, r)?;
                    }
                    let (loss, grad, _) = self.loss_and_grad(&c, support, labels)?;
                    let grad = self.meta_input_grad(grad, support.dim(0)?)?;
                    StepInputs { grad, loss }
                }
            };
            unroll.step(&inputs.grad, inputs.loss)?;
            seen.push(inputs);
        }
        Ok((unroll, seen))
    }

    /// c_T ([P], detached) after `steps` updates from c_0 on the support set, and the inputs seen;
    /// with `frozen`, those inputs are replayed. The fused counterpart of [`MetaLstm::reference_unroll`].
    pub fn unroll(
        &self,
        meta: &Params,
        support: &Tensor,
        labels: &Tensor,
        steps: usize,
        frozen: Option<&[StepInputs]>,
    ) -> Result<(Tensor, Vec<StepInputs>)> {
        let (unroll, seen) = self.run(meta, support, labels, steps, frozen, false, None)?;
        Ok((unroll.cell()?, seen))
    }

    /// The query loss of `episode` after `steps` updates and its first-order meta-gradient with
    /// respect to every tensor of `meta` (c_0 as `learner.*`, the meta-learner's weights).
    pub fn meta_gradient(
        &self,
        meta: &Params,
        episode: &Episode,
        steps: usize,
    ) -> Result<MetaGradient> {
        let support_labels = episode.support_labels_tensor()?;
        let (unroll, _) =
            self.run(meta, &episode.support, &support_labels, steps, None, true, None)?;
        let query_labels = episode.query_labels_tensor()?;
        let (query_loss, d_cell, logits) =
            self.loss_and_grad(&unroll.cell()?, &episode.query, &query_labels)?;
        let query_accuracy = ops::accuracy(&logits, &query_labels)?;
        let grads = self.named(unroll.backward(&d_cell)?)?;
        Ok(MetaGradient { grads, query_loss, query_accuracy })
    }

    /// The kernel's gradients under the meta-parameters' names.
    fn named(&self, grads: MetaLstmGrads) -> Result<Params> {
        let mut out = Params::new();
        for (name, t) in self.learner_params(&grads.cell)?.iter() {
            out.insert(format!("learner.{name}"), t.clone());
        }
        let w = grads.weights;
        let tensors = [
            w.w_ih,
            w.w_hh,
            w.bias,
            w.gate_i_weight,
            w.gate_i_bias,
            w.gate_f_weight,
            w.gate_f_bias,
        ];
        for (name, t) in WEIGHT_NAMES.into_iter().zip(tensors) {
            out.insert(name, t);
        }
        Ok(out)
    }

    /// The reference implementation of [`MetaLstm::unroll`] in candle ops: c_T as [P, 1], still
    /// differentiable with respect to `meta` through candle's graph. Slow (every element-wise op of
    /// every step is kept at [P, 4H]); the oracle of the fused kernel's tests.
    #[doc(hidden)]
    pub fn reference_unroll(
        &self,
        meta: &Params,
        support: &Tensor,
        labels: &Tensor,
        steps: usize,
        frozen: Option<&[StepInputs]>,
    ) -> Result<(Tensor, Vec<StepInputs>)> {
        let p = self.config.preprocess_p;
        let mut c = self.initial_cell(meta)?.unsqueeze(1)?;
        let (rows, dtype, dev) = (c.dim(0)?, c.dtype(), c.device().clone());
        let h_size = self.config.hidden;
        let mut h = Tensor::zeros((rows, h_size), dtype, &dev)?;
        let mut cell = h.clone();
        let mut i_prev = Tensor::zeros((rows, 1), dtype, &dev)?;
        let mut f_prev = i_prev.clone();
        let (w_ih, w_hh, bias) =
            (meta.get("lstm.w_ih")?, meta.get("lstm.w_hh")?, meta.get("lstm.bias")?);
        let mut seen = Vec::with_capacity(steps);
        for t in 0..steps {
            let inputs = match frozen {
                Some(f) => f.get(t).cloned().ok_or_else(|| {
                    candle_core::Error::Msg(format!("no frozen inputs for step {t}"))
                })?,
                None => {
                    let (loss, grad, _) = self.graph_loss_and_grad(&c, support, labels)?;
                    let grad = self.meta_input_grad(grad, support.dim(0)?)?;
                    StepInputs { grad, loss }
                }
            };
            let grad = inputs.grad.to_dtype(dtype)?.reshape((rows, 1))?;
            let loss = Tensor::new(&[inputs.loss], &dev)?.to_dtype(dtype)?;
            let x = Tensor::cat(
                &[preprocess(&grad, p)?, preprocess(&loss, p)?.broadcast_as((rows, 2))?],
                1,
            )?;
            let gates = x.matmul(w_ih)?.add(&h.matmul(w_hh)?)?.broadcast_add(bias)?;
            let chunk = |k: usize| gates.narrow(1, k * h_size, h_size);
            cell =
                ((sigmoid(&chunk(1)?)? * &cell)? + (sigmoid(&chunk(0)?)? * chunk(2)?.tanh()?)?)?;
            h = (sigmoid(&chunk(3)?)? * cell.tanh()?)?;
            let i = gate(
                &Tensor::cat(&[&h, &x, &c, &i_prev], 1)?,
                meta.get("gate_i.weight")?,
                meta.get("gate_i.bias")?,
            )?;
            let f = gate(
                &Tensor::cat(&[&h, &x, &c, &f_prev], 1)?,
                meta.get("gate_f.weight")?,
                meta.get("gate_f.bias")?,
            )?;
            c = cell_update(&c, &grad, &i, &f)?;
            (i_prev, f_prev) = (i, f);
            seen.push(inputs);
        }
        Ok((c, seen))
    }

    /// The query loss of `episode` after `steps` updates by [`MetaLstm::reference_unroll`],
    /// differentiable with respect to `meta` through candle's graph, its logits, and the inputs seen.
    #[doc(hidden)]
    pub fn reference_query_loss(
        &self,
        meta: &Params,
        episode: &Episode,
        steps: usize,
        frozen: Option<&[StepInputs]>,
    ) -> Result<(Tensor, Tensor, Vec<StepInputs>)> {
        let (c, seen) = self.reference_unroll(
            meta,
            &episode.support,
            &episode.support_labels_tensor()?,
            steps,
            frozen,
        )?;
        let logits = self.logits(&c, &episode.query)?;
        let loss = ops::cross_entropy(&logits, &episode.query_labels_tensor()?)?;
        Ok((loss, logits, seen))
    }
}

/// `grads` scaled by max_norm / (‖grads‖ + 1e-6) when that is below 1, as PyTorch's
/// `clip_grad_norm_` does; unchanged when `max_norm` is 0.
fn clip_norm(grads: Params, max_norm: f64) -> Result<Params> {
    if max_norm <= 0.0 {
        return Ok(grads);
    }
    let mut squares = 0.0;
    for (_, g) in grads.iter() {
        squares += scalar(&g.to_dtype(DType::F64)?.sqr()?.sum_all()?)?;
    }
    let scale = max_norm / (squares.sqrt() + 1e-6);
    if scale >= 1.0 {
        return Ok(grads);
    }
    let mut out = Params::new();
    for (name, g) in grads.iter() {
        out.insert(name.clone(), (g * scale)?);
    }
    Ok(out)
}

struct Adapted<'a> {
    net: &'a MetaLstm,
    c: Tensor,
    /// The running statistics gathered over the support steps ([`TestBn::SupportRunning`]).
    running: Option<RunningStats>,
}

impl Classifier for Adapted<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        match &self.running {
            Some(r) => self.net.logits_with(&self.c, query, BnMode::Running(r)),
            None => self.net.logits(&self.c, query),
        }
    }
}

impl MetaLstm {
    /// The query loss of one training episode, with the (clipped) first-order meta-gradient as
    /// its gradient.
    pub fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        self.meta_batch_loss(std::slice::from_ref(episode))
    }

    /// The mean query loss, with the mean first-order meta-gradient, clipped to
    /// [`MetaLstmConfig::grad_clip`], as its gradient.
    pub fn meta_batch_loss(&self, episodes: &[Episode]) -> Result<EpisodeOutput> {
        if episodes.is_empty() {
            candle_core::bail!("a meta-batch needs at least one episode")
        }
        let meta = self.state.params.detached_values();
        let tasks = episodes
            .iter()
            .map(|ep| self.meta_gradient(&meta, ep, self.config.inner_steps))
            .collect::<Result<Vec<_>>>()?;
        let n = tasks.len() as f64;
        let mean = super::mean_gradient(&self.state.params, tasks.iter().map(|t| &t.grads))?;
        let query_loss = tasks.iter().map(|t| t.query_loss).sum::<f64>() / n;
        let accuracy = tasks.iter().map(|t| t.query_accuracy).sum::<f64>() / n;
        let loss = super::surrogate_loss(
            &self.state.params,
            &clip_norm(mean, self.config.grad_clip)?,
            query_loss,
        )?;
        Ok(EpisodeOutput { loss, accuracy })
    }

    /// The meta-parameters (c_0 as `learner.*`, then the meta-learner's weights).
    pub fn meta_params(&self) -> &ParamSet {
        &self.state.params
    }
}

impl Learner for MetaLstm {
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("Meta-LSTM", self.config.ways, ways)?;
        let labels = Tensor::new(labels, support.device())?;
        let meta = self.state.params.detached_values();
        let steps = self.config.inner_steps_test;
        let mut running = match self.config.test_bn {
            TestBn::Batch => None,
            TestBn::SupportRunning => Some(self.backbone.running_stats()),
        };
        let (unroll, _) =
            self.run(&meta, support, &labels, steps, None, false, running.as_mut())?;
        Ok(Box::new(Adapted { net: self, c: unroll.cell()?, running }))
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

/// Meta-LSTM has no flags of its own (the inner-loop flags are shared: [`SharedFlags`]).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetaLstmFlags {}

impl Method for MetaLstmConfig {
    const NAMES: &'static [&'static str] = &["meta-lstm"];
    type Flags = MetaLstmFlags;
    const READS_SHARED_FLAGS: bool = true;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "meta-lstm"
    }

    fn apply(&mut self, _flags: &MetaLstmFlags, shared: &SharedFlags) -> anyhow::Result<()> {
        if shared.inner_lr.is_some() {
            anyhow::bail!("--inner-lr does not apply to meta-lstm: its learning rates are the learned input gates");
        }
        self.inner_steps = shared.inner_steps.unwrap_or(self.inner_steps);
        self.inner_steps_test = shared.inner_steps_test.unwrap_or(self.inner_steps_test);
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        super::ensure_train_ways("meta-lstm", self.ways, protocol)?;
        let size = protocol.data.image_size;
        Ok(Box::new(MetaLstm::new(*self, &protocol.backbone, (size, size), rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.ways)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "meta-lstm-miniimagenet-5w1s",
                summary: "Ravi & Larochelle 2017, miniImageNet 5-way 1-shot (Ravi split), as the official code's config: Conv4 learner with 32 filters (BN eps 1e-3, momentum 0.9), 84×84, T=12 updates on the whole support set (batch 5), learner gradient ∇mean/B into the meta-learner, 15 queries per class, LSTM 20 hidden (U(±0.01) init, bF∈U(4,5), BN scale U(0,1)), Adam 1e-3, clip 0.25, 75 000 episodes; test: BN running statistics gathered over the support steps, 600 tasks. Departs: gates also see the preprocessed gradient/loss and the post-sigmoid previous gate (fused kernel), no conv bias",
                build: || mini_imagenet(1),
            },
            Preset {
                name: "meta-lstm-miniimagenet-5w5s",
                summary: "Ravi & Larochelle 2017, miniImageNet 5-way 5-shot (Ravi split), as the official code's config: Conv4 learner with 32 filters (BN eps 1e-3, momentum 0.95), 84×84, T=8 updates on the whole support set (batch 25), learner gradient ∇mean/B, 15 queries per class, LSTM 20 hidden (official init), Adam 1e-3, clip 0.25, 50 000 episodes; test: BN running statistics over the support steps, 600 tasks. Departs: gate inputs (fused kernel), no conv bias",
                build: || mini_imagenet(5),
            },
            Preset {
                name: "meta-lstm-omniglot-5w1s",
                summary: "Meta-LSTM on Omniglot 5-way 1-shot (Vinyals trainval) with the official code's 1-shot miniImageNet settings (not a protocol of the paper): Conv4 learner with 32 filters (BN eps 1e-3, momentum 0.9), T=12, ∇mean/B, 15 queries per class, LSTM 20 hidden (official init), Adam 1e-3, clip 0.25, 75 000 episodes; test: BN running statistics over the support steps, 600 tasks. Departs: gate inputs (fused kernel), no conv bias",
                build: omniglot,
            },
        ]
    }
}

/// The official code's learner: Conv4 with 32 filters, Torch batch norm with ε 1e-3 and momentum
/// 0.9 (1-shot config) or 0.95 (5-shot config) for the running statistics of the test scoring.
fn learner_backbone(in_channels: usize, shots: usize) -> BackboneConfig {
    BackboneConfig::Conv4(Conv4Config {
        hidden: 32,
        bn_eps: 1e-3,
        bn_momentum: if shots == 1 { 0.9 } else { 0.95 },
        ..Conv4Config::new(in_channels)
    })
}

/// Meta-LSTM as in Ravi & Larochelle's code (config/lstm/train-imagenet-{1,5}shot.lua): a 32-filter
/// Conv4 learner, 15 queries per class, T = 12 updates for 1-shot (75 000 episodes) and 8 for
/// 5-shot (50 000 episodes), each on the whole support set (their batch sizes 5 / 25).
fn mini_imagenet(shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data = DataConfig::mini_imagenet();
    p.backbone = learner_backbone(3, shots);
    p.train = EpisodeSpec::new(5, shots, 15);
    let steps = if shots == 1 { 12 } else { 8 };
    let m = MetaLstmConfig {
        ways: 5,
        inner_steps: steps,
        inner_steps_test: steps,
        ..MetaLstmConfig::default()
    };
    p.episodes = if shots == 1 { 75_000 } else { 50_000 };
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = Some(Validation::new(EpisodeSpec::new(5, shots, 15), 100, 1000));
    p.test = EpisodeSpec::new(5, shots, 15);
    p.test_episodes = 600;
    p.checkpoint_every = 100;
    (p, MethodConfig::MetaLstm(m))
}

/// Meta-LSTM's 1-shot settings on Omniglot 28×28 (runnable without miniImageNet).
fn omniglot() -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.data.train_subset = "trainval".into();
    p.backbone = learner_backbone(1, 1);
    p.train = EpisodeSpec::new(5, 1, 15);
    p.episodes = 75_000;
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = None;
    p.test = EpisodeSpec::new(5, 1, 15);
    p.test_episodes = 600;
    p.checkpoint_every = 100;
    (p, MethodConfig::MetaLstm(MetaLstmConfig { ways: 5, ..MetaLstmConfig::default() }))
}
