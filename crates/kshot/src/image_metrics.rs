//! Image similarity for generated faces: gray images as row-major f32 in [0, 1], scores in f64.
//!
//! All functions panic if the two images differ in length or are empty (a caller's bug, not bad
//! data).

/// Side of the SSIM window.
pub const SSIM_WINDOW: usize = 11;
/// The SSIM window's Gaussian σ.
pub const SSIM_SIGMA: f64 = 1.5;
const SSIM_K1: f64 = 0.01;
const SSIM_K2: f64 = 0.03;

fn check(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "image metrics: the images differ in size");
    assert!(!a.is_empty(), "image metrics: empty images");
}

/// Mean absolute difference.
pub fn l1(a: &[f32], b: &[f32]) -> f64 {
    check(a, b);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.len() as f64
}

/// Mean squared difference.
pub fn mse(a: &[f32], b: &[f32]) -> f64 {
    check(a, b);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64
}

/// Peak signal-to-noise ratio in dB with peak 1: 10·log10(1 / MSE). Identical images give
/// `f64::INFINITY`.
pub fn psnr(a: &[f32], b: &[f32]) -> f64 {
    let e = mse(a, b);
    if e == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * e.log10()
    }
}

/// The normalised 1-D Gaussian of the SSIM window (the 2-D window is its outer product).
fn gaussian_taps() -> [f64; SSIM_WINDOW] {
    let r = (SSIM_WINDOW / 2) as f64;
    let mut w = [0.0; SSIM_WINDOW];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - r;
        *v = (-x * x / (2.0 * SSIM_SIGMA * SSIM_SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.map(|v| v / sum)
}

/// Structural similarity (Wang et al. 2004) of two `width`×`height` images: the mean of the
/// SSIM map over the windows fully inside the image, with an 11×11 Gaussian window (σ = 1.5),
/// K1 = 0.01, K2 = 0.03, dynamic range L = 1, and population (not sample) variances. This is
/// scikit-image's `structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False)`, which crops the map by half a window.
///
/// # Panics
/// If the images are not `width`×`height`, or smaller than 11×11.
pub fn ssim(a: &[f32], b: &[f32], width: usize, height: usize) -> f64 {
    check(a, b);
    assert_eq!(a.len(), width * height, "ssim: the images are not {width}×{height}");
    assert!(
        width >= SSIM_WINDOW && height >= SSIM_WINDOW,
        "ssim: a {width}×{height} image has no full {SSIM_WINDOW}×{SSIM_WINDOW} window"
    );
    let taps = gaussian_taps();
    let (ow, oh) = (width - SSIM_WINDOW + 1, height - SSIM_WINDOW + 1);
    // The five local moments, filtered along rows ('valid'), then along columns.
    let signals = |i: usize| {
        let (x, y) = (a[i] as f64, b[i] as f64);
        [x, y, x * x, y * y, x * y]
    };
    let mut rows = vec![[0f64; 5]; height * ow];
    for r in 0..height {
        for c in 0..ow {
            let acc = &mut rows[r * ow + c];
            for (k, &t) in taps.iter().enumerate() {
                let s = signals(r * width + c + k);
                for (a, s) in acc.iter_mut().zip(s) {
                    *a += t * s;
                }
            }
        }
    }
    let (c1, c2) = (SSIM_K1 * SSIM_K1, SSIM_K2 * SSIM_K2);
    let mut total = 0.0;
    for r in 0..oh {
        for c in 0..ow {
            let mut m = [0f64; 5];
            for (k, &t) in taps.iter().enumerate() {
                for (a, s) in m.iter_mut().zip(rows[(r + k) * ow + c]) {
                    *a += t * s;
                }
            }
            let [mx, my, xx, yy, xy] = m;
            let (vx, vy, cov) = (xx - mx * mx, yy - my * my, xy - mx * my);
            total += ((2.0 * mx * my + c1) * (2.0 * cov + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
        }
    }
    total / (ow * oh) as f64
}
