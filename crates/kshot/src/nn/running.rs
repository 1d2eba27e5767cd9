//! Running batch-norm statistics: one (mean, var) pair of f64 vectors per named batch-norm layer,
//! saved as `{layer}.running_mean` / `{layer}.running_var`.

use candle_core::{Device, Result, Tensor};

use super::ops;

#[derive(Debug, Clone, PartialEq)]
pub struct BnLayerStats {
    pub name: String,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// The running statistics of every batch-norm layer of a backbone, in layer order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunningStats {
    pub layers: Vec<BnLayerStats>,
}

impl RunningStats {
    /// Fresh statistics (mean 0, variance 1) for layers given as (name, channels).
    pub fn new(layers: impl IntoIterator<Item = (String, usize)>) -> Self {
        let layers = layers
            .into_iter()
            .map(|(name, c)| BnLayerStats { name, mean: vec![0.0; c], var: vec![1.0; c] })
            .collect();
        Self { layers }
    }

    /// None at all (a backbone without batch norm).
    pub fn empty() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn mean(&self, layer: usize) -> &[f64] {
        &self.layers[layer].mean
    }

    pub fn var(&self, layer: usize) -> &[f64] {
        &self.layers[layer].var
    }

    /// PyTorch's update: biased batch variance for normalising, unbiased for the running average.
    pub fn update(&mut self, layer: usize, stats: &ops::BatchStats, momentum: f64) {
        let n = stats.count as f64;
        let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let l = &mut self.layers[layer];
        for c in 0..stats.mean.len() {
            let m = &mut l.mean[c];
            *m = (1.0 - momentum) * *m + momentum * stats.mean[c];
            let v = &mut l.var[c];
            *v = (1.0 - momentum) * *v + momentum * stats.var[c] * unbias;
        }
    }

    pub fn named_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for l in &self.layers {
            let name = &l.name;
            out.push((
                format!("{prefix}{name}.running_mean"),
                Tensor::new(l.mean.as_slice(), &Device::Cpu)?,
            ));
            out.push((
                format!("{prefix}{name}.running_var"),
                Tensor::new(l.var.as_slice(), &Device::Cpu)?,
            ));
        }
        Ok(out)
    }

    pub fn load_from(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
        origin: &std::path::Path,
    ) -> anyhow::Result<()> {
        for l in &mut self.layers {
            for (kind, dst) in [("running_mean", &mut l.mean), ("running_var", &mut l.var)] {
                let key = format!("{prefix}{}.{kind}", l.name);
                let t = tensors.get(&key).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: tensor `{key}` is missing; the file was not written by this model",
                        origin.display()
                    )
                })?;
                let v = t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                anyhow::ensure!(
                    v.len() == dst.len(),
                    "{}: `{key}` has {} channels, the model expects {}",
                    origin.display(),
                    v.len(),
                    dst.len()
                );
                *dst = v;
            }
        }
        Ok(())
    }
}

/// How batch norm gets its statistics in a forward pass.
pub enum BnMode<'a> {
    /// Statistics of the current batch; folded into the running averages when given.
    Batch(Option<&'a mut RunningStats>),
    /// Fixed running averages (inference on one image at a time).
    Running(&'a RunningStats),
}
