//! `kshot bench`: times kshot's workloads and, side by side, the PyTorch reference script that
//! mirrors them (embedded in the binary, run with the Python given by --pytorch).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use kshot::bench::{self, median, Workload};
use kshot::cpu::{CpuChoice, CpuReport};

const REFERENCE_SCRIPT: &str = include_str!("../../../benches/pytorch_reference.py");

#[derive(Args)]
pub struct BenchArgs {
    /// Workloads to run (default: all): conv4-step-28, conv4-step-84, resnet12-step-84,
    /// maml2-step, protonet-60w1s5q, predict-5w1s-1q, predict-5w1s-1000q, gnn-5w1s-100graphs,
    /// mann-16x50-steps, maml2-20w5s, matching-5w1s15q, meta-lstm-5w1s15q, baseline-16x4112c,
    /// eval-protonet-5w1s15q, metanet-5w1s10q.
    #[arg(long = "workload", value_name = "NAME")]
    workloads: Vec<String>,
    /// Timed repetitions per workload (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed repetitions before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Alternate kshot and PyTorch this many times per workload (reps are split between rounds),
    /// so that both see the same machine conditions.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Threads for both kshot and PyTorch.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// A Python interpreter with torch installed: runs the PyTorch reference beside each workload.
    #[arg(long, value_name = "PYTHON")]
    pytorch: Option<PathBuf>,
    /// Time candle's composite ops instead of kshot's fused kernels.
    #[arg(long)]
    composite_kernels: bool,
    /// gemm's kernels for kshot: auto (AVX-512 where the CPU has it, else AVX2 + FMA) or avx2
    /// (never AVX-512). Default: KSHOT_CPU, else auto. PyTorch chooses its own (its
    /// ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA pass through to it).
    #[arg(long, value_enum)]
    cpu: Option<CpuChoice>,
    /// Print one JSON object (the CPU, every workload's medians and ratio) instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the embedded PyTorch reference script to this file and exit.
    #[arg(long, value_name = "FILE")]
    write_reference: Option<PathBuf>,
}

/// One workload's result: medians in ms.
struct Row {
    workload: Workload,
    kshot_ms: f64,
    pytorch_ms: Option<f64>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.pytorch_ms.map(|t| self.kshot_ms / t)
    }
}

/// What the reference script says about the PyTorch that ran it.
#[derive(Clone, serde::Deserialize)]
struct TorchInfo {
    torch: String,
    /// ATen's vector kernels (`torch.backends.cpu.get_cpu_capability()`).
    #[serde(default)]
    cpu_capability: Option<String>,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.write_reference {
        std::fs::write(path, REFERENCE_SCRIPT)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote the PyTorch reference script to {}", path.display());
        return Ok(());
    }
    let workloads = parse_workloads(&a.workloads)?;
    choose_cpu(a.cpu)?;
    kshot::set_threads(a.threads)?;
    let script = match &a.pytorch {
        Some(_) => {
            let path = std::env::temp_dir()
                .join(format!("kshot-pytorch-reference-{}.py", std::process::id()));
            std::fs::write(&path, REFERENCE_SCRIPT)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let load_before = load_average();
    let kernels = if a.composite_kernels { "composite" } else { "fused" };
    if !a.json {
        println!(
            "kshot {} ({kernels} kernels) vs PyTorch, {} threads: median of {} steps in {} alternating rounds, after {} warm-up steps",
            kshot::VERSION,
            a.threads,
            a.reps,
            a.rounds,
            a.warmup
        );
        println!("{}", CpuReport::now().line());
        println!("| workload | kshot ms | PyTorch ms | kshot / PyTorch |");
        println!("|---|---:|---:|---:|");
    }
    let mut torch = None;
    let mut rows = Vec::new();
    let measured = workloads.into_iter().try_for_each(|w| {
        let row = measure(w, &a, script.as_deref(), &mut torch)?;
        if !a.json {
            print_row(&row);
        }
        rows.push(row);
        anyhow::Ok(())
    });
    if let Some(path) = &script {
        let _ = std::fs::remove_file(path);
    }
    measured?;
    let load_after = load_average();
    let cpu = CpuReport::now();
    if a.json {
        let json = report_json(&a, kernels, &cpu, torch.as_ref(), &rows, (load_before, load_after));
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    if let Some(t) = &torch {
        let capability = t.cpu_capability.as_deref().unwrap_or("unknown");
        println!("PyTorch {} (ATen CPU capability {capability})", t.torch);
    }
    if let (Some(before), Some(after)) = (load_before, load_after) {
        println!("load average (1 min): {before:.2} before, {after:.2} after");
    }
    Ok(())
}

fn parse_workloads(names: &[String]) -> anyhow::Result<Vec<Workload>> {
    if names.is_empty() {
        return Ok(Workload::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Workload::from_name(n).with_context(|| {
                let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload `{n}`; choose from {}", names.join(", "))
            })
        })
        .collect()
}

/// Applies --cpu, or leaves KSHOT_CPU's choice (applied by main) in place.
fn choose_cpu(choice: Option<CpuChoice>) -> anyhow::Result<()> {
    match choice {
        None => Ok(()),
        Some(CpuChoice::Auto) if kshot::cpu::avx2_forced() => bail!(
            "{}=avx2 forces the AVX2 kernels for the whole process; unset it to bench with --cpu auto",
            kshot::cpu::CPU_ENV
        ),
        Some(c) => kshot::cpu::apply(c),
    }
}

/// Times `w` in kshot and, with a script, in PyTorch, alternating in rounds.
fn measure(
    w: Workload,
    a: &BenchArgs,
    script: Option<&Path>,
    torch: &mut Option<TorchInfo>,
) -> anyhow::Result<Row> {
    let mut prepared = bench::prepare(w, !a.composite_kernels)
        .with_context(|| format!("cannot set up {}", w.name()))?;
    bench::time(&mut prepared, a.warmup, 0)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let rounds = a.rounds.clamp(1, a.reps.max(1));
    for round in 0..rounds {
        let reps = a.reps / rounds + usize::from(round < a.reps % rounds);
        let kshot_round = bench::time(&mut prepared, 0, reps)?;
        eprint!("{} round {}: kshot {:.1} ms", w.name(), round + 1, median(&kshot_round));
        ours.extend(kshot_round);
        if let (Some(python), Some(script)) = (&a.pytorch, script) {
            let (samples, info) = run_reference(python, script, w, reps, a)?;
            eprint!(", PyTorch {:.1} ms", median(&samples));
            *torch = Some(info);
            theirs.extend(samples);
        }
        eprintln!();
    }
    let pytorch_ms = (!theirs.is_empty()).then(|| median(&theirs));
    Ok(Row { workload: w, kshot_ms: median(&ours), pytorch_ms })
}

fn print_row(row: &Row) {
    let (name, ours) = (row.workload.describe(), row.kshot_ms);
    match (row.pytorch_ms, row.ratio()) {
        (Some(t), Some(r)) => println!("| {name} | {ours:.1} | {t:.1} | {r:.2} |"),
        _ => println!("| {name} | {ours:.1} | – | – |"),
    }
}

/// A finite number, or null (a median of no samples is NaN).
fn number(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn report_json(
    a: &BenchArgs,
    kernels: &str,
    cpu: &CpuReport,
    torch: Option<&TorchInfo>,
    rows: &[Row],
    (load_before, load_after): (Option<f64>, Option<f64>),
) -> serde_json::Value {
    let workloads: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|r| {
            let value = serde_json::json!({
                "description": r.workload.describe(),
                "preset": r.workload.preset(),
                "kshot_ms": number(r.kshot_ms),
                "pytorch_ms": r.pytorch_ms.map(number),
                "ratio": r.ratio().map(number),
            });
            (r.workload.name().to_string(), value)
        })
        .collect();
    serde_json::json!({
        "kshot": kshot::VERSION,
        "kernels": kernels,
        "threads": a.threads,
        "reps": a.reps,
        "rounds": a.rounds,
        "warmup": a.warmup,
        "cpu": cpu,
        "pytorch": torch.map(|t| serde_json::json!({
            "version": t.torch,
            "cpu_capability": t.cpu_capability,
        })),
        "load_average_1min": { "before": load_before, "after": load_after },
        "workloads": workloads,
    })
}

/// The 1-minute load average (/proc/loadavg), where there is one.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

fn run_reference(
    python: &Path,
    script: &Path,
    w: Workload,
    reps: usize,
    a: &BenchArgs,
) -> anyhow::Result<(Vec<f64>, TorchInfo)> {
    let out = Command::new(python)
        .arg(script)
        .args(["--workload", w.name()])
        .args([
            "--reps",
            &reps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
            "--threads",
            &a.threads.to_string(),
        ])
        .output()
        .with_context(|| {
            format!(
                "cannot run {}; pass --pytorch a Python that has torch installed",
                python.display()
            )
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("no output");
        bail!("the PyTorch reference failed under {}: {last}", python.display());
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        samples_ms: Vec<f64>,
        #[serde(flatten)]
        info: TorchInfo,
    }
    let reply: Reply = serde_json::from_slice(&out.stdout)
        .context("the PyTorch reference printed no JSON result")?;
    Ok((reply.samples_ms, reply.info))
}
