//! Baseline / Baseline++ as CloserLookFewShot's code runs them on Omniglot: the epoch schedule
//! (every training image once per epoch, 25 700 steps of 16), He-normal convolutions, the learned
//! per-class norm g of Baseline++ (it moves in pretraining), the presets, and old configs.

mod common;

use std::sync::atomic::AtomicBool;

use kshot::data::EpisodeSpec;
use kshot::methods::baseline::{epoch_batch, steps_per_epoch, OMNIGLOT_STEPS};
use kshot::methods::{BaselineConfig, Head, MethodConfig};
use kshot::train;

#[test]
fn pretraining_runs_in_epochs_of_every_image_once() {
    let set = common::synthetic_set(7, 1, 5, 8, 1); // 35 images
    assert_eq!(steps_per_epoch(&set, 16), 3);
    for epoch in 0..2u64 {
        let mut seen: Vec<(usize, usize)> =
            (0..3).flat_map(|k| epoch_batch(&set, 16, 9, epoch * 3 + k)).collect();
        assert_eq!(epoch_batch(&set, 16, 9, epoch * 3 + 2).len(), 3, "the remainder batch");
        seen.sort_unstable();
        let all: Vec<(usize, usize)> = (0..7).flat_map(|c| (0..5).map(move |i| (c, i))).collect();
        assert_eq!(seen, all, "epoch {epoch} is not every image once");
    }
    assert_ne!(epoch_batch(&set, 16, 9, 0), epoch_batch(&set, 16, 9, 3), "epochs reshuffle");
    assert_eq!(epoch_batch(&set, 16, 9, 4), epoch_batch(&set, 16, 9, 4), "a function of the step");
    assert_ne!(epoch_batch(&set, 16, 9, 0), epoch_batch(&set, 16, 10, 0), "and of the seed");
    // Omniglot: 4112 classes × 20 drawers in batches of 16, 5 epochs.
    assert_eq!(OMNIGLOT_STEPS, 25_700);
}

#[test]
fn presets_follow_closer_look() {
    for (name, head) in [("baseline-omniglot", Head::Linear), ("baseline++-omniglot", Head::Cosine)]
    {
        let c = kshot::presets::config(name).unwrap();
        let MethodConfig::Baseline(b) = &c.method else { panic!("{name}: {:?}", c.method) };
        assert_eq!(b.head, head, "{name}");
        assert_eq!(
            (b.batch_size, b.epoch_sampling, b.closer_look_init),
            (16, true, true),
            "{name}"
        );
        assert!(b.weight_norm, "{name}");
        assert_eq!((c.episodes, c.test_episodes), (25_700, 600), "{name}");
        assert!(c.validation.is_none(), "{name}: the code validates nothing");
        assert_eq!(c.test, EpisodeSpec::new(5, 1, 15), "{name}");
        assert_eq!(c.schedule.step, 0, "{name}: constant Adam 1e-3");
        assert_eq!(
            (c.data.resize, c.data.invert),
            (kshot::data::omniglot::Resize::BilinearCrop, false),
            "{name}: CloserLook's pixels"
        );
    }
}

#[test]
fn old_configs_keep_the_old_baseline_behaviour() {
    let old = serde_json::json!({
        "head": "cosine", "classes": 4112, "batch_size": 64, "finetune_epochs": 100,
        "finetune_batch": 4, "finetune_lr": 0.01, "finetune_momentum": 0.9,
        "finetune_dampening": 0.9, "finetune_weight_decay": 0.001
    });
    let b: BaselineConfig = serde_json::from_value(old).unwrap();
    assert_eq!((b.weight_norm, b.epoch_sampling, b.closer_look_init), (false, false, false));
}

fn std_of(v: &[f64]) -> f64 {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Chen's `init_layer`: conv weights N(0, √(2/(3·3·64))) (fan-out He normal) for every block.
#[test]
fn convolutions_are_he_normal() {
    let mut c = kshot::presets::config("baseline-omniglot").unwrap();
    let MethodConfig::Baseline(b) = &mut c.method else { unreachable!() };
    b.classes = 10;
    let learner = train::new_learner(&c).unwrap();
    let want = (2.0f64 / (9.0 * 64.0)).sqrt();
    for i in 0..4 {
        let w = learner.params().get(&format!("conv{i}.weight")).unwrap();
        let v = w.as_tensor().flatten_all().unwrap().to_dtype(kshot::DType::F64).unwrap();
        let v = v.to_vec1::<f64>().unwrap();
        let s = std_of(&v);
        let tol = if i == 0 { 0.15 } else { 0.02 }; // conv0 has only 576 weights
        assert!((s / want - 1.0).abs() < tol, "conv{i}: std {s}, want {want}");
    }
}

/// Baseline++'s per-class norm g is a parameter of pretraining: after a few steps it has moved
/// away from its initial value ‖v_c‖, and it is saved with the model.
#[test]
fn baseline_plus_plus_learns_its_per_class_norm() {
    let set = common::synthetic_set(12, 1, 6, 12, 3);
    let mut c = kshot::presets::config("baseline++-omniglot").unwrap();
    c.data.image_size = 12;
    common::conv4(&mut c).hidden = 8;
    common::conv4(&mut c).blocks = 2;
    c.episodes = 30;
    c.train = EpisodeSpec::new(5, 1, 1);
    c.checkpoint_every = 30;
    c.seed = 5;
    let c = train::fit_to_training_set(&c, &set).unwrap();
    let before = train::new_learner(&c).unwrap();
    let g0 = before.params().get("head.g").unwrap().as_tensor().to_vec1::<f32>().unwrap();
    let tmp = common::tempdir("baseline-g");
    let dir = tmp.path().join("run");
    train::train(&dir, &c, &set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let tensors = common::model_tensors(&dir);
    let g = &tensors.iter().find(|(n, _)| n.ends_with("head.g")).expect("head.g is saved").1;
    let v = &tensors.iter().find(|(n, _)| n.ends_with("head.weight")).unwrap().1;
    assert_eq!(g.len(), 12);
    let moved = g.iter().zip(&g0).map(|(a, &b)| (a - b as f64).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-3, "g did not move in pretraining ({moved})");
    let d = v.len() / 12;
    let norms: Vec<f64> =
        v.chunks(d).map(|r| r.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let apart = g.iter().zip(&norms).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(apart > 1e-3, "g is not a separate parameter from ‖v‖ ({apart})");
}
