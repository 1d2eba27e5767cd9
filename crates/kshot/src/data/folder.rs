//! A user's folder of images as a dataset: `DIR/<class>/<image>`, or with groups of classes
//! `DIR/<group>/<class>/<image>` (a top-level folder holding only folders is a group, like an
//! Omniglot alphabet; `--within-alphabet` draws each episode from one group).
//!
//! Class splits ([`ClassSplit`], the run's `--split`):
//! - `all`: every class is in every subset (the default for `kshot eval`: all classes are test
//!   classes).
//! - `ratio:TRAIN,VAL,TEST[@SEED]`: the sorted classes shuffled by SEED (default 0) and cut in
//!   these proportions (the default for `kshot train`: `ratio:0.6,0.2,0.2`).
//! - a spec file: kshot's JSON `{"train": [...], "val": [...], "test": [...]}` or CSV lines
//!   `class,subset` naming classes by their path under DIR (`cat` or `animals/cat`); or easyfsl's
//!   `{"class_names": [...], "class_roots": [...]}` for one subset, or a folder holding easyfsl's
//!   `train.json`, `val.json` and `test.json` (roots relative to the spec's folder, the current
//!   directory or DIR).
//!
//! Images are decoded in parallel through the run's [`Pipeline`] and cached like Omniglot's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::cache::{Cache, CacheKey};
use super::images::{self, Pipeline};
use super::{Class, ImageSet};

/// The subsets a folder split names.
pub const SUBSETS: &[&str] = &["train", "val", "test", "trainval", "all"];

/// One class folder and its image files (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDir {
    /// Its path under DIR with `/` separators: `cat` or `animals/cat`.
    pub name: String,
    /// The group folder (`animals`), or empty in a flat layout.
    pub group: String,
    pub files: Vec<PathBuf>,
}

/// The classes under `dir`, sorted by name. Errors name the folder: missing, empty, a class
/// folder without images, images beside class folders.
pub fn scan(dir: &Path) -> Result<Vec<ClassDir>> {
    if !dir.is_dir() {
        bail!(
            "{} is not a folder; --data-dir for --dataset folder is a folder with one sub-folder of images per class",
            dir.display()
        );
    }
    let mut classes = Vec::new();
    for top in visible_entries(dir)? {
        if !top.is_dir() {
            continue;
        }
        let name = file_name(&top);
        let inner = visible_entries(&top)?;
        let subdirs: Vec<&PathBuf> = inner.iter().filter(|p| p.is_dir()).collect();
        let files: Vec<PathBuf> = inner.iter().filter(|p| images::is_image(p)).cloned().collect();
        match (subdirs.is_empty(), files.is_empty()) {
            (true, true) => bail!(
                "{} holds no images ({}); add images of class `{name}` or remove the folder",
                top.display(),
                images::EXTENSIONS.join(", ")
            ),
            (true, false) => classes.push(ClassDir { name, group: String::new(), files }),
            (false, false) => bail!(
                "{} holds both images and folders; put the images in a class folder, or use one folder per class",
                top.display()
            ),
            (false, true) => {
                for sub in subdirs {
                    let files: Vec<PathBuf> =
                        visible_entries(sub)?.into_iter().filter(|p| images::is_image(p)).collect();
                    if files.is_empty() {
                        bail!(
                            "{} holds no images ({}); add images of class `{name}/{}` or remove the folder",
                            sub.display(),
                            images::EXTENSIONS.join(", "),
                            file_name(sub)
                        );
                    }
                    classes.push(ClassDir {
                        name: format!("{name}/{}", file_name(sub)),
                        group: name.clone(),
                        files,
                    });
                }
            }
        }
    }
    if classes.is_empty() {
        bail!(
            "{} has no class folders; lay it out as {}/<class>/<image> (png, jpg, bmp, pgm)",
            dir.display(),
            dir.display()
        );
    }
    Ok(classes)
}

fn visible_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = images::sorted_entries(dir)?;
    entries.retain(|p| !images::is_hidden(p));
    Ok(entries)
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// How a folder's classes are divided into train, val and test.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassSplit {
    All,
    Ratio {
        train: f64,
        val: f64,
        test: f64,
        seed: u64,
    },
    /// kshot's spec: class name → subset.
    Spec {
        path: PathBuf,
        subsets: BTreeMap<String, String>,
    },
    /// easyfsl's per-subset specs, or one for every subset.
    Easyfsl {
        per_subset: BTreeMap<String, PathBuf>,
        every: Option<PathBuf>,
    },
}

/// `kshot train`'s split for a folder when none is given.
pub const DEFAULT_TRAIN_SPLIT: &str = "ratio:0.6,0.2,0.2";

impl FromStr for ClassSplit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(ClassSplit::All);
        }
        if let Some(r) = s.strip_prefix("ratio:") {
            let bad = || {
                anyhow!("--split {s}: write ratio:TRAIN,VAL,TEST[@SEED] with non-negative fractions summing to 1, e.g. ratio:0.6,0.2,0.2@0")
            };
            let (parts, seed) = match r.split_once('@') {
                Some((p, seed)) => (p, seed.parse::<u64>().map_err(|_| bad())?),
                None => (r, 0),
            };
            let f: Vec<f64> = parts
                .split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            if f.len() != 3
                || f.iter().any(|x| !(0.0..=1.0).contains(x))
                || ((f[0] + f[1] + f[2]) - 1.0).abs() > 1e-6
            {
                return Err(bad());
            }
            return Ok(ClassSplit::Ratio { train: f[0], val: f[1], test: f[2], seed });
        }
        let path = PathBuf::from(s);
        if path.is_dir() {
            let per_subset: BTreeMap<String, PathBuf> = ["train", "val", "test"]
                .iter()
                .map(|k| (k.to_string(), path.join(format!("{k}.json"))))
                .filter(|(_, p)| p.is_file())
                .collect();
            if per_subset.is_empty() {
                bail!("--split {s}: a spec folder holds easyfsl's train.json, val.json and test.json; none found");
            }
            return Ok(ClassSplit::Easyfsl { per_subset, every: None });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow!("--split {s}: not all, ratio:TRAIN,VAL,TEST or a readable spec file ({e})")
        })?;
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not valid JSON ({e})", path.display()))?;
            if value.get("class_roots").is_some() {
                return Ok(ClassSplit::Easyfsl { per_subset: BTreeMap::new(), every: Some(path) });
            }
            let mut subsets = BTreeMap::new();
            for key in ["train", "val", "test"] {
                let Some(list) = value.get(key) else { continue };
                let list = list.as_array().with_context(|| {
                    format!("{}: `{key}` must be a list of class names", path.display())
                })?;
                for name in list {
                    let name = name.as_str().with_context(|| {
                        format!(
                            "{}: `{key}` must be a list of class names (strings)",
                            path.display()
                        )
                    })?;
                    if let Some(old) = subsets.insert(name.to_string(), key.to_string()) {
                        bail!("{}: class `{name}` is in both `{old}` and `{key}`", path.display());
                    }
                }
            }
            if subsets.is_empty() {
                bail!(
                    "{}: a split spec is {{\"train\": [...], \"val\": [...], \"test\": [...]}} (kshot) or {{\"class_names\": [...], \"class_roots\": [...]}} (easyfsl)",
                    path.display()
                );
            }
            return Ok(ClassSplit::Spec { path, subsets });
        }
        let mut subsets = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty()
                || line.starts_with('#')
                || (i == 0 && line.eq_ignore_ascii_case("class,subset"))
            {
                continue;
            }
            let (name, subset) = line.rsplit_once(',').with_context(|| {
                format!("{}:{}: expected `class,subset`", path.display(), i + 1)
            })?;
            let subset = subset.trim();
            if !["train", "val", "test"].contains(&subset) {
                bail!("{}:{}: subset `{subset}` is not train, val or test", path.display(), i + 1);
            }
            if subsets.insert(name.trim().to_string(), subset.to_string()).is_some() {
                bail!("{}:{}: class `{}` is listed twice", path.display(), i + 1, name.trim());
            }
        }
        if subsets.is_empty() {
            bail!("{}: no `class,subset` lines", path.display());
        }
        Ok(ClassSplit::Spec { path, subsets })
    }
}

/// The classes of `subset` (train, val, test, trainval or all) of the folder `dir` under `split`.
pub fn classes(dir: &Path, split: &ClassSplit, subset: &str) -> Result<Vec<ClassDir>> {
    if !SUBSETS.contains(&subset) {
        bail!("unknown folder subset `{subset}`; choose one of {}", SUBSETS.join(", "));
    }
    let wanted = |s: &str| subset == "all" || s == subset || (subset == "trainval" && s != "test");
    match split {
        ClassSplit::All => scan(dir),
        ClassSplit::Ratio { train, val, seed, .. } => {
            let mut all = scan(dir)?;
            let n = all.len();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed);
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            let n_train = (train * n as f64).round() as usize;
            let n_val = ((val * n as f64).round() as usize).min(n - n_train);
            let mut label = vec![""; n];
            for (rank, &i) in order.iter().enumerate() {
                label[i] = if rank < n_train {
                    "train"
                } else if rank < n_train + n_val {
                    "val"
                } else {
                    "test"
                };
            }
            let mut i = 0;
            all.retain(|_| {
                i += 1;
                wanted(label[i - 1])
            });
            Ok(all)
        }
        ClassSplit::Spec { path, subsets } => {
            let all = scan(dir)?;
            for name in subsets.keys() {
                if !all.iter().any(|c| &c.name == name) {
                    bail!(
                        "{}: class `{name}` is not a class folder of {}; fix the name (classes are named by their path under the folder)",
                        path.display(),
                        dir.display()
                    );
                }
            }
            Ok(all
                .into_iter()
                .filter(|c| subsets.get(&c.name).is_some_and(|s| wanted(s)))
                .collect())
        }
        ClassSplit::Easyfsl { per_subset, every } => {
            let files: Vec<&PathBuf> = match every {
                Some(p) => vec![p],
                None => per_subset.iter().filter(|(s, _)| wanted(s)).map(|(_, p)| p).collect(),
            };
            let mut out = Vec::new();
            for f in files {
                out.extend(easyfsl_classes(f, dir)?);
            }
            Ok(out)
        }
    }
}

/// The classes of one easyfsl spec: `class_names[i]` in folder `class_roots[i]`.
fn easyfsl_classes(spec: &Path, dir: &Path) -> Result<Vec<ClassDir>> {
    #[derive(serde::Deserialize)]
    struct Easyfsl {
        class_names: Vec<String>,
        class_roots: Vec<String>,
    }
    let text = std::fs::read_to_string(spec)
        .map_err(|e| anyhow!("cannot read {} ({e})", spec.display()))?;
    let s: Easyfsl = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: not an easyfsl spec {{\"class_names\": [...], \"class_roots\": [...]}} ({e})",
            spec.display()
        )
    })?;
    if s.class_names.len() != s.class_roots.len() {
        bail!(
            "{}: {} class_names but {} class_roots; they must pair up",
            spec.display(),
            s.class_names.len(),
            s.class_roots.len()
        );
    }
    let base = spec.parent().unwrap_or(Path::new("."));
    s.class_names
        .iter()
        .zip(&s.class_roots)
        .map(|(name, root)| {
            let root = Path::new(root);
            let found = [base.join(root), root.to_path_buf(), dir.join(root)]
                .into_iter()
                .find(|p| p.is_dir())
                .with_context(|| {
                    format!(
                        "{}: class root {} of `{name}` not found (looked beside the spec, in the current directory and in {})",
                        spec.display(),
                        root.display(),
                        dir.display()
                    )
                })?;
            let files: Vec<PathBuf> = images::collect_files(std::slice::from_ref(&found))
                .map_err(|e| anyhow!("{}: class `{name}`: {e}", spec.display()))?;
            Ok(ClassDir { name: name.clone(), group: String::new(), files })
        })
        .collect()
}

/// Loads `subset` of the folder `dir` under `split` through `pipeline`, cached.
pub fn load(dir: &Path, split: &str, subset: &str, pipeline: &Pipeline) -> Result<ImageSet> {
    load_with_cache(dir, split, subset, pipeline, &Cache::from_env())
}

/// [`load`] with an explicit cache ([`Cache::disabled`] to always decode).
pub fn load_with_cache(
    dir: &Path,
    split: &str,
    subset: &str,
    pipeline: &Pipeline,
    cache: &Cache,
) -> Result<ImageSet> {
    let class_split: ClassSplit = split.parse()?;
    let classes = classes(dir, &class_split, subset)?;
    if classes.is_empty() {
        bail!(
            "the split `{split}` leaves no {subset} classes in {}; give the subset some classes",
            dir.display()
        );
    }
    let name = format!("folder:{}/{subset}", dir.display());
    let mut key = CacheKey::new("folder", subset, pipeline.size)
        .with_param(pipeline.cache_param())
        .with_param(format!("dir={}", dir.display()))
        .with_param(format!("split={split}"));
    for c in &classes {
        key = key.with_param(format!("class={}", c.name));
        for f in &c.files {
            key = key.with_source(f.clone());
        }
    }
    cache.load_or_build(&key, || decode(&name, &classes, pipeline))
}

/// Decodes the classes' images in parallel.
pub fn decode(name: &str, classes: &[ClassDir], pipeline: &Pipeline) -> Result<ImageSet> {
    let decoded: Vec<Class> = classes
        .par_iter()
        .map(|c| {
            // Decoded in parallel, errors reported in file order (the first bad file).
            let decoded: Vec<Result<Vec<u8>>> =
                c.files.par_iter().map(|f| pipeline.load(f)).collect();
            let images: Vec<Vec<u8>> = decoded.into_iter().collect::<Result<_>>()?;
            Ok(Class { name: c.name.clone(), group: c.group.clone(), pixels: images.concat() })
        })
        .collect::<Vec<Result<Class>>>()
        .into_iter()
        .collect::<Result<_>>()?;
    Ok(ImageSet {
        name: name.to_string(),
        channels: pipeline.channels,
        height: pipeline.size,
        width: pipeline.size,
        classes: decoded,
    })
}
