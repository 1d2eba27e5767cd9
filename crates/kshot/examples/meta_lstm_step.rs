//! Times Meta-LSTM meta-iterations of the `meta-lstm-omniglot-5w1s` preset (Conv4 learner with 32
//! filters, 28×28, 5-way 1-shot 15-query, T = 12) on random images:
//! `cargo run --release --example meta_lstm_step -- [ITERATIONS] [reference]`.
//!
//! Prints the median of each part: the learner's gradients alone, the unroll alone (the learner's T support gradients and the
//! meta-learner's forward pass, no tape), the fused meta-gradient (unroll with tape, query
//! gradient, backward pass), and the whole training loss with its backward pass. With `reference`,
//! the candle-graph implementation instead.
use std::time::Instant;

use kshot::data::Episode;
use kshot::methods::{Learner, MetaLstm};
use kshot::nn::Params;
use kshot::Tensor;
use rand::SeedableRng;

fn main() -> anyhow::Result<()> {
    kshot::autograd::init();
    let args: Vec<String> = std::env::args().collect();
    let iterations = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5usize);
    let reference = args.iter().any(|a| a == "reference");
    let config = kshot::presets::config("meta-lstm-omniglot-5w1s")?;
    let kshot::methods::MethodConfig::MetaLstm(meta_lstm) = config.method.clone() else {
        anyhow::bail!("the meta-lstm preset is not a Meta-LSTM run")
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let size = config.data.image_size;
    let mut net =
        MetaLstm::new(meta_lstm, &config.backbone, (size, size), &mut rng, &kshot::Device::Cpu)?;
    let (ways, queries, steps) = (config.train.ways, config.train.queries, meta_lstm.inner_steps);
    let cpu = kshot::Device::Cpu;
    let episode = Episode {
        spec: config.train,
        index: 0,
        seed: 0,
        classes: (0..ways).collect(),
        support: Tensor::rand(0f32, 1., (ways, 1, size, size), &cpu)?,
        support_labels: (0..ways as u32).collect(),
        query: Tensor::rand(0f32, 1., (ways * queries, 1, size, size), &cpu)?,
        query_labels: (0..(ways * queries) as u32).map(|i| i / queries as u32).collect(),
        unlabelled: None,
    };
    println!("P = {} learner coordinates, T = {steps}", net.learner_size());
    let (labels, query_labels) = (episode.support_labels_tensor()?, episode.query_labels_tensor()?);
    let backbone = match &config.backbone {
        kshot::nn::BackboneConfig::Conv4(c) => kshot::nn::Conv4::new(*c),
        other => anyhow::bail!("this example times a Conv4 learner, not {}", other.kind()),
    };
    let mut parts: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    let mut time =
        |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
            let (t, cpu) = (Instant::now(), cpu_ms());
            f()?;
            let ms = (t.elapsed().as_secs_f64() * 1e3, cpu_ms() - cpu);
            match parts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(ms),
                None => parts.push((name, vec![ms])),
            }
            Ok(())
        };
    for _ in 0..iterations {
        if reference {
            time("reference loss + backward", &mut || {
                let meta: Params = net.params().values();
                let (loss, _, _) = net.reference_query_loss(&meta, &episode, steps, None)?;
                loss.backward()?;
                Ok(())
            })?;
            continue;
        }
        let meta = net.params().detached_values();
        time("learner gradients alone (T support, 1 query)", &mut || {
            let learner = net.learner_params(&net.initial_cell(&meta)?)?;
            for _ in 0..steps {
                backbone.linear_head_loss_and_grad(&learner, &episode.support, &labels)?;
            }
            backbone.linear_head_loss_and_grad(&learner, &episode.query, &query_labels)?;
            Ok(())
        })?;
        time("unroll (no tape)", &mut || {
            net.unroll(&meta, &episode.support, &labels, steps, None)?;
            Ok(())
        })?;
        time("meta-gradient", &mut || {
            net.meta_gradient(&meta, &episode, steps)?;
            Ok(())
        })?;
        time("training loss + backward", &mut || {
            net.episode_loss(&episode)?.loss.backward()?;
            Ok(())
        })?;
    }
    for (name, v) in parts {
        let median = |mut x: Vec<f64>| {
            x.sort_by(f64::total_cmp);
            (x[x.len() / 2], x[0])
        };
        let (wall, wall_min) = median(v.iter().map(|p| p.0).collect());
        let (cpu, _) = median(v.iter().map(|p| p.1).collect());
        println!(
            "{name}: median {wall:.0} ms wall (min {wall_min:.0}), {cpu:.0} ms CPU, over {}",
            v.len()
        );
    }
    Ok(())
}

/// CPU time of this process (all threads, user + system) in ms, from /proc (0 where there is none).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) * 10.0
}
