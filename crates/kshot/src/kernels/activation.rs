//! A residual sum followed by a LeakyReLU, y = leaky_relu(a + b) (ResNet-12's block output), as a
//! closed family of two custom ops. The slope m = 1 where y > 0, else `leak` (for leak ≥ 0, y > 0
//! exactly where a + b > 0), is locally constant, so its own derivative is zero:
//!
//! - `add_leaky_relu(a, b)`: d/da = d/db = slope(y, dy)
//! - `slope(y, g) = m·g`: d/dg = slope(y, G); d/dy = 0
//!
//! Only the output is kept for the backward pass; the sum a + b is never stored.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{dispatch, same_dtype, slice, storage, zero, Real};

/// Elements per parallel chunk of these element-wise kernels.
const CHUNK: usize = 1 << 14;

pub fn add_leaky_relu(a: &Tensor, b: &Tensor, leak: f64) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&leak) {
        bail!("leaky relu: the negative slope must lie in [0, 1], got {leak}");
    }
    if a.dims() != b.dims() {
        bail!("add_leaky_relu: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddLeakyRelu { leak })
}

fn slope(y: &Tensor, g: &Tensor, leak: f64) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&g.contiguous()?, Slope { leak })
}

struct AddLeakyRelu {
    leak: f64,
}

impl CustomOp2 for AddLeakyRelu {
    fn name(&self) -> &'static str {
        "kshot-add-leaky-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2)?;
        dispatch!(s1, add_leaky_fwd(self.leak, s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = slope(y, dy, self.leak)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

struct Slope {
    leak: f64,
}

impl CustomOp2 for Slope {
    fn name(&self) -> &'static str {
        "kshot-leaky-relu-slope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_dtype(s1, s2)?;
        dispatch!(s1, slope_fwd(self.leak, s1, l1, s2, l2))
    }

    fn bwd(
        &self,
        y: &Tensor,
        _g: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(slope(y, d_out, self.leak)?)))
    }
}

/// out = f(a, b) element by element, in parallel chunks.
fn zip_map<T: Real>(
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(T, T) -> T + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (slice::<T>(s1, l1)?, slice::<T>(s2, l2)?);
    if a.len() != b.len() {
        bail!("kshot element-wise kernel: {} and {} elements", a.len(), b.len());
    }
    let mut out = vec![zero::<T>(); a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(
        |(out, (a, b))| {
            for (o, (&a, &b)) in out.iter_mut().zip(a.iter().zip(b)) {
                *o = f(a, b);
            }
        },
    );
    Ok(storage(out, l1.shape().clone()))
}

fn add_leaky_fwd<T: Real>(
    leak: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let leak = T::from_f64(leak);
    zip_map::<T>((s1, l1), (s2, l2), |a, b| {
        let z = a + b;
        if z > zero() {
            z
        } else {
            leak * z
        }
    })
}

fn slope_fwd<T: Real>(
    leak: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let leak = T::from_f64(leak);
    zip_map::<T>((s1, l1), (s2, l2), |y, g| if y > zero() { g } else { leak * g })
}
