//! The recurrence of [`crate::methods::mann`] (an LSTM controller with a Least Recently Used
//! Access memory, or without memory the plain LSTM) run over all T steps of a batch of sequences
//! in fused loops, with its own backward pass through time. Candle would build a few dozen small
//! ops per step; here a step is three small matrix products per chunk of sequences and loops over
//! one sequence's memory.
//!
//! Per sequence and step t, from h₀ = s₀ = r₀ = 0, w^r₀ = 0, usage u₀ = 0 and M₀ = 10⁻⁶:
//!
//! ```text
//! z = g_t + h_{t−1} W_hhᵀ + r_{t−1} W_rᵀ            (g_t: the input part of the gates, bias included)
//! (a_i, a_f, a_g, a_o) = (σ, σ, tanh, σ)(z),   s_t = a_f ⊙ s_{t−1} + a_i ⊙ a_g,   h_t = a_o ⊙ tanh s_t
//! [k̂ ‖ α̂ ‖ β̂] = h_t W_headsᵀ + b_heads,   k_j = tanh k̂_j,   σ_j = σ(α̂_j),   β_j = 1 + softplus β̂_j (or 1)
//! lu = the R slots of smallest u_{t−1}, least used first;   M = M_{t−1} with slot lu₀ zeroed
//! w^w_j(i) = [i = lu_j] + σ_j (w^r_{t−1,j}(i) − [i = lu_j]),   M_t(i) = M(i) + Σ_j w^w_j(i) k_j
//! c_j(i) = k_j·M_t(i) / (‖k_j‖ ‖M_t(i)‖ + 10⁻⁸)   (norms √(x·x + 10⁻¹⁶)),   w^r_{t,j} = softmax_i β_j c_j(i)
//! r_{t,j} = Σ_i w^r_{t,j}(i) M_t(i),   u_t = γ u_{t−1} + Σ_j (w^r_{t,j} + w^w_j)
//! ```
//!
//! and the output of step t is `[h_t ‖ r_t]`. Usage only selects slots: it is a constant for the
//! gradient, kept in f64. The backward pass carries δh, δs, δr, δM and δw^r from step t + 1 to t.
//! Sequences are split into fixed chunks run in parallel; every chunk's weight gradient is summed
//! in f64 and the chunks are added in order, so results do not depend on the number of threads.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, matmul, same_dtype, slice, storage, zero, Mat, Real};
use super::lstm_cell::{lstm_row, lstm_row_backward, one, sigmoid, Float};

/// Sequences per chunk. Fixed, so that the order of every sum is too.
const CHUNK: usize = 8;

/// The memory's value everywhere before the first write.
const MEMORY_INIT: f64 = 1e-6;

/// The sizes of the recurrence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MannLayout {
    /// Controller units H.
    pub hidden: usize,
    /// Read heads R; 0 for the plain LSTM (no memory).
    pub heads: usize,
    /// Memory slots S × slot size D.
    pub slots: usize,
    pub slot_size: usize,
    /// Whether the heads emit key strengths β̂.
    pub key_strength: bool,
    /// γ of the usage update.
    pub usage_decay: f64,
}

impl MannLayout {
    /// R·D: the width of the read vectors together.
    pub fn read_width(&self) -> usize {
        self.heads * self.slot_size
    }

    /// E: the heads' outputs (keys, gates and strengths).
    pub fn head_outputs(&self) -> usize {
        if self.heads == 0 {
            0
        } else {
            self.read_width() + self.heads * (1 + self.key_strength as usize)
        }
    }

    /// H + R·D: the width of a step's output.
    pub fn features(&self) -> usize {
        self.hidden + self.read_width()
    }

    /// The sizes of W_hh [4H, H], W_r [4H, R·D], W_heads [E, H] and b_heads [E], θ's order.
    pub fn sizes(&self) -> [usize; 4] {
        let (h, e) = (self.hidden, self.head_outputs());
        [4 * h * h, 4 * h * self.read_width(), e * h, e]
    }
}

/// `[h_t ‖ r_t]` [B, T, H + R·D] of every step, from the input part of the gates `gates_in`
/// [B, T, 4H]. `weights`: W_hh [4H, H], W_r [4H, R·D], then the heads' weights (key [R·D, H], gate
/// [R, H], strength [R, H] if any) and their biases in the same order; only W_hh without memory.
pub fn mann_recurrence(
    gates_in: &Tensor,
    weights: &[&Tensor],
    layout: MannLayout,
) -> Result<Tensor> {
    // The op checks the gates' width and θ's length against the layout.
    let flat = weights.iter().map(|w| w.flatten_all()).collect::<Result<Vec<_>>>()?;
    let theta = Tensor::cat(&flat, 0)?.to_dtype(gates_in.dtype())?;
    gates_in.contiguous()?.apply_op2(&theta, Recurrence(layout))
}

struct Recurrence(MannLayout);

impl CustomOp2 for Recurrence {
    fn name(&self) -> &'static str {
        "kshot-mann-recurrence"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(gs, ts)?;
        dispatch!(gs, run(self.0, gs, gl, ts, tl, None))
    }

    fn bwd(
        &self,
        gates: &Tensor,
        theta: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = gates.apply_op3(theta, &dy.contiguous()?, Backward(self.0))?;
        let n = gates.elem_count();
        let d_gates = both.narrow(0, 0, n)?.reshape(gates.dims())?;
        let d_theta = both.narrow(0, n, theta.elem_count())?;
        Ok((Some(d_gates), Some(d_theta)))
    }
}

/// `(gates, θ, dy) → [d gates ‖ dθ]`, flat.
struct Backward(MannLayout);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "kshot-mann-recurrence-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(gs, ts)?;
        same_dtype(gs, ds)?;
        dispatch!(gs, run(self.0, gs, gl, ts, tl, Some((ds, dl))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        bail!("MANN's fused recurrence is first order: its backward pass has no gradient")
    }
}

/// θ split into its parts.
struct Weights<'a, T> {
    w_hh: &'a [T],
    w_r: &'a [T],
    w_heads: &'a [T],
    b_heads: &'a [T],
}

impl<'a, T> Weights<'a, T> {
    fn split(theta: &'a [T], layout: &MannLayout) -> Self {
        let [a, b, c, _] = layout.sizes();
        let (w_hh, rest) = theta.split_at(a);
        let (w_r, rest) = rest.split_at(b);
        let (w_heads, b_heads) = rest.split_at(c);
        Self { w_hh, w_r, w_heads, b_heads }
    }
}

/// The forward pass (`dy` None: the features [B, T, F]) or the backward pass (`dy` Some: the flat
/// [B·T·4H + len θ] gradients of the gates and θ).
fn run<T: Float>(
    layout: MannLayout,
    gs: &CpuStorage,
    gl: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
    dy: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (batch, steps, g) = gl.shape().dims3()?;
    let (gates, theta) = (slice::<T>(gs, gl)?, slice::<T>(ts, tl)?);
    let features = layout.features();
    if g != 4 * layout.hidden || theta.len() != layout.sizes().iter().sum::<usize>() {
        bail!(
            "mann_recurrence: gates of width {g} and {} weights, the layout needs {} and {} ({layout:?})",
            theta.len(),
            4 * layout.hidden,
            layout.sizes().iter().sum::<usize>()
        );
    }
    if layout.heads > layout.slots {
        bail!("mann_recurrence: {} read heads for {} slots", layout.heads, layout.slots);
    }
    let dy = match dy {
        Some((s, l)) => {
            let dy = slice::<T>(s, l)?;
            if dy.len() != batch * steps * features {
                bail!(
                    "mann_recurrence: {} output gradients for [{batch}, {steps}, {features}]",
                    dy.len()
                );
            }
            Some(dy)
        }
        None => None,
    };
    let weights = Weights::split(theta, &layout);
    let chunks: Vec<(usize, usize)> =
        (0..batch).step_by(CHUNK).map(|start| (start, CHUNK.min(batch - start))).collect();
    // The elements of a chunk's sequences in a [B, T, width] tensor.
    let of_chunk = |(start, n): (usize, usize), width: usize| {
        start * steps * width..(start + n) * steps * width
    };
    let outs: Vec<(Vec<T>, Vec<f64>)> = chunks
        .par_iter()
        .map(|&rows| {
            let tape = Tape::forward(&layout, &weights, &gates[of_chunk(rows, g)], rows.1, steps);
            match dy {
                None => (tape.outputs(features), Vec::new()),
                Some(dy) => tape.backward(&layout, &weights, &dy[of_chunk(rows, features)]),
            }
        })
        .collect();
    let mut out = Vec::with_capacity(batch * steps * if dy.is_some() { g } else { features });
    for (part, _) in &outs {
        out.extend_from_slice(part);
    }
    if dy.is_none() {
        return Ok(storage(out, (batch, steps, features)));
    }
    let mut d_theta = vec![0f64; theta.len()];
    for (_, part) in &outs {
        d_theta.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    out.extend(d_theta.into_iter().map(T::narrow));
    let len = out.len();
    Ok(storage(out, len))
}

/// What the backward pass of a chunk of `n` sequences needs, step-major ([t][row][…]).
struct Tape<T> {
    n: usize,
    steps: usize,
    /// [T + 1][n][F]: entry t is `[h_t ‖ r_t]` (entry 0 zeros).
    feats: Vec<T>,
    /// [T][n][4H] gate activations.
    gates: Vec<T>,
    /// [T + 1][n][H] cell states s_t (entry 0 zeros) and [T][n][H] tanh s_t.
    cells: Vec<T>,
    tanh_cells: Vec<T>,
    /// [T][n][E] the heads' outputs: k (after tanh), σ(α̂), β̂ (raw).
    heads: Vec<T>,
    /// [T + 1][n][S·D] memories (entry 0 the initial one) and [T + 1][n][R·S] read weights
    /// (entry 0 zeros).
    memory: Vec<T>,
    reads: Vec<T>,
    /// [T][n][R·S] cosines, [T][n][S] slot norms, [T][n][R] key norms, [T][n][R] least-used slots.
    cosines: Vec<T>,
    slot_norms: Vec<T>,
    key_norms: Vec<T>,
    least_used: Vec<usize>,
}

impl<T: Float> Tape<T> {
    /// Runs `n` sequences of `steps` steps from their input gates `gates_in` [n][T][4H].
    fn forward(
        layout: &MannLayout,
        w: &Weights<T>,
        gates_in: &[T],
        n: usize,
        steps: usize,
    ) -> Self {
        let MannLayout { hidden: h, heads: r, slots: s, slot_size: d, .. } = *layout;
        let (f, e, g) = (layout.features(), layout.head_outputs(), 4 * h);
        let rd = layout.read_width();
        let memory_on = r > 0;
        let mem_len = if memory_on { s * d } else { 0 };
        let mut tape = Tape {
            n,
            steps,
            feats: vec![zero(); (steps + 1) * n * f],
            gates: vec![zero(); steps * n * g],
            cells: vec![zero(); (steps + 1) * n * h],
            tanh_cells: vec![zero(); steps * n * h],
            heads: vec![zero(); steps * n * e],
            memory: vec![T::narrow(MEMORY_INIT); (steps + 1) * n * mem_len],
            reads: vec![zero(); (steps + 1) * n * r * s],
            cosines: vec![zero(); steps * n * r * s],
            slot_norms: vec![zero(); steps * n * if memory_on { s } else { 0 }],
            key_norms: vec![zero(); steps * n * r],
            least_used: vec![0; steps * n * r],
        };
        let mut usage = vec![0f64; n * s];
        for t in 0..steps {
            let z = &mut tape.gates[t * n * g..(t + 1) * n * g];
            for row in 0..n {
                let src = (row * steps + t) * g;
                z[row * g..(row + 1) * g].copy_from_slice(&gates_in[src..src + g]);
            }
            let (before, after) = tape.feats.split_at_mut((t + 1) * n * f);
            let previous = &before[t * n * f..];
            matmul(
                (n, g, h),
                z,
                true,
                Mat { data: previous, rs: f, cs: 1 },
                Mat::rows_t(w.w_hh, h),
            );
            if memory_on {
                let reads = Mat { data: &previous[h..], rs: f, cs: 1 };
                matmul((n, g, rd), z, true, reads, Mat::rows_t(w.w_r, rd));
            }
            let now = &mut after[..n * f];
            let (cells_before, cells_after) = tape.cells.split_at_mut((t + 1) * n * h);
            cells_after[..n * h].copy_from_slice(&cells_before[t * n * h..]);
            for row in 0..n {
                lstm_row(
                    &mut z[row * g..(row + 1) * g],
                    &mut cells_after[row * h..(row + 1) * h],
                    &mut tape.tanh_cells[(t * n + row) * h..(t * n + row + 1) * h],
                    &mut now[row * f..row * f + h],
                );
            }
            if !memory_on {
                continue;
            }
            let heads = &mut tape.heads[t * n * e..(t + 1) * n * e];
            for row in heads.chunks_exact_mut(e) {
                row.copy_from_slice(w.b_heads);
            }
            matmul(
                (n, e, h),
                heads,
                true,
                Mat { data: &*now, rs: f, cs: 1 },
                Mat::rows_t(w.w_heads, h),
            );
            for row in heads.chunks_exact_mut(e) {
                T::tanhs(&mut row[..rd]);
                T::sigmoids(&mut row[rd..rd + r]);
            }
            let (mem_before, mem_after) = tape.memory.split_at_mut((t + 1) * n * mem_len);
            let (reads_before, reads_after) = tape.reads.split_at_mut((t + 1) * n * r * s);
            for row in 0..n {
                let rs_range = row * r * s..(row + 1) * r * s;
                let at = t * n + row;
                memory_forward(
                    layout,
                    &heads[row * e..(row + 1) * e],
                    &mut usage[row * s..(row + 1) * s],
                    &reads_before[t * n * r * s..][rs_range.clone()],
                    &mem_before[t * n * mem_len..][row * mem_len..(row + 1) * mem_len],
                    MemoryOut {
                        memory: &mut mem_after[row * mem_len..(row + 1) * mem_len],
                        reads: &mut reads_after[rs_range],
                        cosines: &mut tape.cosines[at * r * s..(at + 1) * r * s],
                        slot_norms: &mut tape.slot_norms[at * s..(at + 1) * s],
                        key_norms: &mut tape.key_norms[at * r..(at + 1) * r],
                        least_used: &mut tape.least_used[at * r..(at + 1) * r],
                        read: &mut now[row * f + h..(row + 1) * f],
                    },
                );
            }
        }
        tape
    }

    /// The features [n][T][F] (F = `f`), sequence-major as the op returns them.
    fn outputs(&self, f: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.n * self.steps * f);
        for row in 0..self.n {
            for t in 0..self.steps {
                let at = ((t + 1) * self.n + row) * f;
                out.extend_from_slice(&self.feats[at..at + f]);
            }
        }
        out
    }

    /// The gradients for the features' gradient `dy` [n][T][F]: the gates' [n][T][4H] and θ's
    /// (f64).
    fn backward(&self, layout: &MannLayout, w: &Weights<T>, dy: &[T]) -> (Vec<T>, Vec<f64>) {
        let MannLayout { hidden: h, heads: r, slots: s, slot_size: d, .. } = *layout;
        let (n, steps) = (self.n, self.steps);
        let (f, e, g, rd) = (layout.features(), layout.head_outputs(), 4 * h, layout.read_width());
        let memory_on = r > 0;
        let mem_len = if memory_on { s * d } else { 0 };
        let mut d_gates = vec![zero::<T>(); steps * n * g];
        let mut d_heads = vec![zero::<T>(); steps * n * e];
        let (mut dh_next, mut ds) = (vec![zero::<T>(); n * h], vec![zero::<T>(); n * h]);
        let mut dr_next = vec![zero::<T>(); n * rd];
        let mut d_memory = vec![zero::<T>(); n * mem_len];
        let mut d_reads = vec![zero::<T>(); n * r * s];
        let mut dh = vec![zero::<T>(); n * h];
        let mut dr = vec![zero::<T>(); n * rd];
        let mut scratch = MemoryScratch::new(layout);
        for t in (0..steps).rev() {
            for row in 0..n {
                let out = &dy[(row * steps + t) * f..(row * steps + t + 1) * f];
                for j in 0..h {
                    dh[row * h + j] = out[j] + dh_next[row * h + j];
                }
                for j in 0..rd {
                    dr[row * rd + j] = out[h + j] + dr_next[row * rd + j];
                }
            }
            if memory_on {
                let heads_now = &mut d_heads[t * n * e..(t + 1) * n * e];
                for row in 0..n {
                    let at = t * n + row;
                    let rs_range = row * r * s..(row + 1) * r * s;
                    let mem_range = row * mem_len..(row + 1) * mem_len;
                    memory_backward(
                        layout,
                        MemoryTape {
                            heads: &self.heads[at * e..(at + 1) * e],
                            reads_before: &self.reads[t * n * r * s..][rs_range.clone()],
                            memory: &self.memory[(t + 1) * n * mem_len..][mem_range.clone()],
                            reads: &self.reads[(t + 1) * n * r * s..][rs_range.clone()],
                            cosines: &self.cosines[at * r * s..(at + 1) * r * s],
                            slot_norms: &self.slot_norms[at * s..(at + 1) * s],
                            key_norms: &self.key_norms[at * r..(at + 1) * r],
                            least_used: &self.least_used[at * r..(at + 1) * r],
                        },
                        &dr[row * rd..(row + 1) * rd],
                        &mut d_memory[mem_range],
                        &mut d_reads[rs_range],
                        &mut heads_now[row * e..(row + 1) * e],
                        &mut scratch,
                    );
                }
                matmul((n, h, e), &mut dh, true, Mat::rows(heads_now, e), Mat::rows(w.w_heads, h));
            }
            let dz = &mut d_gates[t * n * g..(t + 1) * n * g];
            for row in 0..n {
                lstm_row_backward(
                    &self.gates[(t * n + row) * g..(t * n + row + 1) * g],
                    &self.cells[(t * n + row) * h..(t * n + row + 1) * h],
                    &self.tanh_cells[(t * n + row) * h..(t * n + row + 1) * h],
                    &dh[row * h..(row + 1) * h],
                    &mut ds[row * h..(row + 1) * h],
                    &mut dz[row * g..(row + 1) * g],
                );
            }
            matmul((n, h, g), &mut dh_next, false, Mat::rows(dz, g), Mat::rows(w.w_hh, h));
            if memory_on {
                matmul((n, rd, g), &mut dr_next, false, Mat::rows(dz, g), Mat::rows(w.w_r, rd));
            }
        }

        // Weight gradients over all steps at once: rows (t, row) of the step-major tapes.
        let rows = steps * n;
        let [s_hh, s_r, s_heads, s_bias] = layout.sizes();
        let mut d_theta = vec![zero::<T>(); s_hh + s_r + s_heads];
        let (d_hh, rest) = d_theta.split_at_mut(s_hh);
        let (d_r, d_w_heads) = rest.split_at_mut(s_r);
        let previous = Mat { data: &self.feats[..], rs: f, cs: 1 };
        matmul((g, h, rows), d_hh, false, Mat::rows_t(&d_gates, g), previous);
        if memory_on {
            let previous_reads = Mat { data: &self.feats[h..], rs: f, cs: 1 };
            matmul((g, rd, rows), d_r, false, Mat::rows_t(&d_gates, g), previous_reads);
            let hidden_now = Mat { data: &self.feats[n * f..], rs: f, cs: 1 };
            matmul((e, h, rows), d_w_heads, false, Mat::rows_t(&d_heads, e), hidden_now);
        }
        let mut wide: Vec<f64> = d_theta.iter().map(|v| v.wide()).collect();
        let mut bias = vec![0f64; s_bias];
        if e > 0 {
            for row in d_heads.chunks_exact(e) {
                bias.iter_mut().zip(row).for_each(|(b, v)| *b += v.wide());
            }
        }
        wide.extend(bias);

        let mut d_gates_out = Vec::with_capacity(n * steps * g);
        for row in 0..n {
            for t in 0..steps {
                d_gates_out.extend_from_slice(&d_gates[(t * n + row) * g..(t * n + row + 1) * g]);
            }
        }
        (d_gates_out, wide)
    }
}

/// Where [`memory_forward`] writes one sequence's step.
struct MemoryOut<'a, T> {
    memory: &'a mut [T],
    reads: &'a mut [T],
    cosines: &'a mut [T],
    slot_norms: &'a mut [T],
    key_norms: &'a mut [T],
    least_used: &'a mut [usize],
    /// [R·D] the read vectors.
    read: &'a mut [T],
}

fn norm<T: Real>(x: &[T]) -> T {
    T::narrow((x.iter().map(|v| v.wide() * v.wide()).sum::<f64>() + 1e-16).sqrt())
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut acc = zero::<T>();
    for (x, y) in a.iter().zip(b) {
        acc += *x * *y;
    }
    acc
}

/// `y += a·x`.
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

/// 1 + softplus(x), as 1 + max(x, 0) + ln(1 + e^{−|x|}).
fn strength<T: Float>(raw: T) -> T {
    let relu = if raw > zero() { raw } else { zero() };
    one::<T>() + relu + (one::<T>() + (-raw.abs()).exp()).ln()
}

/// The indicator [i = lu_j] as a float.
fn picked<T: Real>(i: usize, slot: usize) -> T {
    T::from_f64(if i == slot { 1.0 } else { 0.0 })
}

/// One sequence's memory step: zero the least-used slot, write, read, update the usage.
fn memory_forward<T: Float>(
    layout: &MannLayout,
    heads: &[T],
    usage: &mut [f64],
    reads_before: &[T],
    memory_before: &[T],
    out: MemoryOut<T>,
) {
    let MannLayout { heads: r, slots: s, slot_size: d, .. } = *layout;
    let rd = r * d;
    let (keys, gates) = (&heads[..rd], &heads[rd..rd + r]);
    for (j, slot) in least_used_slots(usage, r).into_iter().enumerate() {
        out.least_used[j] = slot;
    }
    let lu = &*out.least_used;
    let memory = out.memory;
    memory.copy_from_slice(memory_before);
    memory[lu[0] * d..(lu[0] + 1) * d].fill(zero());
    let mut write_sum = vec![0f64; s];
    for j in 0..r {
        let a = gates[j];
        for i in 0..s {
            let lu_i = picked::<T>(i, lu[j]);
            let ww = lu_i + a * (reads_before[j * s + i] - lu_i);
            write_sum[i] += ww.wide();
            axpy(&mut memory[i * d..(i + 1) * d], ww, &keys[j * d..(j + 1) * d]);
        }
    }
    for i in 0..s {
        out.slot_norms[i] = norm(&memory[i * d..(i + 1) * d]);
    }
    for j in 0..r {
        let key = &keys[j * d..(j + 1) * d];
        out.key_norms[j] = norm(key);
        let beta = if layout.key_strength { strength(heads[rd + r + j]) } else { one() };
        let (cos, weights) =
            (&mut out.cosines[j * s..(j + 1) * s], &mut out.reads[j * s..(j + 1) * s]);
        let mut max = T::from_f64(f64::NEG_INFINITY);
        for i in 0..s {
            let c = dot(key, &memory[i * d..(i + 1) * d])
                / (out.key_norms[j] * out.slot_norms[i] + T::from_f64(1e-8));
            cos[i] = c;
            weights[i] = beta * c;
            if weights[i] > max {
                max = weights[i];
            }
        }
        let mut total = zero::<T>();
        for v in weights.iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        let read = &mut out.read[j * d..(j + 1) * d];
        read.fill(zero());
        for i in 0..s {
            weights[i] /= total;
            axpy(read, weights[i], &memory[i * d..(i + 1) * d]);
        }
    }
    for (i, u) in usage.iter_mut().enumerate() {
        let read_sum: f64 = (0..r).map(|j| out.reads[j * s + i].wide()).sum();
        *u = layout.usage_decay * *u + read_sum + write_sum[i];
    }
}

/// One sequence's step as [`memory_forward`] left it.
struct MemoryTape<'a, T> {
    heads: &'a [T],
    reads_before: &'a [T],
    memory: &'a [T],
    reads: &'a [T],
    cosines: &'a [T],
    slot_norms: &'a [T],
    key_norms: &'a [T],
    least_used: &'a [usize],
}

/// Buffers [`memory_backward`] reuses from step to step.
struct MemoryScratch<T> {
    d_keys: Vec<T>,
    d_slot_norms: Vec<T>,
    d_logits: Vec<T>,
    d_reads_before: Vec<T>,
}

impl<T: Real> MemoryScratch<T> {
    fn new(layout: &MannLayout) -> Self {
        let (r, s) = (layout.heads, layout.slots);
        Self {
            d_keys: vec![zero(); layout.read_width()],
            d_slot_norms: vec![zero(); s],
            d_logits: vec![zero(); r * s],
            d_reads_before: vec![zero(); r * s],
        }
    }
}

/// One sequence's memory step backward. `d_memory` and `d_reads` come in as the gradients of M_t
/// and w^r_t from the steps after t and leave as those of M_{t−1} and w^r_{t−1}; `dr` is the
/// gradient of r_t; `d_heads` receives that of the heads' pre-activations.
fn memory_backward<T: Float>(
    layout: &MannLayout,
    tape: MemoryTape<T>,
    dr: &[T],
    d_memory: &mut [T],
    d_reads: &mut [T],
    d_heads: &mut [T],
    scratch: &mut MemoryScratch<T>,
) {
    let MannLayout { heads: r, slots: s, slot_size: d, .. } = *layout;
    let rd = r * d;
    let (keys, gates) = (&tape.heads[..rd], &tape.heads[rd..rd + r]);
    let (memory, lu) = (tape.memory, tape.least_used);
    let slot = |i: usize| i * d..(i + 1) * d;
    // The read r_j = Σ_i w^r_j(i) M_t(i).
    for j in 0..r {
        let drj = &dr[j * d..(j + 1) * d];
        for i in 0..s {
            d_reads[j * s + i] += dot(drj, &memory[slot(i)]);
            axpy(&mut d_memory[slot(i)], tape.reads[j * s + i], drj);
        }
    }
    // The softmax and the key strength.
    let d_keys = &mut scratch.d_keys;
    d_keys.fill(zero());
    let d_slot_norms = &mut scratch.d_slot_norms;
    d_slot_norms.fill(zero());
    for j in 0..r {
        let (w, dw) = (&tape.reads[j * s..(j + 1) * s], &d_reads[j * s..(j + 1) * s]);
        let inner = dot(w, dw);
        let d_logits = &mut scratch.d_logits[j * s..(j + 1) * s];
        for i in 0..s {
            d_logits[i] = w[i] * (dw[i] - inner);
        }
        let cos = &tape.cosines[j * s..(j + 1) * s];
        let beta = if layout.key_strength {
            let raw = tape.heads[rd + r + j];
            d_heads[rd + r + j] = dot(d_logits, cos) * sigmoid(raw);
            strength(raw)
        } else {
            one()
        };
        // The cosine c = k·M(i) / q, q = ‖k‖ ‖M(i)‖ + 10⁻⁸.
        let (key, nk) = (&keys[j * d..(j + 1) * d], tape.key_norms[j]);
        let mut d_key_norm = zero::<T>();
        for i in 0..s {
            let dc = beta * d_logits[i];
            let q = nk * tape.slot_norms[i] + T::from_f64(1e-8);
            let (d_dot, dq) = (dc / q, -(dc * cos[i]) / q);
            d_key_norm += dq * tape.slot_norms[i];
            d_slot_norms[i] += dq * nk;
            axpy(&mut d_keys[j * d..(j + 1) * d], d_dot, &memory[slot(i)]);
            axpy(&mut d_memory[slot(i)], d_dot, key);
        }
        axpy(&mut d_keys[j * d..(j + 1) * d], d_key_norm / nk, key);
    }
    for i in 0..s {
        let scale = d_slot_norms[i] / tape.slot_norms[i];
        let (dm, m) = (&mut d_memory[slot(i)], &memory[slot(i)]);
        axpy(dm, scale, m);
    }
    // The write M_t(i) = keep(i) M_{t−1}(i) + Σ_j w^w_j(i) k_j.
    let d_before = &mut scratch.d_reads_before;
    for j in 0..r {
        let (a, key) = (gates[j], &keys[j * d..(j + 1) * d]);
        let mut d_gate = zero::<T>();
        for i in 0..s {
            let lu_i = picked::<T>(i, lu[j]);
            let before = tape.reads_before[j * s + i];
            let ww = lu_i + a * (before - lu_i);
            axpy(&mut d_keys[j * d..(j + 1) * d], ww, &d_memory[slot(i)]);
            let d_ww = dot(&d_memory[slot(i)], key);
            d_gate += d_ww * (before - lu_i);
            d_before[j * s + i] = a * d_ww;
        }
        d_heads[rd + j] = d_gate * a * (one::<T>() - a);
    }
    d_reads.copy_from_slice(d_before);
    d_memory[slot(lu[0])].fill(zero());
    for ((out, dk), k) in d_heads[..rd].iter_mut().zip(d_keys.iter()).zip(keys) {
        *out = *dk * (one::<T>() - *k * *k);
    }
}

/// The `n` slots of smallest usage, least used first; ties go to the lower slot.
pub fn least_used_slots(usage: &[f64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..usage.len()).collect();
    order.sort_by(|&a, &b| usage[a].total_cmp(&usage[b]).then(a.cmp(&b)));
    order.truncate(n);
    order
}
