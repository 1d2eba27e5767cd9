//! Koch et al.'s protocol for Siamese networks: the per-layer SGD step, its schedule, the paper's
//! initialisation, 12-drawer pairs, the validation alphabets and the presets.

mod common;

use std::sync::atomic::AtomicBool;

use kshot::data::{Class, ImageSet};
use kshot::methods::siamese::{draw_pair_picks, koch_l2_applies, koch_layer};
use kshot::methods::{MethodConfig, SiameseConfig};
use kshot::nn::ParamSet;
use kshot::optim::{sgd_momentum_step, KochSgd, SgdHyper};
use kshot::{presets, train, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(kshot::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
    }
}

/// Two steps of Δw ← μΔw − η(∇ + 2λw), w ← w + Δw, by hand.
#[test]
fn sgd_step_matches_a_hand_computed_update() {
    let d = Device::Cpu;
    let w = Tensor::new(&[1.0f32, -2.0, 0.5], &d).unwrap();
    let g = Tensor::new(&[0.2f32, 0.4, -1.0], &d).unwrap();
    let delta = Tensor::new(&[0.1f32, 0.0, -0.2], &d).unwrap();
    let h = SgdHyper { lr: 0.1, momentum: 0.5, l2: 0.05 };
    let (w1, d1) = sgd_momentum_step(&w, &g, &delta, h).unwrap();
    // Δw = 0.5·[0.1, 0, −0.2] − 0.1·([0.2, 0.4, −1] + 0.1·[1, −2, 0.5])
    //    = [0.05, 0, −0.1] − 0.1·[0.3, 0.2, −0.95] = [0.02, −0.02, −0.005]
    close(&vec1(&d1), &[0.02, -0.02, -0.005]);
    close(&vec1(&w1), &[1.02, -2.02, 0.495]);
    // Second step, no L2: Δw = 0.9·[0.02, −0.02, −0.005] − 0.01·[1, 1, 1]
    let h = SgdHyper { lr: 0.01, momentum: 0.9, l2: 0.0 };
    let ones = Tensor::new(&[1.0f32, 1.0, 1.0], &d).unwrap();
    let (w2, d2) = sgd_momentum_step(&w1, &ones, &d1, h).unwrap();
    close(&vec1(&d2), &[0.008, -0.028, -0.0145]);
    close(&vec1(&w2), &[1.028, -2.048, 0.4805]);
}

/// η_j ← 0.99·η_j per epoch; momentum 0.5 rising linearly per epoch to μ_j, then constant.
#[test]
fn koch_schedule_decays_the_rate_and_ramps_the_momentum_per_epoch() {
    let sgd = KochSgd {
        lr: [1e-2, 1e-2, 1e-2, 1e-2, 2e-3, 4e-3],
        momentum: [0.9, 0.9, 0.9, 0.9, 0.7, 0.5],
        l2: [1e-2, 1e-2, 1e-2, 1e-2, 1e-4, 0.0],
        momentum_start: 0.5,
        momentum_epochs: 4,
        lr_decay: 0.99,
        steps_per_epoch: 10,
    };
    let h = sgd.at(0, 9);
    assert_eq!((h.lr, h.momentum, h.l2), (1e-2, 0.5, 1e-2));
    let h = sgd.at(0, 10);
    assert!((h.lr - 0.99e-2).abs() < 1e-15 && (h.momentum - 0.6).abs() < 1e-12);
    let h = sgd.at(4, 25);
    assert!((h.lr - 2e-3 * 0.99f64.powi(2)).abs() < 1e-15 && (h.momentum - 0.6).abs() < 1e-12);
    assert!((sgd.at(0, 40).momentum - 0.9).abs() < 1e-12);
    assert!((sgd.at(0, 400).momentum - 0.9).abs() < 1e-12);
    assert!((sgd.at(0, 400).lr - 1e-2 * 0.99f64.powi(40)).abs() < 1e-15);
    assert_eq!(sgd.at(5, 0).momentum, 0.5);
    // Layers: convolutions (and their batch norm), the embedding layer, the output unit.
    assert_eq!(koch_layer("koch.conv2.weight"), 2);
    assert_eq!(koch_layer("conv3.weight"), 3);
    assert_eq!(koch_layer("bn1.bias"), 1);
    assert_eq!(koch_layer("embed.weight"), 4);
    assert_eq!(koch_layer("head.alpha"), 5);
    assert!(koch_l2_applies("koch.conv0.weight") && koch_l2_applies("head.alpha"));
    assert!(!koch_l2_applies("koch.conv0.bias") && !koch_l2_applies("bn0.weight"));
    assert!(!koch_l2_applies("head.bias"));
}

/// A set whose image i of every class has every pixel equal to i (its drawer is i + 1).
fn drawer_set(classes: usize, size: usize) -> ImageSet {
    let n = size * size;
    let classes = (0..classes)
        .map(|c| Class {
            name: format!("a{}/c{c}", c % 3),
            group: format!("a{}", c % 3),
            pixels: (0..20u8).flat_map(|i| std::iter::repeat_n(i, n)).collect(),
        })
        .collect();
    ImageSet { name: "drawers".into(), channels: 1, height: size, width: size, classes }
}

#[test]
fn twelve_drawer_pairs_never_use_drawers_13_to_20() {
    let set = drawer_set(30, 4);
    let config = SiameseConfig { train_drawers: Some(12), pairs: 128, ..Default::default() };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut used = [false; 20];
    for _ in 0..50 {
        let picks = draw_pair_picks(&config, &set, &mut rng).unwrap();
        for &(c, i) in picks.first.iter().chain(&picks.second) {
            assert!(i < 12, "image {i} (drawer {}) drawn", i + 1);
            assert_eq!(set.image(c, i)[0] as usize, i);
            used[i] = true;
        }
        assert_eq!(picks.same.iter().filter(|&&s| s == 1.0).count(), 64);
        for (k, &s) in picks.same.iter().enumerate() {
            assert_eq!(s == 1.0, picks.first[k].0 == picks.second[k].0);
            if s == 1.0 {
                assert_ne!(picks.first[k].1, picks.second[k].1, "a same pair of one image");
            }
        }
    }
    assert!(used[..12].iter().all(|&u| u), "every one of the 12 drawers is used");
    // Default: all 20 drawers.
    let all = SiameseConfig::default();
    let picks = draw_pair_picks(&all, &set, &mut rng).unwrap();
    let mut any_late = picks.first.iter().any(|&(_, i)| i >= 12);
    for _ in 0..20 {
        let p = draw_pair_picks(&all, &set, &mut rng).unwrap();
        any_late |= p.first.iter().chain(&p.second).any(|&(_, i)| i >= 12);
    }
    assert!(any_late);
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (m, (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt())
}

/// Conv weights N(0, 0.01²), biases N(0.5, 0.01²), FC weights N(0, 0.2²); batch norm untouched.
#[test]
fn koch_init_has_the_papers_statistics() {
    let d = Device::Cpu;
    let mut p = ParamSet::new();
    p.push("koch.conv3.weight", Tensor::zeros((256, 128, 4, 4), kshot::DType::F32, &d).unwrap())
        .unwrap();
    p.push("koch.conv3.bias", Tensor::zeros(4096, kshot::DType::F32, &d).unwrap()).unwrap();
    p.push("embed.weight", Tensor::zeros((512, 1024), kshot::DType::F32, &d).unwrap()).unwrap();
    p.push("bn0.weight", Tensor::ones(64, kshot::DType::F32, &d).unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let q = kshot::nn::koch::paper_init(&p, &mut rng, &d).unwrap();
    let stats = |n: &str| mean_std(&vec1(q.get(n).unwrap().as_tensor()));
    let (m, s) = stats("koch.conv3.weight");
    assert!(m.abs() < 1e-4 && (s - 0.01).abs() < 1e-4, "conv: {m} {s}");
    let (m, s) = stats("koch.conv3.bias");
    assert!((m - 0.5).abs() < 1e-3 && (s - 0.01).abs() < 5e-4, "bias: {m} {s}");
    let (m, s) = stats("embed.weight");
    assert!(m.abs() < 2e-3 && (s - 0.2).abs() < 2e-3, "fc: {m} {s}");
    assert_eq!(vec1(q.get("bn0.weight").unwrap().as_tensor()), vec![1.0; 64]);
}

fn siamese(c: &kshot::config::RunConfig) -> SiameseConfig {
    match &c.method {
        MethodConfig::Siamese(s) => *s,
        other => panic!("not siamese: {other:?}"),
    }
}

#[test]
fn koch_presets_state_the_protocol() {
    use kshot::protocol::{ValMetric, ValSet};
    for name in ["siamese-omniglot-koch", "siamese-omniglot-28-koch-protocol"] {
        let c = presets::config(name).unwrap();
        let s = siamese(&c);
        assert_eq!(s.train_drawers, Some(12), "{name}");
        assert!(s.koch_init && s.within_group_negatives == 0.0 && s.pairs == 128);
        let sgd = s.optimiser.unwrap();
        assert_eq!((sgd.momentum_start, sgd.lr_decay), (0.5, 0.99));
        let v = c.validation.unwrap();
        assert_eq!(v.episodes * v.spec.ways * v.spec.queries, 320, "320 one-shot trials");
        assert_eq!((v.spec.ways, v.spec.shots), (20, 1));
        assert_eq!(v.every, sgd.steps_per_epoch, "validation once per epoch");
        assert_eq!(v.set, ValSet::LakeUnbenchmarked { drawers: 4 });
        let es = v.early_stopping.unwrap();
        assert_eq!((es.metric, es.patience), (ValMetric::Accuracy, 20));
        assert_eq!(c.episodes, 200 * sgd.steps_per_epoch);
        assert!(kshot::eval::lake_benchmark_ineligibility(&c).is_none());
    }
    // The published reduced row keeps its protocol.
    let old = presets::config("siamese-omniglot-28").unwrap();
    let s = siamese(&old);
    assert!(s.optimiser.is_none() && !s.koch_init && s.train_drawers.is_none());
    assert!(old.validation.is_none() && s.within_group_negatives == 0.5);
    assert_eq!(old.episodes, 20_000);
}

/// The validation alphabets are exactly the evaluation alphabets that Lake's benchmark does not
/// use (from the data's own map of the benchmark's images), cut to 4 drawers.
#[test]
fn validation_alphabets_are_disjoint_from_lake_benchmark() {
    let root = common::data_root();
    let tsv = root.join("omniglot").join("all_runs_sources.tsv");
    let text = std::fs::read_to_string(&tsv).unwrap_or_else(|e| panic!("{}: {e}", tsv.display()));
    let used: std::collections::BTreeSet<&str> =
        text.lines().skip(1).filter_map(|l| l.split('\t').nth(1)?.split('/').nth(1)).collect();
    assert_eq!(used.len(), 10);
    common::use_shared_data_cache();
    let c = presets::config("siamese-omniglot-28-koch-protocol").unwrap();
    let set = train::load_validation_set(&root, &c).unwrap().unwrap();
    let groups: Vec<&str> = set.groups().into_keys().collect();
    assert_eq!(groups.len(), 10);
    assert_eq!(groups, kshot::protocol::LAKE_UNBENCHMARKED_ALPHABETS.to_vec());
    assert!(groups.iter().all(|g| !used.contains(g)), "{groups:?} vs {used:?}");
    assert!((0..set.classes.len()).all(|c| set.num_images(c) == 4));
    assert!(set.classes.len() >= 200, "{} classes", set.classes.len());
}

/// Koch's SGD keeps its momentum in the learner's state: a run stopped and resumed equals the
/// uninterrupted one bit for bit.
#[test]
fn koch_sgd_resumes_exactly() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let mut c = presets::config("siamese-omniglot-28-koch-protocol").unwrap();
    c.data.image_size = 12;
    c.validation = None;
    c.episodes = 8;
    c.train = kshot::data::EpisodeSpec::new(5, 1, 1);
    c.checkpoint_every = 3;
    common::conv4(&mut c).hidden = 8;
    common::conv4(&mut c).blocks = 2;
    if let MethodConfig::Siamese(s) = &mut c.method {
        s.hidden = 16;
        s.pairs = 16;
        s.augment = false;
        let sgd = s.optimiser.as_mut().unwrap();
        sgd.steps_per_epoch = 2;
        sgd.lr = [5e-2; 6];
    }
    let tmp = common::tempdir("siamese-sgd");
    let (straight, split) = (tmp.path().join("a"), tmp.path().join("b"));
    let no_stop = AtomicBool::new(false);
    let mut losses = Vec::new();
    train::train(&straight, &c, &set, None, false, &no_stop, |s| losses.push(s.loss)).unwrap();
    let stop = AtomicBool::new(false);
    train::train(&split, &c, &set, None, false, &stop, |s| {
        if s.episode == 4 {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    train::train(&split, &c, &set, None, true, &no_stop, |_| {}).unwrap();
    let a = common::model_tensors(&straight);
    assert_eq!(a, common::model_tensors(&split));
    assert!(a.iter().any(|(n, _)| n.starts_with("sgd.delta.")), "momentum is saved");
    assert!(losses.len() == 8 && losses.iter().all(|l| l.is_finite()), "{losses:?}");
}
