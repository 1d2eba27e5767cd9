//! The two networks of Meta Networks' official Omniglot model (tsendeemts/MetaNet,
//! `MetaNetFull.py`): blocks of 3×3 convolution (64 channels, padding 1, no bias) → ReLU → 2×2
//! max-pool, then fc 64 → 64 and fc 64 → N, no biases and no batch norm. The base learner and the
//! embedding ("key") network have this same shape, each its own weights.
//!
//! Every layer can be *augmented* with fast weights: `relu(slow(x)) + relu(fast(x))` (the output
//! layer without ReLUs). Chainer's `max_pooling_2d` pools in ceil mode (`cover_all`), which is
//! what makes five pools fit 28×28 (28→14→7→4→2→1); kshot pads an odd side with a zero row or
//! column and pools in floor mode, the same function on ReLU outputs (never negative), with its
//! gradient routed to the real arg-max. The pooling is kshot's own kernel (candle's
//! `max_pool2d` has a wrong gradient).

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{init, ParamSet, Params};
use crate::kernels;

/// The layout shared by the base learner and the key network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastNetConfig {
    pub in_channels: usize,
    /// Channels of every convolution (64).
    pub width: usize,
    /// Convolution blocks (5).
    pub blocks: usize,
    /// Width of the first fully connected layer (64).
    pub hidden: usize,
}

impl FastNetConfig {
    pub fn omniglot(in_channels: usize) -> Self {
        Self { in_channels, width: 64, blocks: 5, hidden: 64 }
    }

    /// The flattened size of the last block's output for square `size` inputs (64 at 28).
    pub fn features(&self, size: usize) -> usize {
        let side = (0..self.blocks).fold(size, |s, _| s.div_ceil(2));
        self.width * side * side
    }
}

/// Fast weights of one network: a tensor for each convolution, then fc1 and fc2 (absent where a
/// layer is not augmented); or, with a leading batch dimension on each, one set per image.
#[derive(Debug, Clone)]
pub struct FastWeights {
    pub convs: Vec<Tensor>,
    pub fc1: Tensor,
    pub fc2: Option<Tensor>,
}

/// One network of that layout, its parameters named `{prefix}.conv{i}.weight`,
/// `{prefix}.fc1.weight` [hidden, features], `{prefix}.fc2.weight` [outputs, hidden].
#[derive(Debug, Clone)]
pub struct FastNet {
    pub config: FastNetConfig,
    pub prefix: &'static str,
    pub features: usize,
}

impl FastNet {
    pub fn new(config: FastNetConfig, prefix: &'static str, image_size: usize) -> Self {
        Self { config, prefix, features: config.features(image_size) }
    }

    pub fn conv_name(&self, i: usize) -> String {
        format!("{}.conv{i}.weight", self.prefix)
    }

    pub fn fc_name(&self, i: usize) -> String {
        format!("{}.fc{i}.weight", self.prefix)
    }

    /// The shapes of the convolution weights, in order.
    pub fn conv_shapes(&self) -> Vec<Vec<usize>> {
        let c = &self.config;
        (0..c.blocks)
            .map(|i| vec![c.width, if i == 0 { c.in_channels } else { c.width }, 3, 3])
            .collect()
    }

    pub fn fc_shapes(&self, outputs: usize) -> [Vec<usize>; 2] {
        [vec![self.config.hidden, self.features], vec![outputs, self.config.hidden]]
    }

    /// Chainer's default initialisation (v1): N(0, 1/fan_in) for every weight. fc2 is pushed
    /// only when `with_fc2`; [`FastNet::init_fc2`] draws it otherwise.
    pub fn init(
        &self,
        p: &mut ParamSet,
        outputs: usize,
        with_fc2: bool,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<()> {
        for (i, shape) in self.conv_shapes().iter().enumerate() {
            p.push(self.conv_name(i), lecun(rng, shape, device)?)?;
        }
        let [fc1, fc2] = self.fc_shapes(outputs);
        p.push(self.fc_name(1), lecun(rng, &fc1, device)?)?;
        if with_fc2 {
            p.push(self.fc_name(2), lecun(rng, &fc2, device)?)?;
        }
        Ok(())
    }

    pub fn init_fc2(
        &self,
        outputs: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Tensor> {
        lecun(rng, &self.fc_shapes(outputs)[1], device)
    }

    /// The convolution blocks → [B, features]; with `fast`, each block is augmented by one set of
    /// fast weights shared by the batch, or by each image's own (convolutions [B, Co, Ci, 3, 3]).
    pub fn trunk(&self, params: &Params, x: &Tensor, fast: Fast) -> Result<Tensor> {
        let mut h = x.clone();
        for i in 0..self.config.blocks {
            let slow = kernels::conv3x3(&h, params.get(&self.conv_name(i))?)?.relu()?;
            let y = match fast {
                Fast::None => slow,
                Fast::Shared(f) => (slow + kernels::conv3x3(&h, &f.convs[i])?.relu()?)?,
                Fast::PerImage(f) => (slow + kernels::conv3x3_each(&h, &f.convs[i])?.relu()?)?,
            };
            h = pool_ceil(&y)?;
        }
        h.flatten_from(1)
    }

    /// The slow network's logits fc2(relu(fc1(trunk(x)))), with `fc2` given.
    pub fn slow_logits(&self, params: &Params, x: &Tensor, fc2: &Tensor) -> Result<Tensor> {
        let h = self.trunk(params, x, Fast::None)?;
        let a = h.matmul(&params.get(&self.fc_name(1))?.t()?)?.relu()?;
        a.matmul(&fc2.t()?)
    }
}

/// Which fast weights augment a pass.
#[derive(Clone, Copy)]
pub enum Fast<'a> {
    None,
    Shared(&'a FastWeights),
    PerImage(&'a FastWeights),
}

/// N(0, 1/fan_in) weights (Chainer v1's default `wscale = 1`).
fn lecun(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let fan_in: usize = shape[1..].iter().product();
    init::normal(rng, shape, 0.0, (1.0 / fan_in as f64).sqrt(), device)
}

/// 2×2 max-pool, stride 2, ceil mode, for inputs that are never negative: an odd side gets a zero
/// row or column (after the real ones, so ties go to a real element) and is pooled in floor mode.
pub fn pool_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let x = if h % 2 == 1 { x.pad_with_zeros(2, 0, 1)? } else { x.clone() };
    let x = if w % 2 == 1 { x.pad_with_zeros(3, 0, 1)? } else { x };
    kernels::max_pool2x2(&x)
}
