//! Aligned faces with 68 landmarks, for few-shot face generation (Zakharov et al. 2019).
//!
//! ORL / AT&T "Database of Faces": 40 people × 10 gray 92×112 PGM images, read from
//! `ROOT/orl-faces/att_faces.zip` or the extracted `ROOT/orl-faces/att_faces/sN/M.pgm` (preferred
//! when present), joined with the machine-made dlib landmarks of
//! `ROOT/orl-faces/landmarks_dlib68.tsv` (one row per image: column `file`, the path inside the
//! zip, and columns `x0 y0 … x67 y67`). A user's folder of faces is read the same way from its
//! own landmark file ([`load_folder`]).
//!
//! Landmark coordinates are in pixels, x right and y down, with pixel `(i, j)`'s centre at
//! `(i, j)` (dlib's convention). Every face is cropped around its landmarks ([`align`]) to
//! `size`×`size`, and its landmarks are drawn as a second channel ([`rasterise`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::{Class, ImageSet};

/// Points of the iBUG-300W layout.
pub const POINTS: usize = 68;

/// 68 points `[x, y]`.
pub type Landmarks = [[f32; 2]; POINTS];

/// The face parts of the iBUG-68 layout: first and last point, and whether the polyline closes.
pub const PARTS: [(usize, usize, bool); 9] = [
    (0, 16, false),  // jaw
    (17, 21, false), // right brow
    (22, 26, false), // left brow
    (27, 30, false), // nose bridge
    (31, 35, false), // lower nose
    (36, 41, true),  // right eye
    (42, 47, true),  // left eye
    (48, 59, true),  // outer lip
    (60, 67, true),  // inner lip
];

/// The ORL images' group in [`ImageSet`]s.
pub const GROUP: &str = "orl";

/// Largest image we read out of the zip (the real ones are 10,318 bytes).
const MAX_ENTRY_BYTES: u64 = 16 << 20;

/// One aligned face.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    /// `s31`, or for a user's folder the folder's name.
    pub person: String,
    /// ORL's image number M (1..=10); for a folder, the position in sorted order, 1-based.
    pub index: usize,
    /// Where it came from: the path inside the zip (`att_faces/s31/4.pgm`), or for a folder the
    /// path relative to it.
    pub file: String,
    /// Gray pixels, `size`×`size`, row-major.
    pub pixels: Vec<u8>,
    /// The 68 points in the crop's pixel coordinates.
    pub landmarks: Landmarks,
}

/// Aligned faces of one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Faces {
    pub size: usize,
    pub faces: Vec<Face>,
}

impl Faces {
    /// Distinct persons in natural order (`s1, s2, …, s10`).
    pub fn people(&self) -> Vec<String> {
        let mut people: Vec<String> = self.faces.iter().map(|f| f.person.clone()).collect();
        people.sort_by(|a, b| natural_cmp(a, b));
        people.dedup();
        people
    }

    /// The faces of `person`, by index.
    pub fn of_person(&self, person: &str) -> Vec<&Face> {
        let mut faces: Vec<&Face> = self.faces.iter().filter(|f| f.person == person).collect();
        faces.sort_by_key(|f| f.index);
        faces
    }

    /// One class per person of `people` (name = person, group `orl`), each image the face then
    /// its landmark raster: C = 2, H = W = size, images in index order. A person without faces
    /// is an error.
    pub fn to_image_set(&self, name: &str, people: &[String]) -> Result<ImageSet> {
        let n = self.size * self.size;
        let mut classes = Vec::with_capacity(people.len());
        for person in people {
            let faces = self.of_person(person);
            if faces.is_empty() {
                bail!(
                    "no faces of `{person}` to build {name} from (the faces are of {}); check the data or the list of people",
                    summarise(&self.people())
                );
            }
            let mut pixels = Vec::with_capacity(faces.len() * 2 * n);
            for f in faces {
                if f.pixels.len() != n {
                    bail!("{}: the face has {} pixels, not {n}", f.file, f.pixels.len());
                }
                pixels.extend_from_slice(&f.pixels);
                pixels.extend(rasterise(&f.landmarks, self.size));
            }
            classes.push(Class { name: person.clone(), group: GROUP.into(), pixels });
        }
        Ok(ImageSet {
            name: name.into(),
            channels: 2,
            height: self.size,
            width: self.size,
            classes,
        })
    }
}

/// The first and last few names of a list, for messages.
fn summarise(names: &[String]) -> String {
    match names.len() {
        0 => "nobody".into(),
        1..=6 => names.join(", "),
        n => format!("{}, …, {} ({n})", names[..3].join(", "), names[n - 2..].join(", ")),
    }
}

/// Compares strings with runs of digits as numbers: `s2` < `s10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, ra) = split_digits(a);
                let (db, rb) = split_digits(b);
                let (ta, tb) = (da.trim_start_matches('0'), db.trim_start_matches('0'));
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(da.len().cmp(&db.len()));
                if ord != Ordering::Equal {
                    return ord;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

fn split_digits(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s.split_at(end)
}

/// The meta-training people of this project's split: s1–s30.
pub fn meta_train_people() -> Vec<String> {
    (1..=30).map(|i| format!("s{i}")).collect()
}

/// The held-out people: s31–s40.
pub fn held_out_people() -> Vec<String> {
    (31..=40).map(|i| format!("s{i}")).collect()
}

/// Inter-ocular distance for NME normalisation: between the outer eye corners, points 36 and 45.
pub fn inter_ocular(points: &Landmarks) -> f32 {
    let [a, b] = [points[36], points[45]];
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)).sqrt()
}

// ---- landmark files -------------------------------------------------------------------------

/// One landmark file: its rows by `file`, in file order.
struct LandmarkTable {
    path: PathBuf,
    rows: Vec<(String, Landmarks)>,
    by_file: HashMap<String, usize>,
}

impl LandmarkTable {
    /// Reads a tab-separated file with a header naming columns `file` and `x0 y0 … x67 y67`
    /// (others are ignored).
    fn read(path: &Path) -> Result<LandmarkTable> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow!(
                "cannot read the landmark file {} ({e}); give a tab-separated file with columns file, x0, y0, …, x67, y67",
                path.display()
            )
        })?;
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let Some((_, header)) = lines.next() else {
            bail!("{} is empty; it needs a header line (file, x0, y0, …, x67, y67) and one row per image", path.display());
        };
        let columns: Vec<&str> = header.split('\t').map(str::trim).collect();
        let find = |name: &str| {
            columns.iter().position(|c| *c == name).ok_or_else(|| {
                anyhow!(
                    "{}: the header has no column `{name}`; it needs columns file, x0, y0, …, x67, y67 (tab-separated)",
                    path.display()
                )
            })
        };
        let file_col = find("file")?;
        let mut point_cols = [[0usize; 2]; POINTS];
        for (k, cols) in point_cols.iter_mut().enumerate() {
            *cols = [find(&format!("x{k}"))?, find(&format!("y{k}"))?];
        }
        let mut table =
            LandmarkTable { path: path.into(), rows: Vec::new(), by_file: HashMap::new() };
        for (i, line) in lines {
            let at = format!("{}:{}", path.display(), i + 1);
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            if fields.len() != columns.len() {
                bail!(
                    "{at}: {} fields, but the header has {}; fix or remove the row",
                    fields.len(),
                    columns.len()
                );
            }
            let file = fields[file_col].to_string();
            let mut points = [[0f32; 2]; POINTS];
            for (p, cols) in points.iter_mut().zip(&point_cols) {
                for (v, &c) in p.iter_mut().zip(cols) {
                    *v = fields[c].parse::<f32>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
                        anyhow!("{at}: `{}` in column {} is not a finite number; fix or remove the row", fields[c], columns[c])
                    })?;
                }
            }
            if let Some(&first) = table.by_file.get(&file) {
                bail!("{at}: `{file}` already has a row (row {}); keep one", first + 1);
            }
            table.by_file.insert(file.clone(), table.rows.len());
            table.rows.push((file, points));
        }
        Ok(table)
    }

    fn get(&self, file: &str) -> Option<&Landmarks> {
        self.by_file.get(file).map(|&i| &self.rows[i].1)
    }

    /// The row whose `file` is `rel`, else the only row whose `file` ends in `rel`'s file name.
    fn find_for(&self, rel: &str) -> Result<Option<&Landmarks>> {
        if let Some(p) = self.get(rel) {
            return Ok(Some(p));
        }
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let same: Vec<&(String, Landmarks)> =
            self.rows.iter().filter(|(f, _)| file_name(f) == name).collect();
        match same.as_slice() {
            [] => Ok(None),
            [(_, p)] => Ok(Some(p)),
            [(a, _), (b, _), ..] => bail!(
                "{}: rows `{a}` and `{b}` both match the image {rel} by file name; set their `file` to the path relative to the image folder",
                self.path.display()
            ),
        }
    }
}

/// The last component of a `/` or `\` separated path.
fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

// ---- loading --------------------------------------------------------------------------------

/// The folder holding ORL under a data root.
pub fn dataset_dir(root: &Path) -> PathBuf {
    root.join("orl-faces")
}

fn check_size(size: usize) -> Result<()> {
    if size == 0 || size > 4096 {
        bail!("invalid face size {size}: expected 1..=4096 (64 is the usual choice)");
    }
    Ok(())
}

/// `sN/M.pgm` → (`sN`, M).
fn orl_name(person: &str, file: &str) -> Option<(String, usize)> {
    let digits = person.strip_prefix('s')?;
    let index = file.strip_suffix(".pgm")?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !ok(digits) || !ok(index) {
        return None;
    }
    Some((person.to_string(), index.parse().ok()?))
}

/// ORL's 400 faces under the data root `root`, aligned to `size`×`size` (see the module doc).
pub fn load_orl(root: &Path, size: usize) -> Result<Faces> {
    check_size(size)?;
    let dir = dataset_dir(root);
    let tsv = dir.join("landmarks_dlib68.tsv");
    let folder = dir.join("att_faces");
    let zip = dir.join("att_faces.zip");
    let sources = if folder.is_dir() {
        read_orl_folder(&folder)?
    } else if zip.is_file() {
        read_orl_zip(&zip)?
    } else {
        bail!(
            "{} not found (nor an extracted {}/ folder); put the ORL faces there, or pass --data-dir (or set KSHOT_DATA) to a directory whose orl-faces/ has them",
            zip.display(),
            folder.display()
        );
    };
    if !tsv.is_file() {
        bail!(
            "{} not found; the ORL faces need their 68-point landmarks (landmarks_dlib68.tsv) beside them",
            tsv.display()
        );
    }
    let table = LandmarkTable::read(&tsv)?;
    let mut faces = Vec::with_capacity(sources.len());
    for s in sources {
        let Some(points) = table.get(&s.file) else {
            bail!(
                "{}: {} has no landmark row in {}; add one (column file = {}) or restore the original landmark file",
                s.origin.display(),
                s.file,
                tsv.display(),
                s.file
            );
        };
        let (w, h) = (s.gray.width() as usize, s.gray.height() as usize);
        let (pixels, landmarks) = align(s.gray.as_raw(), w, h, points, size);
        faces.push(Face { person: s.person, index: s.index, file: s.file, pixels, landmarks });
    }
    faces.sort_by(|a, b| natural_cmp(&a.person, &b.person).then(a.index.cmp(&b.index)));
    Ok(Faces { size, faces })
}

/// One decoded source image.
struct Source {
    person: String,
    index: usize,
    /// The landmark row's key.
    file: String,
    /// The zip or file it came from, for messages.
    origin: PathBuf,
    gray: image::GrayImage,
}

fn read_orl_zip(path: &Path) -> Result<Vec<Source>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("could not read {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(Cursor::new(&bytes[..])).map_err(|e| {
        anyhow!(
            "{} is not a readable zip ({e}); replace it with the original att_faces.zip",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for index in 0..zip.len() {
        let Some(Ok(name)) = zip.name_for_index(index) else {
            continue;
        };
        let name = name.to_string();
        let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
        let Some((person, number)) =
            parts.len().checked_sub(2).and_then(|k| orl_name(parts[k], parts[k + 1]))
        else {
            continue;
        };
        let fail = |what: String| {
            anyhow!(
                "{}: {name}: {what}; replace the zip with the original att_faces.zip",
                path.display()
            )
        };
        let entry =
            zip.by_index(index).map_err(|e| fail(format!("cannot read the entry ({e})")))?;
        if entry.size() > MAX_ENTRY_BYTES {
            return Err(fail(format!("the entry is implausibly large ({} bytes)", entry.size())));
        }
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry
            .take(MAX_ENTRY_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| fail(format!("cannot read the entry ({e})")))?;
        let gray = image::load_from_memory_with_format(&buf, image::ImageFormat::Pnm)
            .map_err(|e| fail(format!("cannot decode the PGM ({e})")))?
            .to_luma8();
        out.push(Source { person, index: number, file: name, origin: path.into(), gray });
    }
    if out.is_empty() {
        bail!(
            "{} holds no `att_faces/sN/M.pgm` images; replace it with the original att_faces.zip",
            path.display()
        );
    }
    Ok(out)
}

fn read_orl_folder(folder: &Path) -> Result<Vec<Source>> {
    let mut out = Vec::new();
    for person_dir in super::images::sorted_entries(folder)? {
        let Some(person) = person_dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !person_dir.is_dir() {
            continue;
        }
        for file in super::images::sorted_entries(&person_dir)? {
            let Some(name) = file.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some((person, index)) = orl_name(person, name) else {
                continue;
            };
            let gray = super::images::decode(&file)?.to_luma8();
            let key = format!("att_faces/{person}/{name}");
            out.push(Source { person, index, file: key, origin: file, gray });
        }
    }
    if out.is_empty() {
        bail!(
            "{} holds no `sN/M.pgm` images; extract the original att_faces.zip there, or remove the folder to read the zip",
            folder.display()
        );
    }
    Ok(out)
}

/// A user's folder of face images (searched recursively, sorted; any format
/// [`super::images::decode`] reads, converted to gray) and their 68-point landmarks in
/// `landmarks` (the ORL tsv format). A row matches an image when its `file` is the image's path
/// relative to `dir` (`/`-separated), or failing that, the image's file name. Every face is of
/// one person, named after `dir`.
pub fn load_folder(dir: &Path, landmarks: &Path, size: usize) -> Result<Faces> {
    check_size(size)?;
    let files = super::images::collect_files(&[dir.to_path_buf()])?;
    let table = LandmarkTable::read(landmarks)?;
    let person = folder_name(dir);
    let mut faces = Vec::with_capacity(files.len());
    for (i, path) in files.iter().enumerate() {
        let rel = relative_name(dir, path);
        let Some(points) = table.find_for(&rel)? else {
            bail!(
                "{} has no landmark row in {}; add one with file = {rel} (and x0, y0, …, x67, y67) or remove the image",
                path.display(),
                landmarks.display()
            );
        };
        let gray = super::images::decode(path)?.to_luma8();
        let (w, h) = (gray.width() as usize, gray.height() as usize);
        let (pixels, landmarks) = align(gray.as_raw(), w, h, points, size);
        faces.push(Face { person: person.clone(), index: i + 1, file: rel, pixels, landmarks });
    }
    Ok(Faces { size, faces })
}

/// The name of a folder, also for `.` and paths ending in `..`.
fn folder_name(dir: &Path) -> String {
    let named = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_string);
    named(dir)
        .filter(|n| n != "." && n != "..")
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(named))
        .unwrap_or_else(|| "faces".into())
}

/// `path` relative to `dir`, `/`-separated.
fn relative_name(dir: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(dir).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

// ---- alignment and drawing ------------------------------------------------------------------

/// The square to crop, in source coordinates: (centre x, centre y, side). The centre is the
/// middle of the landmarks' bounding box moved up by 10% of its height (to keep the forehead);
/// the side is 1.25 × the box's larger dimension, at least 1 pixel. Non-finite points give the
/// whole image's square.
pub fn crop_square(points: &Landmarks, width: usize, height: usize) -> (f32, f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; 2], [f32::NEG_INFINITY; 2]);
    for p in points {
        for k in 0..2 {
            lo[k] = lo[k].min(p[k]);
            hi[k] = hi[k].max(p[k]);
        }
    }
    let (bw, bh) = (hi[0] - lo[0], hi[1] - lo[1]);
    let (cx, cy) = ((lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0 - 0.1 * bh);
    let side = (1.25 * bw.max(bh)).max(1.0);
    if [cx, cy, side].iter().all(|v| v.is_finite()) {
        (cx, cy, side)
    } else {
        let (w, h) = (width as f32, height as f32);
        ((w - 1.0) / 2.0, (h - 1.0) / 2.0, w.max(h))
    }
}

/// Crops the square of [`crop_square`] out of `gray` (`width`×`height`, row-major) and resamples
/// it to `size`×`size`: bilinear, averaged over ⌈scale⌉² samples per output pixel when shrinking
/// by more than 2× (an approximate area average); pixels outside the image repeat its edge.
/// Returns the crop and `points` mapped into its coordinates.
///
/// # Panics
/// If `gray.len() != width * height`, or the image or `size` is empty.
pub fn align(
    gray: &[u8],
    width: usize,
    height: usize,
    points: &Landmarks,
    size: usize,
) -> (Vec<u8>, Landmarks) {
    assert!(width > 0 && height > 0 && size > 0, "align: empty image or crop");
    assert_eq!(gray.len(), width * height, "align: the buffer is not {width}×{height}");
    let (cx, cy, side) = crop_square(points, width, height);
    let scale = side as f64 / size as f64;
    // The source coordinate of crop pixel 0's centre (pixel centres at integers in both).
    let origin = |c: f32| c as f64 - side as f64 / 2.0 + scale / 2.0;
    let (ox, oy) = (origin(cx), origin(cy));
    let taps = if scale > 2.0 { scale.ceil() as usize } else { 1 };
    let sample = |x: f64, y: f64| bilinear(gray, width, height, x, y);
    let mut out = Vec::with_capacity(size * size);
    for r in 0..size {
        for c in 0..size {
            let (x, y) = (ox + c as f64 * scale, oy + r as f64 * scale);
            let mut sum = 0.0;
            for i in 0..taps {
                for j in 0..taps {
                    let d = |k: usize| ((k as f64 + 0.5) / taps as f64 - 0.5) * scale;
                    sum += if taps == 1 { sample(x, y) } else { sample(x + d(j), y + d(i)) };
                }
            }
            out.push((sum / (taps * taps) as f64).round().clamp(0.0, 255.0) as u8);
        }
    }
    let mut mapped = [[0f32; 2]; POINTS];
    for (m, p) in mapped.iter_mut().zip(points) {
        *m = [((p[0] as f64 - ox) / scale) as f32, ((p[1] as f64 - oy) / scale) as f32];
    }
    (out, mapped)
}

/// `gray` at `(x, y)` (pixel centres at integers), coordinates clamped to the image.
fn bilinear(gray: &[u8], width: usize, height: usize, x: f64, y: f64) -> f64 {
    let x = x.clamp(0.0, (width - 1) as f64);
    let y = y.clamp(0.0, (height - 1) as f64);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
    let (fx, fy) = (x - x0 as f64, y - y0 as f64);
    let at = |x: usize, y: usize| gray[y * width + x] as f64;
    let top = at(x0, y0) * (1.0 - fx) + at(x1, y0) * fx;
    let bottom = at(x0, y1) * (1.0 - fx) + at(x1, y1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// The landmark image, `size`×`size`: 255 on 0, one-pixel-wide polylines of the face parts
/// ([`PARTS`]; eyes and lips closed, the rest open). Points are rounded to the nearest pixel;
/// each segment is drawn by an integer DDA (one pixel per step along the longer axis, the other
/// coordinate rounded, halves away from the start) and clipped to the image.
pub fn rasterise(points: &Landmarks, size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size * size];
    for &(first, last, closed) in &PARTS {
        let mut segments: Vec<(usize, usize)> = (first..last).map(|i| (i, i + 1)).collect();
        if closed {
            segments.push((last, first));
        }
        for (a, b) in segments {
            if let (Some(a), Some(b)) = (pixel(points[a]), pixel(points[b])) {
                draw_segment(&mut img, size, a, b);
            }
        }
    }
    img
}

/// A point rounded to the nearest pixel (far-off points kept far off); None if not finite.
fn pixel(p: [f32; 2]) -> Option<[i64; 2]> {
    const FAR: f32 = 1e12;
    let r = |v: f32| v.is_finite().then(|| v.round().clamp(-FAR, FAR) as i64);
    Some([r(p[0])?, r(p[1])?])
}

/// Lights the pixels of the segment `a`–`b` that are inside the `size`×`size` image.
fn draw_segment(img: &mut [u8], size: usize, a: [i64; 2], b: [i64; 2]) {
    let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
    // Major axis m, minor axis n.
    let (m, n) = if dx.abs() >= dy.abs() { (0, 1) } else { (1, 0) };
    let (dm, dn) = ([dx, dy][m], [dx, dy][n]);
    let steps = dm.abs();
    let (sm, sn) = (dm.signum(), dn.signum());
    // Steps whose major coordinate a[m] + sm·t is inside [0, size).
    let (lo, hi) = if sm == 0 {
        (0, 0)
    } else {
        let t0 = if sm > 0 { -a[m] } else { a[m] - (size as i64 - 1) };
        let t1 = if sm > 0 { size as i64 - 1 - a[m] } else { a[m] };
        (t0.max(0), t1.min(steps))
    };
    for t in lo..=hi {
        let major = a[m] + sm * t;
        let minor = if steps == 0 {
            a[n]
        } else {
            // round(t·|dn| / steps), halves up, in exact integer arithmetic.
            let num = 2 * t as i128 * dn.abs() as i128 + steps as i128;
            a[n] + sn * (num / (2 * steps as i128)) as i64
        };
        let mut p = [0i64; 2];
        p[m] = major;
        p[n] = minor;
        if (0..size as i64).contains(&p[0]) && (0..size as i64).contains(&p[1]) {
            img[p[1] as usize * size + p[0] as usize] = 255;
        }
    }
}
