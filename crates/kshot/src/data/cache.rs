//! On-disk cache of decoded [`ImageSet`]s, so that a second run skips PNG/JPEG decoding.
//!
//! One binary file per (dataset, split, image size, cache format version, source fingerprint).
//! The directory is, in order: `$KSHOT_CACHE`, `$XDG_CACHE_HOME/kshot`, `$HOME/.cache/kshot`.
//! The source fingerprint is the size and modification time of every source file (zips, split
//! files; for an extracted folder, every file under it), so replacing the data rebuilds the cache.
//!
//! Files are written to a temporary file in the cache directory and renamed into place, so a
//! reader never sees a half-written file, and two processes building the same set at once both
//! end with a valid file. Every file ends with a SHA-256 of its contents: a corrupt, truncated or
//! foreign file is ignored (with a note on stderr) and rebuilt, never trusted and never a panic.
//! A cache directory that cannot be written only costs a single warning on stderr per process.
//!
//! Stale files (from older sources or format versions) are not deleted automatically; the
//! directory can be removed at any time.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::{Class, ImageSet};

/// The environment variable naming the cache directory.
pub const CACHE_ENV: &str = "KSHOT_CACHE";

/// Bumped whenever the file layout changes; part of every key, so old files are simply not found.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"KSHOTSET";
const HASH_LEN: usize = 32;

/// What a cached set depends on. Two keys with the same fields and unchanged sources name the
/// same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// e.g. `omniglot`.
    pub dataset: String,
    /// e.g. `vinyals-train`.
    pub split: String,
    pub image_size: usize,
    /// Files (or folders) the set is built from; their sizes and mtimes are part of the key.
    pub sources: Vec<PathBuf>,
    /// Anything else the decoded pixels depend on (e.g. a preprocessing version).
    pub params: Vec<String>,
}

impl CacheKey {
    pub fn new(dataset: &str, split: &str, image_size: usize) -> Self {
        CacheKey {
            dataset: dataset.to_string(),
            split: split.to_string(),
            image_size,
            sources: Vec::new(),
            params: Vec::new(),
        }
    }

    pub fn with_source(mut self, path: impl Into<PathBuf>) -> Self {
        self.sources.push(path.into());
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.params.push(param.into());
        self
    }

    /// SHA-256 over the key fields, the format version and the sources' fingerprints.
    /// Fails if a source cannot be read.
    pub fn digest(&self) -> Result<[u8; HASH_LEN]> {
        let mut h = Sha256::new();
        let mut field = |s: &str| {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        field("kshot-cache");
        field(&FORMAT_VERSION.to_string());
        field(&self.dataset);
        field(&self.split);
        field(&self.image_size.to_string());
        for p in &self.params {
            field(p);
        }
        for src in &self.sources {
            field(&fingerprint(src)?);
        }
        Ok(h.finalize().into())
    }

    /// The cache file name: readable prefix, then 16 hex digits of the digest.
    pub fn file_name(&self) -> Result<String> {
        let d = self.digest()?;
        Ok(format!(
            "{}-{}-{}-{}.kset",
            sanitize(&self.dataset),
            sanitize(&self.split),
            self.image_size,
            hex(&d[..8])
        ))
    }
}

/// Where cached sets live; [`Cache::disabled`] builds every time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    dir: Option<PathBuf>,
}

impl Cache {
    /// A cache in `dir` (created on first write).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: Some(dir.into()) }
    }

    /// No caching: [`Cache::load_or_build`] always builds.
    pub fn disabled() -> Self {
        Cache { dir: None }
    }

    /// The cache in [`default_dir`], or disabled when no directory can be determined.
    pub fn from_env() -> Self {
        Cache { dir: default_dir() }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The file `key` is stored in, if caching is enabled and the sources can be read.
    pub fn path_for(&self, key: &CacheKey) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        key.file_name().ok().map(|n| dir.join(n))
    }

    /// The cached set for `key` if a valid file exists, else `build()`, written to the cache.
    /// Errors come only from `build`; cache problems fall back to building.
    pub fn load_or_build(
        &self,
        key: &CacheKey,
        build: impl FnOnce() -> Result<ImageSet>,
    ) -> Result<ImageSet> {
        let Some(dir) = &self.dir else {
            return build();
        };
        // A source that cannot be fingerprinted: let `build` report it properly.
        let Ok(digest) = key.digest() else {
            return build();
        };
        let Ok(name) = key.file_name() else {
            return build();
        };
        let path = dir.join(name);
        match read_file(&path, &digest) {
            Ok(Some(set)) => return Ok(set),
            Ok(None) => {}
            Err(e) => eprintln!(
                "note: ignoring unusable cache file {} ({e:#}); rebuilding it",
                path.display()
            ),
        }
        let set = build()?;
        if let Err(e) = write_atomic(dir, &path, &set, &digest) {
            warn_unwritable(dir, &e);
        }
        Ok(set)
    }
}

/// `load_or_build` with [`Cache::from_env`].
pub fn load_or_build(key: &CacheKey, build: impl FnOnce() -> Result<ImageSet>) -> Result<ImageSet> {
    Cache::from_env().load_or_build(key, build)
}

/// `$KSHOT_CACHE`, else `$XDG_CACHE_HOME/kshot`, else `$HOME/.cache/kshot` (empty values ignored).
pub fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var(CACHE_ENV) {
        return Some(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(d.join("kshot"));
    }
    var("HOME").map(|h| h.join(".cache").join("kshot"))
}

fn warn_unwritable(dir: &Path, e: &anyhow::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: cannot write the data cache in {} ({e:#}); decoded data will not be cached \
             (set {CACHE_ENV} to a writable directory)",
            dir.display()
        );
    }
}

/// `kind:size:mtime` for a file; for a folder, the same for every file under it, sorted.
fn fingerprint(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_dir() {
        let mut entries = Vec::new();
        walk(path, path, &mut entries)?;
        entries.sort();
        let mut h = Sha256::new();
        for e in &entries {
            h.update(e.as_bytes());
            h.update(b"\n");
        }
        Ok(format!("dir:{}:{}", entries.len(), hex(&h.finalize())))
    } else {
        Ok(format!("file:{}:{}", meta.len(), mtime_ns(&meta)))
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let meta = fs::metadata(&path)?;
        if meta.is_dir() {
            walk(base, &path, out)?;
        } else {
            let rel = path.strip_prefix(base).unwrap_or(&path);
            out.push(format!("{}:{}:{}", rel.display(), meta.len(), mtime_ns(&meta)));
        }
    }
    Ok(())
}

fn mtime_ns(meta: &fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .collect()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- file format ----------------------------------------------------------------------------
//
// All integers little-endian u64 unless noted; strings are a u64 length then UTF-8 bytes.
//   "KSHOTSET"  u32 FORMAT_VERSION  [32] key digest
//   name  channels height width  n_classes
//   n_classes x (name  group  u64 n_bytes  pixels)
//   [32] SHA-256 of everything above

/// A `Write` that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn encode(w: &mut impl Write, set: &ImageSet, digest: &[u8; HASH_LEN]) -> io::Result<()> {
    let u = |w: &mut dyn Write, v: usize| w.write_all(&(v as u64).to_le_bytes());
    let s = |w: &mut dyn Write, v: &str| {
        w.write_all(&(v.len() as u64).to_le_bytes())?;
        w.write_all(v.as_bytes())
    };
    w.write_all(MAGIC)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(digest)?;
    s(w, &set.name)?;
    u(w, set.channels)?;
    u(w, set.height)?;
    u(w, set.width)?;
    u(w, set.classes.len())?;
    for c in &set.classes {
        s(w, &c.name)?;
        s(w, &c.group)?;
        u(w, c.pixels.len())?;
        w.write_all(&c.pixels)?;
    }
    Ok(())
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomic(dir: &Path, path: &Path, set: &ImageSet, digest: &[u8; HASH_LEN]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = Hashing { inner: BufWriter::with_capacity(1 << 20, file), hash: Sha256::new() };
        encode(&mut w, set, digest).with_context(|| format!("writing {}", tmp.display()))?;
        let sum = w.hash.finalize();
        let mut inner = w.inner;
        inner.write_all(&sum)?;
        inner.flush()?;
        drop(inner);
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads the body of a cache file while hashing it, refusing to read past the body's end (so a
/// corrupt length can never cause a huge allocation).
struct Reader<R> {
    inner: R,
    hash: Sha256,
    /// Bytes of body left (the file minus the trailing hash, minus what was read).
    left: u64,
}

impl<R: Read> Reader<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.left {
            bail!("file is truncated");
        }
        self.inner.read_exact(buf).context("file is truncated")?;
        self.hash.update(&*buf);
        self.left -= buf.len() as u64;
        Ok(())
    }
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        if n as u64 > self.left {
            bail!("file is truncated");
        }
        let mut v = vec![0u8; n];
        self.fill(&mut v)?;
        Ok(v)
    }
    fn u64(&mut self) -> Result<usize> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        usize::try_from(u64::from_le_bytes(b)).map_err(|_| anyhow::anyhow!("length out of range"))
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u64()?;
        Ok(String::from_utf8(self.bytes(n)?)?)
    }
}

/// Parses a cache file of `total_len` bytes from `r`, checking magic, version, key and checksum.
fn decode(r: impl Read, total_len: u64, digest: &[u8; HASH_LEN]) -> Result<ImageSet> {
    if total_len < (MAGIC.len() + 4 + 2 * HASH_LEN) as u64 {
        bail!("file is truncated");
    }
    let mut r = Reader { inner: r, hash: Sha256::new(), left: total_len - HASH_LEN as u64 };
    let mut magic = [0u8; 8];
    r.fill(&mut magic)?;
    if &magic != MAGIC {
        bail!("not a kshot cache file");
    }
    let mut version = [0u8; 4];
    r.fill(&mut version)?;
    let version = u32::from_le_bytes(version);
    if version != FORMAT_VERSION {
        bail!("cache format {version}, expected {FORMAT_VERSION}");
    }
    let mut key = [0u8; HASH_LEN];
    r.fill(&mut key)?;
    if &key != digest {
        bail!("file belongs to a different key");
    }
    let name = r.str()?;
    let channels = r.u64()?;
    let height = r.u64()?;
    let width = r.u64()?;
    let image_len = channels.checked_mul(height).and_then(|v| v.checked_mul(width)).unwrap_or(0);
    if image_len == 0 {
        bail!("invalid image shape {channels}x{height}x{width}");
    }
    let n = r.u64()?;
    // Each class takes at least 24 bytes: refuse absurd counts before allocating.
    if n as u64 > r.left / 24 {
        bail!("invalid class count {n}");
    }
    let mut classes = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str()?;
        let group = r.str()?;
        let len = r.u64()?;
        if len % image_len != 0 {
            bail!("class {name}: {len} bytes is not a whole number of images");
        }
        let pixels = r.bytes(len)?;
        classes.push(Class { name, group, pixels });
    }
    if r.left != 0 {
        bail!("trailing bytes");
    }
    let mut sum = [0u8; HASH_LEN];
    r.inner.read_exact(&mut sum).context("file is truncated")?;
    if r.hash.finalize().as_slice() != sum {
        bail!("checksum mismatch (file is truncated or corrupt)");
    }
    Ok(ImageSet { name, channels, height, width, classes })
}

/// Reads the cached set at `path`; `Ok(None)` when there is no such file.
fn read_file(path: &Path, digest: &[u8; HASH_LEN]) -> Result<Option<ImageSet>> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata()?.len();
    decode(io::BufReader::with_capacity(1 << 16, file), len, digest).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageSet {
        ImageSet {
            name: "t/x".into(),
            channels: 1,
            height: 2,
            width: 2,
            classes: vec![
                Class { name: "a".into(), group: "g".into(), pixels: vec![1, 2, 3, 4, 5, 6, 7, 8] },
                Class { name: "b".into(), group: "h".into(), pixels: vec![9, 9, 9, 9] },
            ],
        }
    }

    #[test]
    fn encode_decode_roundtrip_and_corruption() {
        let set = sample();
        let d = [7u8; 32];
        let mut w = Hashing { inner: Vec::new(), hash: Sha256::new() };
        encode(&mut w, &set, &d).unwrap();
        let sum = w.hash.finalize();
        let mut bytes = w.inner;
        bytes.extend_from_slice(&sum);
        let dec = |b: &[u8], d: &[u8; 32]| decode(b, b.len() as u64, d);
        assert_eq!(dec(&bytes, &d).unwrap(), set);
        assert!(dec(&bytes, &[0u8; 32]).is_err());
        for cut in 0..bytes.len() {
            assert!(dec(&bytes[..cut], &d).is_err());
            // A file that is shorter than its reported length.
            assert!(decode(&bytes[..cut], bytes.len() as u64, &d).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(dec(&b, &d).is_err(), "flip at {i}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(dec(&longer, &d).is_err());
    }
}
