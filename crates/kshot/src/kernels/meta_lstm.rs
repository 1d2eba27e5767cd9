//! The meta-learner of [`crate::methods::meta_lstm`] run over the learner's P coordinates in fused
//! loops (rayon over fixed chunks of coordinates), with its backward pass through the T steps.
//!
//! Per coordinate and step t = 1…T, with the learner's gradient ∇_t and loss L_t given (first order:
//! they are inputs, not differentiated), from h_0 = s_0 = 0, i_0 = f_0 = 0 and the initial weights c_0:
//!
//! ```text
//! x_t = [pre(∇_t), pre(L_t)]                                         (4 values)
//! (a_i, a_f, a_g, a_o) = (σ, σ, tanh, σ)(x_t·W_ih + h_{t−1}·W_hh + b)  (4 gates of H)
//! s_t = a_f ⊙ s_{t−1} + a_i ⊙ a_g,   h_t = a_o ⊙ tanh s_t
//! i_t = σ(u_i),  u_i = W_I·[h_t, x_t, c_{t−1}, i_{t−1}] + b_I   (f_t, u_f likewise with W_F, b_F)
//! c_t = f_t c_{t−1} − i_t ∇_t
//! ```
//!
//! Backward from δc_T = dL/dc_T, for t = T…1, with δh_t, δs_t, δi_t, δf_t carried from step t+1
//! (zero at T) and δz the gradient of the gates' pre-activations:
//!
//! ```text
//! δu_i = (δi_t − δc_t ∇_t)·i_t(1 − i_t),   δu_f = (δf_t + δc_t c_{t−1})·f_t(1 − f_t)
//! δW_I += δu_i·[h_t, x_t, c_{t−1}, i_{t−1}],  δb_I += δu_i        (W_F, b_F likewise)
//! δh_t += δu_i W_I[h] + δu_f W_F[h]
//! δc_{t−1} = δc_t f_t + δu_i W_I[c] + δu_f W_F[c],   δi_{t−1} = δu_i W_I[i],   δf_{t−1} = δu_f W_F[f]
//! δs_t += δh_t ⊙ a_o ⊙ (1 − tanh² s_t),   δs_{t−1} = δs_t ⊙ a_f
//! δz = (δs_t ⊙ a_g ⊙ a_i(1−a_i),  δs_t ⊙ s_{t−1} ⊙ a_f(1−a_f),  δs_t ⊙ a_i ⊙ (1−a_g²),  δh_t ⊙ tanh s_t ⊙ a_o(1−a_o))
//! δW_ih += x_tᵀ δz,   δW_hh += h_{t−1}ᵀ δz,   δb += δz,   δh_{t−1} = δz W_hhᵀ
//! ```
//!
//! and dL/dc_0 = δc_0. Per step the tape keeps the gates, s_t, tanh s_t, c_{t−1}, i_t, f_t and ∇_t;
//! h_t is recomputed as a_o ⊙ tanh s_t. The shared weights' gradients are summed per chunk and the
//! chunk sums added in chunk order (in f64), so results do not depend on the number of threads.

use candle_core::{bail, DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::cpu::{matmul, zero, Mat, Real};
use super::lstm_cell::{lstm_row, lstm_row_backward, one, sigmoid, Float};

/// Coordinates per chunk. Fixed, so that the order of every sum is too.
const CHUNK: usize = 1024;

/// The meta-learner's shared weights (H hidden units), or their gradients.
#[derive(Debug, Clone)]
pub struct MetaLstmWeights {
    /// [4, 4H]: rows pre(∇)₁, pre(∇)₂, pre(L)₁, pre(L)₂; columns the gates i, f, g, o.
    pub w_ih: Tensor,
    /// [H, 4H]
    pub w_hh: Tensor,
    /// [4H]
    pub bias: Tensor,
    /// [H + 6, 1], over [h, x, c_{t−1}, i_{t−1}].
    pub gate_i_weight: Tensor,
    /// [1]
    pub gate_i_bias: Tensor,
    /// [H + 6, 1], over [h, x, c_{t−1}, f_{t−1}].
    pub gate_f_weight: Tensor,
    /// [1]
    pub gate_f_bias: Tensor,
}

/// The gradient of a loss with respect to c_0 and the shared weights, from [`MetaLstmUnroll::backward`].
pub struct MetaLstmGrads {
    /// [P]
    pub cell: Tensor,
    pub weights: MetaLstmWeights,
}

/// The meta-learner unrolled step by step from c_0; see the module documentation.
pub struct MetaLstmUnroll(Inner);

enum Inner {
    F32(Unroll<f32>),
    F64(Unroll<f64>),
}

macro_rules! each {
    ($inner:expr, $u:ident => $body:expr) => {
        match $inner {
            Inner::F32($u) => $body,
            Inner::F64($u) => $body,
        }
    };
}

impl MetaLstmUnroll {
    /// Starts from the learner's weights `c0` (P elements, f32 or f64, which the unroll keeps).
    /// With `keep_tape`, each step keeps what [`MetaLstmUnroll::backward`] needs.
    pub(crate) fn new(
        weights: &MetaLstmWeights,
        c0: &Tensor,
        preprocess_p: f64,
        keep_tape: bool,
    ) -> Result<Self> {
        Ok(Self(match c0.dtype() {
            DType::F32 => Inner::F32(Unroll::new(weights, c0, preprocess_p, keep_tape)?),
            DType::F64 => Inner::F64(Unroll::new(weights, c0, preprocess_p, keep_tape)?),
            dt => bail!("the Meta-LSTM kernel supports f32 and f64, not {dt:?}"),
        }))
    }

    /// The current weights c_t, [P].
    pub fn cell(&self) -> Result<Tensor> {
        each!(&self.0, u => u.cell())
    }

    /// One update c_{t−1} → c_t for the learner's gradient `grad` (P elements) and loss `loss` at c_{t−1}.
    pub fn step(&mut self, grad: &Tensor, loss: f64) -> Result<()> {
        each!(&mut self.0, u => u.step(grad, loss))
    }

    /// The gradient with respect to c_0 and the shared weights of a loss whose gradient with
    /// respect to the current c_t is `d_cell` (P elements).
    pub fn backward(self, d_cell: &Tensor) -> Result<MetaLstmGrads> {
        each!(self.0, u => u.backward(d_cell))
    }
}

/// Andrychowicz et al.'s preprocessing, as [`crate::methods::meta_lstm::preprocess`] computes it.
fn preprocess<T: Float>(x: T, p: f64) -> [T; 2] {
    let abs = x.abs();
    if abs >= T::from_f64((-p).exp()) {
        let sign = if x > zero() { one() } else { -one::<T>() };
        [abs.ln() * T::from_f64(1.0 / p), sign]
    } else {
        [-one::<T>(), x * T::from_f64(p.exp())]
    }
}

/// [n, 4] rows x_t = [pre(∇), pre(L)].
fn inputs<T: Float>(grad: &[T], pre_loss: [T; 2], p: f64) -> Vec<T> {
    let mut x = vec![zero(); 4 * grad.len()];
    for (x, &g) in x.chunks_exact_mut(4).zip(grad) {
        let [a, b] = preprocess(g, p);
        x.copy_from_slice(&[a, b, pre_loss[0], pre_loss[1]]);
    }
    x
}

fn to_vec<T: Real>(t: &Tensor) -> Result<Vec<T>> {
    t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
}

/// A layer-2 gate: weights over [h, x, c_{t−1}, gate_{t−1}] and a bias.
#[derive(Clone)]
struct Gate<T> {
    w: Vec<T>,
    b: T,
}

impl<T: Float> Gate<T> {
    fn zeros(hidden: usize) -> Self {
        Self { w: vec![zero(); hidden + 6], b: zero() }
    }

    /// The weights over h.
    fn over_h(&self) -> &[T] {
        &self.w[..self.w.len() - 6]
    }

    /// The logits of `n` rows: W·[h, x, c, prev] + b with the h term `uh` given.
    fn logits(&self, uh: Vec<T>, x: &[T], c: &[T], prev: &[T]) -> Vec<T> {
        let w = &self.w[self.w.len() - 6..];
        let mut u = uh;
        for (((u, x), c), prev) in u.iter_mut().zip(x.chunks_exact(4)).zip(c).zip(prev) {
            *u += self.b
                + x[0] * w[0]
                + x[1] * w[1]
                + x[2] * w[2]
                + x[3] * w[3]
                + *c * w[4]
                + *prev * w[5];
        }
        u
    }

    /// Adds Σ_rows du·[x, c, prev] to this gradient and Σ du to its bias (the h term is a matmul).
    fn accumulate(&mut self, du: &[T], x: &[T], c: &[T], prev: &[T]) {
        let n = self.w.len() - 6;
        let (g, b) = (&mut self.w[n..], &mut self.b);
        for (((du, x), c), prev) in du.iter().zip(x.chunks_exact(4)).zip(c).zip(prev) {
            for k in 0..4 {
                g[k] += *du * x[k];
            }
            g[4] += *du * *c;
            g[5] += *du * *prev;
            *b += *du;
        }
    }
}

/// The shared weights as plain vectors (or their gradients).
#[derive(Clone)]
struct Weights<T> {
    hidden: usize,
    w_ih: Vec<T>,
    w_hh: Vec<T>,
    bias: Vec<T>,
    gate_i: Gate<T>,
    gate_f: Gate<T>,
}

impl<T: Float> Weights<T> {
    fn zeros(hidden: usize) -> Self {
        let g = 4 * hidden;
        Self {
            hidden,
            w_ih: vec![zero(); 4 * g],
            w_hh: vec![zero(); hidden * g],
            bias: vec![zero(); g],
            gate_i: Gate::zeros(hidden),
            gate_f: Gate::zeros(hidden),
        }
    }

    fn from_tensors(w: &MetaLstmWeights) -> Result<Self> {
        let hidden = w.w_hh.dim(0)?;
        let mut out = Self::zeros(hidden);
        let sources = [
            &w.w_ih,
            &w.w_hh,
            &w.bias,
            &w.gate_i_weight,
            &w.gate_i_bias,
            &w.gate_f_weight,
            &w.gate_f_bias,
        ];
        for (dst, src) in out.parts_mut().into_iter().zip(sources) {
            let v = to_vec::<T>(src)?;
            if v.len() != dst.len() {
                bail!("Meta-LSTM weight {:?} does not fit {hidden} hidden units", src.dims());
            }
            dst.copy_from_slice(&v);
        }
        Ok(out)
    }

    fn to_tensors(&self, device: &Device) -> Result<MetaLstmWeights> {
        let (h, g) = (self.hidden, 4 * self.hidden);
        let t = |v: &[T], shape: &[usize]| Tensor::from_slice(v, shape, device);
        let [w_ih, w_hh, bias, wi, bi, wf, bf] = self.parts();
        Ok(MetaLstmWeights {
            w_ih: t(w_ih, &[4, g])?,
            w_hh: t(w_hh, &[h, g])?,
            bias: t(bias, &[g])?,
            gate_i_weight: t(wi, &[h + 6, 1])?,
            gate_i_bias: t(bi, &[1])?,
            gate_f_weight: t(wf, &[h + 6, 1])?,
            gate_f_bias: t(bf, &[1])?,
        })
    }

    fn parts(&self) -> [&[T]; 7] {
        [
            &self.w_ih,
            &self.w_hh,
            &self.bias,
            &self.gate_i.w,
            std::slice::from_ref(&self.gate_i.b),
            &self.gate_f.w,
            std::slice::from_ref(&self.gate_f.b),
        ]
    }

    fn parts_mut(&mut self) -> [&mut [T]; 7] {
        [
            &mut self.w_ih,
            &mut self.w_hh,
            &mut self.bias,
            &mut self.gate_i.w,
            std::slice::from_mut(&mut self.gate_i.b),
            &mut self.gate_f.w,
            std::slice::from_mut(&mut self.gate_f.b),
        ]
    }

    /// Σ `partials`, added in order in f64.
    fn sum_in_order(hidden: usize, partials: &[Self]) -> Self {
        let mut out = Self::zeros(hidden);
        let mut acc: Vec<Vec<f64>> = out.parts().iter().map(|p| vec![0.0; p.len()]).collect();
        for partial in partials {
            for (a, p) in acc.iter_mut().zip(partial.parts()) {
                for (a, v) in a.iter_mut().zip(p) {
                    *a += v.to_f64();
                }
            }
        }
        for (dst, a) in out.parts_mut().into_iter().zip(acc) {
            for (d, a) in dst.iter_mut().zip(a) {
                *d = T::from_f64(a);
            }
        }
        out
    }
}

/// What the backward pass needs of one step, for the rows of a chunk.
struct Step<T> {
    /// [n, 4H]: a_i, a_f, a_g, a_o after their non-linearities.
    gates: Vec<T>,
    /// [n, H]: s_t and tanh s_t.
    s: Vec<T>,
    tanh_s: Vec<T>,
    /// [n]
    c_prev: Vec<T>,
    i: Vec<T>,
    f: Vec<T>,
    grad: Vec<T>,
}

/// The state of `n` coordinates and, when kept, their tape.
struct Chunk<T> {
    /// [n, H]
    h: Vec<T>,
    s: Vec<T>,
    /// [n]
    c: Vec<T>,
    i: Vec<T>,
    f: Vec<T>,
    tape: Vec<Step<T>>,
}

impl<T: Float> Chunk<T> {
    fn new(c0: &[T], hidden: usize) -> Self {
        let n = c0.len();
        Self {
            h: vec![zero(); n * hidden],
            s: vec![zero(); n * hidden],
            c: c0.to_vec(),
            i: vec![zero(); n],
            f: vec![zero(); n],
            tape: Vec::new(),
        }
    }

    fn forward(&mut self, w: &Weights<T>, grad: &[T], pre_loss: [T; 2], p: f64, keep_tape: bool) {
        let (n, hd, g) = (self.c.len(), w.hidden, 4 * w.hidden);
        let x = inputs(grad, pre_loss, p);
        let mut z = vec![zero(); n * g];
        for row in z.chunks_exact_mut(g) {
            row.copy_from_slice(&w.bias);
        }
        matmul((n, g, 4), &mut z, true, Mat::rows(&x, 4), Mat::rows(&w.w_ih, g));
        matmul((n, g, hd), &mut z, true, Mat::rows(&self.h, hd), Mat::rows(&w.w_hh, g));
        let mut tanh_s = vec![zero(); n * hd];
        let states = self
            .s
            .chunks_exact_mut(hd)
            .zip(tanh_s.chunks_exact_mut(hd))
            .zip(self.h.chunks_exact_mut(hd));
        for (z, ((s, tanh_s), h)) in z.chunks_exact_mut(g).zip(states) {
            lstm_row(z, s, tanh_s, h);
        }
        let u_i = w.gate_i.logits(times(&self.h, w.gate_i.over_h()), &x, &self.c, &self.i);
        let u_f = w.gate_f.logits(times(&self.h, w.gate_f.over_h()), &x, &self.c, &self.f);
        let c_prev = if keep_tape { self.c.clone() } else { Vec::new() };
        for r in 0..n {
            let (i, f) = (sigmoid(u_i[r]), sigmoid(u_f[r]));
            self.c[r] = f * self.c[r] - i * grad[r];
            (self.i[r], self.f[r]) = (i, f);
        }
        if keep_tape {
            let (s, i, f, grad) = (self.s.clone(), self.i.clone(), self.f.clone(), grad.to_vec());
            self.tape.push(Step { gates: z, s, tanh_s, c_prev, i, f, grad });
        }
    }

    /// δc_0 for δc_T = `d_cell`, and this chunk's share of the shared weights' gradients.
    fn backward(
        self,
        w: &Weights<T>,
        d_cell: &[T],
        pre_loss: &[[T; 2]],
        p: f64,
    ) -> (Vec<T>, Weights<T>) {
        let (n, hd, g) = (self.c.len(), w.hidden, 4 * w.hidden);
        let mut grads = Weights::zeros(hd);
        let mut dc = d_cell.to_vec();
        let (mut dh, mut ds) = (vec![zero(); n * hd], vec![zero(); n * hd]);
        let (mut di, mut df) = (vec![zero(); n], vec![zero(); n]);
        let (mut du_i, mut du_f) = (vec![zero(); n], vec![zero(); n]);
        let mut dz = vec![zero(); n * g];
        let (zeros_n, zeros_nh) = (vec![zero(); n], vec![zero(); n * hd]);
        let mut h = self.tape.last().map_or_else(Vec::new, |step| hidden_state(step, hd));
        for (t, step) in self.tape.iter().enumerate().rev() {
            let prev = t.checked_sub(1).map(|k| &self.tape[k]);
            let h_prev = prev.map_or_else(|| zeros_nh.clone(), |step| hidden_state(step, hd));
            let (s_prev, i_prev, f_prev) =
                prev.map_or((&zeros_nh, &zeros_n, &zeros_n), |q| (&q.s, &q.i, &q.f));
            let x = inputs(&step.grad, pre_loss[t], p);
            // Layer 2: δu, then δc_{t−1}, δi_{t−1}, δf_{t−1}, and δh_t += δu W[h].
            let (wi, wf) = (&w.gate_i.w, &w.gate_f.w);
            for r in 0..n {
                let (i, f) = (step.i[r], step.f[r]);
                du_i[r] = (di[r] - dc[r] * step.grad[r]) * i * (one::<T>() - i);
                du_f[r] = (df[r] + dc[r] * step.c_prev[r]) * f * (one::<T>() - f);
                dc[r] = dc[r] * f + du_i[r] * wi[hd + 4] + du_f[r] * wf[hd + 4];
                di[r] = du_i[r] * wi[hd + 5];
                df[r] = du_f[r] * wf[hd + 5];
            }
            grads.gate_i.accumulate(&du_i, &x, &step.c_prev, i_prev);
            grads.gate_f.accumulate(&du_f, &x, &step.c_prev, f_prev);
            matmul(
                (hd, 1, n),
                &mut grads.gate_i.w[..hd],
                true,
                Mat::rows_t(&h, hd),
                Mat::rows(&du_i, 1),
            );
            matmul(
                (hd, 1, n),
                &mut grads.gate_f.w[..hd],
                true,
                Mat::rows_t(&h, hd),
                Mat::rows(&du_f, 1),
            );
            matmul(
                (n, hd, 1),
                &mut dh,
                true,
                Mat::rows(&du_i, 1),
                Mat::rows(w.gate_i.over_h(), hd),
            );
            matmul(
                (n, hd, 1),
                &mut dh,
                true,
                Mat::rows(&du_f, 1),
                Mat::rows(w.gate_f.over_h(), hd),
            );
            // Layer 1.
            let rows = step
                .gates
                .chunks_exact(g)
                .zip(s_prev.chunks_exact(hd))
                .zip(step.tanh_s.chunks_exact(hd));
            let deltas =
                dh.chunks_exact(hd).zip(ds.chunks_exact_mut(hd)).zip(dz.chunks_exact_mut(g));
            for (((gates, s_prev), tanh_s), ((dh, ds), dz)) in rows.zip(deltas) {
                lstm_row_backward(gates, s_prev, tanh_s, dh, ds, dz);
            }
            for row in dz.chunks_exact(g) {
                for (b, d) in grads.bias.iter_mut().zip(row) {
                    *b += *d;
                }
            }
            matmul((4, g, n), &mut grads.w_ih, true, Mat::rows_t(&x, 4), Mat::rows(&dz, g));
            if t > 0 {
                matmul(
                    (hd, g, n),
                    &mut grads.w_hh,
                    true,
                    Mat::rows_t(&h_prev, hd),
                    Mat::rows(&dz, g),
                );
                matmul((n, hd, g), &mut dh, false, Mat::rows(&dz, g), Mat::rows_t(&w.w_hh, g));
            }
            h = h_prev;
        }
        (dc, grads)
    }
}

/// [n] products of the rows of `h` [n, H] with `w` [H].
fn times<T: Float>(h: &[T], w: &[T]) -> Vec<T> {
    let hd = w.len();
    let mut out = vec![zero(); h.len() / hd.max(1)];
    matmul((out.len(), 1, hd), &mut out, false, Mat::rows(h, hd), Mat::rows(w, 1));
    out
}

/// h_t = a_o ⊙ tanh s_t of a step's rows.
fn hidden_state<T: Float>(step: &Step<T>, hd: usize) -> Vec<T> {
    let mut h = step.tanh_s.clone();
    for (r, h) in h.chunks_exact_mut(hd).enumerate() {
        let a_o = &step.gates[(4 * r + 3) * hd..(4 * r + 4) * hd];
        for (h, o) in h.iter_mut().zip(a_o) {
            *h *= *o;
        }
    }
    h
}

struct Unroll<T> {
    weights: Weights<T>,
    p: f64,
    keep_tape: bool,
    chunks: Vec<Chunk<T>>,
    /// pre(L_t) of each step taken.
    pre_loss: Vec<[T; 2]>,
    size: usize,
    device: Device,
}

impl<T: Float> Unroll<T> {
    fn new(weights: &MetaLstmWeights, c0: &Tensor, p: f64, keep_tape: bool) -> Result<Self> {
        let weights = Weights::from_tensors(weights)?;
        let device = c0.device().clone();
        let c0 = to_vec::<T>(c0)?;
        if weights.hidden == 0 {
            bail!("the Meta-LSTM needs at least 1 hidden unit");
        }
        let chunks = c0.chunks(CHUNK).map(|c| Chunk::new(c, weights.hidden)).collect();
        Ok(Self { weights, p, keep_tape, chunks, pre_loss: Vec::new(), size: c0.len(), device })
    }

    fn cell(&self) -> Result<Tensor> {
        let c: Vec<T> = self.chunks.iter().flat_map(|ch| ch.c.iter().copied()).collect();
        Tensor::from_vec(c, self.size, &self.device)
    }

    fn step(&mut self, grad: &Tensor, loss: f64) -> Result<()> {
        let grad = to_vec::<T>(grad)?;
        if grad.len() != self.size {
            bail!(
                "Meta-LSTM step: a gradient of {} elements for {} weights",
                grad.len(),
                self.size
            );
        }
        let pre_loss = preprocess(T::from_f64(loss), self.p);
        let (w, p, keep) = (&self.weights, self.p, self.keep_tape);
        self.chunks
            .par_iter_mut()
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(chunk, grad)| chunk.forward(w, grad, pre_loss, p, keep));
        self.pre_loss.push(pre_loss);
        Ok(())
    }

    fn backward(self, d_cell: &Tensor) -> Result<MetaLstmGrads> {
        if !self.keep_tape {
            bail!("Meta-LSTM backward: this unroll kept no tape");
        }
        let d_cell = to_vec::<T>(d_cell)?;
        if d_cell.len() != self.size {
            bail!(
                "Meta-LSTM backward: a gradient of {} elements for {} weights",
                d_cell.len(),
                self.size
            );
        }
        let (w, pre_loss, p) = (&self.weights, &self.pre_loss, self.p);
        let parts: Vec<(Vec<T>, Weights<T>)> = self
            .chunks
            .into_par_iter()
            .zip(d_cell.par_chunks(CHUNK))
            .map(|(chunk, d)| chunk.backward(w, d, pre_loss, p))
            .collect();
        let mut cell = Vec::with_capacity(self.size);
        let mut partials = Vec::with_capacity(parts.len());
        for (dc, grads) in parts {
            cell.extend(dc);
            partials.push(grads);
        }
        let weights = Weights::sum_in_order(w.hidden, &partials);
        Ok(MetaLstmGrads {
            cell: Tensor::from_vec(cell, self.size, &self.device)?,
            weights: weights.to_tensors(&self.device)?,
        })
    }
}
