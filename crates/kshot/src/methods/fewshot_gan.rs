//! Few-shot adversarial generation (Zakharov, Shysheya, Burkov & Lempitsky, ICCV 2019): an
//! embedder E turns K images of one person (each with its landmark image) into ê, the mean of
//! E over the shots; a generator G renders a landmark image in that person's likeness with AdaIN
//! parameters ψ = P·ê; a projection discriminator scores V(x ‖ y)ᵀ(W_i + w₀) + b with one column
//! W_i per training identity. Networks: [`crate::nn::gan_nets`].
//!
//! **Meta-learning.** Each training episode is one person: K source images and one target
//! image (support and query of a 1-way K-shot 1-query episode). One step, over a batch of
//! episodes:
//! - the generator step (optimiser `generator`: E, G, P and W): hinge adversarial loss
//!   −D(x̂), discriminator feature matching (the mean absolute difference of every
//!   discriminator block's output between the real and generated target), pixel L1 between
//!   them, and the embedding match L_MCH = mean |ê_i − W_i|; the discriminator's weights are
//!   held fixed here;
//! - the discriminator step (optimiser `discriminator`, its learning rate `d_lr_ratio` times the
//!   schedule's): hinge loss max(0, 1 − D(x)) + max(0, 1 + D(x̂)) on the real target and the
//!   generated one.
//!
//! **Fine-tuning** on T shots of a new person ([`FewShotGenerator::generate`]): ψ′ = P·ê_new and
//! W′ = w₀ + ê_new become parameters; G (with ψ′) and D (with W′) take `steps` alternating
//! steps of the same losses on the T shots (each shot is its own target), then G renders the
//! new landmark images. With 0 steps it is the paper's feed-forward model.
//!
//! **What differs from the paper** (VoxCeleb video frames, 256×256 colour, 8 GPUs): 64×64 gray
//! ORL faces; smaller networks (a stem and four residual blocks per encoder, [`GanNetsConfig`]);
//! the content loss is pixel L1 plus feature matching, since no pretrained VGG19 / VGGFace
//! weights can be downloaded here; L_MCH is a mean, not a sum, over the embedding's coordinates;
//! AdaIN's scale is 1 + ψ_γ so that an untrained P starts from plain instance norm; Adam
//! (β₁ 0.5, β₂ 0.999) for both networks, one discriminator step per generator step.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, FewShotGenerator, Learner, Method, MethodConfig, OptimiserSpec,
    Preset, SharedFlags, State, StepCtx, StepOutput,
};
use crate::data::{Episode, EpisodeSpec, ImageSet};
use crate::nn::gan_nets::{GanNets, GanNetsConfig, Sn};
use crate::nn::{Params, RunningStats};
use crate::optim::{Adam, AdamConfig, StepDecay};
use crate::protocol::{DataConfig, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FewShotGanConfig {
    /// Channels of the networks' first convolutions.
    pub width: usize,
    /// Training identities (the discriminator's W columns); set from the training set.
    pub identities: usize,
    /// The discriminator's learning rate over the generator's (the paper: 2e-4 / 5e-5 = 4).
    pub d_lr_ratio: f64,
    pub feature_matching: f64,
    pub pixel_l1: f64,
    pub embedding_match: f64,
    /// Fine-tuning steps of `kshot generate` and `kshot eval` unless told otherwise.
    pub finetune_steps: usize,
    /// The generator's fine-tuning learning rate (the discriminator's is `d_lr_ratio` times it).
    pub finetune_lr: f64,
}

impl Default for FewShotGanConfig {
    fn default() -> Self {
        Self {
            width: 8,
            identities: 0,
            d_lr_ratio: 4.0,
            feature_matching: 10.0,
            pixel_l1: 10.0,
            embedding_match: 80.0,
            finetune_steps: 100,
            finetune_lr: 1e-4,
        }
    }
}

pub const GENERATOR: &str = "generator";
pub const DISCRIMINATOR: &str = "discriminator";

/// The images of a batch of one-person episodes.
struct Batch {
    /// [B·K, 2, S, S]
    sources: Tensor,
    /// [B, 1, S, S] real target images and their landmark images.
    real: Tensor,
    landmarks: Tensor,
    ids: Vec<u32>,
    shots: usize,
}

impl Batch {
    fn of(episodes: &[Episode]) -> Result<Self> {
        let sources = Tensor::cat(&episodes.iter().map(|e| &e.support).collect::<Vec<_>>(), 0)?;
        let targets = Tensor::cat(&episodes.iter().map(|e| &e.query).collect::<Vec<_>>(), 0)?;
        let shots = episodes[0].support.dim(0)?;
        Ok(Self {
            sources,
            real: targets.narrow(1, 0, 1)?,
            landmarks: targets.narrow(1, 1, 1)?,
            ids: episodes.iter().map(|e| e.classes[0] as u32).collect(),
            shots,
        })
    }
}

pub struct FewShotGan {
    config: FewShotGanConfig,
    nets: GanNets,
    state: State,
}

/// The losses of one generator step.
struct GeneratorLosses {
    total: Tensor,
    fake: Tensor,
}

impl FewShotGan {
    pub fn new(config: FewShotGanConfig, size: usize, rng: &mut ChaCha8Rng, dev: &Device) -> Result<Self> {
        let nets = GanNets::new(GanNetsConfig { size, width: config.width, identities: config.identities })?;
        let (params, sn) = nets.init(rng, dev)?;
        let mut state = State::new(params, RunningStats::default());
        state.extra = sn;
        Ok(Self { config, nets, state })
    }

    pub fn nets(&self) -> &GanNets {
        &self.nets
    }

    /// The discriminator's parameters cut from the graph, the rest as they are.
    fn with_fixed_discriminator(p: &Params) -> Params {
        detached_where(p, GanNets::is_discriminator)
    }

    /// Adversarial + feature-matching + pixel terms of generated images `fake` against `real`
    /// under discriminator projection `projection` (discriminator parameters in `p` are used
    /// as given: pass them detached).
    fn content_and_adversarial(
        &self,
        p: &Params,
        sn: &Sn,
        fake: &Tensor,
        real: &Tensor,
        landmarks: &Tensor,
        projection: &Tensor,
    ) -> Result<Tensor> {
        let n = fake.dim(0)?;
        let both = Tensor::cat(&[real, fake], 0)?;
        let y2 = Tensor::cat(&[landmarks, landmarks], 0)?;
        let proj2 = Tensor::cat(&[projection, projection], 0)?;
        let (score, features) = self.nets.discriminate(p, sn, &both, &y2, &proj2)?;
        let adversarial = score.narrow(0, n, n)?.mean_all()?.neg()?;
        let mut matching = Tensor::zeros((), fake.dtype(), fake.device())?;
        for f in &features {
            let diff = (f.narrow(0, 0, n)?.detach() - f.narrow(0, n, n)?)?;
            matching = (matching + diff.abs()?.mean_all()?)?;
        }
        let pixel = (fake - real)?.abs()?.mean_all()?;
        adversarial + (matching * self.config.feature_matching)? + (pixel * self.config.pixel_l1)?
    }

    /// The generator step's loss on a batch (differentiable in E, G, P and W), and the images.
    fn generator_loss(&self, p: &Params, sn: &Sn, batch: &Batch) -> Result<GeneratorLosses> {
        let fixed = Self::with_fixed_discriminator(p);
        let b = batch.ids.len();
        let e = self.nets.embed(p, sn, &batch.sources)?;
        let e = e.reshape((b, batch.shots, ()))?.mean(1)?;
        let psi = self.nets.adain_params(p, &e)?;
        let fake = self.nets.generate(p, sn, &batch.landmarks, &psi)?;
        let projection = self.nets.projection(&fixed, &batch.ids)?;
        let main = self.content_and_adversarial(&fixed, sn, &fake, &batch.real, &batch.landmarks, &projection)?;
        let idx = Tensor::new(batch.ids.as_slice(), e.device())?;
        let w = p.get("d.proj.w")?.index_select(&idx, 0)?;
        let embedding_match = (e - w)?.abs()?.mean_all()?;
        let total = (main + (embedding_match * self.config.embedding_match)?)?;
        Ok(GeneratorLosses { total, fake })
    }

    /// Hinge loss of the discriminator on real and generated images, and its accuracy.
    fn discriminator_loss(
        &self,
        p: &Params,
        sn: &Sn,
        real: &Tensor,
        fake: &Tensor,
        landmarks: &Tensor,
        projection: &Tensor,
    ) -> Result<(Tensor, f64)> {
        let n = real.dim(0)?;
        let both = Tensor::cat(&[real, &fake.detach()], 0)?;
        let y2 = Tensor::cat(&[landmarks, landmarks], 0)?;
        let proj2 = Tensor::cat(&[projection, projection], 0)?;
        let (score, _) = self.nets.discriminate(p, sn, &both, &y2, &proj2)?;
        let (s_real, s_fake) = (score.narrow(0, 0, n)?, score.narrow(0, n, n)?);
        let loss = ((s_real.neg()? + 1.0)?.relu()?.mean_all()? + (s_fake + 1.0)?.relu()?.mean_all()?)?;
        let scores = score.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let right = scores.iter().enumerate().filter(|(i, s)| (*i < n) == (**s > 0.0)).count();
        Ok((loss, right as f64 / (2 * n) as f64))
    }

    /// Fine-tunes on `shots` [T, 2, S, S] and renders `targets` [M, 1, S, S].
    fn finetune_and_render(&self, shots: &Tensor, targets: &Tensor, steps: usize) -> Result<Tensor> {
        let base = self.state.params.detached_values();
        let dtype = base.get("p.w")?.dtype();
        let shots = shots.to_dtype(dtype)?;
        let mut sn: Sn = self.state.extra.clone();
        let e = self.nets.embed(&base, &sn, &shots)?.mean_keepdim(0)?;
        let psi = Var::from_tensor(&self.nets.adain_params(&base, &e)?)?;
        let w_new = Var::from_tensor(&e.broadcast_add(base.get("d.proj.w0")?)?)?;
        let targets = targets.to_dtype(dtype)?;
        if steps == 0 {
            return self.nets.generate(&base, &sn, &targets, &psi.as_tensor().broadcast_as((targets.dim(0)?, psi.dim(1)?))?);
        }
        let (mut g_vars, mut d_vars) = (vec![("psi".to_string(), psi.clone())], vec![("w_new".to_string(), w_new.clone())]);
        let mut live = Params::new();
        for (name, t) in base.iter() {
            if name.starts_with("e.") || name.starts_with("p.") || name.starts_with("d.proj.w") {
                live.insert(name.clone(), t.clone());
                continue;
            }
            let var = Var::from_tensor(t)?;
            live.insert(name.clone(), var.as_tensor().clone());
            if GanNets::is_discriminator(name) { &mut d_vars } else { &mut g_vars }.push((name.clone(), var));
        }
        let adam = AdamConfig { beta1: 0.5, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut g_opt = Adam::named(GENERATOR, g_vars, adam)?;
        let mut d_opt = Adam::named(DISCRIMINATOR, d_vars, adam)?;
        let t = shots.dim(0)?;
        let real = shots.narrow(1, 0, 1)?;
        let landmarks = shots.narrow(1, 1, 1)?;
        for _ in 0..steps {
            self.nets.power_iterate(&live, &mut sn)?;
            let psi_t = psi.as_tensor().broadcast_as((t, psi.dim(1)?))?;
            let proj = w_new.as_tensor().broadcast_as((t, w_new.dim(1)?))?;
            let fake = self.nets.generate(&live, &sn, &landmarks, &psi_t)?;
            let fixed = Self::with_fixed_discriminator(&live);
            let loss = self.content_and_adversarial(&fixed, &sn, &fake, &real, &landmarks, &proj.detach())?;
            g_opt.step(&loss.backward()?, self.config.finetune_lr)?;
            let (loss, _) = self.discriminator_loss(&live, &sn, &real, &fake, &landmarks, &proj)?;
            d_opt.step(&loss.backward()?, self.config.finetune_lr * self.config.d_lr_ratio)?;
        }
        let live = detached_where(&live, |_| true);
        let psi_m = psi.as_tensor().detach().broadcast_as((targets.dim(0)?, psi.dim(1)?))?;
        self.nets.generate(&live, &sn, &targets, &psi_m)
    }
}

/// `p` with the tensors whose names satisfy `cut` cut from the graph.
fn detached_where(p: &Params, cut: impl Fn(&str) -> bool) -> Params {
    let mut out = Params::new();
    for (name, t) in p.iter() {
        out.insert(name.clone(), if cut(name) { t.detach() } else { t.clone() });
    }
    out
}

impl FewShotGenerator for FewShotGan {
    fn generate(&self, shots: &Tensor, targets: &Tensor, finetune_steps: usize) -> Result<Tensor> {
        let size = self.nets.config.size;
        let (_, c, h, w) = shots.dims4()?;
        if (c, h, w) != (2, size, size) {
            candle_core::bail!("the shots must be [T, 2, {size}, {size}] (face and landmark image), got {:?}", shots.dims())
        }
        self.finetune_and_render(shots, targets, finetune_steps)
    }

    fn image_size(&self) -> usize {
        self.nets.config.size
    }

    fn default_finetune_steps(&self) -> usize {
        self.config.finetune_steps
    }
}

impl Learner for FewShotGan {
    fn adapt(&self, _support: &Tensor, _labels: &[u32], _ways: usize) -> Result<Box<dyn Classifier + '_>> {
        candle_core::bail!(
            "a few-shot generator is not a classifier: render faces with `kshot generate --run RUN`, score it with `kshot eval --run RUN --shots T`"
        )
    }

    fn generator(&self) -> Option<&dyn FewShotGenerator> {
        Some(self)
    }

    fn optimisers(&self) -> Vec<OptimiserSpec> {
        let names = |d: bool| -> Vec<String> {
            self.state
                .params
                .iter()
                .filter(|(n, _)| GanNets::is_discriminator(n) == d || (!d && *n == "d.proj.w"))
                .map(|(n, _)| n.to_string())
                .collect()
        };
        vec![
            OptimiserSpec { name: GENERATOR, params: Some(names(false)) },
            OptimiserSpec { name: DISCRIMINATOR, params: Some(names(true)) },
        ]
    }

    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let episodes = ctx.episodes()?;
        let batch = Batch::of(&episodes)?;
        let values = self.state.params.values();
        self.nets.power_iterate(&values, &mut self.state.extra)?;
        let sn = self.state.extra.clone();
        let g = self.generator_loss(&values, &sn, &batch)?;
        let out = ctx.minimise_with(GENERATOR, EpisodeOutput { loss: g.total, accuracy: 0.0 })?;
        let values = self.state.params.values();
        let projection = self.nets.projection(&values, &batch.ids)?;
        let (loss, accuracy) =
            self.discriminator_loss(&values, &sn, &batch.real, &g.fake, &batch.landmarks, &projection)?;
        let lr = ctx.lr * self.config.d_lr_ratio;
        ctx.minimise_at(DISCRIMINATOR, EpisodeOutput { loss, accuracy }, lr)?;
        Ok(StepOutput { accuracy, ..out })
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of the few-shot GAN.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FewShotGanFlags {
    /// Few-shot GAN: channels of the first convolutions (blocks double them).
    #[arg(long)]
    pub gan_width: Option<usize>,
    /// Few-shot GAN: weight of the embedding match L_MCH (the paper: 80).
    #[arg(long)]
    pub embedding_match: Option<f64>,
    /// Few-shot GAN: fine-tuning steps that generate and eval take unless told otherwise.
    #[arg(long)]
    pub default_finetune_steps: Option<usize>,
}

impl Method for FewShotGanConfig {
    const NAMES: &'static [&'static str] = &["fewshot-gan"];
    type Flags = FewShotGanFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "fewshot-gan"
    }

    fn apply(&mut self, flags: &FewShotGanFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        if let Some(w) = flags.gan_width {
            anyhow::ensure!(w >= 1, "--gan-width must be at least 1");
            self.width = w;
        }
        if let Some(w) = flags.embedding_match {
            anyhow::ensure!(w >= 0.0, "--embedding-match must be 0 or more");
            self.embedding_match = w;
        }
        if let Some(s) = flags.default_finetune_steps {
            self.finetune_steps = s;
        }
        Ok(())
    }

    fn fit(&mut self, train_set: &ImageSet) -> anyhow::Result<()> {
        anyhow::ensure!(
            train_set.channels == 2,
            "{}: the few-shot GAN trains on faces with landmark images (2 channels; --dataset orl-faces), not {}-channel images",
            train_set.name,
            train_set.channels
        );
        self.identities = train_set.classes.len();
        Ok(())
    }

    fn build(&self, protocol: &Protocol, rng: &mut ChaCha8Rng, device: &Device) -> anyhow::Result<Box<dyn Learner>> {
        anyhow::ensure!(
            protocol.train.ways == 1 && protocol.train.queries >= 1,
            "few-shot GAN episodes are one person: K source images and a target (--train-ways 1, 1 query)"
        );
        anyhow::ensure!(self.identities > 0, "the few-shot GAN needs the training identities; train it on a dataset");
        Ok(Box::new(FewShotGan::new(*self, protocol.data.image_size, rng, device)?))
    }

    fn step_unit(&self, protocol: &Protocol) -> String {
        format!(
            "steps of {} people ({} source images + 1 target each)",
            protocol.meta_batch, protocol.train.shots
        )
    }

    fn presets() -> Vec<Preset> {
        vec![Preset {
            name: "fewshot-gan-orl",
            summary: "Zakharov et al. 2019 (few-shot adversarial talking heads), sized for a CPU: ORL faces aligned to 64×64 gray with 68-point landmark images, meta-trained on s1–s30 (episodes of 8 source images + 1 target of one person, 2 people a step, 3000 steps, Adam 2e-4 for E and G, 8e-4 for D), fine-tuned on T shots of the held-out s31–s40; pixel L1 and feature matching in place of the VGG losses",
            build: orl,
        }]
    }
}

fn orl() -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(1);
    p.data = DataConfig {
        dataset: "orl-faces".into(),
        split: "people".into(),
        train_subset: "train".into(),
        test_subset: "test".into(),
        image_size: 64,
        ..DataConfig::omniglot()
    };
    p.backbone = crate::nn::BackboneConfig::Conv4(crate::nn::Conv4Config::new(2));
    p.train = EpisodeSpec::new(1, 8, 1);
    p.test = EpisodeSpec::new(1, 8, 1);
    p.meta_batch = 2;
    p.episodes = 3000;
    p.adam = AdamConfig { beta1: 0.5, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    p.schedule = StepDecay { lr: 2e-4, step: 0, gamma: 1.0 };
    p.validation = None;
    p.checkpoint_every = 100;
    p.test_episodes = 10;
    (p, MethodConfig::FewShotGan(FewShotGanConfig::default()))
}
