//! N-way K-shot episodes: a support set of K images for each of N classes and a query set of M
//! images per class, drawn deterministically from (seed, episode index).

use anyhow::{bail, ensure};
use candle_core::{Device, Tensor};
use rand::seq::{index, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ImageSet;

/// Ways, shots and queries of an episode, and the unlabelled support images of the
/// semi-supervised setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeSpec {
    pub ways: usize,
    pub shots: usize,
    pub queries: usize,
    /// Extra support images per class whose labels the episode withholds (Garcia & Bruna's
    /// semi-supervised episodes); 0 in the supervised setting.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unlabelled: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl EpisodeSpec {
    pub fn new(ways: usize, shots: usize, queries: usize) -> Self {
        Self { ways, shots, queries, unlabelled: 0 }
    }

    /// The same spec with `unlabelled` unlabelled support images per class.
    pub fn with_unlabelled(self, unlabelled: usize) -> Self {
        Self { unlabelled, ..self }
    }
}

impl std::fmt::Display for EpisodeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-way {}-shot {}-query", self.ways, self.shots, self.queries)?;
        if self.unlabelled > 0 {
            write!(f, " (+{} unlabelled)", self.unlabelled)?;
        }
        Ok(())
    }
}

/// Where the classes of one episode come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grouping {
    /// Any classes of the set.
    #[default]
    Any,
    /// All classes from one group (for Omniglot, one alphabet): harder, Lake's within-alphabet tasks.
    WithinGroup,
}

/// Which images of the set make up one episode. Support and query are label-major: the images of
/// label 0 first, then label 1, and so on; `classes[label]` is the class index in the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpisodeDraw {
    pub classes: Vec<usize>,
    pub support: Vec<(usize, usize)>,
    /// The unlabelled support images, label-major like `support` (empty when the spec has none).
    pub unlabelled: Vec<(usize, usize)>,
    pub query: Vec<(usize, usize)>,
    /// Counter-clockwise quarter turns of each label's images (support and query alike), with
    /// [`EpisodeSampler::with_task_rotations`]; empty without.
    pub rotations: Vec<u32>,
}

/// One materialised episode: images as f32 in [0, 1], labels in 0..ways.
#[derive(Debug, Clone)]
pub struct Episode {
    pub spec: EpisodeSpec,
    /// The episode's index and the seed it was drawn under: (seed, index) alone determine it.
    pub index: u64,
    pub seed: u64,
    pub classes: Vec<usize>,
    /// [N·K, C, H, W]
    pub support: Tensor,
    pub support_labels: Vec<u32>,
    /// [N·M, C, H, W]
    pub query: Tensor,
    pub query_labels: Vec<u32>,
    /// [N·K', C, H, W] support images without labels (semi-supervised episodes); the episode
    /// does not carry their classes, so a learner cannot read them.
    pub unlabelled: Option<Tensor>,
}

impl Episode {
    /// The support then the query images [N·(K+M), C, H, W], and their labels.
    pub fn all_images(&self) -> candle_core::Result<(Tensor, Vec<u32>)> {
        let images = if self.query_labels.is_empty() {
            self.support.clone()
        } else {
            Tensor::cat(&[&self.support, &self.query], 0)?
        };
        let labels = self.support_labels.iter().chain(&self.query_labels).copied().collect();
        Ok((images, labels))
    }

    pub fn support_labels_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::new(self.support_labels.as_slice(), self.support.device())
    }
    pub fn query_labels_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::new(self.query_labels.as_slice(), self.query.device())
    }
}

/// `images` [T, ...] and their `labels` in the order `rng` shuffles them: a sequence for online
/// learners (MANN), in training and in evaluation alike.
pub fn shuffled_sequence(
    images: &Tensor,
    labels: &[u32],
    rng: &mut ChaCha8Rng,
) -> candle_core::Result<(Tensor, Vec<u32>)> {
    let mut order: Vec<u32> = (0..labels.len() as u32).collect();
    order.shuffle(rng);
    let images = images.index_select(&Tensor::new(order.as_slice(), images.device())?, 0)?;
    Ok((images, order.iter().map(|&i| labels[i as usize]).collect()))
}

/// The RNG of episode `index` under `seed`: an independent ChaCha stream per episode, so any
/// episode can be drawn without drawing the ones before it (exact resume, fixed test episodes).
pub fn episode_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Draws episodes of one spec from one image set.
#[derive(Debug, Clone)]
pub struct EpisodeSampler<'a> {
    set: &'a ImageSet,
    spec: EpisodeSpec,
    /// Class indices each episode may draw from: all classes, or one list per group.
    pools: Vec<Vec<usize>>,
    task_rotations: bool,
}

impl<'a> EpisodeSampler<'a> {
    /// Checks that every episode can be drawn: enough classes (in some group, for
    /// [`Grouping::WithinGroup`]) and at least K+M images in every class.
    pub fn new(set: &'a ImageSet, spec: EpisodeSpec, grouping: Grouping) -> anyhow::Result<Self> {
        ensure!(
            spec.ways >= 1 && spec.shots >= 1,
            "an episode needs at least 1 way and 1 shot (got {spec})"
        );
        let per_class = spec.shots + spec.unlabelled + spec.queries;
        for (i, class) in set.classes.iter().enumerate() {
            let n = set.num_images(i);
            if n < per_class {
                bail!(
                    "class `{}` of {} has {n} images, but {spec} episodes need {per_class} per class; lower --shots or --queries",
                    class.name,
                    set.name
                );
            }
        }
        let pools: Vec<Vec<usize>> = match grouping {
            Grouping::Any => vec![(0..set.classes.len()).collect()],
            Grouping::WithinGroup => {
                set.groups().into_values().filter(|classes| classes.len() >= spec.ways).collect()
            }
        };
        let largest = pools.iter().map(Vec::len).max().unwrap_or(0);
        if largest < spec.ways {
            match grouping {
                Grouping::Any => bail!(
                    "{} has {} classes, too few for {}-way episodes; lower the ways",
                    set.name,
                    set.classes.len(),
                    spec.ways
                ),
                Grouping::WithinGroup => {
                    let biggest = set.groups().into_values().map(|c| c.len()).max().unwrap_or(0);
                    bail!(
                        "no group of {} has {} classes for within-group episodes (largest has {biggest}); lower the ways",
                        set.name,
                        spec.ways
                    )
                }
            }
        }
        Ok(Self { set, spec, pools, task_rotations: false })
    }

    /// Rotates all the images of each class of an episode by a random multiple of 90°, drawn
    /// afresh per episode and class: cbfinn/maml's `tf.image.rot90(…, k=rotations[class])`
    /// (`data_generator.py`), in training and test tasks alike. Needs square images.
    pub fn with_task_rotations(mut self, on: bool) -> anyhow::Result<Self> {
        ensure!(
            !on || self.set.height == self.set.width,
            "per-task rotations need square images; {} has {}×{}",
            self.set.name,
            self.set.height,
            self.set.width
        );
        self.task_rotations = on;
        Ok(self)
    }

    pub fn spec(&self) -> EpisodeSpec {
        self.spec
    }

    pub fn set(&self) -> &'a ImageSet {
        self.set
    }

    /// The images of episode `index` under `seed`; labels are a fresh random order of the classes.
    pub fn draw(&self, seed: u64, index: u64) -> EpisodeDraw {
        let mut rng = episode_rng(seed, index);
        let pool = &self.pools[rng.random_range(0..self.pools.len())];
        let mut classes: Vec<usize> = index::sample(&mut rng, pool.len(), self.spec.ways)
            .into_iter()
            .map(|i| pool[i])
            .collect();
        classes.shuffle(&mut rng);
        let (shots, unlabelled) = (self.spec.shots, self.spec.unlabelled);
        let per_class = shots + unlabelled + self.spec.queries;
        let mut support = Vec::with_capacity(self.spec.ways * shots);
        let mut unlabelled_picks = Vec::with_capacity(self.spec.ways * unlabelled);
        let mut query = Vec::with_capacity(self.spec.ways * self.spec.queries);
        for &class in &classes {
            let picks = index::sample(&mut rng, self.set.num_images(class), per_class).into_vec();
            support.extend(picks[..shots].iter().map(|&i| (class, i)));
            unlabelled_picks.extend(picks[shots..shots + unlabelled].iter().map(|&i| (class, i)));
            query.extend(picks[shots + unlabelled..].iter().map(|&i| (class, i)));
        }
        let rotations = if self.task_rotations {
            (0..self.spec.ways).map(|_| rng.random_range(0..4u32)).collect()
        } else {
            Vec::new()
        };
        EpisodeDraw { classes, support, unlabelled: unlabelled_picks, query, rotations }
    }

    /// Draws and materialises episode `index`.
    pub fn episode(&self, seed: u64, index: u64, device: &Device) -> candle_core::Result<Episode> {
        let draw = self.draw(seed, index);
        let spec = self.spec;
        let labels = |per: usize| -> Vec<u32> {
            (0..spec.ways as u32).flat_map(|l| std::iter::repeat_n(l, per)).collect()
        };
        Ok(Episode {
            spec,
            index,
            seed,
            support: rotated_images(self.set, &draw.support, &draw.rotations, spec.shots, device)?,
            query: rotated_images(self.set, &draw.query, &draw.rotations, spec.queries, device)?,
            support_labels: labels(spec.shots),
            query_labels: labels(spec.queries),
            unlabelled: match spec.unlabelled {
                0 => None,
                k => Some(rotated_images(self.set, &draw.unlabelled, &draw.rotations, k, device)?),
            },
            classes: draw.classes,
        })
    }
}

/// [`images_tensor`] of label-major picks (`per_label` a label), each label's images turned by
/// `rotations[label]` quarter turns (none when `rotations` is empty).
fn rotated_images(
    set: &ImageSet,
    picks: &[(usize, usize)],
    rotations: &[u32],
    per_label: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    if rotations.is_empty() || rotations.iter().all(|&r| r == 0) {
        return images_tensor(set, picks, device);
    }
    let n = set.height;
    let mut data = Vec::with_capacity(picks.len() * set.image_len());
    let mut turned = vec![0u8; n * n];
    for (k, &(class, i)) in picks.iter().enumerate() {
        let turns = rotations[k / per_label.max(1)];
        for plane in set.image(class, i).chunks_exact(n * n) {
            super::omniglot::rotate_ccw_into(plane, n, turns, &mut turned);
            data.extend(turned.iter().map(|&v| v as f32 / 255.0));
        }
    }
    Tensor::from_vec(data, (picks.len(), set.channels, set.height, set.width), device)
}

/// Stacks the given (class, image) pairs into [n, C, H, W] f32 in [0, 1].
pub fn images_tensor(
    set: &ImageSet,
    picks: &[(usize, usize)],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(picks.len() * set.image_len());
    for &(class, i) in picks {
        data.extend(set.image(class, i).iter().map(|&v| v as f32 / 255.0));
    }
    Tensor::from_vec(data, (picks.len(), set.channels, set.height, set.width), device)
}
