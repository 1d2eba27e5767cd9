use kshot::data::{Episode, EpisodeSpec};
use kshot::methods::{Maml, MamlConfig};
use kshot::nn::Conv4Config;
use rand::SeedableRng;
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    kshot::autograd::init();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let composite = std::env::args().any(|a| a == "composite");
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let fo = std::env::args().any(|a| a == "fo");
    let config = MamlConfig { ways: 5, inner_steps: steps, inner_steps_test: 5, inner_lr: 0.4, first_order: fo };
    let bb = Conv4Config { fast_kernels: !composite, ..Conv4Config::new(1) };
    let maml = Maml::new(config, bb, (28, 28), &mut rng, &kshot::Device::Cpu)?;
    let ep = Episode { spec: EpisodeSpec::new(5,1,15), classes: (0..5).collect(),
        support: kshot::Tensor::randn(0f32, 1., (5,1,28,28), &kshot::Device::Cpu)?, support_labels: (0..5).collect(),
        query: kshot::Tensor::randn(0f32, 1., (75,1,28,28), &kshot::Device::Cpu)?, query_labels: (0..75).map(|i| i/15).collect() };
    let theta = kshot::methods::Learner::params(&maml).detached_values();
    let mut ts = vec![];
    for _ in 0..15 { let t = Instant::now(); maml.task_gradient(&theta, &ep, steps)?; ts.push(t.elapsed().as_secs_f64()*1e3); }
    ts.sort_by(f64::total_cmp);
    println!("steps {steps} fo {fo} median {:.1} ms", ts[7]);
    Ok(())
}
