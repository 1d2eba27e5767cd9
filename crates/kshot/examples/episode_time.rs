//! Times ProtoNet training episodes (60-way 1-shot 5-query, 28×28, random images):
//! `cargo run --release --example episode_time [-- composite]`.

use kshot::data::{Class, EpisodeSampler, EpisodeSpec, Grouping, ImageSet};
use kshot::optim::Adam;

fn main() -> anyhow::Result<()> {
    let composite = std::env::args().any(|a| a == "composite");
    let classes = (0..100)
        .map(|c| Class {
            name: format!("c{c}"),
            group: "g".into(),
            pixels: (0..20 * 784).map(|i| ((i * 7 + c * 13) % 256) as u8).collect(),
        })
        .collect();
    let set = ImageSet { name: "random".into(), channels: 1, height: 28, width: 28, classes };
    let mut config = kshot::presets::default_config();
    config.backbone.fast_kernels = !composite;
    let mut learner = kshot::train::new_learner(&config)?;
    let mut adam = Adam::new(learner.params(), config.adam)?;
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(60, 1, 5), Grouping::Any)?;
    let mut times = Vec::new();
    for i in 0..12 {
        let ep = sampler.episode(0, i, &kshot::Device::Cpu)?;
        let t = std::time::Instant::now();
        let out = learner.episode_loss(&ep)?;
        let grads = out.loss.backward()?;
        adam.step(&grads, 1e-3)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} kernels: median {:.1} ms per 60-way 1-shot 5-query episode",
        if composite { "composite" } else { "fast" },
        1e3 * times[times.len() / 2]
    );
    Ok(())
}
