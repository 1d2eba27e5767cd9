//! Times MAML meta-steps on random 28×28 tasks:
//! `cargo run --release --example maml_parts -- STEPS QUERIES META_BATCH [fo] [sequential] [composite]`.
use kshot::data::{Episode, EpisodeSpec};
use kshot::methods::{Maml, MamlConfig};
use kshot::nn::{BackboneConfig, Conv4Config};
use rand::SeedableRng;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    kshot::autograd::init();
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (steps, queries, batch) = (num(1, 5), num(2, 15), num(3, 1));
    let flag = |f: &str| args.iter().any(|a| a == f);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let config = MamlConfig {
        ways: 5,
        inner_steps: steps,
        inner_steps_test: steps,
        inner_lr: 0.4,
        first_order: flag("fo"),
        transductive: true,
        ..MamlConfig::default()
    };
    let backbone = Conv4Config { fast_kernels: !flag("composite"), ..Conv4Config::new(1) };
    let backbone = BackboneConfig::Conv4(backbone);
    let mut maml = Maml::new(config, &backbone, (28, 28), &mut rng, &kshot::Device::Cpu)?;
    maml.parallel_tasks = !flag("sequential");
    let cpu = kshot::Device::Cpu;
    let tasks = (0..batch)
        .map(|_| {
            Ok(Episode {
                spec: EpisodeSpec::new(5, 1, queries),
                index: 0,
                seed: 0,
                classes: (0..5).collect(),
                support: kshot::Tensor::randn(0f32, 1., (5, 1, 28, 28), &cpu)?,
                support_labels: (0..5).collect(),
                query: kshot::Tensor::randn(0f32, 1., (5 * queries, 1, 28, 28), &cpu)?,
                query_labels: (0..5 * queries as u32).map(|i| i / queries as u32).collect(),
                unlabelled: None,
            })
        })
        .collect::<Result<Vec<_>, candle_core::Error>>()?;
    let mut times = vec![];
    for _ in 0..9 {
        let t = Instant::now();
        let out = maml.meta_batch_loss(&tasks)?;
        out.loss.backward()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{steps} inner steps, {queries} queries, meta-batch {batch}: median {:.1} ms per meta-step",
        times[4]
    );
    Ok(())
}
