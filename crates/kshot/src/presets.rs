//! Paper protocols by name. A preset fills in a [`RunConfig`]; flags given next to it override it.

use crate::config::{DataConfig, RunConfig, Validation};
use crate::data::{EpisodeSpec, Grouping};
use crate::methods::{MamlConfig, ProtoNetConfig};
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
    Preset {
        name: "maml-omniglot-5w1s",
        summary: "Finn et al. 2017, Omniglot 5-way 1-shot: 1 inner step α=0.4 (3 at test), meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 1 query per class (official code); 600 test tasks",
        build: || maml_omniglot(5, 1),
    },
    Preset {
        name: "maml-omniglot-5w5s",
        summary: "Finn et al. 2017, Omniglot 5-way 5-shot: 1 inner step α=0.4 (3 at test), meta-batch 32, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; 600 test tasks",
        build: || maml_omniglot(5, 5),
    },
    Preset {
        name: "maml-omniglot-20w1s",
        summary: "Finn et al. 2017, Omniglot 20-way 1-shot: 5 inner steps α=0.1 (5 at test), meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 1 query per class; 600 test tasks",
        build: || maml_omniglot(20, 1),
    },
    Preset {
        name: "maml-omniglot-20w5s",
        summary: "Finn et al. 2017, Omniglot 20-way 5-shot: 5 inner steps α=0.1 (5 at test), meta-batch 16, Adam 1e-3, 60 000 meta-iterations, 5 queries per class; 600 test tasks",
        build: || maml_omniglot(20, 5),
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
        maml: MamlConfig::default(),
        meta_batch: 1,
        checkpoint_every: 500,
        validation: Some(Validation { spec: EpisodeSpec::new(5, shots, 15), episodes: 200, every: 1000 }),
        test: EpisodeSpec::new(5, shots, 15),
        test_episodes: 1000,
    }
}

/// MAML on Omniglot as in Finn et al. 2017 (Appendix A.1) and the official code: 1200 training
/// characters (our `trainval`: train + validation of the Vinyals split) with rotations, Conv4 with 64
/// filters and batch statistics at test time, K queries per class, 600 test tasks.
fn maml_omniglot(ways: usize, shots: usize) -> RunConfig {
    let mut c = protonet_omniglot(shots);
    c.method = "maml".into();
    c.data.train_subset = "trainval".into();
    c.train = EpisodeSpec::new(ways, shots, shots);
    c.meta_batch = if ways == 5 { 32 } else { 16 };
    c.episodes = 60_000;
    c.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    c.maml = if ways == 5 {
        MamlConfig { ways, inner_steps: 1, inner_steps_test: 3, inner_lr: 0.4, first_order: false }
    } else {
        MamlConfig { ways, inner_steps: 5, inner_steps_test: 5, inner_lr: 0.1, first_order: false }
    };
    c.validation = None;
    c.test = EpisodeSpec::new(ways, shots, shots);
    c.test_episodes = 600;
    c.checkpoint_every = 100;
    c
}

/// The defaults when no preset is named: the 1-shot ProtoNet Omniglot protocol.
pub fn default_config() -> RunConfig {
    protonet_omniglot(1)
}
