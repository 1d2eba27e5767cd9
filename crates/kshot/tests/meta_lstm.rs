//! Meta-LSTM: the preprocessing and gate arithmetic on hand-computed values, the documented first-
//! order meta-gradient (the learner's gradients are inputs, not differentiated through), and
//! learning on synthetic data.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Result, Tensor, Var};
use kshot::data::{Episode, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::methods::meta_lstm::{cell_update, gate, preprocess};
use kshot::methods::{Learner, MetaLstm, MetaLstmConfig};
use kshot::nn::{Conv4Config, Params};
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
    assert!((want[0][0] - -0.069_314_718_056).abs() < 1e-12 && (want[2][1] - -0.440_529_3).abs() < 1e-6);
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
    assert!((g[0] - 0.524_979_187_478_940).abs() < 1e-12 && (g[1] - sigma(-1.4)).abs() < 1e-12, "{g:?}");
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
    let config = MetaLstmConfig { ways: 2, inner_steps: 2, inner_steps_test: 2, hidden: 4, preprocess_p: 10.0 };
    let backbone = Conv4Config { hidden: 3, blocks: 1, ..Conv4Config::new(1) };
    let net = MetaLstm::new(config, backbone, (6, 6), &mut ChaCha8Rng::seed_from_u64(5), &Device::Cpu)?;
    let mut meta = Params::new();
    for (name, t) in net.params().detached_values().iter() {
        let t = if name == "gate_i.bias" { t.ones_like()?.neg()? } else { t.clone() };
        meta.insert(name.clone(), t.to_dtype(DType::F64)?);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let ep = Episode {
        spec: EpisodeSpec::new(2, 2, 2),
        classes: vec![0, 1],
        support: normal(&mut rng, &[4, 1, 6, 6])?,
        support_labels: vec![0, 0, 1, 1],
        query: normal(&mut rng, &[4, 1, 6, 6])?,
        query_labels: vec![0, 0, 1, 1],
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

/// The meta-gradient is the exact derivative of the query loss with the learner's losses and
/// gradients held at their values (central differences of that function agree to 1e-6), and not
/// the derivative of the full unrolled loss, whose second-derivative terms it drops by design.
#[test]
fn meta_gradient_is_first_order_in_the_learner_gradients() -> Result<()> {
    let (net, meta, ep) = tiny()?;
    let mut vars = Vec::new();
    let mut at = Params::new();
    for (name, t) in meta.iter() {
        let v = Var::from_tensor(t)?;
        at.insert(name.clone(), v.as_tensor().clone());
        vars.push((name.clone(), v));
    }
    let (loss, _, seen) = net.query_loss(&at, &ep, 2, None)?;
    let store = loss.backward()?;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut dir = Params::new();
    let mut analytic = 0.0;
    for (name, v) in &vars {
        let d = normal(&mut rng, v.dims())?;
        let g = store.get(v.as_tensor()).expect("every meta-parameter gets a gradient");
        analytic += (g * &d)?.sum_all()?.to_scalar::<f64>()?;
        dir.insert(name.clone(), d);
    }
    let value = |p: &Params, frozen: bool| -> Result<f64> {
        net.query_loss(p, &ep, 2, if frozen { Some(&seen) } else { None })?.0.to_scalar::<f64>()
    };
    let h = 1e-6;
    let fd = |frozen: bool| -> Result<f64> {
        Ok((value(&shifted(&meta, &dir, h)?, frozen)? - value(&shifted(&meta, &dir, -h)?, frozen)?) / (2.0 * h))
    };
    let (frozen_fd, full_fd) = (fd(true)?, fd(false)?);
    let rel = |x: f64| (x - analytic).abs() / analytic.abs().max(1e-3);
    assert!(rel(frozen_fd) < 1e-6, "analytic {analytic} vs frozen-input finite differences {frozen_fd}");
    assert!(
        rel(full_fd) > 1e-3,
        "analytic {analytic} matches the full second-order derivative {full_fd}: the learner gradients are not detached"
    );
    Ok(())
}

#[test]
fn meta_lstm_learns_held_out_synthetic_classes() {
    let train_set = common::synthetic_set(40, 1, 20, 12, 5);
    let test_set = common::synthetic_set(20, 1, 10, 12, 99);
    let tmp = common::tempdir("metalstm");
    let dir = tmp.path().join("run");
    let mut config = kshot::presets::find("meta-lstm-omniglot-5w1s").unwrap().build.clone()();
    config.data.image_size = 12;
    config.backbone.hidden = 8;
    config.backbone.blocks = 2;
    config.train = EpisodeSpec::new(5, 1, 5);
    config.meta_lstm.inner_steps = 5;
    config.meta_lstm.inner_steps_test = 5;
    config.episodes = 100;
    config.seed = 4;
    config.schedule.lr = 1e-2;
    config.checkpoint_every = 100;
    let sampler = EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 5), Grouping::Any).unwrap();
    let untrained = train::new_learner(&config).unwrap();
    let before = kshot::eval::evaluate(untrained.as_ref(), &sampler, 30, 0, |_| {}).unwrap().accuracy;
    let started = std::time::Instant::now();
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = kshot::eval::evaluate(learner.as_ref(), &sampler, 30, 0, |_| {}).unwrap().accuracy;
    eprintln!(
        "meta-lstm synthetic 5-way 1-shot: {before:.3} before, {after:.3} after {} episodes ({seconds:.1} s)",
        config.episodes
    );
    assert!(after > 0.6 && after > before + 0.2, "5-way accuracy {after} (chance 0.2; untrained {before})");
}
