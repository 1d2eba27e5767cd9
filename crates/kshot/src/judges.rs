//! The two judges of a few-shot face generator (Zakharov et al. 2019 score theirs by identity
//! similarity and landmark error): an [`IdentityNet`], a C-way classifier whose L2-normalised
//! penultimate layer compares identities, and a [`LandmarkNet`], which regresses the 68 facial
//! landmarks. Both are a [`Conv4`] trunk (conv3×3 → batch norm with f64 statistics → ReLU → 2×2
//! max-pool, four times, on kshot's fused kernels) over [n, 1, S, S] gray images in [0, 1], then one
//! linear layer; they take plain tensors, so any face loader can feed them.
//!
//! Training is Adam on seeded mini-batches with host-side augmentation (an integer translation
//! filled by edge clamping, a brightness gain); the same seed gives bit-identical parameters.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::index;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::episode::episode_rng;
use crate::nn::{head, ops, BnMode, Conv4, Conv4Config, ParamSet, RunningStats};
use crate::optim::{Adam, AdamConfig};

/// The landmarks of a face: iBUG's 68-point markup.
pub const LANDMARKS: usize = 68;
/// The outer eye corners in the 68-point markup, whose distance normalises [`nme`].
pub const OUTER_EYE_CORNERS: (usize, usize) = (36, 45);

/// How a judge trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    /// Adam steps.
    pub steps: usize,
    /// Images per mini-batch (drawn without replacement within a batch).
    pub batch: usize,
    /// Adam's peak learning rate, decayed by a half cosine to zero over the steps.
    pub lr: f64,
    /// Channels of each convolution block.
    pub hidden: usize,
    /// Random integer translation, up to this many pixels each way on each axis, filled by edge
    /// clamping; landmarks move alike.
    pub max_shift: usize,
    /// Random brightness gain in [1 − b, 1 + b] (the result clipped to [0, 1]).
    pub brightness: f32,
}

impl Default for JudgeConfig {
    /// About two minutes per net on 300 images of 64×64 on 2 shared cores (0.3–0.4 s a step).
    fn default() -> Self {
        Self { steps: 400, batch: 32, lr: 2e-3, hidden: 32, max_shift: 4, brightness: 0.2 }
    }
}

impl JudgeConfig {
    fn check(&self) -> Result<()> {
        ensure!(self.steps > 0, "JudgeConfig.steps is 0; train for at least one step");
        ensure!(
            self.batch >= 2,
            "JudgeConfig.batch is {}; batch norm needs at least 2 images per batch",
            self.batch
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "JudgeConfig.lr is {}; give a positive learning rate",
            self.lr
        );
        ensure!(self.hidden > 0, "JudgeConfig.hidden is 0; give the convolutions some channels");
        ensure!(
            (0.0..1.0).contains(&self.brightness),
            "JudgeConfig.brightness is {}; give a gain range in [0, 1)",
            self.brightness
        );
        Ok(())
    }

    /// The learning rate at 0-based `step`: a half cosine from `lr` to zero.
    fn lr_at(&self, step: usize) -> f64 {
        let progress = step as f64 / self.steps as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What a saved net needs to be rebuilt: its trunk, input size and output count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct NetShape {
    config: JudgeConfig,
    /// S of the [n, 1, S, S] inputs.
    size: usize,
    /// Units of the linear layer.
    outputs: usize,
}

/// A Conv4 trunk with a linear layer, its parameters and running batch-norm statistics.
#[derive(Debug, Clone)]
struct Net {
    shape: NetShape,
    conv: Conv4,
    params: ParamSet,
    running: RunningStats,
}

/// The images of one mini-batch, augmented, and which images they are.
struct Batch {
    images: Tensor,
    index: Vec<usize>,
    /// (dx, dy) each image was translated by, in pixels.
    shifts: Vec<(isize, isize)>,
}

/// Images at most this many per forward pass at inference.
const CHUNK: usize = 128;

impl Net {
    fn new(shape: NetShape, rng: &mut ChaCha8Rng) -> Result<Self> {
        let conv = Conv4::new(Conv4Config { hidden: shape.config.hidden, ..Conv4Config::new(1) });
        let params = head::init_linear_head(
            &conv,
            (shape.size, shape.size),
            shape.outputs,
            rng,
            &Device::Cpu,
        )?;
        let running = conv.running_stats();
        Ok(Self { shape, conv, params, running })
    }

    /// Trains a fresh net on `images`, minimising `loss(outputs, batch)`.
    fn train(
        images: &Tensor,
        outputs: usize,
        config: &JudgeConfig,
        seed: u64,
        mut progress: impl FnMut(usize, f64),
        loss: impl Fn(&Tensor, &Batch) -> Result<Tensor>,
    ) -> Result<Self> {
        crate::autograd::init();
        config.check()?;
        let (n, size) = check_images(images, None)?;
        ensure!(n >= 2, "{n} training image(s); batch norm needs at least 2");
        let pixels = images.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(v) = pixels.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            bail!("a training pixel is {v}; give gray values in [0, 1] (8-bit pixels / 255)");
        }
        let shape = NetShape { config: *config, size, outputs };
        let mut net = Self::new(shape, &mut episode_rng(seed, 0))?;
        let mut adam = Adam::new(&net.params, AdamConfig::default())?;
        let mut rng = episode_rng(seed, 1);
        for step in 0..config.steps {
            let batch = draw_batch(&pixels, n, size, config, &mut rng)?;
            let out = head::linear_logits(
                &net.conv,
                &net.params.values(),
                &batch.images,
                BnMode::Batch(Some(&mut net.running)),
            )?;
            let loss = loss(&out, &batch)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                bail!("training diverged at step {step} (loss {value}); lower JudgeConfig.lr");
            }
            adam.step(&loss.backward()?, config.lr_at(step))?;
            progress(step + 1, value);
        }
        Ok(net)
    }

    /// The trunk's embedding (`head: false`) or the linear layer's outputs of `images`, with the
    /// running statistics, in chunks.
    fn infer(&self, images: &Tensor, head: bool) -> Result<Tensor> {
        let (n, _) = check_images(images, Some(self.shape.size))?;
        let params = self.params.detached_values();
        let images = images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(CHUNK) {
            let x = images.narrow(0, start, CHUNK.min(n - start))?;
            let bn = BnMode::Running(&self.running);
            parts.push(if head {
                head::linear_logits(&self.conv, &params, &x, bn)?
            } else {
                self.conv.forward(&params, &x, bn)?
            });
        }
        if parts.is_empty() {
            let width = if head {
                self.shape.outputs
            } else {
                self.conv.config.embedding_dim(self.shape.size, self.shape.size)
            };
            return Ok(Tensor::zeros((0, width), DType::F32, &Device::Cpu)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn named_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.params.named_tensors(prefix);
        out.extend(self.running.named_tensors(prefix)?);
        Ok(out)
    }

    fn load(
        shape: NetShape,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        origin: &Path,
    ) -> Result<Self> {
        let mut net = Self::new(shape, &mut episode_rng(0, 0))?;
        net.params.load_from(tensors, prefix, origin)?;
        net.running.load_from(tensors, prefix, origin)?;
        Ok(net)
    }
}

/// (n, S) of [n, 1, S, S] images; with `size`, S must equal it.
fn check_images(images: &Tensor, size: Option<usize>) -> Result<(usize, usize)> {
    let dims = images.dims();
    let want = |s: &str| format!("images are {dims:?}; give [n, 1, {s}, {s}] gray images");
    let &[n, 1, h, w] = dims else { bail!(want("S")) };
    match size {
        Some(s) => ensure!(
            h == s && w == s,
            "{} (the size this judge was trained on)",
            want(&s.to_string())
        ),
        None => ensure!(h == w && h >= 16, "{} with S ≥ 16", want("S")),
    }
    Ok((n, h))
}

/// One mini-batch: `config.batch` distinct images (all when there are fewer), each translated by
/// a random integer (dx, dy) with edge clamping and scaled by a random gain, clipped to [0, 1].
fn draw_batch(
    pixels: &[f32],
    n: usize,
    size: usize,
    config: &JudgeConfig,
    rng: &mut ChaCha8Rng,
) -> Result<Batch> {
    let index = index::sample(rng, n, config.batch.min(n)).into_vec();
    let plane = size * size;
    let m = config.max_shift as i64;
    let last = size as isize - 1;
    let mut out = vec![0f32; index.len() * plane];
    let mut shifts = Vec::with_capacity(index.len());
    for (dst, &i) in out.chunks_exact_mut(plane).zip(&index) {
        let (dx, dy) = (rng.random_range(-m..=m) as isize, rng.random_range(-m..=m) as isize);
        let b = config.brightness;
        let gain = if b > 0.0 { rng.random_range(1.0 - b..=1.0 + b) } else { 1.0 };
        let src = &pixels[i * plane..][..plane];
        for y in 0..size {
            let sy = (y as isize - dy).clamp(0, last) as usize;
            for x in 0..size {
                let sx = (x as isize - dx).clamp(0, last) as usize;
                dst[y * size + x] = (src[sy * size + sx] * gain).clamp(0.0, 1.0);
            }
        }
        shifts.push((dx, dy));
    }
    let images = Tensor::from_vec(out, (index.len(), 1, size, size), &Device::Cpu)?;
    Ok(Batch { images, index, shifts })
}

/// Rows of `x` [n, D] divided by their Euclidean norm (a zero row stays zero).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
    Ok(x.broadcast_div(&norm)?)
}

/// A C-way face classifier; its [`IdentityNet::features`] compare identities.
#[derive(Debug, Clone)]
pub struct IdentityNet {
    net: Net,
}

impl IdentityNet {
    /// Trains on `images` [n, 1, S, S] in [0, 1] with `labels` in 0..`classes` by cross-entropy.
    /// `progress` gets (step from 1, that step's loss) after every step.
    pub fn train(
        images: &Tensor,
        labels: &[u32],
        classes: usize,
        config: &JudgeConfig,
        seed: u64,
        progress: impl FnMut(usize, f64),
    ) -> Result<Self> {
        ensure!(classes >= 2, "{classes} class(es); an identity classifier needs at least 2");
        check_labels(images, labels, classes)?;
        let net = Net::train(images, classes, config, seed, progress, |logits, batch| {
            let picked: Vec<u32> = batch.index.iter().map(|&i| labels[i]).collect();
            let labels = Tensor::new(picked.as_slice(), &Device::Cpu)?;
            Ok(ops::cross_entropy(logits, &labels)?)
        })?;
        Ok(Self { net })
    }

    /// [n, D] unit rows: the L2-normalised penultimate layer (the trunk's flattened output).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        unit_rows(&self.net.infer(images, false)?)
    }

    /// The fraction of `images` whose most likely class is their label.
    pub fn accuracy(&self, images: &Tensor, labels: &[u32]) -> Result<f64> {
        check_labels(images, labels, self.classes())?;
        ensure!(!labels.is_empty(), "no images to score; give at least one");
        let logits = self.net.infer(images, true)?;
        Ok(ops::accuracy(&logits, &Tensor::new(labels, &Device::Cpu)?)?)
    }

    /// The number of classes it was trained on.
    pub fn classes(&self) -> usize {
        self.net.shape.outputs
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.net.shape.config
    }
}

fn check_labels(images: &Tensor, labels: &[u32], classes: usize) -> Result<()> {
    let n = images.dims().first().copied().unwrap_or(0);
    ensure!(labels.len() == n, "{} labels for {n} images; give one label per image", labels.len());
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {l} is out of range for {classes} classes; labels run 0..{classes}");
    }
    Ok(())
}

/// A regressor of the 68 landmarks.
#[derive(Debug, Clone)]
pub struct LandmarkNet {
    net: Net,
}

impl LandmarkNet {
    /// Trains on `images` [n, 1, S, S] in [0, 1] with `landmarks` [n, 68, 2] as (x, y) pixels,
    /// regressed as 136 numbers divided by S by mean squared error. `progress` gets (step from 1,
    /// that step's loss) after every step.
    pub fn train(
        images: &Tensor,
        landmarks: &Tensor,
        config: &JudgeConfig,
        seed: u64,
        progress: impl FnMut(usize, f64),
    ) -> Result<Self> {
        let (n, size) = check_images(images, None)?;
        let points = check_landmarks(landmarks, n)?;
        let targets = landmarks.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if targets.iter().any(|v| !v.is_finite()) {
            bail!("a landmark coordinate is not finite; give pixel coordinates");
        }
        let width = 2 * points;
        let net = Net::train(images, width, config, seed, progress, |out, batch| {
            let mut t = Vec::with_capacity(batch.index.len() * width);
            for (&i, &(dx, dy)) in batch.index.iter().zip(&batch.shifts) {
                for p in targets[i * width..][..width].chunks_exact(2) {
                    t.push((p[0] + dx as f32) / size as f32);
                    t.push((p[1] + dy as f32) / size as f32);
                }
            }
            let t = Tensor::from_vec(t, (batch.index.len(), width), &Device::Cpu)?;
            Ok((out - t)?.sqr()?.mean_all()?)
        })?;
        Ok(Self { net })
    }

    /// [n, 68, 2] predicted landmarks, (x, y) in pixels.
    pub fn predict(&self, images: &Tensor) -> Result<Tensor> {
        let out = self.net.infer(images, true)?;
        let n = out.dim(0)?;
        Ok((out * self.net.shape.size as f64)?.reshape((n, self.net.shape.outputs / 2, 2))?)
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.net.shape.config
    }
}

/// Points of `landmarks` [n, P, 2], which must be [`LANDMARKS`] points.
fn check_landmarks(landmarks: &Tensor, n: usize) -> Result<usize> {
    let dims = landmarks.dims();
    ensure!(
        dims == [n, LANDMARKS, 2],
        "landmarks are {dims:?}; give [{n}, {LANDMARKS}, 2] (x, y) pixels, one set per image"
    );
    Ok(LANDMARKS)
}

/// Normalised mean error of `predicted` against `truth`, both [n, 68, 2]: for each image the mean
/// over points of the Euclidean distance between predicted and true landmarks, divided by the
/// distance between the true outer eye corners ([`OUTER_EYE_CORNERS`]); the mean over images.
pub fn nme(predicted: &Tensor, truth: &Tensor) -> Result<f64> {
    let n = truth.dims().first().copied().unwrap_or(0);
    check_landmarks(truth, n)?;
    ensure!(
        predicted.dims() == truth.dims(),
        "predicted landmarks are {:?}, the truth {:?}; give both as [n, {LANDMARKS}, 2]",
        predicted.dims(),
        truth.dims()
    );
    ensure!(n > 0, "no landmarks to score; give at least one image");
    let host =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    let (p, t) = (host(predicted)?, host(truth)?);
    let width = 2 * LANDMARKS;
    let dist = |a: &[f64], b: &[f64]| ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt();
    let mut total = 0.0;
    for (i, (p, t)) in p.chunks_exact(width).zip(t.chunks_exact(width)).enumerate() {
        let (l, r) = OUTER_EYE_CORNERS;
        let iod = dist(&t[2 * l..], &t[2 * r..]);
        ensure!(
            iod.is_finite() && iod > 0.0,
            "image {i}: its true outer eye corners (points {l}, {r}) coincide; NME needs them apart"
        );
        let err: f64 = p.chunks_exact(2).zip(t.chunks_exact(2)).map(|(a, b)| dist(a, b)).sum();
        total += err / LANDMARKS as f64 / iod;
    }
    Ok(total / n as f64)
}

/// The name of the tensor holding a judges file's description (JSON bytes, u8).
const META: &str = "judges.meta";
const FORMAT: &str = "kshot-judges/1";

/// What a judges file says about itself.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: String,
    identity: NetShape,
    landmarks: NetShape,
}

/// Both judges, saved together.
#[derive(Debug, Clone)]
pub struct Judges {
    pub identity: IdentityNet,
    pub landmarks: LandmarkNet,
}

impl Judges {
    /// Writes both nets, with their shapes and configs, to one safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = Meta {
            format: FORMAT.into(),
            identity: self.identity.net.shape,
            landmarks: self.landmarks.net.shape,
        };
        let json = serde_json::to_vec(&meta)?;
        let mut tensors = vec![(META.to_string(), Tensor::new(json.as_slice(), &Device::Cpu)?)];
        tensors.extend(self.identity.net.named_tensors("identity.")?);
        tensors.extend(self.landmarks.net.named_tensors("landmarks.")?);
        checkpoint::save_tensors(path, &tensors)
    }

    /// Reads a file written by [`Judges::save`]; any other file is a one-line error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let tensors = checkpoint::load_tensors(path)?;
        let not_judges = || {
            anyhow::anyhow!(
                "{}: not a kshot judges file (no readable `{META}`); give a file written by Judges::save",
                path.display()
            )
        };
        let bytes = tensors
            .get(META)
            .filter(|t| t.dtype() == DType::U8 && t.rank() == 1)
            .ok_or_else(not_judges)?
            .to_vec1::<u8>()?;
        let meta: Meta = serde_json::from_slice(&bytes).map_err(|_| not_judges())?;
        ensure!(
            meta.format == FORMAT,
            "{}: judges format `{}`, this kshot reads `{FORMAT}`; retrain the judges",
            path.display(),
            meta.format
        );
        ensure!(
            meta.landmarks.outputs == 2 * LANDMARKS && meta.identity.outputs >= 2,
            "{}: the judges' output sizes are wrong; the file is not from Judges::save",
            path.display()
        );
        Ok(Self {
            identity: IdentityNet { net: Net::load(meta.identity, &tensors, "identity.", path)? },
            landmarks: LandmarkNet {
                net: Net::load(meta.landmarks, &tensors, "landmarks.", path)?,
            },
        })
    }
}
