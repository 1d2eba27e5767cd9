//! MAML's meta-gradient: exact to second order (f64), the same through the fused kernels and
//! through candle's composite ops, and distinguishable from first-order MAML.

use candle_core::{DType, Device, Result, Tensor};
use kshot::data::{Episode, EpisodeSpec};
use kshot::methods::{Learner, Maml, MamlConfig};
use kshot::nn::{BackboneConfig, Conv4Config, Params};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn normal(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// A 3-way 1-shot task with 2 queries per class on 31×31 images (31 → 15 → 7 → 3 → 1: odd sizes).
fn task(rng: &mut ChaCha8Rng) -> Result<Episode> {
    Ok(Episode {
        spec: EpisodeSpec::new(3, 1, 2),
        index: 0,
        seed: 0,
        classes: vec![0, 1, 2],
        support: normal(rng, &[3, 1, 31, 31])?,
        support_labels: vec![0, 1, 2],
        query: normal(rng, &[6, 1, 31, 31])?,
        query_labels: vec![0, 0, 1, 1, 2, 2],
        unlabelled: None,
    })
}

fn maml(steps: usize, first_order: bool, fast_kernels: bool) -> Result<(Maml, Params)> {
    kshot::autograd::init();
    let config = MamlConfig {
        ways: 3,
        inner_steps: steps,
        inner_steps_test: steps,
        inner_lr: 0.4,
        first_order,
        transductive: true,
        ..MamlConfig::default()
    };
    let backbone = Conv4Config { hidden: 6, fast_kernels, ..Conv4Config::new(1) };
    let net = Maml::new(
        config,
        &BackboneConfig::Conv4(backbone),
        (31, 31),
        &mut ChaCha8Rng::seed_from_u64(7),
        &Device::Cpu,
    )?;
    let mut theta = Params::new();
    for (name, t) in net.params().detached_values().iter() {
        theta.insert(name.clone(), t.to_dtype(DType::F64)?);
    }
    Ok((net, theta))
}

/// L_Q(φ(θ)): the query loss after the inner loop, as a plain number.
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

fn flat(p: &Params) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for (_, t) in p.iter() {
        v.extend(t.flatten_all()?.to_vec1::<f64>()?);
    }
    Ok(v)
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-300);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

fn random_direction(theta: &Params, rng: &mut ChaCha8Rng) -> Result<Params> {
    let mut dir = Params::new();
    for (name, t) in theta.iter() {
        dir.insert(name.clone(), normal(rng, t.dims())?);
    }
    Ok(dir)
}

#[test]
fn second_order_meta_gradient_matches_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ep = task(&mut rng)?;
    for steps in [1, 2] {
        let (net, theta) = maml(steps, false, true)?;
        let g = net.task_gradient(&theta, &ep, steps)?.grads;
        for _ in 0..3 {
            let dir = random_direction(&theta, &mut rng)?;
            // Small enough that no ReLU or max-pool kink lies within ±h along the direction.
            let h = 1e-7;
            let fd = (meta_loss(&net, &shifted(&theta, &dir, h)?, &ep)?
                - meta_loss(&net, &shifted(&theta, &dir, -h)?, &ep)?)
                / (2.0 * h);
            let analytic = dot(&g, &dir)?;
            let err = (fd - analytic).abs() / analytic.abs().max(1e-3);
            assert!(err < 1e-6, "{steps} inner steps: directional derivative {analytic} vs finite differences {fd} (rel {err:e})");
        }
    }
    Ok(())
}

#[test]
fn fused_kernels_give_the_composite_meta_gradient_to_1e_10() -> Result<()> {
    let ep = task(&mut ChaCha8Rng::seed_from_u64(2))?;
    for steps in [1, 2, 5] {
        let (fast, theta) = maml(steps, false, true)?;
        let (composite, _) = maml(steps, false, false)?;
        let a = flat(&fast.task_gradient(&theta, &ep, steps)?.grads)?;
        let b = flat(&composite.task_gradient(&theta, &ep, steps)?.grads)?;
        let d = max_rel_diff(&b, &a);
        assert!(
            d < 1e-10,
            "{steps} inner steps: fused and composite meta-gradients differ by {d:e}"
        );
    }
    Ok(())
}

#[test]
fn first_order_differs_from_second_order() -> Result<()> {
    let ep = task(&mut ChaCha8Rng::seed_from_u64(3))?;
    let (second, theta) = maml(2, false, true)?;
    let (first, _) = maml(2, true, true)?;
    let a = flat(&second.task_gradient(&theta, &ep, 2)?.grads)?;
    let b = flat(&first.task_gradient(&theta, &ep, 2)?.grads)?;
    let d = max_rel_diff(&a, &b);
    assert!(
        d > 1e-3,
        "first- and second-order meta-gradients agree to {d:e}: the second-order term is missing"
    );
    Ok(())
}

#[test]
fn episode_loss_is_the_query_loss_and_its_gradient_the_meta_gradient() -> Result<()> {
    kshot::autograd::init();
    let config = MamlConfig {
        ways: 3,
        inner_steps: 2,
        inner_steps_test: 2,
        inner_lr: 0.4,
        first_order: false,
        transductive: true,
        ..MamlConfig::default()
    };
    let backbone = Conv4Config { hidden: 6, ..Conv4Config::new(1) };
    let mut net = Maml::new(
        config,
        &BackboneConfig::Conv4(backbone),
        (31, 31),
        &mut ChaCha8Rng::seed_from_u64(7),
        &Device::Cpu,
    )?;
    let ep = task(&mut ChaCha8Rng::seed_from_u64(4))?;
    let ep = Episode {
        support: ep.support.to_dtype(DType::F32)?,
        query: ep.query.to_dtype(DType::F32)?,
        ..ep
    };
    let theta = net.params().detached_values();
    let expected = net.task_gradient(&theta, &ep, 2)?;
    let out = net.episode_loss(&ep)?;
    let value = out.loss.to_scalar::<f32>()? as f64;
    assert!(
        (value - expected.query_loss).abs() < 1e-5,
        "surrogate value {value} vs query loss {}",
        expected.query_loss
    );
    let grads = out.loss.backward()?;
    for (name, var) in net.params().iter() {
        let got = grads.get(var.as_tensor()).expect("every parameter gets a gradient");
        let want = expected.grads.get(name)?;
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{name}: surrogate gradient differs from the meta-gradient by {d}");
    }
    Ok(())
}

#[test]
fn non_transductive_scoring_sees_each_query_with_the_support_set_alone() -> Result<()> {
    let ep = task(&mut ChaCha8Rng::seed_from_u64(4))?;
    let (mut net, _) = maml(1, false, true)?;
    let support = ep.support.to_dtype(DType::F32)?;
    let query = ep.query.to_dtype(DType::F32)?;
    let scores = |net: &Maml, q: &Tensor| -> Result<Vec<f32>> {
        net.adapt(&support, &ep.support_labels, 3)?.logits(q)?.flatten_all()?.to_vec1()
    };
    let transductive = scores(&net, &query)?;
    net.config.transductive = false;
    let per_query = scores(&net, &query)?;
    let first_alone = scores(&net, &query.narrow(0, 0, 1)?)?;
    assert_eq!(&per_query[..3], &first_alone[..], "a query's scores depend on the other queries");
    let d = transductive.iter().zip(&per_query).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        d > 1e-3,
        "transductive and per-query scoring agree ({d:e}): batch statistics are not the batch's"
    );
    Ok(())
}
