//! Adam (Kingma & Ba 2015) over a [`ParamSet`], with its state saveable for exact resume, and the
//! step-decay learning-rate schedule of the papers.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Learning rate `lr · gamma^⌊episode / step⌋` (PyTorch's StepLR); `step = 0` keeps it constant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepDecay {
    pub lr: f64,
    pub step: u64,
    pub gamma: f64,
}

impl StepDecay {
    pub fn at(&self, episode: u64) -> f64 {
        match episode.checked_div(self.step) {
            None => self.lr,
            Some(decays) => self.lr * self.gamma.powi(decays as i32),
        }
    }
}

pub struct Adam {
    /// Its state is saved as `{name}.m.{param}`, `{name}.v.{param}` and `{name}.t`.
    name: String,
    vars: Vec<(String, Var)>,
    config: AdamConfig,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates taken so far (for bias correction).
    pub t: u64,
}

impl Adam {
    /// Adam over every parameter of `params`, its state saved under `adam.`.
    pub fn new(params: &crate::nn::ParamSet, config: AdamConfig) -> Result<Self> {
        Self::named(
            "adam",
            params.iter().map(|(n, v)| (n.to_string(), v.clone())).collect(),
            config,
        )
    }

    /// Adam over `vars`, its state saved under `{name}.`.
    pub fn named(name: &str, vars: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        Ok(Self { name: name.to_string(), vars, config, m, v, t: 0 })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One update with learning rate `lr`; a variable without a gradient is left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            let g = if c.weight_decay != 0.0 {
                (g + (var.as_tensor().detach() * c.weight_decay)?)?
            } else {
                g
            };
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(var.as_tensor().detach() - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moment estimates and step count as named tensors.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{}.m.{name}", self.name), self.m[i].clone()));
            out.push((format!("{}.v.{name}", self.name), self.v[i].clone()));
        }
        let t = Tensor::new(&[self.t as i64], &candle_core::Device::Cpu)?;
        out.push((format!("{}.t", self.name), t));
        Ok(out)
    }

    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        origin: &Path,
    ) -> anyhow::Result<()> {
        let get = |key: &str| {
            tensors.get(key).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: `{key}` is missing; the optimiser state does not match this model",
                    origin.display()
                )
            })
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{}.{kind}.{name}", self.name);
                let t = get(&key)?;
                anyhow::ensure!(
                    t.dims() == var.dims(),
                    "{}: {key} has the wrong shape",
                    origin.display()
                );
                *slot = t.clone();
            }
        }
        self.t = get(&format!("{}.t", self.name))?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

/// One layer's SGD hyper-parameters at one step: learning rate η, momentum μ, L2 weight λ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub l2: f64,
}

/// Koch et al.'s (2015, §3.2) update of one parameter tensor `w` with gradient `grad` and previous
/// update `delta`: Δw ← μ·Δw − η·(∇ + 2λ·w), w ← w + Δw (the gradient of the loss plus λ‖w‖²).
/// Returns (w + Δw, Δw).
pub fn sgd_momentum_step(
    w: &Tensor,
    grad: &Tensor,
    delta: &Tensor,
    h: SgdHyper,
) -> Result<(Tensor, Tensor)> {
    let g = if h.l2 != 0.0 { (grad + (w * (2.0 * h.l2))?)? } else { grad.clone() };
    let delta = ((delta * h.momentum)? - (g * h.lr)?)?;
    Ok(((w + &delta)?, delta))
}

/// Koch et al.'s optimiser: SGD with a learning rate η_j, a final momentum μ_j and an L2 weight
/// λ_j per layer j; every epoch η_j ← 0.99·η_j, and the momentum starts at 0.5 in every layer and
/// rises linearly per epoch to μ_j. The layers are the four convolutions (with their batch norm,
/// if any), the sigmoid embedding layer and the output unit. The paper's tuned values were never
/// published; the presets state theirs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KochSgd {
    /// η_j: conv 1–4, embedding layer, output unit.
    pub lr: [f64; 6],
    /// μ_j, reached after `momentum_epochs` epochs.
    pub momentum: [f64; 6],
    /// λ_j, applied to weights only (not biases or batch-norm parameters).
    pub l2: [f64; 6],
    /// Momentum of every layer in the first epoch (Koch: 0.5).
    pub momentum_start: f64,
    /// Epochs over which the momentum rises linearly from `momentum_start` to μ_j.
    pub momentum_epochs: u64,
    /// Factor on every η_j per epoch (Koch: 0.99).
    pub lr_decay: f64,
    /// Training steps per epoch.
    pub steps_per_epoch: u64,
}

impl KochSgd {
    /// The epoch of 0-based training step `step`.
    pub fn epoch(&self, step: u64) -> u64 {
        step / self.steps_per_epoch.max(1)
    }

    /// Layer `layer`'s hyper-parameters at 0-based training step `step`.
    pub fn at(&self, layer: usize, step: u64) -> SgdHyper {
        let epoch = self.epoch(step);
        let ramp = if self.momentum_epochs == 0 {
            1.0
        } else {
            epoch.min(self.momentum_epochs) as f64 / self.momentum_epochs as f64
        };
        SgdHyper {
            lr: self.lr[layer] * self.lr_decay.powi(epoch.min(i32::MAX as u64) as i32),
            momentum: self.momentum_start + (self.momentum[layer] - self.momentum_start) * ramp,
            l2: self.l2[layer],
        }
    }
}
