//! An LSTM cell over explicit parameters (Hochreiter & Schmidhuber 1997, with a forget gate), written
//! in candle tensor ops so that it is differentiable to any order.
//!
//! Gates are `x·W_ihᵀ + h·W_hhᵀ + b`, split into input, forget, cell and output parts in PyTorch's
//! order (i, f, g, o). The previous hidden state may be wider than the cell's own output
//! (`hidden_in ≠ hidden`), as in the attention LSTM of Matching Networks, whose state is `[h, r]`.

use candle_core::{Device, Result, Tensor};
use rand_chacha::ChaCha8Rng;

use super::{init, ParamSet, Params};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LstmCell {
    pub input: usize,
    pub hidden_in: usize,
    pub hidden: usize,
}

/// σ(x) as ½(tanh(x/2) + 1): no overflow in either pass (1/(1+e^{-x}) gives 0·∞ in the backward
/// pass for very negative x).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

impl LstmCell {
    pub fn new(input: usize, hidden_in: usize, hidden: usize) -> Self {
        Self { input, hidden_in, hidden }
    }

    /// Adds `{prefix}.weight_ih` [4H, I], `{prefix}.weight_hh` [4H, H_in] and `{prefix}.bias` [4H],
    /// uniform in ±1/√H (PyTorch's default), with the forget-gate bias at +1 (Jozefowicz et al. 2015).
    pub fn init(
        &self,
        prefix: &str,
        params: &mut ParamSet,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<()> {
        let h = self.hidden;
        let bound = 1.0 / (h as f64).sqrt();
        params.push(
            format!("{prefix}.weight_ih"),
            init::uniform(rng, &[4 * h, self.input], bound, device)?,
        )?;
        params.push(
            format!("{prefix}.weight_hh"),
            init::uniform(rng, &[4 * h, self.hidden_in], bound, device)?,
        )?;
        let mut b = vec![0f32; 4 * h];
        b[h..2 * h].iter_mut().for_each(|v| *v = 1.0);
        params.push(format!("{prefix}.bias"), Tensor::from_vec(b, 4 * h, device)?)?;
        Ok(())
    }

    /// One step: `x` [B, I], `h` [B, H_in], `c` [B, H] → (h', c'), each [B, H].
    pub fn forward(
        &self,
        params: &Params,
        prefix: &str,
        x: &Tensor,
        h: &Tensor,
        c: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let w_ih = params.get(&format!("{prefix}.weight_ih"))?;
        let w_hh = params.get(&format!("{prefix}.weight_hh"))?;
        let b = params.get(&format!("{prefix}.bias"))?;
        let gates = x.matmul(&w_ih.t()?)?.add(&h.matmul(&w_hh.t()?)?)?.broadcast_add(b)?;
        let n = self.hidden;
        let i = sigmoid(&gates.narrow(1, 0, n)?)?;
        let f = sigmoid(&gates.narrow(1, n, n)?)?;
        let g = gates.narrow(1, 2 * n, n)?.tanh()?;
        let o = sigmoid(&gates.narrow(1, 3 * n, n)?)?;
        let c_next = ((f * c)? + (i * g)?)?;
        let h_next = (o * c_next.tanh()?)?;
        Ok((h_next, c_next))
    }
}
