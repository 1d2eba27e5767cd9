//! `kshot bench`: times kshot's workloads and, side by side, the PyTorch reference script that
//! mirrors them (embedded in the binary, run with the Python given by --pytorch).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;
use kshot::bench::{self, median, Workload};

const REFERENCE_SCRIPT: &str = include_str!("../../../benches/pytorch_reference.py");

#[derive(Args)]
pub struct BenchArgs {
    /// Workloads to run (default: all): conv4-step-28, conv4-step-84, resnet12-step-84,
    /// maml2-step, protonet-60w1s5q, predict-5w1s-1q, predict-5w1s-1000q.
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
    /// Write the embedded PyTorch reference script to this file and exit.
    #[arg(long, value_name = "FILE")]
    write_reference: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.write_reference {
        std::fs::write(path, REFERENCE_SCRIPT)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote the PyTorch reference script to {}", path.display());
        return Ok(());
    }
    let workloads = if a.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        a.workloads
            .iter()
            .map(|n| {
                Workload::from_name(n).with_context(|| {
                    let names: Vec<_> = Workload::ALL.iter().map(|w| w.name()).collect();
                    format!("unknown workload `{n}`; choose from {}", names.join(", "))
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
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
    let kernels = if a.composite_kernels { "composite" } else { "fused" };
    println!(
        "kshot {} ({kernels} kernels) vs PyTorch, {} threads: median of {} steps in {} alternating rounds, after {} warm-up steps",
        kshot::VERSION,
        a.threads,
        a.reps,
        a.rounds,
        a.warmup
    );
    println!("| workload | kshot ms | PyTorch ms | kshot / PyTorch |");
    println!("|---|---:|---:|---:|");
    let mut torch_version = None;
    let rounds = a.rounds.clamp(1, a.reps.max(1));
    for w in workloads {
        let mut prepared = bench::prepare(w, !a.composite_kernels)?;
        bench::time(&mut prepared, a.warmup, 0)?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let reps = a.reps / rounds + usize::from(round < a.reps % rounds);
            let kshot_round = bench::time(&mut prepared, 0, reps)?;
            eprint!("{} round {}: kshot {:.1} ms", w.name(), round + 1, median(&kshot_round));
            ours.extend(kshot_round);
            if let (Some(python), Some(script)) = (&a.pytorch, &script) {
                let (samples, version) = run_reference(python, script, w, reps, &a)?;
                eprint!(", PyTorch {:.1} ms", median(&samples));
                torch_version = Some(version);
                theirs.extend(samples);
            }
            eprintln!();
        }
        drop(prepared);
        let ours = median(&ours);
        let theirs = (!theirs.is_empty()).then(|| median(&theirs));
        match theirs {
            Some(t) => println!("| {} | {ours:.1} | {t:.1} | {:.2} |", w.describe(), ours / t),
            None => println!("| {} | {ours:.1} | – | – |", w.describe()),
        }
    }
    if let Some(path) = script {
        let _ = std::fs::remove_file(path);
    }
    if let Some(v) = torch_version {
        println!("PyTorch {v}");
    }
    Ok(())
}

fn run_reference(
    python: &PathBuf,
    script: &PathBuf,
    w: Workload,
    reps: usize,
    a: &BenchArgs,
) -> anyhow::Result<(Vec<f64>, String)> {
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
        torch: String,
    }
    let reply: Reply = serde_json::from_slice(&out.stdout)
        .context("the PyTorch reference printed no JSON result")?;
    Ok((reply.samples_ms, reply.torch))
}
