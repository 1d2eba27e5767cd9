//! Meta Networks (Munkhdalai & Yu, ICML 2017), as in the official Chainer code
//! (tsendeemts/MetaNet, `MetaNetFull.py`, `utilsf.py`, `train_omniglot.py`).
//!
//! Two networks of the same shape ([`crate::nn::metanet_nets`]: five conv 64 blocks, fc 64 → 64,
//! fc 64 → N, no biases, no batch norm): a base learner that classifies, and an embedding ("key")
//! network whose fc1 output keys a memory. Four meta learners turn loss gradients (the *meta
//! information*) into fast weights, coordinate-wise:
//!
//! - **Task level, key network.** The support set is cut into 5 chunks of N/5 images (the code's
//!   `IT = 5`, Python 2 integer division, at least 1 image each); for each chunk the gradient of
//!   the key network's *slow* cross-entropy on the support labels (fc2 as its output layer: the
//!   code's representation loss is this classification loss, not the paper's contrastive pairs)
//!   is one step of a coordinate-wise LSTM (2 → 20, then linear 20 → 1); the LSTM's output after
//!   the last chunk is the key network's fast weights: one LSTM for the convolutions, one for fc1.
//!   (The code also makes fast weights for key fc2 and never uses them; kshot skips those
//!   coordinates, which changes nothing: every coordinate is its own LSTM row.)
//! - **Example level, base learner.** For each support image alone, the gradient of the slow base
//!   learner's cross-entropy goes through a coordinate-wise MLP (2 → 20 → 20 → 1, ReLUs; one for
//!   the convolutions, one for fc1 and fc2): that image's fast weights, stored in a memory beside
//!   its key (the fast-weighted key network's fc1 output).
//! - **Query.** Its key reads the memory by a softmax over cosine similarities; the weighted sum
//!   of the stored fast weights augments every base-learner layer:
//!   `relu(slow(x)) + relu(fast(x))` (fc2: `slow(x) + fast(x)`).
//!
//! Gradients are preprocessed as in the paper and code ([`preprocess_gradient`], k = 7). They are
//! *inputs*: computed by separate backward passes and detached, as the Chainer code builds them
//! as fresh `Variable`s from the gradient arrays, so no second-order term flows through them.
//! Everything else is trained end to end on the query cross-entropy, summed over the queries as
//! the code does, with Adam 1e-3 and the gradient clipped to norm 10 (Chainer's
//! `GradientClipping(10)`; kshot's trainer has no clipping, so it is [`MetaNetConfig::grad_clip`]
//! here). Key fc2 only serves the representation loss and no query loss reaches it, so, as in
//! the code (whose Adam skips parameters without a gradient), it is never trained: it is kept as
//! a fixed buffer (`State::extra`).
//!
//! Departures from the code: Vinyals' split with 90° rotations as classes (trainval for training,
//! as the GNN presets) instead of the code's random `train_rand.npz`/`test_rand.npz` and its
//! generator's augmentation; the LSTM cells are kshot's ([`crate::nn::LstmCell`]: PyTorch's
//! uniform initialisation, forget bias +1) rather than Chainer v1's; the MLPs' weights are
//! N(0, 1/fan_in) with zero biases (Chainer v1's default), except that the meta learners' output
//! layers start at 10% of that ([`MetaNetConfig::fast_init`]): at the default scale every fast
//! weight has the same sign-driven offset, so a fast layer sums hundreds of like-signed terms; on
//! 12×12 test images the activations grew ~10× per layer (a first loss of 10⁷) and the ReLUs
//! died; at 1% and 10% training is stable, and 10% learned faster in the seeded test; a finite iteration count (the code
//! loops 10⁷ episodes); the cosine similarity normalises each vector with ε = 1e-8 (the code:
//! one ε = 1e-6 under the square root of the product). The loss reported is the mean over
//! queries.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::nn::metanet_nets::{Fast, FastNet, FastNetConfig, FastWeights};
use crate::kernels;
use crate::nn::{init, ops, LstmCell, ParamSet, Params, RunningStats};
use crate::optim::StepDecay;
use crate::protocol::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetaNetConfig {
    /// Classes per task: the width of both networks' output layers.
    pub ways: usize,
    /// The base learner's and key network's layout.
    pub net: FastNetConfig,
    /// Hidden units of the meta learners (20).
    pub meta_hidden: usize,
    /// Chunks of the support set the key network's LSTM reads (the code's `IT = 5`).
    pub chunks: usize,
    /// The gradient preprocessing's k (7).
    pub k: f64,
    /// The gradient is scaled to this L2 norm when longer (10); 0 turns clipping off.
    pub grad_clip: f64,
    /// The meta learners' output layers start at this fraction of their default scale, so the
    /// first fast weights are small beside the slow ones (kshot's choice; see the module docs).
    pub fast_init: f64,
}

impl MetaNetConfig {
    pub fn omniglot(ways: usize) -> Self {
        Self {
            ways,
            net: FastNetConfig::omniglot(1),
            meta_hidden: 20,
            chunks: 5,
            k: 7.0,
            grad_clip: 10.0,
            fast_init: 0.1,
        }
    }
}

impl Default for MetaNetConfig {
    fn default() -> Self {
        Self::omniglot(5)
    }
}

/// The paper's gradient preprocessing: x → (log|x| / k, sign x) when |x| ≥ e^−k, else
/// (−1, e^k·x). Returns [x.len(), 2] pairs row by row.
pub fn preprocess_gradient(x: &[f64], k: f64) -> Vec<f64> {
    let threshold = (-k).exp();
    x.iter()
        .flat_map(|&v| {
            if v.abs() >= threshold {
                [v.abs().ln() / k, v.signum()]
            } else {
                [-1.0, k.exp() * v]
            }
        })
        .collect()
}

/// Preprocessed meta information of one task: detached inputs of the meta learners.
#[derive(Debug, Clone)]
pub struct MetaInfo {
    /// One [P_conv, 2] tensor per support chunk (key network, convolutions), in order.
    pub key_conv: Vec<Tensor>,
    /// One [P_fc1, 2] per chunk (key network, fc1).
    pub key_fc: Vec<Tensor>,
    /// [n·P_conv, 2]: each support image's (base learner, convolutions), image-major.
    pub base_conv: Tensor,
    /// [n·P_fc, 2]: each support image's (base learner, fc1 and fc2).
    pub base_fc: Tensor,
    pub n_support: usize,
}

/// A task's fast weights and memory, built from the support set.
pub struct Task {
    /// The key network's task-level fast weights (conv blocks and fc1).
    pub key_fast: FastWeights,
    /// [n, 64] keys of the support images.
    pub keys: Tensor,
    /// [n, P_conv] and [n, P_fc]: each support image's fast weights for the base learner.
    pub memory_conv: Tensor,
    pub memory_fc: Tensor,
}

pub struct MetaNet {
    pub config: MetaNetConfig,
    base: FastNet,
    key: FastNet,
    state: State,
}

const KEY_FC2: &str = "key.fc2.weight";
const MLP_LAYERS: [&str; 3] = ["l1", "l2", "out"];

impl MetaNet {
    pub fn new(
        config: MetaNetConfig,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let base = FastNet::new(config.net, "base", image_size);
        let key = FastNet::new(config.net, "key", image_size);
        let mut p = ParamSet::new();
        base.init(&mut p, config.ways, true, rng, device)?;
        key.init(&mut p, config.ways, false, rng, device)?;
        let key_fc2 = key.init_fc2(config.ways, rng, device)?;
        let h = config.meta_hidden;
        for name in ["meta.key_conv", "meta.key_fc"] {
            LstmCell::new(2, h, h).init(&format!("{name}.lstm"), &mut p, rng, device)?;
            linear_init(&mut p, &format!("{name}.out"), h, 1, config.fast_init, rng, device)?;
        }
        for name in ["meta.base_conv", "meta.base_fc"] {
            for (layer, (cin, cout, scale)) in
                MLP_LAYERS.iter().zip([(2, h, 1.0), (h, h, 1.0), (h, 1, config.fast_init)])
            {
                linear_init(&mut p, &format!("{name}.{layer}"), cin, cout, scale, rng, device)?;
            }
        }
        let mut state = State::new(p, RunningStats::default());
        state.extra.insert(KEY_FC2.into(), key_fc2);
        Ok(Self { config, base, key, state })
    }

    pub fn base_net(&self) -> &FastNet {
        &self.base
    }

    pub fn key_net(&self) -> &FastNet {
        &self.key
    }

    fn key_fc2(&self, dtype: DType) -> Result<Tensor> {
        let t = self.state.extra.get(KEY_FC2).ok_or_else(|| {
            candle_core::Error::Msg(format!("the MetaNet state has no `{KEY_FC2}`"))
        })?;
        t.to_dtype(dtype)
    }

    /// The meta information of a support set: the preprocessed gradients of the slow key
    /// network's loss on each chunk and of the slow base learner's loss on each image, at the
    /// values of `params` (computed on copies, so nothing is attached to `params`).
    pub fn meta_info(&self, params: &Params, support: &Tensor, labels: &[u32]) -> Result<MetaInfo> {
        let n = labels.len();
        if n == 0 {
            candle_core::bail!("a MetaNet task needs at least one support image");
        }
        let support = support.narrow(0, 0, n)?;
        let dtype = support.dtype();
        let device = support.device();
        let k = self.config.k;
        let labels_t = Tensor::new(labels, device)?;

        let (key_vars, key_copy) = leaf_copies(params, &self.key, false)?;
        let key_fc2 = self.key_fc2(dtype)?;
        let step = (n / self.config.chunks).max(1);
        let (mut key_conv, mut key_fc) = (Vec::new(), Vec::new());
        for start in (0..n).step_by(step) {
            let len = step.min(n - start);
            let logits = self.key.slow_logits(&key_copy, &support.narrow(0, start, len)?, &key_fc2)?;
            let loss = ops::cross_entropy(&logits, &labels_t.narrow(0, start, len)?)?;
            let grads = loss.backward()?;
            let (conv, fc) = flat_grads(&grads, &key_vars, self.config.net.blocks)?;
            key_conv.push(preprocessed(&conv, k, dtype, device)?);
            key_fc.push(preprocessed(&fc, k, dtype, device)?);
        }

        let (base_vars, base_copy) = leaf_copies(params, &self.base, true)?;
        let fc2 = base_copy.get(&self.base.fc_name(2))?.clone();
        let (mut conv_all, mut fc_all) = (Vec::new(), Vec::new());
        for i in 0..n {
            let logits = self.base.slow_logits(&base_copy, &support.narrow(0, i, 1)?, &fc2)?;
            let loss = ops::cross_entropy(&logits, &labels_t.narrow(0, i, 1)?)?;
            let grads = loss.backward()?;
            let (conv, fc) = flat_grads(&grads, &base_vars, self.config.net.blocks)?;
            conv_all.extend(conv);
            fc_all.extend(fc);
        }
        Ok(MetaInfo {
            key_conv,
            key_fc,
            base_conv: preprocessed(&conv_all, k, dtype, device)?,
            base_fc: preprocessed(&fc_all, k, dtype, device)?,
            n_support: n,
        })
    }

    /// The coordinate-wise LSTM `name` over the chunks' inputs; its output after the last.
    fn meta_lstm(&self, params: &Params, name: &str, inputs: &[Tensor]) -> Result<Tensor> {
        let layout = kernels::LstmLayout { input: 2, hidden: self.config.meta_hidden };
        let names = ["lstm.weight_ih", "lstm.weight_hh", "lstm.bias", "out.weight", "out.bias"];
        let weights = names
            .iter()
            .map(|n| params.get(&format!("{name}.{n}")))
            .collect::<Result<Vec<_>>>()?;
        kernels::coordinate_lstm(&Tensor::stack(inputs, 0)?, &weights, layout)
    }

    /// The coordinate-wise MLP `name`: [R, 2] → [R].
    fn meta_mlp(&self, params: &Params, name: &str, x: &Tensor) -> Result<Tensor> {
        let layout = kernels::MlpLayout { input: 2, hidden: self.config.meta_hidden };
        let weights = MLP_LAYERS
            .iter()
            .flat_map(|l| ["weight", "bias"].map(|w| format!("{name}.{l}.{w}")))
            .map(|n| params.get(&n))
            .collect::<Result<Vec<_>>>()?;
        kernels::coordinate_mlp(x, &weights, layout)
    }

    /// The task's fast weights and memory from its meta information (differentiable with
    /// respect to `params`).
    pub fn task(&self, params: &Params, info: &MetaInfo, support: &Tensor) -> Result<Task> {
        let n = info.n_support;
        let support = support.narrow(0, 0, n)?;
        let conv = self.meta_lstm(params, "meta.key_conv", &info.key_conv)?;
        let fc = self.meta_lstm(params, "meta.key_fc", &info.key_fc)?;
        let key_fast = FastWeights {
            convs: split(&conv, &self.key.conv_shapes())?,
            fc1: fc.reshape(self.key.fc_shapes(self.config.ways)[0].as_slice())?,
            fc2: None,
        };
        let keys = self.keys(params, &key_fast, &support)?;
        let memory_conv = self.meta_mlp(params, "meta.base_conv", &info.base_conv)?.reshape((n, ()))?;
        let memory_fc = self.meta_mlp(params, "meta.base_fc", &info.base_fc)?.reshape((n, ()))?;
        Ok(Task { key_fast, keys, memory_conv, memory_fc })
    }

    /// [B, hidden] keys: fc1 of the fast-weighted key network, no ReLU (as the code).
    fn keys(&self, params: &Params, fast: &FastWeights, x: &Tensor) -> Result<Tensor> {
        let h = self.key.trunk(params, x, Fast::Shared(fast))?;
        let slow = h.matmul(&params.get(&self.key.fc_name(1))?.t()?)?;
        slow + h.matmul(&fast.fc1.t()?)?
    }

    /// [M, ways] query logits: each query reads its own fast weights from the memory.
    pub fn query_logits(&self, params: &Params, task: &Task, query: &Tensor) -> Result<Tensor> {
        let q_keys = self.keys(params, &task.key_fast, query)?;
        let attention = ops::softmax(&ops::cosine_similarity(&q_keys, &task.keys, 1e-8)?)?;
        let conv = attention.matmul(&task.memory_conv)?;
        let fc = attention.matmul(&task.memory_fc)?;
        let [fc1, fc2] = self.base.fc_shapes(self.config.ways);
        let fc = split_rows(&fc, &[fc1, fc2])?;
        let (fc1, fc2) = (&fc[0], &fc[1]);
        let fast = FastWeights {
            convs: split_rows(&conv, &self.base.conv_shapes())?,
            fc1: fc1.clone(),
            fc2: Some(fc2.clone()),
        };
        let h = self.base.trunk(params, query, Fast::PerImage(&fast))?;
        let slow_a = h.matmul(&params.get(&self.base.fc_name(1))?.t()?)?.relu()?;
        let fast_a = h.unsqueeze(1)?.matmul(&fc1.transpose(1, 2)?)?.squeeze(1)?.relu()?;
        let a = (slow_a + fast_a)?;
        let slow = a.matmul(&params.get(&self.base.fc_name(2))?.t()?)?;
        let fast = a.unsqueeze(1)?.matmul(&fc2.transpose(1, 2)?)?.squeeze(1)?;
        slow + fast
    }

    /// The summed query cross-entropy of one episode given its meta information, and its logits.
    pub fn query_loss(
        &self,
        params: &Params,
        info: &MetaInfo,
        support: &Tensor,
        query: &Tensor,
        query_labels: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        let task = self.task(params, info, support)?;
        let logits = self.query_logits(params, &task, query)?;
        let labels = Tensor::new(query_labels, query.device())?;
        let loss = (ops::cross_entropy(&logits, &labels)? * query_labels.len() as f64)?;
        Ok((loss, logits))
    }

    /// One episode's summed query loss at the learner's parameters, and its accuracy.
    fn episode_loss(&self, params: &Params, ep: &Episode) -> Result<(Tensor, f64, usize)> {
        super::ensure_ways("MetaNet", self.config.ways, ep.spec.ways)?;
        let info = self.meta_info(params, &ep.support, &ep.support_labels)?;
        let (loss, logits) =
            self.query_loss(params, &info, &ep.support, &ep.query, &ep.query_labels)?;
        let accuracy = ops::accuracy(&logits, &ep.query_labels_tensor()?)?;
        Ok((loss, accuracy, ep.query_labels.len()))
    }

    /// The clipped gradient of the meta-batch's summed query loss, as a surrogate loss whose
    /// value is the mean query loss.
    pub fn meta_batch_loss(&self, episodes: &[Episode]) -> Result<EpisodeOutput> {
        let params = self.state.params.values();
        let (mut total, mut accuracy, mut queries) = (None::<Tensor>, 0.0, 0);
        for ep in episodes {
            let (loss, acc, m) = self.episode_loss(&params, ep)?;
            accuracy += acc;
            queries += m;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let Some(total) = total else { candle_core::bail!("a meta-batch needs at least one episode") };
        let value = total.to_dtype(DType::F64)?.to_scalar::<f64>()? / queries.max(1) as f64;
        let store = total.backward()?;
        let mut grads = Params::new();
        let mut squares = 0.0;
        for (name, var) in self.state.params.iter() {
            // Only the hidden-to-hidden weights of a one-chunk LSTM get no gradient, and theirs
            // is then exactly zero (the state they multiply starts at zero).
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.detach(),
                None => var.as_tensor().zeros_like()?,
            };
            squares += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            grads.insert(name, g);
        }
        let norm = squares.sqrt();
        let clip = self.config.grad_clip;
        if clip > 0.0 && norm > clip {
            let mut scaled = Params::new();
            for (name, g) in grads.iter() {
                scaled.insert(name.clone(), (g * (clip / norm))?);
            }
            grads = scaled;
        }
        let n = episodes.len() as f64;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.state.params, &grads, value)?,
            accuracy: accuracy / n,
        })
    }
}

/// Fresh leaves holding the values of `net`'s convolution and fc weights in `params` (fc2 too
/// when `with_fc2`), and the parameters with those leaves in place.
fn leaf_copies(params: &Params, net: &FastNet, with_fc2: bool) -> Result<(Vec<Var>, Params)> {
    let mut names: Vec<String> = (0..net.config.blocks).map(|i| net.conv_name(i)).collect();
    names.push(net.fc_name(1));
    if with_fc2 {
        names.push(net.fc_name(2));
    }
    let mut copy = Params::new();
    let mut vars = Vec::new();
    for name in names {
        let var = Var::from_tensor(&params.get(&name)?.detach())?;
        copy.insert(name, var.as_tensor().clone());
        vars.push(var);
    }
    Ok((vars, copy))
}

/// The gradients of `vars` (the convolutions first, `blocks` of them, then the fc layers),
/// flattened into (convolutions, fc layers).
fn flat_grads(
    grads: &candle_core::backprop::GradStore,
    vars: &[Var],
    blocks: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut conv = Vec::new();
    let mut fc = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        let g = match grads.get(v.as_tensor()) {
            Some(g) => g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            None => vec![0.0; v.elem_count()],
        };
        if i < blocks { conv.extend(g) } else { fc.extend(g) }
    }
    Ok((conv, fc))
}

fn preprocessed(x: &[f64], k: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(preprocess_gradient(x, k), (x.len(), 2), device)?.to_dtype(dtype)
}

/// Consecutive pieces of the flat `x` reshaped to `shapes`.
fn split(x: &Tensor, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
    let rows = split_rows(&x.unsqueeze(0)?, shapes)?;
    rows.iter().map(|t| t.squeeze(0)).collect()
}

/// Consecutive column ranges of `x` [M, P] reshaped to [M, shape…], for each of `shapes`.
fn split_rows(x: &Tensor, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
    let m = x.dim(0)?;
    let mut offset = 0;
    shapes
        .iter()
        .map(|s| {
            let len: usize = s.iter().product();
            let shape: Vec<usize> = std::iter::once(m).chain(s.iter().copied()).collect();
            let t = x.narrow(1, offset, len)?.reshape(shape);
            offset += len;
            t
        })
        .collect()
}

fn linear_init(
    p: &mut ParamSet,
    name: &str,
    cin: usize,
    cout: usize,
    scale: f64,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<()> {
    let std = scale * (1.0 / cin as f64).sqrt();
    p.push(format!("{name}.weight"), init::normal(rng, &[cout, cin], 0.0, std, device)?)?;
    p.push(format!("{name}.bias"), Tensor::zeros(cout, DType::F32, device)?)
}


/// A task's memory, read by each query.
struct Adapted<'a> {
    net: &'a MetaNet,
    params: Params,
    task: Task,
}

impl Classifier for Adapted<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        self.net.query_logits(&self.params, &self.task, query)
    }
}

impl Learner for MetaNet {
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("MetaNet", self.config.ways, ways)?;
        let params = self.state.params.detached_values();
        let info = self.meta_info(&params, support, labels)?;
        let task = self.task(&params, &info, support)?;
        Ok(Box::new(Adapted { net: self, params, task }))
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

/// `kshot train` flags of Meta Networks.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetaNetFlags {
    /// MetaNet: clip the gradient to this L2 norm (the code's 10; 0 turns clipping off).
    #[arg(long)]
    pub metanet_clip: Option<f64>,
    /// MetaNet: chunks of the support set whose gradients the key network's LSTM reads (5).
    #[arg(long)]
    pub metanet_chunks: Option<usize>,
}

impl Method for MetaNetConfig {
    const NAMES: &'static [&'static str] = &["metanet"];
    type Flags = MetaNetFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "metanet"
    }

    fn apply(&mut self, flags: &MetaNetFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        if let Some(c) = flags.metanet_clip {
            anyhow::ensure!(c >= 0.0, "--metanet-clip must be 0 (off) or positive, not {c}");
            self.grad_clip = c;
        }
        if let Some(c) = flags.metanet_chunks {
            anyhow::ensure!(c >= 1, "--metanet-chunks must be at least 1");
            self.chunks = c;
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        super::ensure_train_ways("MetaNet", self.ways, protocol)?;
        anyhow::ensure!(
            protocol.backbone.kind() == "conv4",
            "metanet builds its own base learner and key network (5 conv blocks, no batch norm); drop --backbone {}",
            protocol.backbone.kind()
        );
        let mut config = *self;
        config.net.in_channels = protocol.backbone.in_channels();
        Ok(Box::new(MetaNet::new(config, protocol.data.image_size, rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.ways)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "metanet-omniglot-5w1s",
                summary: concat!("Munkhdalai & Yu 2017, Omniglot 5-way 1-shot; ", metanet_omniglot!()),
                build: || omniglot(5),
            },
            Preset {
                name: "metanet-omniglot-10w1s",
                summary: concat!("Munkhdalai & Yu 2017, Omniglot 10-way 1-shot; ", metanet_omniglot!()),
                build: || omniglot(10),
            },
            Preset {
                name: "metanet-omniglot-15w1s",
                summary: concat!("Munkhdalai & Yu 2017, Omniglot 15-way 1-shot; ", metanet_omniglot!()),
                build: || omniglot(15),
            },
            Preset {
                name: "metanet-omniglot-20w1s",
                summary: concat!("Munkhdalai & Yu 2017, Omniglot 20-way 1-shot; ", metanet_omniglot!()),
                build: || omniglot(20),
            },
        ]
    }
}

macro_rules! metanet_omniglot {
    () => {
        "official code (tsendeemts/MetaNet, MetaNetFull): 28×28, base learner and key network of 5 conv 64 blocks + fc 64-64-N without batch norm, meta learners of 20 units (LSTMs for the key network's task-level fast weights, MLPs for the base learner's example-level ones), gradients preprocessed with k = 7, train and test episodes of 10 queries per class, one episode per step, Adam 1e-3 constant, gradient norm clipped at 10; Vinyals trainval (4800 rotated classes) for training (the code: its own random 1200-character split, augmented), 100 000 episodes (the code loops without end), tested on 1000 episodes of the 1692 rotated test classes. a 5-way training episode takes ≈ 0.5 s and 1.6 GB on 2 cores (fused coordinate-wise meta learners over the 148 032 convolution weights)"
    };
}
use metanet_omniglot;

fn omniglot(ways: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.data.train_subset = "trainval".into();
    p.train = EpisodeSpec::new(ways, 1, 10);
    p.test = EpisodeSpec::new(ways, 1, 10);
    p.meta_batch = 1;
    p.episodes = 100_000;
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = None;
    p.checkpoint_every = 500;
    (p, MethodConfig::MetaNet(MetaNetConfig::omniglot(ways)))
}
