//! The networks of few-shot adversarial generation (Zakharov et al. 2019), sized for a CPU and
//! for 64×64 gray faces with a landmark channel:
//!
//! - embedder E(x ‖ y) → ê: a stem convolution and four residual down-sampling blocks
//!   (S → S/16), ReLU, sum pooling;
//! - generator G(y; ψ): a stem convolution, two residual down-sampling blocks with instance
//!   norm, two residual blocks and two residual up-sampling blocks whose normalisation is AdaIN
//!   with parameters ψ = P·ê, AdaIN, ReLU and a last convolution with a sigmoid;
//! - projection discriminator V(x ‖ y)ᵀ(W_i + w₀) + b, with V as the embedder's architecture
//!   (own weights); every block's output is kept for feature matching.
//!
//! Every convolution (3×3 and 1×1 skips) is spectrally normalised: W / σ(W) with σ(W) = ‖Wᵀu‖
//! for the layer's power-iteration vector u, which [`power_iteration`] advances once per
//! training step and the learner saves with its state. The gradient of W / ‖Wᵀu‖ is exact for
//! the stored u (PyTorch's `spectral_norm` treats u the same way).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, D};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, ParamSet, Params};
use crate::kernels;

/// Sizes of the three networks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GanNetsConfig {
    /// Side of the square images (a multiple of 16).
    pub size: usize,
    /// Channels of the first convolution; blocks double them (E and D up to 8×, G up to 4×).
    pub width: usize,
    /// Training identities: the columns W_i of the projection discriminator.
    pub identities: usize,
}

const EPS: f64 = 1e-5;

/// The name under which a convolution weight's power-iteration vector is kept.
pub fn sn_key(weight: &str) -> String {
    format!("sn.{weight}")
}

/// W / σ(W), σ(W) = ‖Wᵀu‖ with W read as [C_out, C_in·k·k].
pub fn spectral_normalised(w: &Tensor, u: &Tensor) -> Result<Tensor> {
    let mat = w.reshape((w.dim(0)?, ()))?;
    let wtu = u.unsqueeze(0)?.matmul(&mat)?;
    let sigma = wtu.sqr()?.sum_all()?.sqrt()?;
    w.broadcast_div(&sigma)
}

/// One step of power iteration: u ← normalise(W · normalise(Wᵀu)), without a gradient.
pub fn power_iteration(w: &Tensor, u: &Tensor) -> Result<Tensor> {
    let mat = w.detach().reshape((w.dim(0)?, ()))?;
    let v = unit(&u.detach().unsqueeze(0)?.matmul(&mat)?)?;
    unit(&mat.matmul(&v.t()?)?.squeeze(1)?)
}

fn unit(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_all()?.sqrt()? + 1e-12)?;
    x.broadcast_div(&norm)
}

/// Per-sample, per-channel normalisation over the spatial dimensions of [B, C, H, W].
pub fn instance_norm(x: &Tensor) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
    centred.broadcast_div(&(var + EPS)?.sqrt()?)
}

/// AdaIN: γ·instance_norm(x) + β with γ, β [B, C] per sample.
pub fn adain(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let (b, c) = gamma.dims2()?;
    let g = gamma.reshape((b, c, 1, 1))?;
    let bt = beta.reshape((b, c, 1, 1))?;
    instance_norm(x)?.broadcast_mul(&g)?.broadcast_add(&bt)
}

/// 2×2 average pooling of [B, C, H, W] (H, W even).
pub fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.sum(5)?.sum(3)? * 0.25
}

/// Nearest-neighbour up-sampling ×2 of [B, C, H, W].
pub fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?.broadcast_as((b, c, h, 2, w, 2))?.contiguous()?.reshape((
        b,
        c,
        2 * h,
        2 * w,
    ))
}

/// The projection discriminator's score: ⟨v, projection⟩ + b for rows of [B, D].
pub fn projection_score(v: &Tensor, projection: &Tensor, bias: &Tensor) -> Result<Tensor> {
    (v * projection)?.sum(1)?.broadcast_add(bias)
}

/// A spectrally normalised convolution with a bias: 3×3 (padding 1) or 1×1.
#[derive(Debug, Clone)]
struct Conv {
    name: String,
    ci: usize,
    co: usize,
    k: usize,
}

impl Conv {
    fn new(name: String, ci: usize, co: usize, k: usize) -> Self {
        Self { name, ci, co, k }
    }

    fn weight(&self) -> String {
        format!("{}.w", self.name)
    }

    fn init(
        &self,
        set: &mut ParamSet,
        sn: &mut Sn,
        rng: &mut ChaCha8Rng,
        dev: &Device,
    ) -> Result<()> {
        let fan_in = self.ci * self.k * self.k;
        set.push(
            self.weight(),
            init::torch_default(rng, &[self.co, self.ci, self.k, self.k], fan_in, dev)?,
        )?;
        set.push(format!("{}.b", self.name), Tensor::zeros(self.co, DType::F32, dev)?)?;
        let u = init::normal(rng, &[self.co], 0.0, 1.0, dev)?;
        sn.insert(sn_key(&self.weight()), unit(&u)?);
        Ok(())
    }

    fn forward(&self, p: &Params, sn: &Sn, x: &Tensor) -> Result<Tensor> {
        let w = p.get(&self.weight())?;
        let u = sn.get(&sn_key(&self.weight())).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "missing power-iteration vector of `{}`",
                self.weight()
            ))
        })?;
        let w = spectral_normalised(w, &u.to_dtype(w.dtype())?)?;
        let y = if self.k == 3 {
            kernels::conv3x3(x, &w)?
        } else {
            let (b, ci, h, wd) = x.dims4()?;
            w.reshape((self.co, ci))?
                .broadcast_matmul(&x.reshape((b, ci, h * wd))?)?
                .reshape((b, self.co, h, wd))?
        };
        let bias = p.get(&format!("{}.b", self.name))?.reshape((1, self.co, 1, 1))?;
        y.broadcast_add(&bias)
    }
}

/// Power-iteration vectors by [`sn_key`].
pub type Sn = BTreeMap<String, Tensor>;

/// conv3×3 → [norm] → ReLU → pool → conv3×3 → [norm], plus pool → conv1×1 on the skip path.
#[derive(Debug, Clone)]
struct ResDown {
    conv1: Conv,
    conv2: Conv,
    skip: Conv,
    /// ReLU on the input first (every block but an encoder's first).
    pre_activation: bool,
    instance_norm: bool,
}

impl ResDown {
    fn new(name: &str, ci: usize, co: usize, pre_activation: bool, instance_norm: bool) -> Self {
        Self {
            conv1: Conv::new(format!("{name}.conv1"), ci, co, 3),
            conv2: Conv::new(format!("{name}.conv2"), co, co, 3),
            skip: Conv::new(format!("{name}.skip"), ci, co, 1),
            pre_activation,
            instance_norm,
        }
    }

    fn convs(&self) -> [&Conv; 3] {
        [&self.conv1, &self.conv2, &self.skip]
    }

    fn forward(&self, p: &Params, sn: &Sn, x: &Tensor) -> Result<Tensor> {
        let norm = |t: Tensor| if self.instance_norm { instance_norm(&t) } else { Ok(t) };
        let h = if self.pre_activation { x.relu()? } else { x.clone() };
        let h = norm(self.conv1.forward(p, sn, &h)?)?.relu()?;
        let h = norm(self.conv2.forward(p, sn, &avg_pool2(&h)?)?)?;
        h + self.skip.forward(p, sn, &avg_pool2(x)?)?
    }
}

/// AdaIN → ReLU → [up] → conv3×3 → AdaIN → ReLU → conv3×3, plus [up] → [conv1×1] on the skip.
#[derive(Debug, Clone)]
struct ResAdain {
    conv1: Conv,
    conv2: Conv,
    skip: Option<Conv>,
    upsample: bool,
}

impl ResAdain {
    fn new(name: &str, ci: usize, co: usize, upsample: bool) -> Self {
        Self {
            conv1: Conv::new(format!("{name}.conv1"), ci, co, 3),
            conv2: Conv::new(format!("{name}.conv2"), co, co, 3),
            skip: (ci != co).then(|| Conv::new(format!("{name}.skip"), ci, co, 1)),
            upsample,
        }
    }

    fn convs(&self) -> Vec<&Conv> {
        [&self.conv1, &self.conv2].into_iter().chain(self.skip.as_ref()).collect()
    }

    /// The channels of its two AdaIN layers.
    fn adain_channels(&self) -> [usize; 2] {
        [self.conv1.ci, self.conv2.ci]
    }

    fn forward(&self, p: &Params, sn: &Sn, x: &Tensor, psi: &mut AdainParams) -> Result<Tensor> {
        let up = |t: &Tensor| if self.upsample { upsample2(t) } else { Ok(t.clone()) };
        let (g, b) = psi.next(self.conv1.ci)?;
        let h = self.conv1.forward(p, sn, &up(&adain(x, &g, &b)?.relu()?)?)?;
        let (g, b) = psi.next(self.conv2.ci)?;
        let h = self.conv2.forward(p, sn, &adain(&h, &g, &b)?.relu()?)?;
        let skip = match &self.skip {
            Some(conv) => conv.forward(p, sn, &up(x)?)?,
            None => up(x)?,
        };
        h + skip
    }
}

/// Reads ψ [B, Σ 2·C] slot by slot: γ = 1 + ψ[.., C], β = ψ[.., C] for each AdaIN layer.
struct AdainParams<'a> {
    psi: &'a Tensor,
    offset: usize,
}

impl AdainParams<'_> {
    fn next(&mut self, channels: usize) -> Result<(Tensor, Tensor)> {
        let gamma = (self.psi.narrow(1, self.offset, channels)? + 1.0)?;
        let beta = self.psi.narrow(1, self.offset + channels, channels)?;
        self.offset += 2 * channels;
        Ok((gamma, beta))
    }
}

/// The embedder's and the discriminator's architecture: stem and four down-sampling blocks.
#[derive(Debug, Clone)]
struct Encoder {
    stem: Conv,
    blocks: Vec<ResDown>,
}

impl Encoder {
    fn new(prefix: &str, in_channels: usize, width: usize) -> Self {
        let widths = [width, 2 * width, 4 * width, 8 * width, 8 * width];
        let blocks = (0..4)
            .map(|i| {
                ResDown::new(&format!("{prefix}.block{i}"), widths[i], widths[i + 1], true, false)
            })
            .collect();
        Self { stem: Conv::new(format!("{prefix}.stem"), in_channels, width, 3), blocks }
    }

    fn convs(&self) -> Vec<&Conv> {
        std::iter::once(&self.stem).chain(self.blocks.iter().flat_map(|b| b.convs())).collect()
    }

    /// Each block's output, then the pooled feature vector [B, 8·width].
    fn forward(&self, p: &Params, sn: &Sn, x: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let mut h = self.stem.forward(p, sn, x)?;
        let mut features = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            h = block.forward(p, sn, &h)?;
            features.push(h.clone());
        }
        let pooled = h.relu()?.sum(D::Minus1)?.sum(D::Minus1)?;
        Ok((features, pooled))
    }
}

#[derive(Debug, Clone)]
struct Generator {
    stem: Conv,
    down: Vec<ResDown>,
    blocks: Vec<ResAdain>,
    out: Conv,
}

impl Generator {
    fn new(width: usize) -> Self {
        let (c1, c2, c4) = (width, 2 * width, 4 * width);
        Self {
            stem: Conv::new("g.stem".into(), 1, c1, 3),
            down: vec![
                ResDown::new("g.down0", c1, c2, true, true),
                ResDown::new("g.down1", c2, c4, true, true),
            ],
            blocks: vec![
                ResAdain::new("g.res0", c4, c4, false),
                ResAdain::new("g.res1", c4, c4, false),
                ResAdain::new("g.up0", c4, c2, true),
                ResAdain::new("g.up1", c2, c1, true),
            ],
            out: Conv::new("g.out".into(), c1, 1, 3),
        }
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut all = vec![&self.stem];
        all.extend(self.down.iter().flat_map(|b| b.convs()));
        all.extend(self.blocks.iter().flat_map(|b| b.convs()));
        all.push(&self.out);
        all
    }

    /// The channels of every AdaIN layer, in the order ψ lists them.
    fn adain_channels(&self) -> Vec<usize> {
        let mut out: Vec<usize> = self.blocks.iter().flat_map(|b| b.adain_channels()).collect();
        out.push(self.out.ci);
        out
    }

    fn forward(&self, p: &Params, sn: &Sn, y: &Tensor, psi: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(p, sn, y)?;
        for block in &self.down {
            h = block.forward(p, sn, &h)?;
        }
        let mut slots = AdainParams { psi, offset: 0 };
        for block in &self.blocks {
            h = block.forward(p, sn, &h, &mut slots)?;
        }
        let (g, b) = slots.next(self.out.ci)?;
        let h = self.out.forward(p, sn, &adain(&h, &g, &b)?.relu()?)?;
        super::lstm::sigmoid(&h)
    }
}

/// The embedder, generator, AdaIN projection and projection discriminator of one model.
#[derive(Debug, Clone)]
pub struct GanNets {
    pub config: GanNetsConfig,
    embedder: Encoder,
    discriminator: Encoder,
    generator: Generator,
}

impl GanNets {
    pub fn new(config: GanNetsConfig) -> Result<Self> {
        if !config.size.is_multiple_of(16) || config.size == 0 {
            candle_core::bail!("image size {} must be a positive multiple of 16", config.size)
        }
        Ok(Self {
            config,
            embedder: Encoder::new("e", 2, config.width),
            discriminator: Encoder::new("d", 2, config.width),
            generator: Generator::new(config.width),
        })
    }

    /// The length of ê (and of V's output and of each W_i).
    pub fn embedding_dim(&self) -> usize {
        8 * self.config.width
    }

    /// The length of ψ.
    pub fn psi_dim(&self) -> usize {
        2 * self.generator.adain_channels().iter().sum::<usize>()
    }

    /// Fresh parameters and power-iteration vectors.
    pub fn init(&self, rng: &mut ChaCha8Rng, dev: &Device) -> Result<(ParamSet, Sn)> {
        let (mut set, mut sn) = (ParamSet::new(), Sn::new());
        for conv in self.embedder.convs() {
            conv.init(&mut set, &mut sn, rng, dev)?;
        }
        for conv in self.generator.convs() {
            conv.init(&mut set, &mut sn, rng, dev)?;
        }
        let (de, dp) = (self.embedding_dim(), self.psi_dim());
        set.push("p.w", init::normal(rng, &[dp, de], 0.0, 0.02 / (de as f64).sqrt(), dev)?)?;
        set.push("p.b", Tensor::zeros(dp, DType::F32, dev)?)?;
        for conv in self.discriminator.convs() {
            conv.init(&mut set, &mut sn, rng, dev)?;
        }
        set.push("d.proj.w", init::normal(rng, &[self.config.identities, de], 0.0, 0.02, dev)?)?;
        set.push("d.proj.w0", Tensor::zeros(de, DType::F32, dev)?)?;
        set.push("d.proj.b", Tensor::zeros(1, DType::F32, dev)?)?;
        Ok((set, sn))
    }

    /// Whether parameter `name` belongs to the discriminator (the projection W included).
    pub fn is_discriminator(name: &str) -> bool {
        name.starts_with("d.")
    }

    /// The names of every spectrally normalised weight.
    pub fn conv_weights(&self) -> Vec<String> {
        let all = self.embedder.convs().into_iter();
        let all = all.chain(self.generator.convs()).chain(self.discriminator.convs());
        all.map(|c| c.weight()).collect()
    }

    /// Advances every layer's power-iteration vector one step.
    pub fn power_iterate(&self, p: &Params, sn: &mut Sn) -> Result<()> {
        for name in self.conv_weights() {
            let key = sn_key(&name);
            let u = sn.get(&key).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!("missing power-iteration vector `{key}`"))
            })?;
            let w = p.get(&name)?;
            sn.insert(key, power_iteration(w, &u.to_dtype(w.dtype())?)?.to_dtype(u.dtype())?);
        }
        Ok(())
    }

    /// ê per image: [n, 2, S, S] (face ‖ landmarks) → [n, D].
    pub fn embed(&self, p: &Params, sn: &Sn, x: &Tensor) -> Result<Tensor> {
        Ok(self.embedder.forward(p, sn, x)?.1)
    }

    /// ψ = P·ê for rows of [B, D].
    pub fn adain_params(&self, p: &Params, e: &Tensor) -> Result<Tensor> {
        e.matmul(&p.get("p.w")?.t()?)?.broadcast_add(p.get("p.b")?)
    }

    /// G(y; ψ): landmark images [B, 1, S, S] and ψ [B, psi_dim] → images [B, 1, S, S] in (0, 1).
    pub fn generate(&self, p: &Params, sn: &Sn, y: &Tensor, psi: &Tensor) -> Result<Tensor> {
        self.generator.forward(p, sn, y, psi)
    }

    /// V(x ‖ y): every block's output and the pooled vector [B, D].
    pub fn discriminator_features(
        &self,
        p: &Params,
        sn: &Sn,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        self.discriminator.forward(p, sn, &Tensor::cat(&[x, y], 1)?)
    }

    /// W_i + w₀ for the identities `ids`: [B, D].
    pub fn projection(&self, p: &Params, ids: &[u32]) -> Result<Tensor> {
        let w = p.get("d.proj.w")?;
        let idx = Tensor::new(ids, w.device())?;
        w.index_select(&idx, 0)?.broadcast_add(p.get("d.proj.w0")?)
    }

    /// V(x ‖ y)ᵀ·projection + b per row, and V's block outputs.
    pub fn discriminate(
        &self,
        p: &Params,
        sn: &Sn,
        x: &Tensor,
        y: &Tensor,
        projection: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (features, v) = self.discriminator_features(p, sn, x, y)?;
        Ok((projection_score(&v, projection, p.get("d.proj.b")?)?, features))
    }
}
