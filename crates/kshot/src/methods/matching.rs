//! Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016).
//!
//! A query x̂ is labelled by attention over the support set: P(y | x̂, S) = Σᵢ a(x̂, xᵢ) yᵢ with
//! a(x̂, xᵢ) = softmax over i of c(f(x̂), g(xᵢ)), c the cosine similarity (times `attention_scale`,
//! 1 in the paper). The logits are log P(y | x̂, S), so cross-entropy on them is the paper's loss.
//!
//! f and g are one Conv4 embedding (shared, as for Omniglot in the paper). With full-context
//! embeddings (`fce`), g(xᵢ, S) = h→ᵢ + h←ᵢ + g'(xᵢ) is a bidirectional LSTM over the support
//! embeddings in support order, and f(x̂, S) is the attention LSTM unrolled for `fce_steps` steps:
//! ĥₖ, cₖ = LSTM(f'(x̂), [hₖ₋₁, rₖ₋₁], cₖ₋₁); hₖ = ĥₖ + f'(x̂); rₖ = Σᵢ softmax(hₖᵀ g(xᵢ)) g(xᵢ);
//! f = h_K, starting from h₀ = r₀ = c₀ = 0.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Classifier, EpisodeOutput, Learner};
use crate::data::Episode;
use crate::nn::{ops, BnMode, Conv4, Conv4Config, LstmCell, ParamSet, Params, RunningStats};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MatchingConfig {
    /// Full-context embeddings (bidirectional LSTM over the support, attention LSTM for queries).
    pub fce: bool,
    /// Read steps K of the attention LSTM.
    pub fce_steps: usize,
    /// Multiplies the cosine similarities before the attention softmax (the paper: 1).
    pub attention_scale: f64,
}

impl Default for MatchingConfig {
    fn default() -> Self {
        Self { fce: false, fce_steps: 3, attention_scale: 1.0 }
    }
}

pub struct MatchingNet {
    pub config: MatchingConfig,
    backbone: Conv4,
    params: ParamSet,
    running: RunningStats,
    dim: usize,
    g_cell: LstmCell,
    f_cell: LstmCell,
}

impl MatchingNet {
    /// `image_size`: side of the (square) inputs, which fixes the embedding width the LSTMs take.
    pub fn new(
        config: MatchingConfig,
        backbone: Conv4Config,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.fce && config.fce_steps == 0 {
            candle_core::bail!("matching networks: --fce-steps must be at least 1");
        }
        let dim = backbone.embedding_dim(image_size, image_size);
        let backbone = Conv4::new(backbone);
        let mut params = backbone.init(rng, device)?;
        let g_cell = LstmCell::new(dim, dim, dim);
        let f_cell = LstmCell::new(dim, 2 * dim, dim);
        if config.fce {
            g_cell.init("fce.g_fwd", &mut params, rng, device)?;
            g_cell.init("fce.g_bwd", &mut params, rng, device)?;
            f_cell.init("fce.f", &mut params, rng, device)?;
        }
        let running = backbone.running_stats();
        Ok(Self { config, backbone, params, running, dim, g_cell, f_cell })
    }

    /// g(xᵢ, S) for support embeddings `g` [n, D] (the identity without FCE).
    fn support_context(&self, params: &Params, g: &Tensor) -> Result<Tensor> {
        if !self.config.fce {
            return Ok(g.clone());
        }
        let n = g.dim(0)?;
        let zeros = Tensor::zeros((1, self.dim), g.dtype(), g.device())?;
        let run = |prefix: &str, order: Vec<usize>| -> Result<Vec<Tensor>> {
            let (mut h, mut c) = (zeros.clone(), zeros.clone());
            let mut out = vec![zeros.clone(); n];
            for i in order {
                (h, c) = self.g_cell.forward(params, prefix, &g.narrow(0, i, 1)?, &h, &c)?;
                out[i] = h.clone();
            }
            Ok(out)
        };
        let fwd = Tensor::cat(&run("fce.g_fwd", (0..n).collect())?, 0)?;
        let bwd = Tensor::cat(&run("fce.g_bwd", (0..n).rev().collect())?, 0)?;
        (g + fwd)? + bwd
    }

    /// f(x̂, S) for query embeddings `f` [M, D] against context support embeddings `g` [n, D].
    fn query_context(&self, params: &Params, f: &Tensor, g: &Tensor) -> Result<Tensor> {
        if !self.config.fce {
            return Ok(f.clone());
        }
        let mut h = f.zeros_like()?;
        let mut c = f.zeros_like()?;
        for _ in 0..self.config.fce_steps {
            let attention = ops::log_softmax(&h.matmul(&g.t()?)?)?.exp()?;
            let r = attention.matmul(g)?;
            let state = Tensor::cat(&[&h, &r], 1)?;
            let (h_hat, c_next) = self.f_cell.forward(params, "fce.f", f, &state, &c)?;
            h = (h_hat + f)?;
            c = c_next;
        }
        Ok(h)
    }

    /// [M, ways] logits log P(y | x̂, S) from query embeddings `f` [M, D], context support
    /// embeddings `g` [n, D] and the support labels.
    fn logits(&self, f: &Tensor, g: &Tensor, labels: &[u32], ways: usize) -> Result<Tensor> {
        let sims = (ops::cosine_similarity(f, g, 1e-8)? * self.config.attention_scale)?;
        let attention = ops::log_softmax(&sims)?.exp()?;
        let probs = attention.matmul(&ops::one_hot(labels, ways, f.device())?)?;
        (probs + 1e-12)?.log()
    }

    fn classify(
        &self,
        params: &Params,
        support: &Tensor,
        query: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Tensor> {
        let g = self.support_context(params, support)?;
        let f = self.query_context(params, query, &g)?;
        self.logits(&f, &g, labels, ways)
    }
}

struct Matcher<'a> {
    net: &'a MatchingNet,
    params: Params,
    support: Tensor,
    labels: Vec<u32>,
    ways: usize,
}

impl Classifier for Matcher<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let q =
            self.net.backbone.forward(&self.params, query, BnMode::Running(&self.net.running))?;
        self.net.classify(&self.params, &self.support, &q, &self.labels, self.ways)
    }
}

impl Learner for MatchingNet {
    fn method(&self) -> &'static str {
        "matching"
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
        let support = self.backbone.forward(&params, support, BnMode::Running(&self.running))?;
        Ok(Box::new(Matcher { net: self, params, support, labels: labels.to_vec(), ways }))
    }

    fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let n_support = episode.support_labels.len();
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        let params = self.params.values();
        let emb =
            self.backbone.forward(&params, &images, BnMode::Batch(Some(&mut self.running)))?;
        let support = emb.narrow(0, 0, n_support)?;
        let query = emb.narrow(0, n_support, emb.dim(0)? - n_support)?;
        let logits =
            self.classify(&params, &support, &query, &episode.support_labels, episode.spec.ways)?;
        let labels = episode.query_labels_tensor()?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        let accuracy = ops::accuracy(&logits, &labels)?;
        Ok(EpisodeOutput { loss, accuracy })
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
