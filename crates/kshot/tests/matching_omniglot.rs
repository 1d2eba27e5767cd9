//! A short seeded Matching Networks run on real Omniglot must reach well above chance on held-out
//! classes, and well above the same network untrained.

mod common;

use std::sync::atomic::AtomicBool;

use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::{eval, train};

#[test]
fn matching_short_run_beats_chance_and_its_untrained_self() {
    let root = common::data_root();
    common::use_shared_data_cache();
    let train_set = data::load(&root, "omniglot", "vinyals", "train", 28).unwrap();
    let test_set = data::load(&root, "omniglot", "vinyals", "test", 28).unwrap();

    let mut config = kshot::presets::config("matching-omniglot-20way-1shot").unwrap();
    config.train = EpisodeSpec::new(20, 1, 5);
    config.episodes = 100;
    // The presets' 32 episodes per update, as the reference implementations, take 32× longer.
    config.meta_batch = 1;
    // The paper's scale 1 learns too slowly for a 100-episode test (67% after 100 episodes).
    settings!(config, Matching).attention_scale = 10.0;
    config.validation = None;
    config.checkpoint_every = 100;
    let tmp = common::tempdir("matching-omniglot");
    let dir = tmp.path().join("run");

    let sampler =
        EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 15), Grouping::Any).unwrap();
    let untrained = train::new_learner(&config).unwrap();
    let before = eval::evaluate(untrained.as_ref(), &sampler, 100, 0, |_| {}).unwrap();

    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = eval::evaluate(learner.as_ref(), &sampler, 100, 0, |_| {}).unwrap();
    eprintln!(
        "matching, 5-way 1-shot held-out: untrained {:.3}, after 100 episodes {:.3}",
        before.accuracy, after.accuracy
    );
    assert!(after.accuracy > 0.85, "accuracy {} after 100 episodes (chance 0.2)", after.accuracy);
    assert!(
        after.accuracy > before.accuracy + 0.05,
        "training must help: {} → {}",
        before.accuracy,
        after.accuracy
    );
}

/// One model per setting, as the paper: each preset trains on its own test setting, with the
/// reference implementations' schedule (Adam 1e-3 halved every 2000 updates of 32 episodes).
#[test]
fn presets_train_one_model_per_setting() {
    for (ways, shots) in [(5, 1), (5, 5), (20, 1), (20, 5)] {
        let name = format!("matching-omniglot-{ways}way-{shots}shot");
        let c = kshot::presets::config(&name).unwrap();
        assert_eq!((c.train.ways, c.train.shots), (ways, shots), "{name}");
        assert_eq!((c.test.ways, c.test.shots), (ways, shots), "{name}");
        assert_eq!(c.meta_batch, 32, "{name}");
        assert_eq!((c.schedule.lr, c.schedule.step, c.schedule.gamma), (1e-3, 2000, 0.5), "{name}");
        let summary = kshot::presets::find(&name).unwrap().summary;
        assert!(summary.contains("no gradient clipping"), "{name}: {summary}");
    }
}
