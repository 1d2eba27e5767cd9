//! 3×3 convolution, stride 1, padding 1, as a closed family of custom ops: the convolution, the
//! flip-transpose of its kernel, and its weight gradient. Every backward is written in the family
//! itself, so gradients of any order are exact:
//!
//! - `conv(x, w)`: d/dx = conv(dy, flip_t(w)), d/dw = weight_grad(x, dy)
//! - `flip_t(w)`: self-adjoint, d/dw = flip_t(dy)
//! - `weight_grad(x, dy)`: d/dx = conv(dy, flip_t(G)), d/d(dy) = conv(x, G)

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, matmul, same_dtype, slice, storage, zero, Mat, Real};

pub fn conv3x3(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, ci, _, _) = x.dims4()?;
    let (_, wci, kh, kw) = w.dims4()?;
    if (wci, kh, kw) != (ci, 3, 3) {
        bail!("conv3x3: weight {:?} does not fit input {:?}", w.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv3x3)
}

/// `flip_t(w)[i, o, kh, kw] = w[o, i, 2 - kh, 2 - kw]`: the kernel of the transposed convolution.
pub(crate) fn flip_t(w: &Tensor) -> Result<Tensor> {
    w.contiguous()?.apply_op1(FlipT)
}

/// `weight_grad(x, dy)[o, i, kh, kw] = Σ_{b,h,w} dy[b, o, h, w] · x_pad[b, i, h + kh, w + kw]`.
pub(crate) fn weight_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (db, _, dh, dw) = dy.dims4()?;
    if (b, h, w) != (db, dh, dw) {
        bail!("weight_grad: gradient {:?} does not fit input {:?}", dy.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&dy.contiguous()?, WeightGrad)
}

struct Conv3x3;

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "kshot-conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ws)?;
        dispatch!(xs, conv_fwd(xs, xl, ws, wl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(conv3x3(dy, &flip_t(w)?)?) } else { None };
        let dw = if w.track_op() { Some(weight_grad(x, dy)?) } else { None };
        Ok((dx, dw))
    }
}

struct FlipT;

impl CustomOp1 for FlipT {
    fn name(&self) -> &'static str {
        "kshot-flip-t"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, flip_t_fwd(s, l))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(flip_t(dy)?))
    }
}

struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ds)?;
        dispatch!(xs, weight_grad_fwd(xs, xl, ds, dl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(conv3x3(dy, &flip_t(g)?)?) } else { None };
        let ddy = if dy.track_op() { Some(conv3x3(x, g)?) } else { None };
        Ok((dx, ddy))
    }
}

/// Images per gemm: about a thousand output columns each, and at least 8 blocks where the batch
/// allows. Independent of the thread count, so that sums over blocks are reproducible.
pub(super) fn images_per_block(batch: usize, hw: usize) -> usize {
    let by_size = 1024usize.div_ceil(hw.max(1));
    by_size.min(batch.div_ceil(8)).max(1)
}

/// Patches of `n` images `x` [n, c, h, w] under a 3×3 window with padding 1, as a row-major
/// [c·9, n·h·w] matrix: row `ci·9 + kh·3 + kw`, column `j·h·w + oh·w + ow` holds
/// x[j, ci, oh + kh - 1, ow + kw - 1], or 0 in the padding.
pub(super) fn im2col<T: Real>(x: &[T], n: usize, c: usize, h: usize, w: usize) -> Vec<T> {
    let hw = h * w;
    // Every element is written exactly once, in order, so the buffer is never zero-filled first.
    let mut col = Vec::with_capacity(c * 9 * n * hw);
    for row in 0..c * 9 {
        let (ci, kh, kw) = (row / 9, row % 9 / 3, row % 3);
        for j in 0..n {
            let plane = &x[(j * c + ci) * hw..][..hw];
            for oh in 0..h {
                let ih = oh + kh;
                if ih == 0 || ih > h {
                    col.resize(col.len() + w, zero());
                    continue;
                }
                let src = &plane[(ih - 1) * w..][..w];
                match kw {
                    0 => {
                        col.push(zero());
                        col.extend_from_slice(&src[..w - 1]);
                    }
                    1 => col.extend_from_slice(src),
                    _ => {
                        col.extend_from_slice(&src[1..]);
                        col.push(zero());
                    }
                }
            }
        }
    }
    col
}

/// `dst` [c, n, hw] from `src` [n, c, hw].
pub(super) fn swap_outer<T: Real>(src: &[T], n: usize, c: usize, hw: usize, dst: &mut [T]) {
    for j in 0..n {
        for o in 0..c {
            dst[(o * n + j) * hw..][..hw].copy_from_slice(&src[(j * c + o) * hw..][..hw]);
        }
    }
}

/// Planes at least this large get one gemm per image; smaller ones are batched into one gemm.
const DIRECT_MIN_PLANE: usize = 128;

fn conv_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let co = wl.shape().dims4()?.0;
    let (hw, k) = (h * wd, ci * 9);
    let mut out = vec![zero::<T>(); b * co * hw];
    if !out.is_empty() {
        let nb = images_per_block(b, hw);
        out.par_chunks_mut(nb * co * hw).enumerate().for_each(|(blk, out)| {
            let n = out.len() / (co * hw);
            let cols = n * hw;
            let col = im2col(&x[blk * nb * ci * hw..][..n * ci * hw], n, ci, h, wd);
            if hw >= DIRECT_MIN_PLANE {
                // One gemm per image, straight into its [co, hw] slice of the output.
                for (j, out) in out.chunks_mut(co * hw).enumerate() {
                    let rhs = Mat { data: &col[j * hw..], rs: cols, cs: 1 };
                    matmul((co, hw, k), out, false, Mat::rows(w, k), rhs);
                }
            } else {
                let mut y = vec![zero(); co * cols];
                matmul((co, cols, k), &mut y, false, Mat::rows(w, k), Mat::rows(&col, cols));
                swap_outer(&y, co, n, hw, out);
            }
        });
    }
    Ok(storage(out, (b, co, h, wd)))
}

/// Σ over a batch's `blocks` blocks of what `add(block, acc)` accumulates into a `len`-long
/// buffer. The blocks are dealt to at most 8 groups summed in parallel, and the groups' partial
/// sums are added in a fixed order, so the result does not depend on how rayon schedules them.
pub(super) fn sum_over_blocks<T: Real>(
    blocks: usize,
    len: usize,
    add: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let groups = blocks.min(8);
    let partials: Vec<Vec<T>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut acc = vec![zero(); len];
            for blk in (g..blocks).step_by(groups) {
                add(blk, &mut acc);
            }
            acc
        })
        .collect();
    let mut sum = vec![zero::<T>(); len];
    for p in partials {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

fn weight_grad_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, dy) = (slice::<T>(xs, xl)?, slice::<T>(ds, dl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let co = dl.shape().dims4()?.1;
    let (hw, k) = (h * wd, ci * 9);
    let nb = images_per_block(b, hw);
    let blocks = b.div_ceil(nb);
    let dw = sum_over_blocks(blocks, co * k, |blk, acc: &mut [T]| {
        let (b0, n) = (blk * nb, nb.min(b - blk * nb));
        let cols = n * hw;
        let col = im2col(&x[b0 * ci * hw..][..n * ci * hw], n, ci, h, wd);
        let mut dyt = vec![zero(); co * cols];
        swap_outer(&dy[b0 * co * hw..][..n * co * hw], n, co, hw, &mut dyt);
        matmul((co, k, cols), acc, true, Mat::rows(&dyt, cols), Mat::rows_t(&col, cols));
    });
    Ok(storage(dw, (co, ci, 3, 3)))
}

fn flip_t_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let w = slice::<T>(s, l)?;
    let (co, ci, kh, kw) = l.shape().dims4()?;
    if (kh, kw) != (3, 3) {
        bail!("flip_t: expected a 3×3 kernel, got {:?}", l.shape());
    }
    let mut out = vec![zero::<T>(); w.len()];
    for i in 0..ci {
        for o in 0..co {
            let src = &w[(o * ci + i) * 9..][..9];
            for (t, d) in out[(i * co + o) * 9..][..9].iter_mut().enumerate() {
                *d = src[8 - t];
            }
        }
    }
    Ok(storage(out, (ci, co, 3, 3)))
}
