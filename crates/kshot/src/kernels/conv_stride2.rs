//! 3×3 convolution, stride 2, TensorFlow 'SAME' padding (MAML's and Reptile's Omniglot network),
//! as a closed family of custom ops:
//!
//! - `conv(x, w)` [B, Ci, H, W] → [B, Co, ⌈H/2⌉, ⌈W/2⌉]
//! - `transposed(d, w)` → [B, Ci, H, W], the adjoint of `conv(·, w)`: ⟨transposed(d, w), z⟩ =
//!   ⟨d, conv(z, w)⟩
//! - `weight_grad(x, d)` → [Co, Ci, 3, 3]: ⟨weight_grad(x, d), g⟩ = ⟨d, conv(x, g)⟩
//!
//! Every backward is written in the family itself, so gradients of any order are exact:
//!
//! - `conv(x, w)`: d/dx = transposed(dy, w), d/dw = weight_grad(x, dy)
//! - `transposed(d, w)`: d/dd = conv(g, w), d/dw = weight_grad(g, d)
//! - `weight_grad(x, d)`: d/dx = transposed(d, g), d/dd = conv(x, g)
//!
//! Output (i, j) reads input rows 2i − p … 2i − p + 2, p the padding before (0 for even sizes, 1
//! for odd: TensorFlow puts the odd one of max((⌈n/2⌉ − 1)·2 + 3 − n, 0) after). Each op is
//! im2col / col2im over the strided windows and one gemm per block of images: a quarter of the
//! work of a stride-1 convolution subsampled afterwards.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{images_per_block, sum_over_blocks, swap_outer};
use super::cpu::{dispatch, matmul, same_dtype, slice, storage, zero, Mat, Real};

pub fn conv3x3_same_stride2(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (_, ci, h, wd) = x.dims4()?;
    let (_, wci, kh, kw) = w.dims4()?;
    if (wci, kh, kw) != (ci, 3, 3) {
        bail!("strided conv: weight {:?} does not fit input {:?}", w.dims(), x.dims());
    }
    if h == 0 || wd == 0 {
        bail!("strided conv: empty {h}×{wd} input");
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv)
}

/// The adjoint of [`conv3x3_same_stride2`] in its input, onto [B, Ci, h, w] images.
pub(crate) fn transposed(d: &Tensor, w: &Tensor, (h, wd): (usize, usize)) -> Result<Tensor> {
    let (_, co, ho, wo) = d.dims4()?;
    if (ho, wo) != (h.div_ceil(2), wd.div_ceil(2)) || co != w.dims4()?.0 {
        bail!(
            "strided conv: gradient {:?} does not fit {h}×{wd} inputs and weight {:?}",
            d.dims(),
            w.dims()
        );
    }
    d.contiguous()?.apply_op2(&w.contiguous()?, Transposed { h, w: wd })
}

/// The weight gradient of [`conv3x3_same_stride2`] at `x` for the output gradient `d`.
pub(crate) fn weight_grad(x: &Tensor, d: &Tensor) -> Result<Tensor> {
    let (b, _, h, wd) = x.dims4()?;
    let (db, _, ho, wo) = d.dims4()?;
    if (db, ho, wo) != (b, h.div_ceil(2), wd.div_ceil(2)) {
        bail!("strided conv: gradient {:?} does not fit input {:?}", d.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&d.contiguous()?, WeightGrad)
}

struct Conv;

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-same-stride2"
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
        let (_, _, h, wd) = x.dims4()?;
        let dx = if x.track_op() { Some(transposed(dy, w, (h, wd))?) } else { None };
        let dw = if w.track_op() { Some(weight_grad(x, dy)?) } else { None };
        Ok((dx, dw))
    }
}

struct Transposed {
    h: usize,
    w: usize,
}

impl CustomOp2 for Transposed {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-same-stride2-transposed"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(ds, ws)?;
        dispatch!(ds, transposed_fwd(ds, dl, ws, wl, (self.h, self.w)))
    }

    fn bwd(
        &self,
        d: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dd = if d.track_op() { Some(conv3x3_same_stride2(g, w)?) } else { None };
        let dw = if w.track_op() { Some(weight_grad(g, d)?) } else { None };
        Ok((dd, dw))
    }
}

struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-same-stride2-weight-grad"
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
        d: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (_, _, h, wd) = x.dims4()?;
        let dx = if x.track_op() { Some(transposed(d, g, (h, wd))?) } else { None };
        let dd = if d.track_op() { Some(conv3x3_same_stride2(x, g)?) } else { None };
        Ok((dx, dd))
    }
}

/// Where the strided windows of `h`×`w` images sit.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    top: usize,
    left: usize,
}

impl Geometry {
    fn new(c: usize, h: usize, w: usize) -> Self {
        Self { c, h, w, ho: h.div_ceil(2), wo: w.div_ceil(2), top: h % 2, left: w % 2 }
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.ho * self.wo
    }

    /// The input row (or column) under window offset `k` of output `o`, if inside the image.
    fn source(o: usize, k: usize, pad: usize, n: usize) -> Option<usize> {
        (2 * o + k).checked_sub(pad).filter(|&i| i < n)
    }
}

/// Patches of `n` images `x` [n, c, h, w] as a row-major [c·9, n·ho·wo] matrix: row
/// `ci·9 + kh·3 + kw`, column `j·ho·wo + oh·wo + ow` holds x[j, ci, 2·oh + kh − top,
/// 2·ow + kw − left], or 0 in the padding.
fn im2col<T: Real>(x: &[T], n: usize, g: Geometry) -> Vec<T> {
    let mut col = Vec::with_capacity(g.c * 9 * n * g.out_plane());
    for row in 0..g.c * 9 {
        let (ci, kh, kw) = (row / 9, row % 9 / 3, row % 3);
        for j in 0..n {
            let plane = &x[(j * g.c + ci) * g.plane()..][..g.plane()];
            for oh in 0..g.ho {
                let Some(ih) = Geometry::source(oh, kh, g.top, g.h) else {
                    col.resize(col.len() + g.wo, zero());
                    continue;
                };
                let src = &plane[ih * g.w..][..g.w];
                col.extend((0..g.wo).map(|ow| {
                    Geometry::source(ow, kw, g.left, g.w).map_or_else(zero, |iw| src[iw])
                }));
            }
        }
    }
    col
}

/// The transpose of [`im2col`]: every column entry added back onto its input pixel of `dx`
/// [n, c, h, w].
fn col2im<T: Real>(col: &[T], n: usize, g: Geometry, dx: &mut [T]) {
    let cols = n * g.out_plane();
    for row in 0..g.c * 9 {
        let (ci, kh, kw) = (row / 9, row % 9 / 3, row % 3);
        for j in 0..n {
            let plane = &mut dx[(j * g.c + ci) * g.plane()..][..g.plane()];
            let src = &col[row * cols + j * g.out_plane()..][..g.out_plane()];
            for oh in 0..g.ho {
                let Some(ih) = Geometry::source(oh, kh, g.top, g.h) else { continue };
                let dst = &mut plane[ih * g.w..][..g.w];
                for (ow, &v) in src[oh * g.wo..][..g.wo].iter().enumerate() {
                    if let Some(iw) = Geometry::source(ow, kw, g.left, g.w) {
                        dst[iw] += v;
                    }
                }
            }
        }
    }
}

fn conv_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let co = wl.shape().dims4()?.0;
    let g = Geometry::new(ci, h, wd);
    let (hw, ohw, k) = (g.plane(), g.out_plane(), ci * 9);
    let mut out = vec![zero::<T>(); b * co * ohw];
    if !out.is_empty() {
        let nb = images_per_block(b, ohw);
        out.par_chunks_mut(nb * co * ohw).enumerate().for_each(|(blk, out)| {
            let n = out.len() / (co * ohw);
            let cols = n * ohw;
            let col = im2col(&x[blk * nb * ci * hw..][..n * ci * hw], n, g);
            let mut y = vec![zero(); co * cols];
            matmul((co, cols, k), &mut y, false, Mat::rows(w, k), Mat::rows(&col, cols));
            swap_outer(&y, co, n, ohw, out);
        });
    }
    Ok(storage(out, (b, co, g.ho, g.wo)))
}

fn transposed_fwd<T: Real>(
    ds: &CpuStorage,
    dl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    (h, wd): (usize, usize),
) -> Result<(CpuStorage, Shape)> {
    let (d, w) = (slice::<T>(ds, dl)?, slice::<T>(ws, wl)?);
    let (b, co, _, _) = dl.shape().dims4()?;
    let ci = wl.shape().dims4()?.1;
    let g = Geometry::new(ci, h, wd);
    let (hw, ohw, k) = (g.plane(), g.out_plane(), ci * 9);
    let mut dx = vec![zero::<T>(); b * ci * hw];
    if !dx.is_empty() {
        let nb = images_per_block(b, ohw);
        dx.par_chunks_mut(nb * ci * hw).enumerate().for_each(|(blk, dx)| {
            let n = dx.len() / (ci * hw);
            let cols = n * ohw;
            let mut dt = vec![zero(); co * cols];
            swap_outer(&d[blk * nb * co * ohw..][..n * co * ohw], n, co, ohw, &mut dt);
            let mut col = vec![zero(); k * cols];
            matmul((k, cols, co), &mut col, false, Mat::rows_t(w, k), Mat::rows(&dt, cols));
            col2im(&col, n, g, dx);
        });
    }
    Ok(storage(dx, (b, ci, h, wd)))
}

fn weight_grad_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, d) = (slice::<T>(xs, xl)?, slice::<T>(ds, dl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let co = dl.shape().dims4()?.1;
    let g = Geometry::new(ci, h, wd);
    let (hw, ohw, k) = (g.plane(), g.out_plane(), ci * 9);
    let nb = images_per_block(b, ohw);
    let blocks = b.div_ceil(nb);
    let dw = sum_over_blocks(blocks, co * k, |blk, acc: &mut [T]| {
        let (b0, n) = (blk * nb, nb.min(b - blk * nb));
        let cols = n * ohw;
        let col = im2col(&x[b0 * ci * hw..][..n * ci * hw], n, g);
        let mut dt = vec![zero(); co * cols];
        swap_outer(&d[b0 * co * ohw..][..n * co * ohw], n, co, ohw, &mut dt);
        matmul((co, k, cols), acc, true, Mat::rows(&dt, cols), Mat::rows_t(&col, cols));
    });
    Ok(storage(dw, (co, ci, 3, 3)))
}
