//! Files that must never be half-written: every write goes to a temporary file in the same
//! directory, is flushed to disk, then renamed over the target.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| {
        format!(
            "cannot write {}; check the directory is writable and the disk has space",
            path.display()
        )
    })
}

/// Writes named tensors as safetensors, atomically.
pub fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = temp_path(path);
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `.NAME.PID.tmp` beside `path`: same filesystem, so the final rename is atomic.
fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Reads a safetensors file; a missing or corrupt file is a one-line error naming it.
pub fn load_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    if !path.exists() {
        anyhow::bail!("{} not found; is this a kshot run directory?", path.display());
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a readable safetensors file ({e}); the file may be truncated",
            path.display()
        )
    })
}
