//! Datasets as class-indexed u8 images, and the episode sampler.

pub mod augment;
pub mod cache;
pub mod download;
pub mod episode;
pub mod folder;
pub mod images;
pub mod lake_runs;
pub mod mini_imagenet;
pub mod omniglot;
pub mod orl;
pub mod python_random;

pub use episode::{Episode, EpisodeDraw, EpisodeSampler, EpisodeSpec, Grouping};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The environment variable naming the data root when `--data-dir` is not given.
pub const DATA_ENV: &str = "KSHOT_DATA";

/// One class and its images, stored as u8 in [C, H, W] order, image after image.
#[derive(Debug, Clone, PartialEq)]
pub struct Class {
    /// Unique within its set, e.g. `Greek/character03/rot090`.
    pub name: String,
    /// The group the class belongs to (the alphabet for Omniglot); episodes may be drawn within one.
    pub group: String,
    pub pixels: Vec<u8>,
}

/// A set of classes whose images all share one shape. Pixel values map to [0, 1] as `v / 255`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// What it is, e.g. `omniglot/vinyals/train`.
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: Vec<Class>,
}

impl ImageSet {
    /// Values per image (C·H·W).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn num_images(&self, class: usize) -> usize {
        self.classes[class].pixels.len() / self.image_len()
    }

    pub fn total_images(&self) -> usize {
        (0..self.classes.len()).map(|c| self.num_images(c)).sum()
    }

    pub fn image(&self, class: usize, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.classes[class].pixels[index * n..(index + 1) * n]
    }

    /// Class indices by group, groups in sorted order.
    /// 16 hex digits of a SHA-256 over the classes' names and pixels: two sets print the same
    /// fingerprint only if they hold the same images under the same names.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for n in [self.channels, self.height, self.width, self.classes.len()] {
            h.update((n as u64).to_le_bytes());
        }
        for c in &self.classes {
            for field in [c.name.as_bytes(), c.group.as_bytes(), &c.pixels] {
                h.update((field.len() as u64).to_le_bytes());
                h.update(field);
            }
        }
        cache::hex(&h.finalize()[..8])
    }

    pub fn groups(&self) -> BTreeMap<&str, Vec<usize>> {
        let mut g: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, c) in self.classes.iter().enumerate() {
            g.entry(c.group.as_str()).or_default().push(i);
        }
        g
    }
}

/// The data root: `--data-dir` if given, else `$KSHOT_DATA`.
pub fn resolve_root(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    match std::env::var_os(DATA_ENV) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => anyhow::bail!(
            "no data directory: pass --data-dir DIR or set {DATA_ENV} (`kshot data fetch omniglot --data-dir DIR` downloads Omniglot)"
        ),
    }
}

/// The datasets `--dataset` accepts.
pub const DATASETS: &[&str] = &["omniglot", "mini-imagenet", "folder", "orl-faces"];

/// What a dataset is loaded as unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetDefaults {
    pub split: &'static str,
    pub image_size: usize,
    /// Channels of its images (the backbone's input channels).
    pub channels: usize,
}

/// The default split, image size and channels of `dataset`.
pub fn dataset_defaults(dataset: &str) -> anyhow::Result<DatasetDefaults> {
    match dataset {
        "omniglot" => Ok(DatasetDefaults { split: "vinyals", image_size: 28, channels: 1 }),
        "mini-imagenet" => Ok(DatasetDefaults {
            split: "ravi",
            image_size: mini_imagenet::NATIVE_SIZE,
            channels: 3,
        }),
        // A folder of photos, read like miniImageNet (`--channels 1` for drawings).
        "folder" => Ok(DatasetDefaults {
            split: folder::DEFAULT_TRAIN_SPLIT,
            image_size: mini_imagenet::NATIVE_SIZE,
            channels: 3,
        }),
        // Faces with their landmark raster as a second channel ([`orl`]).
        "orl-faces" => Ok(DatasetDefaults { split: "people", image_size: 64, channels: 2 }),
        other => anyhow::bail!("unknown dataset `{other}`; choose one of: {}", DATASETS.join(", ")),
    }
}

/// The class subsets a split trains, validates and tests on by default.
pub struct SplitSubsets {
    pub train: &'static str,
    pub val: Option<&'static str>,
    pub test: &'static str,
}

/// Default subsets of `dataset`/`split`.
pub fn split_subsets(dataset: &str, split: &str) -> anyhow::Result<SplitSubsets> {
    match (dataset, split) {
        ("omniglot", "vinyals") => {
            Ok(SplitSubsets { train: "train", val: Some("val"), test: "test" })
        }
        ("omniglot", "lake") => {
            Ok(SplitSubsets { train: "background", val: None, test: "evaluation" })
        }
        ("omniglot", "maml") => Ok(SplitSubsets { train: "train", val: Some("val"), test: "test" }),
        ("omniglot", "reptile") => Ok(SplitSubsets { train: "train", val: None, test: "test" }),
        ("omniglot", other) => {
            anyhow::bail!("unknown Omniglot split `{other}`; choose vinyals, lake, maml or reptile")
        }
        ("mini-imagenet", "ravi") => {
            Ok(SplitSubsets { train: "train", val: Some("val"), test: "test" })
        }
        ("folder", "all") => Ok(SplitSubsets { train: "all", val: None, test: "all" }),
        ("folder", split) => {
            let has_val = match split.parse::<folder::ClassSplit>()? {
                folder::ClassSplit::All => false,
                folder::ClassSplit::Ratio { val, .. } => val > 0.0,
                folder::ClassSplit::Spec { subsets, .. } => subsets.values().any(|s| s == "val"),
                folder::ClassSplit::Easyfsl { per_subset, .. } => per_subset.contains_key("val"),
            };
            let val = has_val.then_some("val");
            Ok(SplitSubsets { train: "train", val, test: "test" })
        }
        ("orl-faces", "people") => Ok(SplitSubsets { train: "train", val: None, test: "test" }),
        ("orl-faces", other) => anyhow::bail!("unknown ORL faces split `{other}`; choose people"),
        ("mini-imagenet", other) => {
            anyhow::bail!("unknown miniImageNet split `{other}`; choose ravi")
        }
        (other, _) => {
            anyhow::bail!("unknown dataset `{other}`; choose one of: {}", DATASETS.join(", "))
        }
    }
}

/// Loads the `subset` classes of a run's data: Omniglot and miniImageNet from the data root
/// `root`, a folder dataset from `root` itself (the folder of class folders), with `channels`
/// the backbone's input channels (folders are read as grayscale or RGB accordingly).
pub fn load_data(
    root: &Path,
    data: &crate::protocol::DataConfig,
    subset: &str,
    channels: usize,
) -> anyhow::Result<ImageSet> {
    if data.dataset == "folder" {
        let pipeline = images::Pipeline::of_run(data, channels)?;
        return folder::load(root, &data.split, subset, &pipeline);
    }
    load_with_pixels(root, &data.dataset, &data.split, subset, data.image_size, data.pixels())
}

/// Loads the `subset` classes of `dataset`/`split` at `image_size`×`image_size`.
pub fn load(
    root: &Path,
    dataset: &str,
    split: &str,
    subset: &str,
    image_size: usize,
) -> anyhow::Result<ImageSet> {
    load_with_pixels(root, dataset, split, subset, image_size, omniglot::Pixels::default())
}

/// [`load`] with an Omniglot pixel pipeline (`--resize`, `--invert`); miniImageNet takes only
/// the default one.
pub fn load_with_pixels(
    root: &Path,
    dataset: &str,
    split: &str,
    subset: &str,
    image_size: usize,
    pixels: omniglot::Pixels,
) -> anyhow::Result<ImageSet> {
    split_subsets(dataset, split)?;
    if dataset == "mini-imagenet" {
        anyhow::ensure!(
            pixels == omniglot::Pixels::default(),
            "--resize and --invert apply to Omniglot only; drop them for mini-imagenet"
        );
        return mini_imagenet::load(root, subset.parse()?, image_size);
    }
    if dataset == "orl-faces" {
        anyhow::ensure!(
            pixels == omniglot::Pixels::default(),
            "--resize and --invert apply to Omniglot only; drop them for orl-faces"
        );
        return load_orl_people(root, subset, image_size);
    }
    let split = match split {
        "vinyals" => omniglot::Split::Vinyals(subset.parse()?),
        "lake" => omniglot::Split::Lake(subset.parse()?),
        family => format!("{family}/{subset}").parse()?,
    };
    omniglot::load_pixels(root, &split, image_size, pixels)
}

/// ORL's `people` split: `train` (s1–s30) or `test` (s31–s40) as two-channel face + landmark images.
fn load_orl_people(root: &Path, subset: &str, image_size: usize) -> anyhow::Result<ImageSet> {
    let people = match subset {
        "train" => orl::meta_train_people(),
        "test" => orl::held_out_people(),
        other => anyhow::bail!("unknown ORL faces subset `{other}`; choose train or test"),
    };
    orl::load_orl(root, image_size)?.to_image_set(&format!("orl-faces/people/{subset}"), &people)
}
