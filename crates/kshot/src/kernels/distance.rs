//! Pairwise squared Euclidean distances, d[i, j] = Σ_k (a[i, k] - b[j, k])², summed directly (not
//! as |a|² + |b|² - 2a·b, which cancels badly when a row is near a prototype) in f64.
//!
//! The backward is written in candle ops, so it is exact to every order:
//! d/da = 2(a ⊙ Σ_j g - g·b), d/db = 2(b ⊙ Σ_i g - gᵀ·a).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, same_dtype, slice, storage, zero, Real};

pub fn squared_euclidean(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, d) = a.dims2()?;
    let (_, db) = b.dims2()?;
    if d != db {
        bail!("squared_euclidean: rows of {:?} and {:?} differ in length", a.dims(), b.dims());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SquaredEuclidean)
}

struct SquaredEuclidean;

impl CustomOp2 for SquaredEuclidean {
    fn name(&self) -> &'static str {
        "kshot-squared-euclidean"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(as_, bs)?;
        dispatch!(as_, distances(as_, al, bs, bl))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = if a.track_op() {
            Some(((a.broadcast_mul(&g.sum_keepdim(1)?)? - g.matmul(b)?)? * 2.0)?)
        } else {
            None
        };
        let db = if b.track_op() {
            let gt = g.t()?;
            Some(((b.broadcast_mul(&gt.sum_keepdim(1)?)? - gt.matmul(a)?)? * 2.0)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

fn distances<T: Real>(
    as_: &CpuStorage,
    al: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (slice::<T>(as_, al)?, slice::<T>(bs, bl)?);
    let (n, d) = al.shape().dims2()?;
    let m = bl.shape().dims2()?.0;
    let mut out = vec![zero::<T>(); n * m];
    if d > 0 && m > 0 {
        out.par_chunks_mut(m).zip(a.par_chunks(d)).for_each(|(row, a)| {
            for (o, b) in row.iter_mut().zip(b.chunks(d)) {
                let mut lanes = [0.0f64; 4];
                let pairs = a.chunks_exact(4).zip(b.chunks_exact(4));
                for (x, y) in pairs {
                    for k in 0..4 {
                        let t = x[k].to_f64() - y[k].to_f64();
                        lanes[k] += t * t;
                    }
                }
                let tail = d - d % 4;
                let rest: f64 = a[tail..]
                    .iter()
                    .zip(&b[tail..])
                    .map(|(x, y)| (x.to_f64() - y.to_f64()).powi(2))
                    .sum();
                *o = T::from_f64(lanes.iter().sum::<f64>() + rest);
            }
        });
    }
    Ok(storage(out, (n, m)))
}
