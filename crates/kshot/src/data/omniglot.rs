//! Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawers each.
//!
//! Read straight from the official zips under `ROOT/omniglot/` (`images_background.zip`,
//! `images_evaluation.zip`, layout `images_background/<Alphabet>/characterNN/CCCC_DD.png`), or
//! from the same trees extracted next to them (`ROOT/omniglot/images_background/<Alphabet>/...`).
//! `kshot data fetch omniglot --data-dir ROOT` downloads them ([`super::download::fetch_omniglot`]).
//!
//! Two splits:
//! - [`Split::Lake`]: Lake's background (30 alphabets, 964 characters) / evaluation (20 alphabets,
//!   659 characters) sets, one class per character, classes sorted by `Alphabet/characterNN`.
//! - [`Split::Vinyals`]: the Vinyals et al. split used by Prototypical Networks, one class per line
//!   of `ROOT/omniglot/splits/vinyals/{train,val,trainval,test}.txt` (`Alphabet/characterNN/rotDDD`),
//!   in file order; `rotDDD` rotates every image of the character counter-clockwise by DDD degrees
//!   and makes a new class. A line's character may come from either zip.
//!
//! Images of a class are in drawer order (`_01` … `_20`). See [`preprocess`] for the pixel values.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::cache::{Cache, CacheKey};
use super::{Class, ImageSet};

/// Side of the original images.
pub const NATIVE_SIZE: usize = 105;

/// Images per character in the official data.
pub const DRAWERS: usize = 20;

/// Identifies the preprocessing in cache keys; change it when [`preprocess`] changes.
const PREPROCESS_VERSION: &str = "omniglot-preprocess=invert,area-exact-int,v1";

/// Largest PNG we are willing to read out of a zip (the real ones are ~150 bytes).
const MAX_ENTRY_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VinyalsSubset {
    Train,
    Val,
    Trainval,
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LakeSubset {
    Background,
    Evaluation,
}

/// The subsets of the official codes' random character splits ([`Split::Maml`], [`Split::Reptile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShuffledSubset {
    Train,
    Val,
    Test,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Vinyals(VinyalsSubset),
    Lake(LakeSubset),
    /// cbfinn/maml's split (`data_generator.py`): the 1623 characters shuffled by Python's
    /// `random.seed(1)`, then 1100 train, 100 val and 423 test characters, one unrotated class each
    /// (MAML rotates each class of a task at random: [`crate::data::EpisodeSampler::with_task_rotations`]).
    Maml(ShuffledSubset),
    /// openai/supervised-reptile's split (`run_omniglot.py`): the 1623 characters shuffled by
    /// Python's `random.seed(0)`, then 1200 train characters × 4 rotations (4800 classes) and 423
    /// unrotated test characters. No validation subset.
    Reptile(ShuffledSubset),
}

/// Characters in the train and validation parts of MAML's and Reptile's shuffled splits; the rest
/// (423) are test characters.
const MAML_TRAIN: usize = 1100;
const MAML_VAL: usize = 100;
const REPTILE_TRAIN: usize = 1200;

impl VinyalsSubset {
    pub const ALL: [VinyalsSubset; 4] =
        [VinyalsSubset::Train, VinyalsSubset::Val, VinyalsSubset::Trainval, VinyalsSubset::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            VinyalsSubset::Train => "train",
            VinyalsSubset::Val => "val",
            VinyalsSubset::Trainval => "trainval",
            VinyalsSubset::Test => "test",
        }
    }
}

impl ShuffledSubset {
    pub const ALL: [ShuffledSubset; 3] =
        [ShuffledSubset::Train, ShuffledSubset::Val, ShuffledSubset::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            ShuffledSubset::Train => "train",
            ShuffledSubset::Val => "val",
            ShuffledSubset::Test => "test",
        }
    }
}

impl LakeSubset {
    pub const ALL: [LakeSubset; 2] = [LakeSubset::Background, LakeSubset::Evaluation];

    pub fn as_str(self) -> &'static str {
        match self {
            LakeSubset::Background => "background",
            LakeSubset::Evaluation => "evaluation",
        }
    }

    /// `images_background` / `images_evaluation`: the zip's stem and its top folder.
    pub fn archive_stem(self) -> &'static str {
        match self {
            LakeSubset::Background => "images_background",
            LakeSubset::Evaluation => "images_evaluation",
        }
    }
}

impl Split {
    /// `vinyals` or `lake`.
    pub fn family(&self) -> &'static str {
        match self {
            Split::Vinyals(_) => "vinyals",
            Split::Lake(_) => "lake",
            Split::Maml(_) => "maml",
            Split::Reptile(_) => "reptile",
        }
    }

    pub fn subset(&self) -> &'static str {
        match self {
            Split::Vinyals(s) => s.as_str(),
            Split::Lake(s) => s.as_str(),
            Split::Maml(s) | Split::Reptile(s) => s.as_str(),
        }
    }

    /// The [`ImageSet::name`] of the loaded set, e.g. `omniglot/vinyals/train`.
    pub fn set_name(&self) -> String {
        format!("omniglot/{}/{}", self.family(), self.subset())
    }
}

impl fmt::Display for VinyalsSubset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for LakeSubset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `train`, `val`, `trainval`, `test`, `background`, `evaluation`.
impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subset())
    }
}

impl FromStr for VinyalsSubset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        VinyalsSubset::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
            anyhow!("unknown Vinyals subset `{s}`: expected train, val, trainval or test")
        })
    }
}

impl FromStr for LakeSubset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        LakeSubset::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| anyhow!("unknown Lake subset `{s}`: expected background or evaluation"))
    }
}

/// Accepts the [`Display`](fmt::Display) names, and also `vinyals/train`, `lake/background` etc.
impl FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let (family, subset) = match t.split_once('/') {
            Some((f, sub)) => (Some(f), sub),
            None => (None, t.as_str()),
        };
        let vinyals = subset.parse::<VinyalsSubset>().ok().map(Split::Vinyals);
        let lake = subset.parse::<LakeSubset>().ok().map(Split::Lake);
        let shuffled = ShuffledSubset::ALL.into_iter().find(|v| v.as_str() == subset);
        let found = match family {
            None => vinyals.or(lake),
            Some("vinyals") => vinyals,
            Some("lake") => lake,
            Some("maml") => shuffled.map(Split::Maml),
            Some("reptile") => shuffled.filter(|s| *s != ShuffledSubset::Val).map(Split::Reptile),
            Some(_) => None,
        };
        found.ok_or_else(|| {
            anyhow!(
                "unknown Omniglot split `{s}`: expected train, val, trainval, test (Vinyals), \
                 background, evaluation (Lake), maml/train, maml/val, maml/test or reptile/train, \
                 reptile/test"
            )
        })
    }
}

/// Loads `split` at `image_size`×`image_size`, through the cache in [`Cache::from_env`].
pub fn load(root: &Path, split: &Split, image_size: usize) -> Result<ImageSet> {
    load_with_cache(root, split, image_size, &Cache::from_env())
}

/// [`load`] with an explicit cache ([`Cache::disabled`] to always decode).
pub fn load_with_cache(
    root: &Path,
    split: &Split,
    image_size: usize,
    cache: &Cache,
) -> Result<ImageSet> {
    load_pixels_with_cache(root, split, image_size, Pixels::default(), cache)
}

/// [`load`] with another pixel pipeline ([`Pixels`]); each pipeline has its own cache entry.
pub fn load_pixels(
    root: &Path,
    split: &Split,
    image_size: usize,
    pixels: Pixels,
) -> Result<ImageSet> {
    load_pixels_with_cache(root, split, image_size, pixels, &Cache::from_env())
}

/// [`load_pixels`] with an explicit cache.
pub fn load_pixels_with_cache(
    root: &Path,
    split: &Split,
    image_size: usize,
    pixels: Pixels,
    cache: &Cache,
) -> Result<ImageSet> {
    check_size(image_size)?;
    let inputs = Inputs::locate(root, split)?;
    let key = inputs.cache_key(split, image_size, pixels);
    cache.load_or_build(&key, || inputs.build(split, image_size, pixels))
}

/// Decodes `split` without any cache.
pub fn build(root: &Path, split: &Split, image_size: usize) -> Result<ImageSet> {
    check_size(image_size)?;
    Inputs::locate(root, split)?.build(split, image_size, Pixels::default())
}

/// The cache key [`load`] uses (fails like `load` when the data is missing).
pub fn cache_key(root: &Path, split: &Split, image_size: usize) -> Result<CacheKey> {
    cache_key_pixels(root, split, image_size, Pixels::default())
}

/// The cache key [`load_pixels`] uses.
pub fn cache_key_pixels(
    root: &Path,
    split: &Split,
    image_size: usize,
    pixels: Pixels,
) -> Result<CacheKey> {
    Ok(Inputs::locate(root, split)?.cache_key(split, image_size, pixels))
}

/// The folder holding Omniglot under a data root.
pub fn dataset_dir(root: &Path) -> PathBuf {
    root.join("omniglot")
}

/// The split file of a Vinyals subset.
pub fn vinyals_split_file(root: &Path, subset: VinyalsSubset) -> PathBuf {
    dataset_dir(root).join("splits").join("vinyals").join(format!("{}.txt", subset.as_str()))
}

fn check_size(image_size: usize) -> Result<()> {
    if image_size == 0 || image_size > 4096 {
        bail!(
            "invalid Omniglot image size {image_size}: expected 1..=4096 (28 is the usual choice)"
        );
    }
    Ok(())
}

fn fetch_hint() -> &'static str {
    "run `kshot data fetch omniglot --data-dir DIR` to download it into DIR/omniglot, or pass \
     --data-dir (or set KSHOT_DATA) to a directory that has it"
}

/// Turns one decoded grayscale image (`luma`, row-major, `w`×`h`, white background, black ink)
/// into `size`×`size` u8 ink values: ink = 255 − luma, so background is 0 and full ink 255.
///
/// The resize is an **exact area average** (box filter integrated over each output pixel's
/// footprint, like OpenCV's `INTER_AREA` / Pillow's `reduce`): output pixel `(r, c)` covers the
/// input rectangle `[c·w/size, (c+1)·w/size) × [r·h/size, (r+1)·h/size)`, and its value is the mean
/// ink over that rectangle with partial input pixels weighted by the covered fraction, rounded to
/// the nearest integer (halves up). It is computed in integer arithmetic, so it is deterministic
/// across platforms, anti-aliased (a 105→28 glyph keeps its thin strokes as gray levels instead of
/// dropping them as nearest-neighbour would), and commutes exactly with 90° rotations and flips
/// (the weights are symmetric), so rotating after resizing equals resizing the rotated original.
/// This differs from the official pipelines (MAML, Reptile, ProtoNet): their PNGs are 1-bit, which
/// Pillow opens in mode "1" and always resizes with NEAREST whatever filter is asked
/// (`Image.resize`: `if self.mode in ("1", "P"): resample = NEAREST`), giving binary images;
/// [`Resize::Nearest`] reproduces that. Accuracies are comparable, pixels are not identical.
///
/// # Panics
/// If `luma.len() != w * h` or any of `w`, `h`, `size` is 0 (the loader checks these first).
pub fn preprocess(luma: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    AreaResize::new(w, h, size).apply(luma)
}

/// How the 105×105 originals become `size`×`size` images (`kshot train --resize`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Resize {
    /// kshot's exact area average ([`preprocess`]): gray levels.
    #[default]
    Area,
    /// Pillow's resize of a mode-"1" image, which is NEAREST whatever filter is asked (MAML,
    /// Reptile, ProtoNet): output pixel x takes input ⌊(x + ½)·in/out⌋ (ImagingScaleAffine).
    Nearest,
    /// CloserLookFewShot's test transform: Pillow BILINEAR (antialiased, 8-bit fixed point) to
    /// ⌊1.15·size⌋ (32 for 28), then the centre `size`×`size` crop. Their ImageNet `Normalize` is
    /// not applied (the images are stored as 8-bit values; it is an affine map of the input).
    BilinearCrop,
}

impl Resize {
    pub const ALL: [Resize; 3] = [Resize::Area, Resize::Nearest, Resize::BilinearCrop];

    pub fn as_str(self) -> &'static str {
        match self {
            Resize::Area => "area",
            Resize::Nearest => "nearest",
            Resize::BilinearCrop => "bilinear-crop",
        }
    }
}

impl fmt::Display for Resize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Resize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Resize::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| anyhow!("unknown resize `{s}`; choose area, nearest or bilinear-crop"))
    }
}

/// The pixel pipeline of the Omniglot loader: the resize and whether ink is bright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pixels {
    pub resize: Resize,
    /// Ink = 255 − luma, background 0 (kshot, ProtoNet); false keeps the PNG's white background.
    pub invert: bool,
}

impl Default for Pixels {
    fn default() -> Self {
        Pixels { resize: Resize::Area, invert: true }
    }
}

impl Pixels {
    /// What the cache key adds for these pixels: nothing for the default (so existing caches stay
    /// valid), else a parameter naming the pipeline.
    fn cache_param(&self) -> Option<String> {
        (*self != Pixels::default())
            .then(|| format!("omniglot-pixels=resize:{},invert:{},v1", self.resize, self.invert))
    }

    /// One decoded grayscale image (`luma`, `w`×`h`, white background) to `size`×`size` u8.
    pub fn apply(&self, luma: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
        let out = match self.resize {
            // The area average computes ink; un-inverted is its complement.
            Resize::Area => {
                let ink = preprocess(luma, w, h, size);
                return if self.invert { ink } else { ink.iter().map(|v| 255 - v).collect() };
            }
            Resize::Nearest => nearest_resize(luma, w, h, size),
            Resize::BilinearCrop => {
                let m = size * 115 / 100;
                let big = pillow_bilinear(luma, w, h, m);
                // torchvision's CenterCrop: int(round((m − size)/2)), Python rounding half to even.
                let (d, floor) = (m - size, (m - size) / 2);
                let off = floor + usize::from(d % 2 == 1 && floor % 2 == 1);
                let mut crop = Vec::with_capacity(size * size);
                for r in 0..size {
                    crop.extend_from_slice(&big[(r + off) * m + off..(r + off) * m + off + size]);
                }
                crop
            }
        };
        if self.invert {
            out.iter().map(|v| 255 - v).collect()
        } else {
            out
        }
    }
}

/// Pillow's NEAREST resize (ImagingScaleAffine): output x reads input COORD(xo) with
/// xo = ½·in/out + x·in/out accumulated in f64, as Pillow does.
pub fn nearest_resize(luma: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    assert_eq!(luma.len(), w * h, "luma buffer does not match {w}x{h}");
    let taps = |n_in: usize| {
        let a = n_in as f64 / size as f64;
        let mut o = a * 0.5;
        let mut v = Vec::with_capacity(size);
        for _ in 0..size {
            v.push((o as usize).min(n_in - 1));
            o += a;
        }
        v
    };
    let (xs, ys) = (taps(w), taps(h));
    let mut out = Vec::with_capacity(size * size);
    for &y in &ys {
        out.extend(xs.iter().map(|&x| luma[y * w + x]));
    }
    out
}

/// Pillow's fixed-point precision for 8-bit resampling (Resample.c `PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's BILINEAR coefficients (Resample.c `precompute_coeffs`, `normalize_coeffs_8bpc`): for
/// each output pixel, its first input index and integer weights.
fn bilinear_coeffs(n_in: usize, n_out: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    (0..n_out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    (0.5 + v * (1u64 << PRECISION_BITS) as f64) as i64
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

/// Pillow's 8-bit BILINEAR resize of `luma` (`w`×`h`) to `size`×`size`: the horizontal pass, its
/// rows rounded to u8, then the vertical pass.
pub fn pillow_bilinear(luma: &[u8], w: usize, h: usize, size: usize) -> Vec<u8> {
    assert_eq!(luma.len(), w * h, "luma buffer does not match {w}x{h}");
    let clip = |ss: i64| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let half = 1i64 << (PRECISION_BITS - 1);
    let cx = bilinear_coeffs(w, size);
    let mut tmp = vec![0u8; h * size];
    for y in 0..h {
        for (xx, (xmin, k)) in cx.iter().enumerate() {
            let row = &luma[y * w + xmin..];
            let ss = k.iter().zip(row).fold(half, |acc, (&k, &v)| acc + v as i64 * k);
            tmp[y * size + xx] = clip(ss);
        }
    }
    let cy = bilinear_coeffs(h, size);
    let mut out = vec![0u8; size * size];
    for (yy, (ymin, k)) in cy.iter().enumerate() {
        for x in 0..size {
            let ss = k
                .iter()
                .enumerate()
                .fold(half, |acc, (j, &k)| acc + tmp[(ymin + j) * size + x] as i64 * k);
            out[yy * size + x] = clip(ss);
        }
    }
    out
}

/// [`preprocess`] with its weight tables computed once for a given input shape.
struct AreaResize {
    w: usize,
    h: usize,
    size: usize,
    wx: Vec<Vec<(usize, u32)>>,
    wy: Vec<Vec<(usize, u32)>>,
}

impl AreaResize {
    fn new(w: usize, h: usize, size: usize) -> Self {
        assert!(w > 0 && h > 0 && size > 0, "empty image");
        AreaResize { w, h, size, wx: area_weights(w, size), wy: area_weights(h, size) }
    }

    fn apply(&self, luma: &[u8]) -> Vec<u8> {
        let (w, h, size) = (self.w, self.h, self.size);
        assert_eq!(luma.len(), w * h, "luma buffer does not match {w}x{h}");
        // Vertical pass first, over whole input rows (vectorises): `acc[x]` is the weighted ink of
        // column x over output row `oy`; one row's weights sum to `h`, so acc <= 255·h.
        let mut acc = vec![0u32; w];
        let denom = (w as u64) * (h as u64);
        let mut out = vec![0u8; size * size];
        for (oy, taps) in self.wy.iter().enumerate() {
            acc.fill(0);
            for &(y, wt) in taps {
                for (a, &v) in acc.iter_mut().zip(&luma[y * w..(y + 1) * w]) {
                    *a += (255 - v as u32) * wt;
                }
            }
            // Horizontal pass; one column's weights sum to `w`.
            for (ox, taps) in self.wx.iter().enumerate() {
                let sum: u64 = taps.iter().map(|&(x, wt)| acc[x] as u64 * wt as u64).sum();
                out[oy * size + ox] = ((sum + denom / 2) / denom).min(255) as u8;
            }
        }
        out
    }
}

/// For each of `n_out` output cells over `n_in` input pixels: (input index, overlap) pairs, with
/// coordinates scaled by `n_in·n_out` so all overlaps are integers; each cell's overlaps sum to
/// `n_in` (the cell is `[o·n_in, (o+1)·n_in)`, pixel `i` is `[i·n_out, (i+1)·n_out)`).
fn area_weights(n_in: usize, n_out: usize) -> Vec<Vec<(usize, u32)>> {
    (0..n_out)
        .map(|o| {
            let (lo, hi) = (o * n_in, (o + 1) * n_in);
            let first = lo / n_out;
            let last = hi.div_ceil(n_out).min(n_in);
            (first..last)
                .filter_map(|i| {
                    let overlap = hi.min((i + 1) * n_out).saturating_sub(lo.max(i * n_out));
                    (overlap > 0).then_some((i, overlap as u32))
                })
                .collect()
        })
        .collect()
}

/// Rotates a square `n`×`n` single-channel image counter-clockwise by `quarter_turns` × 90°.
/// One quarter turn moves the top-right corner to the top-left: `out[r][c] = in[c][n-1-r]`.
pub fn rotate_ccw(img: &[u8], n: usize, quarter_turns: u32) -> Vec<u8> {
    let mut out = vec![0u8; n * n];
    rotate_ccw_into(img, n, quarter_turns, &mut out);
    out
}

/// [`rotate_ccw`] into `out` (`n`×`n`).
pub fn rotate_ccw_into(img: &[u8], n: usize, quarter_turns: u32, out: &mut [u8]) {
    assert!(img.len() == n * n && out.len() == n * n, "rotate_ccw: image is not {n}x{n}");
    if n == 0 {
        return;
    }
    let m = n - 1;
    match quarter_turns % 4 {
        0 => out.copy_from_slice(img),
        2 => {
            // Half turn: the image reversed.
            for (o, &v) in out.iter_mut().zip(img.iter().rev()) {
                *o = v;
            }
        }
        turns => {
            for (r, row) in out.chunks_exact_mut(n).enumerate() {
                for (c, o) in row.iter_mut().enumerate() {
                    *o = if turns == 1 { img[c * n + (m - r)] } else { img[(m - c) * n + r] };
                }
            }
        }
    }
}

// ---- sources --------------------------------------------------------------------------------

/// Where one image comes from.
#[derive(Debug, Clone)]
enum ImageRef {
    Zip { index: usize, name: String },
    File(PathBuf),
}

/// One of the two image sets, zipped or extracted, indexed by `Alphabet/characterNN`.
struct Archive {
    /// The zip or folder path, for messages and cache keys.
    path: PathBuf,
    /// The zip's bytes (empty for a folder).
    bytes: Vec<u8>,
    /// `Alphabet/characterNN` → images in drawer order.
    chars: BTreeMap<String, Vec<ImageRef>>,
}

enum Located {
    Zip(PathBuf),
    Dir(PathBuf),
}

impl Located {
    fn path(&self) -> &Path {
        match self {
            Located::Zip(p) | Located::Dir(p) => p,
        }
    }
}

fn locate_archive(root: &Path, subset: LakeSubset) -> Result<Located> {
    let dir = dataset_dir(root);
    let stem = subset.archive_stem();
    let zip = dir.join(format!("{stem}.zip"));
    if zip.is_file() {
        return Ok(Located::Zip(zip));
    }
    let folder = dir.join(stem);
    if folder.is_dir() {
        return Ok(Located::Dir(folder));
    }
    bail!(
        "{} not found (nor an extracted {}/ folder): {}",
        zip.display(),
        folder.display(),
        fetch_hint()
    )
}

/// Images found per `Alphabet/characterNN`, with their drawer-order sort keys.
type Found = BTreeMap<String, Vec<((u32, String), ImageRef)>>;

/// One class of a split: which character, under what name, rotated how.
struct Planned {
    archive: usize,
    /// `Alphabet/characterNN`.
    key: String,
    name: String,
    quarter_turns: u32,
}

/// Sort key putting `CCCC_DD.png` in drawer order.
fn drawer_key(file: &str) -> (u32, String) {
    let stem = file.rsplit_once('.').map_or(file, |(s, _)| s);
    let drawer = stem.rsplit_once('_').and_then(|(_, d)| d.parse().ok()).unwrap_or(u32::MAX);
    (drawer, file.to_string())
}

fn is_png(name: &str) -> bool {
    name.len() > 4 && name[name.len() - 4..].eq_ignore_ascii_case(".png") && !name.starts_with("._")
}

impl Archive {
    fn open(loc: &Located) -> Result<Archive> {
        match loc {
            Located::Zip(p) => Self::open_zip(p),
            Located::Dir(p) => Self::open_dir(p),
        }
    }

    fn open_zip(path: &Path) -> Result<Archive> {
        let bytes =
            std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
        let zip = zip::ZipArchive::new(Cursor::new(&bytes[..])).map_err(|e| {
            anyhow!(
                "{} is not a readable zip ({e}); delete it and {}",
                path.display(),
                fetch_hint().replacen("run", "rerun", 1)
            )
        })?;
        let mut found = Found::new();
        for index in 0..zip.len() {
            let Some(Ok(name)) = zip.name_for_index(index) else {
                continue;
            };
            let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
            if parts.len() < 3 || parts.iter().any(|p| p.starts_with("__MACOSX")) {
                continue;
            }
            let (alphabet, character, file) =
                (parts[parts.len() - 3], parts[parts.len() - 2], parts[parts.len() - 1]);
            if name.ends_with('/') || !is_png(file) {
                continue;
            }
            found
                .entry(format!("{alphabet}/{character}"))
                .or_default()
                .push((drawer_key(file), ImageRef::Zip { index, name: name.to_string() }));
        }
        drop(zip);
        Ok(Archive { path: path.to_path_buf(), bytes, chars: sorted(found) })
    }

    fn open_dir(path: &Path) -> Result<Archive> {
        let read = |p: &Path| -> Result<Vec<(String, PathBuf)>> {
            let mut v = Vec::new();
            for e in
                std::fs::read_dir(p).with_context(|| format!("could not list {}", p.display()))?
            {
                let e = e.with_context(|| format!("could not list {}", p.display()))?;
                v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
            }
            Ok(v)
        };
        let mut found = Found::new();
        for (alphabet, apath) in read(path)? {
            if !apath.is_dir() {
                continue;
            }
            for (character, cpath) in read(&apath)? {
                if !cpath.is_dir() {
                    continue;
                }
                let key = format!("{alphabet}/{character}");
                for (file, fpath) in read(&cpath)? {
                    if is_png(&file) {
                        found
                            .entry(key.clone())
                            .or_default()
                            .push((drawer_key(&file), ImageRef::File(fpath)));
                    }
                }
            }
        }
        Ok(Archive { path: path.to_path_buf(), bytes: Vec::new(), chars: sorted(found) })
    }

    /// Where an image is, for messages.
    fn describe(&self, r: &ImageRef) -> String {
        match r {
            ImageRef::Zip { name, .. } => format!("{}: {name}", self.path.display()),
            ImageRef::File(p) => p.display().to_string(),
        }
    }
}

fn sorted(found: Found) -> BTreeMap<String, Vec<ImageRef>> {
    found
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (k, v.into_iter().map(|(_, r)| r).collect())
        })
        .collect()
}

/// Everything a split is built from, located but not yet read.
struct Inputs {
    /// The image sets used, in lookup order (background first).
    archives: Vec<Located>,
    /// The Vinyals split file, if any.
    split_file: Option<PathBuf>,
}

impl Inputs {
    fn locate(root: &Path, split: &Split) -> Result<Inputs> {
        match split {
            Split::Lake(s) => {
                Ok(Inputs { archives: vec![locate_archive(root, *s)?], split_file: None })
            }
            Split::Maml(_) | Split::Reptile(_) => {
                let archives = LakeSubset::ALL
                    .into_iter()
                    .map(|a| locate_archive(root, a))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Inputs { archives, split_file: None })
            }
            Split::Vinyals(s) => {
                let file = vinyals_split_file(root, *s);
                let archives = LakeSubset::ALL
                    .into_iter()
                    .map(|a| locate_archive(root, a))
                    .collect::<Result<Vec<_>>>()?;
                if !file.is_file() {
                    bail!("{} not found: {}", file.display(), fetch_hint());
                }
                Ok(Inputs { archives, split_file: Some(file) })
            }
        }
    }

    fn cache_key(&self, split: &Split, image_size: usize, pixels: Pixels) -> CacheKey {
        let mut key = CacheKey::new(
            "omniglot",
            &format!("{}-{}", split.family(), split.subset()),
            image_size,
        )
        .with_param(PREPROCESS_VERSION);
        if let Some(p) = pixels.cache_param() {
            key = key.with_param(p);
        }
        for a in &self.archives {
            key = key.with_source(a.path());
        }
        if let Some(f) = &self.split_file {
            key = key.with_source(f);
        }
        key
    }

    fn build(&self, split: &Split, image_size: usize, pixels: Pixels) -> Result<ImageSet> {
        let archives = self.archives.iter().map(Archive::open).collect::<Result<Vec<_>>>()?;
        let plan: Vec<Planned> = match split {
            Split::Lake(_) => {
                let a = &archives[0];
                if a.chars.is_empty() {
                    bail!(
                        "{} holds no `<Alphabet>/characterNN/*.png` images: {}",
                        a.path.display(),
                        fetch_hint()
                    );
                }
                a.chars
                    .keys()
                    .map(|k| Planned {
                        archive: 0,
                        key: k.clone(),
                        name: k.clone(),
                        quarter_turns: 0,
                    })
                    .collect()
            }
            Split::Vinyals(_) => {
                let file = self.split_file.as_ref().expect("Vinyals inputs have a split file");
                vinyals_plan(file, &archives)?
            }
            Split::Maml(s) => shuffled_plan(&archives, 1, *s, MAML_TRAIN, MAML_VAL, false)?,
            Split::Reptile(s) => shuffled_plan(&archives, 0, *s, REPTILE_TRAIN, 0, true)?,
        };

        // Decode every needed character once, all images in parallel.
        let mut chars: Vec<(usize, &str)> =
            plan.iter().map(|p| (p.archive, p.key.as_str())).collect();
        chars.sort_unstable();
        chars.dedup();
        let char_index: HashMap<(usize, &str), usize> =
            chars.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let jobs: Vec<(usize, usize, &ImageRef)> = chars
            .iter()
            .enumerate()
            .flat_map(|(ci, &(a, k))| archives[a].chars[k].iter().map(move |r| (ci, a, r)))
            .collect();
        let zips: Vec<Option<zip::ZipArchive<Cursor<&[u8]>>>> = archives
            .iter()
            .map(|a| {
                if a.bytes.is_empty() {
                    Ok(None)
                } else {
                    zip::ZipArchive::new(Cursor::new(&a.bytes[..]))
                        .map(Some)
                        .with_context(|| format!("{} is not a readable zip", a.path.display()))
                }
            })
            .collect::<Result<_>>()?;
        let resize = AreaResize::new(NATIVE_SIZE, NATIVE_SIZE, image_size);
        let decoded: Vec<Vec<u8>> = jobs
            .par_iter()
            .map_init(
                || zips.clone(),
                |zips, &(_, a, r)| {
                    read_image(zips[a].as_mut(), r)
                        .and_then(|b| decode_image(&b, &resize, pixels))
                        .map_err(|e| anyhow!("{}: {e:#}", archives[a].describe(r)))
                },
            )
            .collect::<Result<_>>()?;
        let mut per_char: Vec<Vec<u8>> = vec![Vec::new(); chars.len()];
        for (&(ci, _, _), img) in jobs.iter().zip(decoded) {
            per_char[ci].extend_from_slice(&img);
        }

        let n = image_size;
        let classes: Vec<Class> = plan
            .par_iter()
            .map(|p| {
                let src = &per_char[char_index[&(p.archive, p.key.as_str())]];
                let mut pixels = vec![0u8; src.len()];
                for (from, to) in src.chunks_exact(n * n).zip(pixels.chunks_exact_mut(n * n)) {
                    rotate_ccw_into(from, n, p.quarter_turns, to);
                }
                let group = p.key.split_once('/').map_or(p.key.as_str(), |(g, _)| g).to_string();
                Class { name: p.name.clone(), group, pixels }
            })
            .collect();
        Ok(ImageSet { name: split.set_name(), channels: 1, height: n, width: n, classes })
    }
}

fn read_image(zip: Option<&mut zip::ZipArchive<Cursor<&[u8]>>>, r: &ImageRef) -> Result<Vec<u8>> {
    match (r, zip) {
        (ImageRef::Zip { index, .. }, Some(zip)) => {
            let entry =
                zip.by_index(*index).map_err(|e| anyhow!("could not read zip entry ({e})"))?;
            if entry.size() > MAX_ENTRY_BYTES {
                bail!("entry is implausibly large ({} bytes)", entry.size());
            }
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry
                .take(MAX_ENTRY_BYTES)
                .read_to_end(&mut buf)
                .map_err(|e| anyhow!("could not read zip entry ({e})"))?;
            Ok(buf)
        }
        (ImageRef::File(p), _) => std::fs::read(p).map_err(|e| anyhow!("could not read ({e})")),
        (ImageRef::Zip { .. }, None) => bail!("internal error: zip entry without a zip"),
    }
}

/// Decodes a PNG (any bit depth / colour type) to 8-bit luma, transparent pixels as white.
pub(crate) fn decode_luma(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize)> {
    let bad = |e: png::DecodingError| anyhow!("could not decode PNG ({e})");
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(bad)?;
    let len = reader.output_buffer_size().ok_or_else(|| anyhow!("PNG is too large"))?;
    let mut buf = vec![0u8; len];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let (w, h) = (info.width as usize, info.height as usize);
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    use png::ColorType::*;
    let channels = match info.color_type {
        Grayscale => 1,
        GrayscaleAlpha => 2,
        Rgb => 3,
        Rgba => 4,
        Indexed => bail!("unexpanded palette PNG"),
    };
    if info.line_size < w * channels || buf.len() < info.line_size * h {
        bail!("PNG decoder returned a short buffer");
    }
    if channels == 1 && info.line_size == w {
        buf.truncate(w * h);
        return Ok((buf, w, h));
    }
    let mut luma = Vec::with_capacity(w * h);
    for row in buf.chunks_exact(info.line_size).take(h) {
        for px in row[..w * channels].chunks_exact(channels) {
            let (l, a) = match channels {
                1 => (px[0] as u32, 255),
                2 => (px[0] as u32, px[1] as u32),
                3 => (
                    (299 * px[0] as u32 + 587 * px[1] as u32 + 114 * px[2] as u32 + 500) / 1000,
                    255,
                ),
                _ => (
                    (299 * px[0] as u32 + 587 * px[1] as u32 + 114 * px[2] as u32 + 500) / 1000,
                    px[3] as u32,
                ),
            };
            // Composite over a white background.
            luma.push(((l * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    Ok((luma, w, h))
}

/// Decodes and preprocesses one image, reusing `resize` (the default pixels) when the shape matches.
fn decode_image(bytes: &[u8], resize: &AreaResize, pixels: Pixels) -> Result<Vec<u8>> {
    let (luma, w, h) = decode_luma(bytes)?;
    if pixels != Pixels::default() {
        Ok(pixels.apply(&luma, w, h, resize.size))
    } else if (w, h) == (resize.w, resize.h) {
        Ok(resize.apply(&luma))
    } else {
        Ok(preprocess(&luma, w, h, resize.size))
    }
}

/// Every character of `archives` in the order the official codes list them before shuffling:
/// alphabets sorted, characters sorted within each (Reptile's `read_dataset` over the merged
/// background and evaluation folders; MAML lists its folder unsorted, which no copy can reproduce).
fn sorted_characters(archives: &[Archive]) -> Vec<(usize, &str)> {
    let mut all: Vec<(usize, &str)> = archives
        .iter()
        .enumerate()
        .flat_map(|(a, arch)| arch.chars.keys().map(move |k| (a, k.as_str())))
        .collect();
    all.sort_by(|x, y| {
        let split = |k: &str| {
            k.split_once('/')
                .map_or((k.to_string(), String::new()), |(a, c)| (a.to_string(), c.to_string()))
        };
        split(x.1).cmp(&split(y.1))
    });
    all
}

/// The classes of a shuffled split: `random.seed(seed); random.shuffle(characters)`, then the
/// first `train` characters are the training part, the next `val` the validation part and the
/// rest the test part. With `rotate_train`, each training character gives four classes (0°, 90°,
/// 180°, 270°, named `…/rotDDD`), as Reptile's `augment_dataset`.
fn shuffled_plan(
    archives: &[Archive],
    seed: u64,
    subset: ShuffledSubset,
    train: usize,
    val: usize,
    rotate_train: bool,
) -> Result<Vec<Planned>> {
    let mut all = sorted_characters(archives);
    if all.len() <= train + val {
        bail!(
            "the Omniglot archives hold {} characters; the official shuffled splits need all 1623 of              both images_background and images_evaluation: {}",
            all.len(),
            fetch_hint()
        );
    }
    super::python_random::PythonRandom::seed(seed).shuffle(&mut all);
    let part = match subset {
        ShuffledSubset::Train => &all[..train],
        ShuffledSubset::Val => &all[train..train + val],
        ShuffledSubset::Test => &all[train + val..],
    };
    let turns: &[u32] =
        if rotate_train && subset == ShuffledSubset::Train { &[0, 1, 2, 3] } else { &[0] };
    Ok(part
        .iter()
        .flat_map(|&(archive, key)| {
            turns.iter().map(move |&t| Planned {
                archive,
                key: key.to_string(),
                name: if turns.len() > 1 {
                    format!("{key}/rot{:03}", t * 90)
                } else {
                    key.to_string()
                },
                quarter_turns: t,
            })
        })
        .collect())
}

/// Parses a Vinyals split file into one [`Planned`] class a line, checking that
/// every character exists and no class repeats.
fn vinyals_plan(file: &Path, archives: &[Archive]) -> Result<Vec<Planned>> {
    let text = std::fs::read(file).with_context(|| format!("could not read {}", file.display()))?;
    let text = String::from_utf8_lossy(&text);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut plan = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{}:{lineno}", file.display());
        let parts: Vec<&str> = line.split('/').collect();
        let turns = match parts.as_slice() {
            [_, _, rot] => match rot.strip_prefix("rot").and_then(|d| d.parse::<u32>().ok()) {
                Some(d) if d % 90 == 0 && d < 360 && rot.len() == 6 => d / 90,
                _ => bail!("{}: bad rotation `{rot}` in `{line}`: expected rot000, rot090, rot180 or rot270", at()),
            },
            _ => bail!("{}: expected `Alphabet/characterNN/rotDDD`, got `{line}`", at()),
        };
        let key = format!("{}/{}", parts[0], parts[1]);
        let Some(a) = archives.iter().position(|a| a.chars.contains_key(&key)) else {
            let names: Vec<String> =
                archives.iter().map(|a| a.path.display().to_string()).collect();
            bail!(
                "{}: class `{line}` names character `{key}`, which is in none of {}; the split file and \
                 the image archives do not match",
                at(),
                names.join(", ")
            );
        };
        if let Some(first) = seen.insert(line.to_string(), lineno) {
            bail!("{}: class `{line}` is listed twice (first on line {first})", at());
        }
        plan.push(Planned { archive: a, key, name: line.to_string(), quarter_turns: turns });
    }
    if plan.is_empty() {
        bail!("{} lists no classes", file.display());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_sum_and_cover() {
        for (n_in, n_out) in [(105, 28), (105, 105), (105, 1), (10, 3), (3, 10), (105, 84)] {
            let w = area_weights(n_in, n_out);
            assert_eq!(w.len(), n_out);
            let mut per_input = vec![0u32; n_in];
            for taps in &w {
                assert_eq!(taps.iter().map(|t| t.1 as usize).sum::<usize>(), n_in);
                for &(i, wt) in taps {
                    per_input[i] += wt;
                }
            }
            // Every input pixel contributes its whole area once overall.
            assert!(per_input.iter().all(|&p| p as usize == n_out), "{n_in}->{n_out}");
        }
    }

    #[test]
    fn preprocess_inverts_and_averages() {
        // 4x4, white background, a black 2x2 block in the top-left: 2x2 output.
        let mut luma = vec![255u8; 16];
        for (r, c) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            luma[r * 4 + c] = 0;
        }
        assert_eq!(preprocess(&luma, 4, 4, 2), vec![255, 0, 0, 0]);
        assert_eq!(preprocess(&luma, 4, 4, 1), vec![64]); // 255/4 = 63.75
        assert_eq!(preprocess(&luma, 4, 4, 4), luma.iter().map(|v| 255 - v).collect::<Vec<_>>());
        // 3 -> 2: the middle pixel is split between both outputs.
        let row = [0u8, 255, 255, 0, 255, 255, 0, 255, 255];
        // Output (0,0) covers [0,1.5)^2: pixel (0,0) weight 1, (0,1),(1,0) 0.5, (1,1) 0.25 -> 1/2.25.
        assert_eq!(preprocess(&row, 3, 3, 2)[0], ((255.0f64 * (1.0 + 0.5) / 2.25).round()) as u8);
    }

    #[test]
    fn rotation_is_counter_clockwise() {
        // 1 2
        // 3 4   rotated 90° CCW is   2 4 / 1 3
        let img = [1u8, 2, 3, 4];
        assert_eq!(rotate_ccw(&img, 2, 1), vec![2, 4, 1, 3]);
        assert_eq!(rotate_ccw(&img, 2, 2), vec![4, 3, 2, 1]);
        assert_eq!(rotate_ccw(&img, 2, 3), vec![3, 1, 4, 2]);
        assert_eq!(rotate_ccw(&img, 2, 4), img.to_vec());
        let big: Vec<u8> = (0..=48).collect();
        assert_eq!(rotate_ccw(&rotate_ccw(&big, 7, 1), 7, 3), big);
    }

    #[test]
    fn resize_commutes_with_rotation() {
        let luma: Vec<u8> =
            (0..105 * 105u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        for turns in 1..4 {
            let a = rotate_ccw(&preprocess(&luma, 105, 105, 28), 28, turns);
            let b = preprocess(&rotate_ccw(&luma, 105, turns), 105, 105, 28);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn split_names() {
        for s in ["train", "val", "trainval", "test", "background", "evaluation"] {
            let split: Split = s.parse().unwrap();
            assert_eq!(split.to_string(), s);
            assert_eq!(format!("{}/{}", split.family(), s).parse::<Split>().unwrap(), split);
        }
        assert_eq!("vinyals/train".parse::<Split>().unwrap(), Split::Vinyals(VinyalsSubset::Train));
        assert!("lake/train".parse::<Split>().is_err());
        assert!("nope".parse::<Split>().is_err());
        assert_eq!(Split::Lake(LakeSubset::Evaluation).set_name(), "omniglot/lake/evaluation");
    }
}
