//! Reptile: the inner Adam (β1 = 0) and the outer update against hand-derived values on quadratic
//! tasks, the annealed step size, transductive vs. per-query scoring, learning on synthetic data,
//! and bit-exact resume of its self-owned update.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
use kshot::methods::reptile::{outer_update, InnerAdam};
use kshot::methods::reptile::{Progress, Reptile};
use kshot::methods::{Learner, ReptileConfig};
use kshot::train;
use rand::SeedableRng;

fn t(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn v(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f64>().unwrap()
}

/// Two quadratic tasks L_j(x) = ½·a_j·‖x − b_j‖², one inner Adam step each (the state carried from
/// the first task to the second, as in the official code), then θ ← θ + ε·(mean φ − θ).
#[test]
fn outer_update_on_quadratic_tasks_matches_the_hand_derived_value() {
    let theta = [1.0, -2.0, 0.5];
    let (a1, b1) = (2.0, [0.0, 0.0, 0.0]);
    let (a2, b2) = (0.5, [3.0, 3.0, 3.0]);
    let (lr, beta2, eps, outer): (f64, f64, f64, f64) = (0.1, 0.999, 1e-8, 0.7);

    let theta_t = [t(&theta)];
    let mut adam = InnerAdam::new(lr, &theta_t).unwrap();
    let g1: Vec<f64> = (0..3).map(|i| a1 * (theta[i] - b1[i])).collect();
    let phi1 = adam.step(&theta_t, &[t(&g1)]).unwrap();
    let g2: Vec<f64> = (0..3).map(|i| a2 * (theta[i] - b2[i])).collect();
    let phi2 = adam.step(&theta_t, &[t(&g2)]).unwrap();
    let new_theta = outer_update(&theta_t, &[phi1, phi2], outer).unwrap();

    // By hand. Step 1 (t = 1, v = (1−β2)g²): φ1 = θ − lr·√(1−β2)·g1 / (√(1−β2)·|g1| + ε).
    // Step 2 (t = 2, v = β2(1−β2)g1² + (1−β2)g2²): φ2 = θ − lr·√(1−β2²)·g2 / (√v + ε).
    for i in 0..3 {
        let phi1 = theta[i]
            - lr * (1.0 - beta2).sqrt() * g1[i] / ((1.0 - beta2).sqrt() * g1[i].abs() + eps);
        let v2 = beta2 * (1.0 - beta2) * g1[i] * g1[i] + (1.0 - beta2) * g2[i] * g2[i];
        let phi2 = theta[i] - lr * (1.0 - beta2 * beta2).sqrt() * g2[i] / (v2.sqrt() + eps);
        let want = theta[i] + outer * ((phi1 + phi2) / 2.0 - theta[i]);
        let got = v(&new_theta[0])[i];
        assert!((got - want).abs() < 1e-12, "coordinate {i}: {got} vs hand-derived {want}");
    }
    assert_eq!(adam.t, 2);
}

/// With a fresh state every step (β1 = 0, t = 1) Adam moves each coordinate by lr against the sign
/// of its gradient (up to ε); Reptile with ε = 1 and one task lands on φ itself.
#[test]
fn first_inner_step_is_a_sign_step_and_unit_outer_step_lands_on_phi() {
    let theta = [t(&[0.3, -0.7])];
    let mut adam = InnerAdam::new(0.01, &theta).unwrap();
    let phi = adam.step(&theta, &[t(&[5.0, -0.002])]).unwrap();
    let got = v(&phi[0]);
    // Exactly lr·g/(|g| + ε/√(1−β2)): a full step of 0.01 for |g| = 5, 0.01·0.99984 for |g| = 0.002.
    let damp = 1e-8 / (1.0f64 - 0.999).sqrt();
    let want = [0.3 - 0.01 * 5.0 / (5.0 + damp), -0.7 + 0.01 * 0.002 / (0.002 + damp)];
    assert!((want[0] - 0.29).abs() < 1e-9 && (want[1] - -0.690_001_6).abs() < 1e-7);
    assert!(
        (got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12,
        "{got:?} vs {want:?}"
    );
    let moved = outer_update(&theta, std::slice::from_ref(&phi), 1.0).unwrap();
    assert_eq!(v(&moved[0]), got);
    let stayed = outer_update(&theta, &[phi], 0.0).unwrap();
    assert_eq!(v(&stayed[0]), v(&theta[0]));
}

#[test]
fn outer_step_anneals_linearly_to_its_final_value() {
    let c = ReptileConfig { outer_step: 1.0, outer_step_final: 0.2, ..ReptileConfig::default() };
    assert_eq!(c.outer_step_at(0, 100), 1.0);
    assert!((c.outer_step_at(50, 100) - 0.6).abs() < 1e-12);
    assert!((c.outer_step_at(100, 100) - 0.2).abs() < 1e-12);
}

fn small_config(episodes: u64) -> kshot::config::RunConfig {
    let mut c = kshot::presets::config("reptile-omniglot-5w1s").unwrap();
    c.data.image_size = 12;
    c.train = EpisodeSpec::new(5, 4, 0);
    c.test = EpisodeSpec::new(5, 1, 3);
    c.episodes = episodes;
    c.meta_batch = 2;
    c.seed = 3;
    c.checkpoint_every = 2;
    common::strided(&mut c).hidden = 8;
    common::strided(&mut c).blocks = 2;
    c.method = kshot::methods::MethodConfig::Reptile(ReptileConfig {
        ways: 5,
        inner_steps: 4,
        inner_steps_test: 10,
        inner_batch: 10,
        inner_batch_test: 5,
        inner_lr: 0.003,
        ..ReptileConfig::default()
    });
    c
}

/// One meta-step with ε = 0.5 moves θ exactly half as far as with ε = 1 (φ does not depend on ε),
/// and ε = 0 leaves θ where it was.
#[test]
fn meta_step_moves_theta_along_phi_minus_theta() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(5, 4, 0), Grouping::Any).unwrap();
    let episodes: Vec<_> = (0..2).map(|i| sampler.episode(1, i, &Device::Cpu).unwrap()).collect();
    let after = |eps: f64| -> (Vec<f32>, Vec<f32>) {
        let mut c = small_config(10);
        settings!(c, Reptile).outer_step = eps;
        settings!(c, Reptile).outer_step_final = eps;
        let size = (c.data.image_size, c.data.image_size);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seed);
        let mut learner =
            Reptile::new(*settings!(c, Reptile), &c.backbone, size, &mut rng, &Device::Cpu)
                .unwrap();
        let before = flat(&learner);
        learner.meta_step(&episodes, Progress { step: 0, total: 10, seed: 1 }).unwrap();
        (before, flat(&learner))
    };
    let (theta, full) = after(1.0);
    let (_, half) = after(0.5);
    let (_, none) = after(0.0);
    assert_eq!(none, theta);
    let mut moved = 0.0f32;
    for i in 0..theta.len() {
        let want = theta[i] + 0.5 * (full[i] - theta[i]);
        assert!((half[i] - want).abs() < 1e-6, "parameter {i}: {} vs {want}", half[i]);
        moved = moved.max((full[i] - theta[i]).abs());
    }
    assert!(moved > 1e-3, "the inner loop did not move the weights");
}

fn flat(learner: &dyn Learner) -> Vec<f32> {
    learner
        .params()
        .iter()
        .flat_map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Non-transductive scoring sees one query at a time (with the support set): a query's logits do
/// not change when the other queries do. Transductive scoring shares batch statistics: they do.
#[test]
fn only_transductive_scoring_lets_queries_see_each_other() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 3), Grouping::Any).unwrap();
    let ep = sampler.episode(0, 0, &Device::Cpu).unwrap();
    let other = sampler.episode(0, 1, &Device::Cpu).unwrap();
    let mixed = Tensor::cat(
        &[&ep.query.narrow(0, 0, 1).unwrap(), &other.query.narrow(0, 1, 14).unwrap()],
        0,
    )
    .unwrap();
    for transductive in [false, true] {
        let mut c = small_config(1);
        settings!(c, Reptile).transductive = transductive;
        let learner = train::new_learner(&c).unwrap();
        let classifier = learner.adapt(&ep.support, &ep.support_labels, 5).unwrap();
        let a: Vec<f32> = classifier.logits(&ep.query).unwrap().get(0).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = classifier.logits(&mixed).unwrap().get(0).unwrap().to_vec1().unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        if transductive {
            assert!(diff > 1e-4, "transductive logits ignored the other queries");
        } else {
            assert_eq!(a, b, "a non-transductive query's logits depend on the other queries");
        }
    }
}

/// The run stopped after 4 of 7 meta-iterations and resumed equals the uninterrupted run. (The
/// first session must know the total: ε is annealed over it.)
#[test]
fn resume_continues_exactly() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let no_stop = AtomicBool::new(false);
    let tmp = common::tempdir("reptile");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    train::train(&straight, &small_config(7), &set, None, false, &no_stop, |_| {}).unwrap();
    let stop = AtomicBool::new(false);
    let first = train::train(&split, &small_config(7), &set, None, false, &stop, |s| {
        if s.episode == 4 {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert_eq!((first.episodes_done, first.interrupted), (4, true));
    let config = kshot::config::RunConfig::load(&split.join(train::CONFIG_FILE)).unwrap();
    let second = train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    assert_eq!(second.episodes_done, 7);
    let a = common::model_tensors(&straight);
    assert!(a.iter().any(|(k, _)| k == "inner_adam.t"), "the inner Adam state is not saved");
    assert_eq!(
        a,
        common::model_tensors(&split),
        "resumed run must equal the uninterrupted one bit for bit"
    );
}

#[test]
fn reptile_learns_held_out_synthetic_classes() {
    let train_set = common::synthetic_set(40, 1, 10, 12, 5);
    let test_set = common::synthetic_set(20, 1, 10, 12, 99);
    let tmp = common::tempdir("reptile");
    let dir = tmp.path().join("run");
    let mut config = small_config(1000);
    settings!(config, Reptile).inner_steps_test = 3;
    config.checkpoint_every = 1000;
    let sampler = EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 5), Grouping::Any).unwrap();
    let untrained = train::new_learner(&config).unwrap();
    let before =
        kshot::eval::evaluate(untrained.as_ref(), &sampler, 50, 0, |_| {}).unwrap().accuracy;
    let started = std::time::Instant::now();
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 50, 0, |_| {}).unwrap().accuracy;
    eprintln!(
        "reptile synthetic 5-way 1-shot: {before:.3} before, {after:.3} after 1000 meta-iterations ({seconds:.1} s)"
    );
    // 3 test steps from a random init are not enough; from the meta-learned init they are.
    assert!(
        after > 0.6 && after > before + 0.2,
        "5-way accuracy {after} (chance 0.2; untrained {before})"
    );
}

/// Extending a finished run with more meta-iterations keeps ε's schedule: the steps already taken
/// are those of the original run, and the new ones take ε_final.
#[test]
fn extending_a_run_keeps_its_outer_step_schedule() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let no_stop = AtomicBool::new(false);
    let tmp = common::tempdir("reptile-extend");
    let dir = tmp.path().join("run");
    train::train(&dir, &small_config(4), &set, None, false, &no_stop, |_| {}).unwrap();
    let mut config = kshot::config::RunConfig::load(&dir.join(train::CONFIG_FILE)).unwrap();
    let note = config.method.extend(4, 6).expect("Reptile says what an extension does");
    assert!(note.contains("first 4"), "{note}");
    config.episodes = 6;
    train::train(&dir, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    let metrics = std::fs::read_to_string(dir.join(train::METRICS_FILE)).unwrap();
    let lr: Vec<f64> =
        metrics.lines().skip(1).map(|l| l.split(',').nth(3).unwrap().parse().unwrap()).collect();
    let c = *settings!(config, Reptile);
    let want: Vec<f64> = (0..6).map(|step| c.outer_step_at(step, 4)).collect();
    assert_eq!(lr, want);
    assert_eq!(lr[4], c.outer_step_final);
    assert_ne!(lr[4], c.outer_step_at(4, 6), "the schedule was stretched over the new length");
}
