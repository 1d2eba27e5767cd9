//! The Omniglot pixel pipelines (`--resize area|nearest|bilinear-crop`, `--invert`): Pillow's
//! NEAREST and BILINEAR on hand-computed values, CloserLook's centre crop, the inversion, and a
//! cache entry per pipeline.

mod common;

use kshot::data::omniglot::{
    self, cache_key, cache_key_pixels, nearest_resize, pillow_bilinear, Pixels, Resize, Split,
    VinyalsSubset,
};

/// A 105×105 image whose pixel (r, c) is (r·7 + c·3) mod 256.
fn ramp() -> Vec<u8> {
    (0..105 * 105).map(|i| ((i / 105) * 7 + (i % 105) * 3) as u8).collect()
}

#[test]
fn nearest_takes_pillows_source_pixel() {
    let img = ramp();
    let out = nearest_resize(&img, 105, 105, 28);
    for r in 0..28 {
        for c in 0..28 {
            // Pillow: input ⌊(x + ½)·105/28⌋ = ⌊3.75x + 1.875⌋.
            let (sr, sc) = ((r as f64 * 3.75 + 1.875) as usize, (c as f64 * 3.75 + 1.875) as usize);
            assert_eq!(out[r * 28 + c], img[sr * 105 + sc], "({r}, {c})");
        }
    }
    // Binary in, binary out (the 1-bit PNGs stay binary).
    let binary: Vec<u8> = img.iter().map(|&v| if v > 128 { 255 } else { 0 }).collect();
    assert!(nearest_resize(&binary, 105, 105, 28).iter().all(|&v| v == 0 || v == 255));
}

#[test]
fn bilinear_matches_hand_computed_pillow_weights() {
    // 4 → 2: scale 2, support 2; output 0 has centre 1 and taps x = 0, 1, 2 with triangle weights
    // 0.75, 0.75, 0.25 (normalised 3/7, 3/7, 1/7); output 1 has centre 3 and taps 1, 2, 3
    // (1/7, 3/7, 3/7). Rows are equal, so the vertical pass keeps the values.
    let row = [0u8, 255, 255, 0];
    let img: Vec<u8> = (0..4).flat_map(|_| row).collect();
    let out = pillow_bilinear(&img, 4, 4, 2);
    let want = (255.0f64 * 4.0 / 7.0).round() as u8; // 145.7 → 146
    assert_eq!(out, vec![want; 4]);
    let flat = vec![200u8; 105 * 105];
    assert!(pillow_bilinear(&flat, 105, 105, 32).iter().all(|&v| v == 200));
}

#[test]
fn bilinear_crop_is_the_centre_of_the_32_pixel_resize() {
    let img = ramp();
    let big = pillow_bilinear(&img, 105, 105, 32);
    let p = Pixels { resize: Resize::BilinearCrop, invert: false };
    let out = p.apply(&img, 105, 105, 28);
    assert_eq!(out.len(), 28 * 28);
    for r in 0..28 {
        assert_eq!(&out[r * 28..(r + 1) * 28], &big[(r + 2) * 32 + 2..(r + 2) * 32 + 30]);
    }
    let inverted = Pixels { invert: true, ..p }.apply(&img, 105, 105, 28);
    assert!(inverted.iter().zip(&out).all(|(a, b)| *a == 255 - b));
}

#[test]
fn area_default_is_unchanged_and_uninverted_is_its_complement() {
    let img = ramp();
    let ink = omniglot::preprocess(&img, 105, 105, 28);
    assert_eq!(Pixels::default().apply(&img, 105, 105, 28), ink);
    let plain = Pixels { invert: false, ..Pixels::default() }.apply(&img, 105, 105, 28);
    assert!(plain.iter().zip(&ink).all(|(a, b)| *a == 255 - b));
}

#[test]
fn resize_names_parse_and_a_bad_one_says_what_to_use() {
    for r in Resize::ALL {
        assert_eq!(r.as_str().parse::<Resize>().unwrap(), r);
    }
    let err = "bicubic".parse::<Resize>().unwrap_err().to_string();
    assert!(err.contains("bicubic") && err.contains("area, nearest or bilinear-crop"), "{err}");
    assert!(!err.contains('\n'));
}

/// Each pipeline has its own cache entry, and the default keeps today's key.
#[test]
fn every_pipeline_has_its_own_cache_key() {
    let root = common::data_root();
    let split = Split::Vinyals(VinyalsSubset::Val);
    let mut digests = Vec::new();
    for resize in Resize::ALL {
        for invert in [true, false] {
            let key = cache_key_pixels(&root, &split, 28, Pixels { resize, invert }).unwrap();
            digests.push(key.digest().unwrap());
        }
    }
    let mut unique = digests.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), digests.len(), "two pipelines share a cache entry");
    assert_eq!(cache_key(&root, &split, 28).unwrap().digest().unwrap(), digests[0]);
}
