//! MAML as cbfinn/maml computes it: the inner gradient of Σ CE / K (N × the mean), batch-norm
//! offsets meta-learned but not adapted, the meta-gradient clipped on the code's loss scale. The
//! inner step is checked against a step computed by hand, the meta-gradient against finite
//! differences in f64 (second order, with per-parameter step sizes).

use candle_core::{DType, Device, Result, Tensor, Var};
use kshot::data::{Episode, EpisodeSpec};
use kshot::methods::maml::InnerLoss;
use kshot::methods::{Learner, Maml, MamlConfig};
use kshot::nn::head::HeadInit;
use kshot::nn::{BackboneConfig, Conv4Config, ConvInit, Params, StridedConv4Config};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn normal(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// A 3-way 2-shot task with 2 queries per class on `size`×`size` images, in f64.
fn task(rng: &mut ChaCha8Rng, size: usize) -> Result<Episode> {
    Ok(Episode {
        spec: EpisodeSpec::new(3, 2, 2),
        index: 0,
        seed: 0,
        classes: vec![0, 1, 2],
        support: normal(rng, &[6, 1, size, size])?,
        support_labels: vec![0, 0, 1, 1, 2, 2],
        query: normal(rng, &[6, 1, size, size])?,
        query_labels: vec![0, 0, 1, 1, 2, 2],
        unlabelled: None,
    })
}

fn official(steps: usize) -> MamlConfig {
    MamlConfig {
        ways: 3,
        inner_steps: steps,
        inner_steps_test: steps,
        inner_lr: 0.4,
        inner_loss: InnerLoss::SumOverShots,
        adapt_batch_norm: false,
        head_init: HeadInit::Normal,
        ..MamlConfig::default()
    }
}

fn strided() -> BackboneConfig {
    BackboneConfig::Conv4Strided(StridedConv4Config {
        hidden: 4,
        ..StridedConv4Config::maml_omniglot(1)
    })
}

/// The network and its parameters in f64.
fn net(config: MamlConfig, backbone: &BackboneConfig, size: usize) -> Result<(Maml, Params)> {
    kshot::autograd::init();
    let net =
        Maml::new(config, backbone, (size, size), &mut ChaCha8Rng::seed_from_u64(7), &Device::Cpu)?;
    let mut theta = Params::new();
    for (name, t) in net.params().detached_values().iter() {
        theta.insert(name.clone(), t.to_dtype(DType::F64)?);
    }
    Ok((net, theta))
}

fn meta_loss(net: &Maml, theta: &Params, ep: &Episode) -> Result<f64> {
    let labels = ep.support_labels_tensor()?;
    let adapted = net.adapt_params(theta, &ep.support, &labels, net.config.inner_steps)?;
    let logits = net.logits(&adapted, &ep.query)?;
    kshot::nn::ops::cross_entropy(&logits, &ep.query_labels_tensor()?)?.to_scalar::<f64>()
}

fn shifted(theta: &Params, dir: &Params, h: f64) -> Result<Params> {
    let mut out = Params::new();
    for (name, t) in theta.iter() {
        out.insert(name.clone(), (t + (dir.get(name)? * h)?)?);
    }
    Ok(out)
}

fn dot(a: &Params, b: &Params) -> Result<f64> {
    let mut s = 0.0;
    for (name, t) in a.iter() {
        s += (t * b.get(name)?)?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(s)
}

/// A random direction in the parameters `keep` selects (zero elsewhere).
fn direction(theta: &Params, rng: &mut ChaCha8Rng, keep: impl Fn(&str) -> bool) -> Result<Params> {
    let mut dir = Params::new();
    for (name, t) in theta.iter() {
        let d = normal(rng, t.dims())?;
        dir.insert(name.clone(), if keep(name) { d } else { d.zeros_like()? });
    }
    Ok(dir)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_vec1::<f64>()
}

#[test]
fn the_inner_step_is_the_official_one_computed_by_hand() -> Result<()> {
    let size = 12;
    let (net, theta) = net(official(1), &strided(), size)?;
    let ep = task(&mut ChaCha8Rng::seed_from_u64(1), size)?;
    let labels = ep.support_labels_tensor()?;
    let phi = net.adapt_params(&theta, &ep.support, &labels, 1)?;

    // By hand: the official loss is Σ_i CE_i / K over the N·K support images; its gradient with
    // respect to the output bias is Σ_i (softmax(z_i) − onehot(y_i)) / K.
    let (k, alpha) = (2.0, 0.4);
    let logits = net.logits(&theta, &ep.support)?;
    let p = candle_nn_softmax(&logits)?;
    let mut grad_b = [0.0f64; 3];
    for (i, row) in p.to_vec2::<f64>()?.iter().enumerate() {
        for (c, &pc) in row.iter().enumerate() {
            let y = if ep.support_labels[i] as usize == c { 1.0 } else { 0.0 };
            grad_b[c] += (pc - y) / k;
        }
    }
    let b0 = values(theta.get("head.bias")?)?;
    let b1 = values(phi.get("head.bias")?)?;
    for c in 0..3 {
        let want = b0[c] - alpha * grad_b[c];
        assert!((b1[c] - want).abs() < 1e-12, "head.bias[{c}]: {} vs hand-computed {want}", b1[c]);
    }

    // Every adapted parameter: θ − α ∇(Σ CE / K), by candle's autograd of that very loss.
    let vars: Vec<(String, Var)> =
        theta.iter().map(|(n, t)| Ok((n.clone(), Var::from_tensor(t)?))).collect::<Result<_>>()?;
    let mut as_params = Params::new();
    for (n, v) in &vars {
        as_params.insert(n.clone(), v.as_tensor().clone());
    }
    let z = net.logits(&as_params, &ep.support)?;
    let log_p = candle_core::Tensor::log(&candle_nn_softmax(&z)?)?;
    let onehot = Tensor::from_vec(
        ep.support_labels
            .iter()
            .flat_map(|&y| (0..3).map(move |c| if c == y as usize { 1.0 } else { 0.0 }))
            .collect::<Vec<f64>>(),
        (6, 3),
        &Device::Cpu,
    )?;
    let official_loss = ((log_p * onehot)?.sum_all()?.neg()? / k)?;
    let grads = official_loss.backward()?;
    for (name, var) in &vars {
        let before = theta.get(name)?;
        let after = phi.get(name)?;
        if name.starts_with("bn") {
            let d = (after - before)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(d, 0.0, "{name} is a batch-norm offset: the inner loop must not adapt it");
            continue;
        }
        let g = grads.get(var.as_tensor()).expect("a gradient for every parameter");
        let want = (before - (g * alpha)?)?;
        let d = (after - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-3);
        assert!(d / scale < 1e-10, "{name}: adapted value off the official step by {d:e}");
    }

    // The same step is α·N on the mean loss.
    let mean = MamlConfig { inner_loss: InnerLoss::Mean, inner_lr: alpha * 3.0, ..official(1) };
    let (mean_net, _) = net_with(mean, size)?;
    let phi_mean = mean_net.adapt_params(&theta, &ep.support, &labels, 1)?;
    for (name, t) in phi.iter() {
        let d = (t - phi_mean.get(name)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "{name}: Σ CE / K with α differs from the mean with α·N by {d:e}");
    }
    Ok(())
}

fn net_with(config: MamlConfig, size: usize) -> Result<(Maml, Params)> {
    net(config, &strided(), size)
}

fn candle_nn_softmax(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(1)?;
    let e = z.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(1)?)
}

fn check_meta_gradient(
    backbone: &BackboneConfig,
    size: usize,
    steps: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ep = task(&mut rng, size)?;
    let (net, theta) = net(official(steps), backbone, size)?;
    let g = net.task_gradient(&theta, &ep, steps)?.grads;
    // All parameters, then the batch-norm offsets alone: they reach the query loss directly and
    // through every inner step's gradient, but are never stepped themselves.
    for keep in [&(|_: &str| true) as &dyn Fn(&str) -> bool, &|n: &str| n.starts_with("bn")] {
        for _ in 0..2 {
            let dir = direction(&theta, &mut rng, keep)?;
            let h = 1e-6;
            let fd = (meta_loss(&net, &shifted(&theta, &dir, h)?, &ep)?
                - meta_loss(&net, &shifted(&theta, &dir, -h)?, &ep)?)
                / (2.0 * h);
            let analytic = dot(&g, &dir)?;
            let err = (fd - analytic).abs() / analytic.abs().max(1e-3);
            assert!(
                err < 1e-6,
                "{} backbone, {steps} steps: directional meta-derivative {analytic} vs finite differences {fd} (rel {err:e})",
                backbone.kind()
            );
        }
    }
    Ok(())
}

#[test]
fn second_order_meta_gradient_with_unadapted_batch_norm_matches_finite_differences() -> Result<()> {
    for steps in [1, 2] {
        check_meta_gradient(&strided(), 12, steps, 10 + steps as u64)?;
    }
    // cbfinn/maml's miniImageNet net: Conv4 with max-pool, no batch-norm scale, Glorot init
    // (through Conv4's explicit backward pass).
    let conv4 = BackboneConfig::Conv4(Conv4Config {
        hidden: 4,
        bn_eps: 1e-3,
        bn_scale: false,
        conv_init: ConvInit::Glorot,
        ..Conv4Config::new(1)
    });
    check_meta_gradient(&conv4, 16, 2, 20)
}

#[test]
fn without_a_scale_the_networks_have_no_batch_norm_weight() -> Result<()> {
    let (_, theta) = net(official(1), &strided(), 12)?;
    let conv4 =
        BackboneConfig::Conv4(Conv4Config { hidden: 4, bn_scale: false, ..Conv4Config::new(1) });
    let (_, theta4) = net(official(1), &conv4, 16)?;
    for p in [&theta, &theta4] {
        let names: Vec<&String> = p.iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| !n.ends_with("weight") || !n.starts_with("bn")), "{names:?}");
        assert!(names.iter().any(|n| n.as_str() == "bn3.bias"), "{names:?}");
    }
    // Head N(0, 1), zero bias.
    let w = values(theta.get("head.weight")?)?;
    assert!(values(theta.get("head.bias")?)?.iter().all(|&b| b == 0.0));
    let var = w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64;
    assert!((0.3..3.0).contains(&var), "head weight variance {var} is not that of N(0, 1)");
    Ok(())
}

#[test]
fn the_meta_gradient_is_clipped_on_the_official_loss_scale() -> Result<()> {
    kshot::autograd::init();
    let config = MamlConfig { clip_official: Some(1e-3), ..official(1) };
    let mut net =
        Maml::new(config, &strided(), (12, 12), &mut ChaCha8Rng::seed_from_u64(7), &Device::Cpu)?;
    let ep = task(&mut ChaCha8Rng::seed_from_u64(5), 12)?;
    let ep = Episode {
        support: ep.support.to_dtype(DType::F32)?,
        query: ep.query.to_dtype(DType::F32)?,
        ..ep
    };
    let unclipped = net.task_gradient(&net.params().detached_values(), &ep, 1)?.grads;
    let out = net.episode_loss(&ep)?;
    let grads = out.loss.backward()?;
    // The code's loss is N·Q/K = 3·2/2 = 3 times ours: ±1e-3 there is ±1e-3/3 here.
    let bound = 1e-3 / 3.0;
    let mut clipped_some = false;
    for (name, var) in net.params().iter() {
        let got = grads.get(var.as_tensor()).expect("a gradient for every parameter");
        let want = unclipped.get(name)?.clamp(-bound, bound)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-9, "{name}: clipped gradient differs from clamp(g, ±{bound}) by {d}");
        let max = unclipped.get(name)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        clipped_some |= max > bound;
    }
    assert!(clipped_some, "the test's bound clipped nothing");
    Ok(())
}

#[test]
fn the_strided_backbones_explicit_backward_gives_candles_meta_gradient_to_1e_10() -> Result<()> {
    let size = 13; // odd sizes: 13 → 7 → 4 → 2 → 1
    let ep = task(&mut ChaCha8Rng::seed_from_u64(30), size)?;
    for features in [kshot::nn::StridedFeatures::Mean, kshot::nn::StridedFeatures::Flatten] {
        for bn_scale in [false, true] {
            let cfg = |fast_kernels| {
                BackboneConfig::Conv4Strided(StridedConv4Config {
                    hidden: 4,
                    features,
                    bn_scale,
                    fast_kernels,
                    ..StridedConv4Config::maml_omniglot(1)
                })
            };
            for steps in [1, 3] {
                let (fast, theta) = net(official(steps), &cfg(true), size)?;
                let (composite, _) = net(official(steps), &cfg(false), size)?;
                assert!(fast.backbone().explicit_backward().is_some());
                assert!(composite.backbone().explicit_backward().is_none());
                let a = fast.task_gradient(&theta, &ep, steps)?.grads;
                let b = composite.task_gradient(&theta, &ep, steps)?.grads;
                // Relative to the largest component: the convolution biases' gradients are zero
                // up to rounding (batch norm removes them), so they have no scale of their own.
                let mut scale = 0.0f64;
                for (_, t) in b.iter() {
                    scale = scale.max(t.abs()?.max_all()?.to_scalar::<f64>()?);
                }
                for (name, t) in b.iter() {
                    let d = (t - a.get(name)?)?.abs()?.max_all()?.to_scalar::<f64>()?;
                    assert!(
                        d / scale < 1e-10,
                        "{features:?}, scale {bn_scale}, {steps} steps, {name}: explicit and candle meta-gradients differ by {:e}",
                        d / scale
                    );
                }
            }
        }
    }
    Ok(())
}
