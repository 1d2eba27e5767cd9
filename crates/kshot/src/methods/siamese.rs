//! Siamese networks for one-shot image recognition (Koch, Zemel & Salakhutdinov 2015).
//!
//! A twin network h(·) embeds both images of a pair; the pair's logit is the weighted L1 distance
//! z = Σⱼ αⱼ |h(x₁)ⱼ − h(x₂)ⱼ| + b, and p(same) = σ(z). Training owns its step (no episodes,
//! [`Learner::own_training_step`]): a batch of same/different pairs, half of each, every image
//! distorted by Koch's random affine transform, binary cross-entropy on z.
//!
//! One-shot classification scores a query against every support image and gives each class the
//! best score among its support images (for 1-shot tasks: the most similar support image, Koch §4.4).
//!
//! Two twins ([`Twin`]):
//! - `koch`: the paper's network for 105×105 images: conv 64@10×10, pool, 128@7×7, pool, 128@4×4,
//!   pool, 256@4×4, each with ReLU, then a 4096-unit sigmoid layer. Far beyond this machine's
//!   budget (hours per epoch on 2 CPU cores); offered for fidelity.
//! - `conv4`: the reduced twin we train: Conv4 (batch norm) on 28×28 images, then a sigmoid layer of
//!   `hidden` units.
//!
//! The paper trains with SGD, per-layer learning rates and momentum; kshot's trainer uses Adam.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Classifier, EpisodeOutput, Learner};
use crate::data::augment::Affine;
use crate::data::{episode, Episode, ImageSet};
use crate::nn::lstm::sigmoid;
use crate::nn::{init, ops, BnMode, Conv4, Conv4Config, ParamSet, Params, RunningStats};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Twin {
    /// Conv4 with batch norm, then a sigmoid layer (the variant trained here).
    #[default]
    Conv4,
    /// Koch et al.'s 105×105 network.
    Koch,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SiameseConfig {
    pub twin: Twin,
    /// Units of the sigmoid embedding layer (Koch: 4096).
    pub hidden: usize,
    /// Pairs per training step (Koch: 128), half same, half different.
    pub pairs: usize,
    /// Koch's affine distortions on every training image.
    pub augment: bool,
    /// Fraction of the different pairs drawn from one alphabet (harder negatives; Koch: 0, uniform).
    pub within_group_negatives: f64,
}

impl Default for SiameseConfig {
    fn default() -> Self {
        Self {
            twin: Twin::Conv4,
            hidden: 256,
            pairs: 128,
            augment: true,
            within_group_negatives: 0.0,
        }
    }
}

/// Koch's convolutional layers: (out channels, kernel).
const KOCH_CONVS: [(usize, usize); 4] = [(64, 10), (128, 7), (128, 4), (256, 4)];

pub struct Siamese {
    pub config: SiameseConfig,
    conv4: Conv4,
    params: ParamSet,
    running: RunningStats,
    image_size: usize,
}

impl Siamese {
    pub fn new(
        config: SiameseConfig,
        backbone: Conv4Config,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.pairs < 2 || config.hidden == 0 {
            candle_core::bail!("siamese: need at least 2 pairs per step and 1 hidden unit");
        }
        let conv4 = Conv4::new(backbone);
        let mut params = ParamSet::new();
        let features = match config.twin {
            Twin::Conv4 => {
                params = conv4.init(rng, device)?;
                backbone.embedding_dim(image_size, image_size)
            }
            Twin::Koch => {
                let (mut cin, mut side) = (backbone.in_channels, image_size);
                for (i, &(cout, k)) in KOCH_CONVS.iter().enumerate() {
                    if side < k {
                        candle_core::bail!("siamese: the koch twin needs larger images (105×105; got {image_size})");
                    }
                    let fan_in = cin * k * k;
                    params.push(
                        format!("koch.conv{i}.weight"),
                        init::torch_default(rng, &[cout, cin, k, k], fan_in, device)?,
                    )?;
                    params.push(
                        format!("koch.conv{i}.bias"),
                        init::torch_default(rng, &[cout], fan_in, device)?,
                    )?;
                    side -= k - 1;
                    if i + 1 < KOCH_CONVS.len() {
                        side /= 2;
                    }
                    cin = cout;
                }
                cin * side * side
            }
        };
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
        let running = conv4.running_stats();
        Ok(Self { config, conv4, params, running, image_size })
    }

    /// h(x): [B, C, H, W] → [B, hidden].
    fn embed(&self, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
        embed(self.config.twin, &self.conv4, params, x, bn)
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

    /// A training batch: (first images, second images, same?) drawn from (seed, step).
    fn draw_pairs(
        &self,
        set: &ImageSet,
        seed: u64,
        step: u64,
    ) -> Result<(Tensor, Tensor, Vec<f32>)> {
        let mut rng = episode::episode_rng(seed, step);
        let classes = set.classes.len();
        if classes < 2 {
            candle_core::bail!("siamese: the training set {} needs at least 2 classes", set.name);
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
        let n = self.config.pairs;
        let (mut first, mut second, mut same) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let c1 = rng.random_range(0..classes);
            let is_same = i % 2 == 0;
            let c2 = if is_same {
                c1
            } else {
                let group = &groups[group_of[c1]];
                if group.len() > 1
                    && rng.random_bool(self.config.within_group_negatives.clamp(0.0, 1.0))
                {
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
            let i1 = rng.random_range(0..set.num_images(c1));
            let i2 = if is_same && set.num_images(c1) > 1 {
                loop {
                    let j = rng.random_range(0..set.num_images(c1));
                    if j != i1 {
                        break j;
                    }
                }
            } else {
                rng.random_range(0..set.num_images(c2))
            };
            first.push((c1, i1));
            second.push((c2, i2));
            same.push(if is_same { 1.0 } else { 0.0 });
        }
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

/// h(x) of the `twin`: [B, C, H, W] → [B, hidden].
fn embed(twin: Twin, conv4: &Conv4, params: &Params, x: &Tensor, bn: BnMode) -> Result<Tensor> {
    let features = match twin {
        Twin::Conv4 => conv4.forward(params, x, bn)?,
        Twin::Koch => {
            let mut h = x.clone();
            for i in 0..KOCH_CONVS.len() {
                let w = params.get(&format!("koch.conv{i}.weight"))?;
                let b = params.get(&format!("koch.conv{i}.bias"))?;
                h = h.conv2d(w, 0, 1, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?.relu()?;
                if i + 1 < KOCH_CONVS.len() {
                    h = ops::max_pool2x2(&h)?;
                }
            }
            h.flatten_from(1)?
        }
    };
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
        let q = self.net.embed(&self.params, query, BnMode::Running(&self.net.running))?;
        let z = self.net.all_pair_logits(&self.params, &q, &self.support)?;
        let per_class: Vec<Tensor> = self
            .columns
            .iter()
            .map(|cols| z.index_select(cols, 1)?.max_keepdim(1))
            .collect::<Result<_>>()?;
        Tensor::cat(&per_class, 1)
    }
}

impl Learner for Siamese {
    fn method(&self) -> &'static str {
        "siamese"
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
        let params = self.params.detached_values();
        let support = self.embed(&params, support, BnMode::Running(&self.running))?;
        Ok(Box::new(OneShot { net: self, params, support, columns }))
    }

    /// The query loss of an episode scored one-shot (not how Siamese trains; see
    /// [`Learner::own_training_step`]).
    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        super::adapted_query_loss(self, episode)
    }

    fn own_training_step(
        &mut self,
        set: &ImageSet,
        seed: u64,
        step: u64,
    ) -> Result<Option<EpisodeOutput>> {
        let (a, b, same) = self.draw_pairs(set, seed, step)?;
        let n = same.len();
        let params = self.params.values();
        let images = Tensor::cat(&[&a, &b], 0)?;
        let h = embed(
            self.config.twin,
            &self.conv4,
            &params,
            &images,
            BnMode::Batch(Some(&mut self.running)),
        )?;
        let z = self.pair_logits(&params, &h.narrow(0, 0, n)?, &h.narrow(0, n, n)?)?;
        let y = Tensor::from_vec(same.clone(), n, &Device::Cpu)?;
        let loss = Self::bce_with_logits(&z, &y)?;
        let predicted = z.to_vec1::<f32>()?;
        let correct =
            predicted.iter().zip(&same).filter(|(z, y)| (**z > 0.0) == (**y > 0.5)).count();
        Ok(Some(EpisodeOutput { loss, accuracy: correct as f64 / n as f64 }))
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        match self.config.twin {
            Twin::Conv4 => self.running.named_tensors(""),
            Twin::Koch => Ok(Vec::new()),
        }
    }

    fn load_buffers(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        match self.config.twin {
            Twin::Conv4 => self.running.load_from(tensors, "", origin),
            Twin::Koch => Ok(()),
        }
    }
}
