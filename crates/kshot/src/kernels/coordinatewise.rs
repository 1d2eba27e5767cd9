//! Meta Networks' meta learners: one small network applied to each of R coordinates (a weight of
//! the learner, with its preprocessed gradient as input), over fixed chunks of rows in parallel.
//! Candle would keep every [R, 4H] gate and [R, H] activation of these for the backward pass
//! (gigabytes at R ≈ 150 000); the kernels keep only their [R] outputs and recompute a chunk's
//! activations in the backward pass.
//!
//! - `coordinate_mlp(x [R, D], θ) → [R]`: y = w₃·relu(W₂ relu(W₁x + b₁) + b₂) + b₃.
//! - `coordinate_lstm(x [T, R, D], θ) → [R]`: an LSTM cell (gates i, f, g, o from
//!   x_t W_ihᵀ + h_{t−1} W_hhᵀ + b) run over the T steps from h₀ = s₀ = 0, then y = w·h_T + b_out.
//!
//! θ is the layers' weights flattened and concatenated in that order ([`MlpLayout`],
//! [`LstmLayout`]). The inputs are meta information, never differentiated: the backward pass
//! gives the gradient of θ only, from a companion op whose own backward is an error (first order,
//! as Meta Networks needs). Every chunk's weight gradient is summed in f64 and the chunks are added
//! in order, so the result does not depend on the number of threads.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, matmul, same_dtype, slice, storage, zero, Mat, Real};
use super::lstm_cell::{lstm_row, lstm_row_backward, Float};

/// Rows per chunk. Fixed, so that the order of every sum is too.
const CHUNK: usize = 1024;

/// The coordinate-wise MLP D → H → H → 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpLayout {
    pub input: usize,
    pub hidden: usize,
}

impl MlpLayout {
    /// The sizes of W₁ [H, D], b₁ [H], W₂ [H, H], b₂ [H], w₃ [1, H], b₃ [1], in θ's order.
    pub fn sizes(&self) -> [usize; 6] {
        let (d, h) = (self.input, self.hidden);
        [h * d, h, h * h, h, h, 1]
    }
}

/// The coordinate-wise LSTM D → H with its linear read-out H → 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LstmLayout {
    pub input: usize,
    pub hidden: usize,
}

impl LstmLayout {
    /// The sizes of W_ih [4H, D], W_hh [4H, H], b [4H], w_out [1, H], b_out [1], in θ's order.
    pub fn sizes(&self) -> [usize; 5] {
        let (d, h) = (self.input, self.hidden);
        [4 * h * d, 4 * h * h, 4 * h, h, 1]
    }
}

fn packed(parts: &[&Tensor], sizes: &[usize], what: &str) -> Result<Tensor> {
    if parts.len() != sizes.len() {
        bail!("{what}: expected {} weight tensors, got {}", sizes.len(), parts.len());
    }
    let mut flat = Vec::with_capacity(parts.len());
    for (i, (p, &n)) in parts.iter().zip(sizes).enumerate() {
        if p.elem_count() != n {
            bail!("{what}: weight {i} has {} elements, expected {n}", p.elem_count());
        }
        flat.push(p.flatten_all()?);
    }
    Tensor::cat(&flat, 0)
}

/// [R] outputs of the coordinate-wise MLP on `x` [R, D]; `weights` in [`MlpLayout::sizes`] order.
pub fn coordinate_mlp(x: &Tensor, weights: &[&Tensor], layout: MlpLayout) -> Result<Tensor> {
    let (_, d) = x.dims2()?;
    if d != layout.input {
        bail!("coordinate_mlp: inputs of width {d}, the layout expects {}", layout.input);
    }
    let theta = packed(weights, &layout.sizes(), "coordinate_mlp")?.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op2(&theta, Coordinatewise::Mlp(layout))
}

/// [R] outputs of the coordinate-wise LSTM over `x` [T, R, D]; `weights` in
/// [`LstmLayout::sizes`] order.
pub fn coordinate_lstm(x: &Tensor, weights: &[&Tensor], layout: LstmLayout) -> Result<Tensor> {
    let (steps, _, d) = x.dims3()?;
    if d != layout.input || steps == 0 {
        bail!(
            "coordinate_lstm: inputs {:?}, the layout expects [T ≥ 1, R, {}]",
            x.dims(),
            layout.input
        );
    }
    let theta = packed(weights, &layout.sizes(), "coordinate_lstm")?.to_dtype(x.dtype())?;
    x.contiguous()?.apply_op2(&theta, Coordinatewise::Lstm(layout))
}

#[derive(Clone, Copy)]
enum Coordinatewise {
    Mlp(MlpLayout),
    Lstm(LstmLayout),
}

impl CustomOp2 for Coordinatewise {
    fn name(&self) -> &'static str {
        "kshot-coordinatewise"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ts)?;
        dispatch!(xs, run(*self, xs, xl, ts, tl, None))
    }

    fn bwd(
        &self,
        x: &Tensor,
        theta: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if x.track_op() {
            bail!("the coordinate-wise meta learners' inputs are meta information and are not differentiated; detach them");
        }
        let d_theta = x.apply_op3(theta, &dy.contiguous()?, WeightGrad(*self))?;
        Ok((None, Some(d_theta)))
    }
}

/// The gradient of θ for the outputs' gradient: `(x, θ, dy) → dθ`.
struct WeightGrad(Coordinatewise);

impl CustomOp3 for WeightGrad {
    fn name(&self) -> &'static str {
        "kshot-coordinatewise-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ts)?;
        same_dtype(xs, ds)?;
        dispatch!(xs, run(self.0, xs, xl, ts, tl, Some((ds, dl))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        bail!("the coordinate-wise meta learners are first order: their weight gradient has no gradient")
    }
}

/// The forward pass (`dy` None: [R] outputs) or the weight gradient (`dy` Some: [len θ]).
fn run<T: Float>(
    op: Coordinatewise,
    xs: &CpuStorage,
    xl: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
    dy: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (x, theta) = (slice::<T>(xs, xl)?, slice::<T>(ts, tl)?);
    let (steps, rows, d) = match op {
        Coordinatewise::Mlp(_) => {
            let (r, d) = xl.shape().dims2()?;
            (1, r, d)
        }
        Coordinatewise::Lstm(_) => xl.shape().dims3()?,
    };
    let expected: usize = match op {
        Coordinatewise::Mlp(l) => l.sizes().iter().sum(),
        Coordinatewise::Lstm(l) => l.sizes().iter().sum(),
    };
    if theta.len() != expected {
        bail!("coordinate-wise net: θ has {} elements, expected {expected}", theta.len());
    }
    let dy = match dy {
        Some((s, l)) => {
            let dy = slice::<T>(s, l)?;
            if dy.len() != rows {
                bail!("coordinate-wise net: {} output gradients for {rows} rows", dy.len());
            }
            Some(dy)
        }
        None => None,
    };
    let inputs = Inputs { x, steps, rows, d };
    let chunks = rows.div_ceil(CHUNK);
    match dy {
        None => {
            let mut out = vec![zero::<T>(); rows];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| match op {
                Coordinatewise::Mlp(l) => mlp_chunk(l, theta, &inputs, c, out, None),
                Coordinatewise::Lstm(l) => lstm_chunk(l, theta, &inputs, c, out, None),
            });
            Ok(storage(out, rows))
        }
        Some(dy) => {
            let partials: Vec<Vec<T>> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let n = CHUNK.min(rows - c * CHUNK);
                    let mut out = vec![zero::<T>(); n];
                    let mut grad = vec![zero::<T>(); theta.len()];
                    let dy = &dy[c * CHUNK..][..n];
                    match op {
                        Coordinatewise::Mlp(l) => {
                            mlp_chunk(l, theta, &inputs, c, &mut out, Some((dy, &mut grad)))
                        }
                        Coordinatewise::Lstm(l) => {
                            lstm_chunk(l, theta, &inputs, c, &mut out, Some((dy, &mut grad)))
                        }
                    }
                    grad
                })
                .collect();
            let mut total = vec![0f64; theta.len()];
            for p in partials {
                for (t, v) in total.iter_mut().zip(p) {
                    *t += v.to_f64();
                }
            }
            let len = total.len();
            Ok(storage(total.into_iter().map(T::from_f64).collect::<Vec<T>>(), len))
        }
    }
}

/// The inputs: `steps` matrices [rows, d], step-major.
struct Inputs<'a, T> {
    x: &'a [T],
    steps: usize,
    rows: usize,
    d: usize,
}

impl<T> Inputs<'_, T> {
    /// Chunk `c`'s rows of step `t`.
    fn chunk(&self, t: usize, c: usize) -> &[T] {
        let start = c * CHUNK;
        let n = CHUNK.min(self.rows - start);
        &self.x[(t * self.rows + start) * self.d..][..n * self.d]
    }
}

/// Consecutive pieces of `theta` of the given sizes.
fn pieces<T, const N: usize>(theta: &[T], sizes: [usize; N]) -> [&[T]; N] {
    let mut rest = theta;
    sizes.map(|n| {
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        piece
    })
}

fn pieces_mut<T, const N: usize>(theta: &mut [T], sizes: [usize; N]) -> [&mut [T]; N] {
    let mut rest = theta;
    sizes.map(|n| {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n);
        rest = tail;
        piece
    })
}

/// `z[r, :] = x[r, :]·Wᵀ + b` for row-major W [cols, k].
fn affine<T: Real>(z: &mut [T], x: &[T], w: &[T], b: &[T], k: usize, accumulate: bool) {
    let cols = b.len();
    let n = z.len() / cols;
    matmul((n, cols, k), z, accumulate, Mat::rows(x, k), Mat::rows_t(w, k));
    if !accumulate {
        for row in z.chunks_exact_mut(cols) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += *b);
        }
    }
}

/// `dw [cols, k] += dzᵀ x`, `db += Σ_r dz[r]` for dz [n, cols], x [n, k].
fn affine_grad<T: Real>(dw: &mut [T], db: &mut [T], dz: &[T], x: &[T], k: usize) {
    let cols = db.len();
    let n = dz.len() / cols;
    matmul((cols, k, n), dw, true, Mat::rows_t(dz, cols), Mat::rows(x, k));
    for row in dz.chunks_exact(cols) {
        db.iter_mut().zip(row).for_each(|(d, v)| *d += *v);
    }
}

fn relu<T: Real>(x: &mut [T]) {
    x.iter_mut().for_each(|v| {
        if *v < zero() {
            *v = zero()
        }
    });
}

/// Chunk `c` of the MLP: its outputs into `out`; with `back = (dy, dθ)`, also dθ += ∂(dy·y)/∂θ.
fn mlp_chunk<T: Float>(
    layout: MlpLayout,
    theta: &[T],
    inputs: &Inputs<T>,
    c: usize,
    out: &mut [T],
    back: Option<(&[T], &mut [T])>,
) {
    let (d, h, n) = (layout.input, layout.hidden, out.len());
    let [w1, b1, w2, b2, w3, b3] = pieces(theta, layout.sizes());
    let x = inputs.chunk(0, c);
    let mut a1 = vec![zero(); n * h];
    affine(&mut a1, x, w1, b1, d, false);
    relu(&mut a1);
    let mut a2 = vec![zero(); n * h];
    affine(&mut a2, &a1, w2, b2, h, false);
    relu(&mut a2);
    for (y, row) in out.iter_mut().zip(a2.chunks_exact(h)) {
        *y = dot(row, w3) + b3[0];
    }
    let Some((dy, grad)) = back else { return };
    let [dw1, db1, dw2, db2, dw3, db3] = pieces_mut(grad, layout.sizes());
    let mut dz2 = vec![zero(); n * h];
    for ((dz, a), &g) in dz2.chunks_exact_mut(h).zip(a2.chunks_exact(h)).zip(dy) {
        for j in 0..h {
            dw3[j] += g * a[j];
            dz[j] = if a[j] > zero() { g * w3[j] } else { zero() };
        }
        db3[0] += g;
    }
    affine_grad(dw2, db2, &dz2, &a1, h);
    let mut dz1 = vec![zero(); n * h];
    matmul((n, h, h), &mut dz1, false, Mat::rows(&dz2, h), Mat::rows(w2, h));
    for (dz, a) in dz1.iter_mut().zip(&a1) {
        if *a <= zero() {
            *dz = zero();
        }
    }
    affine_grad(dw1, db1, &dz1, x, d);
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(zero(), |acc, (x, y)| acc + *x * *y)
}

/// Chunk `c` of the LSTM: its outputs into `out`; with `back = (dy, dθ)`, also dθ += ∂(dy·y)/∂θ.
fn lstm_chunk<T: Float>(
    layout: LstmLayout,
    theta: &[T],
    inputs: &Inputs<T>,
    c: usize,
    out: &mut [T],
    back: Option<(&[T], &mut [T])>,
) {
    let (d, h, n, steps) = (layout.input, layout.hidden, out.len(), inputs.steps);
    let [w_ih, w_hh, b, w_out, b_out] = pieces(theta, layout.sizes());
    let keep = back.is_some();
    // Per step, when backpropagating: the gates, s_{t−1}, tanh s_t and h_{t−1}.
    let (mut tape_gates, mut tape_s, mut tape_tanh, mut tape_h) = (vec![], vec![], vec![], vec![]);
    let (mut hs, mut s) = (vec![zero(); n * h], vec![zero(); n * h]);
    let mut tanh_s = vec![zero(); n * h];
    for t in 0..steps {
        let mut z = vec![zero(); n * 4 * h];
        affine(&mut z, inputs.chunk(t, c), w_ih, b, d, false);
        if t > 0 {
            matmul((n, 4 * h, h), &mut z, true, Mat::rows(&hs, h), Mat::rows_t(w_hh, h));
        }
        if keep {
            tape_s.push(s.clone());
            tape_h.push(hs.clone());
        }
        for r in 0..n {
            let rows = r * h..(r + 1) * h;
            lstm_row(
                &mut z[r * 4 * h..][..4 * h],
                &mut s[rows.clone()],
                &mut tanh_s[rows.clone()],
                &mut hs[rows],
            );
        }
        if keep {
            tape_gates.push(z);
            tape_tanh.push(tanh_s.clone());
        }
    }
    for (y, row) in out.iter_mut().zip(hs.chunks_exact(h)) {
        *y = dot(row, w_out) + b_out[0];
    }
    let Some((dy, grad)) = back else { return };
    let [dw_ih, dw_hh, db, dw_out, db_out] = pieces_mut(grad, layout.sizes());
    let mut dh = vec![zero(); n * h];
    for ((dh, row), &g) in dh.chunks_exact_mut(h).zip(hs.chunks_exact(h)).zip(dy) {
        for j in 0..h {
            dw_out[j] += g * row[j];
            dh[j] = g * w_out[j];
        }
        db_out[0] += g;
    }
    let mut ds = vec![zero(); n * h];
    let mut dz = vec![zero(); n * 4 * h];
    for t in (0..steps).rev() {
        for r in 0..n {
            let rows = r * h..(r + 1) * h;
            lstm_row_backward(
                &tape_gates[t][r * 4 * h..][..4 * h],
                &tape_s[t][rows.clone()],
                &tape_tanh[t][rows.clone()],
                &dh[rows.clone()],
                &mut ds[rows],
                &mut dz[r * 4 * h..][..4 * h],
            );
        }
        affine_grad(dw_ih, db, &dz, inputs.chunk(t, c), d);
        if t > 0 {
            // h_0 = 0: the first step adds nothing to dW_hh, and nothing flows past it.
            matmul((4 * h, h, n), dw_hh, true, Mat::rows_t(&dz, 4 * h), Mat::rows(&tape_h[t], h));
            matmul((n, h, 4 * h), &mut dh, false, Mat::rows(&dz, 4 * h), Mat::rows(w_hh, h));
        }
    }
}
