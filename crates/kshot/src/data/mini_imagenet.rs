//! miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle 2017: 100 ImageNet
//! classes × 600 photos, 84×84 RGB; 64 train, 16 val and 20 test classes, disjoint.
//!
//! Read from `ROOT/mini-imagenet/` in Ravi & Larochelle's layout: the split files `train.csv`,
//! `val.csv`, `test.csv` (`filename,label`, one header line, `label` a WordNet id such as
//! `n01532829`), and the images, as a flat `images/<filename>` folder and/or as zips `images*.zip`
//! holding `images/<filename>` (e.g. `images_train.zip`, `images_val.zip`, `images_test.zip`, or
//! `images_train_part1.zip` for half of the train images). A listed image may be in any of them.
//!
//! Subsets ([`Subset`]): `train`, `val`, `test`, and `trainval` (train + val). One class per label,
//! in order of first appearance in the CSV; images in CSV order; every class in one group
//! ([`GROUP`]). Val and test must be complete: a listed image that is in none of the sources is an
//! error. Train may be partial (the shared copy holds 300 of the 600 images of each class): the
//! images present are loaded and [`Catalog::warning`] says what is missing.
//!
//! There is no official download (ImageNet's terms do not allow redistribution):
//! [`fetch_hint`] says where the files go. Decoded sets are cached like Omniglot's
//! ([`super::cache`]).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use rayon::prelude::*;

use super::cache::{Cache, CacheKey};
use super::{Class, ImageSet};

/// The folder under the data root.
pub const DIR_NAME: &str = "mini-imagenet";

/// Side of the distributed images.
pub const NATIVE_SIZE: usize = 84;

/// Images per class in the full dataset.
pub const IMAGES_PER_CLASS: usize = 600;

/// The group every class belongs to.
pub const GROUP: &str = "mini-imagenet";

/// Identifies the preprocessing in cache keys; change it when [`preprocess`] changes.
const PREPROCESS_VERSION: &str = "mini-imagenet-preprocess=rgb8,chw,lanczos3-if-resized,v1";

/// Largest image file we are willing to read (the real ones are ~4 KB).
const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// Largest image side we are willing to decode.
const MAX_SIDE: u32 = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subset {
    Train,
    Val,
    Trainval,
    Test,
}

impl Subset {
    pub const ALL: [Subset; 4] = [Subset::Train, Subset::Val, Subset::Trainval, Subset::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Subset::Train => "train",
            Subset::Val => "val",
            Subset::Trainval => "trainval",
            Subset::Test => "test",
        }
    }

    /// The split files the subset is read from, in order.
    pub fn csv_names(self) -> &'static [&'static str] {
        match self {
            Subset::Train => &["train.csv"],
            Subset::Val => &["val.csv"],
            Subset::Trainval => &["train.csv", "val.csv"],
            Subset::Test => &["test.csv"],
        }
    }

    /// The [`ImageSet::name`] of the loaded set, e.g. `mini-imagenet/ravi/train`.
    pub fn set_name(self) -> String {
        format!("{DIR_NAME}/ravi/{}", self.as_str())
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Also accepts `ravi/train` etc.
impl FromStr for Subset {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_prefix("ravi/").unwrap_or(&t);
        Subset::ALL.into_iter().find(|v| v.as_str() == t).ok_or_else(|| {
            anyhow!("unknown miniImageNet subset `{s}`: expected train, val, trainval or test")
        })
    }
}

/// The folder holding miniImageNet under a data root.
pub fn dataset_dir(root: &Path) -> PathBuf {
    root.join(DIR_NAME)
}

/// Where the files go, for error messages: there is no download.
pub fn fetch_hint(root: &Path) -> String {
    format!(
        "miniImageNet cannot be downloaded by kshot (ImageNet's terms do not allow redistribution): \
         put Ravi & Larochelle's train.csv, val.csv, test.csv and the images (an images/ folder, or \
         images_train.zip, images_val.zip, images_test.zip each holding images/<file>.jpg) in {}, \
         or pass --data-dir (or set KSHOT_DATA) to a directory whose mini-imagenet/ has them",
        dataset_dir(root).display()
    )
}

/// Loads `subset` at `image_size`×`image_size`, through the cache in [`Cache::from_env`].
/// A partial train set is loaded with a warning on stderr ([`Catalog::warning`]).
pub fn load(root: &Path, subset: Subset, image_size: usize) -> Result<ImageSet> {
    load_with_cache(root, subset, image_size, &Cache::from_env())
}

/// [`load`] with an explicit cache ([`Cache::disabled`] to always decode).
pub fn load_with_cache(
    root: &Path,
    subset: Subset,
    image_size: usize,
    cache: &Cache,
) -> Result<ImageSet> {
    check_size(image_size)?;
    let catalog = catalog(root, subset)?;
    if let Some(w) = &catalog.warning {
        eprintln!("warning: {w}");
    }
    cache.load_or_build(&catalog.cache_key(image_size), || catalog.decode(image_size))
}

/// Decodes `subset` without any cache (and without printing the partial-set warning).
pub fn build(root: &Path, subset: Subset, image_size: usize) -> Result<ImageSet> {
    check_size(image_size)?;
    catalog(root, subset)?.decode(image_size)
}

/// The cache key [`load`] uses (fails like `load` when the data is missing).
pub fn cache_key(root: &Path, subset: Subset, image_size: usize) -> Result<CacheKey> {
    Ok(catalog(root, subset)?.cache_key(image_size))
}

fn check_size(image_size: usize) -> Result<()> {
    if image_size == 0 || image_size > 4096 {
        bail!("invalid miniImageNet image size {image_size}: expected 1..=4096 (84 is the usual choice)");
    }
    Ok(())
}

// ---- catalog: which image of which class is where ---------------------------------------------

/// One class of a subset and the files of its images that were found, in CSV order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogClass {
    /// The WordNet id.
    pub name: String,
    pub files: Vec<String>,
    /// Images the CSV lists for the class (found or not).
    pub listed: usize,
}

/// A subset located but not decoded: its classes, where each image is, what is missing.
pub struct Catalog {
    pub subset: Subset,
    /// Classes with at least one image found.
    pub classes: Vec<CatalogClass>,
    /// Rows of the CSVs.
    pub listed: usize,
    /// Rows whose image is in none of the sources (train rows only; elsewhere it is an error).
    pub missing: usize,
    /// Why the set is partial, when it is (one line, without a `warning:` prefix).
    pub warning: Option<String>,
    csvs: Vec<PathBuf>,
    sources: Vec<Source>,
    /// Per class, per image: (source index, entry).
    refs: Vec<Vec<(usize, Entry)>>,
}

impl Catalog {
    pub fn total_images(&self) -> usize {
        self.classes.iter().map(|c| c.files.len()).sum()
    }

    /// The image sources (zips, the `images/` folder) that hold at least one image of the subset.
    pub fn used_sources(&self) -> Vec<&Path> {
        self.sources
            .iter()
            .zip(self.used())
            .filter(|(_, u)| *u)
            .map(|(s, _)| s.path.as_path())
            .collect()
    }

    /// Per source: whether it holds an image of the subset.
    fn used(&self) -> Vec<bool> {
        let mut used = vec![false; self.sources.len()];
        for r in self.refs.iter().flatten() {
            used[r.0] = true;
        }
        used
    }

    /// The cache key of the decoded subset: the CSVs, the used sources, the size and preprocessing.
    pub fn cache_key(&self, image_size: usize) -> CacheKey {
        let mut key = CacheKey::new(DIR_NAME, &format!("ravi-{}", self.subset), image_size)
            .with_param(PREPROCESS_VERSION);
        for csv in &self.csvs {
            key = key.with_source(csv);
        }
        for s in self.used_sources() {
            key = key.with_source(s);
        }
        key
    }

    /// Decodes every image found, in parallel: RGB, resized to `image_size` when it differs.
    pub fn decode(&self, image_size: usize) -> Result<ImageSet> {
        check_size(image_size)?;
        let used = self.used();
        // Zips are read whole (the zips of one subset are tens of MB) and shared by the threads.
        let bytes: Vec<Vec<u8>> = self
            .sources
            .iter()
            .zip(&used)
            .map(|(s, &u)| match s.kind {
                SourceKind::Zip if u => fs::read(&s.path)
                    .with_context(|| format!("could not read {}", s.path.display())),
                _ => Ok(Vec::new()),
            })
            .collect::<Result<_>>()?;
        let zips: Vec<Option<zip::ZipArchive<Cursor<&[u8]>>>> = self
            .sources
            .iter()
            .zip(&bytes)
            .map(|(s, b)| {
                if b.is_empty() {
                    Ok(None)
                } else {
                    zip::ZipArchive::new(Cursor::new(&b[..])).map(Some).map_err(|e| {
                        anyhow!(
                            "{} is not a readable zip ({e}); {}",
                            s.path.display(),
                            bad_file_hint()
                        )
                    })
                }
            })
            .collect::<Result<_>>()?;

        let len = 3 * image_size * image_size;
        let mut classes: Vec<Class> = self
            .classes
            .iter()
            .map(|c| Class {
                name: c.name.clone(),
                group: GROUP.to_string(),
                pixels: vec![0u8; c.files.len() * len],
            })
            .collect();
        classes.par_iter_mut().zip(&self.refs).try_for_each(|(class, refs)| {
            class.pixels.par_chunks_mut(len).zip(refs).try_for_each_init(
                || zips.clone(),
                |zips, (out, (src, entry))| {
                    let source = &self.sources[*src];
                    read_entry(zips[*src].as_mut(), entry)
                        .and_then(|b| preprocess(&b, image_size, out))
                        .map_err(|e| {
                            anyhow!("{}: {e:#}; {}", source.describe(entry), bad_file_hint())
                        })
                },
            )
        })?;
        Ok(ImageSet {
            name: self.subset.set_name(),
            channels: 3,
            height: image_size,
            width: image_size,
            classes,
        })
    }
}

fn bad_file_hint() -> &'static str {
    "replace it with a good copy from your miniImageNet download"
}

/// Locates `subset`: reads its CSVs, indexes every image source under `ROOT/mini-imagenet/`, and
/// finds each listed image. Decodes nothing. Fails (one line, naming the file) when a CSV is
/// missing or malformed, or when a val/test image is in none of the sources.
pub fn catalog(root: &Path, subset: Subset) -> Result<Catalog> {
    let dir = dataset_dir(root);
    if !dir.is_dir() {
        bail!("{} not found: {}", dir.display(), fetch_hint(root));
    }
    let csvs: Vec<PathBuf> = subset.csv_names().iter().map(|n| dir.join(n)).collect();
    let mut rows = Vec::new();
    for csv in &csvs {
        if !csv.is_file() {
            bail!("{} not found: {}", csv.display(), fetch_hint(root));
        }
        rows.extend(read_csv(csv)?);
    }
    let sources = find_sources(&dir)?;
    if sources.is_empty() {
        bail!(
            "no miniImageNet images in {} (no images/ folder, no images*.zip): {}",
            dir.display(),
            fetch_hint(root)
        );
    }
    let names =
        || sources.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ");

    // Group rows by label (classes in order of first appearance) and find each image.
    let mut class_of: HashMap<&str, usize> = HashMap::new();
    let mut classes: Vec<CatalogClass> = Vec::new();
    let mut refs: Vec<Vec<(usize, Entry)>> = Vec::new();
    let mut missing: Vec<&Row> = Vec::new();
    let mut seen: HashMap<&str, &Row> = HashMap::new();
    for row in &rows {
        if let Some(first) = seen.insert(row.file.as_str(), row) {
            bail!(
                "{}:{}: `{}` is listed twice (first at {}:{}); the split files are not the official ones",
                row.csv.display(),
                row.line,
                row.file,
                first.csv.display(),
                first.line
            );
        }
        let c = *class_of.entry(row.label.as_str()).or_insert_with(|| {
            classes.push(CatalogClass { name: row.label.clone(), files: Vec::new(), listed: 0 });
            refs.push(Vec::new());
            classes.len() - 1
        });
        classes[c].listed += 1;
        match sources
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.entries.get(&row.file).map(|e| (i, e.clone())))
        {
            Some(r) => {
                classes[c].files.push(row.file.clone());
                refs[c].push(r);
            }
            None => missing.push(row),
        }
    }
    if rows.is_empty() {
        bail!("{} lists no images; the split files are not the official ones", csvs[0].display());
    }
    // Val and test rows must all be there; train rows may be missing (a partial train set).
    if let Some(row) = missing.iter().find(|r| !is_train_csv(&r.csv)) {
        let of_file = missing.iter().filter(|r| r.csv == row.csv).count();
        let listed = rows.iter().filter(|r| r.csv == row.csv).count();
        bail!(
            "{}:{}: image `{}` is in none of {} ({of_file} of the {listed} images of {} are missing); \
             put the complete {} images in {} (images_{}.zip or the images/ folder)",
            row.csv.display(),
            row.line,
            row.file,
            names(),
            row.csv.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            csv_subset(&row.csv),
            dir.display(),
            csv_subset(&row.csv),
        );
    }
    if missing.len() == rows.len() {
        bail!(
            "none of the {} images that {} lists is in {}; put the train images in {} (images_train.zip or the \
             images/ folder)",
            rows.len(),
            csvs[0].display(),
            names(),
            dir.display()
        );
    }
    let warning =
        (!missing.is_empty()).then(|| partial_warning(&classes, missing.len(), rows.len(), &dir));
    // Drop classes none of whose images were found (their count is in the warning).
    let (classes, refs): (Vec<_>, Vec<_>) =
        classes.into_iter().zip(refs).filter(|(c, _)| !c.files.is_empty()).unzip();
    Ok(Catalog {
        subset,
        classes,
        listed: rows.len(),
        missing: missing.len(),
        warning,
        csvs,
        sources,
        refs,
    })
}

fn is_train_csv(csv: &Path) -> bool {
    csv.file_name().is_some_and(|n| n == "train.csv")
}

/// `val` for `val.csv`.
fn csv_subset(csv: &Path) -> String {
    csv.file_stem().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn partial_warning(classes: &[CatalogClass], missing: usize, listed: usize, dir: &Path) -> String {
    let found: Vec<usize> = classes.iter().map(|c| c.files.len()).collect();
    let (lo, hi) =
        (found.iter().min().copied().unwrap_or(0), found.iter().max().copied().unwrap_or(0));
    let per_listed = classes.iter().map(|c| c.listed).max().unwrap_or(0);
    let per_class = if lo == hi { format!("{lo}") } else { format!("{lo}-{hi}") };
    let empty = found.iter().filter(|&&n| n == 0).count();
    let dropped =
        if empty > 0 { format!(", {empty} classes with no image left out") } else { String::new() };
    format!(
        "the miniImageNet train set is partial: {} of {listed} listed images found ({per_class} of {per_listed} per \
         class{dropped}), fewer training images than the papers had. Add images_train.zip (or the missing files to \
         images/) in {} for the full set",
        listed - missing,
        dir.display()
    )
}

/// One row of a split file.
struct Row {
    csv: PathBuf,
    line: usize,
    file: String,
    label: String,
}

/// Parses `filename,label` lines (an optional header first; blank lines ignored).
fn read_csv(path: &Path) -> Result<Vec<Row>> {
    let bytes = fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = i + 1;
        let Some((file, label)) = line.split_once(',').map(|(f, l)| (f.trim(), l.trim())) else {
            bail!("{}:{at}: expected `filename,label`, got `{line}`", path.display());
        };
        if rows.is_empty() && i == 0 && file.eq_ignore_ascii_case("filename") {
            continue; // the header
        }
        let plain =
            |s: &str| !s.is_empty() && !s.contains(['/', '\\', ',']) && s != "." && s != "..";
        if !plain(file) || !plain(label) {
            bail!(
                "{}:{at}: expected `filename,label` (a file name and a WordNet id), got `{line}`",
                path.display()
            );
        }
        rows.push(Row {
            csv: path.to_path_buf(),
            line: at,
            file: file.to_string(),
            label: label.to_string(),
        });
    }
    Ok(rows)
}

// ---- image sources ----------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    Zip,
    Dir,
}

/// Where an image is inside a source.
#[derive(Debug, Clone)]
enum Entry {
    Zip { index: usize, name: String },
    File(PathBuf),
}

/// A zip or the `images/` folder, indexed by image file name.
struct Source {
    path: PathBuf,
    kind: SourceKind,
    entries: HashMap<String, Entry>,
}

impl Source {
    /// Where an image is, for messages.
    fn describe(&self, e: &Entry) -> String {
        match e {
            Entry::Zip { name, .. } => format!("{}: {name}", self.path.display()),
            Entry::File(p) => p.display().to_string(),
        }
    }
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    (lower.ends_with(".jpg") || lower.ends_with(".jpeg")) && !name.starts_with("._")
}

/// The `images/` folder (first) and every `images*.zip` (sorted by name) in `dir`, indexed.
fn find_sources(dir: &Path) -> Result<Vec<Source>> {
    let mut sources = Vec::new();
    let folder = dir.join("images");
    if folder.is_dir() {
        sources.push(index_dir(&folder)?);
    }
    let mut zips: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("could not list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    let n = n.to_ascii_lowercase();
                    n.starts_with("images") && n.ends_with(".zip")
                })
        })
        .collect();
    zips.sort();
    for z in zips {
        sources.push(index_zip(&z)?);
    }
    Ok(sources)
}

fn index_dir(folder: &Path) -> Result<Source> {
    let mut entries = HashMap::new();
    for e in fs::read_dir(folder).with_context(|| format!("could not list {}", folder.display()))? {
        let e = e.with_context(|| format!("could not list {}", folder.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_image(&name) {
            entries.insert(name, Entry::File(e.path()));
        }
    }
    Ok(Source { path: folder.to_path_buf(), kind: SourceKind::Dir, entries })
}

/// Indexes a zip's central directory by the base name of each image (any folder inside the zip).
fn index_zip(path: &Path) -> Result<Source> {
    let file =
        fs::File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!("{} is not a readable zip ({e}); {}", path.display(), bad_file_hint())
    })?;
    let mut entries = HashMap::new();
    for index in 0..zip.len() {
        let Some(Ok(name)) = zip.name_for_index(index) else {
            continue;
        };
        if name.ends_with('/') || name.split('/').any(|p| p.starts_with("__MACOSX")) {
            continue;
        }
        let base = name.rsplit('/').next().unwrap_or(&name);
        if is_image(base) {
            entries
                .entry(base.to_string())
                .or_insert_with(|| Entry::Zip { index, name: name.to_string() });
        }
    }
    Ok(Source { path: path.to_path_buf(), kind: SourceKind::Zip, entries })
}

fn read_entry(zip: Option<&mut zip::ZipArchive<Cursor<&[u8]>>>, entry: &Entry) -> Result<Vec<u8>> {
    match (entry, zip) {
        (Entry::Zip { index, .. }, Some(zip)) => {
            let file =
                zip.by_index(*index).map_err(|e| anyhow!("could not read zip entry ({e})"))?;
            if file.size() > MAX_ENTRY_BYTES {
                bail!("entry is implausibly large ({} bytes)", file.size());
            }
            let mut buf = Vec::with_capacity(file.size() as usize);
            file.take(MAX_ENTRY_BYTES)
                .read_to_end(&mut buf)
                .map_err(|e| anyhow!("could not read zip entry ({e})"))?;
            Ok(buf)
        }
        (Entry::File(p), _) => {
            let meta = fs::metadata(p).map_err(|e| anyhow!("could not read ({e})"))?;
            if meta.len() > MAX_ENTRY_BYTES {
                bail!("file is implausibly large ({} bytes)", meta.len());
            }
            fs::read(p).map_err(|e| anyhow!("could not read ({e})"))
        }
        (Entry::Zip { .. }, None) => bail!("internal error: zip entry without its zip"),
    }
}

// ---- pixels -----------------------------------------------------------------------------------

/// Decodes one JPEG file (content that is not JPEG fails with a message naming its format) to 8-bit RGB (grayscale is replicated, alpha dropped), resizes it to
/// `size`×`size` with a Lanczos-3 filter (widened when downscaling, so it is anti-aliased) only
/// when its shape differs (the distributed images are 84×84, so by default pixels are the
/// decoder's own), and writes it to `out` as [3, size, size] (channel planes R, G, B).
/// A non-square image is stretched to the square, as Ravi & Larochelle's preprocessing does.
pub fn preprocess(bytes: &[u8], size: usize, out: &mut [u8]) -> Result<()> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| anyhow!("could not read the image ({})", one_line(&e.to_string())))?;
    if reader.format().is_none() {
        reader.set_format(image::ImageFormat::Jpeg);
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| anyhow!("could not decode the image ({})", one_line(&e.to_string())))?;
    write_rgb(&img, size, out)
}

/// A decoded image as miniImageNet's pixels: 8-bit RGB (grayscale replicated, alpha dropped),
/// stretched to `size`×`size` with Lanczos-3 when its shape differs, written to `out` as
/// [3, size, size] channel planes. The one pipeline of miniImageNet, a folder of RGB images and
/// `kshot predict` with a miniImageNet model.
pub fn write_rgb(img: &image::DynamicImage, size: usize, out: &mut [u8]) -> Result<()> {
    let plane = size * size;
    if out.len() != 3 * plane {
        bail!("internal error: output buffer is not 3x{size}x{size}");
    }
    let side = u32::try_from(size).map_err(|_| anyhow!("image size {size} is too large"))?;
    if img.width() == 0 || img.height() == 0 {
        bail!("empty image");
    }
    let mut rgb = img.to_rgb8();
    if rgb.dimensions() != (side, side) {
        rgb = image::imageops::resize(&rgb, side, side, FilterType::Lanczos3);
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in rgb.pixels().enumerate() {
        r[i] = px[0];
        g[i] = px[1];
        b[i] = px[2];
    }
    Ok(())
}

/// A decoder's message on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
