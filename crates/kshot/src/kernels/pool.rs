//! 2×2 max-pool, stride 2, floor mode, as a closed family of custom ops that are linear in their
//! second argument and route through the arg-max of the first (the first maximum of each window
//! in row-major order). The arg-max is locally constant, so its own derivative is zero:
//!
//! - `max_pool2x2(x) = gather(x, x)`: d/dx = unpool(x, dy)
//! - `unpool(x, g)`: scatters g to the arg-max of x; d/dg = gather(x, G)
//! - `gather(x, t)`: reads t at the arg-max of x; d/dt = unpool(x, G)

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, same_dtype, slice, storage, zero, Real};

pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    x.contiguous()?.apply_op1(MaxPool)
}

fn pooled_dims(x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    Ok((b, c, h / 2, w / 2))
}

/// The gradient of [`max_pool2x2`] at `x` for the output gradient `g`, as a differentiable op.
pub(crate) fn unpool(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if g.dims4()? != pooled_dims(x)? {
        bail!("unpool: gradient {:?} does not fit input {:?}", g.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&g.contiguous()?, Unpool)
}

fn gather(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    if t.dims() != x.dims() {
        bail!("max-pool gather: {:?} does not fit input {:?}", t.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&t.contiguous()?, Gather)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "kshot-max-pool2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(s, gather_fwd(s, l, s, l))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(unpool(x, dy)?))
    }
}

struct Unpool;

impl CustomOp2 for Unpool {
    fn name(&self) -> &'static str {
        "kshot-max-unpool2x2"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, gs)?;
        dispatch!(xs, unpool_fwd(xs, xl, gs, gl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dg = if g.track_op() { Some(gather(x, dy)?) } else { None };
        Ok((None, dg))
    }
}

struct Gather;

impl CustomOp2 for Gather {
    fn name(&self) -> &'static str {
        "kshot-max-gather2x2"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(xs, ts)?;
        dispatch!(xs, gather_fwd(xs, xl, ts, tl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dt = if t.track_op() { Some(unpool(x, dy)?) } else { None };
        Ok((None, dt))
    }
}

/// Index, in a plane of width `w`, of the first maximum of each window of output row `oh`.
/// Branch-free selects: the comparisons are unpredictable on real data.
fn row_argmax<T: Real>(plane: &[T], w: usize, oh: usize) -> impl Iterator<Item = usize> + '_ {
    let (top, bottom) = (&plane[2 * oh * w..][..w], &plane[(2 * oh + 1) * w..][..w]);
    (0..w / 2).map(move |ow| {
        let j = 2 * ow;
        let first = |row: &[T], base: usize| {
            if row[j + 1] > row[j] {
                (row[j + 1], base + 1)
            } else {
                (row[j], base)
            }
        };
        let (v_top, i_top) = first(top, 2 * oh * w + j);
        let (v_bottom, i_bottom) = first(bottom, (2 * oh + 1) * w + j);
        if v_bottom > v_top {
            i_bottom
        } else {
            i_top
        }
    })
}

/// Runs `f(out_plane, x_plane, t_plane)` over the (B·C) planes, in parallel over images.
fn per_plane<T: Real>(
    out: &mut [T],
    out_plane: usize,
    (x, t): (&[T], &[T]),
    (c, hw, t_plane): (usize, usize, usize),
    f: impl Fn(&mut [T], &[T], &[T]) + Sync,
) {
    if out.is_empty() || out_plane == 0 || hw == 0 || t_plane == 0 {
        return;
    }
    out.par_chunks_mut(c * out_plane)
        .zip(x.par_chunks(c * hw).zip(t.par_chunks(c * t_plane)))
        .for_each(|(out, (x, t))| {
            for ((out, x), t) in out.chunks_mut(out_plane).zip(x.chunks(hw)).zip(t.chunks(t_plane))
            {
                f(out, x, t);
            }
        });
}

fn gather_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    ts: &CpuStorage,
    tl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, t) = (slice::<T>(xs, xl)?, slice::<T>(ts, tl)?);
    let (b, c, h, w) = xl.shape().dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![zero::<T>(); b * c * ho * wo];
    per_plane(&mut out, ho * wo, (x, t), (c, h * w, h * w), |out, x, t| {
        for (oh, out) in out.chunks_mut(wo).enumerate() {
            for (o, i) in out.iter_mut().zip(row_argmax(x, w, oh)) {
                *o = t[i];
            }
        }
    });
    Ok(storage(out, (b, c, ho, wo)))
}

fn unpool_fwd<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(xs, xl)?, slice::<T>(gs, gl)?);
    let (b, c, h, w) = xl.shape().dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![zero::<T>(); b * c * h * w];
    per_plane(&mut out, h * w, (x, g), (c, h * w, ho * wo), |out, x, g| {
        for (oh, g) in g.chunks(wo).enumerate() {
            for (&g, i) in g.iter().zip(row_argmax(x, w, oh)) {
                out[i] = g;
            }
        }
    });
    Ok(storage(out, (b, c, h, w)))
}
