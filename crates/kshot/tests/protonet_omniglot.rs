//! A short seeded ProtoNet run on real Omniglot must reach well above chance on held-out classes,
//! and well above the same network untrained.

mod common;

use kshot::data::EpisodeSpec;
use kshot::presets;

#[test]
fn protonet_short_run_beats_chance_and_its_untrained_self() {
    let mut config = presets::default_config();
    config.train = EpisodeSpec::new(20, 1, 5);
    config.episodes = 100;
    config.validation = None;
    config.checkpoint_every = 100;
    let (before, after) = common::omniglot_before_and_after(&config, "protonet");
    eprintln!(
        "5-way 1-shot on held-out classes: untrained {before:.3}, after 100 episodes {after:.3}"
    );
    assert!(after > 0.85, "accuracy {after} after 100 episodes (chance 0.2)");
    assert!(after > before + 0.1, "training must help: {before} → {after}");
}
