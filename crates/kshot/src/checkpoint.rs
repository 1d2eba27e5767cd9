//! Files that must never be half-written: every write goes to a temporary file in the same
//! directory, is flushed to disk, then renamed over the target.
//!
//! Tensor files are safetensors whose `__metadata__` holds [`HASH_KEY`], a SHA-256 of their
//! content (see [`content_hash`] for exactly what is hashed). [`load_tensors`] checks it, so a
//! flipped bit anywhere in the tensors, their names, dtypes or shapes is an error rather than a
//! silently different model. Files written before the hash existed have no such key and load
//! unchecked.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

/// The `__metadata__` key of a tensor file that holds its [`content_hash`].
pub const HASH_KEY: &str = "kshot.sha256";

/// Writes `bytes` to `path` atomically: a temporary file beside `path` is written, flushed to
/// disk (`sync_all`) and renamed over `path`. On any failure the temporary file is removed, the
/// previous `path` (if any) is untouched, and the error is one line naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot write {}: cannot create its directory {}; check the parent is writable",
            path.display(),
            dir.display()
        )
    })?;
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        sync_dir(dir);
    }
    result.with_context(|| {
        format!(
            "cannot write {}; check it is not a directory, its directory is writable and the disk has space",
            path.display()
        )
    })
}

/// Makes a rename in `dir` durable where the platform allows it; best effort, as the file itself
/// is already complete on disk.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Writes named tensors as safetensors, atomically (see [`write_atomic`]), with their
/// [`content_hash`] under [`HASH_KEY`] in the file's metadata. When a name occurs more than once
/// the last tensor wins. Tensors on other devices are copied to the CPU first.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let raw = export(tensors.iter().map(|(n, t)| (n.as_str(), t)))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let views = views(&raw).with_context(|| format!("cannot write {}", path.display()))?;
    let hash = hash_views(views.iter().map(|(n, v)| (*n, v)));
    let metadata = HashMap::from([(HASH_KEY.to_string(), hash)]);
    let bytes = safetensors::serialize(views, Some(metadata)).with_context(|| {
        format!("cannot write {}: cannot serialise its tensors", path.display())
    })?;
    drop(raw);
    write_atomic(path, &bytes)
}

/// A tensor's bytes as safetensors stores them: little-endian, row-major.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The bytes of `tensors`, sorted by name; of tensors sharing a name the last wins.
fn export<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a Tensor)>,
) -> anyhow::Result<Vec<(&'a str, RawTensor)>> {
    let by_name: BTreeMap<&str, &Tensor> = tensors.collect();
    by_name.into_iter().map(|(name, t)| Ok((name, raw_tensor(name, t)?))).collect()
}

fn raw_tensor(name: &str, t: &Tensor) -> anyhow::Result<RawTensor> {
    if matches!(t.dtype(), DType::F6E2M3 | DType::F6E3M2 | DType::F4 | DType::F8E8M0) {
        anyhow::bail!("tensor {name}: candle cannot export {:?} tensors", t.dtype());
    }
    let t = t.to_device(&Device::Cpu).with_context(|| format!("tensor {name}"))?;
    // On the CPU and in a dtype candle can export, candle's view cannot fail (it would panic).
    let data = safetensors::View::data(&&t).into_owned();
    Ok(RawTensor { dtype: t.dtype().into(), shape: t.dims().to_vec(), data })
}

fn views<'a>(raw: &'a [(&'a str, RawTensor)]) -> anyhow::Result<Vec<(&'a str, TensorView<'a>)>> {
    raw.iter()
        .map(|(name, r)| {
            let view = TensorView::new(r.dtype, r.shape.clone(), &r.data)
                .with_context(|| format!("tensor {name}"))?;
            Ok((*name, view))
        })
        .collect()
}

/// SHA-256, as lowercase hex, of named tensors' content, independent of how they are laid out in
/// a file. This is the value [`save_tensors`] stores under [`HASH_KEY`], so two tensor files hold
/// the same tensors exactly when their hashes agree.
///
/// What is hashed, every integer a `u64` little-endian: the number of tensors, then for each
/// tensor in increasing byte order of its name: the name's length and UTF-8 bytes; the length and
/// ASCII bytes of its safetensors dtype name (`F32`, `F64`, `I64`, ...); its rank then each
/// dimension; the length of its data then the data, row-major and little-endian, exactly as a
/// safetensors file stores it.
pub fn content_hash(tensors: &HashMap<String, Tensor>) -> anyhow::Result<String> {
    let raw = export(tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
    Ok(hash_views(views(&raw)?.iter().map(|(n, v)| (*n, v))))
}

/// The hash [`content_hash`] describes; `views` may come in any order.
fn hash_views<'a, 'b: 'a>(views: impl Iterator<Item = (&'a str, &'a TensorView<'b>)>) -> String {
    fn put_len(h: &mut Sha256, n: usize) {
        h.update((n as u64).to_le_bytes());
    }
    let sorted: BTreeMap<&str, &TensorView> = views.collect();
    let mut h = Sha256::new();
    put_len(&mut h, sorted.len());
    for (name, view) in sorted {
        put_len(&mut h, name.len());
        h.update(name.as_bytes());
        let dtype = view.dtype().to_string();
        put_len(&mut h, dtype.len());
        h.update(dtype.as_bytes());
        put_len(&mut h, view.shape().len());
        for &d in view.shape() {
            put_len(&mut h, d);
        }
        put_len(&mut h, view.data().len());
        h.update(view.data());
    }
    crate::data::cache::hex(&h.finalize())
}

/// The name of the file that `name`, one of [`write_atomic`]'s temporary files (left by a crash
/// mid-write), was to become; `None` for any other name.
pub fn temp_target(name: &str) -> Option<&str> {
    let inner = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = inner.rsplitn(3, '.');
    let (n, pid, target) = (parts.next()?, parts.next()?, parts.next()?);
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (number(n) && number(pid) && !target.is_empty()).then_some(target)
}

/// `.NAME.PID.N.tmp` beside `path`: same filesystem, so the final rename is atomic; `N` keeps
/// concurrent writes of one target within a process apart.
fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Reads a safetensors file onto the CPU, checking its [`content_hash`] when it records one. A
/// missing, truncated or corrupted file is a one-line error naming it.
pub fn load_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("{} not found; is this a kshot run directory?", path.display())
        }
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    tensors_from_bytes(&bytes, path)
}

/// [`load_tensors`] of bytes already in memory (an embedded model); `path` names them in errors.
pub fn tensors_from_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        let e = e.to_string();
        anyhow::anyhow!(
            "{}: not a readable safetensors file ({}); the file may be truncated",
            path.display(),
            e.lines().next().unwrap_or_default()
        )
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| unreadable(&e))?;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| unreadable(&e))?;
    let views = file.tensors();
    if let Some(stored) = header.metadata().as_ref().and_then(|m| m.get(HASH_KEY)) {
        let actual = hash_views(views.iter().map(|(n, v)| (n.as_str(), v)));
        if *stored != actual {
            anyhow::bail!(
                "{}: content hash mismatch — the file is corrupted; restore it or retrain from the last good checkpoint",
                path.display()
            );
        }
    }
    views
        .into_iter()
        .map(|(name, view)| {
            let t = view.load(&Device::Cpu).map_err(|e| unreadable(&e))?;
            Ok((name, t))
        })
        .collect()
}
