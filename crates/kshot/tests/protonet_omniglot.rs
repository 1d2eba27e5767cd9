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

/// The official two-stage procedure's stage 1: epochs of 100 episodes, 100 validation episodes
/// after each, early stopping on validation loss with patience 200, StepLR stepped at epoch start.
#[test]
fn official_presets_follow_run_train_py() {
    use kshot::protocol::ValMetric;
    for shots in [1, 5] {
        let c = kshot::presets::config(&format!("protonet-omniglot-{shots}shot-official")).unwrap();
        let v = c.validation.unwrap();
        assert_eq!((v.every, v.episodes), (100, 100));
        assert_eq!((v.spec.ways, v.spec.shots, v.spec.queries), (5, shots, 15));
        let es = v.early_stopping.unwrap();
        assert_eq!((es.metric, es.patience), (ValMetric::Loss, 200));
        assert_eq!((c.train.ways, c.train.shots, c.train.queries), (60, shots, 5));
        assert_eq!(c.data.train_subset, "train");
        assert_eq!(c.episodes, 1_000_000);
        // First halving after 1900 episodes, then every 2000.
        assert_eq!(c.lr_at(1899), 1e-3);
        assert_eq!(c.lr_at(1900), 5e-4);
        assert_eq!(c.lr_at(3899), 5e-4);
        assert_eq!(c.lr_at(3900), 2.5e-4);
        // The published presets are unchanged.
        let old = kshot::presets::config(&format!("protonet-omniglot-{shots}shot")).unwrap();
        assert_eq!((old.lr_at(1999), old.lr_at(2000)), (1e-3, 5e-4));
        assert!(old.validation.unwrap().early_stopping.is_none());
        assert_eq!(old.episodes, 20_000);
    }
}
