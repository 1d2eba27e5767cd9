//! Helpers shared by the integration tests (each test file includes this module).
#![allow(dead_code)]

use kshot::data::{Class, ImageSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A synthetic set: `classes` classes in `groups` groups, `per_class` images each, every class a
/// noisy copy of its own random template (so it is learnable).
pub fn synthetic_set(classes: usize, groups: usize, per_class: usize, size: usize, seed: u64) -> ImageSet {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = size * size;
    let classes = (0..classes)
        .map(|c| {
            let template: Vec<u8> = (0..n).map(|_| if rng.random_bool(0.3) { 255 } else { 0 }).collect();
            let mut pixels = Vec::with_capacity(per_class * n);
            for _ in 0..per_class {
                pixels.extend(template.iter().map(|&v| if rng.random_bool(0.1) { 255 - v } else { v }));
            }
            Class { name: format!("g{}/c{c}", c % groups), group: format!("g{}", c % groups), pixels }
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
