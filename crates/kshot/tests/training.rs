//! The trainer on synthetic data: exact resume, checkpoint contents, learning.

mod common;

use std::sync::atomic::AtomicBool;

use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
use kshot::presets;
use kshot::train::{self, load_learner};

fn small_config(episodes: u64) -> kshot::config::RunConfig {
    let mut c = presets::default_config();
    c.data.image_size = 12;
    c.train = EpisodeSpec::new(5, 1, 3);
    c.episodes = episodes;
    c.seed = 11;
    c.validation = None;
    c.checkpoint_every = 2;
    common::conv4(&mut c).hidden = 8;
    common::conv4(&mut c).blocks = 2;
    c.schedule.step = 3;
    c
}

#[test]
fn resume_continues_exactly() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let no_stop = AtomicBool::new(false);
    let tmp = common::tempdir("training");
    let straight = tmp.path().join("straight");
    let split = tmp.path().join("split");
    train::train(&straight, &small_config(7), &set, None, false, &no_stop, |_| {}).unwrap();
    // The same run in two sessions: stop after 4 episodes (a checkpoint), then resume to 7.
    let first =
        train::train(&split, &small_config(4), &set, None, false, &no_stop, |_| {}).unwrap();
    assert_eq!(first.episodes_done, 4);
    let mut config = kshot::config::RunConfig::load(&split.join(train::CONFIG_FILE)).unwrap();
    config.episodes = 7;
    let second = train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    assert_eq!(second.episodes_done, 7);
    assert_eq!(
        common::model_tensors(&straight),
        common::model_tensors(&split),
        "resumed run must equal the uninterrupted one bit for bit"
    );
    let metrics = std::fs::read_to_string(split.join(train::METRICS_FILE)).unwrap();
    assert_eq!(metrics.lines().count(), 8, "header + one line per episode:\n{metrics}");
    // A second start in the same directory is refused, naming the directory.
    let err = train::train(&split, &small_config(7), &set, None, false, &no_stop, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
}

#[test]
fn stop_flag_checkpoints_and_returns() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let stop = AtomicBool::new(false);
    let tmp = common::tempdir("training");
    let dir = tmp.path().join("run");
    let mut seen = 0;
    let s = train::train(&dir, &small_config(50), &set, None, false, &stop, |st| {
        seen = st.episode;
        if st.episode == 3 {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(s.interrupted);
    assert_eq!((s.episodes_done, seen), (3, 3));
    let t = kshot::checkpoint::load_tensors(&dir.join(train::CHECKPOINT_FILE)).unwrap();
    assert_eq!(t["progress.episodes"].to_vec1::<i64>().unwrap(), vec![3]);
}

#[test]
fn relabelling_the_support_permutes_the_logits() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let config = small_config(1);
    let learner = train::new_learner(&config).unwrap();
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(4, 2, 3), Grouping::Any).unwrap();
    let ep = sampler.episode(0, 0, &kshot::Device::Cpu).unwrap();
    let perm = [2u32, 0, 3, 1];
    let relabelled: Vec<u32> = ep.support_labels.iter().map(|&l| perm[l as usize]).collect();
    let a: Vec<Vec<f32>> = learner
        .adapt(&ep.support, &ep.support_labels, 4)
        .unwrap()
        .logits(&ep.query)
        .unwrap()
        .to_vec2()
        .unwrap();
    let b: Vec<Vec<f32>> = learner
        .adapt(&ep.support, &relabelled, 4)
        .unwrap()
        .logits(&ep.query)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (ra, rb) in a.iter().zip(&b) {
        for l in 0..4 {
            assert_eq!(ra[l], rb[perm[l] as usize]);
        }
    }
}

#[test]
fn protonet_learns_held_out_synthetic_classes() {
    let train_set = common::synthetic_set(40, 1, 10, 12, 5);
    let test_set = common::synthetic_set(20, 1, 10, 12, 99);
    let tmp = common::tempdir("training");
    let dir = tmp.path().join("run");
    let mut config = small_config(200);
    config.schedule.step = 0;
    let sampler = EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 5), Grouping::Any).unwrap();
    let untrained = train::new_learner(&config).unwrap();
    let before = kshot::eval::evaluate(untrained.as_ref(), &sampler, 50, 0, |_| {}).unwrap();
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let (_, learner) = load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 50, 0, |_| {}).unwrap();
    eprintln!(
        "protonet: held-out accuracy {:.3} untrained → {:.3}",
        before.accuracy, after.accuracy
    );
    assert!(
        // Measured 0.801 → 0.871: random Conv4 features already separate these classes well, so
        // the check is the margin over the untrained network.
        after.accuracy > 0.6 && after.accuracy > before.accuracy + 0.05,
        "5-way accuracy {} → {} (chance 0.2)",
        before.accuracy,
        after.accuracy
    );
}

#[test]
fn zero_intervals_are_refused_before_training() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let tmp = common::tempdir("training-zero");
    let mut c = small_config(3);
    c.checkpoint_every = 0;
    let err =
        train::train(&tmp.path().join("a"), &c, &set, None, false, &AtomicBool::new(false), |_| {})
            .unwrap_err()
            .to_string();
    assert!(err.contains("checkpoint_every") && err.contains("--checkpoint-every"), "{err}");
    let mut c = small_config(3);
    c.validation = Some(kshot::config::Validation { spec: c.test, episodes: 5, every: 0 });
    let err = train::train(
        &tmp.path().join("b"),
        &c,
        &set,
        Some(&set),
        false,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("validation interval"), "{err}");
}

/// Resuming must never rewrite a metrics file it cannot read: it holds the training history.
#[test]
fn unreadable_metrics_stop_a_resume_and_stay_untouched() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let no_stop = AtomicBool::new(false);
    let tmp = common::tempdir("training-metrics");
    let dir = tmp.path().join("run");
    train::train(&dir, &small_config(2), &set, None, false, &no_stop, |_| {}).unwrap();
    let metrics = dir.join(train::METRICS_FILE);
    let history = std::fs::read(&metrics).unwrap();
    // Not UTF-8: read_to_string fails, as it would on a damaged file.
    let mut damaged = history.clone();
    damaged.extend_from_slice(&[0xff, 0xfe, b'\n']);
    std::fs::write(&metrics, &damaged).unwrap();
    let mut config = kshot::config::RunConfig::load(&dir.join(train::CONFIG_FILE)).unwrap();
    config.episodes = 4;
    let err = train::train(&dir, &config, &set, None, true, &no_stop, |_| {}).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("metrics.csv") && msg.contains("history"), "{msg}");
    assert_eq!(std::fs::read(&metrics).unwrap(), damaged, "the metrics file was rewritten");
}
