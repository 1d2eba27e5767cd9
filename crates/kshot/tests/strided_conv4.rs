//! The strided-convolution Conv4 of MAML's and Reptile's Omniglot code: output sizes, the 'SAME'
//! stride-2 convolution against a direct one, gradients and Hessian-vector products through a
//! linear head against central finite differences (f64), and its running statistics.

use candle_core::{DType, Device, Result, Tensor, Var};
use kshot::nn::head::{self, Graph};
use kshot::nn::strided_conv4::{conv3x3_same_stride2, same_padding};
use kshot::nn::{
    ops, Backbone, BackboneConfig, BnLayerStats, BnMode, Params, RunningStats, StridedConv4,
    StridedConv4Config, StridedFeatures, BACKBONES,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a - b| / max(max |b|, 1e-12).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// A small config for the derivative checks: 2 → 3 channels, three blocks.
fn small(bn_scale: bool, features: StridedFeatures, fast_kernels: bool) -> StridedConv4Config {
    StridedConv4Config {
        hidden: 3,
        blocks: 3,
        bn_scale,
        features,
        fast_kernels,
        bn_momentum: 0.3,
        ..StridedConv4Config::maml_omniglot(2)
    }
}

const SMALL_CASES: [(bool, StridedFeatures, usize); 4] = [
    // 10 → 5 → 3 → 2 and 11 → 6 → 3 → 2: even and odd sizes in both settings.
    (false, StridedFeatures::Mean, 10),
    (false, StridedFeatures::Flatten, 11),
    (true, StridedFeatures::Mean, 11),
    (true, StridedFeatures::Flatten, 10),
];

/// The network with a 3-way linear head in f64 as variables (conv biases and batch-norm scale and
/// offset moved away from 0 and 1 so that their derivatives are generic), a batch of 4 and labels.
struct Problem {
    net: StridedConv4,
    vars: Vec<(String, Var)>,
    x: Tensor,
    labels: Tensor,
}

impl Problem {
    fn new(config: StridedConv4Config, size: usize, seed: u64) -> Self {
        let net = StridedConv4::new(config);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let init = head::init_linear_head(&net, (size, size), 3, &mut rng, &Device::Cpu).unwrap();
        let vars = init
            .iter()
            .map(|(n, v)| {
                let t = v.as_tensor().to_dtype(DType::F64).unwrap();
                let t = if n.starts_with("bn") || n.ends_with(".bias") {
                    (t + uniform(&mut rng, v.dims()) * 0.3).unwrap()
                } else {
                    t
                };
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let x = uniform(&mut rng, &[4, 2, size, size]);
        let labels = Tensor::new(&[0u32, 2, 1, 1], &Device::Cpu).unwrap();
        Self { net, vars, x, labels }
    }

    fn params(&self) -> Params {
        let mut p = Params::new();
        for (n, v) in &self.vars {
            p.insert(n.clone(), v.as_tensor().clone());
        }
        p
    }

    /// Cross-entropy of the linear head at `params` (batch statistics).
    fn loss(&self, params: &Params) -> f64 {
        let logits = head::linear_logits(&self.net, params, &self.x, BnMode::Batch(None)).unwrap();
        ops::cross_entropy(&logits, &self.labels).unwrap().to_scalar::<f64>().unwrap()
    }

    /// `params` with `name` replaced by `value`.
    fn with(&self, name: &str, value: Tensor) -> Params {
        let mut p = self.params();
        p.insert(name.to_string(), value);
        p
    }
}

#[test]
fn embeds_28_to_64_mean_or_256_flattened_and_84_to_64_or_2304() {
    let maml = StridedConv4Config::maml_omniglot(1);
    let reptile = StridedConv4Config::reptile_omniglot(1);
    assert_eq!(maml.output_size(28, 28), (2, 2)); // 28 → 14 → 7 → 4 → 2
    assert_eq!(maml.embedding_dim(28, 28), 64);
    assert_eq!(reptile.embedding_dim(28, 28), 256);
    assert_eq!(maml.output_size(84, 84), (6, 6)); // 84 → 42 → 21 → 11 → 6
    assert_eq!(StridedConv4Config::maml_omniglot(3).embedding_dim(84, 84), 64);
    assert_eq!(StridedConv4Config::reptile_omniglot(3).embedding_dim(84, 84), 2304);
    for (config, size, dim) in [
        (maml, 28, 64),
        (reptile, 28, 256),
        (StridedConv4Config::maml_omniglot(3), 84, 64),
        (StridedConv4Config::reptile_omniglot(3), 84, 2304),
    ] {
        let net = StridedConv4::new(config);
        assert_eq!(Backbone::embedding_dim(&net, size, size).unwrap(), dim);
        let params = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu).unwrap();
        let x = uniform(&mut ChaCha8Rng::seed_from_u64(1), &[2, config.in_channels, size, size])
            .to_dtype(DType::F32)
            .unwrap();
        let y = net.forward(&params.values(), &x, BnMode::Batch(None)).unwrap();
        assert_eq!(y.dims(), &[2, dim], "{config:?} at {size}×{size}");
    }
    assert!(Backbone::embedding_dim(&StridedConv4::new(maml), 0, 28).is_err());
}

#[test]
fn parameters_are_named_shaped_and_initialised_as_in_the_official_code() {
    let dev = Device::Cpu;
    let maml = StridedConv4::new(StridedConv4Config::maml_omniglot(1));
    let p = maml.init(&mut ChaCha8Rng::seed_from_u64(7), &dev).unwrap();
    let names: Vec<&str> = p.iter().map(|(n, _)| n).collect();
    let mut expect = Vec::new();
    for i in 0..4 {
        expect.extend([format!("conv{i}.weight"), format!("conv{i}.bias"), format!("bn{i}.bias")]);
    }
    assert_eq!(names, expect, "MAML's batch norm has no scale (tf.contrib.layers.batch_norm)");

    let reptile = StridedConv4::new(StridedConv4Config::reptile_omniglot(1));
    let p = reptile.init(&mut ChaCha8Rng::seed_from_u64(7), &dev).unwrap();
    assert_eq!(p.len(), 16);
    for i in 0..4 {
        let cin = if i == 0 { 1 } else { 64 };
        let w = p.get(&format!("conv{i}.weight")).unwrap();
        assert_eq!(w.dims(), &[64, cin, 3, 3]);
        // Glorot uniform: bound √(6 / (fan_in + fan_out)), variance bound² / 3.
        let bound = (6.0 / ((cin + 64) * 9) as f64).sqrt();
        let v = values(w.as_tensor());
        let max = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(max <= bound && max > 0.98 * bound, "conv{i}: max |w| {max} vs bound {bound}");
        let var = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        let tol = if i == 0 { 0.15 } else { 0.03 };
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < tol, "conv{i}: variance {var}");
        for (name, fill) in [
            (format!("conv{i}.bias"), 0.0),
            (format!("bn{i}.weight"), 1.0),
            (format!("bn{i}.bias"), 0.0),
        ] {
            let t = p.get(&name).unwrap();
            assert_eq!(t.dims(), &[64], "{name}");
            assert!(values(t.as_tensor()).iter().all(|&x| x == fill), "{name} is not {fill}");
        }
    }
    let stats = reptile.running_stats();
    let layers: Vec<&str> = stats.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(layers, ["bn0", "bn1", "bn2", "bn3"]);
}

/// TensorFlow's conv2d(strides 2, 'SAME') by its definition, one output at a time:
/// pad_along = max((out - 1)·2 + 3 - in, 0), pad_top = pad_along / 2, out = ⌈in/2⌉.
fn tf_same_stride2(x: &Tensor, w: &Tensor) -> Tensor {
    let (b, ci, h, wd) = x.dims4().unwrap();
    let co = w.dim(0).unwrap();
    let (xv, wv) = (values(x), values(w));
    let (ho, wo) = (h.div_ceil(2), wd.div_ceil(2));
    let top = ((ho - 1) * 2 + 3).saturating_sub(h) / 2;
    let left = ((wo - 1) * 2 + 3).saturating_sub(wd) / 2;
    let mut out = vec![0.0; b * co * ho * wo];
    for n in 0..b {
        for o in 0..co {
            for i in 0..ho {
                for j in 0..wo {
                    let mut acc = 0.0;
                    for c in 0..ci {
                        for kh in 0..3 {
                            for kw in 0..3 {
                                let r = (2 * i + kh) as isize - top as isize;
                                let s = (2 * j + kw) as isize - left as isize;
                                if r < 0 || s < 0 || r >= h as isize || s >= wd as isize {
                                    continue;
                                }
                                let xi = ((n * ci + c) * h + r as usize) * wd + s as usize;
                                acc += xv[xi] * wv[((o * ci + c) * 3 + kh) * 3 + kw];
                            }
                        }
                    }
                    out[((n * co + o) * ho + i) * wo + j] = acc;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, co, ho, wo), &Device::Cpu).unwrap()
}

#[test]
fn same_padding_is_tensorflows() {
    // Even sizes pad one zero row after, odd sizes one on each side.
    assert_eq!(same_padding(28), (0, 1));
    assert_eq!(same_padding(14), (0, 1));
    assert_eq!(same_padding(7), (1, 1));
    assert_eq!(same_padding(4), (0, 1));
    assert_eq!(same_padding(2), (0, 1));
    assert_eq!(same_padding(1), (1, 1));
}

#[test]
fn fused_stride2_conv_equals_tensorflows_same_stride2_conv() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut worst = [0f64; 2];
    for (h, w) in [(28, 28), (7, 7), (4, 4), (5, 5), (6, 7), (9, 4), (1, 1), (2, 3)] {
        let x = uniform(&mut rng, &[3, 2, h, w]);
        let k = uniform(&mut rng, &[4, 2, 3, 3]);
        let reference = tf_same_stride2(&x, &k);
        for dtype in [DType::F32, DType::F64] {
            let (xd, kd) = (x.to_dtype(dtype).unwrap(), k.to_dtype(dtype).unwrap());
            let fast = conv3x3_same_stride2(&xd, &kd, true).unwrap();
            let direct = conv3x3_same_stride2(&xd, &kd, false).unwrap();
            assert_eq!(fast.dims(), reference.dims(), "{h}×{w}");
            assert_eq!(direct.dims(), reference.dims(), "{h}×{w}");
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-13 };
            for (what, y) in [("fused kernel", &fast), ("candle conv2d", &direct)] {
                let e = rel_err(y, &reference);
                worst[(dtype == DType::F64) as usize] =
                    worst[(dtype == DType::F64) as usize].max(e);
                assert!(e < tol, "{what} {h}×{w} {dtype:?}: relative error {e:e}");
            }
        }
    }
    eprintln!(
        "SAME conv vs direct: worst relative error f32 {:.1e}, f64 {:.1e}",
        worst[0], worst[1]
    );
}

#[test]
fn fused_and_composite_paths_agree_on_the_official_networks() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = uniform(&mut rng, &[8, 1, 28, 28]).to_dtype(DType::F32).unwrap();
    for base in [StridedConv4Config::maml_omniglot(1), StridedConv4Config::reptile_omniglot(1)] {
        let fast = StridedConv4::new(base);
        let composite = StridedConv4::new(StridedConv4Config { fast_kernels: false, ..base });
        let params = fast.init(&mut rng, &Device::Cpu).unwrap().values();
        let (mut r_fast, mut r_comp) = (fast.running_stats(), composite.running_stats());
        let a = fast.forward(&params, &x, BnMode::Batch(Some(&mut r_fast))).unwrap();
        let b = composite.forward(&params, &x, BnMode::Batch(Some(&mut r_comp))).unwrap();
        assert!(rel_err(&a, &b) < 1e-5, "{base:?}: batch mode differs by {:e}", rel_err(&a, &b));
        for (l, m) in r_fast.layers.iter().zip(&r_comp.layers) {
            for (u, v) in l.mean.iter().zip(&m.mean).chain(l.var.iter().zip(&m.var)) {
                assert!((u - v).abs() < 1e-6 * v.abs().max(1.0), "{}: {u} vs {v}", l.name);
            }
        }
        let a = fast.forward(&params, &x, BnMode::Running(&r_fast)).unwrap();
        let b = composite.forward(&params, &x, BnMode::Running(&r_fast)).unwrap();
        assert!(rel_err(&a, &b) < 1e-5, "{base:?}: running mode differs by {:e}", rel_err(&a, &b));
    }
}

#[test]
fn mean_features_are_the_spatial_average_of_the_flattened_ones() {
    let mean = StridedConv4::new(StridedConv4Config::maml_omniglot(1));
    let flat = StridedConv4::new(StridedConv4Config {
        features: StridedFeatures::Flatten,
        ..StridedConv4Config::maml_omniglot(1)
    });
    let params = mean.init(&mut ChaCha8Rng::seed_from_u64(8), &Device::Cpu).unwrap().values();
    let x = uniform(&mut ChaCha8Rng::seed_from_u64(9), &[3, 1, 28, 28]);
    let params64 = {
        let mut p = Params::new();
        for (n, t) in params.iter() {
            p.insert(n.clone(), t.to_dtype(DType::F64).unwrap());
        }
        p
    };
    let m = mean.forward(&params64, &x, BnMode::Batch(None)).unwrap();
    let f = flat.forward(&params64, &x, BnMode::Batch(None)).unwrap();
    assert_eq!(f.dims(), &[3, 256]);
    // [B, C·2·2] is channel-major: each channel's 2×2 positions are adjacent.
    let averaged = f.reshape((3, 64, 4)).unwrap().mean(2).unwrap();
    assert!(rel_err(&m, &averaged) < 1e-14);
}

/// Every coordinate of every parameter: the gradient `linear_loss_and_grad` gives against
/// central differences of the loss. Returns the worst error relative to 1 + |finite difference|.
fn gradient_check(config: StridedConv4Config, size: usize, seed: u64) -> f64 {
    let pb = Problem::new(config, size, seed);
    let params = pb.params();
    let out =
        head::linear_loss_and_grad(&pb.net, &params, &pb.x, &pb.labels, Graph::Detached).unwrap();
    assert!((out.loss.to_scalar::<f64>().unwrap() - pb.loss(&params)).abs() < 1e-14);
    let names: Vec<&String> = out.grads.iter().map(|(n, _)| n).collect();
    let expect: Vec<&String> = params.iter().map(|(n, _)| n).collect();
    assert_eq!(names, expect, "one gradient per parameter");
    assert_eq!(
        names.iter().any(|n| n.starts_with("bn") && n.ends_with(".weight")),
        config.bn_scale,
        "a batch-norm scale exactly when bn_scale"
    );
    let h = 1e-5;
    let mut worst = 0f64;
    for (name, var) in &pb.vars {
        let analytic = values(out.grads.get(name).unwrap());
        let base = values(var.as_tensor());
        for (i, a) in analytic.iter().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                pb.loss(&pb.with(name, Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap()))
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - a).abs() / (1.0 + numeric.abs());
            worst = worst.max(err);
            assert!(
                err < 1e-9,
                "{config:?} {size}×{size}: {name}[{i}]: analytic {a} vs finite difference {numeric}"
            );
        }
        if name.starts_with("conv") && name.ends_with(".bias") {
            // Batch norm right after the convolution cancels its bias in batch mode.
            assert!(analytic.iter().all(|g| g.abs() < 1e-12), "{name}: {analytic:?}");
        }
    }
    worst
}

#[test]
fn gradients_match_finite_differences_in_both_settings_and_feature_modes() {
    let mut worst = 0f64;
    for (k, (bn_scale, features, size)) in SMALL_CASES.into_iter().enumerate() {
        for fast_kernels in [true, false] {
            let e = gradient_check(small(bn_scale, features, fast_kernels), size, 10 + k as u64);
            worst = worst.max(e);
        }
    }
    eprintln!("gradient vs finite differences: worst error {worst:.1e}");
}

/// Σ_name a[name]·b[name] over the names of `b`.
fn dot(a: &Params, b: &Params) -> Tensor {
    let mut total = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for (name, t) in b.iter() {
        total = (total + (a.get(name).unwrap() * t).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

/// The Hessian-vector product d/dθ (∇L · v) by candle's second-order pass against central
/// differences of the gradient along v. Returns the worst error relative to the largest entry, and
/// the products by parameter name.
fn hvp_check(config: StridedConv4Config, size: usize, seed: u64) -> (f64, Params) {
    kshot::autograd::init();
    assert!(kshot::autograd::second_order_available());
    let pb = Problem::new(config, size, seed);
    let params = pb.params();
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 100);
    let mut v = Params::new();
    for (name, var) in &pb.vars {
        v.insert(name.clone(), uniform(&mut rng, var.dims()));
    }
    let out = head::linear_loss_and_grad(&pb.net, &params, &pb.x, &pb.labels, Graph::Keep).unwrap();
    let store = dot(&v, &out.grads).backward().unwrap();

    let eps = 1e-6;
    let grads_at = |s: f64| {
        let mut p = Params::new();
        for (name, t) in params.iter() {
            p.insert(name.clone(), (t.detach() + (v.get(name).unwrap() * s).unwrap()).unwrap());
        }
        head::linear_loss_and_grad(&pb.net, &p, &pb.x, &pb.labels, Graph::Detached).unwrap().grads
    };
    let (plus, minus) = (grads_at(eps), grads_at(-eps));
    let mut fd = Vec::new();
    let mut scale = 0f64;
    for (name, var) in &pb.vars {
        let numeric =
            ((plus.get(name).unwrap() - minus.get(name).unwrap()).unwrap() / (2.0 * eps)).unwrap();
        scale = values(&numeric).iter().fold(scale, |m, x| m.max(x.abs()));
        fd.push((name, var, numeric));
    }
    assert!(scale > 1e-2, "{config:?}: the Hessian-vector product is trivially small ({scale})");
    let mut worst = 0f64;
    let mut hvps = Params::new();
    for (name, var, numeric) in fd {
        let hv = match store.get(var.as_tensor()) {
            Some(t) => t.clone(),
            None => numeric.zeros_like().unwrap(),
        };
        let (a, b) = (values(&hv), values(&numeric));
        let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
        worst = worst.max(err);
        assert!(
            err < 1e-8,
            "{config:?} {size}×{size}: {name}: Hessian-vector product off by {err:e}"
        );
        hvps.insert(name.clone(), hv);
    }
    (worst, hvps)
}

#[test]
fn hessian_vector_products_match_finite_differences_of_the_gradient() {
    let (mut worst, mut worst_composite, mut worst_between) = (0f64, 0f64, 0f64);
    for (k, (bn_scale, features, size)) in SMALL_CASES.into_iter().enumerate() {
        let seed = 20 + k as u64;
        let (e, fast) = hvp_check(small(bn_scale, features, true), size, seed);
        worst = worst.max(e);
        let (e, composite) = hvp_check(small(bn_scale, features, false), size, seed);
        worst_composite = worst_composite.max(e);
        // The fused kernels and candle's conv2d give the same second derivatives (relative to the
        // largest entry of all: the conv biases' are zero up to rounding).
        let scale = fast.iter().flat_map(|(_, t)| values(t)).fold(0f64, |m, x| m.max(x.abs()));
        for (name, a) in fast.iter() {
            let b = values(composite.get(name).unwrap());
            let d = values(a).iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
            worst_between = worst_between.max(d);
            assert!(
                d < 1e-10,
                "{name}: fused and composite Hessian-vector products differ by {d:e}"
            );
        }
    }
    eprintln!(
        "Hessian-vector product vs finite differences: worst relative error {worst:.1e} (fused), \
         {worst_composite:.1e} (composite); fused vs composite {worst_between:.1e}"
    );
}

/// The running statistics after batch-mode forward passes, against the statistics of each block's
/// pre-normalisation activations computed here; and running mode with the batch's own (biased)
/// statistics reproduces batch mode.
#[test]
fn running_statistics_follow_the_batch_statistics_of_the_strided_outputs() {
    for fast_kernels in [true, false] {
        let config =
            StridedConv4Config { hidden: 4, ..small(true, StridedFeatures::Flatten, fast_kernels) };
        let pb = Problem::new(config, 11, 40);
        let params = pb.params();
        let m = config.bn_momentum;

        // Each block by hand: conv + bias, its per-channel statistics, batch norm, ReLU.
        let mut expected: Vec<(Vec<f64>, Vec<f64>, usize)> = Vec::new();
        let mut h = pb.x.clone();
        for i in 0..config.blocks {
            let get = |name: String| params.get(&name).unwrap().clone();
            let bias = get(format!("conv{i}.bias")).reshape((1, 4, 1, 1)).unwrap();
            let z = conv3x3_same_stride2(&h, &get(format!("conv{i}.weight")), false)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let (b, c, ho, wo) = z.dims4().unwrap();
            let zv = values(&z);
            let n = b * ho * wo;
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            for ch in 0..c {
                let xs: Vec<f64> = (0..b)
                    .flat_map(|bi| zv[(bi * c + ch) * ho * wo..][..ho * wo].to_vec())
                    .collect();
                mean[ch] = xs.iter().sum::<f64>() / n as f64;
                var[ch] = xs.iter().map(|x| (x - mean[ch]).powi(2)).sum::<f64>() / n as f64;
            }
            let gamma = values(&get(format!("bn{i}.weight")));
            let beta = values(&get(format!("bn{i}.bias")));
            let mut y = zv.clone();
            for (k, v) in y.iter_mut().enumerate() {
                let ch = k / (ho * wo) % c;
                let t = gamma[ch] * (*v - mean[ch]) / (var[ch] + config.bn_eps).sqrt() + beta[ch];
                *v = t.max(0.0);
            }
            h = Tensor::from_vec(y, (b, c, ho, wo), &Device::Cpu).unwrap();
            expected.push((mean, var, n));
        }
        assert_eq!(expected.iter().map(|e| e.2).collect::<Vec<_>>(), [4 * 36, 4 * 9, 4 * 4]);

        let mut running = pb.net.running_stats();
        let batch = pb.net.forward(&params, &pb.x, BnMode::Batch(Some(&mut running))).unwrap();
        assert!(rel_err(&batch, &h.flatten_from(1).unwrap()) < 1e-12);
        let after_one = running.clone();
        pb.net.forward(&params, &pb.x, BnMode::Batch(Some(&mut running))).unwrap();
        for (i, (mean, var, n)) in expected.iter().enumerate() {
            let unbias = *n as f64 / (*n as f64 - 1.0);
            for ch in 0..4 {
                let (m1, v1) = (m * mean[ch], (1.0 - m) + m * var[ch] * unbias);
                let (m2, v2) =
                    ((1.0 - m) * m1 + m * mean[ch], (1.0 - m) * v1 + m * var[ch] * unbias);
                for (got, want, what) in [
                    (after_one.mean(i)[ch], m1, "mean after one batch"),
                    (after_one.var(i)[ch], v1, "variance after one batch"),
                    (running.mean(i)[ch], m2, "mean after two batches"),
                    (running.var(i)[ch], v2, "variance after two batches"),
                ] {
                    assert!((got - want).abs() < 1e-12, "bn{i}[{ch}] {what}: {got} vs {want}");
                }
            }
        }

        // Running mode with the batch's own statistics is batch mode.
        let own = RunningStats {
            layers: expected
                .iter()
                .enumerate()
                .map(|(i, (mean, var, _))| BnLayerStats {
                    name: format!("bn{i}"),
                    mean: mean.clone(),
                    var: var.clone(),
                })
                .collect(),
        };
        let fixed = pb.net.forward(&params, &pb.x, BnMode::Running(&own)).unwrap();
        assert!(rel_err(&fixed, &batch) < 1e-12, "running mode: {:e}", rel_err(&fixed, &batch));
        // And the running averages give something else (they are not the batch's statistics).
        let drifted = pb.net.forward(&params, &pb.x, BnMode::Running(&running)).unwrap();
        assert!(rel_err(&drifted, &batch) > 1e-3);
    }
}

#[test]
fn registered_as_the_conv4_strided_backbone() -> Result<()> {
    assert!(BACKBONES.contains(&"conv4-strided"));
    let mut config = BackboneConfig::named("conv4-strided", 1).unwrap();
    assert_eq!(config, BackboneConfig::Conv4Strided(StridedConv4Config::maml_omniglot(1)));
    assert_eq!(config.kind(), "conv4-strided");
    assert_eq!(config.in_channels(), 1);
    config.set_in_channels(3);
    assert_eq!(config.in_channels(), 3);
    assert!(config.conv4_mut().is_none());
    let net = config.build();
    assert_eq!(net.kind(), "conv4-strided");
    assert_eq!(net.embedding_dim(84, 84)?, 64);
    assert_eq!(net.running_stats().layers.len(), 4);

    let reptile = BackboneConfig::Conv4Strided(StridedConv4Config::reptile_omniglot(1));
    let json = serde_json::to_value(&reptile).unwrap();
    assert_eq!(json["kind"], "conv4-strided");
    assert_eq!(json["features"], "flatten");
    assert_eq!(json["bn_scale"], true);
    assert_eq!(serde_json::from_value::<BackboneConfig>(json.clone()).unwrap(), reptile);
    // Configs written without `fast_kernels` get the fused kernels.
    let mut old = json;
    old.as_object_mut().unwrap().remove("fast_kernels");
    assert_eq!(serde_json::from_value::<BackboneConfig>(old).unwrap(), reptile);
    Ok(())
}
