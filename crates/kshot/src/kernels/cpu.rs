//! Plumbing shared by the kernels: typed views of candle's CPU storage, dtype dispatch, and a
//! bounds-checked wrapper around the `gemm` crate.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape, WithDType};

/// The float types the kernels run on, with conversions to and from f64 that always inline (so
/// that loops over them vectorise).
pub(crate) trait Real: WithDType {
    fn wide(self) -> f64;
    fn narrow(v: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn wide(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(v: f64) -> Self {
        v
    }
}

/// The contiguous elements of a tensor's storage.
pub(crate) fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("kshot kernels need contiguous inputs"),
    }
}

pub(crate) fn zero<T: Real>() -> T {
    T::from_f64(0.0)
}

/// Runs the kernel body `$f::<T>` for the dtype of `$s`, f32 or f64.
macro_rules! dispatch {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match $crate::kernels::cpu::dtype($s) {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            dt => candle_core::bail!("kshot kernels support f32 and f64, not {dt:?}"),
        }
    };
}
pub(crate) use dispatch;

pub(crate) fn dtype(s: &CpuStorage) -> DType {
    s.dtype()
}

pub(crate) fn same_dtype(a: &CpuStorage, b: &CpuStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        bail!("kshot kernels need one dtype, got {:?} and {:?}", a.dtype(), b.dtype());
    }
    Ok(())
}

pub(crate) fn storage<T: Real>(data: Vec<T>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(data), shape.into())
}

/// A strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub fn rows_t(data: &'a [T], cols: usize) -> Self {
        Self { data, rs: 1, cs: cols }
    }
}

fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (`dst` row-major), or `+=` when `accumulate`. Single-threaded:
/// callers parallelise over independent blocks.
pub(crate) fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    assert!(fits(dst.len(), m, n, n, 1), "matmul: dst too small");
    assert!(fits(lhs.data.len(), m, k, lhs.rs, lhs.cs), "matmul: lhs too small");
    assert!(fits(rhs.data.len(), k, n, rhs.rs, rhs.cs), "matmul: rhs too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(zero());
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm touches inside its slice; `dst` is
    // borrowed mutably and cannot alias `lhs` or `rhs`; T is f32 or f64, which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}
