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
