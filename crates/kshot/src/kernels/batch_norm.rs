//! Training-mode batch norm fused with a (leaky) ReLU. Per channel, over N = B·H·W elements:
//! x̂ = (x - μ)·s with s = 1/√(σ² + ε) (μ, σ² summed in f64, σ² biased), z = γ·x̂ + β, and
//! y = z where z > 0, else leak·z: leak 0 is ReLU (Conv4), 0.1 ResNet-12's LeakyReLU, 1 no
//! activation at all (plain batch norm). The slope m = 1 or leak is locally constant, so every
//! formula below holds for any leak with gz = m·dy.
//!
//! The forward, the first-order backward and its own derivative (second order, for MAML) are
//! fused kernels. Derivatives of third order are not implemented and fail with candle's error.
//! γ and β travel stacked as one [2, C] tensor so that each op has at most three inputs.

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, same_dtype, slice, storage, zero, Real};
use super::simd::multiversion;
use crate::nn::ops::BatchStats;

pub fn batch_norm_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    batch_norm_leaky_relu_train(x, gamma, beta, eps, 0.0)
}

pub fn batch_norm_leaky_relu_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    leak: f64,
) -> Result<(Tensor, BatchStats)> {
    let saved = BnReluTrain::forward_leaky(x, gamma, beta, eps, leak)?;
    let stats = saved.batch_stats()?;
    Ok((saved.y, stats))
}

/// A training-mode batch norm + ReLU forward pass with what its backward needs, for callers that
/// write the backward pass themselves (see [`BnReluTrain::vjp`]).
pub struct BnReluTrain {
    pub y: Tensor,
    x: Tensor,
    gb: Tensor,
    stats: Arc<OnceLock<Stats>>,
    leak: f64,
}

impl BnReluTrain {
    pub fn forward(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Self> {
        Self::forward_leaky(x, gamma, beta, eps, 0.0)
    }

    /// With a LeakyReLU of negative slope `leak` (0: ReLU; 1: no activation).
    pub fn forward_leaky(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
        leak: f64,
    ) -> Result<Self> {
        let c = x.dims4()?.1;
        if gamma.dims() != [c] || beta.dims() != [c] {
            bail!("batch norm: gamma {:?} and beta {:?} must be [{c}]", gamma.dims(), beta.dims());
        }
        let x = x.contiguous()?;
        let gb = Tensor::stack(&[gamma, beta], 0)?;
        let stats = Arc::new(OnceLock::new());
        let y = x.apply_op2(&gb, BnRelu { eps, leak, stats: stats.clone() })?;
        Ok(Self { y, x, gb, stats, leak })
    }

    pub fn batch_stats(&self) -> Result<BatchStats> {
        let (b, _, h, w) = self.x.dims4()?;
        let s: &Stats = self.stats.get().expect("the forward pass sets the statistics");
        Ok(BatchStats { mean: s.mean.clone(), var: s.var.clone(), count: b * h * w })
    }

    /// (dx, dγ, dβ) for the output gradient `dy`, as differentiable ops: the same ops the custom
    /// op's own backward runs, so derivatives of these are exact to second order as well.
    pub fn vjp(&self, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (dx, dgb) = bn_relu_vjp(&self.x, &self.gb, &self.stats, self.leak, dy)?;
        Ok((dx, dgb.get(0)?, dgb.get(1)?))
    }
}

fn bn_relu_vjp(
    x: &Tensor,
    gb: &Tensor,
    stats: &Arc<OnceLock<Stats>>,
    leak: f64,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let packed = x.apply_op3(gb, &dy.contiguous()?, BnReluBwd { stats: stats.clone(), leak })?;
    let n = x.elem_count();
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dgb = packed.narrow(0, n, gb.elem_count())?.reshape(gb.shape())?;
    Ok((dx, dgb))
}

#[derive(Debug)]
struct Stats {
    mean: Vec<f64>,
    var: Vec<f64>,
    inv_std: Vec<f64>,
}

impl Stats {
    /// z = scale·x + shift for channel `ch`, with γ and β from the stacked `gb`.
    fn affine<T: Real>(&self, gb: &[T], ch: usize) -> (f64, f64) {
        let c = self.mean.len();
        let scale = gb[ch].to_f64() * self.inv_std[ch];
        (scale, gb[c + ch].to_f64() - scale * self.mean[ch])
    }
}

/// The slope of the activation at pre-activation `z`: 1 where z > 0, else `leak`.
#[inline(always)]
fn slope(z: f64, leak: f64) -> f64 {
    if z > 0.0 {
        1.0
    } else {
        leak
    }
}

/// Dimensions of a [B, C, H, W] input: (B, C, H·W).
fn bchw(l: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((b, c, h * w))
}

/// The `hw`-long planes of channel `ch` across the batch.
fn planes<T>(x: &[T], c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[T]> {
    x.chunks(c * hw).map(move |img| &img[ch * hw..][..hw])
}

multiversion! {
    /// Σ x in f64, over 8 independent lanes (element i in lane i mod 8) so that the additions
    /// pipeline and vectorise.
    fn sum<T: Real>(x: &[T]) -> f64 {
        let mut lanes = [0.0; 8];
        let blocks = x.chunks_exact(8);
        let mut tail = 0.0;
        for v in blocks.remainder() {
            tail += v.wide();
        }
        for block in blocks {
            for (acc, v) in lanes.iter_mut().zip(block) {
                *acc += v.wide();
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

multiversion! {
    /// Σ (x − mean)² in f64, in the lanes of [`sum`].
    fn sum_squared_deviation<T: Real>(x: &[T], mean: f64) -> f64 {
        let mut lanes = [0.0; 8];
        let blocks = x.chunks_exact(8);
        let mut tail = 0.0;
        for v in blocks.remainder() {
            let d = v.wide() - mean;
            tail += d * d;
        }
        for block in blocks {
            for (acc, v) in lanes.iter_mut().zip(block) {
                let d = v.wide() - mean;
                *acc += d * d;
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

multiversion! {
    /// y = z where z > 0, else leak·z, for z = x·scale + shift: one plane of the forward pass.
    fn scale_shift_leaky<T: Real>(y: &mut [T], x: &[T], scale: f64, shift: f64, leak: f64) {
        for (y, &x) in y.iter_mut().zip(x) {
            let z = x.wide() * scale + shift;
            *y = T::narrow(if z > 0.0 { z } else { leak * z });
        }
    }
}

/// A channel's batch-norm constants: z = scale·x + shift, x̂ = (x − mean)·inv_std.
#[derive(Clone, Copy)]
struct Channel {
    scale: f64,
    shift: f64,
    mean: f64,
    inv_std: f64,
    leak: f64,
}

impl Stats {
    fn channel<T: Real>(&self, gb: &[T], ch: usize, leak: f64) -> Channel {
        let (scale, shift) = self.affine(gb, ch);
        Channel { scale, shift, mean: self.mean[ch], inv_std: self.inv_std[ch], leak }
    }
}

multiversion! {
    /// Adds one plane to a channel's backward sums: Σ gz into `a`, Σ gz·x̂ into `b`, element i
    /// in lane i mod 4.
    fn backward_sums<T: Real>(x: &[T], dy: &[T], k: Channel, a: &mut [f64; 4], b: &mut [f64; 4]) {
        let (xs, dys) = (x.chunks_exact(4), dy.chunks_exact(4));
        let (x_tail, dy_tail) = (xs.remainder(), dys.remainder());
        for (x, dy) in xs.zip(dys) {
            for i in 0..4 {
                let x = x[i].wide();
                let gz = slope(x * k.scale + k.shift, k.leak) * dy[i].wide();
                a[i] += gz;
                b[i] += gz * (x - k.mean) * k.inv_std;
            }
        }
        for (i, (&x, &dy)) in x_tail.iter().zip(dy_tail).enumerate() {
            let x = x.wide();
            let gz = slope(x * k.scale + k.shift, k.leak) * dy.wide();
            a[i] += gz;
            b[i] += gz * (x - k.mean) * k.inv_std;
        }
    }
}

multiversion! {
    /// dx = scale·(gz − a_n − x̂·b_n) over one plane, a_n = Σ gz / N, b_n = Σ gz·x̂ / N.
    fn backward_dx<T: Real>(dx: &mut [T], x: &[T], dy: &[T], k: Channel, a_n: f64, b_n: f64) {
        for (dx, (&x, &dy)) in dx.iter_mut().zip(x.iter().zip(dy)) {
            let x = x.wide();
            let gz = slope(x * k.scale + k.shift, k.leak) * dy.wide();
            *dx = T::narrow(k.scale * (gz - a_n - (x - k.mean) * k.inv_std * b_n));
        }
    }
}

fn channel_stats<T: Real>(x: &[T], (b, c, hw): (usize, usize, usize), eps: f64) -> Stats {
    let n = (b * hw) as f64;
    let (mean, var): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = planes(x, c, hw, ch).map(sum).sum::<f64>() / n;
            let var = planes(x, c, hw, ch).map(|p| sum_squared_deviation(p, mean)).sum::<f64>() / n;
            (mean, var)
        })
        .unzip();
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    Stats { mean, var, inv_std }
}

struct BnRelu {
    eps: f64,
    leak: f64,
    stats: Arc<OnceLock<Stats>>,
}

impl CustomOp2 for BnRelu {
    fn name(&self) -> &'static str {
        "kshot-batch-norm-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, gs)?;
        dispatch!(xs, bn_relu_fwd(self, xs, xl, gs, gl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dgb) = bn_relu_vjp(x, gb, &self.stats, self.leak, dy)?;
        Ok((Some(dx), Some(dgb)))
    }
}

fn bn_relu_fwd<T: Real>(
    op: &BnRelu,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, gb) = (slice::<T>(xs, xl)?, slice::<T>(gs, gl)?);
    let dims @ (_, c, hw) = bchw(xl)?;
    let stats = op.stats.get_or_init(|| channel_stats(x, dims, op.eps));
    let mut y = vec![zero::<T>(); x.len()];
    if !y.is_empty() {
        y.par_chunks_mut(c * hw).zip(x.par_chunks(c * hw)).for_each(|(y, x)| {
            for (ch, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                let (scale, shift) = stats.affine(gb, ch);
                scale_shift_leaky(y, x, scale, shift, op.leak);
            }
        });
    }
    Ok(storage(y, xl.shape().clone()))
}

/// First-order backward of [`BnRelu`]: (x, [γ; β], dy) → [dx (flattened), dγ, dβ], with
/// gz = m·dy, dβ = Σ gz, dγ = Σ gz·x̂, dx = γ·s·(gz - dβ/N - x̂·dγ/N).
struct BnReluBwd {
    stats: Arc<OnceLock<Stats>>,
    leak: f64,
}

impl BnReluBwd {
    fn stats(&self) -> &Stats {
        self.stats.get().expect("backward runs after the forward pass")
    }
}

impl CustomOp3 for BnReluBwd {
    fn name(&self) -> &'static str {
        "kshot-batch-norm-relu-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, gs)?;
        same_dtype(xs, ds)?;
        dispatch!(xs, bn_relu_bwd_fwd(self.stats(), self.leak, xs, xl, gs, gl, ds, dl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gb: &Tensor,
        dy: &Tensor,
        _: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let numel = x.elem_count();
        let dyu = Tensor::cat(&[&dy.flatten_all()?, &u.flatten_all()?], 0)?;
        let packed =
            x.apply_op3(gb, &dyu, BnReluVjp { stats: self.stats.clone(), leak: self.leak })?;
        let d_x = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let d_gb = packed.narrow(0, numel, gb.elem_count())?.reshape(gb.shape())?;
        let d_dy = packed.narrow(0, numel + gb.elem_count(), numel)?.reshape(dy.shape())?;
        Ok((Some(d_x), Some(d_gb), Some(d_dy)))
    }
}

#[allow(clippy::too_many_arguments)]
fn bn_relu_bwd_fwd<T: Real>(
    stats: &Stats,
    leak: f64,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, gb, dy) = (slice::<T>(xs, xl)?, slice::<T>(gs, gl)?, slice::<T>(ds, dl)?);
    let (b, c, hw) = bchw(xl)?;
    let n = (b * hw) as f64;
    let (sum_gz, sum_gz_xhat): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = stats.channel(gb, ch, leak);
            let (mut a, mut bv) = ([0.0; 4], [0.0; 4]);
            for (x, dy) in planes(x, c, hw, ch).zip(planes(dy, c, hw, ch)) {
                backward_sums(x, dy, k, &mut a, &mut bv);
            }
            (a.iter().sum::<f64>(), bv.iter().sum::<f64>())
        })
        .unzip();
    let mut out = vec![zero::<T>(); x.len() + 2 * c];
    let (dx, dgb) = out.split_at_mut(x.len());
    if !dx.is_empty() {
        dx.par_chunks_mut(c * hw).zip(x.par_chunks(c * hw).zip(dy.par_chunks(c * hw))).for_each(
            |(dx, (x, dy))| {
                for (ch, (dx, (x, dy))) in
                    dx.chunks_mut(hw).zip(x.chunks(hw).zip(dy.chunks(hw))).enumerate()
                {
                    let k = stats.channel(gb, ch, leak);
                    backward_dx(dx, x, dy, k, sum_gz[ch] / n, sum_gz_xhat[ch] / n);
                }
            },
        );
    }
    for ch in 0..c {
        dgb[ch] = T::from_f64(sum_gz_xhat[ch]);
        dgb[c + ch] = T::from_f64(sum_gz[ch]);
    }
    Ok(storage(out, x.len() + 2 * c))
}

/// Vector-Jacobian product of [`BnReluBwd`] (the second-order pass), fused: (x, [γ; β],
/// [dy; u]) → [d_x, d_[γ; β], d_dy], with the cotangent u = [u_x, u_γ, u_β]. With A = Σ gz,
/// B = Σ gz·x̂, U1 = Σ u_x, U2 = Σ u_x·x̂, P = Σ u_x·gz per channel (the slope m is locally
/// constant, so β only enters through it and gets no gradient):
///
/// - d/d(dy) = m·(γs·(u_x - U1/N - x̂·U2/N) + u_γ·x̂ + u_β)
/// - d/dγ = s·(P - U1·A/N - U2·B/N)
/// - d/dx = γs²/N·(x̂·(3·U2·B/N + U1·A/N - P) - B·u_x - U2·gz + (B·U1 + U2·A)/N)
///   + u_γ·s·(gz - A/N - x̂·B/N)
///
/// It has no backward of its own: derivatives of third order fail with candle's error.
struct BnReluVjp {
    stats: Arc<OnceLock<Stats>>,
    leak: f64,
}

impl CustomOp3 for BnReluVjp {
    fn name(&self) -> &'static str {
        "kshot-batch-norm-relu-second-order"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, gs)?;
        same_dtype(xs, ds)?;
        let stats = self.stats.get().expect("the second-order pass runs after the forward pass");
        dispatch!(xs, bn_relu_vjp_fwd(stats, self.leak, xs, xl, gs, gl, ds, dl))
    }
}

#[allow(clippy::too_many_arguments)]
fn bn_relu_vjp_fwd<T: Real>(
    stats: &Stats,
    leak: f64,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, gb, dyu) = (slice::<T>(xs, xl)?, slice::<T>(gs, gl)?, slice::<T>(ds, dl)?);
    let (b, c, hw) = bchw(xl)?;
    let numel = x.len();
    if dyu.len() != 2 * numel + 2 * c {
        bail!(
            "batch norm second order: cotangent has {} elements, expected {}",
            dyu.len(),
            2 * numel + 2 * c
        );
    }
    let (dy, u) = dyu.split_at(numel);
    let (u_x, u_gb) = u.split_at(numel);
    let n = (b * hw) as f64;

    // Per channel: [A, B, U1, U2, P].
    let sums: Vec<[f64; 5]> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let k = stats.channel(gb, ch, leak);
            let mut lanes = [[0.0; 4]; 5];
            for ((x, dy), ux) in
                planes(x, c, hw, ch).zip(planes(dy, c, hw, ch)).zip(planes(u_x, c, hw, ch))
            {
                second_order_sums(x, dy, ux, k, &mut lanes);
            }
            lanes.map(|l| l.iter().sum())
        })
        .collect();

    let mut out = vec![zero::<T>(); 2 * numel + 2 * c];
    let (d_x, rest) = out.split_at_mut(numel);
    let (d_gb, d_dy) = rest.split_at_mut(2 * c);
    for ch in 0..c {
        let [a, bv, u1, u2, p] = sums[ch];
        d_gb[ch] = T::from_f64(stats.inv_std[ch] * (p - u1 * a / n - u2 * bv / n));
    }
    if numel > 0 {
        let image = c * hw;
        d_x.par_chunks_mut(image)
            .zip(d_dy.par_chunks_mut(image))
            .zip(x.par_chunks(image).zip(dy.par_chunks(image)).zip(u_x.par_chunks(image)))
            .for_each(|((d_x, d_dy), ((x, dy), u_x))| {
                for ch in 0..c {
                    let r = ch * hw..(ch + 1) * hw;
                    let k = stats.channel(gb, ch, leak);
                    let gamma = gb[ch].wide();
                    let (u_gamma, u_beta) = (u_gb[ch].wide(), u_gb[c + ch].wide());
                    let [a, bv, u1, u2, p] = sums[ch];
                    let s = k.inv_std;
                    let (a_n, b_n, u1_n, u2_n) = (a / n, bv / n, u1 / n, u2 / n);
                    let gs = gamma * s;
                    let terms = SecondOrder {
                        gs,
                        u1_n,
                        u2_n,
                        u_gamma,
                        u_beta,
                        coef_xhat: 3.0 * u2 * b_n + u1 * a_n - p,
                        constant: b_n * u1 + u2 * a_n,
                        outer: gs * s / n,
                        bv,
                        u2,
                        a_n,
                        b_n,
                    };
                    second_order_plane(
                        &mut d_x[r.clone()],
                        &mut d_dy[r.clone()],
                        &x[r.clone()],
                        &dy[r.clone()],
                        &u_x[r],
                        k,
                        terms,
                    );
                }
            });
    }
    Ok(storage(out, 2 * numel + 2 * c))
}

multiversion! {
    /// Adds one plane to a channel's second-order sums [A, B, U1, U2, P] (see [`BnReluVjp`]),
    /// element i in lane i mod 4.
    fn second_order_sums<T: Real>(x: &[T], dy: &[T], ux: &[T], k: Channel, acc: &mut [[f64; 4]; 5]) {
        for (i, ((&x, &dy), &ux)) in x.iter().zip(dy).zip(ux).enumerate() {
            let lane = i % 4;
            let x = x.wide();
            let xhat = (x - k.mean) * k.inv_std;
            let gz = slope(x * k.scale + k.shift, k.leak) * dy.wide();
            let ux = ux.wide();
            acc[0][lane] += gz;
            acc[1][lane] += gz * xhat;
            acc[2][lane] += ux;
            acc[3][lane] += ux * xhat;
            acc[4][lane] += ux * gz;
        }
    }
}

/// A channel's constants of the second-order pass (see [`BnReluVjp`]).
#[derive(Clone, Copy)]
struct SecondOrder {
    gs: f64,
    u1_n: f64,
    u2_n: f64,
    u_gamma: f64,
    u_beta: f64,
    coef_xhat: f64,
    constant: f64,
    outer: f64,
    bv: f64,
    u2: f64,
    a_n: f64,
    b_n: f64,
}

multiversion! {
    /// One plane of the second-order pass's d/dx and d/d(dy).
    fn second_order_plane<T: Real>(
        d_x: &mut [T],
        d_dy: &mut [T],
        x: &[T],
        dy: &[T],
        u_x: &[T],
        k: Channel,
        t: SecondOrder,
    ) {
        for (((dxo, ddyo), (&x, &dy)), &ux) in
            d_x.iter_mut().zip(d_dy.iter_mut()).zip(x.iter().zip(dy)).zip(u_x)
        {
            let x = x.wide();
            let s = k.inv_std;
            let xhat = (x - k.mean) * s;
            let m = slope(x * k.scale + k.shift, k.leak);
            let gz = m * dy.wide();
            let ux = ux.wide();
            *ddyo = T::narrow(m * (t.gs * (ux - t.u1_n - xhat * t.u2_n) + t.u_gamma * xhat + t.u_beta));
            let bracket = xhat * t.coef_xhat - t.bv * ux - t.u2 * gz + t.constant;
            *dxo = T::narrow(t.outer * bracket + t.u_gamma * s * (gz - t.a_n - xhat * t.b_n));
        }
    }
}

/// Evaluation-mode batch norm followed by ReLU, with fixed statistics (e.g. running averages):
/// y = relu(γ·(x - μ)/√(σ² + ε) + β). The per-channel scale and shift are formed from γ and β in
/// candle ops, so gradients reach γ and β; the fused op applies them.
pub fn batch_norm_relu_fixed(
    x: &Tensor,
    mean: &[f64],
    var: &[f64],
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm_leaky_relu_fixed(x, mean, var, gamma, beta, eps, 0.0)
}

/// [`batch_norm_relu_fixed`] with a LeakyReLU of negative slope `leak` (0: ReLU; 1: none).
pub fn batch_norm_leaky_relu_fixed(
    x: &Tensor,
    mean: &[f64],
    var: &[f64],
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    leak: f64,
) -> Result<Tensor> {
    let c = x.dim(1)?;
    if mean.len() != c || var.len() != c || gamma.dims() != [c] || beta.dims() != [c] {
        bail!("batch norm: statistics and parameters must have one entry per channel ({c})");
    }
    let dev = x.device();
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let inv_std = Tensor::new(inv_std.as_slice(), dev)?.to_dtype(x.dtype())?;
    let mean = Tensor::new(mean, dev)?.to_dtype(x.dtype())?;
    let scale = (gamma * inv_std)?;
    let shift = (beta - (&scale * mean)?)?;
    let ss = Tensor::stack(&[&scale, &shift], 0)?;
    x.contiguous()?.apply_op2(&ss, ScaleShiftRelu { leak })
}

/// leaky_relu(x·scale + shift) per channel, with [scale; shift] stacked as [2, C]. Its backward,
/// in candle ops with the slope (1 or leak) held constant, is exact to every order.
struct ScaleShiftRelu {
    leak: f64,
}

impl CustomOp2 for ScaleShiftRelu {
    fn name(&self) -> &'static str {
        "kshot-scale-shift-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ss)?;
        dispatch!(xs, scale_shift_relu_fwd(self.leak, xs, xl, ss, sl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ss: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = ss.dim(1)?;
        // y > 0 exactly where z > 0, for any leak ≥ 0.
        let on = y.detach().gt(0.0)?.to_dtype(y.dtype())?;
        let gz = if self.leak == 0.0 {
            (dy * on)?
        } else {
            (dy * on.affine(1.0 - self.leak, self.leak)?)?
        };
        let per_channel = |t: Tensor| t.reshape((1, c, 1, 1));
        let dx =
            if x.track_op() { Some(gz.broadcast_mul(&per_channel(ss.get(0)?)?)?) } else { None };
        let dss = if ss.track_op() {
            let sum = |t: &Tensor| t.sum_keepdim(0)?.sum_keepdim(2)?.sum_keepdim(3)?.flatten_all();
            Some(Tensor::stack(&[&sum(&(&gz * x)?)?, &sum(&gz)?], 0)?)
        } else {
            None
        };
        Ok((dx, dss))
    }
}

multiversion! {
    /// y = z where z > 0, else leak·z, for z = x·scale + shift, in T (the inference pass).
    fn scale_shift_leaky_fixed<T: Real>(y: &mut [T], x: &[T], scale: T, shift: T, leak: T) {
        let zero = T::narrow(0.0);
        for (y, &x) in y.iter_mut().zip(x) {
            let z = x * scale + shift;
            *y = if z > zero { z } else { leak * z };
        }
    }
}

fn scale_shift_relu_fwd<T: Real>(
    leak: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ss: &CpuStorage,
    sl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, s) = (slice::<T>(xs, xl)?, slice::<T>(ss, sl)?);
    let (_, c, hw) = bchw(xl)?;
    if s.len() != 2 * c {
        bail!("batch norm: scale and shift must be [2, {c}]");
    }
    let leak = T::narrow(leak);
    let mut y = vec![zero::<T>(); x.len()];
    if !y.is_empty() {
        y.par_chunks_mut(c * hw).zip(x.par_chunks(c * hw)).for_each(|(y, x)| {
            for (ch, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                scale_shift_leaky_fixed(y, x, s[ch], s[c + ch], leak);
            }
        });
    }
    Ok(storage(y, xl.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every output of every element-wise loop at one level, as bits.
    fn outputs<T: Real + Into<f64>>(len: usize, seed: u64) -> Vec<u64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut draw =
            || (0..len).map(|_| T::narrow(rng.random_range(-2.0..2.0))).collect::<Vec<T>>();
        let (x, dy, ux) = (draw(), draw(), draw());
        let k = Channel { scale: 1.3, shift: -0.2, mean: 0.1, inv_std: 0.8, leak: 0.1 };
        let t = SecondOrder {
            gs: 0.7,
            u1_n: 0.01,
            u2_n: -0.02,
            u_gamma: 0.3,
            u_beta: -0.4,
            coef_xhat: 0.05,
            constant: 0.002,
            outer: 0.9,
            bv: 0.6,
            u2: -0.7,
            a_n: 0.03,
            b_n: 0.04,
        };
        let mut out = vec![sum(&x).to_bits(), sum_squared_deviation(&x, 0.3).to_bits()];
        let mut y = vec![T::narrow(0.0); len];
        let mut y2 = y.clone();
        scale_shift_leaky(&mut y, &x, k.scale, k.shift, k.leak);
        out.extend(y.iter().map(|&v| v.into().to_bits()));
        let (mut a, mut b) = ([0.0; 4], [0.0; 4]);
        backward_sums(&x, &dy, k, &mut a, &mut b);
        out.extend(a.iter().chain(&b).map(|v| v.to_bits()));
        backward_dx(&mut y, &x, &dy, k, 0.02, -0.03);
        out.extend(y.iter().map(|&v| v.into().to_bits()));
        let mut lanes = [[0.0; 4]; 5];
        second_order_sums(&x, &dy, &ux, k, &mut lanes);
        out.extend(lanes.iter().flatten().map(|v| v.to_bits()));
        second_order_plane(&mut y, &mut y2, &x, &dy, &ux, k, t);
        out.extend(y.iter().chain(&y2).map(|&v| v.into().to_bits()));
        scale_shift_leaky_fixed(&mut y, &x, T::narrow(1.3), T::narrow(-0.2), T::narrow(0.1));
        out.extend(y.iter().map(|&v| v.into().to_bits()));
        out
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        for (i, len) in [0, 1, 3, 4, 7, 8, 13, 64, 196, 785].into_iter().enumerate() {
            for (what, f) in
                [("f32", outputs::<f32> as fn(usize, u64) -> Vec<u64>), ("f64", outputs::<f64>)]
            {
                let runs = crate::kernels::simd::at_each_level(|| f(len, i as u64));
                for (level, bits) in &runs[1..] {
                    assert!(
                        bits == &runs[0].1,
                        "{what}, {len} elements: {level:?} differs from the baseline"
                    );
                }
            }
        }
    }
}
