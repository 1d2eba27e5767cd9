//! Siamese networks for one-shot image recognition (Koch, Zemel & Salakhutdinov 2015).
//!
//! A twin network h(·) embeds both images of a pair; the pair's logit is the weighted L1 distance
//! z = Σⱼ αⱼ |h(x₁)ⱼ − h(x₂)ⱼ| + b, and p(same) = σ(z). Training owns its step (no episodes,
//! [`Siamese::pair_loss`]): a batch of same/different pairs, half of each, every image
//! distorted by Koch's random affine transform, binary cross-entropy on z.
//!
//! One-shot classification scores a query against every support image and gives each class the
//! best score among its support images (for 1-shot tasks: the most similar support image, Koch §4.4).
//!
//! The twin is the run's backbone followed by a sigmoid layer of `hidden` units: Koch et al.'s own
//! network for 105×105 images (`--backbone koch`, [`crate::nn::KochNet`]; hours per epoch on 2 CPU
//! cores) or the reduced Conv4 on 28×28 images we train.
//!
//! Training uses Adam on the protocol's schedule, or Koch et al.'s SGD ([`crate::optim::KochSgd`]:
//! per-layer learning rate, momentum and L2, decayed per epoch), which the learner steps itself,
//! its momentum buffers (`sgd.delta.*`) kept in the learner's state so that resume is exact. The
//! Koch presets also use the paper's initialisation ([`crate::nn::koch::paper_init`]), pairs from
//! 12 of the 20 drawers, and early stopping on 320 one-shot validation trials.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::augment::Affine;
use crate::data::{EpisodeSpec, ImageSet};
use crate::nn::lstm::sigmoid;
use crate::data::Grouping;
use crate::nn::{init, Backbone, BackboneConfig, BnMode, KochConfig, Params};
use crate::optim::{sgd_momentum_step, KochSgd, StepDecay};
use crate::protocol::{EarlyStopping, Protocol, ValMetric, ValSet, Validation};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiameseConfig {
    /// Units of the sigmoid embedding layer (Koch: 4096).
    pub hidden: usize,
    /// Pairs per training step (Koch: 128), half same, half different.
    pub pairs: usize,
    /// Koch's affine distortions on every training image.
    pub augment: bool,
    /// Fraction of the different pairs drawn from one alphabet (harder negatives; Koch: 0, uniform).
    pub within_group_negatives: f64,
    /// Koch et al.'s per-layer SGD instead of Adam on the protocol's schedule (default: Adam).
    #[serde(default)]
    pub optimiser: Option<KochSgd>,
    /// Koch et al.'s initialisation ([`crate::nn::koch::paper_init`]) instead of PyTorch's
    /// defaults (default: PyTorch's).
    #[serde(default)]
    pub koch_init: bool,
    /// Training pairs use only each class's first this many images, i.e. drawers 1..=N (the
    /// loader keeps a class's images in drawer order); default: all 20.
    #[serde(default)]
    pub train_drawers: Option<usize>,
}

impl Default for SiameseConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            pairs: 128,
            augment: true,
            within_group_negatives: 0.0,
            optimiser: None,
            koch_init: false,
            train_drawers: None,
        }
    }
}

/// A batch of training pairs: (class, image) of each first and second image, and whether the
/// pair is of one class.
pub struct PairPicks {
    pub first: Vec<(usize, usize)>,
    pub second: Vec<(usize, usize)>,
    pub same: Vec<f32>,
}

/// Draws a batch of `config.pairs` pairs from `set`, half same, half different, images from the
/// first `config.train_drawers` of each class only.
pub fn draw_pair_picks(
    config: &SiameseConfig,
    set: &ImageSet,
    rng: &mut ChaCha8Rng,
) -> Result<PairPicks> {
    let classes = set.classes.len();
    if classes < 2 {
        candle_core::bail!("siamese: the training set {} needs at least 2 classes", set.name);
    }
    let images = |c: usize| config.train_drawers.map_or(set.num_images(c), |d| d.min(set.num_images(c)));
    if (0..classes).any(|c| images(c) == 0) {
        candle_core::bail!("siamese: --train-drawers must be at least 1");
    }
    let groups: Vec<Vec<usize>> = set.groups().into_values().collect();
    let group_of: Vec<usize> = {
        let mut g = vec![0; classes];
        for (gi, members) in groups.iter().enumerate() {
            for &c in members {
                g[c] = gi;
            }
        }
        g
    };
    let n = config.pairs;
    let (mut first, mut second, mut same) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let c1 = rng.random_range(0..classes);
        let is_same = i % 2 == 0;
        let c2 = if is_same {
            c1
        } else {
            let group = &groups[group_of[c1]];
            if group.len() > 1 && rng.random_bool(config.within_group_negatives.clamp(0.0, 1.0)) {
                loop {
                    let c = group[rng.random_range(0..group.len())];
                    if c != c1 {
                        break c;
                    }
                }
            } else {
                loop {
                    let c = rng.random_range(0..classes);
                    if c != c1 {
                        break c;
                    }
                }
            }
        };
        let i1 = rng.random_range(0..images(c1));
        let i2 = if is_same && images(c1) > 1 {
            loop {
                let j = rng.random_range(0..images(c1));
                if j != i1 {
                    break j;
                }
            }
        } else {
            rng.random_range(0..images(c2))
        };
        first.push((c1, i1));
        second.push((c2, i2));
        same.push(if is_same { 1.0 } else { 0.0 });
    }
    Ok(PairPicks { first, second, same })
}

/// The Koch optimiser's layer of parameter `name`: the convolution (or batch norm) index, capped
/// at 3, then 4 for the embedding layer and 5 for the output unit.
pub fn koch_layer(name: &str) -> usize {
    if name.starts_with("embed.") {
        return 4;
    }
    if name.starts_with("head.") {
        return 5;
    }
    name.split('.')
        .find_map(|part| {
            let digits = part.strip_prefix("conv").or_else(|| part.strip_prefix("bn"))?;
            digits.parse::<usize>().ok()
        })
        .unwrap_or(0)
        .min(3)
}

/// Whether L2 applies to parameter `name`: weights, not biases or batch-norm parameters.
pub fn koch_l2_applies(name: &str) -> bool {
    let is_bn = name.split('.').any(|part| part.starts_with("bn"));
    !is_bn && (name.ends_with(".weight") || name == "head.alpha")
}

pub struct Siamese {
    pub config: SiameseConfig,
    backbone: Box<dyn Backbone>,
    state: State,
    image_size: usize,
}

impl Siamese {
    pub fn new(
        config: SiameseConfig,
        backbone: &BackboneConfig,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.pairs < 2 || config.hidden == 0 {
            candle_core::bail!("siamese: need at least 2 pairs per step and 1 hidden unit");
        }
        let backbone = backbone.build();
        let features = backbone.embedding_dim(image_size, image_size)?;
        let mut params = backbone.init(rng, device)?;
        params.push(
            "embed.weight",
            init::torch_default(rng, &[config.hidden, features], features, device)?,
        )?;
        params.push("embed.bias", init::torch_default(rng, &[config.hidden], features, device)?)?;
        params.push(
            "head.alpha",
            init::torch_default(rng, &[1, config.hidden], config.hidden, device)?,
        )?;
        params.push("head.bias", Tensor::zeros(1, candle_core::DType::F32, device)?)?;
        if config.koch_init {
            params = crate::nn::koch::paper_init(&params, rng, device)?;
        }
        let mut state = State::new(params, backbone.running_stats());
        if config.optimiser.is_some() {
            for (name, var) in state.params.iter() {
                state.extra.insert(format!("sgd.delta.{name}"), var.zeros_like()?);
            }
        }
        Ok(Self { config, backbone, state, image_size })
    }

    /// h(x): [B, C, H, W] → [B, hidden].
    fn embed(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        embed(self.backbone.as_ref(), params, x, bn)
    }

    /// Pair logits z for embeddings `a` [B, H] and `b` [B, H] (row i with row i): [B].
    fn pair_logits(&self, params: &Params, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let alpha = params.get("head.alpha")?;
        (a - b)?.abs()?.broadcast_mul(alpha)?.sum(1)?.broadcast_add(params.get("head.bias")?)
    }

    /// Logits of every query against every support image: [M, n], in chunks of queries.
    fn all_pair_logits(&self, params: &Params, q: &Tensor, s: &Tensor) -> Result<Tensor> {
        let (m, h) = q.dims2()?;
        let n = s.dim(0)?;
        let alpha = params.get("head.alpha")?.reshape((1, 1, h))?;
        let chunk = (4_000_000 / (n * h).max(1)).max(1);
        let mut rows = Vec::new();
        let mut start = 0;
        while start < m {
            let len = chunk.min(m - start);
            let qc = q.narrow(0, start, len)?.unsqueeze(1)?;
            let d = qc.broadcast_sub(&s.unsqueeze(0)?)?.abs()?.broadcast_mul(&alpha)?.sum(2)?;
            rows.push(d);
            start += len;
        }
        Tensor::cat(&rows, 0)?.broadcast_add(params.get("head.bias")?)
    }

    /// A training batch: (first images, second images, same?) drawn from `rng`.
    fn draw_pairs(
        &self,
        set: &ImageSet,
        mut rng: ChaCha8Rng,
    ) -> Result<(Tensor, Tensor, Vec<f32>)> {
        let PairPicks { first, second, same } = draw_pair_picks(&self.config, set, &mut rng)?;
        let mut images = |picks: &[(usize, usize)]| -> Result<Tensor> {
            let (size, len) = (set.height, set.image_len());
            let mut data = Vec::with_capacity(picks.len() * len);
            for &(c, i) in picks {
                let img = set.image(c, i);
                let img = if self.config.augment && set.channels == 1 && set.height == set.width {
                    Affine::koch(&mut rng, size).apply(img, size)
                } else {
                    img.to_vec()
                };
                data.extend(img.iter().map(|&v| v as f32 / 255.0));
            }
            Tensor::from_vec(data, (picks.len(), set.channels, set.height, set.width), &Device::Cpu)
        };
        let a = images(&first)?;
        let b = images(&second)?;
        Ok((a, b, same))
    }

    /// Stable binary cross-entropy on logits: max(z, 0) − y·z + log(1 + e^{−|z|}), averaged.
    fn bce_with_logits(z: &Tensor, y: &Tensor) -> Result<Tensor> {
        let soft = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
        ((z.relu()? - (z * y)?)? + soft)?.mean_all()
    }
}

/// h(x): the backbone's features through the sigmoid layer, [B, C, H, W] → [B, hidden].
fn embed(backbone: &dyn Backbone, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
    let features = backbone.forward(params, x, bn)?;
    let z = features
        .matmul(&params.get("embed.weight")?.t()?)?
        .broadcast_add(params.get("embed.bias")?)?;
    sigmoid(&z)
}

struct OneShot<'a> {
    net: &'a Siamese,
    params: Params,
    support: Tensor,
    /// Support columns of each label.
    columns: Vec<Tensor>,
}

impl Classifier for OneShot<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let q = self.net.embed(&self.params, query, BnMode::Running(&self.net.state.running))?;
        let z = self.net.all_pair_logits(&self.params, &q, &self.support)?;
        let per_class: Vec<Tensor> = self
            .columns
            .iter()
            .map(|cols| z.index_select(cols, 1)?.max_keepdim(1))
            .collect::<Result<_>>()?;
        Tensor::cat(&per_class, 1)
    }
}

impl Siamese {
    /// The loss of one training step: binary cross-entropy over a batch of same/different pairs
    /// drawn from `rng`; folds the batch statistics into the running averages.
    pub fn pair_loss(&mut self, set: &ImageSet, rng: ChaCha8Rng) -> Result<EpisodeOutput> {
        let (a, b, same) = self.draw_pairs(set, rng)?;
        let n = same.len();
        let params = self.state.params.values();
        let images = Tensor::cat(&[&a, &b], 0)?;
        let bn = BnMode::Batch(Some(&mut self.state.running));
        let h = embed(self.backbone.as_ref(), &params, &images, bn)?;
        let z = self.pair_logits(&params, &h.narrow(0, 0, n)?, &h.narrow(0, n, n)?)?;
        let y = Tensor::from_vec(same.clone(), n, &Device::Cpu)?;
        let loss = Self::bce_with_logits(&z, &y)?;
        let predicted = z.to_vec1::<f32>()?;
        let correct =
            predicted.iter().zip(&same).filter(|(z, y)| (**z > 0.0) == (**y > 0.5)).count();
        Ok(EpisodeOutput { loss, accuracy: correct as f64 / n as f64 })
    }
}

impl Learner for Siamese {
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        let (_, _, h, w) = support.dims4()?;
        if h != self.image_size || w != self.image_size {
            candle_core::bail!(
                "siamese: images are {h}×{w}, the twin was built for {0}×{0}",
                self.image_size
            );
        }
        let mut columns = Vec::with_capacity(ways);
        for l in 0..ways as u32 {
            let cols: Vec<u32> =
                (0..labels.len() as u32).filter(|&i| labels[i as usize] == l).collect();
            if cols.is_empty() {
                candle_core::bail!("siamese: class {l} has no support image");
            }
            columns.push(Tensor::new(cols.as_slice(), support.device())?);
        }
        let params = self.state.params.detached_values();
        let support = self.embed(&params, support, BnMode::Running(&self.state.running))?;
        Ok(Box::new(OneShot { net: self, params, support, columns }))
    }

    /// Same/different pairs, not episodes; Adam through the trainer, or Koch's SGD here.
    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let out = self.pair_loss(ctx.training_set(), ctx.rng())?;
        let Some(sgd) = self.config.optimiser else { return ctx.minimise(out) };
        let loss = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !loss.is_finite() {
            anyhow::bail!(
                "training diverged at step {} (loss {loss}); lower the Koch SGD learning rates",
                ctx.step
            );
        }
        let grads = out.loss.backward()?;
        for (name, var) in self.state.params.iter() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let mut h = sgd.at(koch_layer(name), ctx.step);
            if !koch_l2_applies(name) {
                h.l2 = 0.0;
            }
            let key = format!("sgd.delta.{name}");
            let delta = self.state.extra.get(&key).ok_or_else(|| {
                anyhow::anyhow!("siamese: the SGD state has no `{key}`")
            })?;
            let (w, delta) = sgd_momentum_step(&var.as_tensor().detach(), &g.detach(), delta, h)?;
            var.set(&w)?;
            self.state.extra.insert(key, delta);
        }
        Ok(StepOutput { loss, accuracy: out.accuracy, lr: sgd.at(0, ctx.step).lr })
    }

    fn optimisers(&self) -> Vec<super::OptimiserSpec> {
        match self.config.optimiser {
            Some(_) => Vec::new(),
            None => vec![super::OptimiserSpec::all("adam")],
        }
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of Siamese networks (the twin is `--backbone conv4|koch`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SiameseFlags {
    /// Siamese: units of the sigmoid embedding layer.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Siamese: pairs per training step (half same, half different).
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Siamese: fraction of the different pairs drawn from one alphabet.
    #[arg(long)]
    pub within_group_negatives: Option<f64>,
    /// Siamese: no affine distortions.
    #[arg(long)]
    pub no_augment: bool,
    /// Siamese: training pairs from drawers 1..=N of each character only (Koch: 12 of 20).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub train_drawers: Option<u64>,
}

impl Method for SiameseConfig {
    const NAMES: &'static [&'static str] = &["siamese"];
    type Flags = SiameseFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "siamese"
    }

    fn apply(&mut self, flags: &SiameseFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        self.hidden = flags.hidden.unwrap_or(self.hidden);
        self.pairs = flags.pairs.unwrap_or(self.pairs);
        self.within_group_negatives =
            flags.within_group_negatives.unwrap_or(self.within_group_negatives);
        self.augment &= !flags.no_augment;
        if let Some(d) = flags.train_drawers {
            self.train_drawers = Some(d as usize);
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        let size = protocol.data.image_size;
        Ok(Box::new(Siamese::new(*self, &protocol.backbone, size, rng, device)?))
    }

    fn step_unit(&self, _protocol: &Protocol) -> String {
        format!("training steps of {} same/different pairs", self.pairs)
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "siamese-omniglot-koch",
                summary: "Koch et al. 2015's protocol as far as it is known: 105x105 twin (conv 64@10, 128@7, 128@4, 256@4, 4096 sigmoid units), Lake background alphabets (30) x drawers 1-12, 128 pairs a step (classes uniform), fresh affine distortions; SGD per layer, eta_j 1e-3 x 0.99 per epoch, momentum 0.5 rising linearly to 0.9 over 10 epochs, L2 1e-2 convs / 1e-4 FC (Koch's tuned values are unpublished: these are the [TFR] reimplementation's), Koch init N(0,1e-2) / biases N(0.5,1e-2) / FC N(0,0.2); epochs of 10 547 steps (150 000 pairs x 9), at most 200; validation 320 one-shot 20-way within-alphabet trials on the 10 evaluation alphabets Lake's benchmark does not use x drawers 1-4 (Koch: 10 held-out background alphabets x 4 drawers), early stop once more than 20 epochs in a row fail to raise validation accuracy, best model kept; Lake 20-way test (far beyond a 2-core CPU)",
                build: || omniglot_koch_protocol(true),
            },
            Preset {
                name: "siamese-omniglot-28",
                summary: "Siamese networks, reduced: Conv4 twin + 256 sigmoid units on 28x28, Lake background alphabets, 128 pairs a step (half the negatives from one alphabet), affine distortions, Adam 1e-3 halved every 5000 steps, PyTorch init, all 20 drawers, no validation; Lake 20-way test",
                build: || omniglot(false),
            },
            Preset {
                name: "siamese-omniglot-28-koch-protocol",
                summary: "The reduced twin (Conv4 with batch norm + 256 sigmoid units, 28x28) under Koch et al. 2015's training protocol: Lake background alphabets (30) x drawers 1-12, 128 pairs a step (classes uniform), fresh affine distortions; SGD per layer, eta_j 1e-3 x 0.99 per epoch, momentum 0.5 rising linearly to 0.9 over 10 epochs, L2 1e-2 convs / 1e-4 FC ([TFR]'s values; Koch's are unpublished), Koch init (conv N(0,1e-2), biases N(0.5,1e-2), FC N(0,0.2); batch norm at gamma 1, beta 0); epochs of 234 steps (Koch's 30 000-pair set), at most 200; validation every epoch on 320 one-shot 20-way within-alphabet trials (the 10 evaluation alphabets Lake's benchmark does not use x drawers 1-4), early stop once more than 20 epochs in a row fail to raise validation accuracy, best model kept; Lake 20-way test",
                build: || omniglot_koch_protocol(false),
            },
        ]
    }
}

/// Siamese networks train on Lake's background alphabets and are scored on the Lake benchmark.
fn omniglot(koch: bool) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.data.split = "lake".into();
    p.data.train_subset = "background".into();
    p.data.test_subset = "evaluation".into();
    p.validation = None;
    p.test = EpisodeSpec::new(20, 1, 1);
    p.schedule = StepDecay { lr: 1e-3, step: 5000, gamma: 0.5 };
    let siamese = if koch {
        p.backbone = BackboneConfig::Koch(KochConfig { in_channels: 1 });
        p.data.image_size = 105;
        SiameseConfig { hidden: 4096, ..SiameseConfig::default() }
    } else {
        SiameseConfig { within_group_negatives: 0.5, ..SiameseConfig::default() }
    };
    (p, MethodConfig::Siamese(siamese))
}

/// Koch et al.'s training protocol (§3–4) on the 105×105 twin (`koch`) or the reduced Conv4 twin:
/// per-layer SGD, the paper's initialisation, pairs from 12 drawers, and early stopping on 320
/// one-shot validation trials. Epochs: 150 000 pairs × 9 (8 distortions + the original) for the
/// full twin, Koch's smallest set of 30 000 pairs for the reduced one (so that a 20-minute budget
/// sees some 15 epochs).
fn omniglot_koch_protocol(koch: bool) -> (Protocol, MethodConfig) {
    let (mut p, mut method) = omniglot(koch);
    let MethodConfig::Siamese(s) = &mut method else { unreachable!("a Siamese preset") };
    let steps_per_epoch = if koch { 150_000 * 9 / 128 } else { 30_000 / 128 };
    s.within_group_negatives = 0.0;
    s.koch_init = true;
    s.train_drawers = Some(12);
    s.optimiser = Some(KochSgd {
        lr: [1e-3; 6],
        momentum: [0.9; 6],
        l2: [1e-2, 1e-2, 1e-2, 1e-2, 1e-4, 1e-4],
        momentum_start: 0.5,
        momentum_epochs: 10,
        lr_decay: 0.99,
        steps_per_epoch,
    });
    p.episodes = 200 * steps_per_epoch;
    // Informational: Koch's SGD steps its own per-layer rates (the `lr` column of metrics.csv is
    // layer 1's).
    p.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    p.validation = Some(Validation {
        set: ValSet::LakeUnbenchmarked { drawers: 4 },
        grouping: Some(Grouping::WithinGroup),
        early_stopping: Some(EarlyStopping { metric: ValMetric::Accuracy, patience: 20 }),
        ..Validation::new(EpisodeSpec::new(20, 1, 1), 16, steps_per_epoch)
    });
    (p, method)
}
