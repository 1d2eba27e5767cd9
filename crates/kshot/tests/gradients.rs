//! Gradients of the reference layers and of the whole Conv4 against central finite differences (f64).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use kshot::nn::{ops, BnMode, Conv4, Conv4Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks d(f)/d(var) at `coords` random coordinates against central differences.
fn check_gradient(
    var: &Var,
    f: &dyn Fn() -> Tensor,
    coords: usize,
    rng: &mut ChaCha8Rng,
    tol: f64,
) {
    kshot::autograd::init();
    let grads = f().backward().unwrap();
    let analytic: Vec<f64> =
        grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let shape = var.dims().to_vec();
    let h = 1e-5;
    for _ in 0..coords {
        let i = rng.random_range(0..base.len());
        let eval_at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
            f().to_scalar::<f64>().unwrap()
        };
        let numeric = (eval_at(h) - eval_at(-h)) / (2.0 * h);
        var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &Device::Cpu).unwrap()).unwrap();
        let err = (numeric - analytic[i]).abs();
        assert!(
            err <= tol * (1.0 + numeric.abs()),
            "coordinate {i}: analytic {} vs finite difference {numeric} (error {err:e})",
            analytic[i]
        );
    }
}

#[test]
fn max_pool_gradient_matches_finite_differences_on_odd_sizes() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for (h, w) in [(7, 7), (6, 5), (21, 21)] {
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, h, w])).unwrap();
        let y = ops::max_pool2x2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[2, 3, h / 2, w / 2]);
        let r = randn(&mut rng, y.dims());
        let f = || (ops::max_pool2x2(x.as_tensor()).unwrap() * &r).unwrap().sum_all().unwrap();
        check_gradient(&x, &f, 60, &mut rng, 1e-7);
    }
}

#[test]
fn max_pool_picks_window_maxima_and_drops_the_odd_edge() {
    let x: Vec<f64> = (0..49).map(|i| ((i * 37) % 49) as f64).collect();
    let t = Tensor::from_vec(x.clone(), (1, 1, 7, 7), &Device::Cpu).unwrap();
    let y: Vec<f64> = ops::max_pool2x2(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let mut expect = Vec::new();
    for i in 0..3 {
        for j in 0..3 {
            let m = [(0, 0), (0, 1), (1, 0), (1, 1)]
                .iter()
                .map(|(a, b)| x[(2 * i + a) * 7 + 2 * j + b])
                .fold(f64::MIN, f64::max);
            expect.push(m);
        }
    }
    assert_eq!(y, expect);
}

#[test]
fn batch_norm_statistics_are_f64_and_gradient_is_exact() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = Var::from_tensor(&randn(&mut rng, &[4, 3, 5, 5])).unwrap();
    let gamma = Var::from_tensor(&(randn(&mut rng, &[3]) + 1.5).unwrap()).unwrap();
    let beta = Var::from_tensor(&randn(&mut rng, &[3])).unwrap();
    let r = randn(&mut rng, &[4, 3, 5, 5]);
    let f = || {
        let (y, _) =
            ops::batch_norm_train(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), 1e-5)
                .unwrap();
        (y.relu().unwrap() * &r).unwrap().sum_all().unwrap()
    };
    check_gradient(&x, &f, 60, &mut rng, 1e-6);
    check_gradient(&gamma, &f, 3, &mut rng, 1e-6);
    check_gradient(&beta, &f, 3, &mut rng, 1e-6);
    // Statistics of an f32 batch are accumulated in f64.
    let x32 =
        Tensor::from_vec(vec![1e4f32 + 1.0, 1e4, 1e4 + 3.0, 1e4 + 0.5], (4, 1, 1, 1), &Device::Cpu)
            .unwrap();
    let one = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    let (_, stats) = ops::batch_norm_train(&x32, &one, &zero, 1e-5).unwrap();
    assert!((stats.mean[0] - 10001.125).abs() < 1e-9, "{}", stats.mean[0]);
    assert!((stats.var[0] - 1.296875).abs() < 1e-9, "{}", stats.var[0]);
    assert_eq!(stats.count, 4);
}

/// Conv4 parameters in f64 as variables, plus the `Params` view of them.
fn conv4_f64(config: Conv4Config, seed: u64) -> (Conv4, Vec<(String, Var)>) {
    let net = Conv4::new(config);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let params = net.init(&mut rng, &Device::Cpu).unwrap();
    let vars = f64_vars(&params, &mut rng);
    (net, vars)
}

/// `params` in f64 as variables, with batch-norm scale/shift perturbed away from 1/0 so that their
/// gradients are generic.
fn f64_vars(params: &kshot::nn::ParamSet, rng: &mut ChaCha8Rng) -> Vec<(String, Var)> {
    params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            let t = if n.starts_with("bn") { (t + randn(rng, v.dims()) * 0.3).unwrap() } else { t };
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn as_params(vars: &[(String, Var)]) -> Params {
    let mut p = Params::new();
    for (n, v) in vars {
        p.insert(n.clone(), v.as_tensor().clone());
    }
    p
}

fn conv4_gradient_check(fast_kernels: bool) {
    // 15×15 through three blocks: 15 → 7 → 3 → 1, odd sizes at every pooling.
    let config =
        Conv4Config { in_channels: 2, hidden: 4, blocks: 3, fast_kernels, ..Conv4Config::new(2) };
    let (net, vars) = conv4_f64(config, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 2, 15, 15])).unwrap();
    let out_dims = [3, config.embedding_dim(15, 15)];
    assert_eq!(out_dims[1], 4);
    let r = randn(&mut rng, &out_dims);
    let f = || {
        let y = net.forward(&as_params(&vars), x.as_tensor(), BnMode::Batch(None)).unwrap();
        (y * &r).unwrap().sum_all().unwrap()
    };
    for (_, v) in &vars {
        check_gradient(v, &f, 8, &mut rng, 1e-6);
    }
    check_gradient(&x, &f, 20, &mut rng, 1e-6);
}

#[test]
fn conv4_gradient_matches_finite_differences_composite() {
    conv4_gradient_check(false);
}

#[test]
fn conv4_gradient_matches_finite_differences_fast_kernels() {
    conv4_gradient_check(true);
}

#[test]
fn conv4_embeds_28_to_64_and_84_to_1600() {
    let c1 = Conv4Config::new(1);
    assert_eq!(c1.embedding_dim(28, 28), 64);
    assert_eq!(Conv4Config::new(3).embedding_dim(84, 84), 1600);
    let net = Conv4::new(c1);
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
    let y = net.forward(&params.values(), &x, BnMode::Batch(None)).unwrap();
    assert_eq!(y.dims(), &[2, 64]);
}

/// Σ a·b over all named tensors of `b`.
fn params_dot(a: &Params, b: &Params) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (name, t) in b.iter() {
        let term = (a.get(name).unwrap() * t).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(s) => (s + term).unwrap(),
            None => term,
        });
    }
    total.unwrap()
}

#[test]
fn explicit_conv4_backward_equals_candle_backward_to_second_order() {
    kshot::autograd::init();
    // 15×15 through three blocks: 15 → 7 → 3 → 1, odd sizes at every pooling; 3-way linear head.
    let config = Conv4Config { in_channels: 2, hidden: 4, blocks: 3, ..Conv4Config::new(2) };
    let net = Conv4::new(config);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let init = net.init_with_linear_head((15, 15), 3, &mut rng, &Device::Cpu).unwrap();
    let vars = f64_vars(&init, &mut rng);
    let x = randn(&mut rng, &[5, 2, 15, 15]);
    let labels = Tensor::new(&[0u32, 2, 1, 1, 0], &Device::Cpu).unwrap();
    let params = as_params(&vars);

    let explicit = net.linear_head_loss_and_grad(&params, &x, &labels).unwrap();
    let logits = net.linear_head_logits(&params, &x, BnMode::Batch(None)).unwrap();
    let loss = ops::cross_entropy(&logits, &labels).unwrap();
    let store = loss.backward().unwrap();
    let loss_diff =
        (explicit.loss.to_scalar::<f64>().unwrap() - loss.to_scalar::<f64>().unwrap()).abs();
    assert!(loss_diff < 1e-14, "losses differ by {loss_diff:e}");
    let mut candle_grads = Params::new();
    for (name, var) in &vars {
        let a = store.get(var.as_tensor()).unwrap();
        let b = explicit.grads.get(name).unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
        let d =
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale;
        assert!(d < 1e-12, "{name}: explicit and candle gradients differ by {d:e} (relative)");
        candle_grads.insert(name.clone(), a.clone());
    }

    // Hessian-vector products: ∇(∇L · u) through either gradient graph.
    let mut u = Params::new();
    for (name, var) in &vars {
        u.insert(name.clone(), randn(&mut rng, var.dims()));
    }
    let hv_explicit = params_dot(&u, &explicit.grads).backward().unwrap();
    let hv_candle = params_dot(&u, &candle_grads).backward().unwrap();
    for (name, var) in &vars {
        let a = hv_candle.get(var.as_tensor()).unwrap();
        let b = hv_explicit.get(var.as_tensor()).unwrap();
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12);
        let d =
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() / scale;
        assert!(d < 1e-10, "{name}: Hessian-vector products differ by {d:e} (relative)");
    }
}

#[test]
fn protonet_explicit_backward_gives_the_composite_gradient() {
    use kshot::data::{Episode, EpisodeSpec};
    use kshot::methods::{Learner, ProtoNet, ProtoNetConfig};
    kshot::autograd::init();
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (ways, shots, queries) = (4, 2, 3);
    let images =
        |rng: &mut ChaCha8Rng, n: usize| randn(rng, &[n, 1, 15, 15]).to_dtype(DType::F32).unwrap();
    let episode = Episode {
        spec: EpisodeSpec::new(ways, shots, queries),
        index: 0,
        seed: 0,
        classes: (0..ways).collect(),
        support: images(&mut rng, ways * shots),
        support_labels: (0..(ways * shots) as u32).map(|i| i / shots as u32).collect(),
        query: images(&mut rng, ways * queries),
        query_labels: (0..(ways * queries) as u32).map(|i| i / queries as u32).collect(),
        unlabelled: None,
    };
    let run = |fast_kernels: bool| {
        let backbone = Conv4Config { hidden: 6, blocks: 3, fast_kernels, ..Conv4Config::new(1) };
        let mut net = ProtoNet::new(
            ProtoNetConfig::default(),
            &kshot::nn::BackboneConfig::Conv4(backbone),
            &mut ChaCha8Rng::seed_from_u64(5),
            &Device::Cpu,
        )
        .unwrap();
        let out = net.episode_loss(&episode).unwrap();
        let grads = out.loss.backward().unwrap();
        let flat: Vec<(String, Vec<f32>)> = net
            .params()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect();
        let buffers: Vec<Vec<f64>> = net
            .state()
            .buffers()
            .unwrap()
            .iter()
            .map(|(_, t)| t.to_dtype(DType::F64).unwrap().to_vec1().unwrap())
            .collect();
        (out.loss.to_scalar::<f32>().unwrap(), flat, buffers)
    };
    let (fast_loss, fast, fast_buffers) = run(true);
    let (loss, composite, buffers) = run(false);
    assert!(
        (fast_loss - loss).abs() < 1e-5 * loss.abs().max(1.0),
        "loss {fast_loss} vs composite {loss}"
    );
    for ((name, a), (_, b)) in fast.iter().zip(&composite) {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
        assert!(d < 1e-4, "{name}: explicit and composite gradients differ by {d:e} (relative)");
    }
    for (a, b) in fast_buffers.iter().zip(&buffers) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-5 * y.abs().max(1.0),
                "running statistics differ: {x} vs {y}"
            );
        }
    }
}
