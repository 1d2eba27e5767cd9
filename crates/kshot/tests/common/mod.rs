//! Helpers shared by the integration tests (each test file includes this module).
#![allow(dead_code)]

use kshot::data::{Class, ImageSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A synthetic set: `classes` classes in `groups` groups, `per_class` images each, every class a
/// noisy copy of its own random template (so it is learnable).
pub fn synthetic_set(
    classes: usize,
    groups: usize,
    per_class: usize,
    size: usize,
    seed: u64,
) -> ImageSet {
    noisy_synthetic_set(classes, groups, per_class, size, seed, 0.1)
}

/// [`synthetic_set`] with each pixel of each image flipped with probability `flip`: at 0.3 an
/// untrained network's features no longer separate the classes well.
pub fn noisy_synthetic_set(
    classes: usize,
    groups: usize,
    per_class: usize,
    size: usize,
    seed: u64,
    flip: f64,
) -> ImageSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = size * size;
    let classes = (0..classes)
        .map(|c| {
            let template: Vec<u8> =
                (0..n).map(|_| if rng.random_bool(0.3) { 255 } else { 0 }).collect();
            let mut pixels = Vec::with_capacity(per_class * n);
            for _ in 0..per_class {
                pixels.extend(
                    template.iter().map(|&v| if rng.random_bool(flip) { 255 - v } else { v }),
                );
            }
            Class {
                name: format!("g{}/c{c}", c % groups),
                group: format!("g{}", c % groups),
                pixels,
            }
        })
        .collect();
    ImageSet { name: "synthetic".into(), channels: 1, height: size, width: size, classes }
}

/// The data root for tests: `$KSHOT_DATA`, else `../shared/data` beside the checkout.
pub fn data_root() -> std::path::PathBuf {
    match std::env::var_os("KSHOT_DATA") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    }
}

/// A fresh directory under the system temp dir, removed when the returned value is dropped (keep
/// it alive while its path is in use).
pub fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("kshot-test-{tag}-")).tempdir().unwrap()
}

/// Points `$KSHOT_CACHE` at one decoded-data cache under the cargo target dir, shared by every test
/// process and reused across runs (cache files are written atomically, so sharing is safe).
pub fn use_shared_data_cache() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kshot-data-cache");
        std::env::set_var("KSHOT_CACHE", cache);
    });
}

/// Accuracy on 100 seeded 5-way 1-shot 15-query episodes of Omniglot's Vinyals test classes, of
/// the untrained learner of `config` and of that learner after training on the `train` classes.
pub fn omniglot_before_and_after(config: &kshot::config::RunConfig, tag: &str) -> (f64, f64) {
    use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};
    use kshot::{eval, train};
    use_shared_data_cache();
    let root = data_root();
    let train_set = kshot::data::load(&root, "omniglot", "vinyals", "train", 28).unwrap();
    let test_set = kshot::data::load(&root, "omniglot", "vinyals", "test", 28).unwrap();
    let tmp = tempdir(&format!("{tag}-omniglot"));
    let dir = tmp.path().join("run");

    let sampler =
        EpisodeSampler::new(&test_set, EpisodeSpec::new(5, 1, 15), Grouping::Any).unwrap();
    let untrained = train::new_learner(config).unwrap();
    let before = eval::evaluate(untrained.as_ref(), &sampler, 100, 0, |_| {}).unwrap();
    let no_stop = std::sync::atomic::AtomicBool::new(false);
    train::train(&dir, config, &train_set, None, false, &no_stop, |_| {}).unwrap();
    let (_, learner) = train::load_learner(&dir).unwrap();
    let after = eval::evaluate(learner.as_ref(), &sampler, 100, 0, |_| {}).unwrap();
    (before.accuracy, after.accuracy)
}

/// The method settings of a run config as variant `$variant` of `MethodConfig`, mutably.
#[macro_export]
macro_rules! settings {
    ($config:expr, $variant:ident) => {
        match &mut $config.method {
            kshot::methods::MethodConfig::$variant(m) => m,
            other => panic!("expected {} settings, got {other:?}", stringify!($variant)),
        }
    };
}

/// The Conv4 settings of a run config's backbone, mutably.
pub fn conv4(config: &mut kshot::config::RunConfig) -> &mut kshot::nn::Conv4Config {
    config.backbone.conv4_mut().expect("a conv4 backbone")
}

/// The strided Conv4 settings of a run config (MAML's and Reptile's Omniglot presets).
#[allow(dead_code)]
pub fn strided(config: &mut kshot::config::RunConfig) -> &mut kshot::nn::StridedConv4Config {
    match &mut config.backbone {
        kshot::nn::BackboneConfig::Conv4Strided(c) => c,
        other => panic!("not a strided Conv4 backbone: {other:?}"),
    }
}

/// Switches a run config to method `name` with that method's default settings.
pub fn set_method(config: &mut kshot::config::RunConfig, name: &str) {
    config.method = kshot::methods::MethodConfig::named(name).unwrap();
}

/// Every tensor of a run's model file, sorted by name, as f64 values (for exact comparisons).
pub fn model_tensors(dir: &std::path::Path) -> Vec<(String, Vec<f64>)> {
    let t = kshot::checkpoint::load_tensors(&dir.join(kshot::train::MODEL_FILE)).unwrap();
    let mut v: Vec<(String, Vec<f64>)> = t
        .into_iter()
        .map(|(k, t)| {
            (k, t.to_dtype(kshot::DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
