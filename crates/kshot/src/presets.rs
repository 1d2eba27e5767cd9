//! Paper protocols by name. A preset fills in a [`RunConfig`]; flags given next to it override it.

use crate::config::{DataConfig, RunConfig, Validation};
use crate::data::{EpisodeSpec, Grouping};
use crate::methods::ProtoNetConfig;
use crate::nn::Conv4Config;
use crate::optim::{AdamConfig, StepDecay};

pub struct Preset {
    pub name: &'static str,
    pub summary: &'static str,
    pub build: fn() -> RunConfig,
}

/// Every preset, in the order `kshot presets` lists them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "protonet-omniglot-1shot",
        summary: "Snell et al. 2017, Omniglot (Vinyals split): train 60-way 1-shot 5-query, Adam 1e-3 halved every 2000 episodes; test 5-way 1-shot 15-query, 1000 episodes",
        build: || protonet_omniglot(1),
    },
    Preset {
        name: "protonet-omniglot-5shot",
        summary: "Snell et al. 2017, Omniglot (Vinyals split): train 60-way 5-shot 5-query, Adam 1e-3 halved every 2000 episodes; test 5-way 5-shot 15-query, 1000 episodes",
        build: || protonet_omniglot(5),
    },
];

pub fn find(name: &str) -> anyhow::Result<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        anyhow::anyhow!("unknown preset `{name}`; choose one of: {}", names.join(", "))
    })
}

fn protonet_omniglot(shots: usize) -> RunConfig {
    RunConfig {
        kshot_version: crate::VERSION.to_string(),
        command: Vec::new(),
        preset: None,
        method: "protonet".into(),
        data: DataConfig {
            dataset: "omniglot".into(),
            split: "vinyals".into(),
            train_subset: "train".into(),
            test_subset: "test".into(),
            image_size: 28,
            grouping: Grouping::Any,
            data_dir: None,
        },
        train: EpisodeSpec::new(60, shots, 5),
        episodes: 20_000,
        seed: 0,
        adam: AdamConfig::default(),
        schedule: StepDecay { lr: 1e-3, step: 2000, gamma: 0.5 },
        backbone: Conv4Config::new(1),
        protonet: ProtoNetConfig::default(),
        checkpoint_every: 500,
        validation: Some(Validation { spec: EpisodeSpec::new(5, shots, 15), episodes: 200, every: 1000 }),
        test: EpisodeSpec::new(5, shots, 15),
        test_episodes: 1000,
    }
}

/// The defaults when no preset is named: the 1-shot ProtoNet Omniglot protocol.
pub fn default_config() -> RunConfig {
    protonet_omniglot(1)
}
