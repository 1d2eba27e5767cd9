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

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::nn::{ops, Backbone, BackboneConfig, BnMode, LstmCell, Params};
use crate::optim::StepDecay;
use crate::protocol::Protocol;

/// What every Omniglot preset of Matching Networks states about its protocol.
macro_rules! matching_protocol {
    () => {
        "Adam 1e-3 halved every 2000 updates, 32 episodes per update (meta-batch), no gradient clipping and no plateau decay (as both reference implementations, gitabcworld and AntreasAntoniou; the original code is not public), 20 000 updates (the references run 200-500 epochs of 1000, by when the halving has made the rate negligible); Conv4 64, cosine attention (scale 1), no FCE (--fce adds it); Vinyals split, 15 queries per class; test 1000 tasks of the same setting. Departs: Vinyals split (the references split characters at random), no weight decay (gitabcworld 1e-4), Adam kept across epochs (gitabcworld re-creates it), 15 queries per class (references: 1 or K per episode)"
    };
}

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
    backbone: Box<dyn Backbone>,
    state: State,
    dim: usize,
    g_cell: LstmCell,
    f_cell: LstmCell,
}

impl MatchingNet {
    /// `image_size`: side of the (square) inputs, which fixes the embedding width the LSTMs take.
    pub fn new(
        config: MatchingConfig,
        backbone: &BackboneConfig,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        if config.fce && config.fce_steps == 0 {
            candle_core::bail!("matching networks: --fce-steps must be at least 1");
        }
        let backbone = backbone.build();
        let dim = backbone.embedding_dim(image_size, image_size)?;
        let mut params = backbone.init(rng, device)?;
        let g_cell = LstmCell::new(dim, dim, dim);
        let f_cell = LstmCell::new(dim, 2 * dim, dim);
        if config.fce {
            g_cell.init("fce.g_fwd", &mut params, rng, device)?;
            g_cell.init("fce.g_bwd", &mut params, rng, device)?;
            f_cell.init("fce.f", &mut params, rng, device)?;
        }
        let state = State::new(params, backbone.running_stats());
        Ok(Self { config, backbone, state, dim, g_cell, f_cell })
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
        let bn = BnMode::Running(&self.net.state.running);
        let q = self.net.backbone.forward(&self.params, query, bn)?;
        self.net.classify(&self.params, &self.support, &q, &self.labels, self.ways)
    }
}

impl MatchingNet {
    /// The query loss of one training episode; folds the batch statistics into the running
    /// averages.
    pub fn episode_loss(&mut self, episode: &Episode) -> Result<EpisodeOutput> {
        let n_support = episode.support_labels.len();
        let images = Tensor::cat(&[&episode.support, &episode.query], 0)?;
        let params = self.state.params.values();
        let bn = BnMode::Batch(Some(&mut self.state.running));
        let emb = self.backbone.forward(&params, &images, bn)?;
        let support = emb.narrow(0, 0, n_support)?;
        let query = emb.narrow(0, n_support, emb.dim(0)? - n_support)?;
        let logits =
            self.classify(&params, &support, &query, &episode.support_labels, episode.spec.ways)?;
        let labels = episode.query_labels_tensor()?;
        let loss = ops::cross_entropy(&logits, &labels)?;
        let accuracy = ops::accuracy(&logits, &labels)?;
        Ok(EpisodeOutput { loss, accuracy })
    }
}

impl Learner for MatchingNet {
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
        let bn = BnMode::Running(&self.state.running);
        let support = self.backbone.forward(&params, support, bn)?;
        Ok(Box::new(Matcher { net: self, params, support, labels: labels.to_vec(), ways }))
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

/// `kshot train` flags of Matching Networks.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MatchingFlags {
    /// Matching Networks: full-context embeddings (biLSTM over the support, attention LSTM for queries).
    #[arg(long)]
    pub fce: bool,
    /// Matching Networks: read steps of the attention LSTM (with --fce).
    #[arg(long)]
    pub fce_steps: Option<usize>,
    /// Matching Networks: multiply cosine similarities by this before the attention softmax (paper: 1).
    #[arg(long)]
    pub attention_scale: Option<f64>,
}

impl Method for MatchingConfig {
    const NAMES: &'static [&'static str] = &["matching"];
    type Flags = MatchingFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "matching"
    }

    fn apply(&mut self, flags: &MatchingFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        self.fce |= flags.fce;
        self.fce_steps = flags.fce_steps.unwrap_or(self.fce_steps);
        self.attention_scale = flags.attention_scale.unwrap_or(self.attention_scale);
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        let size = protocol.data.image_size;
        Ok(Box::new(MatchingNet::new(*self, &protocol.backbone, size, rng, device)?))
    }

    /// One model per Omniglot setting, trained on that setting (Vinyals et al. 2016).
    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "matching-omniglot-5way-1shot",
                summary: concat!("Vinyals et al. 2016 Matching Networks, Omniglot 5-way 1-shot, trained on 5-way 1-shot: ", matching_protocol!()),
                build: || omniglot(5, 1),
            },
            Preset {
                name: "matching-omniglot-5way-5shot",
                summary: concat!("Vinyals et al. 2016 Matching Networks, Omniglot 5-way 5-shot, trained on 5-way 5-shot: ", matching_protocol!()),
                build: || omniglot(5, 5),
            },
            Preset {
                name: "matching-omniglot-20way-1shot",
                summary: concat!("Vinyals et al. 2016 Matching Networks, Omniglot 20-way 1-shot, trained on 20-way 1-shot: ", matching_protocol!()),
                build: || omniglot(20, 1),
            },
            Preset {
                name: "matching-omniglot-20way-5shot",
                summary: concat!("Vinyals et al. 2016 Matching Networks, Omniglot 20-way 5-shot, trained on 20-way 5-shot: ", matching_protocol!()),
                build: || omniglot(20, 5),
            },
        ]
    }
}

/// Episodes per update in both reference implementations.
pub const REFERENCE_META_BATCH: usize = 32;

fn omniglot(ways: usize, shots: usize) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.train = EpisodeSpec::new(ways, shots, 15);
    p.test = EpisodeSpec::new(ways, shots, 15);
    p.meta_batch = REFERENCE_META_BATCH;
    p.episodes = 20_000;
    p.schedule = StepDecay { lr: 1e-3, step: 2000, gamma: 0.5 };
    if let Some(v) = &mut p.validation {
        v.spec = p.test;
    }
    (p, MethodConfig::Matching(MatchingConfig::default()))
}
