//! Named parameters. A [`ParamSet`] owns the trainable variables; [`Params`] is the set of tensors a
//! forward pass reads, which are either the variables themselves or adapted, non-leaf copies (MAML).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{Device, Result, Tensor, Var};

/// Tensors by name, as read by a functional forward pass.
#[derive(Clone, Debug, Default)]
pub struct Params(BTreeMap<String, Tensor>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }
    /// `names[i]` → `values[i]`.
    pub fn from_names(names: &[String], values: &[Tensor]) -> Self {
        Self(names.iter().cloned().zip(values.iter().cloned()).collect())
    }
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.0.insert(name.into(), t);
    }
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing parameter `{name}`")))
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.0.iter()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Trainable variables in a fixed (insertion) order.
#[derive(Clone, Debug, Default)]
pub struct ParamSet {
    entries: Vec<(String, Var)>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: impl Into<String>, value: Tensor) -> Result<()> {
        let name = name.into();
        if self.entries.iter().any(|(n, _)| *n == name) {
            candle_core::bail!("duplicate parameter `{name}`");
        }
        self.entries.push((name, Var::from_tensor(&value)?));
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The current values, for a forward pass that differentiates with respect to them.
    pub fn values(&self) -> Params {
        let mut p = Params::new();
        for (n, v) in &self.entries {
            p.insert(n.clone(), v.as_tensor().clone());
        }
        p
    }

    /// The current values cut from the graph, for inference that builds no gradient graph.
    pub fn detached_values(&self) -> Params {
        let mut p = Params::new();
        for (n, v) in &self.entries {
            p.insert(n.clone(), v.as_tensor().detach());
        }
        p
    }

    /// Named tensors to be saved, with `prefix` before each name.
    pub fn named_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.entries.iter().map(|(n, v)| (format!("{prefix}{n}"), v.as_tensor().clone())).collect()
    }

    /// Overwrites every variable from `tensors` (name → value, looked up with `prefix`), checking
    /// that each exists with the same shape. `origin` names the file for error messages.
    pub fn load_from(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        origin: &Path,
    ) -> anyhow::Result<()> {
        for (n, v) in &self.entries {
            let key = format!("{prefix}{n}");
            let Some(t) = tensors.get(&key) else {
                bail!(
                    "{}: tensor `{key}` is missing; the file was not written by this model",
                    origin.display()
                );
            };
            if t.dims() != v.dims() {
                bail!(
                    "{}: tensor `{key}` has shape {:?}, the model expects {:?}; check the run's config",
                    origin.display(),
                    t.dims(),
                    v.dims()
                );
            }
            v.set(&t.to_dtype(v.dtype())?.to_device(&Device::Cpu)?)
                .with_context(|| format!("{}: loading `{key}`", origin.display()))?;
        }
        Ok(())
    }
}
