//! Paper protocols by name. A preset fills in a [`RunConfig`]; flags given next to it override it.

use crate::config::{DataConfig, RunConfig, Validation};
use crate::data::{EpisodeSpec, Grouping};
use crate::methods::siamese::Twin;
use crate::methods::{
    BaselineConfig, MamlConfig, MatchingConfig, MetaLstmConfig, ProtoNetConfig, ReptileConfig,
    SiameseConfig,
};
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
        name: "protonet-miniimagenet-1shot",
        summary: "Snell et al. 2017, miniImageNet (Ravi split), 84×84: Conv4 64 filters (1600-d), train 30-way 1-shot 15-query, Adam 1e-3 halved every 2000 episodes; test 5-way 1-shot 15-query, 600 episodes",
        build: || protonet_mini_imagenet(1),
    },
    Preset {
        name: "protonet-miniimagenet-5shot",
        summary: "Snell et al. 2017, miniImageNet (Ravi split), 84×84: Conv4 64 filters (1600-d), train 20-way 5-shot 15-query, Adam 1e-3 halved every 2000 episodes; test 5-way 5-shot 15-query, 600 episodes",
        build: || protonet_mini_imagenet(5),
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
    Preset {
        name: "maml-miniimagenet-5w1s",
        summary: "Finn et al. 2017, miniImageNet 5-way 1-shot (Ravi split, train classes): Conv4 with 32 filters, 84×84, 5 inner steps α=0.01 (10 at test), meta-batch 4, 15 queries per class, Adam 1e-3, 60 000 meta-iterations; 600 test tasks",
        build: || maml_mini_imagenet(1),
    },
    Preset {
        name: "maml-miniimagenet-5w5s",
        summary: "Finn et al. 2017, miniImageNet 5-way 5-shot (Ravi split, train classes): Conv4 with 32 filters, 84×84, 5 inner steps α=0.01 (10 at test), meta-batch 2, 15 queries per class, Adam 1e-3, 60 000 meta-iterations; 600 test tasks",
        build: || maml_mini_imagenet(5),
    },
    Preset {
        name: "matching-omniglot-5way-1shot",
        summary: "Vinyals et al. 2016, Omniglot (Vinyals split): Matching Networks, cosine attention, no FCE (--fce adds it); train and test 5-way 1-shot 15-query, Adam 1e-3",
        build: || matching_omniglot(5, 1),
    },
    Preset {
        name: "matching-omniglot-5way-5shot",
        summary: "Matching Networks, Omniglot: train and test 5-way 5-shot",
        build: || matching_omniglot(5, 5),
    },
    Preset {
        name: "matching-omniglot-20way-1shot",
        summary: "Matching Networks, Omniglot: train and test 20-way 1-shot",
        build: || matching_omniglot(20, 1),
    },
    Preset {
        name: "matching-omniglot-20way-5shot",
        summary: "Matching Networks, Omniglot: train and test 20-way 5-shot",
        build: || matching_omniglot(20, 5),
    },
    Preset {
        name: "siamese-omniglot-koch",
        summary: "Koch et al. 2015: 105x105 twin (conv 64@10, 128@7, 128@4, 256@4, 4096 sigmoid units), Lake background alphabets, 128 pairs a step, affine distortions; Lake 20-way test (far beyond a 2-core CPU)",
        build: || siamese_omniglot(Twin::Koch),
    },
    Preset {
        name: "siamese-omniglot-28",
        summary: "Siamese networks, reduced: Conv4 twin + 256 sigmoid units on 28x28, Lake background alphabets, 128 pairs a step (half the negatives from one alphabet), affine distortions; Lake 20-way test",
        build: || siamese_omniglot(Twin::Conv4),
    },
    Preset {
        name: "baseline-omniglot",
        summary: "Chen et al. 2019 Baseline: Conv4 + linear head over all 4112 Vinyals training classes, mini-batches of 64, Adam 1e-3; test: fine-tune a new head on the support set (100 epochs, batch 4, SGD 0.01)",
        build: || baseline_omniglot("baseline"),
    },
    Preset {
        name: "baseline++-omniglot",
        summary: "Chen et al. 2019 Baseline++: as baseline-omniglot with a cosine head (scale 10 in pretraining, 2 when fine-tuning)",
        build: || baseline_omniglot("baseline++"),
    },
    Preset {
        name: "reptile-omniglot-5w1s",
        summary: "Nichol et al. 2018, official README, Omniglot 5-way 1-shot: 10 train shots per class, inner Adam (β1=0) lr 1e-3, 5 inner steps of batch 10, meta-batch 5, outer step 1→0 linearly over 100 000 meta-iterations; test: 50 steps of batch 5, 1 query per class, 10 000 tasks; non-transductive (--transductive for the transductive numbers)",
        build: || reptile_omniglot(5, 1),
    },
    Preset {
        name: "reptile-omniglot-5w5s",
        summary: "Nichol et al. 2018, official README, Omniglot 5-way 5-shot: 10 train shots per class, inner Adam (β1=0) lr 1e-3, 5 inner steps of batch 10, meta-batch 5, outer step 1→0 over 100 000 meta-iterations; test: 50 steps of batch 5, 1 query per class, 10 000 tasks; non-transductive",
        build: || reptile_omniglot(5, 5),
    },
    Preset {
        name: "reptile-omniglot-20w1s",
        summary: "Nichol et al. 2018, official README, Omniglot 20-way 1-shot: 10 train shots per class, inner Adam (β1=0) lr 5e-4, 10 inner steps of batch 20, meta-batch 5, outer step 1→0 over 200 000 meta-iterations; test: 50 steps of batch 10, 1 query per class, 10 000 tasks; non-transductive",
        build: || reptile_omniglot(20, 1),
    },
    Preset {
        name: "reptile-omniglot-20w5s",
        summary: "Nichol et al. 2018, official README, Omniglot 20-way 5-shot: 10 train shots per class, inner Adam (β1=0) lr 5e-4, 10 inner steps of batch 20, meta-batch 5, outer step 1→0 over 200 000 meta-iterations; test: 50 steps of batch 10, 1 query per class, 10 000 tasks; non-transductive",
        build: || reptile_omniglot(20, 5),
    },
    Preset {
        name: "meta-lstm-miniimagenet-5w1s",
        summary: "Ravi & Larochelle 2017, miniImageNet 5-way 1-shot (Ravi split): Conv4 learner with 32 filters, 84×84, T=12 updates on the whole support set, 15 queries per class, meta-learner LSTM 20 hidden, Adam 1e-3; 600 test tasks",
        build: || meta_lstm_mini_imagenet(1),
    },
    Preset {
        name: "meta-lstm-miniimagenet-5w5s",
        summary: "Ravi & Larochelle 2017, miniImageNet 5-way 5-shot (Ravi split): Conv4 learner with 32 filters, 84×84, T=5 updates on the whole support set, 15 queries per class, meta-learner LSTM 20 hidden, Adam 1e-3; 600 test tasks",
        build: || meta_lstm_mini_imagenet(5),
    },
    Preset {
        name: "meta-lstm-omniglot-5w1s",
        summary: "Meta-LSTM on Omniglot 5-way 1-shot with the paper's 1-shot miniImageNet settings (not a protocol of the paper): Conv4 learner with 32 filters, T=12, 15 queries per class, LSTM 20 hidden, Adam 1e-3, 20 000 episodes; 600 test tasks",
        build: meta_lstm_omniglot,
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
        reptile: ReptileConfig::default(),
        meta_lstm: MetaLstmConfig::default(),
        meta_batch: 1,
        matching: MatchingConfig::default(),
        siamese: SiameseConfig::default(),
        baseline: BaselineConfig::default(),
        checkpoint_every: 500,
        validation: Some(Validation {
            spec: EpisodeSpec::new(5, shots, 15),
            episodes: 200,
            every: 1000,
        }),
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
        MamlConfig {
            ways,
            inner_steps: 1,
            inner_steps_test: 3,
            inner_lr: 0.4,
            first_order: false,
            transductive: true,
        }
    } else {
        MamlConfig {
            ways,
            inner_steps: 5,
            inner_steps_test: 5,
            inner_lr: 0.1,
            first_order: false,
            transductive: true,
        }
    };
    c.validation = None;
    c.test = EpisodeSpec::new(ways, shots, shots);
    c.test_episodes = 600;
    c.checkpoint_every = 100;
    c
}

/// miniImageNet, Ravi & Larochelle's split: 84×84 RGB, train on the 64 train classes, test on the 20
/// test classes.
fn mini_imagenet_data() -> DataConfig {
    DataConfig {
        dataset: "mini-imagenet".into(),
        split: "ravi".into(),
        train_subset: "train".into(),
        test_subset: "test".into(),
        image_size: 84,
        grouping: Grouping::Any,
        data_dir: None,
    }
}

/// Prototypical Networks on miniImageNet (Snell et al. 2017, Section 3.2): Conv4 with 64 filters
/// (1600-d embeddings at 84×84), 30-way episodes for 1-shot and 20-way for 5-shot, 15 queries per
/// class, train shot = test shot; 600 test episodes of 5-way 15-query.
fn protonet_mini_imagenet(shots: usize) -> RunConfig {
    let mut c = protonet_omniglot(shots);
    c.data = mini_imagenet_data();
    c.backbone = Conv4Config::new(3);
    c.train = EpisodeSpec::new(if shots == 1 { 30 } else { 20 }, shots, 15);
    c.validation =
        Some(Validation { spec: EpisodeSpec::new(5, shots, 15), episodes: 200, every: 1000 });
    c.test = EpisodeSpec::new(5, shots, 15);
    c.test_episodes = 600;
    c.checkpoint_every = 100;
    c
}

/// MAML on miniImageNet as in Finn et al. 2017 (Section 5.1, Appendix A.1): Conv4 with 32 filters,
/// 5 inner steps of α = 0.01 (10 at test), meta-batch 4 tasks for 1-shot and 2 for 5-shot, 15
/// queries per class, trained on the 64 train classes; 600 test tasks.
fn maml_mini_imagenet(shots: usize) -> RunConfig {
    let mut c = maml_omniglot(5, shots);
    c.data = mini_imagenet_data();
    c.backbone = Conv4Config { hidden: 32, ..Conv4Config::new(3) };
    c.train = EpisodeSpec::new(5, shots, 15);
    c.meta_batch = if shots == 1 { 4 } else { 2 };
    c.maml = MamlConfig {
        ways: 5,
        inner_steps: 5,
        inner_steps_test: 10,
        inner_lr: 0.01,
        first_order: false,
        transductive: true,
    };
    c.test = EpisodeSpec::new(5, shots, 15);
    c.test_episodes = 600;
    c
}

fn matching_omniglot(ways: usize, shots: usize) -> RunConfig {
    let mut c = protonet_omniglot(shots);
    c.method = "matching".into();
    c.train = EpisodeSpec::new(ways, shots, 15);
    c.test = EpisodeSpec::new(ways, shots, 15);
    c.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    if let Some(v) = &mut c.validation {
        v.spec = c.test;
    }
    c
}

/// Siamese networks train on Lake's background alphabets and are scored on the Lake benchmark.
fn siamese_omniglot(twin: Twin) -> RunConfig {
    let mut c = protonet_omniglot(1);
    c.method = "siamese".into();
    c.data.split = "lake".into();
    c.data.train_subset = "background".into();
    c.data.test_subset = "evaluation".into();
    c.validation = None;
    c.test = EpisodeSpec::new(20, 1, 1);
    c.schedule = StepDecay { lr: 1e-3, step: 5000, gamma: 0.5 };
    c.siamese = match twin {
        Twin::Koch => SiameseConfig { twin, hidden: 4096, ..SiameseConfig::default() },
        Twin::Conv4 => {
            SiameseConfig { twin, within_group_negatives: 0.5, ..SiameseConfig::default() }
        }
    };
    if twin == Twin::Koch {
        c.data.image_size = 105;
    }
    c
}

fn baseline_omniglot(method: &str) -> RunConfig {
    let mut c = protonet_omniglot(1);
    c.method = method.into();
    c.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    c
}

/// Reptile on Omniglot with the official README's settings (openai/supervised-reptile): training
/// tasks draw 10 images per class (`--train-shots 10`) and no query set, test tasks K shots and one
/// query per class. Training classes as for MAML (`trainval`: 1200 characters with rotations).
fn reptile_omniglot(ways: usize, shots: usize) -> RunConfig {
    let mut c = protonet_omniglot(shots);
    c.method = "reptile".into();
    c.data.train_subset = "trainval".into();
    c.train = EpisodeSpec::new(ways, 10, 0);
    c.meta_batch = 5;
    c.reptile = if ways == 5 {
        ReptileConfig { ways, ..ReptileConfig::default() }
    } else {
        ReptileConfig {
            ways,
            inner_steps: 10,
            inner_steps_test: 50,
            inner_batch: 20,
            inner_batch_test: 10,
            inner_lr: 0.0005,
            ..ReptileConfig::default()
        }
    };
    c.episodes = if ways == 5 { 100_000 } else { 200_000 };
    c.schedule = StepDecay { lr: 0.0, step: 0, gamma: 1.0 };
    c.validation = None;
    c.test = EpisodeSpec::new(ways, shots, 1);
    c.test_episodes = 10_000;
    c.checkpoint_every = 500;
    c
}

/// Meta-LSTM as in Ravi & Larochelle 2017: a 32-filter Conv4 learner, 15 queries per class, T = 12
/// updates for 1-shot and 5 for 5-shot, each on the whole support set (their batch sizes 5 / 25).
fn meta_lstm_mini_imagenet(shots: usize) -> RunConfig {
    let mut c = protonet_omniglot(shots);
    c.method = "meta-lstm".into();
    c.data = mini_imagenet_data();
    c.backbone = Conv4Config { hidden: 32, ..Conv4Config::new(3) };
    c.train = EpisodeSpec::new(5, shots, 15);
    let steps = if shots == 1 { 12 } else { 5 };
    c.meta_lstm = MetaLstmConfig {
        ways: 5,
        inner_steps: steps,
        inner_steps_test: steps,
        ..MetaLstmConfig::default()
    };
    c.episodes = 50_000;
    c.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    c.validation =
        Some(Validation { spec: EpisodeSpec::new(5, shots, 15), episodes: 100, every: 1000 });
    c.test = EpisodeSpec::new(5, shots, 15);
    c.test_episodes = 600;
    c.checkpoint_every = 100;
    c
}

/// Meta-LSTM's 1-shot settings on Omniglot 28×28 (runnable without miniImageNet).
fn meta_lstm_omniglot() -> RunConfig {
    let mut c = protonet_omniglot(1);
    c.method = "meta-lstm".into();
    c.data.train_subset = "trainval".into();
    c.backbone.hidden = 32;
    c.train = EpisodeSpec::new(5, 1, 15);
    c.meta_lstm = MetaLstmConfig { ways: 5, ..MetaLstmConfig::default() };
    c.episodes = 20_000;
    c.schedule = StepDecay { lr: 1e-3, step: 0, gamma: 1.0 };
    c.validation = None;
    c.test = EpisodeSpec::new(5, 1, 15);
    c.test_episodes = 600;
    c.checkpoint_every = 100;
    c
}

/// The defaults when no preset is named: the 1-shot ProtoNet Omniglot protocol.
pub fn default_config() -> RunConfig {
    protonet_omniglot(1)
}
