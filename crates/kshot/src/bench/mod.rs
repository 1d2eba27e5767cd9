//! The workloads of `kshot bench`, defined once here and mirrored line for line by
//! `benches/pytorch_reference.py`, so that the two can be timed side by side.
//!
//! Every workload is a full training step on random normal inputs: forward, backward and an Adam
//! update (learning rate 1e-3) of Conv4 (64 channels, no convolution bias, batch norm with batch
//! statistics, ReLU, 2×2 max-pool), or, in `resnet12-step-84`, of ResNet-12 ([`ResNet12`]: widths
//! 64-160-320-640, batch statistics, LeakyReLU 0.1, global average pool). The method workloads
//! ([`methods`]) build their learner from a preset, as `kshot train --preset` would.

mod methods;

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::data::{Episode, EpisodeSpec};
use crate::methods::{EpisodeOutput, Learner, Maml, MamlConfig, ProtoNet, ProtoNetConfig};
use crate::nn::{
    head, ops, Backbone, BackboneConfig, BnMode, Conv4, Conv4Config, ParamSet, ResNet12,
    ResNet12Config,
};
use crate::optim::{Adam, AdamConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Conv4 + linear 5-way head, one step on 80 × 1×28×28 (5-way, 1 support + 15 queries).
    Conv4Omniglot,
    /// Conv4 + linear 5-way head, one step on 80 × 3×84×84.
    Conv4MiniImageNet,
    /// ResNet-12 + linear 5-way head, one step on 20 × 3×84×84.
    ResNet12MiniImageNet,
    /// One second-order MAML meta-step: 5-way 1-shot, 15 queries, 5 inner steps, α = 0.4, 28×28.
    MamlSecondOrder,
    /// One ProtoNet episode: 60-way 1-shot 5-query on 28×28.
    ProtoNet60Way,
    /// `kshot predict`'s model path: a ProtoNet adapted to a 5-way 1-shot support set (28×28)
    /// scoring one query, in inference mode.
    Predict1Query,
    /// The same with 1000 queries scored in batches of 256 (predict's batch).
    Predict1000Queries,
    /// A GNN training batch (Garcia & Bruna, Omniglot net): 100 graphs of 5-way 1-shot plus one
    /// query each, forward, backward and Adam.
    GnnBatch,
    /// A MANN training batch: 16 sequences of 5 classes × 10 instances, 20×20.
    MannBatch,
    /// A second-order MAML meta-step of `maml-omniglot-20w5s`: 20-way 5-shot tasks with 5 queries
    /// per class, 5 inner steps of α = 0.1 on Σ CE / K, strided Conv4, but 2 tasks
    /// where the preset's meta-batch has 16.
    Maml20Way5Shot,
    /// One Matching Networks training episode of `matching-omniglot-5way-1shot`: 5-way 1-shot, 15
    /// queries per class, Conv4, cosine attention, no FCE.
    MatchingEpisode,
    /// One Meta-LSTM meta-iteration of `meta-lstm-omniglot-5w1s`: 5-way 1-shot, 15 queries per
    /// class, T = 12 learner updates by the coordinate-wise LSTM, first order, 32-filter Conv4.
    MetaLstmIteration,
    /// One Baseline pretraining mini-batch of `baseline-omniglot`: 16 images, Conv4 and a linear
    /// head over the 4112 training classes.
    BaselineBatch,
    /// Evaluation: one ProtoNet test episode (5-way 1-shot, 15 queries per class) in inference
    /// mode: the support set embedded, the 75 queries scored, their accuracy.
    EvalEpisode,
    /// One Meta Networks training episode of `metanet-omniglot-5w1s`: 5-way 1-shot, 10 queries
    /// per class, both networks' meta information, fast weights, the query loss, clipped Adam.
    MetaNetEpisode,
}

impl Workload {
    pub const ALL: [Workload; 15] = [
        Workload::Conv4Omniglot,
        Workload::Conv4MiniImageNet,
        Workload::ResNet12MiniImageNet,
        Workload::MamlSecondOrder,
        Workload::ProtoNet60Way,
        Workload::Predict1Query,
        Workload::Predict1000Queries,
        Workload::GnnBatch,
        Workload::MannBatch,
        Workload::Maml20Way5Shot,
        Workload::MatchingEpisode,
        Workload::MetaLstmIteration,
        Workload::BaselineBatch,
        Workload::EvalEpisode,
        Workload::MetaNetEpisode,
    ];

    /// The preset a method workload builds its learner from.
    pub fn preset(self) -> Option<&'static str> {
        methods::preset(self)
    }

    /// The name both benchmarks use.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Conv4Omniglot => "conv4-step-28",
            Workload::Conv4MiniImageNet => "conv4-step-84",
            Workload::ResNet12MiniImageNet => "resnet12-step-84",
            Workload::MamlSecondOrder => "maml2-step",
            Workload::ProtoNet60Way => "protonet-60w1s5q",
            Workload::Predict1Query => "predict-5w1s-1q",
            Workload::Predict1000Queries => "predict-5w1s-1000q",
            Workload::GnnBatch => "gnn-5w1s-100graphs",
            Workload::MannBatch => "mann-16x50-steps",
            Workload::Maml20Way5Shot => "maml2-20w5s",
            Workload::MatchingEpisode => "matching-5w1s15q",
            Workload::MetaLstmIteration => "meta-lstm-5w1s15q",
            Workload::BaselineBatch => "baseline-16x4112c",
            Workload::EvalEpisode => "eval-protonet-5w1s15q",
            Workload::MetaNetEpisode => "metanet-5w1s10q",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Workload::Conv4Omniglot => "Conv4 training step, 80 × 1×28×28",
            Workload::Conv4MiniImageNet => "Conv4 training step, 80 × 3×84×84",
            Workload::ResNet12MiniImageNet => "ResNet-12 training step, 20 × 3×84×84",
            Workload::MamlSecondOrder => "2nd-order MAML meta-step, 5w1s 15q, 5 inner steps",
            Workload::ProtoNet60Way => "ProtoNet episode, 60-way 1-shot 5-query, 28×28",
            Workload::Predict1Query => "predict: adapt to 5-way 1-shot + 1 query, 28×28",
            Workload::Predict1000Queries => "predict: adapt to 5-way 1-shot + 1000 queries, 28×28",
            Workload::GnnBatch => "GNN training batch, 100 graphs of 5-way 1-shot + 1 query, 28×28",
            Workload::MannBatch => {
                "MANN training batch, 16 sequences of 5 classes × 10 instances (50 steps), 20×20"
            }
            Workload::Maml20Way5Shot => {
                "2nd-order MAML meta-step, 2 tasks of 20w5s 5q, 5 inner steps, strided Conv4"
            }
            Workload::MatchingEpisode => "Matching Networks episode, 5w1s 15q, 28×28, no FCE",
            Workload::MetaLstmIteration => "Meta-LSTM meta-iteration, 5w1s 15q, T = 12, 28×28",
            Workload::BaselineBatch => "Baseline mini-batch, 16 × 28×28, 4112-way linear head",
            Workload::EvalEpisode => "ProtoNet test episode, 5w1s 15q, inference (ms per episode)",
            Workload::MetaNetEpisode => "Meta Networks training episode, 5w1s 10q, 28×28",
        }
    }

    pub fn from_name(name: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.name() == name)
    }
}

fn normal(rng: &mut ChaCha8Rng, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn labels(ways: usize, per_class: usize) -> Vec<u32> {
    (0..ways as u32).flat_map(|c| std::iter::repeat_n(c, per_class)).collect()
}

fn episode(rng: &mut ChaCha8Rng, spec: EpisodeSpec, size: usize) -> Result<Episode> {
    Ok(Episode {
        spec,
        index: 0,
        seed: 0,
        classes: (0..spec.ways).collect(),
        support: normal(rng, &[spec.ways * spec.shots, 1, size, size])?,
        support_labels: labels(spec.ways, spec.shots),
        query: normal(rng, &[spec.ways * spec.queries, 1, size, size])?,
        query_labels: labels(spec.ways, spec.queries),
        unlabelled: None,
    })
}

/// One prepared workload: `step` runs one timed training step.
pub struct Prepared {
    step: Box<dyn FnMut() -> Result<()>>,
}

impl Prepared {
    pub fn step(&mut self) -> Result<()> {
        (self.step)()
    }
}

/// Builds `workload` with fresh seeded parameters; `fast_kernels` picks kshot's fused ops or candle's.
pub fn prepare(workload: Workload, fast_kernels: bool) -> Result<Prepared> {
    crate::autograd::init();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let adam_config = AdamConfig::default();
    let step: Box<dyn FnMut() -> Result<()>> = match workload {
        Workload::Conv4Omniglot | Workload::Conv4MiniImageNet => {
            let (channels, size) =
                if workload == Workload::Conv4Omniglot { (1, 28) } else { (3, 84) };
            let config = Conv4Config { fast_kernels, ..Conv4Config::new(channels) };
            let net = Conv4::new(config);
            let params = net.init_with_linear_head((size, size), 5, &mut rng, &Device::Cpu)?;
            let x = normal(&mut rng, &[80, channels, size, size])?;
            let y = Tensor::new(labels(5, 16), &Device::Cpu)?;
            let mut adam = Adam::new(&params, adam_config)?;
            Box::new(move || classifier_step(&net, &params, &mut adam, &x, &y))
        }
        Workload::ResNet12MiniImageNet => {
            let net = ResNet12::new(ResNet12Config { fast_kernels, ..ResNet12Config::new(3) });
            let params = head::init_linear_head(&net, (84, 84), 5, &mut rng, &Device::Cpu)?;
            let x = normal(&mut rng, &[20, 3, 84, 84])?;
            let y = Tensor::new(labels(5, 4), &Device::Cpu)?;
            let mut adam = Adam::new(&params, adam_config)?;
            Box::new(move || classifier_step(&net, &params, &mut adam, &x, &y))
        }
        Workload::MamlSecondOrder => {
            let config = MamlConfig {
                ways: 5,
                inner_steps: 5,
                inner_steps_test: 5,
                inner_lr: 0.4,
                first_order: false,
                transductive: true,
                ..MamlConfig::default()
            };
            let backbone =
                BackboneConfig::Conv4(Conv4Config { fast_kernels, ..Conv4Config::new(1) });
            let mut maml = Maml::new(config, &backbone, (28, 28), &mut rng, &Device::Cpu)?;
            let ep = episode(&mut rng, EpisodeSpec::new(5, 1, 15), 28)?;
            let params = maml.params().clone();
            learner_step(&params, adam_config, move || maml.episode_loss(&ep))?
        }
        Workload::ProtoNet60Way => {
            let backbone =
                BackboneConfig::Conv4(Conv4Config { fast_kernels, ..Conv4Config::new(1) });
            let mut net =
                ProtoNet::new(ProtoNetConfig::default(), &backbone, &mut rng, &Device::Cpu)?;
            let ep = episode(&mut rng, EpisodeSpec::new(60, 1, 5), 28)?;
            let params = net.params().clone();
            learner_step(&params, adam_config, move || net.episode_loss(&ep))?
        }
        Workload::GnnBatch => {
            let backbone = BackboneConfig::GnnOmniglot(crate::nn::GnnEmbeddingConfig::omniglot(1));
            let config = crate::methods::GnnConfig::omniglot(5);
            let mut net = crate::methods::Gnn::new(config, &backbone, 28, &mut rng, &Device::Cpu)?;
            let episodes = (0..100)
                .map(|_| episode(&mut rng, EpisodeSpec::new(5, 1, 1), 28))
                .collect::<Result<Vec<_>>>()?;
            let params = net.params().clone();
            let mut draw = ChaCha8Rng::seed_from_u64(1);
            learner_step(&params, adam_config, move || net.batch_loss(&episodes, &mut draw))?
        }
        Workload::MannBatch => {
            use crate::methods::mann::{LabelCode, Mann, MannConfig, Sequence};
            let net = Mann::new(MannConfig::default(), 400, &mut rng, &Device::Cpu)?;
            let sequences = (0..16)
                .map(|_| {
                    let images = normal(&mut rng, &[50, 1, 20, 20])?;
                    Sequence::shuffled(&images, &labels(5, 10), 5, LabelCode::OneHot, &mut rng)
                })
                .collect::<Result<Vec<_>>>()?;
            let params = net.params().clone();
            learner_step(&params, adam_config, move || {
                net.batch_loss(&net.params().values(), &sequences)
            })?
        }
        Workload::Maml20Way5Shot
        | Workload::MatchingEpisode
        | Workload::MetaLstmIteration
        | Workload::BaselineBatch
        | Workload::EvalEpisode
        | Workload::MetaNetEpisode => methods::prepare(workload, fast_kernels, &mut rng)?,
        Workload::Predict1Query | Workload::Predict1000Queries => {
            let queries = if workload == Workload::Predict1Query { 1 } else { 1000 };
            let backbone =
                BackboneConfig::Conv4(Conv4Config { fast_kernels, ..Conv4Config::new(1) });
            let net = ProtoNet::new(ProtoNetConfig::default(), &backbone, &mut rng, &Device::Cpu)?;
            let support = normal(&mut rng, &[5, 1, 28, 28])?;
            let query = normal(&mut rng, &[queries, 1, 28, 28])?;
            let support_labels = labels(5, 1);
            Box::new(move || {
                use crate::methods::Learner;
                let classifier = net.adapt(&support, &support_labels, 5)?;
                for start in (0..queries).step_by(256) {
                    let n = 256.min(queries - start);
                    classifier.logits(&query.narrow(0, start, n)?)?.to_vec2::<f32>()?;
                }
                Ok(())
            })
        }
    };
    Ok(Prepared { step })
}

fn classifier_step(
    net: &dyn Backbone,
    params: &ParamSet,
    adam: &mut Adam,
    x: &Tensor,
    y: &Tensor,
) -> Result<()> {
    let p = params.values();
    let logits = head::linear_logits(net, &p, x, BnMode::Batch(None))?;
    let loss = ops::cross_entropy(&logits, y)?;
    let grads = loss.backward()?;
    adam.step(&grads, 1e-3)
}

/// One training step of a learner: its episode loss, backpropagated, and an Adam step.
fn learner_step(
    params: &ParamSet,
    adam_config: AdamConfig,
    mut episode_loss: impl FnMut() -> Result<EpisodeOutput> + 'static,
) -> Result<Box<dyn FnMut() -> Result<()>>> {
    let mut adam = Adam::new(params, adam_config)?;
    Ok(Box::new(move || {
        let out = episode_loss()?;
        let grads = out.loss.backward()?;
        adam.step(&grads, 1e-3)
    }))
}

/// Wall-clock milliseconds of `reps` steps after `warmup` untimed ones.
pub fn time(prepared: &mut Prepared, warmup: usize, reps: usize) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        prepared.step()?;
    }
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        prepared.step()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

/// The median of `samples` (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}
