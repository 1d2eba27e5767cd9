//! Forward + backward time of Conv4 with the fused kernels against candle's composite ops.
//!
//! `cargo run --release -p kshot --example kernel_bench -- [runs] [28] [84] [fast|composite]`:
//! workloads `28` (360×1×28×28, a ProtoNet 60-way episode) and `84` (80×3×84×84), default both;
//! both paths unless one is named; 10 runs by default. The paths take turns run by run, so that
//! other work on a shared machine slows both alike.

use std::time::Instant;

use candle_core::{bail, Device, Result, Tensor};
use kshot::nn::{BnMode, Conv4, Conv4Config, ParamSet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// CPU seconds (user + system) this process has used, from /proc (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

struct Path {
    name: &'static str,
    net: Conv4,
    params: ParamSet,
    wall_ms: Vec<f64>,
    cpu_ms: f64,
}

impl Path {
    fn step(&self, x: &Tensor) -> Result<()> {
        let emb = self.net.forward(&self.params.values(), x, BnMode::Batch(None))?;
        let grads = emb.sum_all()?.backward()?;
        for (name, v) in self.params.iter() {
            if grads.get(v.as_tensor()).is_none() {
                bail!("{name} got no gradient");
            }
        }
        Ok(())
    }

    fn timed_step(&mut self, x: &Tensor) -> Result<()> {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        self.step(x)?;
        self.wall_ms.push(t.elapsed().as_secs_f64() * 1e3);
        self.cpu_ms += (cpu_seconds() - cpu) * 1e3;
        Ok(())
    }

    fn median_ms(&self) -> f64 {
        let mut t = self.wall_ms.clone();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    }
}

fn main() -> Result<()> {
    kshot::autograd::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10).max(1);
    let named = |options: &[&'static str]| {
        let picked: Vec<&'static str> =
            options.iter().copied().filter(|o| args.iter().any(|a| a == o)).collect();
        if picked.is_empty() {
            options.to_vec()
        } else {
            picked
        }
    };
    println!("rayon threads: {}", rayon::current_num_threads());
    for workload in named(&["28", "84"]) {
        let (b, c, hw) = if workload == "28" { (360, 1, 28) } else { (80, 3, 84) };
        let x = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &Device::Cpu)?;
        let mut paths = Vec::new();
        for name in named(&["fast", "composite"]) {
            let net =
                Conv4::new(Conv4Config { fast_kernels: name == "fast", ..Conv4Config::new(c) });
            let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu)?;
            let path = Path { name, net, params, wall_ms: Vec::new(), cpu_ms: 0.0 };
            path.step(&x)?;
            paths.push(path);
        }
        for _ in 0..runs {
            for path in &mut paths {
                path.timed_step(&x)?;
            }
        }
        for p in &paths {
            println!(
                "{b}×{c}×{hw}×{hw} {:<9} forward+backward: median {:8.1} ms of {runs} runs, CPU {:8.1} ms per run",
                p.name,
                p.median_ms(),
                p.cpu_ms / runs as f64
            );
        }
        if let [fast, composite] = &paths[..] {
            println!(
                "{b}×{c}×{hw}×{hw} speed-up: {:.1}×",
                composite.median_ms() / fast.median_ms()
            );
        }
    }
    Ok(())
}
