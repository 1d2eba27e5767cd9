//! The fused kernels against the composite reference ops, finite differences (first and second
//! order, f64) and each other through a whole Conv4.

use candle_core::{DType, Device, Result, Tensor, Var};
use kshot::kernels;
use kshot::nn::{ops, BnMode, Conv4, Conv4Config, Params};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Loss<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

const DTYPES: [DType; 2] = [DType::F32, DType::F64];
const EPS: f64 = 1e-5;

fn setup() {
    kshot::autograd::init();
    assert!(kshot::autograd::second_order_available());
}

fn uniform(seed: u64, dims: &[usize], dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dtype)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (values(a)?, values(b)?);
    let scale = b.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    Ok(a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale)
}

#[track_caller]
fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let e = rel_err(a, b).unwrap();
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        2e-5
    } else {
        1e-12
    }
}

/// Σ r·y² + Σ q·y with fixed random r, q: a scalar loss with a non-trivial Hessian.
fn quad(y: &Tensor, seed: u64) -> Result<Tensor> {
    let r = uniform(seed, y.dims(), y.dtype())?;
    let q = uniform(seed + 1, y.dims(), y.dtype())?;
    (y.sqr()? * r)?.sum_all()? + (y * q)?.sum_all()?
}

fn leaves(theta: &[Tensor]) -> Result<Vec<Tensor>> {
    theta.iter().map(|t| Ok(Var::from_tensor(t)?.as_tensor().clone())).collect()
}

fn gradient(f: Loss, theta: &[Tensor]) -> Result<Vec<Tensor>> {
    let theta = leaves(theta)?;
    let g = f(&theta)?.backward()?;
    theta.iter().map(|t| g.get(t).cloned().map_or_else(|| t.zeros_like(), Ok)).collect()
}

/// Hessian-vector product by differentiating g·v, with g from a first backward pass.
fn hvp(f: Loss, theta: &[Tensor], v: &[Tensor]) -> Result<Vec<Tensor>> {
    let theta = leaves(theta)?;
    let g = f(&theta)?.backward()?;
    let mut gv = Tensor::zeros((), theta[0].dtype(), &Device::Cpu)?;
    for (t, v) in theta.iter().zip(v) {
        if let Some(gt) = g.get(t) {
            gv = (gv + (gt * v)?.sum_all()?)?;
        }
    }
    let h = gv.backward()?;
    theta.iter().map(|t| h.get(t).cloned().map_or_else(|| t.zeros_like(), Ok)).collect()
}

/// Central differences of `f` in every coordinate of every argument.
fn fd_gradient(f: Loss, theta: &[Tensor]) -> Result<Vec<Tensor>> {
    let eval = |ts: &[Tensor]| f(ts)?.to_scalar::<f64>();
    let mut out = Vec::new();
    for i in 0..theta.len() {
        let base = values(&theta[i])?;
        let mut g = vec![0.0; base.len()];
        for (j, gj) in g.iter_mut().enumerate() {
            let at = |d: f64| {
                let mut v = base.clone();
                v[j] += d;
                let mut ts = theta.to_vec();
                ts[i] = Tensor::from_vec(v, theta[i].dims(), &Device::Cpu)?;
                eval(&ts)
            };
            *gj = (at(EPS)? - at(-EPS)?) / (2.0 * EPS);
        }
        out.push(Tensor::from_vec(g, theta[i].dims(), &Device::Cpu)?);
    }
    Ok(out)
}

/// Central differences of the gradient along `v`.
fn fd_hvp(f: Loss, theta: &[Tensor], v: &[Tensor]) -> Result<Vec<Tensor>> {
    let shifted = |s: f64| -> Result<Vec<Tensor>> {
        let ts = theta.iter().zip(v).map(|(t, v)| t + (v * s)?).collect::<Result<Vec<_>>>()?;
        gradient(f, &ts)
    };
    let (plus, minus) = (shifted(EPS)?, shifted(-EPS)?);
    plus.iter().zip(&minus).map(|(p, m)| (p - m)? / (2.0 * EPS)).collect()
}

/// The gradient against the composite op's and central differences, and the Hessian-vector
/// product against the composite op's and central differences of the gradient, all in f64.
fn check_derivatives(fast: Loss, composite: Loss, theta: &[Tensor], what: &str) -> Result<()> {
    let v = directions(theta)?;
    let (g, h) = (gradient(fast, theta)?, hvp(fast, theta, &v)?);
    let (g_ref, h_ref) = (gradient(composite, theta)?, hvp(composite, theta, &v)?);
    for i in 0..theta.len() {
        assert_close(&g[i], &g_ref[i], 1e-12, &format!("{what}: gradient {i} vs composite"));
        assert_close(
            &h[i],
            &h_ref[i],
            1e-11,
            &format!("{what}: Hessian-vector product {i} vs composite"),
        );
    }
    check_finite_differences(fast, theta, what)
}

fn directions(theta: &[Tensor]) -> Result<Vec<Tensor>> {
    (0..theta.len()).map(|i| uniform(900 + i as u64, theta[i].dims(), DType::F64)).collect()
}

/// The gradient against central differences, and the Hessian-vector product against central
/// differences of the gradient, in f64.
fn check_finite_differences(f: Loss, theta: &[Tensor], what: &str) -> Result<()> {
    let v = directions(theta)?;
    let (g, h) = (gradient(f, theta)?, hvp(f, theta, &v)?);
    let (g_fd, h_fd) = (fd_gradient(f, theta)?, fd_hvp(f, theta, &v)?);
    for i in 0..theta.len() {
        assert_close(&g[i], &g_fd[i], 1e-8, &format!("{what}: gradient {i} vs finite differences"));
        assert_close(
            &h[i],
            &h_fd[i],
            1e-8,
            &format!("{what}: Hessian-vector product {i} vs finite differences"),
        );
        assert!(
            values(&h[i])?.iter().any(|x| x.abs() > 1e-3),
            "{what}: Hessian-vector product {i} is trivially zero"
        );
    }
    Ok(())
}

/// 12×12 planes (one gemm per image, written straight into the output) and smaller ones (batched
/// into one gemm), with batches above and below the 8 blocks the kernels aim for.
const CONV_SHAPES: [([usize; 4], usize); 7] = [
    ([3, 2, 12, 12], 16),
    ([9, 2, 12, 11], 5),
    ([2, 3, 7, 7], 4),
    ([3, 2, 5, 5], 5),
    ([9, 4, 5, 5], 3),
    ([2, 3, 6, 9], 2),
    ([1, 1, 1, 1], 1),
];

#[test]
fn conv_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, (xd, co)) in CONV_SHAPES.into_iter().enumerate() {
            let x = uniform(i as u64, &xd, dtype)?;
            let w = uniform(100 + i as u64, &[co, xd[1], 3, 3], dtype)?;
            let what = format!("conv3x3 {xd:?}→{co} {dtype:?}");
            assert_close(&kernels::conv3x3(&x, &w)?, &ops::conv3x3(&x, &w)?, tol(dtype), &what);
            let loss = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
                move |t: &[Tensor]| quad(&f(&t[0], &t[1])?, 7)
            };
            let g = gradient(&loss(kernels::conv3x3), &[x.clone(), w.clone()])?;
            let g_ref = gradient(&loss(ops::conv3x3), &[x, w])?;
            for (g, g_ref) in g.iter().zip(&g_ref) {
                assert_close(g, g_ref, 10.0 * tol(dtype), &format!("{what} gradient"));
            }
        }
    }
    Ok(())
}

#[test]
fn conv_derivatives_are_exact() -> Result<()> {
    setup();
    for (i, (xd, co)) in
        [([2, 2, 5, 5], 3), ([3, 2, 4, 3], 2), ([2, 2, 12, 12], 16)].into_iter().enumerate()
    {
        let x = uniform(10 + i as u64, &xd, DType::F64)?;
        let w = uniform(20 + i as u64, &[co, xd[1], 3, 3], DType::F64)?;
        let fast = |t: &[Tensor]| quad(&kernels::conv3x3(&t[0], &t[1])?, 3);
        let composite = |t: &[Tensor]| quad(&ops::conv3x3(&t[0], &t[1])?, 3);
        check_derivatives(&fast, &composite, &[x, w], &format!("conv3x3 {xd:?}→{co}"))?;
    }
    Ok(())
}

#[test]
fn conv_through_two_layers_second_order() -> Result<()> {
    setup();
    // Second order through a hidden convolution: its input is itself a function of the weights.
    let x = uniform(30, &[2, 2, 5, 5], DType::F64)?;
    let w1 = uniform(31, &[3, 2, 3, 3], DType::F64)?;
    let w2 = uniform(32, &[2, 3, 3, 3], DType::F64)?;
    let net = |conv: fn(&Tensor, &Tensor) -> Result<Tensor>| {
        let x = x.clone();
        move |t: &[Tensor]| quad(&conv(&conv(&x, &t[0])?.tanh()?, &t[1])?, 5)
    };
    check_derivatives(&net(kernels::conv3x3), &net(ops::conv3x3), &[w1, w2], "two convolutions")
}

/// The stride-2 'SAME' convolution as candle-op composites: the stride-1 composite convolution,
/// then rows and columns 1, 3, … of even sizes and 0, 2, … of odd ones (see `strided_conv4.rs`).
fn composite_stride2(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = ops::conv3x3(x, w)?;
    let (b, c, h, wd) = y.dims4()?;
    let y = if h % 2 == 1 { y.pad_with_zeros(2, 0, 1)? } else { y };
    let y = if wd % 2 == 1 { y.pad_with_zeros(3, 0, 1)? } else { y };
    let (ho, wo) = (h.div_ceil(2), wd.div_ceil(2));
    y.reshape((b, c, ho, 2, wo, 2))?
        .narrow(3, 1 - h % 2, 1)?
        .narrow(5, 1 - wd % 2, 1)?
        .reshape((b, c, ho, wo))
}

/// Odd and even sides, single rows and columns, and batches above and below 8 blocks.
const STRIDE2_SHAPES: [([usize; 4], usize); 8] = [
    ([3, 2, 28, 28], 4),
    ([20, 2, 7, 7], 3),
    ([9, 3, 4, 4], 5),
    ([2, 2, 5, 6], 2),
    ([3, 1, 9, 4], 3),
    ([2, 2, 2, 3], 2),
    ([17, 2, 2, 2], 3),
    ([1, 1, 1, 1], 1),
];

#[test]
fn conv_stride2_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, (xd, co)) in STRIDE2_SHAPES.into_iter().enumerate() {
            let x = uniform(60 + i as u64, &xd, dtype)?;
            let w = uniform(160 + i as u64, &[co, xd[1], 3, 3], dtype)?;
            let what = format!("conv3x3_same_stride2 {xd:?}→{co} {dtype:?}");
            let y = kernels::conv3x3_same_stride2(&x, &w)?;
            assert_eq!(y.dims(), [xd[0], co, xd[2].div_ceil(2), xd[3].div_ceil(2)], "{what}");
            assert_close(&y, &composite_stride2(&x, &w)?, tol(dtype), &what);
            let loss = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
                move |t: &[Tensor]| quad(&f(&t[0], &t[1])?, 7)
            };
            let g = gradient(&loss(kernels::conv3x3_same_stride2), &[x.clone(), w.clone()])?;
            let g_ref = gradient(&loss(composite_stride2), &[x.clone(), w.clone()])?;
            for (g, g_ref) in g.iter().zip(&g_ref) {
                assert_close(g, g_ref, 10.0 * tol(dtype), &format!("{what} gradient"));
            }
            // The explicit VJP is the op's own backward.
            let dy = uniform(260 + i as u64, y.dims(), dtype)?;
            let (dx, dw) = kernels::conv3x3_same_stride2_vjp(&x, &w, &dy, true)?;
            let inner =
                |t: &[Tensor]| (kernels::conv3x3_same_stride2(&t[0], &t[1])? * &dy)?.sum_all();
            let g = gradient(&inner, &[x, w])?;
            assert_close(&dx.unwrap(), &g[0], tol(dtype), &format!("{what} VJP, input"));
            assert_close(&dw, &g[1], tol(dtype), &format!("{what} VJP, weight"));
        }
    }
    Ok(())
}

#[test]
fn conv_stride2_derivatives_are_exact() -> Result<()> {
    setup();
    for (i, (xd, co)) in
        [([2, 2, 5, 5], 3), ([3, 2, 4, 3], 2), ([2, 1, 8, 8], 4)].into_iter().enumerate()
    {
        let x = uniform(70 + i as u64, &xd, DType::F64)?;
        let w = uniform(170 + i as u64, &[co, xd[1], 3, 3], DType::F64)?;
        let fast = |t: &[Tensor]| quad(&kernels::conv3x3_same_stride2(&t[0], &t[1])?, 3);
        let composite = |t: &[Tensor]| quad(&composite_stride2(&t[0], &t[1])?, 3);
        check_derivatives(&fast, &composite, &[x, w], &format!("stride-2 conv {xd:?}→{co}"))?;
    }
    // Second order through a hidden strided convolution, and through the VJP ops themselves: a
    // loss of a second layer's input and weight gradients, differentiated twice.
    let x = uniform(80, &[3, 2, 7, 6], DType::F64)?;
    let w1 = uniform(81, &[3, 2, 3, 3], DType::F64)?;
    let w2 = uniform(82, &[2, 3, 3, 3], DType::F64)?;
    let net = |conv: fn(&Tensor, &Tensor) -> Result<Tensor>| {
        let x = x.clone();
        move |t: &[Tensor]| quad(&conv(&conv(&x, &t[0])?.tanh()?, &t[1])?, 5)
    };
    check_derivatives(
        &net(kernels::conv3x3_same_stride2),
        &net(composite_stride2),
        &[w1.clone(), w2.clone()],
        "two strided convolutions",
    )?;
    let dy = uniform(83, &[3, 2, 2, 2], DType::F64)?;
    let of_vjp = |t: &[Tensor]| {
        let h = kernels::conv3x3_same_stride2(&x, &t[0])?.tanh()?;
        let (dh, dw) = kernels::conv3x3_same_stride2_vjp(&h, &t[1], &(&dy * &t[2])?, true)?;
        quad(&dh.unwrap(), 11)? + quad(&dw, 12)?
    };
    let scale = uniform(84, &[3, 2, 2, 2], DType::F64)?;
    // The VJP ops have no composite form here: they are held to central differences.
    check_finite_differences(&of_vjp, &[w1, w2, scale], "the strided convolution's VJP ops")
}

const POOL_SHAPES: [[usize; 4]; 5] =
    [[2, 3, 7, 7], [2, 2, 5, 6], [3, 1, 4, 4], [1, 2, 3, 2], [1, 1, 1, 3]];

#[test]
fn pool_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, d) in POOL_SHAPES.into_iter().enumerate() {
            let x = uniform(40 + i as u64, &d, dtype)?;
            let what = format!("max_pool2x2 {d:?} {dtype:?}");
            let y = kernels::max_pool2x2(&x)?;
            assert_eq!(y.dims(), [d[0], d[1], d[2] / 2, d[3] / 2], "{what}");
            if y.elem_count() == 0 {
                // The composite op cannot reduce an empty window; the gradient is all zeros.
                let g = gradient(&|t| kernels::max_pool2x2(&t[0])?.sum_all(), &[x])?;
                assert!(values(&g[0])?.iter().all(|&v| v == 0.0), "{what}");
                continue;
            }
            assert_close(&y, &ops::max_pool2x2(&x)?, 0.0, &what);
            let g =
                gradient(&|t| quad(&kernels::max_pool2x2(&t[0])?, 1), std::slice::from_ref(&x))?;
            let g_ref = gradient(&|t| quad(&ops::max_pool2x2(&t[0])?, 1), &[x])?;
            assert_close(&g[0], &g_ref[0], tol(dtype), &format!("{what} gradient"));
        }
    }
    Ok(())
}

#[test]
fn pool_ties_go_to_the_first_maximum() -> Result<()> {
    setup();
    #[rustfmt::skip]
    let x = [1f64, 2., 5., 2., 0., 5., 9., 9., 9.,
             3., 3., 0., 3., 3., 7., 7., 7., 1.];
    let x = Tensor::from_vec(x.to_vec(), (2, 1, 3, 3), &Device::Cpu)?;
    let g = gradient(&|t| kernels::max_pool2x2(&t[0])?.sum_all(), &[x])?;
    let expected = [0., 1., 0., 0., 0., 0., 0., 0., 0., 1., 0., 0., 0., 0., 0., 0., 0., 0.];
    assert_eq!(values(&g[0])?, expected);
    Ok(())
}

#[test]
fn pool_derivatives_are_exact() -> Result<()> {
    setup();
    for (i, d) in [[2, 2, 5, 5], [1, 3, 4, 7]].into_iter().enumerate() {
        let x = uniform(50 + i as u64, &d, DType::F64)?;
        let fast = |t: &[Tensor]| quad(&kernels::max_pool2x2(&t[0])?, 9);
        let composite = |t: &[Tensor]| quad(&ops::max_pool2x2(&t[0])?, 9);
        check_derivatives(&fast, &composite, &[x], &format!("max_pool2x2 {d:?}"))?;
    }
    Ok(())
}

fn composite_bn_relu(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    ops::batch_norm_train(x, gamma, beta, 1e-5)?.0.relu()
}

fn fast_bn_relu(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    Ok(kernels::batch_norm_relu_train(x, gamma, beta, 1e-5)?.0)
}

#[test]
fn batch_norm_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, d) in
            [[3, 4, 5, 5], [2, 3, 7, 7], [5, 2, 1, 1], [1, 3, 2, 3]].into_iter().enumerate()
        {
            let x = (uniform(60 + i as u64, &d, dtype)? * 3.0)?.affine(1.0, 0.5)?;
            let gamma = uniform(70 + i as u64, &[d[1]], dtype)?;
            let beta = uniform(80 + i as u64, &[d[1]], dtype)?;
            let what = format!("batch_norm_relu_train {d:?} {dtype:?}");
            let (y, stats) = kernels::batch_norm_relu_train(&x, &gamma, &beta, 1e-5)?;
            let (y_ref, stats_ref) = ops::batch_norm_train(&x, &gamma, &beta, 1e-5)?;
            assert_close(&y, &y_ref.relu()?, tol(dtype), &what);
            assert_eq!(stats.count, stats_ref.count, "{what}");
            for (a, b) in
                stats.mean.iter().chain(&stats.var).zip(stats_ref.mean.iter().chain(&stats_ref.var))
            {
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{what}: statistics {a} vs {b}");
            }
            let theta = [x, gamma, beta];
            let g = gradient(&|t| quad(&fast_bn_relu(&t[0], &t[1], &t[2])?, 2), &theta)?;
            let g_ref = gradient(&|t| quad(&composite_bn_relu(&t[0], &t[1], &t[2])?, 2), &theta)?;
            for (g, g_ref) in g.iter().zip(&g_ref) {
                assert_close(g, g_ref, 10.0 * tol(dtype), &format!("{what} gradient"));
            }
        }
    }
    Ok(())
}

#[test]
fn batch_norm_statistics_are_summed_in_f64() -> Result<()> {
    setup();
    // A large offset with a small spread: f32 sums would lose the variance.
    let x =
        (uniform(90, &[64, 2, 8, 8], DType::F64)?.affine(1e-2, 1000.0)?).to_dtype(DType::F32)?;
    let ones = Tensor::ones(2, DType::F32, &Device::Cpu)?;
    let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
    let (_, stats) = kernels::batch_norm_relu_train(&x, &ones, &zeros, 1e-5)?;
    let (_, exact) = ops::batch_norm_train(
        &x.to_dtype(DType::F64)?,
        &ones.to_dtype(DType::F64)?,
        &zeros.to_dtype(DType::F64)?,
        1e-5,
    )?;
    for (a, b) in stats.mean.iter().chain(&stats.var).zip(exact.mean.iter().chain(&exact.var)) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "statistics {a} vs {b}");
    }
    Ok(())
}

#[test]
fn batch_norm_derivatives_are_exact() -> Result<()> {
    setup();
    for (i, d) in [[3, 2, 3, 3], [4, 3, 2, 1]].into_iter().enumerate() {
        let x = uniform(100 + i as u64, &d, DType::F64)?;
        let gamma = uniform(110 + i as u64, &[d[1]], DType::F64)?.affine(1.0, 0.5)?;
        let beta = uniform(120 + i as u64, &[d[1]], DType::F64)?;
        let fast = |t: &[Tensor]| quad(&fast_bn_relu(&t[0], &t[1], &t[2])?, 4);
        let composite = |t: &[Tensor]| quad(&composite_bn_relu(&t[0], &t[1], &t[2])?, 4);
        check_derivatives(
            &fast,
            &composite,
            &[x, gamma, beta],
            &format!("batch_norm_relu_train {d:?}"),
        )?;
    }
    Ok(())
}

fn conv4_params(net: &Conv4, dtype: DType) -> Result<(Vec<String>, Vec<Tensor>)> {
    let p = net.init(&mut ChaCha8Rng::seed_from_u64(0), &Device::Cpu)?;
    let mut names = Vec::new();
    let mut tensors = Vec::new();
    for (i, (n, v)) in p.iter().enumerate() {
        names.push(n.to_string());
        // Non-trivial batch-norm scales and shifts.
        let t = if n.starts_with("bn") {
            uniform(200 + i as u64, v.dims(), dtype)?.affine(0.5, 1.0)?
        } else {
            v.to_dtype(dtype)?
        };
        tensors.push(t);
    }
    Ok((names, tensors))
}

fn conv4_loss(
    hidden: usize,
    in_ch: usize,
    fast: bool,
    x: &Tensor,
    names: &[String],
    t: &[Tensor],
) -> Result<Tensor> {
    let net = Conv4::new(Conv4Config { hidden, fast_kernels: fast, ..Conv4Config::new(in_ch) });
    let mut p = Params::new();
    for (n, t) in names.iter().zip(t) {
        p.insert(n.clone(), t.clone());
    }
    quad(&net.forward(&p, x, BnMode::Batch(None))?, 11)
}

#[test]
fn conv4_fast_matches_composite() -> Result<()> {
    setup();
    let net = Conv4::new(Conv4Config::new(1));
    for dtype in DTYPES {
        let x = uniform(300, &[6, 1, 28, 28], dtype)?;
        let (names, theta) = conv4_params(&net, dtype)?;
        let mut p = Params::new();
        for (n, t) in names.iter().zip(&theta) {
            p.insert(n.clone(), t.clone());
        }
        for fast in [true, false] {
            assert_eq!(
                Conv4::new(Conv4Config { fast_kernels: fast, ..net.config })
                    .forward(&p, &x, BnMode::Batch(None))?
                    .dims(),
                [6, 64]
            );
        }
        let (x, names) = (&x, &names);
        let loss = |fast| move |t: &[Tensor]| conv4_loss(64, 1, fast, x, names, t);
        let (l, l_ref) = (loss(true)(&theta)?, loss(false)(&theta)?);
        assert_close(&l, &l_ref, 10.0 * tol(dtype), &format!("Conv4 loss {dtype:?}"));
        let g = gradient(&loss(true), &theta)?;
        let g_ref = gradient(&loss(false), &theta)?;
        let gtol = if dtype == DType::F32 { 5e-5 } else { 1e-12 };
        for ((g, g_ref), n) in g.iter().zip(&g_ref).zip(names) {
            assert_close(g, g_ref, gtol, &format!("Conv4 gradient of {n} {dtype:?}"));
        }
    }
    Ok(())
}

#[test]
fn conv4_second_order_fast_matches_composite() -> Result<()> {
    setup();
    // 16 → 8 → 4 → 2 → 1, batch statistics over as few as 5 values in the last block.
    let net = Conv4::new(Conv4Config { hidden: 8, ..Conv4Config::new(3) });
    let x = uniform(400, &[5, 3, 16, 16], DType::F64)?;
    let (names, theta) = conv4_params(&net, DType::F64)?;
    let v: Vec<Tensor> = theta
        .iter()
        .enumerate()
        .map(|(i, t)| uniform(500 + i as u64, t.dims(), DType::F64))
        .collect::<Result<_>>()?;
    let (x, names) = (&x, &names);
    let loss = |fast| move |t: &[Tensor]| conv4_loss(8, 3, fast, x, names, t);
    let h = hvp(&loss(true), &theta, &v)?;
    let h_ref = hvp(&loss(false), &theta, &v)?;
    let h_fd = fd_hvp(&loss(true), &theta, &v)?;
    for i in 0..theta.len() {
        assert_close(
            &h[i],
            &h_ref[i],
            1e-12,
            &format!("Conv4 Hessian-vector product, {}", names[i]),
        );
        assert_close(
            &h[i],
            &h_fd[i],
            1e-6,
            &format!("Conv4 Hessian-vector product vs finite differences, {}", names[i]),
        );
    }
    Ok(())
}

fn fixed_stats(c: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mean = (0..c).map(|_| rng.random_range(-0.5..0.5)).collect();
    let var = (0..c).map(|_| rng.random_range(0.2..2.0)).collect();
    (mean, var)
}

fn composite_bn_relu_fixed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (m, v): &(Vec<f64>, Vec<f64>),
) -> Result<Tensor> {
    ops::batch_norm_fixed(x, m, v, gamma, beta, 1e-5)?.relu()
}

fn fast_bn_relu_fixed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (m, v): &(Vec<f64>, Vec<f64>),
) -> Result<Tensor> {
    kernels::batch_norm_relu_fixed(x, m, v, gamma, beta, 1e-5)
}

#[test]
fn batch_norm_fixed_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, d) in [[3, 4, 5, 5], [2, 3, 7, 7], [1, 2, 1, 1]].into_iter().enumerate() {
            let x = uniform(130 + i as u64, &d, dtype)?;
            let gamma = uniform(140 + i as u64, &[d[1]], dtype)?;
            let beta = uniform(150 + i as u64, &[d[1]], dtype)?;
            let stats = fixed_stats(d[1], 160 + i as u64);
            let what = format!("batch_norm_relu_fixed {d:?} {dtype:?}");
            let y = fast_bn_relu_fixed(&x, &gamma, &beta, &stats)?;
            assert_close(
                &y,
                &composite_bn_relu_fixed(&x, &gamma, &beta, &stats)?,
                tol(dtype),
                &what,
            );
            let theta = [x, gamma, beta];
            let g =
                gradient(&|t| quad(&fast_bn_relu_fixed(&t[0], &t[1], &t[2], &stats)?, 5), &theta)?;
            let g_ref = gradient(
                &|t| quad(&composite_bn_relu_fixed(&t[0], &t[1], &t[2], &stats)?, 5),
                &theta,
            )?;
            for (g, g_ref) in g.iter().zip(&g_ref) {
                assert_close(g, g_ref, 10.0 * tol(dtype), &format!("{what} gradient"));
            }
        }
    }
    Ok(())
}

#[test]
fn batch_norm_fixed_derivatives_are_exact() -> Result<()> {
    setup();
    let d = [3, 2, 3, 3];
    let x = uniform(170, &d, DType::F64)?;
    let gamma = uniform(171, &[2], DType::F64)?.affine(1.0, 0.5)?;
    let beta = uniform(172, &[2], DType::F64)?;
    let stats = fixed_stats(2, 173);
    let fast = |t: &[Tensor]| quad(&fast_bn_relu_fixed(&t[0], &t[1], &t[2], &stats)?, 6);
    let composite = |t: &[Tensor]| quad(&composite_bn_relu_fixed(&t[0], &t[1], &t[2], &stats)?, 6);
    check_derivatives(&fast, &composite, &[x, gamma, beta], "batch_norm_relu_fixed")
}

#[test]
fn squared_euclidean_matches_composite() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, (n, m, d)) in [(7, 3, 5), (20, 5, 64), (1, 1, 1), (4, 6, 9)].into_iter().enumerate()
        {
            let a = uniform(180 + i as u64, &[n, d], dtype)?;
            let b = uniform(190 + i as u64, &[m, d], dtype)?;
            let what = format!("squared_euclidean {n}×{m}×{d} {dtype:?}");
            let y = kernels::squared_euclidean(&a, &b)?;
            assert_close(&y, &ops::squared_euclidean(&a, &b)?, 10.0 * tol(dtype), &what);
            let theta = [a, b];
            let g = gradient(&|t| quad(&kernels::squared_euclidean(&t[0], &t[1])?, 7), &theta)?;
            let g_ref = gradient(&|t| quad(&ops::squared_euclidean(&t[0], &t[1])?, 7), &theta)?;
            for (g, g_ref) in g.iter().zip(&g_ref) {
                assert_close(g, g_ref, 10.0 * tol(dtype), &format!("{what} gradient"));
            }
        }
    }
    Ok(())
}

#[test]
fn squared_euclidean_derivatives_are_exact() -> Result<()> {
    setup();
    let a = uniform(200, &[5, 4], DType::F64)?;
    let b = uniform(201, &[3, 4], DType::F64)?;
    let fast = |t: &[Tensor]| quad(&kernels::squared_euclidean(&t[0], &t[1])?, 8);
    let composite = |t: &[Tensor]| quad(&ops::squared_euclidean(&t[0], &t[1])?, 8);
    check_derivatives(&fast, &composite, &[a, b], "squared_euclidean")
}

#[test]
fn squared_euclidean_is_exact_near_zero() -> Result<()> {
    setup();
    // A row almost equal to a prototype: the expanded form |a|² + |b|² - 2a·b cancels to noise.
    let b = (uniform(210, &[1, 64], DType::F32)? + 100.0)?;
    let a = (&b + 1e-3)?;
    let d = kernels::squared_euclidean(&a, &b)?.to_vec2::<f32>()?[0][0] as f64;
    let (av, bv) = (values(&a)?, values(&b)?);
    let exact: f64 = av.iter().zip(&bv).map(|(x, y)| (x - y).powi(2)).sum();
    assert!((d - exact).abs() < 1e-5 * exact, "distance {d} vs {exact}");
    let expanded = ops::squared_euclidean(&a, &b)?.to_vec2::<f32>()?[0][0] as f64;
    assert!(
        (expanded - exact).abs() > 1e-2 * exact,
        "the expanded form was expected to cancel badly here"
    );
    Ok(())
}

/// LeakyReLU in candle ops: leak·y + (1 - leak)·relu(y).
fn composite_leaky(y: &Tensor, leak: f64) -> Result<Tensor> {
    (y.relu()? * (1.0 - leak))? + (y * leak)?
}

/// ResNet-12's slopes: its LeakyReLU, and 1 for batch norm without an activation.
const LEAKS: [f64; 2] = [0.1, 1.0];

#[test]
fn batch_norm_leaky_relu_matches_composite_and_its_derivatives_are_exact() -> Result<()> {
    setup();
    for leak in LEAKS {
        for dtype in DTYPES {
            for (i, d) in [[3, 4, 5, 5], [2, 3, 7, 7], [5, 2, 1, 1]].into_iter().enumerate() {
                let x = (uniform(200 + i as u64, &d, dtype)? * 3.0)?.affine(1.0, 0.5)?;
                let gamma = uniform(210 + i as u64, &[d[1]], dtype)?;
                let beta = uniform(220 + i as u64, &[d[1]], dtype)?;
                let what = format!("batch_norm_leaky_relu_train {d:?} {dtype:?} leak {leak}");
                let (y, stats) =
                    kernels::batch_norm_leaky_relu_train(&x, &gamma, &beta, EPS, leak)?;
                let (y_ref, stats_ref) = ops::batch_norm_train(&x, &gamma, &beta, EPS)?;
                assert_close(&y, &composite_leaky(&y_ref, leak)?, tol(dtype), &what);
                for (a, b) in stats
                    .mean
                    .iter()
                    .chain(&stats.var)
                    .zip(stats_ref.mean.iter().chain(&stats_ref.var))
                {
                    assert!(
                        (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                        "{what}: statistics {a} vs {b}"
                    );
                }
            }
        }
        for (i, d) in [[3, 2, 3, 3], [4, 3, 2, 1]].into_iter().enumerate() {
            let x = uniform(230 + i as u64, &d, DType::F64)?;
            let gamma = uniform(240 + i as u64, &[d[1]], DType::F64)?.affine(1.0, 0.5)?;
            let beta = uniform(250 + i as u64, &[d[1]], DType::F64)?;
            let fast = |t: &[Tensor]| {
                quad(&kernels::batch_norm_leaky_relu_train(&t[0], &t[1], &t[2], EPS, leak)?.0, 7)
            };
            let composite = |t: &[Tensor]| {
                quad(
                    &composite_leaky(&ops::batch_norm_train(&t[0], &t[1], &t[2], EPS)?.0, leak)?,
                    7,
                )
            };
            let what = format!("batch_norm_leaky_relu_train {d:?} leak {leak}");
            check_derivatives(&fast, &composite, &[x, gamma, beta], &what)?;
        }
    }
    Ok(())
}

#[test]
fn batch_norm_leaky_relu_fixed_matches_composite_and_its_derivatives_are_exact() -> Result<()> {
    setup();
    for leak in LEAKS {
        for dtype in DTYPES {
            let d = [3, 4, 5, 5];
            let x = uniform(260, &d, dtype)?;
            let gamma = uniform(261, &[4], dtype)?;
            let beta = uniform(262, &[4], dtype)?;
            let (m, v) = fixed_stats(4, 263);
            let y = kernels::batch_norm_leaky_relu_fixed(&x, &m, &v, &gamma, &beta, EPS, leak)?;
            let y_ref =
                composite_leaky(&ops::batch_norm_fixed(&x, &m, &v, &gamma, &beta, EPS)?, leak)?;
            assert_close(
                &y,
                &y_ref,
                tol(dtype),
                &format!("batch_norm_leaky_relu_fixed {dtype:?} {leak}"),
            );
        }
        let x = uniform(270, &[3, 2, 3, 3], DType::F64)?;
        let gamma = uniform(271, &[2], DType::F64)?.affine(1.0, 0.5)?;
        let beta = uniform(272, &[2], DType::F64)?;
        let (m, v) = fixed_stats(2, 273);
        let fast = |t: &[Tensor]| {
            quad(&kernels::batch_norm_leaky_relu_fixed(&t[0], &m, &v, &t[1], &t[2], EPS, leak)?, 8)
        };
        let composite = |t: &[Tensor]| {
            quad(
                &composite_leaky(&ops::batch_norm_fixed(&t[0], &m, &v, &t[1], &t[2], EPS)?, leak)?,
                8,
            )
        };
        let what = format!("batch_norm_leaky_relu_fixed leak {leak}");
        check_derivatives(&fast, &composite, &[x, gamma, beta], &what)?;
    }
    Ok(())
}

#[test]
fn add_leaky_relu_matches_composite_and_its_derivatives_are_exact() -> Result<()> {
    setup();
    for leak in [0.0, 0.1] {
        for dtype in DTYPES {
            let (a, b) = (uniform(280, &[2, 3, 4, 5], dtype)?, uniform(281, &[2, 3, 4, 5], dtype)?);
            let y = kernels::add_leaky_relu(&a, &b, leak)?;
            let what = format!("add_leaky_relu {dtype:?} leak {leak}");
            assert_close(&y, &composite_leaky(&(&a + &b)?, leak)?, tol(dtype), &what);
        }
        let (a, b) =
            (uniform(282, &[2, 3, 3, 2], DType::F64)?, uniform(283, &[2, 3, 3, 2], DType::F64)?);
        let fast = |t: &[Tensor]| quad(&kernels::add_leaky_relu(&t[0], &t[1], leak)?, 9);
        let composite = |t: &[Tensor]| quad(&composite_leaky(&(&t[0] + &t[1])?, leak)?, 9);
        check_derivatives(&fast, &composite, &[a, b], &format!("add_leaky_relu leak {leak}"))?;
    }
    let a = uniform(284, &[2, 3], DType::F32)?;
    assert!(kernels::add_leaky_relu(&a, &a, 1.5).is_err());
    assert!(kernels::add_leaky_relu(&a, &a.t()?, 0.1).is_err());
    Ok(())
}

fn composite_conv_each(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let rows = (0..x.dim(0)?)
        .map(|b| ops::conv3x3(&x.narrow(0, b, 1)?, &w.get(b)?))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

#[test]
fn conv_each_matches_a_convolution_per_image_and_its_derivatives_are_exact() -> Result<()> {
    setup();
    for dtype in DTYPES {
        for (i, (xd, co)) in CONV_SHAPES.into_iter().enumerate() {
            let x = uniform(40 + i as u64, &xd, dtype)?;
            let w = uniform(140 + i as u64, &[xd[0], co, xd[1], 3, 3], dtype)?;
            let what = format!("conv3x3_each {xd:?}→{co} {dtype:?}");
            let fast = kernels::conv3x3_each(&x, &w)?;
            assert_close(&fast, &composite_conv_each(&x, &w)?, tol(dtype), &what);
        }
    }
    for (i, (xd, co)) in
        [([2, 2, 5, 5], 3), ([3, 2, 4, 3], 2), ([1, 1, 1, 1], 1)].into_iter().enumerate()
    {
        let x = uniform(60 + i as u64, &xd, DType::F64)?;
        let w = uniform(70 + i as u64, &[xd[0], co, xd[1], 3, 3], DType::F64)?;
        let fast = |t: &[Tensor]| quad(&kernels::conv3x3_each(&t[0], &t[1])?, 5);
        let composite = |t: &[Tensor]| quad(&composite_conv_each(&t[0], &t[1])?, 5);
        check_derivatives(&fast, &composite, &[x, w], &format!("conv3x3_each {xd:?}→{co}"))?;
    }
    let (x, w) =
        (uniform(1, &[2, 3, 4, 4], DType::F64)?, uniform(2, &[3, 5, 3, 3, 3], DType::F64)?);
    let err = kernels::conv3x3_each(&x, &w).unwrap_err().to_string();
    assert!(err.contains("[B, Co, Ci, 3, 3]"), "{err}");
    Ok(())
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// y = x·Wᵀ + b for x [R, in], W [out, in], b [out].
fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

fn composite_mlp(x: &Tensor, w: &[Tensor]) -> Result<Tensor> {
    let h = affine(x, &w[0], &w[1])?.relu()?;
    let h = affine(&h, &w[2], &w[3])?.relu()?;
    affine(&h, &w[4], &w[5])?.squeeze(1)
}

fn composite_lstm(xs: &Tensor, w: &[Tensor]) -> Result<Tensor> {
    let (steps, rows, _) = xs.dims3()?;
    let hd = w[1].dim(1)?;
    let mut h = Tensor::zeros((rows, hd), xs.dtype(), &Device::Cpu)?;
    let mut c = h.clone();
    for t in 0..steps {
        let z = (affine(&xs.get(t)?, &w[0], &w[2])? + h.matmul(&w[1].t()?)?)?;
        let gate = |k: usize| z.narrow(1, k * hd, hd);
        let (i, f, g, o) =
            (sigmoid(&gate(0)?)?, sigmoid(&gate(1)?)?, gate(2)?.tanh()?, sigmoid(&gate(3)?)?);
        c = ((f * c)? + (i * g)?)?;
        h = (o * c.tanh()?)?;
    }
    affine(&h, &w[3], &w[4])?.squeeze(1)
}

fn mlp_weights(layout: kernels::MlpLayout, seed: u64, dtype: DType) -> Result<Vec<Tensor>> {
    let (d, h) = (layout.input, layout.hidden);
    let dims: [&[usize]; 6] = [&[h, d], &[h], &[h, h], &[h], &[1, h], &[1]];
    dims.iter().enumerate().map(|(i, s)| uniform(seed + i as u64, s, dtype)).collect()
}

fn lstm_weights(layout: kernels::LstmLayout, seed: u64, dtype: DType) -> Result<Vec<Tensor>> {
    let (d, h) = (layout.input, layout.hidden);
    let dims: [&[usize]; 5] = [&[4 * h, d], &[4 * h, h], &[4 * h], &[1, h], &[1]];
    dims.iter().enumerate().map(|(i, s)| uniform(seed + i as u64, s, dtype)).collect()
}

/// The fast op's weight gradient of `quad` against the composite's and central differences (f64).
fn check_weight_gradient(
    fast: Loss,
    composite: Loss,
    weights: &[Tensor],
    what: &str,
) -> Result<()> {
    let g = gradient(fast, weights)?;
    let (g_ref, g_fd) = (gradient(composite, weights)?, fd_gradient(fast, weights)?);
    for i in 0..weights.len() {
        assert_close(&g[i], &g_ref[i], 1e-12, &format!("{what}: gradient {i} vs composite"));
        assert_close(&g[i], &g_fd[i], 1e-8, &format!("{what}: gradient {i} vs finite differences"));
        assert!(values(&g[i])?.iter().any(|x| x.abs() > 1e-6), "{what}: gradient {i} is zero");
    }
    Ok(())
}

#[test]
fn coordinate_mlp_matches_composite_and_its_weight_gradient_is_exact() -> Result<()> {
    setup();
    let layout = kernels::MlpLayout { input: 2, hidden: 5 };
    // 2500 rows: three chunks, the last one partial.
    for dtype in DTYPES {
        let x = (uniform(1, &[2500, 2], dtype)? * 2.0)?;
        let w = mlp_weights(layout, 10, dtype)?;
        let refs: Vec<&Tensor> = w.iter().collect();
        let fast = kernels::coordinate_mlp(&x, &refs, layout)?;
        assert_close(
            &fast,
            &composite_mlp(&x, &w)?,
            tol(dtype),
            &format!("coordinate_mlp {dtype:?}"),
        );
    }
    for rows in [7, 2500] {
        let x = (uniform(2, &[rows, 2], DType::F64)? * 2.0)?;
        let w = mlp_weights(layout, 20, DType::F64)?;
        let fast = |t: &[Tensor]| {
            quad(&kernels::coordinate_mlp(&x, &t.iter().collect::<Vec<_>>(), layout)?, 3)
        };
        let composite = |t: &[Tensor]| quad(&composite_mlp(&x, t)?, 3);
        check_weight_gradient(&fast, &composite, &w, &format!("coordinate_mlp, {rows} rows"))?;
    }
    Ok(())
}

#[test]
fn coordinate_lstm_matches_composite_and_its_weight_gradient_is_exact() -> Result<()> {
    setup();
    let layout = kernels::LstmLayout { input: 2, hidden: 4 };
    for dtype in DTYPES {
        let x = uniform(3, &[5, 2500, 2], dtype)?;
        let w = lstm_weights(layout, 30, dtype)?;
        let refs: Vec<&Tensor> = w.iter().collect();
        let fast = kernels::coordinate_lstm(&x, &refs, layout)?;
        assert_close(
            &fast,
            &composite_lstm(&x, &w)?,
            tol(dtype),
            &format!("coordinate_lstm {dtype:?}"),
        );
    }
    for (steps, rows) in [(1, 6), (3, 7), (5, 1100)] {
        let x = uniform(4, &[steps, rows, 2], DType::F64)?;
        let w = lstm_weights(layout, 40, DType::F64)?;
        let fast = |t: &[Tensor]| {
            quad(&kernels::coordinate_lstm(&x, &t.iter().collect::<Vec<_>>(), layout)?, 3)
        };
        let composite = |t: &[Tensor]| quad(&composite_lstm(&x, t)?, 3);
        let what = format!("coordinate_lstm, {steps} steps × {rows} rows");
        if steps == 1 {
            // h₀ = 0: W_hh has no gradient after one step; the others must match.
            let g = gradient(&fast, &w)?;
            let g_ref = gradient(&composite, &w)?;
            for i in 0..w.len() {
                assert_close(&g[i], &g_ref[i], 1e-12, &format!("{what}: gradient {i}"));
            }
            assert!(values(&g[1])?.iter().all(|v| *v == 0.0));
        } else {
            check_weight_gradient(&fast, &composite, &w, &what)?;
        }
    }
    Ok(())
}

#[test]
fn coordinate_nets_refuse_differentiated_inputs_and_second_order() -> Result<()> {
    setup();
    let layout = kernels::MlpLayout { input: 2, hidden: 3 };
    let w = mlp_weights(layout, 50, DType::F64)?;
    let refs: Vec<&Tensor> = w.iter().collect();
    let x = Var::from_tensor(&uniform(5, &[4, 2], DType::F64)?)?;
    let y = kernels::coordinate_mlp(x.as_tensor(), &refs, layout)?;
    let err = y.sum_all()?.backward().unwrap_err().to_string();
    assert!(err.contains("detach"), "{err}");
    let w = leaves(&w)?;
    let x = x.as_tensor().detach();
    let g = kernels::coordinate_mlp(&x, &w.iter().collect::<Vec<_>>(), layout)?
        .sum_all()?
        .backward()?;
    let gw = g.get(&w[0]).expect("W₁ has a gradient");
    let err = gw.sum_all()?.backward().unwrap_err().to_string();
    assert!(err.contains("first order"), "{err}");
    Ok(())
}
