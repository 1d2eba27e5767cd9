//! Meta-LSTM: the preprocessing and gate arithmetic on hand-computed values, the fused kernel against
//! the candle-graph reference (c_T and the meta-gradient in f64), the documented first-order
//! meta-gradient (the learner's gradients are inputs, not differentiated through) on both paths,
//! gradient clipping, and learning on synthetic data.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Result, Tensor, Var};
use kshot::data::{Episode, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::methods::meta_lstm::{cell_update, gate, preprocess, StepInputs, TestBn};
use kshot::methods::{Learner, MetaLstm, MetaLstmConfig};
use kshot::nn::{ops, BackboneConfig, Conv4Config, Params};
use kshot::train;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

#[test]
fn preprocessing_matches_hand_computed_values() -> Result<()> {
    let x = Tensor::new(&[0.5f64, -3.0, -2e-5, 0.0, 1e-4], &Device::Cpu)?;
    let got = preprocess(&x, 10.0)?.to_vec2::<f64>()?;
    // |x| ≥ e^−10 ≈ 4.54e-5: (ln|x| / 10, sgn x); below it: (−1, e^10·x).
    let want = [
        [0.5f64.ln() / 10.0, 1.0],
        [3.0f64.ln() / 10.0, -1.0],
        [-1.0, -2e-5 * 10f64.exp()],
        [-1.0, 0.0],
        [1e-4f64.ln() / 10.0, 1.0],
    ];
    assert!(
        (want[0][0] - -0.069_314_718_056).abs() < 1e-12 && (want[2][1] - -0.440_529_3).abs() < 1e-6
    );
    for (g, w) in got.iter().zip(&want) {
        assert!((g[0] - w[0]).abs() < 1e-12 && (g[1] - w[1]).abs() < 1e-12, "{g:?} vs {w:?}");
    }
    Ok(())
}

#[test]
fn gates_and_cell_update_match_hand_computed_values() -> Result<()> {
    let dev = Device::Cpu;
    // z·w + b = 1·0.5 + 2·(−0.25) + 0.1 = 0.1 and −1·0.5 + 4·(−0.25) + 0.1 = −1.4.
    let z = Tensor::new(&[[1.0f64, 2.0], [-1.0, 4.0]], &dev)?;
    let w = Tensor::new(&[[0.5f64], [-0.25]], &dev)?;
    let b = Tensor::new(&[0.1f64], &dev)?;
    let g = gate(&z, &w, &b)?.flatten_all()?.to_vec1::<f64>()?;
    let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
    assert!(
        (g[0] - 0.524_979_187_478_940).abs() < 1e-12 && (g[1] - sigma(-1.4)).abs() < 1e-12,
        "{g:?}"
    );
    // c = f·c − i·∇ = 0.9·2 − 0.25·4 = 0.8 and 0.5·(−1) − 0.1·(−3) = −0.2.
    let c = Tensor::new(&[[2.0f64], [-1.0]], &dev)?;
    let grad = Tensor::new(&[[4.0f64], [-3.0]], &dev)?;
    let i = Tensor::new(&[[0.25f64], [0.1]], &dev)?;
    let f = Tensor::new(&[[0.9f64], [0.5]], &dev)?;
    let next = cell_update(&c, &grad, &i, &f)?.flatten_all()?.to_vec1::<f64>()?;
    assert!((next[0] - 0.8).abs() < 1e-12 && (next[1] - -0.2).abs() < 1e-12, "{next:?}");
    Ok(())
}

fn normal(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// A tiny Meta-LSTM in f64 (one conv block of 3 channels on 6×6 images, 2-way) and its meta-parameters,
/// with the input-gate bias raised so that the learner's updates are large.
fn tiny() -> Result<(MetaLstm, Params, Episode)> {
    kshot::autograd::init();
    let config = MetaLstmConfig {
        ways: 2,
        inner_steps: 2,
        inner_steps_test: 2,
        hidden: 4,
        ..MetaLstmConfig::default()
    };
    let backbone = Conv4Config { hidden: 3, blocks: 1, ..Conv4Config::new(1) };
    let net = MetaLstm::new(
        config,
        &BackboneConfig::Conv4(backbone),
        (6, 6),
        &mut ChaCha8Rng::seed_from_u64(5),
        &Device::Cpu,
    )?;
    let mut meta = Params::new();
    for (name, t) in net.params().detached_values().iter() {
        let t = if name == "gate_i.bias" { t.ones_like()?.neg()? } else { t.clone() };
        meta.insert(name.clone(), t.to_dtype(DType::F64)?);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let ep = Episode {
        spec: EpisodeSpec::new(2, 2, 2),
        index: 0,
        seed: 0,
        classes: vec![0, 1],
        support: normal(&mut rng, &[4, 1, 6, 6])?,
        support_labels: vec![0, 0, 1, 1],
        query: normal(&mut rng, &[4, 1, 6, 6])?,
        query_labels: vec![0, 0, 1, 1],
        unlabelled: None,
    };
    Ok((net, meta, ep))
}

fn shifted(meta: &Params, dir: &Params, h: f64) -> Result<Params> {
    let mut out = Params::new();
    for (name, t) in meta.iter() {
        out.insert(name.clone(), (t + (dir.get(name)? * h)?)?);
    }
    Ok(out)
}

/// Relative max-norm distance of `got` from `want`.
fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f64> {
    let (got, want) = (got.flatten_all()?, want.flatten_all()?);
    let diff = (&got - &want)?.abs()?.max(0)?.to_scalar::<f64>()?;
    Ok(diff / want.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-300))
}

/// The candle-graph meta-gradient of the reference implementation, by name, and the query loss.
fn reference_meta_gradient(
    net: &MetaLstm,
    meta: &Params,
    ep: &Episode,
    steps: usize,
) -> Result<(Params, f64)> {
    let mut at = Params::new();
    let mut vars = Vec::new();
    for (name, t) in meta.iter() {
        let v = Var::from_tensor(t)?;
        at.insert(name.clone(), v.as_tensor().clone());
        vars.push((name.clone(), v));
    }
    let (loss, _, _) = net.reference_query_loss(&at, ep, steps, None)?;
    let store = loss.backward()?;
    let mut grads = Params::new();
    for (name, v) in &vars {
        grads.insert(
            name.clone(),
            store.get(v.as_tensor()).expect("every meta-parameter gets a gradient").clone(),
        );
    }
    Ok((grads, loss.to_scalar::<f64>()?))
}

#[test]
fn fused_meta_gradient_equals_the_candle_graph() -> Result<()> {
    let (net, meta, ep) = tiny()?;
    for steps in 1..=3 {
        let (want, want_loss) = reference_meta_gradient(&net, &meta, &ep, steps)?;
        let got = net.meta_gradient(&meta, &ep, steps)?;
        assert!(
            (got.query_loss - want_loss).abs() < 1e-12 * want_loss,
            "{steps} steps: {} vs {want_loss}",
            got.query_loss
        );
        assert_eq!(got.grads.len(), meta.len());
        for (name, w) in want.iter() {
            let rel = rel_diff(got.grads.get(name)?, w)?;
            eprintln!("{steps} steps, {name}: relative difference {rel:.1e}");
            assert!(
                rel <= 1e-10,
                "{steps} steps, {name}: fused meta-gradient {rel:e} off the candle graph's"
            );
        }
    }
    Ok(())
}

#[test]
fn fused_unroll_equals_the_candle_graph() -> Result<()> {
    let (net, meta, ep) = tiny()?;
    let labels = ep.support_labels_tensor()?;
    for steps in 1..=3 {
        let (want, _) = net.reference_unroll(&meta, &ep.support, &labels, steps, None)?;
        let (got, _) = net.unroll(&meta, &ep.support, &labels, steps, None)?;
        let rel = rel_diff(&got, &want)?;
        assert!(rel <= 1e-12, "{steps} steps: fused c_T {rel:e} off the candle graph's");
    }
    // Replayed inputs across both branches of the preprocessing (|∇| below e^−10 ≈ 4.5e-5 included),
    // zero and a large loss.
    let n = net.learner_size();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let frozen: Vec<StepInputs> = [(1e-3, 0.7), (3e-5, 0.0), (10.0, 42.0), (1.0, 2e-6)]
        .iter()
        .map(|&(scale, loss)| {
            let g = (normal(&mut rng, &[n])? * scale)?;
            let mask = normal(&mut rng, &[n])?.ge(-1.5)?.to_dtype(DType::F64)?; // some exact zeros
            Ok(StepInputs { grad: (g * mask)?, loss })
        })
        .collect::<Result<_>>()?;
    let (want, _) =
        net.reference_unroll(&meta, &ep.support, &labels, frozen.len(), Some(&frozen))?;
    let (got, _) = net.unroll(&meta, &ep.support, &labels, frozen.len(), Some(&frozen))?;
    let rel = rel_diff(&got, &want)?;
    assert!(rel <= 1e-12, "replayed inputs: fused c_T {rel:e} off the candle graph's");
    Ok(())
}

/// Σ_k ⟨g_k, d_k⟩ over the meta-parameters, and the random direction d.
fn along_random_direction(grads: &Params, meta: &Params) -> Result<(f64, Params)> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut dir = Params::new();
    let mut dot = 0.0;
    for (name, t) in meta.iter() {
        let d = normal(&mut rng, t.dims())?;
        dot += (grads.get(name)? * &d)?.sum_all()?.to_scalar::<f64>()?;
        dir.insert(name.clone(), d);
    }
    Ok((dot, dir))
}

/// Checks `analytic` (the meta-gradient along `dir`) against central differences of `value` with
/// the learner's inputs frozen (must agree to 1e-6) and recomputed (must not: that derivative has
/// the second-order terms the meta-gradient drops by design).
fn check_first_order(
    analytic: f64,
    meta: &Params,
    dir: &Params,
    value: impl Fn(&Params, bool) -> Result<f64>,
) -> Result<()> {
    let h = 1e-6;
    let fd = |frozen: bool| -> Result<f64> {
        Ok((value(&shifted(meta, dir, h)?, frozen)? - value(&shifted(meta, dir, -h)?, frozen)?)
            / (2.0 * h))
    };
    let (frozen_fd, full_fd) = (fd(true)?, fd(false)?);
    let rel = |x: f64| (x - analytic).abs() / analytic.abs().max(1e-3);
    assert!(
        rel(frozen_fd) < 1e-6,
        "analytic {analytic} vs frozen-input finite differences {frozen_fd}"
    );
    assert!(
        rel(full_fd) > 1e-3,
        "analytic {analytic} matches the full second-order derivative {full_fd}: the learner gradients are not detached"
    );
    Ok(())
}

/// The meta-gradient is the exact derivative of the query loss with the learner's losses and
/// gradients held at their values (central differences of that function agree to 1e-6), and not
/// the derivative of the full unrolled loss, whose second-derivative terms it drops by design.
#[test]
fn meta_gradient_is_first_order_in_the_learner_gradients() -> Result<()> {
    let (net, meta, ep) = tiny()?;
    let (support_labels, query_labels) = (ep.support_labels_tensor()?, ep.query_labels_tensor()?);

    // The fused kernel.
    let (analytic, dir) = along_random_direction(&net.meta_gradient(&meta, &ep, 2)?.grads, &meta)?;
    let (_, seen) = net.unroll(&meta, &ep.support, &support_labels, 2, None)?;
    check_first_order(analytic, &meta, &dir, |p, frozen| {
        let (c, _) = net.unroll(
            p,
            &ep.support,
            &support_labels,
            2,
            if frozen { Some(&seen) } else { None },
        )?;
        ops::cross_entropy(&net.logits(&c, &ep.query)?, &query_labels)?.to_scalar::<f64>()
    })?;

    // The candle-graph reference.
    let (grads, _) = reference_meta_gradient(&net, &meta, &ep, 2)?;
    let (analytic, dir) = along_random_direction(&grads, &meta)?;
    let (_, _, seen) = net.reference_query_loss(&meta, &ep, 2, None)?;
    check_first_order(analytic, &meta, &dir, |p, frozen| {
        net.reference_query_loss(p, &ep, 2, if frozen { Some(&seen) } else { None })?
            .0
            .to_scalar::<f64>()
    })
}

/// A learner of more coordinates than one chunk of the kernel, an f32 and an f64 copy of its
/// meta-parameters, and an episode in each precision.
fn two_chunks() -> Result<(MetaLstm, [(Params, Episode); 2])> {
    kshot::autograd::init();
    let config = MetaLstmConfig {
        ways: 2,
        inner_steps: 3,
        inner_steps_test: 3,
        hidden: 5,
        ..MetaLstmConfig::default()
    };
    let backbone = Conv4Config { hidden: 12, blocks: 2, ..Conv4Config::new(1) };
    let net = MetaLstm::new(
        config,
        &BackboneConfig::Conv4(backbone),
        (12, 12),
        &mut ChaCha8Rng::seed_from_u64(6),
        &Device::Cpu,
    )?;
    assert!(net.learner_size() > 1500, "{} coordinates", net.learner_size());
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (support, query) = (normal(&mut rng, &[4, 1, 12, 12])?, normal(&mut rng, &[4, 1, 12, 12])?);
    let at = |dtype: DType| -> Result<(Params, Episode)> {
        let mut meta = Params::new();
        for (name, t) in net.params().detached_values().iter() {
            let t = if name == "gate_i.bias" { t.ones_like()?.neg()? } else { t.clone() };
            meta.insert(name.clone(), t.to_dtype(dtype)?);
        }
        let ep = Episode {
            spec: EpisodeSpec::new(2, 2, 2),
            index: 0,
            seed: 0,
            classes: vec![0, 1],
            support: support.to_dtype(dtype)?,
            support_labels: vec![0, 1, 0, 1],
            query: query.to_dtype(dtype)?,
            query_labels: vec![1, 0, 0, 1],
            unlabelled: None,
        };
        Ok((meta, ep))
    };
    let pair = [at(DType::F32)?, at(DType::F64)?];
    Ok((net, pair))
}

#[test]
fn fused_meta_gradient_in_f32_follows_f64_and_ignores_the_thread_count() -> Result<()> {
    let (net, [(meta32, ep32), (meta64, ep64)]) = two_chunks()?;
    let exact = net.meta_gradient(&meta64, &ep64, 3)?;
    let on = |threads: usize| {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
        pool.install(|| net.meta_gradient(&meta32, &ep32, 3))
    };
    let (one, three) = (on(1)?, on(3)?);
    for (name, want) in exact.grads.iter() {
        let (a, b) = (one.grads.get(name)?, three.grads.get(name)?);
        assert_eq!(
            a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
            "{name}: depends on the thread count"
        );
        let rel = rel_diff(&a.to_dtype(DType::F64)?, want)?;
        eprintln!("{name}: f32 {rel:.1e} off f64");
        assert!(rel < 1e-4, "{name}: f32 meta-gradient {rel:e} off the f64 one");
    }
    assert!(
        (one.query_loss - exact.query_loss).abs() < 1e-5,
        "{} vs {}",
        one.query_loss,
        exact.query_loss
    );
    Ok(())
}

#[test]
fn training_loss_has_the_clipped_meta_gradient() -> Result<()> {
    let (mut net, [(_, ep), _]) = two_chunks()?;
    let meta = net.params().detached_values();
    let want = net.meta_gradient(&meta, &ep, net.config.inner_steps)?;
    let norm = |g: &dyn Fn(&str) -> Result<Tensor>| -> Result<f64> {
        let mut s = 0.0;
        for (name, _) in meta.iter() {
            s += g(name)?.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    };
    let full = norm(&|n| Ok(want.grads.get(n)?.clone()))?;
    net.config.grad_clip = full / 4.0;
    let out = net.episode_loss(&ep)?;
    assert!((out.loss.to_scalar::<f32>()? as f64 - want.query_loss).abs() < 1e-6);
    let store = out.loss.backward()?;
    let vars: Vec<(String, Var)> =
        net.params().iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
    let got = |name: &str| -> Result<Tensor> {
        let (_, v) = vars.iter().find(|(n, _)| n == name).expect("a parameter");
        Ok(store.get(v.as_tensor()).expect("a gradient").clone())
    };
    let clipped = norm(&got)?;
    assert!((clipped - full / 4.0).abs() < 1e-4 * full, "clipped norm {clipped} vs {}", full / 4.0);
    for (name, w) in want.grads.iter() {
        let rel = rel_diff(&(got(name)? * 4.0)?.to_dtype(DType::F64)?, &w.to_dtype(DType::F64)?)?;
        assert!(
            rel < 1e-4,
            "{name}: the clipped gradient is not the meta-gradient scaled ({rel:e})"
        );
    }
    Ok(())
}

#[test]
fn meta_lstm_learns_held_out_synthetic_classes() {
    let train_set = common::synthetic_set(40, 1, 20, 12, 5);
    let test_set = common::synthetic_set(20, 1, 10, 12, 99);
    let tmp = common::tempdir("metalstm");
    let dir = tmp.path().join("run");
    let mut config = kshot::presets::config("meta-lstm-omniglot-5w1s").unwrap();
    config.data.image_size = 12;
    common::conv4(&mut config).hidden = 8;
    common::conv4(&mut config).blocks = 2;
    config.train = EpisodeSpec::new(5, 1, 5);
    settings!(config, MetaLstm).inner_steps = 5;
    settings!(config, MetaLstm).inner_steps_test = 5;
    config.episodes = 100;
    config.seed = 4;
    config.schedule.lr = 1e-2;
    config.checkpoint_every = 100;
    let sampler = EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 5), Grouping::Any).unwrap();
    let untrained = train::new_learner(&config).unwrap();
    let before =
        kshot::eval::evaluate(untrained.as_ref(), &sampler, 30, 0, |_| {}).unwrap().accuracy;
    let started = std::time::Instant::now();
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 30, 0, |_| {}).unwrap().accuracy;
    eprintln!(
        "meta-lstm synthetic 5-way 1-shot: {before:.3} before, {after:.3} after {} episodes ({seconds:.1} s)",
        config.episodes
    );
    assert!(
        after > 0.6 && after > before + 0.2,
        "5-way accuracy {after} (chance 0.2; untrained {before})"
    );
}

/// The run stopped after 3 of 5 episodes and resumed equals the uninterrupted run, bit for bit.
#[test]
fn resume_continues_exactly() {
    let set = common::synthetic_set(20, 1, 12, 12, 5);
    let no_stop = AtomicBool::new(false);
    let mut config = kshot::presets::config("meta-lstm-omniglot-5w1s").unwrap();
    config.data.image_size = 12;
    common::conv4(&mut config).hidden = 6;
    common::conv4(&mut config).blocks = 2;
    config.train = EpisodeSpec::new(5, 1, 3);
    settings!(config, MetaLstm).inner_steps = 3;
    config.episodes = 5;
    config.seed = 2;
    config.checkpoint_every = 2;
    let tmp = common::tempdir("metalstm-resume");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    train::train(&straight, &config, &set, None, false, &no_stop, |_| {}).unwrap();
    let mut first = config.clone();
    first.episodes = 3;
    train::train(&split, &first, &set, None, false, &no_stop, |_| {}).unwrap();
    train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    assert_eq!(
        common::model_tensors(&straight),
        common::model_tensors(&split),
        "resumed Meta-LSTM run differs from the uninterrupted one"
    );
}

/// A Meta-LSTM with the official settings (test-time batch norm from the support steps' running
/// statistics) over a 2-block Conv4 on 8×8 images, its parameters drawn from `seed`.
fn small(config: MetaLstmConfig, seed: u64) -> MetaLstm {
    let backbone =
        Conv4Config { hidden: 4, blocks: 2, bn_eps: 1e-3, bn_momentum: 0.9, ..Conv4Config::new(1) };
    MetaLstm::new(
        config,
        &BackboneConfig::Conv4(backbone),
        (8, 8),
        &mut ChaCha8Rng::seed_from_u64(seed),
        &Device::Cpu,
    )
    .unwrap()
}

fn normal_f32(rng: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    normal(rng, dims).unwrap().to_dtype(DType::F32).unwrap()
}

/// The rows of `logits` [M, ways] as f64 vectors.
fn rows(logits: &Tensor) -> Vec<Vec<f64>> {
    logits.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

fn max_row_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The official `evaluate` mode: a query's logits are the same whether it is scored with all the
/// queries, a subset of them, or a permuted superset. The older transductive scoring (query batch
/// statistics) fails the same check, so the check can tell the two apart.
#[test]
fn evaluation_does_not_depend_on_the_other_queries() {
    let config = MetaLstmConfig { inner_steps_test: 4, ..MetaLstmConfig::default() };
    assert_eq!(config.test_bn, TestBn::SupportRunning, "the official scoring is the default");
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let support = normal_f32(&mut rng, &[10, 1, 8, 8]);
    let labels: Vec<u32> = (0..10).map(|i| i % 5).collect();
    let queries = normal_f32(&mut rng, &[12, 1, 8, 8]);
    let extra = normal_f32(&mut rng, &[5, 1, 8, 8]);
    // Subset: queries 3, 7, 0; superset: the extra images interleaved, in another order.
    let subset_idx = [3u32, 7, 0];
    let subset = queries.index_select(&Tensor::new(&subset_idx, &Device::Cpu).unwrap(), 0).unwrap();
    let all = Tensor::cat(&[&extra, &queries], 0).unwrap();
    let order: Vec<u32> = (0..17u32).rev().collect();
    let superset =
        all.index_select(&Tensor::new(order.as_slice(), &Device::Cpu).unwrap(), 0).unwrap();
    // Row of query q (0..12) in the superset: position of 5 + q in the reversed order.
    let super_row = |q: usize| 16 - (5 + q);

    let check = |test_bn: TestBn| -> f64 {
        let net = small(MetaLstmConfig { test_bn, ..config }, 7);
        let classifier = net.adapt(&support, &labels, 5).unwrap();
        let full = rows(&classifier.logits(&queries).unwrap());
        let sub = rows(&classifier.logits(&subset).unwrap());
        let sup = rows(&classifier.logits(&superset).unwrap());
        let single = rows(&classifier.logits(&queries.narrow(0, 4, 1).unwrap()).unwrap());
        let mut worst = max_row_diff(&full[4], &single[0]);
        for (k, &q) in subset_idx.iter().enumerate() {
            worst = worst.max(max_row_diff(&full[q as usize], &sub[k]));
        }
        for (q, row) in full.iter().enumerate() {
            worst = worst.max(max_row_diff(row, &sup[super_row(q)]));
        }
        worst
    };
    let official = check(TestBn::SupportRunning);
    assert!(official <= 1e-6, "per-query logits moved by {official} when the query set changed");
    let transductive = check(TestBn::Batch);
    assert!(
        transductive > 1e-3,
        "query-batch statistics should make the logits depend on the other queries ({transductive})"
    );
}

/// The statistics come from the support steps: another support set, same queries, other logits;
/// and they are not the fresh (0, 1) statistics.
#[test]
fn evaluation_statistics_come_from_the_support_steps() {
    let net = small(MetaLstmConfig { inner_steps_test: 3, ..MetaLstmConfig::default() }, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let support = normal_f32(&mut rng, &[5, 1, 8, 8]);
    let queries = normal_f32(&mut rng, &[4, 1, 8, 8]);
    let labels = [0u32, 1, 2, 3, 4];
    let base = rows(&net.adapt(&support, &labels, 5).unwrap().logits(&queries).unwrap());
    // Scaling the support by 3 changes the batch statistics of every step (and so the running
    // averages); with batch norm the learner's gradients barely change.
    let scaled = (&support * 3.0).unwrap();
    let other = rows(&net.adapt(&scaled, &labels, 5).unwrap().logits(&queries).unwrap());
    let moved = base.iter().zip(&other).map(|(a, b)| max_row_diff(a, b)).fold(0.0, f64::max);
    assert!(moved > 1e-3, "query logits ignore the support statistics ({moved})");
}

/// The learner gradient enters the meta-learner as ∇(mean CE) / B (the official code's extra
/// `gradParameters:div(inputs:size(1))`), and older configs keep the undivided gradient.
#[test]
fn meta_learner_sees_the_mean_gradient_over_the_batch_size() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let support = normal_f32(&mut rng, &[5, 1, 8, 8]);
    let labels = Tensor::new(&[0u32, 1, 2, 3, 4], &Device::Cpu).unwrap();
    let inputs = |grad_over_batch: bool| {
        let net = small(MetaLstmConfig { grad_over_batch, ..MetaLstmConfig::default() }, 4);
        let meta = net.params().detached_values();
        let (_, seen) = net.unroll(&meta, &support, &labels, 1, None).unwrap();
        (seen[0].grad.to_dtype(DType::F64).unwrap(), seen[0].loss)
    };
    let (divided, loss_a) = inputs(true);
    let (plain, loss_b) = inputs(false);
    assert_eq!(loss_a, loss_b, "the loss input is the plain mean CE");
    let want = (plain / 5.0).unwrap();
    let diff =
        (&divided - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(scale > 0.0 && diff <= 1e-6 * scale, "∇/B off by {diff} (scale {scale})");
}

/// The official initialisation: layer 1 U(±0.01), forget bias U(4, 5), input bias U(−5, −4), the
/// learner's batch-norm scale U(0, 1).
#[test]
fn official_initialisation() {
    let net = small(MetaLstmConfig::default(), 11);
    let p = net.params().detached_values();
    let vals = |n: &str| {
        p.get(n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    for n in ["lstm.w_ih", "lstm.w_hh", "lstm.bias", "gate_i.weight", "gate_f.weight"] {
        assert!(vals(n).iter().all(|v| v.abs() <= 0.01), "{n} outside ±0.01");
    }
    let bf = vals("gate_f.bias")[0];
    let bi = vals("gate_i.bias")[0];
    assert!((4.0..5.0).contains(&bf) && (-5.0..-4.0).contains(&bi), "bF {bf}, bI {bi}");
    let gamma: Vec<f64> =
        ["learner.bn0.weight", "learner.bn1.weight"].iter().flat_map(|n| vals(n)).collect();
    assert!(gamma.iter().all(|g| (0.0..1.0).contains(g)), "{gamma:?}");
    assert!(gamma.iter().any(|g| (g - gamma[0]).abs() > 1e-3), "BN scales are not drawn");
}

/// Configs written before these settings existed read as the old behaviour.
#[test]
fn old_configs_keep_the_old_meta_lstm_behaviour() {
    let old = serde_json::json!({
        "ways": 5, "inner_steps": 12, "inner_steps_test": 12, "hidden": 20, "preprocess_p": 10.0
    });
    let c: MetaLstmConfig = serde_json::from_value(old).unwrap();
    assert_eq!((c.test_bn, c.grad_over_batch, c.official_init), (TestBn::Batch, false, false));
    assert_eq!(c.grad_clip, 0.0);
}

#[test]
fn presets_follow_the_official_configs() {
    for (name, shots, steps, episodes, momentum) in [
        ("meta-lstm-miniimagenet-5w1s", 1, 12, 75_000, 0.9),
        ("meta-lstm-miniimagenet-5w5s", 5, 8, 50_000, 0.95),
        ("meta-lstm-omniglot-5w1s", 1, 12, 75_000, 0.9),
    ] {
        let mut c = kshot::presets::config(name).unwrap();
        let m = *settings!(c, MetaLstm);
        assert_eq!((m.inner_steps, m.inner_steps_test), (steps, steps), "{name}");
        assert_eq!((c.episodes, c.train.shots, c.test_episodes), (episodes, shots, 600), "{name}");
        assert_eq!(
            (m.test_bn, m.grad_over_batch, m.official_init),
            (TestBn::SupportRunning, true, true)
        );
        let conv4 = *common::conv4(&mut c);
        assert_eq!((conv4.bn_eps, conv4.bn_momentum, conv4.hidden), (1e-3, momentum, 32), "{name}");
    }
}
