//! The judges of a face generator on synthetic data: an identity classifier that separates
//! people, a landmark regressor that finds a dot, the NME, saving and loading, determinism.

use candle_core::{Device, Tensor};
use kshot::checkpoint::save_tensors;
use kshot::judges::{nme, IdentityNet, JudgeConfig, Judges, LandmarkNet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;

/// A smooth random S×S pattern in [0.1, 0.9]: a sum of a few random low-frequency waves.
fn smooth_pattern(rng: &mut ChaCha8Rng, size: usize) -> Vec<f32> {
    let waves: Vec<[f32; 4]> = (0..4)
        .map(|_| {
            let (fx, fy) = (0.5 + 2.5 * rng.random::<f32>(), 0.5 + 2.5 * rng.random::<f32>());
            [fx, fy, rng.random::<f32>() * 6.3, rng.random::<f32>() * 6.3]
        })
        .collect::<Vec<_>>();
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        for x in 0..size {
            let (u, v) = (x as f32 / size as f32 * 6.3, y as f32 / size as f32 * 6.3);
            let s: f32 =
                waves.iter().map(|w| (w[0] * u + w[2]).sin() * (w[1] * v + w[3]).sin()).sum();
            out.push(0.5 + 0.4 * (s / 4.0).clamp(-1.0, 1.0));
        }
    }
    out
}

/// `per_class` noisy copies (Gaussian-ish noise of about `noise`, clipped to [0, 1]) of each pattern.
fn noisy_copies(
    patterns: &[Vec<f32>],
    per_class: usize,
    size: usize,
    noise: f32,
    rng: &mut ChaCha8Rng,
) -> (Tensor, Vec<u32>) {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (c, p) in patterns.iter().enumerate() {
        for _ in 0..per_class {
            pixels.extend(p.iter().map(|v| {
                let e: f32 = (0..3).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * noise * 2.0;
                (v + e).clamp(0.0, 1.0)
            }));
            labels.push(c as u32);
        }
    }
    let n = labels.len();
    (Tensor::from_vec(pixels, (n, 1, size, size), &Device::Cpu).unwrap(), labels)
}

fn tiny() -> JudgeConfig {
    JudgeConfig { steps: 4, batch: 4, lr: 1e-3, hidden: 4, max_shift: 1, brightness: 0.1 }
}

/// Random images in [0, 1] with labels and landmarks, for tests that need any data at all.
fn random_data(n: usize, size: usize, seed: u64) -> (Tensor, Vec<u32>, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pixels: Vec<f32> = (0..n * size * size).map(|_| rng.random()).collect();
    let points: Vec<f32> = (0..n * 68 * 2).map(|_| rng.random::<f32>() * size as f32).collect();
    let labels = (0..n as u32).map(|i| i % 2).collect();
    (
        Tensor::from_vec(pixels, (n, 1, size, size), &Device::Cpu).unwrap(),
        labels,
        Tensor::from_vec(points, (n, 68, 2), &Device::Cpu).unwrap(),
    )
}

#[test]
fn identity_net_separates_synthetic_people() {
    let size = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let patterns: Vec<Vec<f32>> = (0..4).map(|_| smooth_pattern(&mut rng, size)).collect();
    let (train, train_labels) = noisy_copies(&patterns, 8, size, 0.15, &mut rng);
    let (test, test_labels) = noisy_copies(&patterns, 8, size, 0.15, &mut rng);
    let config =
        JudgeConfig { steps: 150, batch: 16, lr: 3e-3, hidden: 16, max_shift: 2, brightness: 0.2 };
    let mut losses = Vec::new();
    let net =
        IdentityNet::train(&train, &train_labels, 4, &config, 1, |_, l| losses.push(l)).unwrap();
    assert_eq!(losses.len(), 150);
    let accuracy = net.accuracy(&test, &test_labels).unwrap();
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");

    let f = net.features(&test).unwrap();
    let norms = f.sqr().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-4), "feature norms² {norms:?}");
    let sim = f.matmul(&f.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let (mut within, mut across) = (Vec::new(), Vec::new());
    for i in 0..sim.len() {
        for j in 0..i {
            if test_labels[i] == test_labels[j] {
                within.push(sim[i][j])
            } else {
                across.push(sim[i][j])
            }
        }
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (within, across) = (mean(&within), mean(&across));
    assert!(within > across + 0.05, "cosine within {within}, across {across}");
}

/// Landmarks of a dot at (x, y): 68 points on a 17×4 grid half a pixel apart around it.
fn dot_landmarks(x: f32, y: f32) -> Vec<f32> {
    (0..68)
        .flat_map(|k| [x + ((k % 17) as f32 - 8.0) * 0.5, y + ((k / 17) as f32 - 1.5) * 0.5])
        .collect()
}

/// Images of one bright blurred dot at a random position with the dot's landmarks.
fn dot_images(n: usize, size: usize, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    let (mut pixels, mut points) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let lo = 6.0;
        let hi = size as f32 - 7.0;
        let (cx, cy) = (rng.random_range(lo..hi), rng.random_range(lo..hi));
        for y in 0..size {
            for x in 0..size {
                let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                pixels.push((0.1 + 0.8 * (-d2 / 4.0).exp() + 0.05 * rng.random::<f32>()).min(1.0));
            }
        }
        points.extend(dot_landmarks(cx, cy));
    }
    (
        Tensor::from_vec(pixels, (n, 1, size, size), &Device::Cpu).unwrap(),
        Tensor::from_vec(points, (n, 68, 2), &Device::Cpu).unwrap(),
    )
}

#[test]
fn landmark_net_finds_a_dot() {
    let size = 32;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (train, train_points) = dot_images(96, size, &mut rng);
    let (test, test_points) = dot_images(32, size, &mut rng);
    let config =
        JudgeConfig { steps: 250, batch: 16, lr: 3e-3, hidden: 16, max_shift: 2, brightness: 0.2 };
    let net = LandmarkNet::train(&train, &train_points, &config, 1, |_, _| {}).unwrap();
    let predicted = net.predict(&test).unwrap();
    assert_eq!(predicted.dims(), [32, 68, 2]);
    let mean = train_points
        .mean_keepdim(0)
        .unwrap()
        .broadcast_as(test_points.shape())
        .unwrap()
        .contiguous()
        .unwrap();
    let (error, baseline) =
        (nme(&predicted, &test_points).unwrap(), nme(&mean, &test_points).unwrap());
    assert!(error < 0.5 * baseline, "NME {error}, predicting the mean position {baseline}");
}

#[test]
fn nme_of_a_hand_made_case() {
    // Image 0: eye corners 10 px apart, every point 1 px off (0.6, 0.8); image 1: 20 px apart, 2 px off.
    let mut truth = vec![0f32; 2 * 68 * 2];
    let mut predicted = truth.clone();
    for (img, (scale, off)) in [(1.0, [0.6, 0.8]), (2.0, [0.0, 2.0])].into_iter().enumerate() {
        for k in 0..68 {
            let (x, y) = (scale * (k as f32 * 0.3 + 5.0), scale * (20.0 + (k % 5) as f32));
            let i = img * 136 + 2 * k;
            truth[i..i + 2].copy_from_slice(&[x, y]);
            predicted[i..i + 2].copy_from_slice(&[x + off[0], y + off[1]]);
        }
        let i = img * 136;
        truth[i + 72..i + 74].copy_from_slice(&[scale * 10.0, scale * 20.0]);
        truth[i + 90..i + 92].copy_from_slice(&[scale * 20.0, scale * 20.0]);
        predicted[i + 72..i + 74].copy_from_slice(&[scale * 10.0 + off[0], scale * 20.0 + off[1]]);
        predicted[i + 90..i + 92].copy_from_slice(&[scale * 20.0 + off[0], scale * 20.0 + off[1]]);
    }
    let t = |v: Vec<f32>| Tensor::from_vec(v, (2, 68, 2), &Device::Cpu).unwrap();
    let (truth, predicted) = (t(truth), t(predicted));
    let e = nme(&predicted, &truth).unwrap();
    assert!((e - 0.1).abs() < 1e-6, "NME {e}");
    assert_eq!(nme(&truth, &truth).unwrap(), 0.0);
    assert!(nme(&predicted.narrow(0, 0, 1).unwrap(), &truth).is_err());
}

fn train_judges(seed: u64) -> Judges {
    let (images, labels, points) = random_data(8, 16, 5);
    Judges {
        identity: IdentityNet::train(&images, &labels, 2, &tiny(), seed, |_, _| {}).unwrap(),
        landmarks: LandmarkNet::train(&images, &points, &tiny(), seed, |_, _| {}).unwrap(),
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
}

#[test]
fn save_and_load_round_trip_and_refuse_other_files() {
    let dir = common::tempdir("judges");
    let judges = train_judges(1);
    let path = dir.path().join("judges.safetensors");
    judges.save(&path).unwrap();
    let loaded = Judges::load(&path).unwrap();
    let (images, labels, _) = random_data(5, 16, 9);
    assert_eq!(
        bits(&judges.identity.features(&images).unwrap()),
        bits(&loaded.identity.features(&images).unwrap())
    );
    assert_eq!(
        bits(&judges.landmarks.predict(&images).unwrap()),
        bits(&loaded.landmarks.predict(&images).unwrap())
    );
    assert_eq!(
        judges.identity.accuracy(&images, &labels).unwrap(),
        loaded.identity.accuracy(&images, &labels).unwrap()
    );
    assert_eq!(loaded.identity.config(), &tiny());

    let other = dir.path().join("other.safetensors");
    save_tensors(
        &other,
        &[("w".into(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap())],
    )
    .unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"not a tensor file").unwrap();
    for bad in [other, garbage, dir.path().join("missing.safetensors")] {
        let e = Judges::load(&bad).expect_err("a non-judges file must not load").to_string();
        assert!(e.contains(&bad.display().to_string()) && !e.contains('\n'), "{e}");
    }
}

#[test]
fn training_is_deterministic_given_the_seed() {
    let dir = common::tempdir("judges-seed");
    let file = |seed: u64, name: &str| {
        let path = dir.path().join(name);
        train_judges(seed).save(&path).unwrap();
        std::fs::read(path).unwrap()
    };
    let (a, b, c) = (file(1, "a"), file(1, "b"), file(2, "c"));
    assert!(a == b, "the same seed gave different parameters");
    assert!(a != c, "different seeds gave the same parameters");
}

#[test]
fn bad_input_is_an_error() {
    let (images, labels, points) = random_data(8, 16, 5);
    let train = |x: &Tensor, l: &[u32], c: usize, cfg: JudgeConfig| {
        IdentityNet::train(x, l, c, &cfg, 0, |_, _| {})
    };
    assert!(train(&images.reshape((8, 16, 16)).unwrap(), &labels, 2, tiny()).is_err());
    assert!(train(&images, &labels[..7], 2, tiny()).is_err());
    assert!(train(&images, &labels, 1, tiny()).is_err());
    assert!(train(&(&images * 255.0).unwrap(), &labels, 2, tiny()).is_err());
    assert!(train(&images, &labels, 2, JudgeConfig { batch: 1, ..tiny() }).is_err());
    assert!(LandmarkNet::train(&images, &points.narrow(1, 0, 5).unwrap(), &tiny(), 0, |_, _| {})
        .is_err());
    let net = train(&images, &labels, 2, tiny()).unwrap();
    let (wrong_size, _, _) = random_data(2, 32, 1);
    assert!(net.features(&wrong_size).is_err());
    assert!(net.accuracy(&images, &[5; 8]).is_err());
}
