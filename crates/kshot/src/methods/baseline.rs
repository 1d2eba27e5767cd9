//! Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang 2019, "A Closer Look at Few-shot
//! Classification"): the transfer-learning answer to meta-learning.
//!
//! Training draws no episodes: the backbone and a classifier over *all* base classes are trained
//! with cross-entropy on ordinary mini-batches ([`Baseline::batch_loss`]). The classifier is
//! linear, `Wx + b` (Baseline), or cosine, `s · cos(x, w_c)` (Baseline++).
//!
//! At test time the backbone is frozen and a fresh head of the same kind is fine-tuned on the
//! support features, as in Chen et al.'s code: 100 epochs over the support set in mini-batches of 4
//! (shuffled each epoch), SGD lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001. The fresh
//! head is drawn from PyTorch's default init (U(±1/√D)), from a fixed RNG, and its rows are handed to
//! classes in the order the classes first appear in the support set, so that relabelling the
//! support permutes the logits exactly. The shuffle depends only on the support size. The cosine
//! scale follows Chen's code: 2 for at most 200 classes, 10 above (Omniglot's thousands of base
//! classes). Chen's code also learns a per-class norm (`distLinear` wraps its linear layer in
//! `WeightNorm(dim=0)`): the weight is w_c = g_c·v_c/‖v_c‖ with g_c learned and initialised to
//! ‖v_c‖, so the scores are s·g_c·cos(x, v_c) ([`BaselineConfig::weight_norm`], in pretraining
//! and fine-tuning, both g and v decayed); without it the head is the paper's plain cosine.
//!
//! Chen's Omniglot schedule is 5 epochs of mini-batches of 16 over the training images, shuffled
//! without replacement each epoch ([`BaselineConfig::epoch_sampling`]), with He-normal
//! convolutions (N(0, √(2/(k·k·c_out))), backbone.py `init_layer`) and a zero linear-head bias
//! ([`BaselineConfig::closer_look_init`]).
//!
//! The head is fine-tuned on features computed once, with exact hand-written gradients (softmax
//! regression and its cosine form), so an episode costs one forward pass of the backbone.

use candle_core::{Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::{episode, ImageSet};
use crate::nn::{init, ops, Backbone, BackboneConfig, BnMode, Params};
use crate::optim::StepDecay;
use crate::protocol::Protocol;

/// The classifier on top of the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Head {
    /// `Wx + b` (Baseline).
    #[default]
    Linear,
    /// `s · cos(x, w_c)` (Baseline++).
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BaselineConfig {
    /// Linear (`baseline`) or cosine (`baseline++`).
    #[serde(default)]
    pub head: Head,
    /// Base classes of the pretraining head; 0 until the trainer fills it in from the training set.
    pub classes: usize,
    /// Images per pretraining mini-batch (one training step).
    pub batch_size: usize,
    /// Fine-tuning on each test support set.
    pub finetune_epochs: usize,
    pub finetune_batch: usize,
    pub finetune_lr: f64,
    pub finetune_momentum: f64,
    pub finetune_dampening: f64,
    pub finetune_weight_decay: f64,
    /// Baseline++: the learned per-class norm g of Chen's `distLinear` (WeightNorm), in
    /// pretraining and fine-tuning. Older configs read as false (plain cosine).
    #[serde(default)]
    pub weight_norm: bool,
    /// Pretraining batches run through the training images in epochs, each a fresh shuffle without
    /// replacement (a function of the seed and epoch), the last batch of an epoch holding the
    /// remainder, as PyTorch's shuffled `DataLoader`. Older configs read as false: every batch
    /// draws (class, image) pairs independently with replacement.
    #[serde(default)]
    pub epoch_sampling: bool,
    /// Chen's initialisation: He-normal convolution weights N(0, √(2/(k·k·c_out))) and a zero
    /// bias of the linear head. Older configs read as false (PyTorch-default uniform, both).
    #[serde(default)]
    pub closer_look_init: bool,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            head: Head::Linear,
            classes: 0,
            batch_size: 16,
            finetune_epochs: 100,
            finetune_batch: 4,
            finetune_lr: 0.01,
            finetune_momentum: 0.9,
            finetune_dampening: 0.9,
            finetune_weight_decay: 0.001,
            weight_norm: true,
            epoch_sampling: true,
            closer_look_init: true,
        }
    }
}

/// Chen's `distLinear` scores: scale·g_c·(x/(‖x‖ + 1e-5))·(v_c/‖v_c‖), for features `x` [B, D],
/// directions `v` [C, D] and norms `g` [C].
///
/// The norms are √(Σ x² + 1e-24): the same value to 1e-12, but a finite gradient at x = 0, where
/// √ has none (PyTorch's `norm` returns 0 there; candle's √ would give ∞·0 = NaN, and a ReLU
/// feature vector can be exactly zero).
pub fn weight_norm_logits(x: &Tensor, v: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let x_hat = x.broadcast_div(&((x.sqr()?.sum_keepdim(1)? + 1e-24)?.sqrt()? + 1e-5)?)?;
    let v_hat = v.broadcast_div(&(v.sqr()?.sum_keepdim(1)? + 1e-24)?.sqrt()?)?;
    x_hat.matmul(&v_hat.t()?)?.broadcast_mul(&g.unsqueeze(0)?)? * scale
}

/// N(0, std²) draws as f32.
fn normal(rng: &mut ChaCha8Rng, shape: &[usize], std: f64, device: &Device) -> Result<Tensor> {
    use rand_distr::{Distribution, StandardNormal};
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (std * z) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, device)
}

/// The L2 norm of each row of `w` [C·D row-major].
fn row_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt()).collect()
}

/// Chen et al.'s cosine scale: 2 for at most 200 classes, 10 above.
pub fn cosine_scale(classes: usize) -> f64 {
    if classes <= 200 {
        2.0
    } else {
        10.0
    }
}

/// The fixed RNG seed of the fresh fine-tuning heads.
const FINETUNE_SEED: u64 = 0x5eed_c4e1;

pub struct Baseline {
    pub config: BaselineConfig,
    pub head: Head,
    backbone: Box<dyn Backbone>,
    state: State,
    dim: usize,
}

impl Baseline {
    pub fn new(
        config: BaselineConfig,
        backbone: &BackboneConfig,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.classes == 0 {
            candle_core::bail!(
                "baseline: the number of base classes is unknown (config.baseline.classes is 0)"
            );
        }
        if config.batch_size == 0 || config.finetune_batch == 0 {
            candle_core::bail!("baseline: batch sizes must be at least 1");
        }
        let head = config.head;
        let backbone = backbone.build();
        let dim = backbone.embedding_dim(image_size, image_size)?;
        let mut params = backbone.init(rng, device)?;
        if config.closer_look_init {
            // backbone.py `init_layer`: conv weights N(0, √(2/(k·k·c_out))); BN stays (1, 0).
            let mut he = crate::nn::ParamSet::new();
            for (name, var) in params.iter() {
                let dims = var.dims().to_vec();
                let t = if dims.len() == 4 {
                    let std = (2.0 / (dims[2] * dims[3] * dims[0]) as f64).sqrt();
                    normal(rng, &dims, std, device)?
                } else {
                    var.as_tensor().detach()
                };
                he.push(name.to_string(), t)?;
            }
            params = he;
        }
        let weight = init::torch_default(rng, &[config.classes, dim], dim, device)?;
        if head == Head::Cosine && config.weight_norm {
            // WeightNorm starts g at the norm of each row of v.
            let g = weight.sqr()?.sum(1)?.sqrt()?;
            params.push("head.weight", weight)?;
            params.push("head.g", g)?;
        } else {
            params.push("head.weight", weight)?;
        }
        if head == Head::Linear {
            let bias = if config.closer_look_init {
                Tensor::zeros(config.classes, candle_core::DType::F32, device)?
            } else {
                init::torch_default(rng, &[config.classes], dim, device)?
            };
            params.push("head.bias", bias)?;
        }
        let state = State::new(params, backbone.running_stats());
        Ok(Self { config, head, backbone, state, dim })
    }

    /// Whether the head is Chen's weight-normalised cosine (`bias` then holds g).
    fn weight_normed(&self) -> bool {
        self.head == Head::Cosine && self.config.weight_norm
    }

    /// Logits of the head: `bias` is b for the linear head, g for the weight-normalised cosine.
    fn head_logits(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let scale = cosine_scale(weight.dim(0)?);
        match self.head {
            Head::Linear => {
                x.matmul(&weight.t()?)?.broadcast_add(bias.expect("linear head has a bias"))
            }
            Head::Cosine if self.config.weight_norm => {
                weight_norm_logits(x, weight, bias.expect("weight norm has g"), scale)
            }
            Head::Cosine => ops::cosine_similarity(x, weight, 1e-10)? * scale,
        }
    }

    /// Fine-tunes a fresh head on support features `x` [n·D row-major] and returns (W, b).
    fn finetune(&self, x: &[f32], labels: &[u32], ways: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.dim;
        let n = labels.len();
        let c = &self.config;
        let mut rng = ChaCha8Rng::seed_from_u64(FINETUNE_SEED);
        let bound = 1.0 / (d as f64).sqrt();
        let fresh_w: Vec<f32> =
            (0..ways * d).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let fresh_b: Vec<f32> = (0..ways).map(|_| rng.random_range(-bound..bound) as f32).collect();
        // Row r of the fresh head goes to the r-th class to appear in the support set.
        let mut order: Vec<u32> = Vec::new();
        for &l in labels {
            if !order.contains(&l) {
                order.push(l);
            }
        }
        for l in 0..ways as u32 {
            if !order.contains(&l) {
                order.push(l);
            }
        }
        let (mut w, mut b) = (vec![0f32; ways * d], vec![0f32; ways]);
        for (r, &l) in order.iter().enumerate() {
            let l = l as usize;
            w[l * d..(l + 1) * d].copy_from_slice(&fresh_w[r * d..(r + 1) * d]);
            b[l] = fresh_b[r];
        }
        if self.weight_normed() {
            // `b` holds g, WeightNorm's initial value ‖v_c‖.
            b = row_norms(&w, d);
        }
        // Unit-length features for the cosine head.
        let xs: Vec<f32> = match self.head {
            Head::Linear => x.to_vec(),
            Head::Cosine => x
                .chunks(d)
                .flat_map(|row| {
                    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt() + 1e-5;
                    row.iter().map(move |v| v / norm).collect::<Vec<_>>()
                })
                .collect(),
        };
        let scale = cosine_scale(ways) as f32;
        let (lr, mom, damp, wd) = (
            c.finetune_lr as f32,
            c.finetune_momentum as f32,
            c.finetune_dampening as f32,
            c.finetune_weight_decay as f32,
        );
        let (mut buf_w, mut buf_b) = (vec![0f32; w.len()], vec![0f32; b.len()]);
        let mut first = true;
        let mut perm: Vec<usize> = (0..n).collect();
        let mut shuffle_rng = ChaCha8Rng::seed_from_u64(FINETUNE_SEED);
        shuffle_rng.set_stream(1);
        for _ in 0..c.finetune_epochs {
            perm.shuffle(&mut shuffle_rng);
            for batch in perm.chunks(c.finetune_batch) {
                let (gw, gb) = self.head_gradient(&xs, labels, batch, &w, &b, ways, scale);
                let step = |p: &mut [f32], g: &[f32], buf: &mut [f32]| {
                    for i in 0..p.len() {
                        let gi = g[i] + wd * p[i];
                        buf[i] = if first { gi } else { mom * buf[i] + (1.0 - damp) * gi };
                        p[i] -= lr * buf[i];
                    }
                };
                step(&mut w, &gw, &mut buf_w);
                if self.head == Head::Linear || self.weight_normed() {
                    step(&mut b, &gb, &mut buf_b);
                }
                first = false;
            }
        }
        (w, b)
    }

    /// Gradient of the mean cross-entropy over the rows `batch` of `x` with respect to (W, b), or
    /// for the weight-normalised cosine head with respect to (v, g) (`b` holding g).
    #[allow(clippy::too_many_arguments)]
    fn head_gradient(
        &self,
        x: &[f32],
        labels: &[u32],
        batch: &[usize],
        w: &[f32],
        b: &[f32],
        ways: usize,
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = self.dim;
        let wn = self.weight_normed();
        let norms: Vec<f32> = match self.head {
            Head::Linear => vec![1.0; ways],
            Head::Cosine if wn => row_norms(w, d),
            Head::Cosine => row_norms(w, d).into_iter().map(|n| n + 1e-10).collect(),
        };
        // The cosine's factor per class: s, or s·g_c with weight norm.
        let k_c: Vec<f32> = (0..ways).map(|c| if wn { scale * b[c] } else { scale }).collect();
        // Gradient with respect to the effective weight rows (W itself, or W's unit rows · scale).
        let mut g_eff = vec![0f32; ways * d];
        let mut gb = vec![0f32; ways];
        let inv = 1.0 / batch.len() as f32;
        let mut z = vec![0f32; ways];
        let mut cos = vec![0f32; ways];
        for &i in batch {
            let xi = &x[i * d..(i + 1) * d];
            for c in 0..ways {
                let wc = &w[c * d..(c + 1) * d];
                let dot: f32 = wc.iter().zip(xi).map(|(a, b)| a * b).sum();
                cos[c] = dot / norms[c];
                z[c] = match self.head {
                    Head::Linear => dot + b[c],
                    Head::Cosine => k_c[c] * cos[c],
                };
            }
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
            for c in 0..ways {
                let p = (z[c] - max).exp() / sum;
                let dz = (p - if labels[i] as usize == c { 1.0 } else { 0.0 }) * inv;
                // d z_c / d g_c = s·cos(x, v_c) for the weight-normalised head.
                gb[c] += if wn { dz * scale * cos[c] } else { dz };
                let k = match self.head {
                    Head::Linear => dz,
                    Head::Cosine => dz * k_c[c],
                };
                for (g, xv) in g_eff[c * d..(c + 1) * d].iter_mut().zip(xi) {
                    *g += k * xv;
                }
            }
        }
        if self.head == Head::Cosine {
            // d/dw of w/|w|: (I − ŵŵᵀ)/|w|.
            for c in 0..ways {
                let wc = &w[c * d..(c + 1) * d];
                let g = &mut g_eff[c * d..(c + 1) * d];
                let proj: f32 = wc.iter().zip(g.iter()).map(|(a, b)| a * b).sum::<f32>()
                    / (norms[c] * norms[c]);
                for (gv, wv) in g.iter_mut().zip(wc) {
                    *gv = (*gv - proj * wv) / norms[c];
                }
            }
        }
        (g_eff, gb)
    }
}

/// Pretraining steps per epoch of `set` in batches of `batch` (the last one holds the remainder).
pub fn steps_per_epoch(set: &ImageSet, batch: usize) -> u64 {
    let images: usize = (0..set.classes.len()).map(|c| set.num_images(c)).sum();
    images.div_ceil(batch.max(1)) as u64
}

/// The (class, image) pairs of step `step` when pretraining runs in epochs: step s is batch
/// s mod E of epoch ⌊s/E⌋ (E = [`steps_per_epoch`]), and each epoch is its own shuffle of every
/// training image, a function of (seed, epoch) alone, so a resumed run draws the same.
pub fn epoch_batch(set: &ImageSet, batch: usize, seed: u64, step: u64) -> Vec<(usize, usize)> {
    let per_epoch = steps_per_epoch(set, batch).max(1);
    let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
    let mut all: Vec<(usize, usize)> = (0..set.classes.len())
        .flat_map(|c| (0..set.num_images(c)).map(move |i| (c, i)))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xba5e_11e0_e90c_0000);
    rng.set_stream(epoch);
    all.shuffle(&mut rng);
    let start = k * batch;
    all[start.min(all.len())..((k + 1) * batch).min(all.len())].to_vec()
}

struct FineTuned<'a> {
    net: &'a Baseline,
    params: Params,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Classifier for FineTuned<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let bn = BnMode::Running(&self.net.state.running);
        let q = self.net.backbone.forward(&self.params, query, bn)?;
        self.net.head_logits(&q, &self.weight, self.bias.as_ref())
    }
}

impl Baseline {
    /// The cross-entropy of one pretraining mini-batch of the base classes drawn from `rng`; folds
    /// the batch statistics into the running averages.
    pub fn batch_loss(&mut self, set: &ImageSet, mut rng: ChaCha8Rng) -> Result<EpisodeOutput> {
        self.check_set(set)?;
        let picks: Vec<(usize, usize)> = (0..self.config.batch_size)
            .map(|_| {
                let class = rng.random_range(0..set.classes.len());
                (class, rng.random_range(0..set.num_images(class)))
            })
            .collect();
        self.picks_loss(set, &picks)
    }

    /// The pretraining mini-batch of training step `step` of a run seeded `seed`:
    /// [`Baseline::epoch_batch`] with [`BaselineConfig::epoch_sampling`], else
    /// [`Baseline::batch_loss`] with the step's random stream.
    pub fn step_loss(&mut self, set: &ImageSet, seed: u64, step: u64) -> Result<EpisodeOutput> {
        if !self.config.epoch_sampling {
            return self.batch_loss(set, episode::episode_rng(seed, step));
        }
        self.check_set(set)?;
        let picks = epoch_batch(set, self.config.batch_size, seed, step);
        self.picks_loss(set, &picks)
    }

    fn check_set(&self, set: &ImageSet) -> Result<()> {
        if set.classes.len() != self.config.classes {
            candle_core::bail!(
                "baseline: the head has {} classes but the training set {} has {}; train with the set the run was started on",
                self.config.classes,
                set.name,
                set.classes.len()
            );
        }
        Ok(())
    }

    /// The cross-entropy of the images `picks` ((class, image) pairs); folds the batch statistics
    /// into the running averages.
    fn picks_loss(&mut self, set: &ImageSet, picks: &[(usize, usize)]) -> Result<EpisodeOutput> {
        let device = Device::Cpu;
        let images = episode::images_tensor(set, picks, &device)?;
        let labels: Vec<u32> = picks.iter().map(|&(c, _)| c as u32).collect();
        let labels = Tensor::new(labels.as_slice(), &device)?;
        let params = self.state.params.values();
        let bn = BnMode::Batch(Some(&mut self.state.running));
        let feats = self.backbone.forward(&params, &images, bn)?;
        let bias = match self.head {
            Head::Linear => Some(params.get("head.bias")?.clone()),
            Head::Cosine if self.config.weight_norm => Some(params.get("head.g")?.clone()),
            Head::Cosine => None,
        };
        let logits = self.head_logits(&feats, params.get("head.weight")?, bias.as_ref())?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        let accuracy = ops::accuracy(&logits, &labels)?;
        Ok(EpisodeOutput { loss, accuracy })
    }
}

impl Learner for Baseline {
    fn embed(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let params = self.state.params.detached_values();
        Ok(self.backbone.forward(&params, images, BnMode::Running(&self.state.running))?)
    }

    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        if labels.iter().any(|&l| l as usize >= ways) {
            candle_core::bail!("support label out of range for {ways} ways");
        }
        let params = self.state.params.detached_values();
        let bn = BnMode::Running(&self.state.running);
        let feats = self.backbone.forward(&params, support, bn)?;
        let x = feats.flatten_all()?.to_vec1::<f32>()?;
        let (w, b) = self.finetune(&x, labels, ways);
        let device = support.device();
        let weight = Tensor::from_vec(w, (ways, self.dim), device)?;
        let bias = match self.head {
            Head::Cosine if !self.config.weight_norm => None,
            // b, or g for the weight-normalised cosine head.
            _ => Some(Tensor::from_vec(b, ways, device)?),
        };
        Ok(Box::new(FineTuned { net: self, params, weight, bias }))
    }

    /// Mini-batches of the base classes, not episodes.
    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let out = self.step_loss(ctx.training_set(), ctx.seed, ctx.step)?;
        ctx.minimise(out)
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of Baseline / Baseline++.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BaselineFlags {
    /// Baseline / Baseline++: images per pretraining mini-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Baseline / Baseline++: fine-tuning epochs over each test support set.
    #[arg(long)]
    pub finetune_epochs: Option<usize>,
}

impl Method for BaselineConfig {
    const NAMES: &'static [&'static str] = &["baseline", "baseline++"];
    type Flags = BaselineFlags;

    fn named(name: &str) -> Self {
        let head = if name == "baseline++" { Head::Cosine } else { Head::Linear };
        Self { head, ..Self::default() }
    }

    fn name(&self) -> &'static str {
        match self.head {
            Head::Linear => "baseline",
            Head::Cosine => "baseline++",
        }
    }

    fn set_name(&mut self, name: &str) {
        self.head = if name == "baseline++" { Head::Cosine } else { Head::Linear };
    }

    fn apply(&mut self, flags: &BaselineFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        self.batch_size = flags.batch_size.unwrap_or(self.batch_size);
        self.finetune_epochs = flags.finetune_epochs.unwrap_or(self.finetune_epochs);
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        let size = protocol.data.image_size;
        Ok(Box::new(Baseline::new(*self, &protocol.backbone, size, rng, device)?))
    }

    /// The pretraining head has one output per base class of the training set.
    fn fit(&mut self, train_set: &ImageSet) -> anyhow::Result<()> {
        let n = train_set.classes.len();
        match self.classes {
            0 => self.classes = n,
            k if k != n => anyhow::bail!(
                "the run's baseline head has {k} classes but the training set {} has {n}; train on the set the run was started with",
                train_set.name
            ),
            _ => {}
        }
        Ok(())
    }

    fn step_unit(&self, _protocol: &Protocol) -> String {
        let how = if self.epoch_sampling {
            "epochs of the training images, shuffled without replacement"
        } else {
            "drawn with replacement"
        };
        format!("training mini-batches of {} images ({how})", self.batch_size)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "baseline-omniglot",
                summary: "Chen et al. 2019 Baseline, Omniglot as CloserLookFewShot's code: Conv4 (He-normal convs) + linear head (zero bias) over all 4112 Vinyals training classes, 5 epochs of mini-batches of 16 over the 82 240 training images, shuffled each epoch (25 700 steps), Adam 1e-3, no validation; pixels: bilinear resize to 32, centre-crop 28, not inverted; test: 600 tasks of 5-way 1-shot 15 queries, BN running statistics, fine-tune a new head on the support set (100 epochs, batch 4, SGD 0.01, momentum 0.9, dampening 0.9, wd 0.001). Departs: no ImageNet Normalize, rotation after the resize, conv bias absent, 1-shot test (the code's default is 5)",
                build: || omniglot(Head::Linear),
            },
            Preset {
                name: "baseline++-omniglot",
                summary: "Chen et al. 2019 Baseline++: as baseline-omniglot with CloserLook's distLinear head, s·g_c·cos(x, v_c) with a learned per-class norm g (WeightNorm) in pretraining and fine-tuning, scale 10 in pretraining (4112 classes) and 2 when fine-tuning. Departs as baseline-omniglot",
                build: || omniglot(Head::Cosine),
            },
        ]
    }
}

/// CloserLook's Omniglot steps: 5 epochs of batch 16 over the Vinyals training images (4112
/// classes × 20 drawers = 82 240 images, 5140 batches an epoch).
pub const OMNIGLOT_STEPS: u64 = 5 * (4112 * 20_u64).div_ceil(16);

fn omniglot(head: Head) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.episodes = OMNIGLOT_STEPS;
    // CloserLook's transform: bilinear to 32, centre-crop 28, the PNG's white background.
    p.data.resize = crate::data::omniglot::Resize::BilinearCrop;
    p.data.invert = false;
    p.validation = None;
    p.test_episodes = 600;
    (p, MethodConfig::Baseline(BaselineConfig { head, ..BaselineConfig::default() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Conv4Config;

    fn tiny(config: BaselineConfig) -> Baseline {
        let backbone = BackboneConfig::Conv4(Conv4Config { hidden: 3, blocks: 1, ..Conv4Config::new(1) });
        let config = BaselineConfig { classes: 4, ..config };
        Baseline::new(config, &backbone, 4, &mut ChaCha8Rng::seed_from_u64(1), &Device::Cpu).unwrap()
    }

    /// Mean cross-entropy over `batch` with the fine-tuning head (v, g) of the weight-normalised
    /// cosine, in f64, as the definition says: z_c = s·g_c·x·v_c/‖v_c‖ (x already unit-length).
    fn wn_loss(x: &[f64], labels: &[u32], batch: &[usize], v: &[f64], g: &[f64], d: usize, s: f64) -> f64 {
        let ways = g.len();
        let mut total = 0.0;
        for &i in batch {
            let xi = &x[i * d..(i + 1) * d];
            let z: Vec<f64> = (0..ways)
                .map(|c| {
                    let vc = &v[c * d..(c + 1) * d];
                    let n = vc.iter().map(|a| a * a).sum::<f64>().sqrt();
                    s * g[c] * vc.iter().zip(xi).map(|(a, b)| a * b).sum::<f64>() / n
                })
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            total += lse - z[labels[i] as usize];
        }
        total / batch.len() as f64
    }

    /// A ReLU feature vector can be exactly zero; the pretraining head's gradient must stay finite
    /// there (√ at 0 has an infinite derivative: without care it is ∞·0 = NaN, which ended a
    /// Baseline++ pretraining run at step 840).
    #[test]
    fn weight_norm_logits_have_finite_gradients_at_zero_features() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::new(&[[0.0f32, 0.0, 0.0], [0.5, 0.0, 2.0]], &dev).unwrap(),
        )
        .unwrap();
        let v = candle_core::Var::from_tensor(
            &Tensor::new(&[[1.0f32, 2.0, 0.5], [-1.0, 0.3, 0.2]], &dev).unwrap(),
        )
        .unwrap();
        let g = candle_core::Var::from_tensor(&Tensor::new(&[0.6f32, 0.9], &dev).unwrap()).unwrap();
        let z = weight_norm_logits(x.as_tensor(), v.as_tensor(), g.as_tensor(), 10.0).unwrap();
        let grads = z.sum_all().unwrap().backward().unwrap();
        for var in [&x, &v, &g] {
            let gr = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let vals = gr.to_vec1::<f32>().unwrap();
            assert!(vals.iter().all(|t| t.is_finite()), "non-finite gradient {vals:?}");
        }
        let zero_row = z.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(zero_row, vec![0.0, 0.0], "a zero feature vector scores 0 for every class");
    }

    /// The hand-written gradient of the weight-normalised cosine head with respect to v and g
    /// equals central finite differences of the f64 loss.
    #[test]
    fn weight_norm_head_gradient_matches_finite_differences() {
        let net = tiny(BaselineConfig::named("baseline++"));
        assert!(net.weight_normed());
        let d = net.dim;
        let ways = 3;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let x: Vec<f32> = (0..5 * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = x
            .chunks(d)
            .flat_map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.iter().map(move |v| v / n).collect::<Vec<_>>()
            })
            .collect();
        let labels = [0u32, 1, 2, 1, 0];
        let batch = [0usize, 2, 3, 4];
        let v: Vec<f32> = (0..ways * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let g: Vec<f32> = vec![0.7, 1.3, 2.0];
        let scale = 2.0f32;
        let (gv, gg) = net.head_gradient(&x, &labels, &batch, &v, &g, ways, scale);
        let f64s = |a: &[f32]| a.iter().map(|&t| t as f64).collect::<Vec<f64>>();
        let (x64, v64, g64) = (f64s(&x), f64s(&v), f64s(&g));
        let h = 1e-6;
        for k in 0..v.len() {
            let (mut up, mut down) = (v64.clone(), v64.clone());
            up[k] += h;
            down[k] -= h;
            let num = (wn_loss(&x64, &labels, &batch, &up, &g64, d, 2.0)
                - wn_loss(&x64, &labels, &batch, &down, &g64, d, 2.0))
                / (2.0 * h);
            assert!((num - gv[k] as f64).abs() < 1e-4, "d/dv[{k}]: {} vs {num}", gv[k]);
        }
        for c in 0..ways {
            let (mut up, mut down) = (g64.clone(), g64.clone());
            up[c] += h;
            down[c] -= h;
            let num = (wn_loss(&x64, &labels, &batch, &v64, &up, d, 2.0)
                - wn_loss(&x64, &labels, &batch, &v64, &down, d, 2.0))
                / (2.0 * h);
            assert!((num - gg[c] as f64).abs() < 1e-4, "d/dg[{c}]: {} vs {num}", gg[c]);
        }
    }

    /// Pretraining's weight-normalised head starts with g = ‖v_c‖, Chen's init is He-normal
    /// convolutions with a zero linear bias, and older configs keep the old head and init.
    #[test]
    fn closer_look_initialisation() {
        let wn = tiny(BaselineConfig::named("baseline++"));
        let p = wn.state.params.detached_values();
        let v = p.get("head.weight").unwrap().to_vec2::<f32>().unwrap();
        let g = p.get("head.g").unwrap().to_vec1::<f32>().unwrap();
        for (row, gc) in v.iter().zip(&g) {
            let n = row.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!((n - gc).abs() < 1e-6, "g {gc} vs ‖v‖ {n}");
        }
        let lin = tiny(BaselineConfig::named("baseline"));
        let p = lin.state.params.detached_values();
        assert!(p.get("head.bias").unwrap().to_vec1::<f32>().unwrap().iter().all(|&b| b == 0.0));
        let old = tiny(BaselineConfig {
            head: Head::Cosine,
            weight_norm: false,
            closer_look_init: false,
            ..BaselineConfig::default()
        });
        assert!(old.state.params.get("head.g").is_none());
    }
}
