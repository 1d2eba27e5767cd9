//! Memory-augmented neural networks (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, ICML
//! 2016) and the paper's plain-LSTM baseline (method `lstm`: the same controller, no memory).
//!
//! An episode is a sequence: the images of `ways` classes, `instances` of each, shuffled, and at
//! step t the input is `[x_t ‖ label(y_{t−1})]` (zeros at t = 0), so a label is seen one step
//! after its image. Classes get fresh labels every episode (the sampler's random label order, or a
//! fresh random string per class), so the network must bind images to labels in its memory.
//!
//! Per step: an LSTM controller (200 units) reads `[x_t ‖ label(y_{t−1}) ‖ r_{t−1}]`; each of 4
//! heads emits a key `k = tanh(W_k h + b_k)` (40) and a gate `α = W_α h + b_α`; the least-used
//! slot (from the usage of the step before) is zeroed, then every head writes its key with weights
//! `w^w = σ(α)·w^r_{t−1} + (1 − σ(α))·w^lu_{t−1}` (Least Recently Used Access); each head then reads
//! `r = Σ_i w^r(i) M(i)` with `w^r = softmax_i(cos(k, M(i)))`; usage decays,
//! `u_t = γ·u_{t−1} + Σ_heads (w^r_t + w^w_t)` (γ = 0.95); the output is a softmax over
//! `W_o [h_t ‖ r_t] + b_o`. The loss is the cross-entropy of every step's prediction.
//!
//! Choices where the paper is silent or ambiguous: head j's least-used weights are one-hot on the
//! j-th least-used slot (the paper's w^lu is a binary vector over the n = 4 smallest usages; the
//! widely used reimplementation, tristandeleu/ntm-one-shot, gives each head one of them); the
//! write vector is the head's key (the paper's `M_t(i) ← M_{t−1}(i) + w^w_t(i) k_t`); the memory
//! starts at 1e−6 everywhere, usage and read weights at 0; ties in usage go to the lower slot.
//! Usage only selects slots (a constant for the gradient), so it is kept on the host in f64.
//! Training and sequence scoring run the whole recurrence as one fused kernel with its own
//! backpropagation through time ([`crate::kernels::mann_recurrence`]); [`MannNet::step`] is the
//! same step in candle ops, for a support prefix followed by queries and as the kernel's reference.
//! Optimiser: Adam at 1e-3 over 50 000 batches of 16 (the paper: RMSProp at 1e-4 for 100 000
//! episodes; at that rate training here stays on the plateau where a new image gets an unseen
//! label but no label is recalled, measured in docs/RESULTS.md).
//!
//! String labels (the paper's five-hot labels): each class of an episode gets a distinct random
//! string of 5 characters over an alphabet of 5, fed as 5 concatenated one-hots and predicted by 5
//! softmaxes; a prediction is right when all 5 characters are.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, OnlineScorer, Preset, SharedFlags,
    State, StepCtx, StepOutput,
};
use crate::data::episode::{episode_rng, shuffled_sequence};
use crate::data::{Episode, EpisodeSpec};
pub use crate::kernels::least_used_slots;
use crate::kernels::{mann_recurrence, MannLayout};
use crate::nn::lstm::{sigmoid, LstmCell};
use crate::nn::{init, ops, ParamSet, Params, RunningStats};
use crate::optim::StepDecay;
use crate::protocol::{DataConfig, Protocol};

/// Characters per string label and symbols per character (the paper's five-hot labels).
pub const STRING_LENGTH: usize = 5;
pub const STRING_SYMBOLS: usize = 5;

/// How a class's label is shown to and predicted by the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LabelCode {
    /// One-hot over the classes of an episode.
    #[default]
    OneHot,
    /// A random 5-character string over 5 symbols per class (five-hot input, 5 softmaxes).
    String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MannConfig {
    /// False: the plain-LSTM baseline (method `lstm`).
    pub memory: bool,
    /// Classes per episode: the one-hot width (string labels need only as many distinct strings).
    pub classes: usize,
    pub labels: LabelCode,
    /// LSTM controller units.
    pub controller: usize,
    /// Memory slots × slot size.
    pub slots: usize,
    pub slot_size: usize,
    pub read_heads: usize,
    /// γ of the usage update.
    pub usage_decay: f64,
    /// kshot's option, not the paper's: each head also emits a key strength β = 1 + softplus(·)
    /// that multiplies its cosine similarities before the softmax (as in the Neural Turing
    /// Machine), so a read can focus on one of 128 slots (the paper's softmax over cosines in
    /// [−1, 1] cannot put more than e²/(e² + 127) ≈ 5% on one slot against unrelated slots).
    #[serde(default)]
    pub key_strength: bool,
}

impl Default for MannConfig {
    fn default() -> Self {
        Self {
            memory: true,
            classes: 5,
            labels: LabelCode::OneHot,
            controller: 200,
            slots: 128,
            slot_size: 40,
            read_heads: 4,
            usage_decay: 0.95,
            key_strength: false,
        }
    }
}

impl MannConfig {
    /// The width of a label's encoding (input and output alike).
    pub fn label_width(&self) -> usize {
        match self.labels {
            LabelCode::OneHot => self.classes,
            LabelCode::String => STRING_LENGTH * STRING_SYMBOLS,
        }
    }

    /// The width of all read vectors together (0 without memory).
    fn read_width(&self) -> usize {
        if self.memory {
            self.read_heads * self.slot_size
        } else {
            0
        }
    }
}

/// The network: controller, heads and output layer over explicit parameters.
#[derive(Debug, Clone, Copy)]
pub struct MannNet {
    pub config: MannConfig,
    /// Pixels per image (C·H·W).
    pub pixels: usize,
}

/// The recurrent state of a batch of sequences after some steps.
#[derive(Clone)]
pub struct MannState {
    h: Tensor,
    c: Tensor,
    /// [B, R·D] the last read vectors.
    reads: Tensor,
    /// [B, S, D]
    memory: Option<Tensor>,
    /// [B, R, S] the last read weights.
    read_weights: Option<Tensor>,
    /// [B][S] usage, host side (it only selects slots).
    usage: Vec<Vec<f64>>,
}

/// What one step emits: the controller output and the read vectors, [B, H] and [B, R·D].
pub struct StepOut {
    pub h: Tensor,
    pub reads: Tensor,
}

impl MannNet {
    pub fn new(config: MannConfig, pixels: usize) -> Self {
        Self { config, pixels }
    }

    fn cell(&self) -> LstmCell {
        let c = &self.config;
        LstmCell::new(self.pixels + c.label_width() + c.read_width(), c.controller, c.controller)
    }

    pub fn init(&self, rng: &mut ChaCha8Rng, device: &Device) -> Result<ParamSet> {
        let c = &self.config;
        let mut p = ParamSet::new();
        self.cell().init("controller", &mut p, rng, device)?;
        // PyTorch's default linear layer: weight and bias uniform in ±1/√fan_in.
        let mut linear = |p: &mut ParamSet, name: &str, cin: usize, cout: usize| -> Result<()> {
            p.push(format!("{name}.weight"), init::torch_default(rng, &[cout, cin], cin, device)?)?;
            p.push(format!("{name}.bias"), init::torch_default(rng, &[cout], cin, device)?)
        };
        let h = c.controller;
        if c.memory {
            linear(&mut p, "key", h, c.read_width())?;
            linear(&mut p, "gate", h, c.read_heads)?;
            if c.key_strength {
                linear(&mut p, "strength", h, c.read_heads)?;
            }
        }
        linear(&mut p, "output", h + c.read_width(), c.label_width())?;
        Ok(p)
    }

    /// The state before the first step of `batch` sequences.
    pub fn initial_state(&self, batch: usize, dtype: DType, device: &Device) -> Result<MannState> {
        let c = &self.config;
        let zeros = |d: usize| Tensor::zeros((batch, d), dtype, device);
        let (memory, read_weights) = if c.memory {
            (
                Some((Tensor::ones((batch, c.slots, c.slot_size), dtype, device)? * 1e-6)?),
                Some(Tensor::zeros((batch, c.read_heads, c.slots), dtype, device)?),
            )
        } else {
            (None, None)
        };
        Ok(MannState {
            h: zeros(c.controller)?,
            c: zeros(c.controller)?,
            reads: zeros(c.read_width())?,
            memory,
            read_weights,
            usage: vec![vec![0.0; c.slots]; batch],
        })
    }

    /// The part of the controller's gates that comes from `[x ‖ label]` of every step at once:
    /// `inputs` [B, T, P + L] → [B, T, 4H], bias included.
    pub fn input_gates(&self, params: &Params, inputs: &Tensor) -> Result<Tensor> {
        let (b, t, width) = inputs.dims3()?;
        let w = params.get("controller.weight_ih")?.narrow(1, 0, width)?;
        let bias = params.get("controller.bias")?;
        inputs.reshape((b * t, width))?.matmul(&w.t()?)?.broadcast_add(bias)?.reshape((b, t, ()))
    }

    /// One step from `state`, given that step's input gates [B, 4H].
    pub fn step(&self, params: &Params, state: &mut MannState, gates_in: &Tensor) -> Result<StepOut> {
        let c = &self.config;
        let n = c.controller;
        let mut gates = (gates_in + state.h.matmul(&params.get("controller.weight_hh")?.t()?)?)?;
        if c.memory {
            let w_ih = params.get("controller.weight_ih")?;
            let w_r = w_ih.narrow(1, w_ih.dim(1)? - c.read_width(), c.read_width())?;
            gates = (gates + state.reads.matmul(&w_r.t()?)?)?;
        }
        // One sigmoid over all four gates (the cell part's is unused): fewer, larger ops.
        let sig = sigmoid(&gates)?;
        let (i, f, o) = (sig.narrow(1, 0, n)?, sig.narrow(1, n, n)?, sig.narrow(1, 3 * n, n)?);
        let g = gates.narrow(1, 2 * n, n)?.tanh()?;
        state.c = ((f * &state.c)? + (i * g)?)?;
        state.h = (o * state.c.tanh()?)?;
        if c.memory {
            self.memory_step(params, state)?;
        }
        Ok(StepOut { h: state.h.clone(), reads: state.reads.clone() })
    }

    /// Least Recently Used Access: zero the least-used slot, write, read, update usage.
    fn memory_step(&self, params: &Params, state: &mut MannState) -> Result<()> {
        let c = &self.config;
        let (batch, heads) = (state.h.dim(0)?, c.read_heads);
        let (dtype, device) = (state.h.dtype(), state.h.device().clone());
        let keys = ops::linear(&state.h, params, "key")?.tanh()?;
        let keys = keys.reshape((batch, heads, c.slot_size))?;
        let alpha = sigmoid(&ops::linear(&state.h, params, "gate")?)?.unsqueeze(2)?;
        let (least_used, keep) = least_used(&state.usage, heads, dtype, &device)?;
        let previous_reads = state.read_weights.as_ref().expect("a memory state has read weights");
        // σ(α)·w^r_{t−1} + (1 − σ(α))·w^lu_{t−1}, as w^lu + σ(α)·(w^r − w^lu).
        let write = (&least_used + (previous_reads - &least_used)?.broadcast_mul(&alpha)?)?;
        let memory = state.memory.as_ref().expect("a memory state has a memory");
        let memory = (memory.broadcast_mul(&keep)? + write.transpose(1, 2)?.matmul(&keys)?)?;
        let mut similarity = cosine_rows(&keys, &memory)?;
        if c.key_strength {
            let raw = ops::linear(&state.h, params, "strength")?;
            // 1 + softplus(x), written as 1 + max(x, 0) + log(1 + e^{−|x|}) for stability.
            let softplus = (raw.relu()? + (raw.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
            similarity = similarity.broadcast_mul(&(softplus + 1.0)?.unsqueeze(2)?)?;
        }
        let read = ops::softmax(&similarity)?;
        state.reads = read.matmul(&memory)?.reshape((batch, heads * c.slot_size))?;
        let read_host = read.to_dtype(DType::F64)?.sum(1)?.to_vec2::<f64>()?;
        let write_host = write.to_dtype(DType::F64)?.sum(1)?.to_vec2::<f64>()?;
        for (b, usage) in state.usage.iter_mut().enumerate() {
            for (s, u) in usage.iter_mut().enumerate() {
                *u = c.usage_decay * *u + read_host[b][s] + write_host[b][s];
            }
        }
        state.memory = Some(memory);
        state.read_weights = Some(read);
        Ok(())
    }

    /// [B, T, P + L] inputs → [B, T, L] output logits, every step in order from the initial state:
    /// the fused recurrence of [`mann_recurrence`] on the CPU, [`Self::step`] by step elsewhere.
    pub fn sequence_logits(&self, params: &Params, inputs: &Tensor) -> Result<Tensor> {
        let features = if inputs.device().is_cpu() {
            self.sequence_features(params, inputs)?
        } else {
            self.sequence_features_stepwise(params, inputs)?
        };
        self.output(params, &features)
    }

    /// `[h_t ‖ r_t]` [B, T, H + R·D] of every step by the fused recurrence (CPU).
    pub fn sequence_features(&self, params: &Params, inputs: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let gates = self.input_gates(params, inputs)?;
        let layout = MannLayout {
            hidden: c.controller,
            heads: if c.memory { c.read_heads } else { 0 },
            slots: c.slots,
            slot_size: c.slot_size,
            key_strength: c.key_strength,
            usage_decay: c.usage_decay,
        };
        let w_hh = params.get("controller.weight_hh")?;
        let w_ih = params.get("controller.weight_ih")?;
        let w_r = w_ih.narrow(1, w_ih.dim(1)? - c.read_width(), c.read_width())?;
        let mut weights = vec![w_hh, &w_r];
        let heads: &[&str] = match (c.memory, c.key_strength) {
            (false, _) => &[],
            (true, false) => &["key", "gate"],
            (true, true) => &["key", "gate", "strength"],
        };
        let names: Vec<String> = ["weight", "bias"]
            .iter()
            .flat_map(|part| heads.iter().map(move |h| format!("{h}.{part}")))
            .collect();
        for name in &names {
            weights.push(params.get(name)?);
        }
        mann_recurrence(&gates, &weights, layout)
    }

    /// The same features by [`Self::step`], one candle graph per step (the reference the fused
    /// recurrence is tested against).
    pub fn sequence_features_stepwise(&self, params: &Params, inputs: &Tensor) -> Result<Tensor> {
        let (b, t, _) = inputs.dims3()?;
        let gates = self.input_gates(params, inputs)?;
        let mut state = self.initial_state(b, inputs.dtype(), inputs.device())?;
        let mut outs = Vec::with_capacity(t);
        for step in 0..t {
            let out = self.step(params, &mut state, &gates.narrow(1, step, 1)?.squeeze(1)?)?;
            outs.push(Tensor::cat(&[&out.h, &out.reads], 1)?);
        }
        Tensor::stack(&outs, 1)
    }

    /// `[h ‖ r]` [.., H + R·D] → label logits [.., L].
    pub fn output(&self, params: &Params, features: &Tensor) -> Result<Tensor> {
        let dims = features.dims().to_vec();
        let width = *dims.last().expect("features have a last dimension");
        let rows = features.elem_count() / width;
        let y = ops::linear(&features.reshape((rows, width))?, params, "output")?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = y.dim(1)?;
        y.reshape(out_dims)
    }
}

/// Head j's least-used weights, one-hot on the j-th least-used slot of `usage` [B][S] ([B, R, S]),
/// and the mask [B, S, 1] that zeroes the least-used slot.
fn least_used(
    usage: &[Vec<f64>],
    heads: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let slots = usage.first().map_or(0, Vec::len);
    let mut weights = vec![0f64; usage.len() * heads * slots];
    let mut keep = vec![1f64; usage.len() * slots];
    for (b, u) in usage.iter().enumerate() {
        for (j, s) in least_used_slots(u, heads).into_iter().enumerate() {
            weights[(b * heads + j) * slots + s] = 1.0;
            if j == 0 {
                keep[b * slots + s] = 0.0;
            }
        }
    }
    let weights = Tensor::from_vec(weights, (usage.len(), heads, slots), device)?.to_dtype(dtype)?;
    let keep = Tensor::from_vec(keep, (usage.len(), slots, 1), device)?.to_dtype(dtype)?;
    Ok((weights, keep))
}

/// Cosine similarity of each head's key with each slot: [B, R, D] × [B, S, D] → [B, R, S].
fn cosine_rows(keys: &Tensor, memory: &Tensor) -> Result<Tensor> {
    let norm = |x: &Tensor| -> Result<Tensor> { (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-16)?.sqrt() };
    let dot = keys.matmul(&memory.transpose(1, 2)?)?;
    let scale = norm(keys)?.matmul(&norm(memory)?.transpose(1, 2)?)?;
    dot / (scale + 1e-8)?
}

/// Episodes as sequences: images in a shuffled order, labels encoded per class.
pub struct Sequence {
    /// [T, P] flattened images in presentation order.
    pub images: Tensor,
    /// The label (0..ways) of each step.
    pub labels: Vec<u32>,
    /// The code of each label: its string of symbols (one symbol, the label, for one-hot).
    pub codes: Vec<Vec<u32>>,
}

impl Sequence {
    /// The images `images` [T, C, H, W] with `labels`, shown in the order `rng` shuffles them,
    /// each label given a code drawn from `rng`.
    pub fn shuffled(
        images: &Tensor,
        labels: &[u32],
        ways: usize,
        code: LabelCode,
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let (images, labels) = shuffled_sequence(images, labels, rng)?;
        Ok(Self { images: images.flatten_from(1)?, labels, codes: label_codes(ways, code, rng) })
    }

    /// `[x_t ‖ code(y_{t−1})]` for every step t: [T, P + L], zeros for the label at t = 0.
    pub fn inputs(&self, config: &MannConfig) -> Result<Tensor> {
        let previous: Vec<Option<u32>> =
            std::iter::once(None).chain(self.labels.iter().map(|&l| Some(l))).collect();
        let shown = &previous[..self.labels.len()];
        let labels = encode(shown, &self.codes, config, self.images.device())?;
        Tensor::cat(&[&self.images, &labels.to_dtype(self.images.dtype())?], 1)
    }

    /// The target symbol of each step at each code position: [T] per position.
    fn targets(&self) -> Vec<Vec<u32>> {
        let len = self.codes.first().map_or(1, Vec::len);
        (0..len).map(|p| self.labels.iter().map(|&l| self.codes[l as usize][p]).collect()).collect()
    }
}

/// Distinct codes for `ways` labels: label l itself (one-hot), or a random distinct string.
pub fn label_codes(ways: usize, code: LabelCode, rng: &mut ChaCha8Rng) -> Vec<Vec<u32>> {
    match code {
        LabelCode::OneHot => (0..ways as u32).map(|l| vec![l]).collect(),
        LabelCode::String => {
            let total = (STRING_SYMBOLS as u32).pow(STRING_LENGTH as u32);
            let picked = rand::seq::index::sample(rng, total as usize, ways);
            picked
                .iter()
                .map(|mut v| {
                    (0..STRING_LENGTH)
                        .map(|_| {
                            let s = (v % STRING_SYMBOLS) as u32;
                            v /= STRING_SYMBOLS;
                            s
                        })
                        .collect()
                })
                .collect()
        }
    }
}

/// The encodings [n, L] (f32) of the given labels, a zero row for `None`.
fn encode(
    labels: &[Option<u32>],
    codes: &[Vec<u32>],
    config: &MannConfig,
    device: &Device,
) -> Result<Tensor> {
    let width = config.label_width();
    let symbols = match config.labels {
        LabelCode::OneHot => config.classes,
        LabelCode::String => STRING_SYMBOLS,
    };
    let mut m = vec![0f32; labels.len() * width];
    for (row, label) in labels.iter().enumerate() {
        if let Some(l) = label {
            for (p, &s) in codes[*l as usize].iter().enumerate() {
                m[row * width + p * symbols + s as usize] = 1.0;
            }
        }
    }
    Tensor::from_vec(m, (labels.len(), width), device)
}

/// The loss (mean over steps of the summed cross-entropy of every code position) and whether each
/// step's prediction was right (every position), for logits [T, L] of one sequence.
fn sequence_loss(
    logits: &Tensor,
    seq: &Sequence,
    config: &MannConfig,
) -> Result<(Tensor, Vec<bool>)> {
    let targets = seq.targets();
    let symbols = config.label_width() / targets.len();
    let mut loss: Option<Tensor> = None;
    let mut correct = vec![true; seq.labels.len()];
    for (p, target) in targets.iter().enumerate() {
        let part = logits.narrow(1, p * symbols, symbols)?;
        let t = Tensor::new(target.as_slice(), logits.device())?;
        let ce = ops::cross_entropy(&part, &t)?;
        loss = Some(match loss {
            Some(l) => (l + ce)?,
            None => ce,
        });
        let predicted = part.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (k, (&pr, &tg)) in predicted.iter().zip(target).enumerate() {
            correct[k] &= pr == tg;
        }
    }
    Ok((loss.expect("a code has at least one position"), correct))
}

pub struct Mann {
    pub config: MannConfig,
    net: MannNet,
    state: State,
}

/// The RNG stream of an episode's presentation order and codes, apart from its drawing stream.
const SEQUENCE_STREAM: u64 = 0x4d41_4e4e;

impl Mann {
    pub fn new(config: MannConfig, pixels: usize, rng: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        let net = MannNet::new(config, pixels);
        let state = State::new(net.init(rng, device)?, RunningStats::default());
        Ok(Self { config, net, state })
    }

    pub fn net(&self) -> &MannNet {
        &self.net
    }

    /// An episode's images (support then query) as one shuffled sequence, from (seed, index).
    pub fn sequence_of(&self, episode: &Episode) -> Result<Sequence> {
        let (images, labels) = episode.all_images()?;
        let mut rng = episode_rng(episode.seed ^ SEQUENCE_STREAM, episode.index);
        Sequence::shuffled(&images, &labels, episode.spec.ways, self.config.labels, &mut rng)
    }

    /// The mean sequence loss of a batch of sequences (run as one batch) and their step accuracy.
    pub fn batch_loss(&self, params: &Params, sequences: &[Sequence]) -> Result<EpisodeOutput> {
        let inputs = sequences
            .iter()
            .map(|s| s.inputs(&self.config))
            .collect::<Result<Vec<_>>>()?;
        let inputs = Tensor::stack(&inputs, 0)?;
        let dtype = params.get("output.weight")?.dtype();
        let logits = self.net.sequence_logits(params, &inputs.to_dtype(dtype)?)?;
        let mut total: Option<Tensor> = None;
        let (mut right, mut steps) = (0usize, 0usize);
        for (b, seq) in sequences.iter().enumerate() {
            let (loss, correct) = sequence_loss(&logits.get(b)?, seq, &self.config)?;
            right += correct.iter().filter(|&&c| c).count();
            steps += correct.len();
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        let total = total.ok_or_else(|| candle_core::Error::Msg("an empty batch".into()))?;
        Ok(EpisodeOutput {
            loss: (total / sequences.len() as f64)?,
            accuracy: right as f64 / steps.max(1) as f64,
        })
    }

    fn check_ways(&self, ways: usize) -> Result<()> {
        if self.config.labels == LabelCode::OneHot && ways > self.config.classes {
            candle_core::bail!(
                "this {} model has {} one-hot labels; evaluate it with --ways {} or fewer",
                self.name(),
                self.config.classes,
                self.config.classes
            )
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        if self.config.memory {
            "MANN"
        } else {
            "LSTM"
        }
    }
}

/// A support set presented as the labelled prefix of a sequence: each query is one more step.
struct Prefixed<'a> {
    mann: &'a Mann,
    params: Params,
    state: MannState,
    /// The code of the last prefix step's label, shown with every query.
    last: Tensor,
    codes: Vec<Vec<u32>>,
    ways: usize,
}

impl Classifier for Prefixed<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let m = query.dim(0)?;
        let dtype = self.last.dtype();
        let x = query.flatten_from(1)?.to_dtype(dtype)?;
        let inputs = Tensor::cat(&[&x, &self.last.broadcast_as((m, self.last.dim(1)?))?], 1)?;
        let net = &self.mann.net;
        let gates = net.input_gates(&self.params, &inputs.unsqueeze(1)?)?.squeeze(1)?;
        let mut state = self.state.repeat(m)?;
        let out = net.step(&self.params, &mut state, &gates)?;
        let logits = net.output(&self.params, &Tensor::cat(&[&out.h, &out.reads], 1)?)?;
        class_scores(&logits, &self.codes, &self.mann.config, self.ways)
    }
}

/// [M, L] output logits → [M, ways] class scores: the one-hot logits of the task's labels, or
/// each class's string log-likelihood Σ_p log p_p(code_p).
fn class_scores(logits: &Tensor, codes: &[Vec<u32>], config: &MannConfig, ways: usize) -> Result<Tensor> {
    match config.labels {
        LabelCode::OneHot => logits.narrow(1, 0, ways),
        LabelCode::String => {
            let mut per_class = Vec::with_capacity(ways);
            for code in codes.iter().take(ways) {
                let mut score: Option<Tensor> = None;
                for (p, &s) in code.iter().enumerate() {
                    let lp = ops::log_softmax(&logits.narrow(1, p * STRING_SYMBOLS, STRING_SYMBOLS)?)?
                        .narrow(1, s as usize, 1)?;
                    score = Some(match score {
                        Some(t) => (t + lp)?,
                        None => lp,
                    });
                }
                per_class.push(score.expect("a string label has characters"));
            }
            Tensor::cat(&per_class, 1)
        }
    }
}

impl MannState {
    /// [B][S] usage after the last step.
    pub fn usage(&self) -> &[Vec<f64>] {
        &self.usage
    }

    /// [B, S, D] memory after the last step (none without memory).
    pub fn memory(&self) -> Option<&Tensor> {
        self.memory.as_ref()
    }

    /// [B, R, S] read weights of the last step (none without memory).
    pub fn read_weights(&self) -> Option<&Tensor> {
        self.read_weights.as_ref()
    }

    /// `m` copies of a one-sequence state, as a batch.
    fn repeat(&self, m: usize) -> Result<Self> {
        let rep = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            dims[0] = m;
            t.broadcast_as(dims)?.contiguous()
        };
        Ok(Self {
            h: rep(&self.h)?,
            c: rep(&self.c)?,
            reads: rep(&self.reads)?,
            memory: self.memory.as_ref().map(rep).transpose()?,
            read_weights: self.read_weights.as_ref().map(rep).transpose()?,
            usage: vec![self.usage[0].clone(); m],
        })
    }
}

impl OnlineScorer for Mann {
    fn online_correct(
        &self,
        images: &Tensor,
        labels: &[u32],
        ways: usize,
        seed: u64,
    ) -> Result<Vec<bool>> {
        self.check_ways(ways)?;
        let params = self.state.params.detached_values();
        let dtype = params.get("output.weight")?.dtype();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SEQUENCE_STREAM);
        let codes = label_codes(ways, self.config.labels, &mut rng);
        let images = images.flatten_from(1)?.to_dtype(dtype)?;
        let seq = Sequence { images, labels: labels.to_vec(), codes };
        let inputs = seq.inputs(&self.config)?.unsqueeze(0)?;
        let logits = self.net.sequence_logits(&params, &inputs)?.squeeze(0)?;
        Ok(sequence_loss(&logits, &seq, &self.config)?.1)
    }
}

impl Learner for Mann {
    /// The support images, shuffled in a fixed order, are the labelled prefix of the sequence;
    /// each query is the step after it (queries never see one another).
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        self.check_ways(ways)?;
        let params = self.state.params.detached_values();
        let dtype = params.get("output.weight")?.dtype();
        let mut rng = ChaCha8Rng::seed_from_u64(SEQUENCE_STREAM);
        let seq = Sequence::shuffled(support, labels, ways, self.config.labels, &mut rng)?;
        let inputs = seq.inputs(&self.config)?.to_dtype(dtype)?.unsqueeze(0)?;
        let gates = self.net.input_gates(&params, &inputs)?;
        let mut state = self.net.initial_state(1, dtype, support.device())?;
        for t in 0..seq.labels.len() {
            self.net.step(&params, &mut state, &gates.narrow(1, t, 1)?.squeeze(1)?)?;
        }
        let last = encode(&[seq.labels.last().copied()], &seq.codes, &self.config, support.device())?
            .to_dtype(dtype)?;
        Ok(Box::new(Prefixed { mann: self, params, state, last, codes: seq.codes, ways }))
    }

    fn online(&self) -> Option<&dyn OnlineScorer> {
        Some(self)
    }

    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let episodes = ctx.episodes()?;
        let sequences = episodes.iter().map(|e| self.sequence_of(e)).collect::<Result<Vec<_>>>()?;
        let out = self.batch_loss(&self.state.params.values(), &sequences)?;
        ctx.minimise(out)
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of MANN and its LSTM baseline.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MannFlags {
    /// MANN / LSTM: how labels are encoded (one-hot, or the paper's five-hot strings).
    #[arg(long, value_enum)]
    pub label_code: Option<LabelCode>,
    /// MANN: memory slots.
    #[arg(long)]
    pub memory_slots: Option<usize>,
    /// MANN: read heads.
    #[arg(long)]
    pub read_heads: Option<usize>,
    /// MANN: learned key strengths β ≥ 1 that sharpen content addressing (kshot's option; the
    /// paper has none).
    #[arg(long)]
    pub key_strength: Option<bool>,
}

impl Method for MannConfig {
    const NAMES: &'static [&'static str] = &["mann", "lstm"];
    type Flags = MannFlags;

    fn named(name: &str) -> Self {
        Self { memory: name == "mann", ..Self::default() }
    }

    fn name(&self) -> &'static str {
        if self.memory {
            "mann"
        } else {
            "lstm"
        }
    }

    fn set_name(&mut self, name: &str) {
        self.memory = name == "mann";
    }

    fn apply(&mut self, flags: &MannFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        if let Some(k) = flags.key_strength {
            self.key_strength = k;
        }
        if let Some(c) = flags.label_code {
            self.labels = c;
        }
        if let Some(s) = flags.memory_slots {
            anyhow::ensure!(s >= self.read_heads, "--memory-slots must be at least the read heads");
            self.slots = s;
        }
        if let Some(h) = flags.read_heads {
            anyhow::ensure!(h >= 1 && h <= self.slots, "--read-heads must be 1 to the memory slots");
            self.read_heads = h;
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        match self.labels {
            LabelCode::OneHot => super::ensure_train_ways(self.name(), self.classes, protocol)?,
            LabelCode::String => anyhow::ensure!(
                protocol.train.ways <= STRING_SYMBOLS.pow(STRING_LENGTH as u32),
                "string labels name at most 3125 classes an episode"
            ),
        }
        let size = protocol.data.image_size;
        let channels = protocol.backbone.in_channels();
        Ok(Box::new(Mann::new(*self, channels * size * size, rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.classes)
    }

    fn step_unit(&self, protocol: &Protocol) -> String {
        format!(
            "batches of {} sequences ({} classes × {} instances)",
            protocol.meta_batch, protocol.train.ways, protocol.train.shots
        )
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "mann-omniglot-5class",
                summary: concat!("Santoro et al. 2016, Table 1: MANN (LSTM controller, LRUA memory 128 × 40, 4 read heads), 5 classes × 10 instances, one-hot labels; ", mann_protocol!()),
                build: || omniglot(true, 5, LabelCode::OneHot),
            },
            Preset {
                name: "mann-omniglot-5class-string",
                summary: concat!("Santoro et al. 2016, Table 2: MANN, 5 classes × 10 instances, five-hot string labels; ", mann_protocol!()),
                build: || omniglot(true, 5, LabelCode::String),
            },
            Preset {
                name: "mann-omniglot-15class",
                summary: concat!("Santoro et al. 2016, Table 2: MANN, 15 classes × 10 instances (150 steps), five-hot string labels; ", mann_protocol!()),
                build: || omniglot(true, 15, LabelCode::String),
            },
            Preset {
                name: "lstm-omniglot-5class",
                summary: concat!("Santoro et al. 2016, Table 1: the LSTM baseline (the same 200-unit controller, no memory), 5 classes × 10 instances, one-hot labels; ", mann_protocol!()),
                build: || omniglot(false, 5, LabelCode::OneHot),
            },
            Preset {
                name: "lstm-omniglot-15class",
                summary: concat!("Santoro et al. 2016, Table 2: the LSTM baseline, 15 classes × 10 instances, five-hot string labels; ", mann_protocol!()),
                build: || omniglot(false, 15, LabelCode::String),
            },
        ]
    }
}

macro_rules! mann_protocol {
    () => {
        "20×20 images; trained on the 1200 training characters × 4 rotations of the official random split (openai/supervised-reptile's, the paper's sizes), tested on the 423 other characters unrotated; batches of 16 episodes, 50 000 batches (800 000 episodes; ≈ 88 minutes for 5 classes here), Adam 1e-3 (the paper: RMSProp 1e-4 for 100 000 episodes, which here stays on the 31% plateau: pass --lr 1e-4 --episodes 6250 for it); eval: 1000 sequences of 10 instances per class (per-instance accuracy) and N-way 1-shot with the support as the labelled prefix"
    };
}
use mann_protocol;

fn omniglot(memory: bool, classes: usize, labels: LabelCode) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.data = DataConfig { split: "reptile".into(), train_subset: "train".into(), ..DataConfig::omniglot() };
    p.data.image_size = 20;
    p.train = EpisodeSpec::new(classes, 10, 0);
    p.test = EpisodeSpec::new(classes, 1, 9);
    p.meta_batch = 16;
    p.episodes = 50_000;
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = None;
    p.checkpoint_every = 200;
    p.test_episodes = 1000;
    let config = MannConfig { memory, classes, labels, ..MannConfig::default() };
    (p, MethodConfig::Mann(config))
}
