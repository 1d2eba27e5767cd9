//! The workloads of `kshot bench` that run a method as its preset configures it: the learner is
//! built by the method's public constructor from the preset's protocol and settings, and fed
//! random normal episodes (or images) of the preset's shapes.

use candle_core::{Device, Result, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{episode, labels, learner_step, normal, Workload};
use crate::config::RunConfig;
use crate::data::{Class, Episode, ImageSet};
use crate::methods::{
    Baseline, Learner, Maml, MatchingNet, MetaLstm, MetaNet, MethodConfig, ProtoNet,
};
use crate::optim::AdamConfig;

/// The preset each of these workloads follows.
pub(super) fn preset(workload: Workload) -> Option<&'static str> {
    Some(match workload {
        Workload::Maml20Way5Shot => "maml-omniglot-20w5s",
        Workload::MatchingEpisode => "matching-omniglot-5way-1shot",
        Workload::MetaLstmIteration => "meta-lstm-omniglot-5w1s",
        Workload::BaselineBatch => "baseline-omniglot",
        Workload::EvalEpisode => "protonet-omniglot-1shot",
        Workload::MetaNetEpisode => "metanet-omniglot-5w1s",
        _ => return None,
    })
}

/// Tasks in one `maml2-20w5s` meta-step: 2 (one per thread of the default 2) of the preset's 16,
/// since a whole meta-batch takes about a minute on 2 cores.
pub const MAML20_TASKS: usize = 2;

/// Vinyals's Omniglot training classes: the width of the Baseline's pretraining head.
pub const OMNIGLOT_TRAIN_CLASSES: usize = 4112;

fn config(workload: Workload, fast_kernels: bool) -> Result<RunConfig> {
    let name = preset(workload)
        .ok_or_else(|| candle_core::Error::Msg(format!("{} has no preset", workload.name())))?;
    let mut c = crate::presets::config(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    c.protocol.backbone.set_fast_kernels(fast_kernels);
    Ok(c)
}

fn wrong_method(workload: Workload) -> candle_core::Error {
    candle_core::Error::Msg(format!("the preset of {} names another method", workload.name()))
}

type Step = Box<dyn FnMut() -> Result<()>>;

/// The step of a preset workload, with parameters drawn from `rng`.
pub(super) fn prepare(
    workload: Workload,
    fast_kernels: bool,
    rng: &mut ChaCha8Rng,
) -> Result<Step> {
    let c = config(workload, fast_kernels)?;
    let size = c.data.image_size;
    let dev = Device::Cpu;
    let adam = AdamConfig::default();
    match (workload, &c.method) {
        (Workload::Maml20Way5Shot, MethodConfig::Maml(m)) => {
            let maml = Maml::new(*m, &c.backbone, (size, size), rng, &dev)?;
            let tasks = (0..MAML20_TASKS)
                .map(|_| episode(rng, c.train, size))
                .collect::<Result<Vec<Episode>>>()?;
            let params = maml.params().clone();
            learner_step(&params, adam, move || maml.meta_batch_loss(&tasks))
        }
        (Workload::MatchingEpisode, MethodConfig::Matching(m)) => {
            let mut net = MatchingNet::new(*m, &c.backbone, size, rng, &dev)?;
            let ep = episode(rng, c.train, size)?;
            let params = net.params().clone();
            learner_step(&params, adam, move || net.episode_loss(&ep))
        }
        (Workload::MetaLstmIteration, MethodConfig::MetaLstm(m)) => {
            let net = MetaLstm::new(*m, &c.backbone, (size, size), rng, &dev)?;
            let ep = episode(rng, c.train, size)?;
            let params = net.params().clone();
            learner_step(&params, adam, move || net.meta_batch_loss(std::slice::from_ref(&ep)))
        }
        (Workload::BaselineBatch, MethodConfig::Baseline(m)) => {
            let config = crate::methods::BaselineConfig { classes: OMNIGLOT_TRAIN_CLASSES, ..*m };
            let mut net = Baseline::new(config, &c.backbone, size, rng, &dev)?;
            let set = random_set(OMNIGLOT_TRAIN_CLASSES, size, rng);
            let params = net.params().clone();
            let mut batch = 0;
            learner_step(&params, adam, move || {
                batch += 1;
                net.batch_loss(&set, ChaCha8Rng::seed_from_u64(batch))
            })
        }
        (Workload::EvalEpisode, MethodConfig::ProtoNet(m)) => {
            let net = ProtoNet::new(*m, &c.backbone, rng, &dev)?;
            let spec = c.test;
            let support = normal(rng, &[spec.ways * spec.shots, 1, size, size])?;
            let query = normal(rng, &[spec.ways * spec.queries, 1, size, size])?;
            let support_labels = labels(spec.ways, spec.shots);
            let query_labels = Tensor::new(labels(spec.ways, spec.queries), &dev)?;
            Ok(Box::new(move || {
                let classifier = net.adapt(&support, &support_labels, spec.ways)?;
                let logits = classifier.logits(&query)?;
                crate::nn::ops::accuracy(&logits, &query_labels)?;
                Ok(())
            }))
        }
        (Workload::MetaNetEpisode, MethodConfig::MetaNet(m)) => {
            let net = MetaNet::new(*m, size, rng, &dev)?;
            let ep = episode(rng, c.train, size)?;
            let params = net.state().params.clone();
            learner_step(&params, adam, move || net.meta_batch_loss(std::slice::from_ref(&ep)))
        }
        _ => Err(wrong_method(workload)),
    }
}

/// `classes` classes of one random `size`×`size` grey image each.
fn random_set(classes: usize, size: usize, rng: &mut ChaCha8Rng) -> ImageSet {
    let classes = (0..classes)
        .map(|i| {
            let mut pixels = vec![0u8; size * size];
            rng.fill_bytes(&mut pixels);
            Class { name: format!("class{i}"), group: String::new(), pixels }
        })
        .collect();
    ImageSet { name: "random".into(), channels: 1, height: size, width: size, classes }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The descriptions name the presets' shapes: check them against the presets.
    #[test]
    fn presets_have_the_shapes_the_workloads_describe() {
        let maml = config(Workload::Maml20Way5Shot, true).unwrap();
        assert_eq!((maml.meta_batch, maml.train), (16, crate::data::EpisodeSpec::new(20, 5, 5)));
        let matching = config(Workload::MatchingEpisode, true).unwrap();
        assert_eq!(matching.train, crate::data::EpisodeSpec::new(5, 1, 15));
        let lstm = config(Workload::MetaLstmIteration, true).unwrap();
        assert_eq!((lstm.meta_batch, lstm.train), (1, crate::data::EpisodeSpec::new(5, 1, 15)));
        let metanet = config(Workload::MetaNetEpisode, true).unwrap();
        assert_eq!(
            (metanet.meta_batch, metanet.train),
            (1, crate::data::EpisodeSpec::new(5, 1, 10))
        );
        let eval = config(Workload::EvalEpisode, true).unwrap();
        assert_eq!(eval.test, crate::data::EpisodeSpec::new(5, 1, 15));
        match config(Workload::BaselineBatch, true).unwrap().method {
            MethodConfig::Baseline(b) => assert_eq!(b.batch_size, 16),
            other => panic!("baseline-omniglot is {other:?}"),
        }
    }
}
