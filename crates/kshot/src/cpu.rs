//! The CPU that kshot's matrix products run on, and which of gemm's kernels they use.
//!
//! Convolutions (im2col + gemm) and candle's matmuls go through the `gemm` crate, built with its
//! `x86-v4` feature: each element type picks its kernel at its first product, by run-time
//! detection, AVX-512 (`avx512f`) where the CPU has it, else AVX2 + FMA, else scalar. So one
//! binary runs on AVX2-only CPUs and uses AVX-512 where there is some. [`force_avx2`] (or
//! `KSHOT_CPU=avx2`, read by [`apply_env`]) makes that choice pass over AVX-512, to time the
//! AVX2 kernels on an AVX-512 machine; it must come before the first matrix product. kshot's own
//! element-wise loops (batch norm's) are compiled for AVX-512, AVX2 + FMA and baseline x86-64 and
//! follow the same choice (`kernels::simd`), all three giving the same bits.

use serde::Serialize;

/// The environment variable that picks the gemm kernels: `avx2` forces AVX2 + FMA, `auto` (or
/// unset) lets gemm choose.
pub const CPU_ENV: &str = "KSHOT_CPU";

/// What the kernel choice may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CpuChoice {
    /// gemm's run-time detection: AVX-512 where the CPU has it.
    Auto,
    /// Never AVX-512: the AVX2 + FMA kernels (on a CPU that has them).
    Avx2,
}

impl CpuChoice {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" | "" => Ok(CpuChoice::Auto),
            "avx2" => Ok(CpuChoice::Avx2),
            other => anyhow::bail!("unknown CPU choice `{other}`; use auto or avx2"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuChoice::Auto => "auto",
            CpuChoice::Avx2 => "avx2",
        }
    }
}

/// The kernel family gemm's f32 and f64 products use (or will use at their first call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GemmPath {
    Avx512,
    Avx2Fma,
    Scalar,
}

impl GemmPath {
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Avx512 => "avx512",
            GemmPath::Avx2Fma => "avx2-fma",
            GemmPath::Scalar => "scalar",
        }
    }
}

/// Forces the AVX2 + FMA kernels. Fails when a product has already run on AVX-512 (the choice is
/// made once per element type, at its first call, and stays).
pub fn force_avx2() -> anyhow::Result<()> {
    anyhow::ensure!(
        gemm_common::disable_avx512(),
        "gemm already chose its AVX-512 kernels; set {CPU_ENV}=avx2 before starting, or force AVX2 before the first computation"
    );
    Ok(())
}

/// Applies `choice`: forces AVX2 for [`CpuChoice::Avx2`], nothing for auto.
pub fn apply(choice: CpuChoice) -> anyhow::Result<()> {
    match choice {
        CpuChoice::Auto => Ok(()),
        CpuChoice::Avx2 => force_avx2(),
    }
}

/// The choice `KSHOT_CPU` names (auto when unset).
pub fn env_choice() -> anyhow::Result<CpuChoice> {
    match std::env::var(CPU_ENV) {
        Ok(v) => CpuChoice::parse(v.trim()).map_err(|e| anyhow::anyhow!("{CPU_ENV}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(CpuChoice::Auto),
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{CPU_ENV} is not valid text; set it to auto or avx2")
        }
    }
}

/// Applies `KSHOT_CPU`: call it before any computation (the `kshot` binary does, first thing).
pub fn apply_env() -> anyhow::Result<CpuChoice> {
    let choice = env_choice()?;
    apply(choice)?;
    Ok(choice)
}

/// Whether AVX-512 has been switched off ([`force_avx2`]).
pub fn avx2_forced() -> bool {
    gemm_common::avx512_disabled()
}

/// The kernels gemm's f32/f64 products use: what its run-time choice gives on this CPU, given
/// [`force_avx2`].
pub fn gemm_path() -> GemmPath {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && !avx2_forced() {
            return GemmPath::Avx512;
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return GemmPath::Avx2Fma;
        }
    }
    GemmPath::Scalar
}

/// The SIMD features of this CPU that matter to gemm's kernels, as detected at run time, each
/// with whether it is present.
pub fn features() -> Vec<(&'static str, bool)> {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        use std::arch::is_x86_feature_detected as has;
        vec![
            ("avx", has!("avx")),
            ("avx2", has!("avx2")),
            ("fma", has!("fma")),
            ("f16c", has!("f16c")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512dq", has!("avx512dq")),
            ("avx512vl", has!("avx512vl")),
            ("avx512vnni", has!("avx512vnni")),
            ("avx512bf16", has!("avx512bf16")),
        ]
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        Vec::new()
    }
}

/// The CPU's model name as `lscpu` prints it (`model name` of /proc/cpuinfo), when there is one.
pub fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim()))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Everything above, for reports: the model, the detected features, the gemm kernels in use.
#[derive(Debug, Clone, Serialize)]
pub struct CpuReport {
    pub model: Option<String>,
    /// The present features of [`features`].
    pub features: Vec<&'static str>,
    /// The absent ones.
    pub missing: Vec<&'static str>,
    pub gemm: GemmPath,
    pub avx2_forced: bool,
    /// Whether a product has run on gemm's AVX-512 kernels so far in this process.
    pub avx512_used: bool,
}

impl CpuReport {
    pub fn now() -> Self {
        let all = features();
        Self {
            model: model_name(),
            features: all.iter().filter(|f| f.1).map(|f| f.0).collect(),
            missing: all.iter().filter(|f| !f.1).map(|f| f.0).collect(),
            gemm: gemm_path(),
            avx2_forced: avx2_forced(),
            avx512_used: gemm_common::avx512_chosen(),
        }
    }

    /// One line: `CPU: <model>; features: avx avx2 …; absent: avx512f …; gemm kernels: avx2-fma (…)`.
    pub fn line(&self) -> String {
        let forced = if self.avx2_forced { " (AVX2 forced)" } else { " (run-time choice)" };
        format!(
            "CPU: {}; features: {}; absent: {}; gemm kernels: {}{forced}",
            self.model.as_deref().unwrap_or("unknown model"),
            list(&self.features),
            list(&self.missing),
            self.gemm.name()
        )
    }
}

fn list(v: &[&str]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}
