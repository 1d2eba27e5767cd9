//! Element-wise loops compiled three times — for AVX-512, for AVX2 + FMA and for baseline x86-64 —
//! and chosen at run time like gemm's kernels ([`crate::cpu::gemm_path`], so `KSHOT_CPU=avx2`
//! forces the AVX2 versions too). The versions run the same scalar code, only vectorised by the
//! compiler for wider registers: no operation is fused or reordered, so all three give the same
//! bits.

/// Defines `fn $name<T: Real>(args) -> R` whose body is compiled once per instruction set and
/// dispatched by what the CPU has. Write the body with plain `for` loops over slices (a closure
/// is compiled for the baseline target only).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$T:ident: Real>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: Real>($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4<$T: Real>($($arg: $ty),*) $(-> $ret)? $body
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3<$T: Real>($($arg: $ty),*) $(-> $ret)? $body
                match $crate::kernels::simd::level() {
                    // SAFETY: `level` reports only features the CPU has (run-time detection).
                    $crate::kernels::simd::Level::Avx512 => return unsafe { v4::<$T>($($arg),*) },
                    // SAFETY: as above.
                    $crate::kernels::simd::Level::Avx2 => return unsafe { v3::<$T>($($arg),*) },
                    $crate::kernels::simd::Level::Baseline => {}
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

/// The instruction set the element-wise loops run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Baseline,
}

/// AVX-512 where gemm uses it (not when AVX2 is forced), else AVX2 + FMA where the CPU has both.
pub(crate) fn level() -> Level {
    #[cfg(test)]
    if let Some(forced) = FORCED.with(std::cell::Cell::get) {
        return forced;
    }
    detected()
}

fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
        if avx512 && !crate::cpu::avx2_forced() {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<Level>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` on this thread once at each level this CPU can run, and returns the results.
#[cfg(test)]
pub(crate) fn at_each_level<R>(mut f: impl FnMut() -> R) -> Vec<(Level, R)> {
    let all = [Level::Baseline, Level::Avx2, Level::Avx512];
    let top = all.iter().position(|&l| l == detected()).unwrap_or(0);
    all[..=top]
        .iter()
        .map(|&l| {
            FORCED.with(|c| c.set(Some(l)));
            let r = f();
            FORCED.with(|c| c.set(None));
            (l, r)
        })
        .collect()
}
