//! Graph neural networks for few-shot learning (Garcia & Bruna, ICLR 2018), as in the official
//! code (vgsatorras/few-shot-gnn, `models/gnn_iclr.py`).
//!
//! Each query is a graph: node 0 is the query, then the support images, then any unlabelled
//! support images. A node's features are its embedding and its label as a one-hot vector; the
//! query and unlabelled nodes get zeros there, as in the code (the paper says a uniform vector;
//! `--unknown-label uniform`). Each layer learns an adjacency from an MLP of 1×1 convolutions
//! (batch norm, LeakyReLU) on |x_i − x_j|, masks the diagonal and takes a row softmax, then a
//! graph convolution over {I, Ã} appends new features (dense connections). A last adjacency and
//! graph convolution give the query node's N-way logits, trained by cross-entropy.
//!
//! Training batches many graphs through one computation: the step's episodes each contribute one
//! query (one of its classes, drawn uniformly, as the code's `positive_class`), and all images of
//! the batch go through the embedding network together. `--train-graphs every-query` instead
//! makes a graph of every query of an episode, all sharing its embedded support nodes.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    Classifier, EpisodeOutput, Learner, Method, MethodConfig, Preset, SharedFlags, State, StepCtx,
    StepOutput,
};
use crate::data::{Episode, EpisodeSpec};
use crate::kernels;
use crate::nn::{
    init, ops, Backbone, BackboneConfig, BnMode, GnnEmbeddingConfig, ParamSet, Params,
    RunningStats,
};
use crate::optim::StepDecay;
use crate::protocol::{DataConfig, Protocol, Validation};

/// The label features of nodes whose label is not given (the query, unlabelled support images).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownLabel {
    /// All zeros (the official code's `zero_pad`).
    #[default]
    Zero,
    /// 1/N in every class (the paper's uniform distribution over the simplex).
    Uniform,
}

/// Which queries of a training episode become graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TrainGraphs {
    /// One graph per episode, its query one of the episode's queries drawn uniformly (the code's
    /// `positive_class`).
    #[default]
    OneQuery,
    /// A graph for every query of the episode, all sharing the episode's embedded support nodes:
    /// more graphs per embedded image (kshot's option, not the code's).
    EveryQuery,
}

/// How wide an adjacency MLP is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdjacencyWidth {
    /// As wide as the node features it reads (`GNN_nl_omniglot`); the last adjacency is as wide
    /// as the last hidden layer's input.
    Input,
    /// A fixed width (`GNN_nl`, miniImageNet: 96).
    Fixed(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GnnConfig {
    /// Classes per task: the width of the output layer (the code asserts train ways = test ways).
    pub ways: usize,
    /// Features each hidden graph convolution adds: nf / 2 with the code's nf = 96.
    pub growth: usize,
    /// Hidden GNN layers (2 in the code).
    pub layers: usize,
    pub adjacency_width: AdjacencyWidth,
    /// Widths of the adjacency MLP's four hidden 1×1 convolutions, as multiples of its width
    /// (Omniglot [2, 1.5, 1, 1], miniImageNet [2, 2, 1, 1]).
    pub adjacency_ratios: [f64; 4],
    /// Dropout after the first layer of the last adjacency MLP (Omniglot 0.3, miniImageNet 0).
    pub last_adjacency_dropout: f64,
    /// Batch norm on the output graph convolution (Omniglot yes, miniImageNet no).
    pub output_bn: bool,
    pub unknown_label: UnknownLabel,
    /// Older runs' configs lack it: one query per episode, as they were trained.
    #[serde(default)]
    pub train_graphs: TrainGraphs,
    /// Negative slope of the GNN's LeakyReLUs (PyTorch's default 0.01).
    pub leak: f64,
    pub bn_eps: f64,
    pub bn_momentum: f64,
}

impl GnnConfig {
    /// `GNN_nl_omniglot`.
    pub fn omniglot(ways: usize) -> Self {
        Self {
            ways,
            growth: 48,
            layers: 2,
            adjacency_width: AdjacencyWidth::Input,
            adjacency_ratios: [2.0, 1.5, 1.0, 1.0],
            last_adjacency_dropout: 0.3,
            output_bn: true,
            unknown_label: UnknownLabel::Zero,
            train_graphs: TrainGraphs::OneQuery,
            leak: 0.01,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
        }
    }

    /// `GNN_nl` (miniImageNet).
    pub fn mini_imagenet(ways: usize) -> Self {
        Self {
            adjacency_width: AdjacencyWidth::Fixed(96),
            adjacency_ratios: [2.0, 2.0, 1.0, 1.0],
            last_adjacency_dropout: 0.0,
            output_bn: false,
            ..Self::omniglot(ways)
        }
    }
}

impl Default for GnnConfig {
    fn default() -> Self {
        Self::omniglot(5)
    }
}

/// One adjacency MLP's layer widths: four hidden 1×1 convolutions, then one to a scalar.
fn adjacency_widths(width: usize, ratios: &[f64; 4]) -> [usize; 4] {
    ratios.map(|r| (width as f64 * r) as usize)
}

/// The parameter prefix, input width and MLP width of every adjacency, and the input and output
/// width of every graph convolution, for node features of width `input`.
struct Layout {
    /// (prefix, node features, MLP width)
    adjacencies: Vec<(String, usize, usize)>,
    /// (prefix, node features, output features, batch norm)
    convolutions: Vec<(String, usize, usize, bool)>,
}

impl Layout {
    fn new(c: &GnnConfig, input: usize) -> Self {
        let width = |features: usize, last: bool| match c.adjacency_width {
            AdjacencyWidth::Fixed(w) => w,
            AdjacencyWidth::Input if last => input + c.growth * (c.layers.max(1) - 1),
            AdjacencyWidth::Input => features,
        };
        let mut adjacencies = Vec::new();
        let mut convolutions = Vec::new();
        for i in 0..c.layers {
            let features = input + c.growth * i;
            adjacencies.push((format!("gnn.adj{i}"), features, width(features, false)));
            convolutions.push((format!("gnn.conv{i}"), features, c.growth, true));
        }
        let features = input + c.growth * c.layers;
        adjacencies.push(("gnn.adj_out".into(), features, width(features, true)));
        convolutions.push(("gnn.conv_out".into(), features, c.ways, c.output_bn));
        Self { adjacencies, convolutions }
    }

    /// Batch-norm layers in running-statistics order: each adjacency's four, then each graph
    /// convolution's.
    fn batch_norms(&self, c: &GnnConfig) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for (prefix, _, width) in &self.adjacencies {
            for (k, w) in adjacency_widths(*width, &c.adjacency_ratios).into_iter().enumerate() {
                out.push((format!("{prefix}.bn{k}"), w));
            }
        }
        for (prefix, _, width, bn) in &self.convolutions {
            if *bn {
                out.push((format!("{prefix}.bn"), *width));
            }
        }
        out
    }
}

/// The graph network over node features, given its parameters (a prefix of `gnn.` names).
pub struct GraphNet {
    pub config: GnnConfig,
    layout: Layout,
    /// The GNN's batch-norm layers (name, width), in running-statistics order.
    batch_norms: Vec<(String, usize)>,
    /// Index of the first GNN batch norm in the learner's running statistics.
    bn_offset: usize,
}

/// Batch statistics, folded into running statistics when given; or fixed running statistics.
/// Dropout is drawn from the generator in training.
pub struct GraphMode<'a> {
    pub bn: BnMode<'a>,
    pub dropout: Option<&'a mut ChaCha8Rng>,
}

impl GraphNet {
    /// The network for node features of width `input` (embedding + ways).
    pub fn new(config: GnnConfig, input: usize, bn_offset: usize) -> Self {
        let layout = Layout::new(&config, input);
        let batch_norms = layout.batch_norms(&config);
        Self { config, layout, batch_norms, bn_offset }
    }

    pub fn batch_norm_layers(&self) -> Vec<(String, usize)> {
        self.batch_norms.clone()
    }

    /// Appends the GNN's parameters to `p`: PyTorch's defaults (U(±1/√fan_in) weights and biases
    /// of every convolution and linear layer), batch norm γ = 1, β = 0.
    pub fn init(&self, p: &mut ParamSet, rng: &mut ChaCha8Rng, device: &Device) -> Result<()> {
        let c = &self.config;
        let mut linear = |p: &mut ParamSet, name: &str, cin: usize, cout: usize| -> Result<()> {
            p.push(format!("{name}.weight"), init::torch_default(rng, &[cout, cin], cin, device)?)?;
            p.push(format!("{name}.bias"), init::torch_default(rng, &[cout], cin, device)?)
        };
        let bn = |p: &mut ParamSet, name: String, width: usize| -> Result<()> {
            p.push(format!("{name}.weight"), Tensor::ones(width, DType::F32, device)?)?;
            p.push(format!("{name}.bias"), Tensor::zeros(width, DType::F32, device)?)
        };
        for (prefix, features, width) in &self.layout.adjacencies {
            let mut cin = *features;
            for (k, w) in adjacency_widths(*width, &c.adjacency_ratios).into_iter().enumerate() {
                linear(p, &format!("{prefix}.fc{k}"), cin, w)?;
                bn(p, format!("{prefix}.bn{k}"), w)?;
                cin = w;
            }
            linear(p, &format!("{prefix}.fc_out"), cin, 1)?;
        }
        for (prefix, features, width, has_bn) in &self.layout.convolutions {
            linear(p, &format!("{prefix}.fc"), 2 * features, *width)?;
            if *has_bn {
                bn(p, format!("{prefix}.bn"), *width)?;
            }
        }
        Ok(())
    }

    /// Batch norm over the columns of `x` [R, C], then a LeakyReLU (`leak` 1: none).
    fn bn_leaky(
        &self,
        x: &Tensor,
        params: &Params,
        name: &str,
        mode: &mut GraphMode,
        leak: f64,
    ) -> Result<Tensor> {
        let (rows, width) = x.dims2()?;
        let layer = self.bn_offset
            + self
                .batch_norms
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no batch norm `{name}`")))?;
        let gamma = params.get(&format!("{name}.weight"))?;
        let beta = params.get(&format!("{name}.bias"))?;
        let c = &self.config;
        let x = x.reshape((rows, width, 1, 1))?;
        let y = match &mut mode.bn {
            BnMode::Batch(running) => {
                let (y, stats) =
                    kernels::batch_norm_leaky_relu_train(&x, gamma, beta, c.bn_eps, leak)?;
                if let Some(r) = running.as_deref_mut() {
                    r.update(layer, &stats, c.bn_momentum);
                }
                y
            }
            BnMode::Running(r) => kernels::batch_norm_leaky_relu_fixed(
                &x,
                r.mean(layer),
                r.var(layer),
                gamma,
                beta,
                c.bn_eps,
                leak,
            )?,
        };
        y.reshape((rows, width))
    }

    /// The learned adjacency [B, n, n] of node features `x` [B, n, F]: an MLP on |x_i − x_j|, the
    /// diagonal masked, a softmax over each row.
    pub fn adjacency(
        &self,
        params: &Params,
        x: &Tensor,
        index: usize,
        mode: &mut GraphMode,
    ) -> Result<Tensor> {
        let (prefix, _, width) = &self.layout.adjacencies[index];
        let (b, n, f) = x.dims3()?;
        let dropout = if index == self.config.layers { self.config.last_adjacency_dropout } else { 0.0 };
        let pairs = x.unsqueeze(2)?.broadcast_sub(&x.unsqueeze(1)?)?.abs()?;
        let mut h = pairs.reshape((b * n * n, f))?;
        for k in 0..adjacency_widths(*width, &self.config.adjacency_ratios).len() {
            h = ops::linear(&h, params, &format!("{prefix}.fc{k}"))?;
            h = self.bn_leaky(&h, params, &format!("{prefix}.bn{k}"), mode, self.config.leak)?;
            if k == 0 {
                if let Some(rng) = mode.dropout.as_deref_mut() {
                    h = dropout_elements(&h, dropout, rng)?;
                }
            }
        }
        let scores = ops::linear(&h, params, &format!("{prefix}.fc_out"))?.reshape((b, n, n))?;
        let mask = (Tensor::eye(n, scores.dtype(), scores.device())? * 1e8)?;
        ops::softmax(&scores.broadcast_sub(&mask)?)
    }

    /// The graph convolution over {I, A}: linear([x ‖ A·x]) [B, n, out], batch norm when the
    /// layer has one, then a LeakyReLU with slope `leak` (1: none).
    pub fn graph_conv(
        &self,
        params: &Params,
        adjacency: &Tensor,
        x: &Tensor,
        index: usize,
        mode: &mut GraphMode,
        leak: f64,
    ) -> Result<Tensor> {
        let (prefix, _, width, has_bn) = &self.layout.convolutions[index];
        let (b, n, f) = x.dims3()?;
        let gathered = Tensor::cat(&[x, &adjacency.matmul(x)?], 2)?.reshape((b * n, 2 * f))?;
        let h = ops::linear(&gathered, params, &format!("{prefix}.fc"))?;
        let h = if *has_bn {
            self.bn_leaky(&h, params, &format!("{prefix}.bn"), mode, leak)?
        } else if leak != 1.0 {
            leaky_relu(&h, leak)?
        } else {
            h
        };
        h.reshape((b, n, *width))
    }

    /// Node features [B, n, F] → the first node's logits [B, ways].
    pub fn forward(&self, params: &Params, nodes: &Tensor, mode: &mut GraphMode) -> Result<Tensor> {
        let mut x = nodes.clone();
        for i in 0..self.config.layers {
            let a = self.adjacency(params, &x, i, mode)?;
            let new = self.graph_conv(params, &a, &x, i, mode, self.config.leak)?;
            x = Tensor::cat(&[&x, &new], 2)?;
        }
        let last = self.config.layers;
        let a = self.adjacency(params, &x, last, mode)?;
        let out = self.graph_conv(params, &a, &x, last, mode, 1.0)?;
        out.narrow(1, 0, 1)?.squeeze(1)
    }
}


fn leaky_relu(x: &Tensor, leak: f64) -> Result<Tensor> {
    (x.relu()? * (1.0 - leak))? + (x * leak)?
}


/// `Dropout(p)` in training: each element zeroed with probability `p`, the rest scaled by
/// 1/(1 − p).
fn dropout_elements(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> =
        (0..x.elem_count()).map(|_| if rng.random::<f64>() < p { 0.0 } else { keep }).collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

pub struct Gnn {
    pub config: GnnConfig,
    backbone: Box<dyn Backbone>,
    graph: GraphNet,
    state: State,
}

/// Graphs scored at once at test time are capped so that one adjacency activation stays near
/// this many elements.
const TEST_CHUNK_ELEMENTS: usize = 1 << 24;

impl Gnn {
    /// `image_size`: side of the (square) inputs, which fixes the embedding width.
    pub fn new(
        config: GnnConfig,
        backbone: &BackboneConfig,
        image_size: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let backbone = backbone.build();
        let dim = backbone.embedding_dim(image_size, image_size)?;
        let mut params = backbone.init(rng, device)?;
        let mut running = backbone.running_stats();
        let graph = GraphNet::new(config, dim + config.ways, running.layers.len());
        graph.init(&mut params, rng, device)?;
        let own = RunningStats::new(graph.batch_norm_layers());
        running.layers.extend(own.layers);
        Ok(Self { config, backbone, graph, state: State::new(params, running) })
    }

    pub fn graph(&self) -> &GraphNet {
        &self.graph
    }

    /// The label features [n, ways] of `labels`, and of `unknown` nodes without a label.
    fn label_features(&self, labels: &[u32], unknown: usize, device: &Device) -> Result<Tensor> {
        let ways = self.config.ways;
        let known = ops::one_hot(labels, ways, device)?;
        let fill = match self.config.unknown_label {
            UnknownLabel::Zero => 0.0,
            UnknownLabel::Uniform => 1.0 / ways as f64,
        };
        let unknown = (Tensor::ones((unknown, ways), DType::F32, device)? * fill)?;
        Tensor::cat(&[&known, &unknown], 0)
    }

    /// Node features [B, 1 + n, D + ways] of B graphs: each query's embedding (`queries` [B, D])
    /// then the shared nodes `others` [n, D + ways] (or [B, n, D + ways] when per graph).
    fn nodes(&self, queries: &Tensor, others: &Tensor) -> Result<Tensor> {
        let (b, _) = queries.dims2()?;
        let query_labels = self.label_features(&[], b, queries.device())?.to_dtype(queries.dtype())?;
        let q = Tensor::cat(&[queries, &query_labels], 1)?.unsqueeze(1)?;
        let others = match others.rank() {
            2 => {
                let (n, f) = others.dims2()?;
                others.unsqueeze(0)?.broadcast_as((b, n, f))?.contiguous()?
            }
            _ => others.clone(),
        };
        Tensor::cat(&[&q, &others], 1)
    }

    /// The query loss of one training batch: one graph per episode, its query one image of a
    /// class drawn uniformly from `rng` (or, with [`TrainGraphs::EveryQuery`], a graph for every
    /// query, each with its episode's support nodes).
    pub fn batch_loss(&mut self, episodes: &[Episode], rng: &mut ChaCha8Rng) -> Result<EpisodeOutput> {
        let Some(first) = episodes.first() else {
            candle_core::bail!("a training batch needs at least one episode")
        };
        super::ensure_ways("GNN", self.config.ways, first.spec.ways)?;
        let device = first.support.device().clone();
        let (mut queries, mut targets, mut graph_episode) = (Vec::new(), Vec::new(), Vec::new());
        for (e, ep) in episodes.iter().enumerate() {
            match self.config.train_graphs {
                TrainGraphs::OneQuery => {
                    let i = rng.random_range(0..ep.query_labels.len());
                    queries.push(ep.query.narrow(0, i, 1)?);
                    targets.push(ep.query_labels[i]);
                    graph_episode.push(e as u32);
                }
                TrainGraphs::EveryQuery => {
                    queries.push(ep.query.clone());
                    targets.extend_from_slice(&ep.query_labels);
                    graph_episode.extend(std::iter::repeat_n(e as u32, ep.query_labels.len()));
                }
            }
        }
        let g = targets.len();
        let mut images = queries;
        images.extend(episodes.iter().map(|ep| ep.support.clone()));
        images.extend(episodes.iter().filter_map(|ep| ep.unlabelled.clone()));
        let images = Tensor::cat(&images, 0)?;
        let params = self.state.params.values();
        let emb = self.backbone.forward_train(&params, &images, Some(&mut self.state.running), rng)?;
        let b = episodes.len();
        let n_support = first.support_labels.len();
        let n_unlabelled = first.unlabelled.as_ref().map_or(Ok(0), |u| u.dim(0))?;
        let d = emb.dim(1)?;
        let support = emb.narrow(0, g, b * n_support)?.reshape((b, n_support, d))?;
        let labels: Vec<u32> = episodes.iter().flat_map(|ep| ep.support_labels.clone()).collect();
        let label_features = ops::one_hot(&labels, self.config.ways, &device)?
            .reshape((b, n_support, self.config.ways))?;
        let mut others = vec![Tensor::cat(&[&support, &label_features], 2)?];
        if n_unlabelled > 0 {
            let u = emb.narrow(0, g + b * n_support, b * n_unlabelled)?;
            let unknown = self.label_features(&[], b * n_unlabelled, &device)?;
            others.push(Tensor::cat(&[&u, &unknown], 1)?.reshape((b, n_unlabelled, ()))?);
        }
        let mut others = Tensor::cat(&others, 1)?;
        if g != b {
            let index = Tensor::new(graph_episode.as_slice(), &device)?;
            others = others.index_select(&index, 0)?;
        }
        let nodes = self.nodes(&emb.narrow(0, 0, g)?, &others)?;
        let mut mode = GraphMode { bn: BnMode::Batch(Some(&mut self.state.running)), dropout: Some(rng) };
        let logits = self.graph.forward(&params, &nodes, &mut mode)?;
        let targets = Tensor::new(targets.as_slice(), &device)?;
        let loss = ops::cross_entropy(&logits, &targets)?;
        let accuracy = ops::accuracy(&logits, &targets)?;
        Ok(EpisodeOutput { loss, accuracy })
    }
}

/// The support nodes of one task, embedded once; each query is scored as its own graph.
struct TaskGraph<'a> {
    net: &'a Gnn,
    params: Params,
    /// [n, D + ways]
    others: Tensor,
}

impl Classifier for TaskGraph<'_> {
    fn logits(&self, query: &Tensor) -> Result<Tensor> {
        let running = &self.net.state.running;
        let q = self.net.backbone.forward(&self.params, query, BnMode::Running(running))?;
        let (n, f) = self.others.dims2()?;
        let widest = f.max(self.net.config.growth) * 3;
        let chunk = (TEST_CHUNK_ELEMENTS / ((n + 1) * (n + 1) * widest)).max(1);
        let m = q.dim(0)?;
        let mut out = Vec::new();
        for start in (0..m).step_by(chunk) {
            let len = chunk.min(m - start);
            let nodes = self.net.nodes(&q.narrow(0, start, len)?, &self.others)?;
            let mut mode = GraphMode { bn: BnMode::Running(running), dropout: None };
            out.push(self.net.graph.forward(&self.params, &nodes, &mut mode)?);
        }
        Tensor::cat(&out, 0)
    }
}

impl Learner for Gnn {
    /// `support` may end with unlabelled images after the `labels.len()` labelled ones.
    fn adapt(
        &self,
        support: &Tensor,
        labels: &[u32],
        ways: usize,
    ) -> Result<Box<dyn Classifier + '_>> {
        super::ensure_ways("GNN", self.config.ways, ways)?;
        let params = self.state.params.detached_values();
        let emb = self.backbone.forward(&params, support, BnMode::Running(&self.state.running))?;
        let unknown = emb.dim(0)?.checked_sub(labels.len()).ok_or_else(|| {
            candle_core::Error::Msg("more support labels than support images".into())
        })?;
        let label_features = self.label_features(labels, unknown, support.device())?;
        let others = Tensor::cat(&[&emb, &label_features], 1)?;
        Ok(Box::new(TaskGraph { net: self, params, others }))
    }

    fn uses_unlabelled(&self) -> bool {
        true
    }

    fn train_step(&mut self, ctx: &mut StepCtx) -> anyhow::Result<StepOutput> {
        let episodes = ctx.episodes()?;
        let mut rng = ctx.rng();
        let out = self.batch_loss(&episodes, &mut rng)?;
        ctx.minimise(out)
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    fn embed(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let params = self.state.params.detached_values();
        Ok(self.backbone.forward(&params, images, BnMode::Running(&self.state.running))?)
    }
}

/// `kshot train` flags of the GNN.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GnnFlags {
    /// GNN: label features of the query and unlabelled nodes (the code's zeros or the paper's
    /// uniform vector).
    #[arg(long, value_enum)]
    pub unknown_label: Option<UnknownLabel>,
    /// GNN training graphs: one-query (the code: one graph per episode, its query drawn from
    /// the episode's) or every-query (a graph for each query of the episode, sharing its
    /// embedded support; with --queries 1, N graphs per N-way episode).
    #[arg(long, value_enum)]
    pub train_graphs: Option<TrainGraphs>,
}

impl Method for GnnConfig {
    const NAMES: &'static [&'static str] = &["gnn"];
    type Flags = GnnFlags;

    fn named(_name: &str) -> Self {
        Self::default()
    }

    fn name(&self) -> &'static str {
        "gnn"
    }

    fn apply(&mut self, flags: &GnnFlags, _shared: &SharedFlags) -> anyhow::Result<()> {
        if let Some(u) = flags.unknown_label {
            self.unknown_label = u;
        }
        if let Some(t) = flags.train_graphs {
            self.train_graphs = t;
        }
        Ok(())
    }

    fn build(
        &self,
        protocol: &Protocol,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> anyhow::Result<Box<dyn Learner>> {
        super::ensure_train_ways("GNN", self.ways, protocol)?;
        let size = protocol.data.image_size;
        Ok(Box::new(Gnn::new(*self, &protocol.backbone, size, rng, device)?))
    }

    fn ways_mut(&mut self) -> Option<&mut usize> {
        Some(&mut self.ways)
    }

    fn step_unit(&self, protocol: &Protocol) -> String {
        match self.train_graphs {
            TrainGraphs::OneQuery => format!(
                "batches of {} graphs ({}, one query each)",
                protocol.meta_batch,
                EpisodeSpec { queries: 1, ..protocol.train }
            ),
            TrainGraphs::EveryQuery => format!(
                "batches of {} episodes ({}), a graph for every query",
                protocol.meta_batch, protocol.train
            ),
        }
    }

    fn presets() -> Vec<Preset> {
        vec![
            Preset {
                name: "gnn-omniglot-5w1s",
                summary: concat!("Garcia & Bruna 2018, Omniglot 5-way 1-shot: batches of 300 graphs, 100 000 iterations; ", gnn_omniglot!()),
                build: || omniglot(5, 1, 300, 100_000),
            },
            Preset {
                name: "gnn-omniglot-5w5s",
                summary: concat!("Garcia & Bruna 2018, Omniglot 5-way 5-shot: batches of 100 graphs, 80 000 iterations; ", gnn_omniglot!()),
                build: || omniglot(5, 5, 100, 80_000),
            },
            Preset {
                name: "gnn-omniglot-20w1s",
                summary: concat!("Garcia & Bruna 2018, Omniglot 20-way 1-shot: batches of 100 graphs, 80 000 iterations; ", gnn_omniglot!()),
                build: || omniglot(20, 1, 100, 80_000),
            },
            Preset {
                name: "gnn-omniglot-20w5s",
                summary: concat!("Garcia & Bruna 2018, Omniglot 20-way 5-shot (not in the official README): batches of 16 graphs of 101 nodes (kshot's choice, to fit 24 GB), 80 000 iterations; ", gnn_omniglot!()),
                build: || omniglot(20, 5, 16, 80_000),
            },
            Preset {
                name: "gnn-miniimagenet-5w1s",
                summary: concat!("Garcia & Bruna 2018, miniImageNet 5-way 1-shot: batches of 100 graphs, 80 000 iterations; ", gnn_mini!()),
                build: || mini_imagenet(1, 100, 80_000),
            },
            Preset {
                name: "gnn-miniimagenet-5w5s",
                summary: concat!("Garcia & Bruna 2018, miniImageNet 5-way 5-shot: batches of 40 graphs, 90 000 iterations; ", gnn_mini!(), " Semi-supervised (the paper's 20% / 40% labelled): add --shots 1 --unlabelled 4 / --shots 2 --unlabelled 3 (the code's 100 000 iterations: --episodes 100000)"),
                build: || mini_imagenet(5, 40, 90_000),
            },
        ]
    }
}

macro_rules! gnn_omniglot {
    () => {
        "official code (vgsatorras/few-shot-gnn): its Omniglot embedding (64-d) and GNN_nl_omniglot (2 dense layers of 48 features, adjacency MLPs as wide as their input, dropout 0.3 in the last), Adam 1e-3 halved every 10 000 iterations, no weight decay; trained on the 4800 rotated classes of Vinyals' trainval (the code: a random 1200/423 character split of the same sizes, also rotated), tested on the 1692 rotated test classes, 1000 episodes of 15 queries per class, each query its own graph (the code: 30 000 one-query episodes)"
    };
}
use gnn_omniglot;

macro_rules! gnn_mini {
    () => {
        "official code (vgsatorras/few-shot-gnn): its miniImageNet embedding (64-96-128-256, dropout 0.4/0.5, 128-d) and GNN_nl (adjacency MLPs 96 wide), Adam 1e-3 halved every 15 000 iterations, weight decay 1e-6; Ravi split, model selected on validation accuracy every 2000 iterations (500 episodes), tested on 600 episodes of 15 queries per class."
    };
}
use gnn_mini;

fn omniglot(ways: usize, shots: usize, batch: usize, iterations: u64) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data.train_subset = "trainval".into();
    p.backbone = BackboneConfig::GnnOmniglot(GnnEmbeddingConfig::omniglot(1));
    p.train = EpisodeSpec::new(ways, shots, 1);
    p.test = EpisodeSpec::new(ways, shots, 15);
    p.meta_batch = batch;
    p.episodes = iterations;
    p.schedule = StepDecay { lr: 1e-3, step: 10_000, gamma: 0.5 };
    p.validation = None;
    p.checkpoint_every = 100;
    (p, MethodConfig::Gnn(GnnConfig::omniglot(ways)))
}

fn mini_imagenet(shots: usize, batch: usize, iterations: u64) -> (Protocol, MethodConfig) {
    let mut p = Protocol::omniglot(shots);
    p.data = DataConfig::mini_imagenet();
    p.backbone = BackboneConfig::GnnMiniimagenet(GnnEmbeddingConfig::mini_imagenet(3));
    p.train = EpisodeSpec::new(5, shots, 1);
    p.test = EpisodeSpec::new(5, shots, 15);
    p.test_episodes = 600;
    p.meta_batch = batch;
    p.episodes = iterations;
    p.schedule = StepDecay { lr: 1e-3, step: 15_000, gamma: 0.5 };
    p.adam.weight_decay = 1e-6;
    p.validation = Some(Validation {
        early_stopping: Some(crate::protocol::EarlyStopping {
            metric: crate::protocol::ValMetric::Accuracy,
            // Keep the best model, never stop early (the code trains all iterations).
            patience: iterations,
        }),
        ..Validation::new(EpisodeSpec::new(5, shots, 15), 500, 2000)
    });
    p.checkpoint_every = 100;
    (p, MethodConfig::Gnn(GnnConfig::mini_imagenet(5)))
}
