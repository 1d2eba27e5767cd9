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
//! classes). Chen's code also learns a per-class norm of w_c (WeightNorm); we keep the paper's
//! plain cosine.
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
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            head: Head::Linear,
            classes: 0,
            batch_size: 64,
            finetune_epochs: 100,
            finetune_batch: 4,
            finetune_lr: 0.01,
            finetune_momentum: 0.9,
            finetune_dampening: 0.9,
            finetune_weight_decay: 0.001,
        }
    }
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
        params
            .push("head.weight", init::torch_default(rng, &[config.classes, dim], dim, device)?)?;
        if head == Head::Linear {
            params.push("head.bias", init::torch_default(rng, &[config.classes], dim, device)?)?;
        }
        let state = State::new(params, backbone.running_stats());
        Ok(Self { config, head, backbone, state, dim })
    }

    fn head_logits(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self.head {
            Head::Linear => {
                x.matmul(&weight.t()?)?.broadcast_add(bias.expect("linear head has a bias"))
            }
            Head::Cosine => {
                ops::cosine_similarity(x, weight, 1e-10)? * cosine_scale(weight.dim(0)?)
            }
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
                if self.head == Head::Linear {
                    step(&mut b, &gb, &mut buf_b);
                }
                first = false;
            }
        }
        (w, b)
    }

    /// Gradient of the mean cross-entropy over the rows `batch` of `x` with respect to (W, b).
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
        let norms: Vec<f32> = match self.head {
            Head::Linear => vec![1.0; ways],
            Head::Cosine => (0..ways)
                .map(|c| w[c * d..(c + 1) * d].iter().map(|v| v * v).sum::<f32>().sqrt() + 1e-10)
                .collect(),
        };
        // Gradient with respect to the effective weight rows (W itself, or W's unit rows · scale).
        let mut g_eff = vec![0f32; ways * d];
        let mut gb = vec![0f32; ways];
        let inv = 1.0 / batch.len() as f32;
        let mut z = vec![0f32; ways];
        for &i in batch {
            let xi = &x[i * d..(i + 1) * d];
            for c in 0..ways {
                let wc = &w[c * d..(c + 1) * d];
                let dot: f32 = wc.iter().zip(xi).map(|(a, b)| a * b).sum();
                z[c] = match self.head {
                    Head::Linear => dot + b[c],
                    Head::Cosine => scale * dot / norms[c],
                };
            }
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = z.iter().map(|v| (v - max).exp()).sum();
            for c in 0..ways {
                let p = (z[c] - max).exp() / sum;
                let dz = (p - if labels[i] as usize == c { 1.0 } else { 0.0 }) * inv;
                gb[c] += dz;
                let k = match self.head {
                    Head::Linear => dz,
                    Head::Cosine => dz * scale,
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
        if set.classes.len() != self.config.classes {
            candle_core::bail!(
                "baseline: the head has {} classes but the training set {} has {}; train with the set the run was started on",
                self.config.classes,
                set.name,
                set.classes.len()
            );
        }
        let picks: Vec<(usize, usize)> = (0..self.config.batch_size)
            .map(|_| {
                let class = rng.random_range(0..set.classes.len());
                (class, rng.random_range(0..set.num_images(class)))
            })
            .collect();
        let device = Device::Cpu;
        let images = episode::images_tensor(set, &picks, &device)?;
        let labels: Vec<u32> = picks.iter().map(|&(c, _)| c as u32).collect();
        let labels = Tensor::new(labels.as_slice(), &device)?;
        let params = self.state.params.values();
        let bn = BnMode::Batch(Some(&mut self.state.running));
        let feats = self.backbone.forward(&params, &images, bn)?;
        let bias =
            if self.head == Head::Linear { Some(params.get("head.bias")?.clone()) } else { None };
        let logits = self.head_logits(&feats, params.get("head.weight")?, bias.as_ref())?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        let accuracy = ops::accuracy(&logits, &labels)?;
        Ok(EpisodeOutput { loss, accuracy })
    }
}

impl Learner for Baseline {
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
            Head::Linear => Some(Tensor::from_vec(b, ways, device)?),
            Head::Cosine => None,
        };
        Ok(Box::new(FineTuned { net: self, params, weight, bias }))
    }

    /// Mini-batches of the base classes, not episodes.
    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let out = self.batch_loss(ctx.training_set(), ctx.rng())?;
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
        format!("training mini-batches of {} images", self.batch_size)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "baseline-omniglot",
                summary: "Chen et al. 2019 Baseline: Conv4 + linear head over all 4112 Vinyals training classes, mini-batches of 64, Adam 1e-3; test: fine-tune a new head on the support set (100 epochs, batch 4, SGD 0.01)",
                build: || omniglot(Head::Linear),
            },
            Preset {
                name: "baseline++-omniglot",
                summary: "Chen et al. 2019 Baseline++: as baseline-omniglot with a cosine head (scale 10 in pretraining, 2 when fine-tuning)",
                build: || omniglot(Head::Cosine),
            },
        ]
    }
}

fn omniglot(head: Head) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    (p, MethodConfig::Baseline(BaselineConfig { head, ..BaselineConfig::default() }))
}
