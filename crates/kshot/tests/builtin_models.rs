//! The built-in models load from the binary and score their own protocols (Vinyals / Ravi test
//! classes, which they never trained on) above a stated bar.

mod common;

use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::{eval, models};

fn score(name: &str, subset: &str, spec: EpisodeSpec, episodes: usize) -> f64 {
    let model = models::find(name).expect("a built-in model");
    let (config, learner) = model.load().unwrap();
    let d = &config.data;
    let set =
        data::load_data(&common::data_root(), d, subset, config.backbone.in_channels()).unwrap();
    let sampler = EpisodeSampler::new(&set, spec, Grouping::Any).unwrap();
    eval::evaluate(learner.as_ref(), &sampler, episodes, 0, |_| {}).unwrap().accuracy
}

#[test]
fn the_omniglot_model_scores_its_protocol() {
    // docs/RESULTS.md: 98.46% on 1000 episodes of 5-way 1-shot on the Vinyals test classes.
    let accuracy = score("omniglot", "test", EpisodeSpec::new(5, 1, 15), 100);
    assert!(accuracy > 0.96, "5-way 1-shot accuracy {accuracy}");
    let card = models::find("omniglot").unwrap().card().unwrap();
    assert!(card.scores.iter().any(|s| s.setting == "20-way 5-shot"));
    assert!(
        card.calibration.temperature > 0.0
            && card.calibration.ece_after < card.calibration.ece_before
    );
}

#[test]
fn the_mini_imagenet_model_scores_its_protocol() {
    // docs/RESULTS.md: 51.1% on 600 episodes of 5-way 5-shot (chance: 20%).
    let accuracy = score("mini-imagenet", "test", EpisodeSpec::new(5, 5, 15), 60);
    assert!(accuracy > 0.42, "5-way 5-shot accuracy {accuracy}");
}

#[test]
fn built_in_models_are_small_and_say_what_they_read() {
    for m in models::all() {
        assert!(m.weight_bytes() < 1 << 20, "{}: {} bytes", m.name, m.weight_bytes());
        let config = m.config().unwrap();
        assert_eq!(config.data.data_dir, None, "{}: no machine's path is embedded", m.name);
        let pipeline =
            kshot::data::images::Pipeline::of_run(&config.data, config.backbone.in_channels())
                .unwrap();
        assert_eq!(pipeline.channels, config.backbone.in_channels());
    }
    assert_eq!(models::all()[0].name, models::DEFAULT);
}
