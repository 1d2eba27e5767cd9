//! ResNet-12: shapes, parameters and initialisation, gradients against central finite differences
//! (f64, batch and running statistics), the fused-kernel path against candle's composite ops, and
//! the running statistics against a hand computation.

use candle_core::{DType, Device, Tensor, Var};
use kshot::nn::{
    ops, Backbone, BackboneConfig, BnMode, ParamSet, Params, ResNet12, ResNet12Config,
    RunningStats, BACKBONES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| over the largest |b| (at least 1e-12).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Two input channels, widths 3, 4, 5, 6: small enough for finite differences in f64.
fn small_config(fast_kernels: bool) -> ResNet12Config {
    ResNet12Config { widths: [3, 4, 5, 6], fast_kernels, ..ResNet12Config::new(2) }
}

/// `params` in f64 as variables, with batch-norm scale/shift perturbed away from 1/0 so that their
/// gradients are generic.
fn f64_vars(params: &ParamSet, rng: &mut ChaCha8Rng) -> Vec<(String, Var)> {
    params
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().to_dtype(DType::F64).unwrap();
            let t = if n.contains("bn") { (t + uniform(rng, v.dims()) * 0.3).unwrap() } else { t };
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

#[test]
fn embeds_84x84_rgb_into_640_dimensions() {
    let net = ResNet12::new(ResNet12Config::new(3));
    assert_eq!(net.kind(), "resnet12");
    assert_eq!(net.embedding_dim(84, 84).unwrap(), 640);
    assert_eq!(net.embedding_dim(16, 16).unwrap(), 640);
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = uniform(&mut rng, &[2, 3, 84, 84]).to_dtype(DType::F32).unwrap();
    let y = net.forward(&params.values(), &x, BnMode::Batch(None)).unwrap();
    assert_eq!(y.dims(), &[2, 640]);
    assert_eq!(y.dtype(), DType::F32);
    let v = values(&y);
    assert!(v.iter().all(|x| x.is_finite()));
    // After the final LeakyReLU and average pool the features are not all equal (or all zero).
    let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    assert!(hi - lo > 1e-3, "embedding is constant: {lo}..{hi}");
}

#[test]
fn too_small_inputs_are_errors() {
    let net = ResNet12::new(ResNet12Config::new(3));
    for (h, w) in [(15, 84), (84, 15), (8, 8), (0, 0)] {
        let err = net.embedding_dim(h, w).unwrap_err().to_string();
        assert!(err.contains("too small"), "{h}×{w}: {err}");
    }
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 3, 15, 15), DType::F32, &Device::Cpu).unwrap();
    assert!(net.forward(&params.values(), &x, BnMode::Batch(None)).is_err());
}

#[test]
fn default_config_has_the_standard_12_4_million_parameters() {
    let config = ResNet12Config::new(3);
    assert_eq!(config.widths, [64, 160, 320, 640]);
    assert_eq!((config.bn_eps, config.bn_momentum, config.leak), (1e-5, 0.1, 0.1));
    assert!(config.fast_kernels);
    let net = ResNet12::new(config);
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    // Per block: 3 conv weights + their 3 BN (scale, shift), the shortcut and its BN.
    assert_eq!(params.len(), 4 * 12);
    // Σ over blocks of 9·w·(cin + 2w) + w·cin + 8w, for cin = 3, 64, 160, 320.
    assert_eq!(params.numel(), 12_424_320);
    let shape = |n: &str| params.get(n).unwrap().dims().to_vec();
    assert_eq!(shape("block0.conv0.weight"), [64, 3, 3, 3]);
    assert_eq!(shape("block0.conv2.weight"), [64, 64, 3, 3]);
    assert_eq!(shape("block1.conv0.weight"), [160, 64, 3, 3]);
    assert_eq!(shape("block3.conv2.weight"), [640, 640, 3, 3]);
    assert_eq!(shape("block2.shortcut.weight"), [320, 160, 1, 1]);
    assert_eq!(shape("block3.bn1.weight"), [640]);
    assert_eq!(shape("block3.shortcut_bn.bias"), [640]);
    for (n, v) in params.iter() {
        let ok = n.ends_with(".weight") || n.ends_with(".bias");
        assert!(ok && n.starts_with("block"), "unexpected parameter name {n}");
        assert_eq!(v.dtype(), DType::F32);
    }
}

#[test]
fn init_is_kaiming_normal_fan_out_with_unit_batch_norm_and_deterministic() {
    let net = ResNet12::new(ResNet12Config::new(3));
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(7), &Device::Cpu).unwrap();
    // std = √(2 / fan_out), fan_out = out channels · kernel area (PyTorch, a = 0).
    for (name, fan_out) in [
        ("block3.conv1.weight", 640 * 9),
        ("block1.conv0.weight", 160 * 9),
        ("block3.shortcut.weight", 640),
        ("block2.shortcut.weight", 320),
    ] {
        let v = values(params.get(name).unwrap().as_tensor());
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let expect = (2.0 / fan_out as f64).sqrt();
        assert!((std / expect - 1.0).abs() < 0.02, "{name}: std {std} vs {expect}");
        assert!(mean.abs() < 0.02 * expect, "{name}: mean {mean}");
        // Normal, not uniform: some samples lie beyond 3 standard deviations.
        let tails = v.iter().filter(|x| x.abs() > 3.0 * expect).count() as f64 / n;
        assert!((tails - 0.0027).abs() < 0.001, "{name}: {tails} beyond 3σ");
    }
    for (name, v) in params.iter() {
        let v = values(v.as_tensor());
        if name.contains("bn") && name.ends_with(".weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{name}");
        } else if name.contains("bn") {
            assert!(v.iter().all(|&x| x == 0.0), "{name}");
        }
    }
    let again = net.init(&mut ChaCha8Rng::seed_from_u64(7), &Device::Cpu).unwrap();
    let other = net.init(&mut ChaCha8Rng::seed_from_u64(8), &Device::Cpu).unwrap();
    let w = |p: &ParamSet| values(p.get("block0.conv0.weight").unwrap().as_tensor());
    assert_eq!(w(&params), w(&again));
    assert_ne!(w(&params), w(&other));
}

#[test]
fn running_statistics_are_named_per_block_layer() {
    let net = ResNet12::new(ResNet12Config::new(3));
    let r = net.running_stats();
    let names: Vec<&str> = r.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), 16);
    assert_eq!(&names[..4], ["block0.bn0", "block0.bn1", "block0.bn2", "block0.shortcut_bn"]);
    assert_eq!(names[15], "block3.shortcut_bn");
    let widths: Vec<usize> = r.layers.iter().map(|l| l.mean.len()).collect();
    assert_eq!(widths[0], 64);
    assert_eq!(widths[4], 160);
    assert_eq!(widths[11], 320);
    assert_eq!(widths[15], 640);
    // Every batch-norm parameter has its running statistics, under the same layer name.
    let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    let bn_layers: Vec<String> = params
        .iter()
        .filter(|(n, _)| n.contains("bn") && n.ends_with(".weight"))
        .map(|(n, _)| n.trim_end_matches(".weight").to_string())
        .collect();
    assert_eq!(bn_layers, names);
}

#[test]
fn backbone_config_builds_names_and_serialises_resnet12() {
    assert!(BACKBONES.contains(&"resnet12"));
    let mut config = BackboneConfig::named("resnet12", 3).unwrap();
    assert_eq!(config, BackboneConfig::Resnet12(ResNet12Config::new(3)));
    assert_eq!(config.kind(), "resnet12");
    assert_eq!(config.in_channels(), 3);
    config.set_in_channels(1);
    assert_eq!(config.in_channels(), 1);
    let net = config.build();
    assert_eq!(net.kind(), "resnet12");
    assert_eq!(net.embedding_dim(84, 84).unwrap(), 640);
    let p = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
    assert_eq!(p.get("block0.conv0.weight").unwrap().dims(), [64, 1, 3, 3]);

    let json = serde_json::to_string(&config).unwrap();
    assert!(json.contains(r#""kind":"resnet12""#), "{json}");
    let back: BackboneConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    // Only the input channels are required; the rest defaults to the standard settings.
    let short: BackboneConfig =
        serde_json::from_str(r#"{"kind":"resnet12","in_channels":3}"#).unwrap();
    assert_eq!(short, BackboneConfig::Resnet12(ResNet12Config::new(3)));
}

/// Checks d(loss)/d(var) for every variable in `vars` (`coords` random coordinates each) and for
/// the input `x` against central differences.
fn check_all_gradients(
    vars: &[(String, Var)],
    x: &Var,
    loss: &dyn Fn() -> Tensor,
    coords: usize,
    rng: &mut ChaCha8Rng,
) {
    kshot::autograd::init();
    let grads = loss().backward().unwrap();
    let h = 1e-6;
    let tol = 1e-6;
    let mut checked = 0;
    let input = [("input".to_string(), x.clone())];
    for (name, var) in vars.iter().chain(&input) {
        let analytic = values(grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}")));
        let base = values(var.as_tensor());
        let shape = var.dims().to_vec();
        let set = |v: Vec<f64>| {
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap()).unwrap()
        };
        for _ in 0..coords {
            let i = rng.random_range(0..base.len());
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                set(v);
                loss().to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            set(base.clone());
            let err = (numeric - analytic[i]).abs();
            assert!(
                err <= tol * (1.0 + numeric.abs()),
                "{name}[{i}]: analytic {} vs finite difference {numeric} (error {err:e})",
                analytic[i]
            );
            checked += 1;
        }
        assert!(analytic.iter().any(|g| g.abs() > 1e-8), "{name}: the gradient is zero everywhere");
    }
    assert_eq!(checked, (vars.len() + 1) * coords);
}

/// 23×23 inputs: 23 → 11 → 5 → 2 → 1, odd sizes at three of the four max-pools.
const SIDE: usize = 23;

fn gradient_check(fast_kernels: bool, running: bool) {
    let mut config = small_config(fast_kernels);
    config.bn_momentum = 0.5;
    let net = ResNet12::new(config);
    let mut rng = ChaCha8Rng::seed_from_u64(if running { 30 } else { 20 });
    let params = net.init(&mut rng, &Device::Cpu).unwrap();
    let vars = f64_vars(&params, &mut rng);
    assert_eq!(vars.len(), 48);
    // Running statistics from a few batch-statistics passes over other batches.
    let mut stats = net.running_stats();
    if running {
        for _ in 0..3 {
            let other = (uniform(&mut rng, &[4, 2, SIDE, SIDE]) * 2.0).unwrap();
            net.forward(&as_params(&vars), &other, BnMode::Batch(Some(&mut stats))).unwrap();
        }
        assert_ne!(stats, net.running_stats());
    }
    let x = Var::from_tensor(&uniform(&mut rng, &[4, 2, SIDE, SIDE])).unwrap();
    assert_eq!(net.embedding_dim(SIDE, SIDE).unwrap(), 6);
    let r = uniform(&mut rng, &[4, 6]);
    let loss = || {
        let bn = if running { BnMode::Running(&stats) } else { BnMode::Batch(None) };
        let y = net.forward(&as_params(&vars), x.as_tensor(), bn).unwrap();
        assert_eq!(y.dims(), [4, 6]);
        (y * &r).unwrap().sum_all().unwrap()
    };
    check_all_gradients(&vars, &x, &loss, 3, &mut rng);
}

#[test]
fn gradients_match_finite_differences_batch_statistics_fast_kernels() {
    gradient_check(true, false);
}

#[test]
fn gradients_match_finite_differences_batch_statistics_composite() {
    gradient_check(false, false);
}

#[test]
fn gradients_match_finite_differences_running_statistics_fast_kernels() {
    gradient_check(true, true);
}

#[test]
fn gradients_match_finite_differences_running_statistics_composite() {
    gradient_check(false, true);
}

/// Embedding, running statistics and every parameter gradient of `config` in both paths.
fn fast_and_composite_agree(
    config: ResNet12Config,
    dtype: DType,
    batch: usize,
    side: usize,
    tol: f64,
) {
    kshot::autograd::init();
    let mut rng = ChaCha8Rng::seed_from_u64(40);
    let params = ResNet12::new(config).init(&mut rng, &Device::Cpu).unwrap();
    let vars: Vec<(String, Var)> = f64_vars(&params, &mut rng)
        .into_iter()
        .map(|(n, v)| (n, Var::from_tensor(&v.to_dtype(dtype).unwrap()).unwrap()))
        .collect();
    let x = uniform(&mut rng, &[batch, config.in_channels, side, side]).to_dtype(dtype).unwrap();
    let dim = config.widths[3];
    let r = uniform(&mut rng, &[batch, dim]).to_dtype(dtype).unwrap();
    type Run = (Tensor, Tensor, RunningStats, Vec<Tensor>);
    let run = |fast_kernels: bool| -> Run {
        let net = ResNet12::new(ResNet12Config { fast_kernels, ..config });
        let p = as_params(&vars);
        let mut stats = net.running_stats();
        let y = net.forward(&p, &x, BnMode::Batch(Some(&mut stats))).unwrap();
        let y_running = net.forward(&p, &x, BnMode::Running(&stats)).unwrap();
        let loss = ((&y * &r).unwrap().sum_all().unwrap()
            + (&y_running * &r).unwrap().sqr().unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let g = vars.iter().map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone()).collect();
        (y, y_running, stats, g)
    };
    let (y_fast, yr_fast, stats_fast, g_fast) = run(true);
    let (y_comp, yr_comp, stats_comp, g_comp) = run(false);
    assert_eq!(y_fast.dims(), [batch, dim]);
    let e = rel_err(&y_fast, &y_comp);
    assert!(e < tol, "batch-statistics embeddings differ by {e:e}");
    let e = rel_err(&yr_fast, &yr_comp);
    assert!(e < tol, "running-statistics embeddings differ by {e:e}");
    for (a, b) in stats_fast.layers.iter().zip(&stats_comp.layers) {
        for (x, y) in a.mean.iter().zip(&b.mean).chain(a.var.iter().zip(&b.var)) {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{}: {x} vs {y}", a.name);
        }
    }
    for ((name, _), (a, b)) in vars.iter().zip(g_fast.iter().zip(&g_comp)) {
        let e = rel_err(a, b);
        assert!(e < tol, "{name}: fast and composite gradients differ by {e:e} (relative)");
    }
}

#[test]
fn fast_kernels_match_composite_ops_f64() {
    fast_and_composite_agree(small_config(true), DType::F64, 4, 21, 1e-11);
}

#[test]
fn fast_kernels_match_composite_ops_f32() {
    let config = ResNet12Config { widths: [8, 16, 24, 32], ..ResNet12Config::new(3) };
    fast_and_composite_agree(config, DType::F32, 3, 32, 1e-4);
}

/// Per-channel (mean, unbiased variance) of `v` laid out [B, C, HW].
fn channel_moments(v: &[f64], b: usize, c: usize, hw: usize) -> Vec<(f64, f64)> {
    (0..c)
        .map(|ch| {
            let xs: Vec<f64> =
                (0..b).flat_map(|i| v[(i * c + ch) * hw..][..hw].iter().copied()).collect();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            (mean, xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0))
        })
        .collect()
}

/// Training-mode batch norm and LeakyReLU by hand over `v` [B, C, HW].
fn bn_leaky_by_hand(
    v: &[f64],
    (b, c, hw): (usize, usize, usize),
    g: &[f64],
    s: &[f64],
) -> Vec<f64> {
    let moments = channel_moments(v, b, c, hw);
    let n = (b * hw) as f64;
    let mut out = v.to_vec();
    for (i, o) in out.iter_mut().enumerate() {
        let ch = i / hw % c;
        let (mean, unbiased) = moments[ch];
        let var = unbiased * (n - 1.0) / n;
        let z = g[ch] * (*o - mean) / (var + 1e-5).sqrt() + s[ch];
        *o = if z > 0.0 { z } else { 0.1 * z };
    }
    out
}

#[test]
fn running_statistics_update_matches_a_hand_computation() {
    let config = small_config(true);
    let net = ResNet12::new(config);
    let mut rng = ChaCha8Rng::seed_from_u64(50);
    let params = net.init(&mut rng, &Device::Cpu).unwrap();
    let vars = f64_vars(&params, &mut rng);
    let p = as_params(&vars);
    let (b, side) = (3, 18);
    let x = uniform(&mut rng, &[b, 2, side, side]);
    let mut stats = net.running_stats();
    net.forward(&p, &x, BnMode::Batch(Some(&mut stats))).unwrap();
    let hw = side * side;
    let expect = |layer: usize, v: &[f64], c: usize| {
        let name = &stats.layers[layer].name;
        for (ch, (mean, unbiased)) in channel_moments(v, b, c, hw).into_iter().enumerate() {
            // PyTorch's update, momentum 0.1, from mean 0 and variance 1.
            let (m, var) = (0.1 * mean, 0.9 + 0.1 * unbiased);
            let (got_m, got_v) = (stats.mean(layer)[ch], stats.var(layer)[ch]);
            assert!((got_m - m).abs() < 1e-12, "{name}[{ch}]: mean {got_m} vs {m}");
            assert!((got_v - var).abs() < 1e-12, "{name}[{ch}]: var {got_v} vs {var}");
        }
    };
    let w = |n: &str| p.get(n).unwrap().clone();
    // block0.bn0 sees the first 3×3 convolution of the input.
    let conv0 = values(&ops::conv3x3(&x, &w("block0.conv0.weight")).unwrap());
    expect(0, &conv0, 3);
    // block0.bn1 sees the second convolution of LeakyReLU(BN(conv0)).
    let act = bn_leaky_by_hand(
        &conv0,
        (b, 3, hw),
        &values(&w("block0.bn0.weight")),
        &values(&w("block0.bn0.bias")),
    );
    let act = Tensor::from_vec(act, (b, 3, side, side), &Device::Cpu).unwrap();
    let conv1 = values(&ops::conv3x3(&act, &w("block0.conv1.weight")).unwrap());
    expect(1, &conv1, 3);
    // block0.shortcut_bn sees the 1×1 shortcut convolution of the input, written out here.
    let (xs, ws) = (values(&x), values(&w("block0.shortcut.weight")));
    let mut shortcut = vec![0.0; b * 3 * hw];
    for i in 0..b {
        for o in 0..3 {
            for ci in 0..2 {
                for k in 0..hw {
                    shortcut[(i * 3 + o) * hw + k] += ws[o * 2 + ci] * xs[(i * 2 + ci) * hw + k];
                }
            }
        }
    }
    expect(3, &shortcut, 3);
    // Every layer was updated, and a running-statistics pass leaves them alone.
    let fresh = net.running_stats();
    for (a, f) in stats.layers.iter().zip(&fresh.layers) {
        assert!(a.mean != f.mean && a.var != f.var, "{} was not updated", a.name);
    }
    let before = stats.clone();
    net.forward(&p, &x, BnMode::Running(&stats)).unwrap();
    assert_eq!(stats, before);
    // Without a running-statistics target a batch pass changes nothing either.
    let y1 = net.forward(&p, &x, BnMode::Batch(None)).unwrap();
    let y2 = net.forward(&p, &x, BnMode::Batch(None)).unwrap();
    assert_eq!(values(&y1), values(&y2));
}

#[test]
fn batch_and_running_modes_differ_until_the_statistics_converge() {
    // With momentum 1 the running statistics are the last batch's (unbiased variance), so a
    // running-statistics pass over the same batch is close to the batch pass but not equal.
    let config = ResNet12Config { bn_momentum: 1.0, ..small_config(true) };
    let net = ResNet12::new(config);
    let mut rng = ChaCha8Rng::seed_from_u64(60);
    let params = net.init(&mut rng, &Device::Cpu).unwrap();
    let p = as_params(&f64_vars(&params, &mut rng));
    let x: Vec<f64> = (0..8 * 2 * 32 * 32).map(|_| StandardNormal.sample(&mut rng)).collect();
    let x = Tensor::from_vec(x, (8, 2, 32, 32), &Device::Cpu).unwrap();
    let mut stats = net.running_stats();
    let y_batch = net.forward(&p, &x, BnMode::Batch(Some(&mut stats))).unwrap();
    let y_fresh = net.forward(&p, &x, BnMode::Running(&net.running_stats())).unwrap();
    let y_running = net.forward(&p, &x, BnMode::Running(&stats)).unwrap();
    let near = rel_err(&y_running, &y_batch);
    let far = rel_err(&y_fresh, &y_batch);
    assert!(near > 1e-6 && near < 0.05, "running vs batch statistics: {near:e}");
    assert!(far > 10.0 * near, "fresh statistics {far:e} vs updated {near:e}");
}
