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
//! into W, b and c_0. Batch norm uses the statistics of the current batch (support at each inner
//! step, the query batch when scoring).

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Classifier, EpisodeOutput, Learner};
use crate::data::Episode;
use crate::nn::{init, ops, BnMode, Conv4, Conv4Config, ParamSet, Params};

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
}

impl Default for MetaLstmConfig {
    fn default() -> Self {
        Self { ways: 5, inner_steps: 12, inner_steps_test: 12, hidden: 20, preprocess_p: 10.0 }
    }
}

/// The learner's loss and (detached) gradient at one inner step: the meta-learner's inputs.
#[derive(Debug, Clone)]
pub struct StepInputs {
    /// [P, 1]
    pub grad: Tensor,
    pub loss: f64,
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

pub struct MetaLstm {
    pub config: MetaLstmConfig,
    backbone: Conv4,
    params: ParamSet,
    /// The learner's parameters (without the `learner.` prefix) and their shapes, in c's order.
    learner: Vec<(String, Vec<usize>)>,
}

impl MetaLstm {
    /// A Conv4 learner for `height`×`width` inputs with a linear `ways`-unit output layer, and the
    /// meta-learner over its coordinates.
    pub fn new(
        config: MetaLstmConfig,
        backbone: Conv4Config,
        (height, width): (usize, usize),
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.hidden == 0 {
            candle_core::bail!("the meta-learner LSTM needs at least 1 hidden unit")
        }
        let backbone = Conv4::new(backbone);
        let learner_init = backbone.init_with_linear_head((height, width), config.ways, rng, device)?;
        let mut params = ParamSet::new();
        let mut learner = Vec::new();
        for (name, var) in learner_init.iter() {
            learner.push((name.to_string(), var.dims().to_vec()));
            params.push(format!("learner.{name}"), var.as_tensor().detach())?;
        }
        let h = config.hidden;
        // Layer 1: PyTorch's LSTM initialisation U(−1/√H, 1/√H); gate order i, f, g, o.
        let bound = 1.0 / (h as f64).sqrt();
        params.push("lstm.w_ih", init::uniform(rng, &[4, 4 * h], bound, device)?)?;
        params.push("lstm.w_hh", init::uniform(rng, &[h, 4 * h], bound, device)?)?;
        params.push("lstm.bias", init::uniform(rng, &[4 * h], bound, device)?)?;
        // Layer 2 as in the paper's code: small weights, the forget gate starting near 1 and the
        // input gate (the learning rate) near 0.
        let n = h + 6;
        params.push("gate_i.weight", init::uniform(rng, &[n, 1], 0.01, device)?)?;
        params.push("gate_f.weight", init::uniform(rng, &[n, 1], 0.01, device)?)?;
        let bi: f32 = rng.random_range(-5.0..-4.0);
        let bf: f32 = rng.random_range(4.0..6.0);
        params.push("gate_i.bias", Tensor::new(&[bi], device)?)?;
        params.push("gate_f.bias", Tensor::new(&[bf], device)?)?;
        Ok(Self { config, backbone, params, learner })
    }

    /// The number of learner coordinates P.
    pub fn learner_size(&self) -> usize {
        self.learner.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// c_0 as a [P, 1] column, from `meta`'s `learner.*` tensors.
    pub fn initial_cell(&self, meta: &Params) -> Result<Tensor> {
        let parts = self
            .learner
            .iter()
            .map(|(n, _)| meta.get(&format!("learner.{n}"))?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.unsqueeze(1)
    }

    /// The learner's named parameters, cut out of the [P, 1] column `c`.
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
        let params = self.learner_params(c)?;
        self.backbone.linear_head_logits(&params, x, BnMode::Batch(None))
    }

    /// The learner's loss at `c` (detached from anything before it) and its gradient.
    fn learner_gradient(&self, c: &Tensor, images: &Tensor, labels: &Tensor) -> Result<StepInputs> {
        let var = Var::from_tensor(&c.detach())?;
        let loss = ops::cross_entropy(&self.logits(var.as_tensor(), images)?, labels)?;
        let store = loss.backward()?;
        let grad = match store.get(var.as_tensor()) {
            Some(g) => g.detach(),
            None => var.as_tensor().zeros_like()?,
        };
        Ok(StepInputs { grad, loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()? })
    }

    /// T updates of the learner from c_0 on the support set; returns c_T, still differentiable
    /// with respect to `meta`, and the inputs the meta-learner saw at each step. With `frozen`, those
    /// inputs are replayed instead of computed (to check that the meta-gradient ignores them).
    pub fn unroll(
        &self,
        meta: &Params,
        support: &Tensor,
        labels: &Tensor,
        steps: usize,
        frozen: Option<&[StepInputs]>,
    ) -> Result<(Tensor, Vec<StepInputs>)> {
        let p = self.config.preprocess_p;
        let mut c = self.initial_cell(meta)?;
        let (rows, dtype, dev) = (c.dim(0)?, c.dtype(), c.device().clone());
        let h_size = self.config.hidden;
        let mut h = Tensor::zeros((rows, h_size), dtype, &dev)?;
        let mut cell = h.clone();
        let mut i_prev = Tensor::zeros((rows, 1), dtype, &dev)?;
        let mut f_prev = i_prev.clone();
        let (w_ih, w_hh, bias) = (meta.get("lstm.w_ih")?, meta.get("lstm.w_hh")?, meta.get("lstm.bias")?);
        let mut seen = Vec::with_capacity(steps);
        for t in 0..steps {
            let inputs = match frozen {
                Some(f) => f
                    .get(t)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("no frozen inputs for step {t}")))?,
                None => self.learner_gradient(&c, support, labels)?,
            };
            let grad = inputs.grad.to_dtype(dtype)?;
            let loss = Tensor::new(&[inputs.loss], &dev)?.to_dtype(dtype)?;
            let x = Tensor::cat(&[preprocess(&grad, p)?, preprocess(&loss, p)?.broadcast_as((rows, 2))?], 1)?;
            let gates = x.matmul(w_ih)?.add(&h.matmul(w_hh)?)?.broadcast_add(bias)?;
            let chunk = |k: usize| gates.narrow(1, k * h_size, h_size);
            cell = ((sigmoid(&chunk(1)?)? * &cell)? + (sigmoid(&chunk(0)?)? * chunk(2)?.tanh()?)?)?;
            h = (sigmoid(&chunk(3)?)? * cell.tanh()?)?;
            let i =
                gate(&Tensor::cat(&[&h, &x, &c, &i_prev], 1)?, meta.get("gate_i.weight")?, meta.get("gate_i.bias")?)?;
            let f =
                gate(&Tensor::cat(&[&h, &x, &c, &f_prev], 1)?, meta.get("gate_f.weight")?, meta.get("gate_f.bias")?)?;
            c = cell_update(&c, &grad, &i, &f)?;
            (i_prev, f_prev) = (i, f);
            seen.push(inputs);
        }
        Ok((c, seen))
    }

    /// The query loss of `episode` after `steps` updates, its logits, and the inputs seen.
    pub fn query_loss(
        &self,
        meta: &Params,
        episode: &Episode,
        steps: usize,
        frozen: Option<&[StepInputs]>,
    ) -> Result<(Tensor, Tensor, Vec<StepInputs>)> {
        let (c, seen) = self.unroll(meta, &episode.support, &episode.support_labels_tensor()?, steps, frozen)?;
        let logits = self.logits(&c, &episode.query)?;
        let loss = ops::cross_entropy(&logits, &episode.query_labels_tensor()?)?;
        Ok((loss, logits, seen))
    }
}

struct Adapted<'a> {
    net: &'a MetaLstm,
    c: Tensor,
}

impl Classifier for Adapted<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        self.net.logits(&self.c, query)
    }
}

impl Learner for MetaLstm {
    fn method(&self) -> &'static str {
        "meta-lstm"
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }

    fn adapt(&self, support: &Tensor, labels: &[u32], ways: usize) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("Meta-LSTM", self.config.ways, ways)?;
        let labels = Tensor::new(labels, support.device())?;
        let meta = self.params.detached_values();
        let (c, _) = self.unroll(&meta, support, &labels, self.config.inner_steps_test, None)?;
        Ok(Box::new(Adapted { net: self, c: c.detach() }))
    }

    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let meta = self.params.values();
        let (loss, logits, _) = self.query_loss(&meta, episode, self.config.inner_steps, None)?;
        let accuracy = ops::accuracy(&logits, &episode.query_labels_tensor()?)?;
        Ok(EpisodeOutput { loss, accuracy })
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
