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
    c.validation = Some(kshot::config::Validation::new(c.test, 5, 0));
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

/// `small_config` validating every `every` steps on 4 episodes, early stopping on `metric`.
fn early_config(
    episodes: u64,
    every: u64,
    patience: u64,
    metric: kshot::protocol::ValMetric,
) -> kshot::config::RunConfig {
    let mut c = small_config(episodes);
    c.validation = Some(kshot::config::Validation {
        early_stopping: Some(kshot::protocol::EarlyStopping { metric, patience }),
        ..kshot::config::Validation::new(EpisodeSpec::new(5, 1, 3), 4, every)
    });
    c
}

/// A run validating every 2 steps with patience 1 keeps its best round's model, stops at the
/// first round that makes 2 in a row without improvement, says so in metrics.csv, and the
/// train+val retrain is (best epoch + patience) epochs. (The learning rate is 0, so only the
/// batch-norm running statistics change the validation loss: it soon stops improving.)
#[test]
fn early_stopping_keeps_the_best_model_and_stops_after_the_patience() {
    use kshot::protocol::ValMetric;
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let val = common::synthetic_set(10, 2, 10, 12, 6);
    let tmp = common::tempdir("training-early");
    let dir = tmp.path().join("run");
    let mut c = early_config(1000, 2, 1, ValMetric::Loss);
    c.schedule.lr = 0.0;
    let s =
        train::train(&dir, &c, &set, Some(&val), false, &AtomicBool::new(false), |_| {}).unwrap();
    assert!(s.stopped_early && !s.interrupted, "{s:?}");
    let best_episode = s.best.unwrap().episode;
    // The best round, then two rounds without improvement (wait 1, then 2 > patience 1).
    assert_eq!(s.episodes_done, best_episode + 4, "{s:?}");
    let metrics = std::fs::read_to_string(dir.join(train::METRICS_FILE)).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines[0], "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95,val_loss,event");
    assert_eq!(lines.len() as u64, s.episodes_done + 1, "{metrics}");
    let best_line = lines[best_episode as usize];
    assert!(best_line.ends_with(",best"), "{metrics}");
    assert!(lines.last().unwrap().ends_with(",early-stop"), "{metrics}");
    assert_eq!(lines.iter().filter(|l| l.ends_with(",early-stop")).count(), 1);
    // Validation rounds only at even episodes, each with a loss.
    for (i, l) in lines.iter().enumerate().skip(1) {
        let val_loss = l.split(',').nth(7).unwrap();
        assert_eq!(val_loss.is_empty(), i % 2 == 1, "{l}");
    }
    let val_loss: f64 = best_line.split(',').nth(7).unwrap().parse().unwrap();
    assert!(val_loss > 0.0 && (val_loss - s.best.unwrap().value).abs() < 1e-5, "{metrics}");
    assert!(dir.join(train::BEST_MODEL_FILE).exists() && dir.join(train::BEST_FILE).exists());
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(train::BEST_FILE)).unwrap())
            .unwrap();
    assert_eq!(best["episode"], best_episode);
    assert_eq!(best["metric"], "loss");
    // A stopped run stays stopped when resumed.
    let again =
        train::train(&dir, &c, &set, Some(&val), true, &AtomicBool::new(false), |_| {}).unwrap();
    assert!(again.stopped_early && again.episodes_done == s.episodes_done, "{again:?}");
    // The retrain stage: 0-based best epoch (best_episode / 2 - 1) + patience 1, epochs of 2.
    let retrain = train::retrain_config(&dir).unwrap();
    assert_eq!(retrain.episodes, best_episode);
    assert_eq!(retrain.data.train_subset, "trainval");
    assert!(retrain.validation.is_none());
    // Without early stopping, a run has no best model and the choice says so.
    let err = train::model_path(&tmp.path().join("none"), train::ModelChoice::Best)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--model last"), "{err}");
}

/// prototypical-networks' trainval epochs: `best_epoch` is the 0-based round of the best
/// validation loss, and the retrain runs best_epoch + patience epochs.
#[test]
fn retrain_episodes_follow_run_trainval() {
    use kshot::protocol::{EarlyStopping, ValMetric};
    let v = kshot::config::Validation::new(EpisodeSpec::new(5, 1, 15), 100, 100);
    let es = EarlyStopping { metric: ValMetric::Loss, patience: 200 };
    let at = |episode| train::retrain_episodes(&v, &es, train::Best { episode, value: 0.0 });
    assert_eq!(at(100), 200 * 100, "best after epoch 1 (index 0): 0 + 200 epochs");
    assert_eq!(at(3700), (36 + 200) * 100);
    // A last, partial round counts as its own epoch.
    assert_eq!(at(3750), (37 + 200) * 100);
    // An unfinished run is refused, naming the resume command.
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let tmp = common::tempdir("training-retrain");
    let dir = tmp.path().join("run");
    let c = early_config(20, 2, 50, ValMetric::Loss);
    let stop = AtomicBool::new(false);
    train::train(&dir, &c, &set, Some(&set), false, &stop, |s| {
        if s.episode == 4 {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    let err = train::retrain_config(&dir).unwrap_err().to_string();
    assert!(err.contains("has not finished") && err.contains("--resume"), "{err}");
}

/// A run with early stopping killed mid-way and resumed selects, stops and saves exactly as the
/// uninterrupted run: same stop episode, best episode, best model and metrics.
#[test]
fn early_stopping_resumes_exactly() {
    use kshot::protocol::ValMetric;
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let val = common::noisy_synthetic_set(10, 2, 10, 12, 6, 0.3);
    let tmp = common::tempdir("training-early-resume");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let mut c = early_config(200, 1, 2, ValMetric::Accuracy);
    c.schedule.lr = 3e-2;
    c.schedule.step = 0;
    c.checkpoint_every = 3;
    let no_stop = AtomicBool::new(false);
    let a = train::train(&straight, &c, &set, Some(&val), false, &no_stop, |_| {}).unwrap();
    assert!(a.stopped_early, "accuracy should plateau within 200 steps: {a:?}");
    // Interrupt at several points: the stop flag checkpoints mid-way (not on a multiple of 3).
    let stop = AtomicBool::new(false);
    let cut = a.episodes_done.saturating_sub(2).max(2);
    let first = train::train(&split, &c, &set, Some(&val), false, &stop, |s| {
        if s.episode == cut {
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(first.interrupted && first.episodes_done == cut, "{first:?}");
    let b = train::train(&split, &c, &set, Some(&val), true, &no_stop, |_| {}).unwrap();
    assert_eq!((b.episodes_done, b.best), (a.episodes_done, a.best));
    assert!(b.stopped_early);
    assert_eq!(common::model_tensors(&straight), common::model_tensors(&split));
    let best = |d: &std::path::Path| {
        kshot::checkpoint::content_hash(
            &kshot::checkpoint::load_tensors(&d.join(train::BEST_MODEL_FILE)).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(best(&straight), best(&split));
    // Metrics equal apart from the seconds column.
    let cols = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(d.join(train::METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(',').collect();
                f.remove(4);
                f.join(",")
            })
            .collect()
    };
    assert_eq!(cols(&straight), cols(&split));
    // `load_learner` scores the best model, which differs from the last one.
    assert_ne!(
        kshot::checkpoint::content_hash(
            &kshot::checkpoint::load_tensors(&straight.join(train::MODEL_FILE)).unwrap()
        )
        .unwrap(),
        best(&straight)
    );
    assert_eq!(
        train::model_path(&straight, train::ModelChoice::Selected).unwrap(),
        straight.join(train::BEST_MODEL_FILE)
    );
}

/// A kshot 0.1 metrics file (7 columns) gains the two new, empty columns on resume.
#[test]
fn resume_upgrades_an_old_metrics_header() {
    let set = common::synthetic_set(20, 2, 10, 12, 5);
    let tmp = common::tempdir("training-metrics-v0");
    let dir = tmp.path().join("run");
    let no_stop = AtomicBool::new(false);
    train::train(&dir, &small_config(4), &set, None, false, &no_stop, |_| {}).unwrap();
    let path = dir.join(train::METRICS_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let old: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 0 {
                "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95\n".to_string()
            } else {
                format!("{}\n", l.rsplitn(3, ',').nth(2).unwrap())
            }
        })
        .collect();
    std::fs::write(&path, old).unwrap();
    let mut c = kshot::config::RunConfig::load(&dir.join(train::CONFIG_FILE)).unwrap();
    c.episodes = 6;
    train::train(&dir, &c, &set, None, true, &no_stop, |_| {}).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.lines().all(|l| l.split(',').count() == 9), "{text}");
    assert_eq!(text.lines().count(), 7);
}
