//! The few-shot GAN (Zakharov et al. 2019): AdaIN, spectral normalisation and the projection
//! discriminator against central differences in f64, power iteration against the top singular
//! value, the whole generator loss's gradient, and exact resume of both optimisers.

mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use kshot::config::RunConfig;
use kshot::data::{Class, ImageSet};
use kshot::nn::gan_nets::{self, GanNets, GanNetsConfig, Sn};
use kshot::nn::Params;
use kshot::{presets, train};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Central differences of the scalar `f` at every (or every `stride`-th) entry of each input
/// against autograd; panics on a relative error above 1e-5 (errors under 10⁻³ in absolute
/// terms count as relative to 10⁻³: round-off of the checked sums), returns the largest.
fn check(inputs: &[(&str, Tensor)], f: impl Fn(&[Tensor]) -> Tensor) -> f64 {
    let vars: Vec<Var> = inputs.iter().map(|(_, t)| Var::from_tensor(t).unwrap()).collect();
    let values: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&values).backward().unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for (k, (name, t)) in inputs.iter().enumerate() {
        let g: Vec<f64> =
            grads.get(vars[k].as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let stride = (base.len() / 40).max(1);
        for i in (0..base.len()).step_by(stride) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut all: Vec<Tensor> = inputs.iter().map(|(_, t)| t.detach()).collect();
                all[k] = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
                f(&all).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - g[i]).abs() / (1e-3 + numeric.abs().max(g[i].abs()));
            assert!(err < 1e-5, "{name}[{i}]: autograd {} vs central difference {numeric}", g[i]);
            worst = worst.max(err);
        }
    }
    worst
}

/// A weighted sum, so that every output entry matters to the checked scalar.
fn weighted(t: &Tensor, seed: u64) -> Tensor {
    (t * random(t.dims(), seed)).unwrap().sum_all().unwrap()
}

#[test]
fn adain_matches_central_differences_in_f64() {
    let x = random(&[2, 3, 4, 5], 1);
    let gamma = random(&[2, 3], 2);
    let beta = random(&[2, 3], 3);
    let worst = check(&[("x", x), ("gamma", gamma), ("beta", beta)], |v| {
        weighted(&gan_nets::adain(&v[0], &v[1], &v[2]).unwrap(), 4)
    });
    println!("AdaIN: worst relative error {worst:.2e}");
}

#[test]
fn adain_normalises_each_sample_and_channel_then_applies_its_own_scale_and_shift() {
    let x = random(&[2, 3, 4, 4], 5).affine(3.0, 7.0).unwrap();
    let gamma = Tensor::new(&[[2.0f64, 1.0, 0.5], [1.0, 3.0, 1.0]], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[[1.0f64, -1.0, 0.0], [0.0, 0.0, 4.0]], &Device::Cpu).unwrap();
    let y = gan_nets::adain(&x, &gamma, &beta).unwrap();
    let y: Vec<Vec<Vec<f64>>> = y.flatten_from(2).unwrap().to_vec3().unwrap();
    let (g, b): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (gamma.to_vec2().unwrap(), beta.to_vec2().unwrap());
    for s in 0..2 {
        for c in 0..3 {
            let v = &y[s][c];
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
            assert!((mean - b[s][c]).abs() < 1e-9, "mean {mean} vs β {}", b[s][c]);
            let std = g[s][c] * (1.0 / (1.0 + 1e-5 / (var / g[s][c].powi(2)))).sqrt();
            assert!(
                (var.sqrt() - g[s][c]).abs() < 1e-3 * g[s][c],
                "std {} vs γ {} ({std})",
                var.sqrt(),
                g[s][c]
            );
        }
    }
}

#[test]
fn spectral_normalisation_matches_central_differences_in_f64() {
    let w = random(&[4, 3, 3, 3], 6);
    let u = gan_nets::power_iteration(&w, &random(&[4], 7)).unwrap();
    let worst =
        check(&[("w", w)], |v| weighted(&gan_nets::spectral_normalised(&v[0], &u).unwrap(), 8));
    println!("spectral norm: worst relative error {worst:.2e}");
}

#[test]
fn power_iteration_finds_the_top_singular_value() {
    let w = random(&[6, 2, 3, 3], 9);
    let mut u = random(&[6], 10);
    for _ in 0..200 {
        u = gan_nets::power_iteration(&w, &u).unwrap();
    }
    let normalised = gan_nets::spectral_normalised(&w, &u).unwrap();
    let sigma = |t: &Tensor| -> f64 {
        // ‖W‖₂ as the square root of the top eigenvalue of W Wᵀ by 500 iterations on the host.
        let m: Vec<Vec<f64>> = t.reshape((6, 18)).unwrap().to_vec2().unwrap();
        let gram: Vec<Vec<f64>> = (0..6)
            .map(|i| (0..6).map(|j| (0..18).map(|k| m[i][k] * m[j][k]).sum()).collect())
            .collect();
        let mut v = vec![1.0; 6];
        let mut lambda = 0.0;
        for _ in 0..500 {
            let next: Vec<f64> = (0..6).map(|i| (0..6).map(|j| gram[i][j] * v[j]).sum()).collect();
            lambda = next.iter().map(|a| a * a).sum::<f64>().sqrt();
            v = next.iter().map(|a| a / lambda).collect();
        }
        lambda.sqrt()
    };
    let before = sigma(&w);
    assert!(before > 1.5, "the test matrix should not already be normalised: {before}");
    let after = sigma(&normalised);
    assert!((after - 1.0).abs() < 1e-9, "spectral norm after normalisation: {after}");
}

fn small_nets() -> GanNets {
    GanNets::new(GanNetsConfig { size: 16, width: 2, identities: 3 }).unwrap()
}

/// f64 copies of freshly initialised parameters, and the power-iteration vectors.
fn f64_params(nets: &GanNets, seed: u64) -> (Vec<(String, Tensor)>, Sn) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (set, sn) = nets.init(&mut rng, &Device::Cpu).unwrap();
    let mut params: Vec<(String, Tensor)> = set
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().to_dtype(DType::F64).unwrap()))
        .collect();
    // Non-zero biases and projections so that every path carries a gradient.
    for (i, (name, t)) in params.iter_mut().enumerate() {
        if name.ends_with(".b") || name.ends_with("w0") {
            *t = (random(t.dims(), 100 + i as u64) * 0.1).unwrap();
        }
    }
    let sn = sn.into_iter().map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap())).collect();
    (params, sn)
}

fn params_of(names: &[String], values: &[Tensor]) -> Params {
    Params::from_names(names, values)
}

#[test]
fn projection_discriminator_matches_central_differences_in_f64() {
    let nets = small_nets();
    let (all, sn) = f64_params(&nets, 11);
    let x = random(&[2, 1, 16, 16], 12).affine(0.5, 0.5).unwrap();
    let y = random(&[2, 1, 16, 16], 13).affine(0.5, 0.5).unwrap();
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    let fixed: Vec<Tensor> = all.iter().map(|(_, t)| t.clone()).collect();
    let checked =
        ["d.stem.w", "d.block1.conv2.w", "d.block3.skip.w", "d.proj.w", "d.proj.w0", "d.proj.b"];
    let mut inputs: Vec<(&str, Tensor)> = vec![("x", x)];
    for name in checked {
        let i = names.iter().position(|n| n == name).unwrap();
        inputs.push((name, fixed[i].clone()));
    }
    let worst = check(&inputs, |v| {
        let mut values = fixed.clone();
        for (k, name) in checked.iter().enumerate() {
            values[names.iter().position(|n| n == name).unwrap()] = v[k + 1].clone();
        }
        let p = params_of(&names, &values);
        let projection = nets.projection(&p, &[2, 0]).unwrap();
        let (score, features) = nets.discriminate(&p, &sn, &v[0], &y, &projection).unwrap();
        let fm = features.iter().fold(Tensor::new(0f64, &Device::Cpu).unwrap(), |acc, f| {
            (acc + weighted(f, 14)).unwrap()
        });
        (weighted(&score, 15) + (fm * 0.1).unwrap()).unwrap()
    });
    println!("projection discriminator: worst relative error {worst:.2e}");
}

#[test]
fn embedder_and_generator_match_central_differences_in_f64() {
    let nets = small_nets();
    let (all, sn) = f64_params(&nets, 16);
    let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
    let fixed: Vec<Tensor> = all.iter().map(|(_, t)| t.clone()).collect();
    let shots = random(&[3, 2, 16, 16], 17).affine(0.5, 0.5).unwrap();
    let y = random(&[1, 1, 16, 16], 18).affine(0.5, 0.5).unwrap();
    let checked = [
        "e.stem.w",
        "e.block2.conv1.w",
        "p.w",
        "g.down0.conv1.w",
        "g.res1.conv2.w",
        "g.up0.skip.w",
        "g.out.w",
        "g.out.b",
    ];
    let inputs: Vec<(&str, Tensor)> = checked
        .iter()
        .map(|name| (*name, fixed[names.iter().position(|n| n == name).unwrap()].clone()))
        .collect();
    let worst = check(&inputs, |v| {
        let mut values = fixed.clone();
        for (k, name) in checked.iter().enumerate() {
            values[names.iter().position(|n| n == name).unwrap()] = v[k].clone();
        }
        let p = params_of(&names, &values);
        let e = nets.embed(&p, &sn, &shots).unwrap().mean_keepdim(0).unwrap();
        let psi = (nets.adain_params(&p, &e).unwrap() * 50.0).unwrap();
        weighted(&nets.generate(&p, &sn, &y, &psi).unwrap(), 19)
    });
    println!("embedder + generator: worst relative error {worst:.2e}");
}

/// `people` identities × 10 images of size×size: a face channel (a per-person blob pattern moved
/// by a per-image offset) and a landmark channel (a cross at the offset).
fn synthetic_faces(people: usize, size: usize, seed: u64) -> ImageSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let classes = (0..people)
        .map(|p| {
            let blobs: Vec<(f64, f64, f64)> = (0..3)
                .map(|_| {
                    (
                        rng.random_range(0.2..0.8),
                        rng.random_range(0.2..0.8),
                        rng.random_range(0.3..1.0),
                    )
                })
                .collect();
            let mut pixels = Vec::new();
            for _ in 0..10 {
                let (dx, dy) = (rng.random_range(-0.15..0.15), rng.random_range(-0.15..0.15));
                let s = size as f64;
                for j in 0..size * size {
                    let (x, y) = ((j % size) as f64 / s - dx, (j / size) as f64 / s - dy);
                    let v: f64 = blobs
                        .iter()
                        .map(|(bx, by, a)| {
                            a * (-((x - bx).powi(2) + (y - by).powi(2)) * 40.0).exp()
                        })
                        .sum();
                    pixels.push((v.min(1.0) * 255.0) as u8);
                }
                let (cx, cy) = (((0.5 + dx) * s) as usize, ((0.5 + dy) * s) as usize);
                for j in 0..size * size {
                    let (x, y) = (j % size, j / size);
                    pixels.push(if x == cx || y == cy { 255 } else { 0 });
                }
            }
            Class { name: format!("s{}", p + 1), group: "orl".into(), pixels }
        })
        .collect();
    ImageSet { name: "synthetic-faces".into(), channels: 2, height: size, width: size, classes }
}

fn small_run(steps: u64) -> RunConfig {
    let (protocol, method) = (presets::find("fewshot-gan-orl").unwrap().build)();
    let mut c = RunConfig::new(protocol, method);
    c.data.image_size = 16;
    c.train = kshot::data::EpisodeSpec::new(1, 3, 1);
    c.meta_batch = 2;
    c.episodes = steps;
    c.checkpoint_every = 2;
    settings!(c, FewShotGan).width = 2;
    c
}

#[test]
fn fewshot_gan_resumes_exactly_with_both_optimisers() {
    let set = synthetic_faces(4, 16, 20);
    let no_stop = AtomicBool::new(false);
    let full = small_run(4);
    let tmp = common::tempdir("fewshot-gan-resume");
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let mut first = full.clone();
    first.episodes = 2;
    train::train(&straight, &full, &set, None, false, &no_stop, |_| {}).unwrap();
    train::train(&split, &first, &set, None, false, &no_stop, |_| {}).unwrap();
    let ckpt = kshot::checkpoint::load_tensors(&split.join(train::CHECKPOINT_FILE)).unwrap();
    for name in ["generator.", "discriminator."] {
        assert!(
            ckpt.keys().any(|k| k.contains(&format!("{name}m."))),
            "no `{name}` optimiser state in the checkpoint"
        );
    }
    assert!(ckpt.keys().any(|k| k.contains("sn.")), "no power-iteration vectors in the checkpoint");
    let mut config = RunConfig::load(&split.join(train::CONFIG_FILE)).unwrap();
    config.episodes = 4;
    train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
    assert_eq!(common::model_tensors(&straight), common::model_tensors(&split));
}

/// A short seeded run on the real ORL faces (s1–s30), then 8 shots of each of two held-out
/// people: fine-tuning on the shots brings the rendered targets closer (L1) to the real ones
/// than the feed-forward model gets. (Beating the mean of the shots, the bar, takes
/// the preset's whole run and is not reached by a run this short; see docs/RESULTS.md.)
#[test]
fn a_short_orl_run_fine_tunes_towards_the_held_out_person() {
    use kshot::data::orl;
    use kshot::generate::{choose_shots, render};
    let root = common::data_root();
    let (protocol, method) = (presets::find("fewshot-gan-orl").unwrap().build)();
    let mut config = RunConfig::new(protocol, method);
    config.episodes = 100;
    config.checkpoint_every = 100;
    settings!(config, FewShotGan).width = 4;
    let train_set = kshot::data::load_data(&root, &config.data, "train", 2).unwrap();
    assert!(train_set.classes.iter().all(|c| orl::meta_train_people().contains(&c.name)));
    let tmp = common::tempdir("fewshot-gan-orl");
    let dir = tmp.path().join("run");
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |_| {}).unwrap();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let generator = learner.generator().expect("a generator");
    let faces = orl::load_orl(&root, 64).unwrap();
    let held_out = orl::held_out_people();
    let (mut tuned, mut feed_forward, mut mean) = (0.0, 0.0, 0.0);
    for k in [0, 5] {
        let own = faces.of_person(&held_out[k]);
        let choice = choose_shots(own.len(), 8, 0, k).unwrap();
        let shots: Vec<_> = choice.shots.iter().map(|&i| own[i]).collect();
        let targets: Vec<_> = choice.targets.iter().map(|&i| own[i]).collect();
        let poses: Vec<_> = targets.iter().map(|f| &f.landmarks).collect();
        let n = shots[0].pixels.len();
        let average: Vec<f32> = (0..n)
            .map(|j| shots.iter().map(|f| f.pixels[j] as f32).sum::<f32>() / (255.0 * 8.0))
            .collect();
        let rendered = [60, 0].map(|steps| render(generator, &shots, &poses, steps).unwrap());
        for (t, target) in targets.iter().enumerate() {
            let real: Vec<f32> = target.pixels.iter().map(|&v| v as f32 / 255.0).collect();
            tuned += kshot::image_metrics::l1(&rendered[0][t], &real);
            feed_forward += kshot::image_metrics::l1(&rendered[1][t], &real);
            mean += kshot::image_metrics::l1(&average, &real);
        }
    }
    println!("L1 over 4 targets: fine-tuned {tuned:.4}, feed-forward {feed_forward:.4}, mean of the shots {mean:.4}");
    assert!(
        tuned < 0.9 * feed_forward,
        "fine-tuning did not help: {tuned} vs feed-forward {feed_forward}"
    );
}
