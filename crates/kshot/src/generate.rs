//! Few-shot generation of faces: T shots of a person → that person's other images, rendered from
//! their landmarks, scored against the real images and against two baselines (`kshot generate`,
//! and `kshot eval` for a generator).
//!
//! For each held-out person, a seeded shuffle of their images picks the T shots (the first T of
//! the shuffle, so the shots of T = 1 are among those of T = 4 and T = 8); every other image of
//! theirs is a target, rendered from its landmark image. Scores, over all targets of all people:
//! - `ssim`, `l1`, `psnr` against the real target image ([`crate::image_metrics`]);
//! - `landmark_nme`: the landmarks a regressor trained on the real images of the meta-training
//!   people finds in the rendered image, against the target's own landmarks, over the
//!   inter-ocular distance;
//! - `identity_similarity`: the cosine between the identity features of the rendered image and
//!   of the real target (the paper's CSIM, with an identity CNN trained on the meta-training
//!   people only), and `identity_similarity_other`: the mean cosine to the real images of the
//!   other held-out people, for contrast.
//!
//! The baselines: `nearest_support`, the shot whose landmarks are closest to the target's; and
//! `support_mean`, the pixel mean of the shots.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::data::orl::{self, Face, Faces, Landmarks};
use crate::image_metrics;
use crate::judges::{JudgeConfig, Judges};
use crate::methods::FewShotGenerator;

/// The file beside a run's model holding the judges trained for it.
pub const JUDGES_FILE: &str = "judges.safetensors";
/// The seed the judges are trained with.
const JUDGE_SEED: u64 = 0;

/// One person's shots and targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShotChoice {
    /// Positions in the person's faces (index order).
    pub shots: Vec<usize>,
    pub targets: Vec<usize>,
}

/// The seeded choice of `t` shots among `n` images of the person numbered `person`.
pub fn choose_shots(n: usize, t: usize, seed: u64, person: usize) -> anyhow::Result<ShotChoice> {
    anyhow::ensure!(t >= 1 && t < n, "--shots must be 1 to {} (a person has {n} images)", n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut crate::data::episode::episode_rng(seed, person as u64));
    let (shots, targets) = order.split_at(t);
    let (mut shots, mut targets) = (shots.to_vec(), targets.to_vec());
    shots.sort_unstable();
    targets.sort_unstable();
    Ok(ShotChoice { shots, targets })
}

impl ShotChoice {
    /// The shots and the targets among `own`, the person's faces in index order.
    pub fn pick<'a>(&self, own: &[&'a Face]) -> (Vec<&'a Face>, Vec<&'a Face>) {
        let take = |positions: &[usize]| positions.iter().map(|&i| own[i]).collect();
        (take(&self.shots), take(&self.targets))
    }
}

/// [n, 1, S, S] in [0, 1] from u8 images.
fn gray_tensor(images: &[&[u8]], size: usize) -> anyhow::Result<Tensor> {
    let mut v = Vec::with_capacity(images.len() * size * size);
    for img in images {
        v.extend(img.iter().map(|&p| p as f32 / 255.0));
    }
    Ok(Tensor::from_vec(v, (images.len(), 1, size, size), &Device::Cpu)?)
}

/// The landmark images of `faces`: [n, 1, S, S].
pub fn landmark_images(landmarks: &[&Landmarks], size: usize) -> anyhow::Result<Tensor> {
    let rasters: Vec<Vec<u8>> = landmarks.iter().map(|l| orl::rasterise(l, size)).collect();
    gray_tensor(&rasters.iter().map(|r| r.as_slice()).collect::<Vec<_>>(), size)
}

/// The shots as the generator reads them: [T, 2, S, S] (face ‖ landmark image).
pub fn shot_tensor(shots: &[&Face], size: usize) -> anyhow::Result<Tensor> {
    let faces = gray_tensor(&shots.iter().map(|f| f.pixels.as_slice()).collect::<Vec<_>>(), size)?;
    let marks = landmark_images(&shots.iter().map(|f| &f.landmarks).collect::<Vec<_>>(), size)?;
    Ok(Tensor::cat(&[faces, marks], 1)?)
}

/// Renders `targets` (landmark sets) in the likeness of `shots`.
pub fn render(
    generator: &dyn FewShotGenerator,
    shots: &[&Face],
    targets: &[&Landmarks],
    finetune_steps: usize,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let size = generator.image_size();
    let out = generator.generate(
        &shot_tensor(shots, size)?,
        &landmark_images(targets, size)?,
        finetune_steps,
    )?;
    let out = out.to_dtype(DType::F32)?.flatten_from(1)?;
    Ok(out.to_vec2::<f32>()?)
}

/// Mean point distance between two landmark sets.
fn landmark_distance(a: &Landmarks, b: &Landmarks) -> f32 {
    a.iter()
        .zip(b)
        .map(|(p, q)| ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt())
        .sum::<f32>()
        / a.len() as f32
}

/// The first baseline: the shot whose landmarks are nearest the target's.
fn nearest_shot(shots: &[&Face], target: &Landmarks) -> Vec<f32> {
    let nearest = shots
        .iter()
        .min_by(|a, b| {
            landmark_distance(&a.landmarks, target)
                .total_cmp(&landmark_distance(&b.landmarks, target))
        })
        .expect("at least one shot");
    unit_pixels(&nearest.pixels)
}

/// The second baseline: the shots' pixel mean.
fn shots_mean(shots: &[&Face]) -> Vec<f32> {
    let n = shots[0].pixels.len();
    (0..n)
        .map(|j| {
            shots.iter().map(|f| f.pixels[j] as f32).sum::<f32>() / (255.0 * shots.len() as f32)
        })
        .collect()
}

fn unit_pixels(pixels: &[u8]) -> Vec<f32> {
    pixels.iter().map(|&v| v as f32 / 255.0).collect()
}

/// Mean scores of a set of predicted images.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Scores {
    pub ssim: f64,
    pub l1: f64,
    pub psnr: f64,
    pub landmark_nme: f64,
    pub identity_similarity: f64,
    pub identity_similarity_other: f64,
}

/// What `kshot eval` reports for a generator.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub shots: usize,
    pub finetune_steps: usize,
    pub seed: u64,
    pub people: Vec<String>,
    /// Targets scored, over all people.
    pub images: usize,
    #[serde(flatten)]
    pub model: Scores,
    pub nearest_support: Scores,
    pub support_mean: Scores,
    /// The judges on the real targets themselves: the landmark regressor's own error (the floor
    /// of `landmark_nme`) and the real images' identity similarity to the other real images of
    /// the same person (`identity_similarity`) and of other people.
    pub real: Scores,
    pub seconds: f64,
}

/// Predicted images of every target, per method, with what they are scored against.
struct Predictions {
    size: usize,
    real: Vec<Vec<f32>>,
    truth: Vec<Landmarks>,
    person: Vec<usize>,
    by_method: [Vec<Vec<f32>>; 3],
}

/// Renders and scores every target of every person in `faces` with `t` shots.
pub fn evaluate(
    generator: &dyn FewShotGenerator,
    faces: &Faces,
    judges: &Judges,
    t: usize,
    finetune_steps: usize,
    seed: u64,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<GenerationReport> {
    let started = std::time::Instant::now();
    let people = faces.people();
    let size = faces.size;
    anyhow::ensure!(
        size == generator.image_size(),
        "the faces are {size}×{size} but the model renders {0}×{0}",
        generator.image_size()
    );
    let mut p = Predictions {
        size,
        real: vec![],
        truth: vec![],
        person: vec![],
        by_method: Default::default(),
    };
    for (k, person) in people.iter().enumerate() {
        progress(person);
        let own = faces.of_person(person);
        let (shots, targets) = choose_shots(own.len(), t, seed, k)?.pick(&own);
        let rendered = render(
            generator,
            &shots,
            &targets.iter().map(|f| &f.landmarks).collect::<Vec<_>>(),
            finetune_steps,
        )?;
        let mean = shots_mean(&shots);
        for (target, image) in targets.iter().zip(rendered) {
            p.by_method[0].push(image);
            p.by_method[1].push(nearest_shot(&shots, &target.landmarks));
            p.by_method[2].push(mean.clone());
            p.real.push(unit_pixels(&target.pixels));
            p.truth.push(target.landmarks);
            p.person.push(k);
        }
    }
    let real_images = images_tensor(&p.real, size)?;
    let real_features = judges.identity.features(&real_images)?.to_dtype(DType::F64)?;
    let judged = Judged { p: &p, judges, real_features, truth: landmark_points(&p.truth)? };
    let [model, nearest_support, support_mean] = [0, 1, 2].map(|m| judged.score(&p.by_method[m]));
    let real = judged.score_real(&real_images)?;
    Ok(GenerationReport {
        shots: t,
        finetune_steps,
        seed,
        people,
        images: p.real.len(),
        model: model?,
        nearest_support: nearest_support?,
        support_mean: support_mean?,
        real,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn images_tensor(images: &[Vec<f32>], size: usize) -> anyhow::Result<Tensor> {
    let flat: Vec<f32> = images.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (images.len(), 1, size, size), &Device::Cpu)?)
}

fn landmark_points(landmarks: &[Landmarks]) -> anyhow::Result<Tensor> {
    let flat: Vec<f32> = landmarks.iter().flatten().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (landmarks.len(), orl::POINTS, 2), &Device::Cpu)?)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// What every method's images are scored against: the real targets' identity features and
/// landmarks, computed once.
struct Judged<'a> {
    p: &'a Predictions,
    judges: &'a Judges,
    /// [n, D] identity features of the real targets.
    real_features: Tensor,
    /// [n, 68, 2] the targets' landmarks.
    truth: Tensor,
}

impl Judged<'_> {
    fn landmark_nme(&self, images: &Tensor) -> anyhow::Result<f64> {
        crate::judges::nme(&self.judges.landmarks.predict(images)?, &self.truth)
    }

    /// Identity similarity of each image to its own real target (`self_pairs`) or, for the
    /// real images themselves, to the other real targets of the same person; and to other people.
    fn identity(&self, images: &Tensor, self_pairs: bool) -> anyhow::Result<(f64, f64)> {
        let p = self.p;
        let a = self.judges.identity.features(images)?.to_dtype(DType::F64)?;
        let cos: Vec<Vec<f64>> = a.matmul(&self.real_features.t()?)?.to_vec2()?;
        let n = p.real.len();
        let pairs = |keep: &dyn Fn(usize, usize) -> bool| {
            mean(
                (0..n)
                    .flat_map(|i| (0..n).map(move |j| (i, j)))
                    .filter(|&(i, j)| keep(i, j))
                    .map(|(i, j)| cos[i][j]),
            )
        };
        let same = if self_pairs {
            mean((0..n).map(|i| cos[i][i]))
        } else {
            pairs(&|i, j| j != i && p.person[j] == p.person[i])
        };
        Ok((same, pairs(&|i, j| p.person[j] != p.person[i])))
    }

    fn score(&self, predicted: &[Vec<f32>]) -> anyhow::Result<Scores> {
        let (p, size) = (self.p, self.p.size);
        let n = predicted.len() as f64;
        let mean_of = |metric: &dyn Fn(&[f32], &[f32]) -> f64| {
            predicted.iter().zip(&p.real).map(|(a, b)| metric(a, b)).sum::<f64>() / n
        };
        let ssim = mean_of(&|a, b| image_metrics::ssim(a, b, size, size));
        let l1 = mean_of(&|a, b| image_metrics::l1(a, b));
        let psnr = mean_of(&|a, b| image_metrics::psnr(a, b));
        let images = images_tensor(predicted, size)?;
        let landmark_nme = self.landmark_nme(&images)?;
        let (identity_similarity, identity_similarity_other) = self.identity(&images, true)?;
        Ok(Scores { ssim, l1, psnr, landmark_nme, identity_similarity, identity_similarity_other })
    }

    fn score_real(&self, images: &Tensor) -> anyhow::Result<Scores> {
        let (identity_similarity, identity_similarity_other) = self.identity(images, false)?;
        Ok(Scores {
            ssim: 1.0,
            l1: 0.0,
            psnr: f64::INFINITY,
            landmark_nme: self.landmark_nme(images)?,
            identity_similarity,
            identity_similarity_other,
        })
    }
}

/// The judges of a run: loaded from `run_dir/judges.safetensors`, or trained on the real images
/// of the meta-training people `train` (seed 0) and saved there.
pub fn judges_for_run(
    run_dir: &Path,
    train: &Faces,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Judges> {
    let path = run_dir.join(JUDGES_FILE);
    if path.exists() {
        return Judges::load(&path);
    }
    let judges = train_judges(train, &mut progress)?;
    judges.save(&path).with_context(|| format!("saving the judges to {}", path.display()))?;
    Ok(judges)
}

/// Trains the identity CNN and the landmark regressor on `faces` (the meta-training people).
pub fn train_judges(faces: &Faces, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Judges> {
    let people = faces.people();
    let size = faces.size;
    let images =
        gray_tensor(&faces.faces.iter().map(|f| f.pixels.as_slice()).collect::<Vec<_>>(), size)?;
    let labels: Vec<u32> = faces
        .faces
        .iter()
        .map(|f| people.iter().position(|p| *p == f.person).expect("a listed person") as u32)
        .collect();
    let marks = landmark_points(&faces.faces.iter().map(|f| f.landmarks).collect::<Vec<_>>())?;
    let config = JudgeConfig::default();
    progress("training the identity CNN on the meta-training people");
    let identity = crate::judges::IdentityNet::train(
        &images,
        &labels,
        people.len(),
        &config,
        JUDGE_SEED,
        |_, _| {},
    )?;
    progress("training the landmark regressor on the meta-training people");
    let landmarks =
        crate::judges::LandmarkNet::train(&images, &marks, &config, JUDGE_SEED, |_, _| {})?;
    Ok(Judges { identity, landmarks })
}

/// Values in [0, 1] as 8-bit gray levels.
pub fn to_u8(values: &[f32]) -> Vec<u8> {
    values.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// Writes a size×size gray image as a PNG, atomically.
pub fn write_gray_png(path: &Path, pixels: &[u8], size: usize) -> anyhow::Result<()> {
    let png = image::GrayImage::from_raw(size as u32, size as u32, pixels.to_vec()).with_context(
        || {
            format!(
                "cannot write {}: {} pixels for a {size}×{size} image",
                path.display(),
                pixels.len()
            )
        },
    )?;
    let mut bytes = Vec::new();
    png.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .with_context(|| format!("cannot encode {} as PNG", path.display()))?;
    crate::checkpoint::write_atomic(path, &bytes)
}
