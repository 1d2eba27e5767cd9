//! 3×3 convolution (stride 1, padding 1, no bias) where every image has its own kernel:
//! `conv_each(x [B, Ci, H, W], w [B, Co, Ci, 3, 3])[b] = conv(x[b], w[b])` (Meta Networks: each
//! query reads its own fast weights). A closed family of custom ops like [`super::conv`], so
//! gradients of any order are exact:
//!
//! - `conv_each(x, w)`: d/dx = conv_each(dy, flip_t_each(w)), d/dw = weight_grad_each(x, dy)
//! - `flip_t_each(w)`: self-adjoint, d/dw = flip_t_each(dy)
//! - `weight_grad_each(x, dy)`: d/dx = conv_each(dy, flip_t_each(G)), d/d(dy) = conv_each(x, G)
//!
//! Images are independent, so they run in parallel and no sum depends on the thread count.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::im2col;
use super::cpu::{dispatch, matmul, same_dtype, slice, storage, zero, Mat, Real};

pub fn conv3x3_each(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, ci, _, _) = x.dims4()?;
    let dims = w.dims();
    if dims.len() != 5 || dims[0] != b || dims[2] != ci || dims[3..] != [3, 3] {
        bail!(
            "conv3x3_each: weights {dims:?} do not fit input {:?} (expected [B, Co, Ci, 3, 3])",
            x.dims()
        );
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, ConvEach)
}

fn flip_t_each(w: &Tensor) -> Result<Tensor> {
    w.contiguous()?.apply_op1(FlipTEach)
}

fn weight_grad_each(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let (db, _, dh, dw) = dy.dims4()?;
    if (b, h, w) != (db, dh, dw) {
        bail!("weight_grad_each: gradient {:?} does not fit input {:?}", dy.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&dy.contiguous()?, WeightGradEach)
}

struct ConvEach;

impl CustomOp2 for ConvEach {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-each"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ws)?;
        dispatch!(xs, conv_each_fwd(xs, xl, ws, wl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(conv3x3_each(dy, &flip_t_each(w)?)?) } else { None };
        let dw = if w.track_op() { Some(weight_grad_each(x, dy)?) } else { None };
        Ok((dx, dw))
    }
}

struct FlipTEach;

impl CustomOp1 for FlipTEach {
    fn name(&self) -> &'static str {
        "kshot-flip-t-each"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, flip_t_each_fwd(s, l))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(flip_t_each(dy)?))
    }
}

struct WeightGradEach;

impl CustomOp2 for WeightGradEach {
    fn name(&self) -> &'static str {
        "kshot-conv3x3-each-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ds)?;
        dispatch!(xs, weight_grad_each_fwd(xs, xl, ds, dl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        dy: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(conv3x3_each(dy, &flip_t_each(g)?)?) } else { None };
        let ddy = if dy.track_op() { Some(conv3x3_each(x, g)?) } else { None };
        Ok((dx, ddy))
    }
}

fn dims5(l: &Layout) -> Result<[usize; 5]> {
    match l.shape().dims() {
        &[b, o, i, kh, kw] if (kh, kw) == (3, 3) => Ok([b, o, i, kh, kw]),
        d => bail!("expected per-image 3×3 kernels [B, Co, Ci, 3, 3], got {d:?}"),
    }
}

fn conv_each_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let [_, co, _, _, _] = dims5(wl)?;
    let (hw, k) = (h * wd, ci * 9);
    let mut out = vec![zero::<T>(); b * co * hw];
    if !out.is_empty() {
        out.par_chunks_mut(co * hw).enumerate().for_each(|(j, out)| {
            let col = im2col(&x[j * ci * hw..][..ci * hw], 1, ci, h, wd);
            let w = &w[j * co * k..][..co * k];
            matmul((co, hw, k), out, false, Mat::rows(w, k), Mat::rows(&col, hw));
        });
    }
    Ok(storage(out, (b, co, h, wd)))
}

fn weight_grad_each_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ds: &CpuStorage,
    dl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, dy) = (slice::<T>(xs, xl)?, slice::<T>(ds, dl)?);
    let (b, ci, h, wd) = xl.shape().dims4()?;
    let co = dl.shape().dims4()?.1;
    let (hw, k) = (h * wd, ci * 9);
    let mut dw = vec![zero::<T>(); b * co * k];
    if !dw.is_empty() {
        dw.par_chunks_mut(co * k).enumerate().for_each(|(j, dw)| {
            let col = im2col(&x[j * ci * hw..][..ci * hw], 1, ci, h, wd);
            let dy = &dy[j * co * hw..][..co * hw];
            matmul((co, k, hw), dw, false, Mat::rows(dy, hw), Mat::rows_t(&col, hw));
        });
    }
    Ok(storage(dw, vec![b, co, ci, 3, 3]))
}

fn flip_t_each_fwd<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let w = slice::<T>(s, l)?;
    let [b, co, ci, _, _] = dims5(l)?;
    let per = co * ci * 9;
    let mut out = vec![zero::<T>(); w.len()];
    for (src, dst) in w.chunks_exact(per).zip(out.chunks_exact_mut(per)) {
        for i in 0..ci {
            for o in 0..co {
                let from = &src[(o * ci + i) * 9..][..9];
                for (t, d) in dst[(i * co + o) * 9..][..9].iter_mut().enumerate() {
                    *d = from[8 - t];
                }
            }
        }
    }
    Ok(storage(out, vec![b, ci, co, 3, 3]))
}
