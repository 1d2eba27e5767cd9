//! Prototypical Networks (Snell, Swersky & Zemel 2017): each class is the mean of its support
//! embeddings, and a query is classified by a softmax over negative distances to the prototypes.

use candle_core::{Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{class_means_matrix, Classifier, EpisodeOutput, Learner};
use crate::data::Episode;
use crate::kernels;
use crate::nn::{ops, BnMode, Conv4, Conv4Config, ParamSet, Params, RunningStats, Tape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    backbone: Conv4,
    params: ParamSet,
    running: RunningStats,
}

impl ProtoNet {
    pub fn new(
        config: ProtoNetConfig,
        backbone: Conv4Config,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let backbone = Conv4::new(backbone);
        let params = backbone.init(rng, device)?;
        let running = backbone.running_stats();
        Ok(Self { config, backbone, params, running })
    }

    /// [ways, D] class means of the support embeddings.
    pub fn prototypes(embeddings: &Tensor, labels: &[u32], ways: usize) -> Result<Tensor> {
        class_means_matrix(labels, ways, embeddings.device())?.matmul(embeddings)
    }

    /// [M, ways] logits of query embeddings against prototypes.
    pub fn logits(&self, query: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
        match self.config.distance {
            Distance::Euclidean if self.backbone.config.fast_kernels => {
                kernels::squared_euclidean(query, prototypes)?.neg()
            }
            Distance::Euclidean => ops::squared_euclidean(query, prototypes)?.neg(),
            Distance::Cosine => {
                ops::cosine_similarity(query, prototypes, 1e-8)? * self.config.cosine_scale
            }
        }
    }
}

impl ProtoNet {
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
        let q =
            self.net.backbone.forward(&self.params, query, BnMode::Running(&self.net.running))?;
        self.net.logits(&q, &self.prototypes)
    }
}

impl Learner for ProtoNet {
    fn method(&self) -> &'static str {
        "protonet"
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
        let params = self.params.detached_values();
        let emb = self.backbone.forward(&params, support, BnMode::Running(&self.running))?;
        let prototypes = Self::prototypes(&emb, labels, ways)?;
        Ok(Box::new(Prototypes { net: self, params, prototypes }))
    }

    /// With the fused kernels, the backbone's gradient comes from its explicit backward pass
    /// ([`Conv4::forward_taped`]) and reaches the trainer through a surrogate loss; candle's
    /// backward pass only covers the distances and the softmax.
    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        if !self.backbone.config.fast_kernels {
            let params = self.params.values();
            let emb =
                self.backbone.forward(&params, &images, BnMode::Batch(Some(&mut self.running)))?;
            return self.embedding_loss(&emb, episode);
        }
        let params = self.params.detached_values();
        let tape = self.backbone.forward_taped(&params, &images, Some(&mut self.running))?;
        let emb = Var::from_tensor(&tape.embedding)?;
        let out = self.embedding_loss(emb.as_tensor(), episode)?;
        let d_emb = out.loss.backward()?.get(emb.as_tensor()).cloned().ok_or_else(|| {
            candle_core::Error::Msg("the ProtoNet loss does not depend on the embeddings".into())
        })?;
        let grads = tape.backward(&params, &d_emb)?;
        let value = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok(EpisodeOutput {
            loss: super::surrogate_loss(&self.params, &grads, value)?,
            accuracy: out.accuracy,
        })
    }

    fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        self.running.named_tensors("")
    }

    fn load_buffers(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        self.running.load_from(tensors, "", origin)
    }
}
