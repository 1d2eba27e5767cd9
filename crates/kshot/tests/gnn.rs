//! Garcia & Bruna's GNN: the adjacency and graph convolution against central finite differences
//! in f64, invariance to the order of support nodes, label handling, the semi-supervised path's
//! blindness to unlabelled labels, and a short seeded run.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use kshot::methods::gnn::{GraphMode, GraphNet};
use kshot::methods::{Gnn, GnnConfig, Learner};
use kshot::nn::{BackboneConfig, BnMode, GnnEmbeddingConfig, ParamSet, Params, RunningStats};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn normal(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A small GNN (3 ways, 2 layers of 4 features) over 6 node features, its parameters in f64.
fn small_graph() -> (GraphNet, Vec<(String, Var)>) {
    let config = GnnConfig { growth: 4, last_adjacency_dropout: 0.0, ..GnnConfig::omniglot(3) };
    let net = GraphNet::new(config, 6, 0);
    let mut p = ParamSet::new();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    net.init(&mut p, &mut rng, &Device::Cpu).unwrap();
    let vars = p
        .iter()
        .map(|(n, v)| {
            // Batch-norm scales and shifts away from 1 and 0, so their gradients are exercised.
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            let t = if n.contains(".bn") { (t + 0.3).unwrap() } else { t };
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    (net, vars)
}

fn params_of(vars: &[(String, Var)]) -> Params {
    let mut p = Params::new();
    for (n, v) in vars {
        p.insert(n.clone(), v.as_tensor().clone());
    }
    p
}

/// Σ w ⊙ logits of the graph network in training mode (batch statistics).
fn weighted_logits(net: &GraphNet, params: &Params, nodes: &Tensor, w: &Tensor) -> Tensor {
    let mut mode = GraphMode { bn: BnMode::Batch(None), dropout: None };
    (net.forward(params, nodes, &mut mode).unwrap() * w).unwrap().sum_all().unwrap()
}

#[test]
fn adjacency_and_graph_convolution_match_central_differences_in_f64() {
    let (net, vars) = small_graph();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let nodes = Var::from_tensor(&normal(&mut rng, &[3, 4, 6])).unwrap();
    let w = normal(&mut rng, &[3, 3]);
    let loss = weighted_logits(&net, &params_of(&vars), nodes.as_tensor(), &w);
    let grads = loss.backward().unwrap();
    let value = |params: &Params, x: &Tensor| -> f64 {
        weighted_logits(&net, params, x, &w).to_scalar::<f64>().unwrap()
    };
    let h = 1e-5;
    // Every node coordinate.
    let analytic =
        grads.get(nodes.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let x0 = nodes.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut worst = 0f64;
    for i in 0..x0.len() {
        let at = |d: f64| {
            let mut x = x0.clone();
            x[i] += d;
            Tensor::from_vec(x, (3, 4, 6), &Device::Cpu).unwrap()
        };
        let fd = (value(&params_of(&vars), &at(h)) - value(&params_of(&vars), &at(-h))) / (2.0 * h);
        worst = worst.max((fd - analytic[i]).abs() / (1.0 + fd.abs()));
    }
    assert!(worst < 1e-6, "node gradient off by {worst:e}");
    // A few coordinates of every adjacency and graph-convolution parameter.
    for (name, var) in &vars {
        let g =
            grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let p0 = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for i in (0..p0.len()).step_by((p0.len() / 3).max(1)) {
            let at = |d: f64| {
                let mut others: Vec<(String, Var)> = vars.clone();
                let mut p = p0.clone();
                p[i] += d;
                let t = Tensor::from_vec(p, var.as_tensor().shape(), &Device::Cpu).unwrap();
                others.iter_mut().find(|(n, _)| n == name).unwrap().1 =
                    Var::from_tensor(&t).unwrap();
                value(&params_of(&others), nodes.as_tensor())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let err = (fd - g[i]).abs() / (1.0 + fd.abs());
            assert!(err < 1e-6, "{name}[{i}]: autograd {} vs finite differences {fd}", g[i]);
        }
    }
}

#[test]
fn the_adjacency_is_a_row_softmax_with_an_empty_diagonal() {
    let (net, vars) = small_graph();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let nodes = normal(&mut rng, &[2, 5, 6]);
    let mut mode = GraphMode { bn: BnMode::Batch(None), dropout: None };
    let a = net.adjacency(&params_of(&vars), &nodes, 0, &mut mode).unwrap();
    let rows = a.sum(2).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-12), "rows sum to {rows:?}");
    let a = a.to_vec3::<f64>().unwrap();
    for g in &a {
        for (i, row) in g.iter().enumerate() {
            assert_eq!(row[i], 0.0, "a node attends to itself");
            assert!(row.iter().enumerate().all(|(j, &v)| j == i || v > 0.0));
        }
    }
}

/// A GNN learner on the official Omniglot net, on 28×28 inputs.
fn learner(ways: usize, seed: u64) -> Gnn {
    let backbone = BackboneConfig::GnnOmniglot(GnnEmbeddingConfig::omniglot(1));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Gnn::new(GnnConfig::omniglot(ways), &backbone, 28, &mut rng, &Device::Cpu).unwrap()
}

fn images(rng: &mut ChaCha8Rng, n: usize) -> Tensor {
    normal(rng, &[n, 1, 28, 28]).to_dtype(DType::F32).unwrap()
}

fn logits(net: &Gnn, support: &Tensor, labels: &[u32], query: &Tensor) -> Vec<Vec<f32>> {
    net.adapt(support, labels, 3).unwrap().logits(query).unwrap().to_vec2::<f32>().unwrap()
}

fn close(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn permuting_the_support_nodes_leaves_the_query_logits_unchanged() {
    let net = learner(3, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let support = images(&mut rng, 6);
    let query = images(&mut rng, 4);
    let labels = [0, 0, 1, 1, 2, 2];
    let base = logits(&net, &support, &labels, &query);
    let order = [4usize, 1, 5, 0, 3, 2];
    let idx = Tensor::new(order.map(|i| i as u32).as_slice(), &Device::Cpu).unwrap();
    let permuted = support.index_select(&idx, 0).unwrap();
    let permuted_labels: Vec<u32> = order.iter().map(|&i| labels[i]).collect();
    let other = logits(&net, &permuted, &permuted_labels, &query);
    assert!(close(&base, &other) < 1e-4, "{base:?} vs {other:?}");
}

#[test]
fn unlabelled_support_images_are_nodes_whose_labels_are_never_read() {
    let net = learner(3, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let labelled = images(&mut rng, 3);
    let unlabelled = images(&mut rng, 6);
    let query = images(&mut rng, 2);
    let support = Tensor::cat(&[&labelled, &unlabelled], 0).unwrap();
    let with = logits(&net, &support, &[0, 1, 2], &query);
    let without = logits(&net, &labelled, &[0, 1, 2], &query);
    assert!(close(&with, &without) > 1e-4, "the unlabelled nodes change nothing");
    // Reordering the unlabelled images (which would carry their classes if any leaked) changes
    // nothing; giving them labels does.
    let idx = Tensor::new(&[5u32, 3, 4, 0, 2, 1], &Device::Cpu).unwrap();
    let shuffled =
        Tensor::cat(&[&labelled, &unlabelled.index_select(&idx, 0).unwrap()], 0).unwrap();
    assert!(close(&with, &logits(&net, &shuffled, &[0, 1, 2], &query)) < 1e-4);
    let leaked = logits(&net, &support, &[0, 1, 2, 0, 0, 1, 1, 2, 2], &query);
    assert!(close(&with, &leaked) > 1e-3, "labelled and unlabelled nodes look alike");
}

#[test]
fn the_training_loss_never_reads_the_classes_of_unlabelled_images() {
    use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
    let backbone = BackboneConfig::GnnOmniglot(GnnEmbeddingConfig::omniglot(1));
    let config = GnnConfig { last_adjacency_dropout: 0.0, ..GnnConfig::omniglot(3) };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut net = Gnn::new(config, &backbone, 28, &mut rng, &Device::Cpu).unwrap();
    let set = common::synthetic_set(10, 1, 12, 28, 1);
    let spec = EpisodeSpec::new(3, 1, 1).with_unlabelled(2);
    let sampler = EpisodeSampler::new(&set, spec, Grouping::Any).unwrap();
    let episodes: Vec<_> = (0..4).map(|i| sampler.episode(0, i, &Device::Cpu).unwrap()).collect();
    let loss = |net: &mut Gnn, episodes: &[kshot::data::Episode]| -> f32 {
        let mut draw = ChaCha8Rng::seed_from_u64(9);
        net.batch_loss(episodes, &mut draw).unwrap().loss.to_scalar::<f32>().unwrap()
    };
    let base = loss(&mut net, &episodes);
    // The unlabelled images are label-major; reversing them pairs every class's images with
    // another class's position. A learner that read classes from positions would see it.
    let reversed: Vec<_> = episodes
        .iter()
        .map(|ep| {
            let u = ep.unlabelled.as_ref().unwrap();
            let idx = Tensor::new(&[5u32, 4, 3, 2, 1, 0], &Device::Cpu).unwrap();
            kshot::data::Episode {
                unlabelled: Some(u.index_select(&idx, 0).unwrap()),
                ..ep.clone()
            }
        })
        .collect();
    let other = loss(&mut net, &reversed);
    assert!((base - other).abs() < 1e-5 * base.abs().max(1.0), "{base} vs {other}");
    // Dropping the unlabelled images does change the loss: they are read, as nodes.
    let bare: Vec<_> =
        episodes.iter().map(|ep| kshot::data::Episode { unlabelled: None, ..ep.clone() }).collect();
    assert!((base - loss(&mut net, &bare)).abs() > 1e-6);
}

#[test]
fn every_query_graph_holds_its_own_episodes_support() {
    use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
    use kshot::methods::TrainGraphs;
    let backbone_config = BackboneConfig::GnnOmniglot(GnnEmbeddingConfig::omniglot(1));
    let config = GnnConfig {
        last_adjacency_dropout: 0.0,
        train_graphs: TrainGraphs::EveryQuery,
        ..GnnConfig::omniglot(3)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut net = Gnn::new(config, &backbone_config, 28, &mut rng, &Device::Cpu).unwrap();
    let set = common::synthetic_set(10, 1, 12, 28, 1);
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(3, 1, 2), Grouping::Any).unwrap();
    let episodes: Vec<_> = (0..3).map(|i| sampler.episode(0, i, &Device::Cpu).unwrap()).collect();
    let out = net.batch_loss(&episodes, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    // The reference builds each of the 18 graphs by hand from the same embedded batch (all
    // queries, then every episode's support once): node 0 its query, then its episode's support.
    let mut images: Vec<Tensor> = episodes.iter().map(|ep| ep.query.clone()).collect();
    images.extend(episodes.iter().map(|ep| ep.support.clone()));
    let images = Tensor::cat(&images, 0).unwrap();
    let params = net.state().params.values();
    let backbone = backbone_config.build();
    let emb = backbone.forward_train(&params, &images, None, &mut rng).unwrap();
    let n_query = 6;
    let (mut graphs, mut targets) = (Vec::new(), Vec::new());
    for (e, ep) in episodes.iter().enumerate() {
        let support = emb.narrow(0, 3 * n_query + 3 * e, 3).unwrap();
        let labels = kshot::nn::ops::one_hot(&ep.support_labels, 3, &Device::Cpu).unwrap();
        let support = Tensor::cat(&[&support, &labels], 1).unwrap();
        for q in 0..n_query {
            let query = emb.narrow(0, e * n_query + q, 1).unwrap();
            let query = Tensor::cat(
                &[&query, &Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap()],
                1,
            )
            .unwrap();
            graphs.push(Tensor::cat(&[&query, &support], 0).unwrap());
            targets.push(ep.query_labels[q]);
        }
    }
    let nodes = Tensor::stack(&graphs, 0).unwrap();
    let mut mode = GraphMode { bn: BnMode::Batch(None), dropout: None };
    let logits = net.graph().forward(&params, &nodes, &mut mode).unwrap();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let expected =
        kshot::nn::ops::cross_entropy(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
    let got = out.loss.to_scalar::<f32>().unwrap();
    assert!((got - expected).abs() < 1e-5 * expected.abs().max(1.0), "{got} vs {expected}");
    // The default, as the code: one graph per episode.
    net.config.train_graphs = TrainGraphs::OneQuery;
    let one = net.batch_loss(&episodes, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    assert!((one.loss.to_scalar::<f32>().unwrap() - got).abs() > 1e-6);
}

#[test]
fn semi_supervised_episodes_carry_no_labels_for_their_unlabelled_images() {
    use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
    let set = common::synthetic_set(10, 1, 12, 8, 1);
    let spec = EpisodeSpec::new(4, 1, 2).with_unlabelled(3);
    let sampler = EpisodeSampler::new(&set, spec, Grouping::Any).unwrap();
    let ep = sampler.episode(0, 0, &Device::Cpu).unwrap();
    assert_eq!(ep.support_labels.len(), 4);
    assert_eq!(ep.unlabelled.as_ref().unwrap().dims()[0], 12);
    let draw = sampler.draw(0, 0);
    // Unlabelled images are the episode's classes, disjoint from its support and query images.
    for (k, &(class, image)) in draw.unlabelled.iter().enumerate() {
        assert_eq!(class, draw.classes[k / 3]);
        assert!(!draw.support.contains(&(class, image)) && !draw.query.contains(&(class, image)));
    }
    // The supervised draw is unchanged by the option (the same seed draws the same episode).
    let plain = EpisodeSampler::new(&set, EpisodeSpec::new(4, 1, 2), Grouping::Any).unwrap();
    assert_eq!(plain.draw(0, 0).classes, draw.classes);
}

#[test]
fn running_statistics_cover_the_embedding_and_the_graph() {
    let net = learner(5, 0);
    let running: &RunningStats = &net.state().running;
    let names: Vec<&str> = running.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(&names[..5], &["bn0", "bn1", "bn2", "bn3", "bn4"]);
    assert!(names.contains(&"gnn.adj_out.bn3") && names.contains(&"gnn.conv_out.bn"));
}

/// GNN on a small Conv4 (any backbone is a value the method is given), 12×12 synthetic images.
fn small_config(episodes: u64, unlabelled: usize) -> kshot::config::RunConfig {
    let mut c = kshot::presets::default_config();
    common::set_method(&mut c, "gnn");
    c.data.image_size = 12;
    c.train = kshot::data::EpisodeSpec::new(5, 1, 1).with_unlabelled(unlabelled);
    c.test = kshot::data::EpisodeSpec::new(5, 1, 5).with_unlabelled(unlabelled);
    c.meta_batch = 16;
    c.episodes = episodes;
    c.seed = 5;
    c.validation = None;
    c.checkpoint_every = 2;
    common::conv4(&mut c).hidden = 16;
    common::conv4(&mut c).blocks = 2;
    // The GNN learns nothing until its adjacencies start to separate classes, then fast; a
    // larger step than the papers' 1e-3 gets a short run past that plateau.
    c.schedule.lr = 3e-3;
    c.schedule.step = 0;
    settings!(c, Gnn).ways = 5;
    settings!(c, Gnn).growth = 16;
    c
}

/// A short seeded run on 30 synthetic classes, scored on 20 others: 5-way 1-shot accuracy
/// before and after, and the trained learner. (Semi-supervised training takes the same path with
/// `EpisodeSpec::unlabelled` set; `a_gnn_run_resumes_exactly` runs it.)
fn short_run(config: &kshot::config::RunConfig, tag: &str) -> (f64, f64, Box<dyn Learner>) {
    use kshot::data::{EpisodeSampler, Grouping};
    let train_set = common::noisy_synthetic_set(30, 1, 10, 12, 5, 0.1);
    let test_set = common::noisy_synthetic_set(20, 1, 10, 12, 99, 0.1);
    let tmp = common::tempdir(&format!("gnn-{tag}"));
    let dir = tmp.path().join("run");
    let sampler = EpisodeSampler::new(&test_set, config.test, Grouping::Any).unwrap();
    let untrained = kshot::train::new_learner(config).unwrap();
    let before = kshot::eval::evaluate(untrained.as_ref(), &sampler, 40, 0, |_| {}).unwrap();
    kshot::train::train(&dir, config, &train_set, None, false, &AtomicBool::new(false), |s| {
        if s.episode % 50 == 0 {
            eprintln!("{tag} step {}: loss {:.4} acc {:.3}", s.episode, s.loss, s.accuracy);
        }
    })
    .unwrap();
    let (_, learner) = kshot::train::load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 40, 0, |_| {}).unwrap();
    eprintln!(
        "{tag}: 5-way 1-shot held-out accuracy {:.3} → {:.3}",
        before.accuracy, after.accuracy
    );
    if let Some(l) = after.labelled_only {
        eprintln!("{tag}: without the unlabelled images {:.3}", l.accuracy);
    }
    (before.accuracy, after.accuracy, learner)
}

#[test]
fn a_short_seeded_run_learns_held_out_classes_and_reads_the_labels() {
    use kshot::data::{EpisodeSampler, Grouping};
    let config = small_config(250, 0);
    let (before, after, learner) = short_run(&config, "supervised");
    assert!(after > 0.6 && after > before + 0.2, "5-way accuracy {before} → {after} (chance 0.2)");
    // Relabelling the support relabels the predictions. The GNN reads labels through learned
    // weights, so its logits are not exactly permuted (unlike ProtoNet's); its decisions are.
    let test_set = common::noisy_synthetic_set(20, 1, 10, 12, 99, 0.1);
    let sampler = EpisodeSampler::new(&test_set, config.test, Grouping::Any).unwrap();
    let perm = [2u32, 0, 3, 4, 1];
    let (mut agree, mut total) = (0, 0);
    for i in 0..20 {
        let ep = sampler.episode(1, i, &Device::Cpu).unwrap();
        let relabelled: Vec<u32> = ep.support_labels.iter().map(|&l| perm[l as usize]).collect();
        let predict = |labels: &[u32]| -> Vec<u32> {
            let logits = learner.adapt(&ep.support, labels, 5).unwrap().logits(&ep.query).unwrap();
            logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
        };
        for (a, b) in predict(&ep.support_labels).iter().zip(predict(&relabelled)) {
            agree += usize::from(perm[*a as usize] == b);
            total += 1;
        }
    }
    let share = agree as f64 / total as f64;
    assert!(share > 0.9, "only {share:.2} of predictions follow the relabelling");
    // Semi-supervised episodes: the unlabelled images are extra nodes, and evaluation also scores
    // the same episodes from their labelled images alone.
    let semi =
        EpisodeSampler::new(&test_set, config.test.with_unlabelled(2), Grouping::Any).unwrap();
    let report = kshot::eval::evaluate(learner.as_ref(), &semi, 20, 0, |_| {}).unwrap();
    let labelled = report.labelled_only.expect("a labelled-only score");
    eprintln!(
        "with 2 unlabelled per class {:.3}, labelled only {:.3}",
        report.accuracy, labelled.accuracy
    );
    assert!(report.accuracy > 0.5 && labelled.accuracy > 0.5);
    assert!(report.accuracy != labelled.accuracy, "the unlabelled nodes change nothing");
}

#[test]
fn other_methods_refuse_unlabelled_images() {
    let mut c = small_config(1, 2);
    common::set_method(&mut c, "protonet");
    let err =
        kshot::train::new_learner(&c).err().expect("protonet with unlabelled images").to_string();
    assert!(err.contains("unlabelled"), "{err}");
}

#[test]
fn a_gnn_run_resumes_exactly() {
    let set = common::synthetic_set(20, 1, 10, 12, 5);
    let no_stop = AtomicBool::new(false);
    let full = small_config(4, 1);
    let tmp = common::tempdir("gnn-resume");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let mut first_part = full.clone();
    first_part.episodes = 2;
    kshot::train::train(&straight, &full, &set, None, false, &no_stop, |_| {}).unwrap();
    kshot::train::train(&split, &first_part, &set, None, false, &no_stop, |_| {}).unwrap();
    let mut config =
        kshot::config::RunConfig::load(&split.join(kshot::train::CONFIG_FILE)).unwrap();
    config.episodes = 4;
    kshot::train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    assert_eq!(common::model_tensors(&straight), common::model_tensors(&split));
}
