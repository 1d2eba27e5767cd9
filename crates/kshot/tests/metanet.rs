//! Meta Networks: the gradient preprocessing on hand-made values, the whole fast-weight path
//! (meta learners, memory read, layer augmentation, query loss) against central finite
//! differences in f64, relabelling equivariance, and a short seeded run.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use kshot::methods::metanet::preprocess_gradient;
use kshot::methods::{Learner, MetaNet, MetaNetConfig};
use kshot::nn::metanet_nets::FastNetConfig;
use kshot::nn::{ParamSet, Params};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn normal(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

#[test]
fn gradient_preprocessing_matches_the_paper_on_hand_made_values() {
    let k = 7.0;
    let small = (-7f64).exp();
    let cases: [(f64, [f64; 2]); 7] = [
        (1.0, [0.0, 1.0]),
        (-(-3.5f64).exp(), [-0.5, -1.0]),
        (7f64.exp(), [1.0, 1.0]),
        (small, [-1.0, 1.0]),
        (-1e-4, [-1.0, -1e-4 * 7f64.exp()]),
        (0.0, [-1.0, 0.0]),
        (small * 0.5, [-1.0, 0.5]),
    ];
    let x: Vec<f64> = cases.iter().map(|c| c.0).collect();
    let got = preprocess_gradient(&x, k);
    for (i, (v, want)) in cases.iter().enumerate() {
        let pair = [got[2 * i], got[2 * i + 1]];
        assert!(
            (pair[0] - want[0]).abs() < 1e-12 && (pair[1] - want[1]).abs() < 1e-12,
            "{v}: got {pair:?}, want {want:?}"
        );
    }
    // The official code's form: (max(log(|x| + ε)/k, −1), clamp(e^k·x, −1, 1)).
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x: Vec<f64> = (0..200)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z * 10f64.powf(-(rng.random_range(0.0..6.0)))
        })
        .collect();
    let got = preprocess_gradient(&x, k);
    for (i, v) in x.iter().enumerate() {
        let official =
            [((v.abs() + f64::EPSILON).ln() / k).max(-1.0), (v * 7f64.exp()).clamp(-1.0, 1.0)];
        assert!((got[2 * i] - official[0]).abs() < 1e-9, "{v}: {} vs {}", got[2 * i], official[0]);
        assert!((got[2 * i + 1] - official[1]).abs() < 1e-12);
    }
}

use rand::Rng;

/// A small MetaNet: 3 ways, 2 conv blocks of 3 channels on 6×6 images, fc1 of 4, meta learners
/// of 3 units, the support read in 3 chunks (so the LSTMs take several steps), the meta learners'
/// output layers at their full scale so that the fast weights weigh as much as the slow ones.
fn small_config() -> MetaNetConfig {
    MetaNetConfig {
        net: FastNetConfig { in_channels: 1, width: 3, blocks: 2, hidden: 4 },
        meta_hidden: 3,
        chunks: 3,
        fast_init: 1.0,
        ..MetaNetConfig::omniglot(3)
    }
}

/// The learner's parameters in f64, the meta learners' biases moved off zero (their output
/// layers' to +0.5, so that the fast fc1 units are alive).
fn to_f64(net: &mut MetaNet) {
    let mut p = ParamSet::new();
    for (name, v) in net.state().params.iter() {
        let t = v.as_tensor().to_dtype(DType::F64).unwrap();
        let t = match name {
            n if n.ends_with("out.bias") => (t + 0.5).unwrap(),
            n if n.ends_with("bias") => (t + 0.1).unwrap(),
            _ => t,
        };
        p.push(name, t).unwrap();
    }
    net.state_mut().params = p;
}

fn with_value(params: &Params, name: &str, flat: Vec<f64>) -> Params {
    let mut p = params.clone();
    let shape = params.get(name).unwrap().shape().clone();
    p.insert(name, Tensor::from_vec(flat, shape, &Device::Cpu).unwrap());
    p
}

#[test]
fn the_fast_weight_path_matches_central_differences_in_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut net = MetaNet::new(small_config(), 6, &mut rng, &Device::Cpu).unwrap();
    to_f64(&mut net);
    let support = normal(&mut rng, &[6, 1, 6, 6], DType::F64);
    let labels = [0u32, 0, 1, 1, 2, 2];
    let query = normal(&mut rng, &[4, 1, 6, 6], DType::F64);
    let query_labels = [2u32, 0, 1, 1];
    let params = net.state().params.values();
    // The meta information is an input (detached gradients), held fixed under perturbation.
    let info = net.meta_info(&params, &support, &labels).unwrap();
    let loss_at = |p: &Params| -> f64 {
        let (loss, _) = net.query_loss(p, &info, &support, &query, &query_labels).unwrap();
        loss.to_scalar::<f64>().unwrap()
    };
    let (loss, _) = net.query_loss(&params, &info, &support, &query, &query_labels).unwrap();
    let grads = loss.backward().unwrap();
    let h = 1e-5;
    let mut worst = 0f64;
    let mut checked = 0;
    for (name, var) in net.state().params.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let largest = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        if name.starts_with("meta.") {
            assert!(largest > 1e-6, "{name}: the query loss barely depends on it ({largest})");
        }
        let x0 = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let stride = (x0.len() / 6).max(1);
        for i in (0..x0.len()).step_by(stride) {
            let at = |d: f64| {
                let mut x = x0.clone();
                x[i] += d;
                loss_at(&with_value(&params, name, x))
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            // Relative to the tensor's largest gradient, above the rounding of the differences (~1e-9 at h = 1e-5).
            let err = (fd - g[i]).abs() / largest;
            assert!(
                (fd - g[i]).abs() < 1e-5 * largest + 1e-8,
                "{name}[{i}]: analytic {} vs central difference {fd}",
                g[i]
            );
            worst = worst.max(err);
            checked += 1;
        }
    }
    eprintln!("{checked} coordinates, worst relative error {worst:.2e}");
    assert!(checked > 100);
}

/// The logits of a relabelled support (labels through `perm`) with both output layers' rows
/// permuted alike: the query logits' columns must permute exactly.
#[test]
fn relabelling_the_support_permutes_the_query_logits() {
    let config = MetaNetConfig {
        net: FastNetConfig { in_channels: 1, width: 8, blocks: 5, hidden: 16 },
        ..MetaNetConfig::omniglot(5)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut net = MetaNet::new(config, 12, &mut rng, &Device::Cpu).unwrap();
    let support = normal(&mut rng, &[5, 1, 12, 12], DType::F32).abs().unwrap();
    let query = normal(&mut rng, &[6, 1, 12, 12], DType::F32).abs().unwrap();
    let labels = [0u32, 1, 2, 3, 4];
    let perm = [2u32, 0, 3, 4, 1];
    let logits = |net: &MetaNet, labels: &[u32]| -> Vec<Vec<f32>> {
        net.adapt(&support, labels, 5).unwrap().logits(&query).unwrap().to_vec2().unwrap()
    };
    let before = logits(&net, &labels);
    let relabelled: Vec<u32> = labels.iter().map(|&l| perm[l as usize]).collect();
    let unpermuted_rows = logits(&net, &relabelled);
    // Row c of an output layer moves to row perm[c].
    let permute_rows = |t: &Tensor| -> Tensor {
        let inverse: Vec<u32> =
            (0..5u32).map(|r| perm.iter().position(|&p| p == r).unwrap() as u32).collect();
        t.index_select(&Tensor::new(inverse.as_slice(), &Device::Cpu).unwrap(), 0).unwrap()
    };
    let fc2 = net.state().params.get("base.fc2.weight").unwrap().clone();
    fc2.set(&permute_rows(fc2.as_tensor())).unwrap();
    let key_fc2 = net.state().extra["key.fc2.weight"].clone();
    net.state_mut().extra.insert("key.fc2.weight".into(), permute_rows(&key_fc2));
    let after = logits(&net, &relabelled);
    let scale = before.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let (mut worst, mut moved) = (0f32, 0f32);
    for (b, (a, u)) in before.iter().zip(after.iter().zip(&unpermuted_rows)) {
        for c in 0..5 {
            worst = worst.max((b[c] - a[perm[c] as usize]).abs());
            moved = moved.max((b[c] - u[perm[c] as usize]).abs());
        }
    }
    assert!(scale > 1e-3, "degenerate logits");
    assert!(worst <= 1e-5 * scale, "columns not permuted: off by {worst} (scale {scale})");
    // The slow output layer is not symmetric in the classes, so relabelling alone is not enough:
    // the check above is not satisfied by any function of the support images alone.
    assert!(moved > 1e-3 * scale, "relabelling without the rows changed nothing ({moved})");
}

#[test]
fn a_short_seeded_run_learns_held_out_classes() {
    use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
    let mut c = kshot::presets::default_config();
    common::set_method(&mut c, "metanet");
    c.data.image_size = 12;
    c.train = EpisodeSpec::new(5, 1, 5);
    c.test = EpisodeSpec::new(5, 1, 5);
    c.episodes = 600;
    c.seed = 3;
    c.validation = None;
    c.checkpoint_every = 50;
    c.schedule = kshot::optim::StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    settings!(c, MetaNet).net = FastNetConfig { in_channels: 1, width: 8, blocks: 5, hidden: 16 };
    let train_set = common::noisy_synthetic_set(200, 1, 10, 12, 5, 0.1);
    let test_set = common::noisy_synthetic_set(20, 1, 10, 12, 99, 0.1);
    let tmp = common::tempdir("metanet-run");
    let dir = tmp.path().join("run");
    let sampler = EpisodeSampler::new(&test_set, c.test, Grouping::Any).unwrap();
    let untrained = kshot::train::new_learner(&c).unwrap();
    let before = kshot::eval::evaluate(untrained.as_ref(), &sampler, 40, 0, |_| {}).unwrap();
    let start = std::time::Instant::now();
    kshot::train::train(&dir, &c, &train_set, None, false, &AtomicBool::new(false), |s| {
        if s.episode % 100 == 0 {
            eprintln!("step {}: loss {:.4} acc {:.3}", s.episode, s.loss, s.accuracy);
        }
    })
    .unwrap();
    eprintln!("{} episodes in {:.1} s", c.episodes, start.elapsed().as_secs_f64());
    let (_, learner) = kshot::train::load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 40, 0, |_| {}).unwrap();
    eprintln!("5-way 1-shot held-out accuracy {:.3} → {:.3}", before.accuracy, after.accuracy);
    // MetaNet learns slowly (the fast weights must first grow out of their small start), and
    // 150-episode runs depended on the seed (0.19 to 0.39 at 3e-3): at the paper's 1e-3, 600
    // episodes reached 0.33 / 0.32 / 0.42 / 0.41 on held-out classes with seeds 1 to 4.
    assert!(
        after.accuracy > 0.3 && after.accuracy > before.accuracy + 0.1,
        "5-way accuracy {} → {} (chance 0.2)",
        before.accuracy,
        after.accuracy
    );
}
