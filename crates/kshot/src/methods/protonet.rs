//! Prototypical Networks (Snell, Swersky & Zemel 2017): each class is the mean of its support
//! embeddings, and a query is classified by a softmax over negative distances to the prototypes.

use candle_core::{Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    class_means_matrix, Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset,
    SharedFlags, State, StepCtx, StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::kernels;
use crate::nn::{ops, Backbone, BackboneConfig, BnMode, Conv4Config, Params};
use crate::protocol::{DataConfig, EarlyStopping, Protocol, ValMetric, Validation};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Distance {
    /// Squared Euclidean distance (the paper's choice).
    #[default]
    Euclidean,
    /// Cosine similarity, scaled by `cosine_scale` to sharpen the softmax.
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProtoNetConfig {
    pub distance: Distance,
    /// Logits are `cosine_scale · cos(q, c)` under the cosine distance.
    pub cosine_scale: f64,
}

impl Default for ProtoNetConfig {
    fn default() -> Self {
        Self { distance: Distance::Euclidean, cosine_scale: 10.0 }
    }
}

pub struct ProtoNet {
    pub config: ProtoNetConfig,
    backbone: Box<dyn Backbone>,
    state: State,
}

impl ProtoNet {
    pub fn new(
        config: ProtoNetConfig,
        backbone: &BackboneConfig,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let backbone = backbone.build();
        let state = State::new(backbone.init(rng, device)?, backbone.running_stats());
        Ok(Self { config, backbone, state })
    }

    /// [ways, D] class means of the support embeddings.
    pub fn prototypes(embeddings: &Tensor, labels: &[u32], ways: usize) -> Result<Tensor> {
        class_means_matrix(labels, ways, embeddings.device())?.matmul(embeddings)
    }

    /// [M, ways] logits of query embeddings against prototypes.
    pub fn logits(&self, query: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
        match self.config.distance {
            Distance::Euclidean => kernels::squared_euclidean(query, prototypes)?.neg(),
            Distance::Cosine => {
                ops::cosine_similarity(query, prototypes, 1e-8)? * self.config.cosine_scale
            }
        }
    }

    /// The query loss of one training episode, differentiable with respect to the parameters;
    /// folds the batch statistics into the running averages.
    ///
    /// With a backbone that has an explicit backward pass, the backbone's gradient comes from it
    /// and reaches the trainer through a surrogate loss; candle's backward pass only covers the
    /// distances and the softmax.
    pub fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        let Some(explicit) = self.backbone.explicit_backward() else {
            let params = self.state.params.values();
            let bn = BnMode::Batch(Some(&mut self.state.running));
            let emb = self.backbone.forward(&params, &images, bn)?;
            return self.embedding_loss(&emb, episode);
        };
        let params = self.state.params.detached_values();
        let tape = explicit.forward_taped(&params, &images, Some(&mut self.state.running))?;
        let emb = Var::from_tensor(tape.embedding())?;
        let out = self.embedding_loss(emb.as_tensor(), episode)?;
        let d_emb = out.loss.backward()?.get(emb.as_tensor()).cloned().ok_or_else(|| {
            candle_core::Error::Msg("the ProtoNet loss does not depend on the embeddings".into())
        })?;
        let grads = tape.backward(&params, &d_emb)?;
        let value = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.state.params, &grads, value)?,
            accuracy: out.accuracy,
        })
    }
    /// The episode's query loss and accuracy given the embeddings of its support then query images.
    fn embedding_loss(&self, emb: &Tensor, episode: &Episode) -> Result<EpisodeOutput> {
        let n_support = episode.support_labels.len();
        let support = emb.narrow(0, 0, n_support)?;
        let query = emb.narrow(0, n_support, emb.dim(0)? - n_support)?;
        let prototypes = Self::prototypes(&support, &episode.support_labels, episode.spec.ways)?;
        let logits = self.logits(&query, &prototypes)?;
        let labels = episode.query_labels_tensor()?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        let accuracy = ops::accuracy(&logits, &labels)?;
        Ok(EpisodeOutput { loss, accuracy })
    }
}

struct Prototypes<'a> {
    net: &'a ProtoNet,
    params: Params,
    prototypes: Tensor,
}

impl Classifier for Prototypes<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let bn = BnMode::Running(&self.net.state.running);
        let q = self.net.backbone.forward(&self.params, query, bn)?;
        self.net.logits(&q, &self.prototypes)
    }
}

impl Learner for ProtoNet {
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
        let params = self.state.params.detached_values();
        let emb = self.backbone.forward(&params, support, BnMode::Running(&self.state.running))?;
        let prototypes = Self::prototypes(&emb, labels, ways)?;
        Ok(Box::new(Prototypes { net: self, params, prototypes }))
    }

    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        super::episodic_step(ctx, |episodes| {
            super::mean_episode_loss(episodes, |ep| self.episode_loss(ep))
        })
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

/// `kshot train` flags of Prototypical Networks.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProtoNetFlags {
    /// ProtoNet: distance between query embeddings and prototypes.
    #[arg(long, value_enum)]
    pub distance: Option<Distance>,
}

impl Method for ProtoNetConfig {
    const NAMES: &'static [&'static str] = &["protonet"];
    type Flags = ProtoNetFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "protonet"
    }

    fn apply(&mut self, flags: &ProtoNetFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        if let Some(d) = flags.distance {
            self.distance = d;
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        Ok(Box::new(ProtoNet::new(*self, &protocol.backbone, rng, device)?))
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "protonet-omniglot-1shot",
                summary: "Snell et al. 2017, Omniglot (Vinyals split): train 60-way 1-shot 5-query, Adam 1e-3 halved every 2000 episodes; test 5-way 1-shot 15-query, 1000 episodes",
                build: || omniglot(1),
            },
            Preset {
                name: "protonet-omniglot-5shot",
                summary: "Snell et al. 2017, Omniglot (Vinyals split): train 60-way 5-shot 5-query, Adam 1e-3 halved every 2000 episodes; test 5-way 5-shot 15-query, 1000 episodes",
                build: || omniglot(5),
            },
            Preset {
                name: "protonet-omniglot-1shot-official",
                summary: OFFICIAL_1SHOT,
                build: || omniglot_official(1),
            },
            Preset {
                name: "protonet-omniglot-5shot-official",
                summary: OFFICIAL_5SHOT,
                build: || omniglot_official(5),
            },
            Preset {
                name: "protonet-miniimagenet-1shot",
                summary: "Snell et al. 2017, miniImageNet (Ravi split), 84×84: Conv4 64 filters (1600-d), train 30-way 1-shot 15-query, Adam 1e-3 halved every 2000 episodes; test 5-way 1-shot 15-query, 600 episodes",
                build: || mini_imagenet(1),
            },
            Preset {
                name: "protonet-miniimagenet-5shot",
                summary: "Snell et al. 2017, miniImageNet (Ravi split), 84×84: Conv4 64 filters (1600-d), train 20-way 5-shot 15-query, Adam 1e-3 halved every 2000 episodes; test 5-way 5-shot 15-query, 600 episodes",
                build: || mini_imagenet(5),
            },
        ]
    }
}

fn omniglot(shots: usize) -> (Protocol, MethodConfig) {
    (Protocol::omniglot(shots), MethodConfig::ProtoNet(ProtoNetConfig::default()))
}

macro_rules! official_summary {
    ($shots:literal) => {
        concat!(
            "Snell et al. 2017, the authors' full procedure (jakesnell/prototypical-networks), stage 1 of 2, run_train.py: Omniglot Vinyals train (4112 classes), 60-way ",
            $shots,
            "-shot 5-query, epochs of 100 episodes (at most 10 000); after every epoch 100 validation episodes 5-way ",
            $shots,
            "-shot 15-query on val (688 classes); early stopping on validation loss, patience 200 epochs, best model kept; Adam 1e-3 halved every 20 epochs, stepped at epoch start (first at episode 1900). ",
            "Stage 2 (run_trainval.py): `kshot train --retrain-trainval RUN --out RUN2` retrains on trainval (4800 classes) for best epoch + 200 epochs without validation; score RUN2. ",
            "Departures: area-average gray 28x28 pixels, rotated after resizing (official: NEAREST binary, rotated at 105x105, transposed); the same 100 validation episodes every epoch (official: fresh ones); kshot's seeds, not torch.manual_seed(1234)"
        )
    };
}
const OFFICIAL_1SHOT: &str = official_summary!("1");
const OFFICIAL_5SHOT: &str = official_summary!("5");

/// Stage 1 of prototypical-networks' Omniglot procedure (`scripts/train/few_shot/run_train.py`,
/// `protonets/engine.py`, `train.py`): the published protocol, trained in epochs of 100 episodes
/// with 100 validation episodes after each, early stopping on validation loss with patience 200
/// epochs, StepLR(20 epochs, 0.5) stepped at the start of every epoch, at most 10 000 epochs.
/// Stage 2 is [`crate::train::retrain_config`].
fn omniglot_official(shots: usize) -> (Protocol, MethodConfig) {
    const EPOCH: u64 = 100;
    let mut p = Protocol::omniglot(shots);
    p.episodes = 10_000 * EPOCH;
    p.schedule.step = 20 * EPOCH;
    p.lr_offset = EPOCH;
    p.checkpoint_every = 5 * EPOCH;
    p.validation = Some(Validation {
        early_stopping: Some(EarlyStopping { metric: ValMetric::Loss, patience: 200 }),
        ..Validation::new(EpisodeSpec::new(5, shots, 15), 100, EPOCH)
    });
    (p, MethodConfig::ProtoNet(ProtoNetConfig::default()))
}

/// Snell et al. 2017, Section 3.2: Conv4 with 64 filters (1600-d embeddings at 84×84), 30-way
/// episodes for 1-shot and 20-way for 5-shot, 15 queries per class, train shot = test shot; 600
/// test episodes of 5-way 15-query.
fn mini_imagenet(shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data = DataConfig::mini_imagenet();
    p.backbone = BackboneConfig::Conv4(Conv4Config::new(3));
    p.train = EpisodeSpec::new(if shots == 1 { 30 } else { 20 }, shots, 15);
    p.validation = Some(Validation::new(EpisodeSpec::new(5, shots, 15), 200, 1000));
    p.test = EpisodeSpec::new(5, shots, 15);
    p.test_episodes = 600;
    p.checkpoint_every = 100;
    (p, MethodConfig::ProtoNet(ProtoNetConfig::default()))
}
