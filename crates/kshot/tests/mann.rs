//! MANN (Santoro et al. 2016): the LRUA memory and the whole episode loss against central finite
//! differences in f64, usage decay and least-used selection by hand, the one-step label shift,
//! the per-instance metric, exact resume, and short seeded runs of MANN and its LSTM baseline.

#[macro_use]
mod common;

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use kshot::config::RunConfig;
use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
use kshot::methods::mann::{least_used_slots, MannNet, Sequence};
use kshot::methods::{LabelCode, Learner, Mann, MannConfig};
use kshot::nn::Params;
use kshot::presets;
use kshot::train;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn small(memory: bool, labels: LabelCode) -> MannConfig {
    MannConfig {
        memory,
        classes: 3,
        labels,
        controller: 6,
        slots: 5,
        slot_size: 3,
        read_heads: 2,
        usage_decay: 0.95,
        key_strength: false,
    }
}

/// The net's parameters as f64 variables.
fn f64_vars(net: &MannNet, seed: u64) -> Vec<(String, Var)> {
    let p = net.init(&mut ChaCha8Rng::seed_from_u64(seed), &Device::Cpu).unwrap();
    p.iter()
        .map(|(n, v)| {
            let t = (v.as_tensor().to_dtype(DType::F64).unwrap() * 2.0).unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn params_of(vars: &[(String, Var)]) -> Params {
    let mut p = Params::new();
    for (n, v) in vars {
        p.insert(n.clone(), v.as_tensor().clone());
    }
    p
}

/// A random sequence of `steps` images of `pixels` values in [0, 1] over `ways` labels, f64.
fn sequence(pixels: usize, steps: usize, ways: usize, code: LabelCode, seed: u64) -> Sequence {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f64> =
        (0..steps * pixels).map(|_| rand::Rng::random_range(&mut rng, 0.0..1.0)).collect();
    let images = Tensor::from_vec(v, (steps, 1, 1, pixels), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..steps).map(|t| (t % ways) as u32).collect();
    Sequence::shuffled(&images, &labels, ways, code, &mut rng).unwrap()
}

/// Central differences of `f` against the autograd gradient for a spread of entries of every
/// parameter; returns the largest relative error.
fn check_gradients(vars: &[(String, Var)], f: impl Fn(&Params) -> Tensor) -> f64 {
    let loss = f(&params_of(vars));
    let grads = loss.backward().unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for (name, var) in vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let stride = (base.len() / 7).max(1);
        for i in (0..base.len()).step_by(stride) {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap();
                let mut p = params_of(vars);
                p.insert(name.clone(), t);
                f(&p).to_scalar::<f64>().unwrap()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (numeric - g[i]).abs() / (1e-6 + numeric.abs().max(g[i].abs()));
            assert!(err < 1e-5, "{name}[{i}]: autograd {} vs central difference {numeric}", g[i]);
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn lrua_read_write_matches_central_differences_in_f64() {
    for key_strength in [false, true] {
        lrua_gradients(MannConfig { key_strength, ..small(true, LabelCode::OneHot) });
    }
}

fn lrua_gradients(config: MannConfig) {
    let net = MannNet::new(config, 4);
    let vars = f64_vars(&net, 1);
    let seq = sequence(4, 7, 3, LabelCode::OneHot, 2);
    let inputs =
        seq.inputs(&net.config).unwrap().to_dtype(DType::F64).unwrap().unsqueeze(0).unwrap();
    let w = Tensor::from_vec(
        (0..7 * 3).map(|i| ((i * 37 % 11) as f64 - 5.0) / 5.0).collect::<Vec<_>>(),
        (1, 7, 3),
        &Device::Cpu,
    )
    .unwrap();
    // Σ w ⊙ logits of every step: the read vectors of all 7 steps reach it through the output.
    let worst = check_gradients(&vars, |p| {
        (net.sequence_logits(p, &inputs).unwrap() * &w).unwrap().sum_all().unwrap()
    });
    eprintln!(
        "LRUA sequence (key strength {}): worst relative error {worst:.2e}",
        config.key_strength
    );
}

#[test]
fn whole_episode_loss_matches_central_differences_in_f64() {
    for code in [LabelCode::OneHot, LabelCode::String] {
        let config = small(true, code);
        let mann = Mann::new(config, 4, &mut ChaCha8Rng::seed_from_u64(3), &Device::Cpu).unwrap();
        let vars = f64_vars(mann.net(), 3);
        let seqs = [sequence(4, 6, 3, code, 4), sequence(4, 6, 3, code, 5)];
        let worst = check_gradients(&vars, |p| mann.batch_loss(p, &seqs).unwrap().loss);
        eprintln!("{code:?} episode loss: worst relative error {worst:.2e}");
    }
}

/// The fused recurrence against the step-by-step candle graph it replaces: features and the
/// gradients of every parameter and of the inputs, in f64, for the LSTM, MANN and MANN with key
/// strengths, over 11 sequences (more than one chunk of the kernel).
#[test]
fn fused_recurrence_matches_the_stepwise_graph_in_f64() {
    for (memory, key_strength) in [(false, false), (true, false), (true, true)] {
        let config = MannConfig { key_strength, ..small(memory, LabelCode::OneHot) };
        let net = MannNet::new(config, 4);
        let vars = f64_vars(&net, 11);
        let p = params_of(&vars);
        let seqs: Vec<Tensor> = (0..11)
            .map(|i| {
                sequence(4, 9, 3, LabelCode::OneHot, 20 + i)
                    .inputs(&config)
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
            })
            .collect();
        let inputs = Var::from_tensor(&Tensor::stack(&seqs, 0).unwrap()).unwrap();
        let fused = net.sequence_features(&p, inputs.as_tensor()).unwrap();
        let stepwise = net.sequence_features_stepwise(&p, inputs.as_tensor()).unwrap();
        assert_eq!(fused.dims(), stepwise.dims());
        let width = fused.dim(2).unwrap();
        let w = Tensor::from_vec(
            (0..11 * 9 * width).map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0).collect::<Vec<_>>(),
            (11, 9, width),
            &Device::Cpu,
        )
        .unwrap();
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let a: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-10 * scale.max(1.0),
                    "{what} (memory {memory}, key strength {key_strength}) [{i}]: fused {x} vs stepwise {y}"
                );
            }
        };
        close(&fused, &stepwise, "features");
        let g_fused = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_step = (stepwise * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(
            g_fused.get(inputs.as_tensor()).unwrap(),
            g_step.get(inputs.as_tensor()).unwrap(),
            "d inputs",
        );
        for (name, var) in &vars {
            match (g_fused.get(var.as_tensor()), g_step.get(var.as_tensor())) {
                (Some(a), Some(b)) => close(a, b, name),
                (None, None) => {}
                _ => panic!("{name}: a gradient on one path only"),
            }
        }
    }
}

#[test]
fn least_used_selection_and_usage_decay_by_hand() {
    assert_eq!(least_used_slots(&[0.5, 0.1, 0.9, 0.1, 0.3], 3), vec![1, 3, 4]);
    assert_eq!(least_used_slots(&[0.0; 4], 2), vec![0, 1]);

    let config = small(true, LabelCode::OneHot);
    let net = MannNet::new(config, 4);
    let vars = f64_vars(&net, 6);
    let p = params_of(&vars);
    let seq = sequence(4, 2, 3, LabelCode::OneHot, 7);
    let inputs = seq.inputs(&config).unwrap().to_dtype(DType::F64).unwrap().unsqueeze(0).unwrap();
    let gates = net.input_gates(&p, &inputs).unwrap();
    let mut state = net.initial_state(1, DType::F64, &Device::Cpu).unwrap();
    let out =
        net.step(&p, &mut state, &gates.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()).unwrap();

    // By hand from the controller output: keys and gates of the two heads.
    let h: Vec<f64> = out.h.flatten_all().unwrap().to_vec1().unwrap();
    let linear = |w: &str, b: &str, rows: usize| -> Vec<f64> {
        let w: Vec<Vec<f64>> = p.get(w).unwrap().to_vec2().unwrap();
        let b: Vec<f64> = p.get(b).unwrap().to_vec1().unwrap();
        (0..rows).map(|r| b[r] + w[r].iter().zip(&h).map(|(a, x)| a * x).sum::<f64>()).collect()
    };
    let keys: Vec<f64> = linear("key.weight", "key.bias", 6).iter().map(|v| v.tanh()).collect();
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    let alpha: Vec<f64> = linear("gate.weight", "gate.bias", 2).into_iter().map(sig).collect();
    // Usage starts at 0: head j writes (1 − σ(α_j)) into slot j, slot 0 was zeroed first.
    let memory: Vec<Vec<f64>> = state.memory().unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    for d in 0..3 {
        let slot0 = (1.0 - alpha[0]) * keys[d];
        let slot1 = 1e-6 + (1.0 - alpha[1]) * keys[3 + d];
        assert!((memory[0][d] - slot0).abs() < 1e-12, "slot 0: {} vs {slot0}", memory[0][d]);
        assert!((memory[1][d] - slot1).abs() < 1e-12, "slot 1: {} vs {slot1}", memory[1][d]);
        for (s, row) in memory.iter().enumerate().skip(2) {
            assert!((row[d] - 1e-6).abs() < 1e-15, "slot {s} was written");
        }
    }
    // Usage after step 1: Σ_heads w^r + Σ_heads w^w.
    let reads: Vec<Vec<f64>> = state.read_weights().unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    let u1 = state.usage()[0].clone();
    for s in 0..5 {
        let write = match s {
            0 => 1.0 - alpha[0],
            1 => 1.0 - alpha[1],
            _ => 0.0,
        };
        let expected = reads[0][s] + reads[1][s] + write;
        assert!((u1[s] - expected).abs() < 1e-12, "usage of slot {s}: {} vs {expected}", u1[s]);
    }
    // Step 2: usage decays by γ = 0.95 before the new weights are added.
    let alpha2 = {
        let out2 =
            net.step(&p, &mut state, &gates.narrow(1, 1, 1).unwrap().squeeze(1).unwrap()).unwrap();
        let h2: Vec<f64> = out2.h.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<Vec<f64>> = p.get("gate.weight").unwrap().to_vec2().unwrap();
        let b: Vec<f64> = p.get("gate.bias").unwrap().to_vec1().unwrap();
        (0..2)
            .map(|r| sig(b[r] + w[r].iter().zip(&h2).map(|(a, x)| a * x).sum::<f64>()))
            .collect::<Vec<_>>()
    };
    let lu = least_used_slots(&u1, 2);
    let reads2: Vec<Vec<f64>> =
        state.read_weights().unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    for s in 0..5 {
        let mut write = 0.0;
        for j in 0..2 {
            write += alpha2[j] * reads[j][s] + if lu[j] == s { 1.0 - alpha2[j] } else { 0.0 };
        }
        let expected = 0.95 * u1[s] + reads2[0][s] + reads2[1][s] + write;
        let got = state.usage()[0][s];
        assert!((got - expected).abs() < 1e-12, "step 2 usage of slot {s}: {got} vs {expected}");
    }
}

#[test]
fn a_label_is_seen_one_step_after_its_image() {
    for memory in [true, false] {
        let config = small(memory, LabelCode::OneHot);
        let net = MannNet::new(config, 4);
        let p = params_of(&f64_vars(&net, 8));
        let seq = sequence(4, 6, 3, LabelCode::OneHot, 9);
        let inputs = seq.inputs(&config).unwrap();
        let rows: Vec<Vec<f64>> = inputs.to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        assert!(rows[0][4..].iter().all(|&v| v == 0.0), "step 0 must show no label");
        for (t, row) in rows.iter().enumerate().skip(1) {
            let shown = row[4..].iter().position(|&v| v == 1.0).unwrap() as u32;
            assert_eq!(shown, seq.labels[t - 1], "step {t} must show the label of step {}", t - 1);
        }
        let logits = |s: &Sequence| -> Vec<Vec<f64>> {
            let x = s.inputs(&config).unwrap().to_dtype(DType::F64).unwrap().unsqueeze(0).unwrap();
            net.sequence_logits(&p, &x).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
        };
        let base = logits(&seq);
        // A different label at step 3 changes nothing at steps 0..=3 and something at step 4.
        let mut changed = Sequence {
            images: seq.images.clone(),
            labels: seq.labels.clone(),
            codes: seq.codes.clone(),
        };
        changed.labels[3] = (seq.labels[3] + 1) % 3;
        let other = logits(&changed);
        for t in 0..=3 {
            assert_eq!(
                base[t], other[t],
                "memory {memory}: the label of step 3 leaked into step {t}"
            );
        }
        assert_ne!(base[4], other[4], "memory {memory}: step 4 does not see the label of step 3");
    }
}

#[test]
fn per_instance_accuracy_on_a_hand_made_sequence() {
    // Two classes, three presentations each: a b a b b a.
    let labels = [0, 1, 0, 1, 1, 0];
    let correct = [false, true, true, false, true, true];
    // 1st: a wrong, b right → 0.5; 2nd: a right, b wrong → 0.5; 3rd: b right, a right → 1.
    assert_eq!(kshot::eval::per_instance_accuracy(&labels, &correct, 2), vec![0.5, 0.5, 1.0]);
    // A class seen fewer times bounds the presentations reported.
    assert_eq!(kshot::eval::per_instance_accuracy(&[0, 1, 0], &[true, false, true], 2), vec![0.5]);
}

fn small_run(method: &str, episodes: u64) -> RunConfig {
    let name = if method == "mann" { "mann-omniglot-5class" } else { "lstm-omniglot-5class" };
    let (protocol, method) = (presets::find(name).unwrap().build)();
    let mut c = RunConfig::new(protocol, method);
    c.data.image_size = 8;
    c.train = EpisodeSpec::new(3, 4, 0);
    c.episodes = episodes;
    c.meta_batch = 8;
    c.schedule.lr = 1e-3;
    c.checkpoint_every = 2;
    let m = settings!(c, Mann);
    (m.classes, m.controller, m.slots, m.slot_size, m.read_heads) = (3, 32, 8, 8, 2);
    c
}

#[test]
fn mann_and_lstm_resume_exactly() {
    let set = common::synthetic_set(20, 2, 10, 8, 5);
    let no_stop = AtomicBool::new(false);
    for method in ["mann", "lstm"] {
        let full = small_run(method, 4);
        let tmp = common::tempdir(&format!("mann-resume-{method}"));
        let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
        let mut first = full.clone();
        first.episodes = 2;
        train::train(&straight, &full, &set, None, false, &no_stop, |_| {}).unwrap();
        train::train(&split, &first, &set, None, false, &no_stop, |_| {}).unwrap();
        let mut config = RunConfig::load(&split.join(train::CONFIG_FILE)).unwrap();
        config.episodes = 4;
        train::train(&split, &config, &set, None, true, &no_stop, |_| {}).unwrap();
        assert_eq!(common::model_tensors(&straight), common::model_tensors(&split), "{method}");
    }
}

/// Online accuracy at the 2nd and later presentations of held-out classes, untrained and trained.
fn held_out_online_accuracy(method: &str, episodes: u64) -> (f64, f64) {
    let train_set = common::synthetic_set(60, 1, 10, 8, 5);
    let test_set = common::synthetic_set(20, 1, 10, 8, 99);
    let config = small_run(method, episodes);
    let tmp = common::tempdir(&format!("mann-run-{method}"));
    let dir = tmp.path().join("run");
    let sampler = EpisodeSampler::new(&test_set, EpisodeSpec::new(3, 1, 3), Grouping::Any).unwrap();
    let later = |learner: &dyn Learner| -> f64 {
        let r = kshot::eval::evaluate(learner, &sampler, 40, 0, |_| {}).unwrap();
        let p = r.per_instance.expect("MANN reports per-instance accuracy").per_instance_accuracy;
        assert_eq!(p.len(), 4);
        p[1..].iter().sum::<f64>() / 3.0
    };
    let untrained =
        train::new_learner(&train::fit_to_training_set(&config, &train_set).unwrap()).unwrap();
    let before = later(untrained.as_ref());
    train::train(&dir, &config, &train_set, None, false, &AtomicBool::new(false), |s| {
        if s.episode % 50 == 0 {
            eprintln!("{method} step {}: loss {:.4} acc {:.3}", s.episode, s.loss, s.accuracy);
        }
    })
    .unwrap();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = later(learner.as_ref());
    eprintln!("{method}: online accuracy at presentations 2-4, {before:.3} untrained → {after:.3} trained");
    (before, after)
}

// Held-out online accuracy at presentations 2-4 of 3 classes: chance is 1/3 (an untrained net
// scores 0.33 on these 360 predictions, standard error ≈ 0.025). 600 updates lift both nets to
// ≈ 0.44 — the plateau where a net has learnt which labels an episode has shown, before it binds
// images to labels (on Omniglot that takes thousands of updates: docs/RESULTS.md).
#[test]
fn mann_learns_above_chance_online() {
    let (before, after) = held_out_online_accuracy("mann", 600);
    assert!(before < 0.37, "untrained MANN already at {before}");
    assert!(after > 0.40, "MANN reached only {after} (chance 1/3)");
}

#[test]
fn lstm_baseline_learns_above_chance_online() {
    let (before, after) = held_out_online_accuracy("lstm", 600);
    assert!(before < 0.37, "untrained LSTM already at {before}");
    assert!(after > 0.40, "the LSTM baseline reached only {after} (chance 1/3)");
}
