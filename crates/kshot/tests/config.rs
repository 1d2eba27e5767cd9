//! Run configs written by kshot 0.1 (the method a string beside one object per method, the
//! backbone always Conv4, Siamese's twin a method setting) load into the current layout.

mod common;

use kshot::config::RunConfig;
use kshot::methods::{Head, MethodConfig};
use kshot::nn::BackboneConfig;

/// `fixtures/config-v0.1-maml.json` was written by kshot 0.1.0 (`kshot train --preset
/// maml-omniglot-5w1s --episodes 10 --meta-batch 4 --seed 3`); each test sets its `method`.
fn v0_1_config(method: &str, edit: impl FnOnce(&mut serde_json::Value)) -> RunConfig {
    let text = include_str!("fixtures/config-v0.1-maml.json");
    let mut value: serde_json::Value = serde_json::from_str(text).unwrap();
    value["method"] = method.into();
    edit(&mut value);
    let tmp = common::tempdir("config-v0.1");
    let path = tmp.path().join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    RunConfig::load(&path).unwrap()
}

#[test]
fn a_v0_1_maml_config_keeps_every_setting() {
    let c = v0_1_config("maml", |_| {});
    assert_eq!(c.kshot_version, "0.1.0");
    assert_eq!(c.preset.as_deref(), Some("maml-omniglot-5w1s"));
    let MethodConfig::Maml(m) = &c.method else { panic!("{:?}", c.method) };
    assert_eq!(
        (m.ways, m.inner_steps, m.inner_steps_test, m.inner_lr, m.first_order, m.transductive),
        (5, 1, 3, 0.4, false, true)
    );
    assert_eq!((c.episodes, c.meta_batch, c.seed), (10, 4, 3));
    let BackboneConfig::Conv4(b) = c.backbone else { panic!("{:?}", c.backbone) };
    assert_eq!((b.in_channels, b.hidden, b.blocks, b.fast_kernels), (1, 64, 4, true));
    assert_eq!(c.method.name(), "maml");
}

#[test]
fn v0_1_method_names_map_to_their_settings() {
    let c = v0_1_config("fomaml", |_| {});
    assert_eq!(c.method.name(), "fomaml");
    let c = v0_1_config("baseline++", |v| v["baseline"]["classes"] = 4112.into());
    let MethodConfig::Baseline(b) = &c.method else { panic!("{:?}", c.method) };
    assert_eq!((b.head, b.classes, c.method.name()), (Head::Cosine, 4112, "baseline++"));
    let c = v0_1_config("siamese", |v| {
        v["siamese"]["twin"] = "koch".into();
        v["siamese"]["hidden"] = 4096.into();
    });
    assert_eq!(c.backbone, BackboneConfig::Koch(kshot::nn::KochConfig { in_channels: 1 }));
    let MethodConfig::Siamese(s) = &c.method else { panic!("{:?}", c.method) };
    assert_eq!(s.hidden, 4096);
    let c = v0_1_config("meta-lstm", |v| {
        v["meta_lstm"]["inner_steps"] = 7.into();
    });
    let MethodConfig::MetaLstm(m) = &c.method else { panic!("{:?}", c.method) };
    assert_eq!(m.inner_steps, 7);
}

#[test]
fn a_current_config_round_trips_and_a_broken_one_names_the_file() {
    let c = kshot::presets::config("reptile-omniglot-20w5s").unwrap();
    let tmp = common::tempdir("config-now");
    let path = tmp.path().join("config.json");
    c.save(&path).unwrap();
    assert_eq!(RunConfig::load(&path).unwrap(), c);
    std::fs::write(&path, "{\"method\": \"no-such-method\"}").unwrap();
    let err = RunConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("no-such-method"), "{err}");
}
