//! Downloading datasets: `kshot data fetch omniglot --data-dir DIR`. miniImageNet has no public
//! download ([`fetch_mini_imagenet`] checks the files placed by hand and says where they go).
//!
//! [`fetch_file`] is the generic step: HTTP(S) GET with a connect timeout and an overall timeout,
//! a progress bar on stderr, the body streamed to a temporary file next to the destination,
//! SHA-256 checked when known, then renamed into place (so an interrupted download never leaves a
//! file that looks complete). A destination that already exists is kept (and verified when its
//! hash is known), not downloaded again. Every error is one line naming the URL or file and what
//! to do.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use super::cache::hex;

/// How long a download may take; [`Timeouts::default`] is what [`fetch_file`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// To resolve the host name, and (separately) to establish the connection: 10 s.
    pub connect: Duration,
    /// Without receiving any data on an open connection: 30 s.
    pub read: Duration,
    /// For the whole request, body included: 10 min.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}

/// A file of a dataset: where it comes from and where it goes under the data root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFile {
    pub url: &'static str,
    /// Relative to the data root.
    pub path: &'static str,
    /// Lowercase hex SHA-256, when it is known.
    pub sha256: Option<&'static str>,
}

/// A file of `brendenlake/omniglot`'s `python/` folder.
macro_rules! lake {
    ($file:literal) => {
        concat!("https://github.com/brendenlake/omniglot/raw/master/python/", $file)
    };
}

/// A Vinyals split file from `jakesnell/prototypical-networks`.
macro_rules! snell {
    ($file:literal) => {
        concat!(
            "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/",
            $file
        )
    };
}

/// The Omniglot files [`fetch_omniglot`] downloads.
///
/// The two big zips have no recorded hash: the offline copies this project was developed against
/// are pixel-exact rebuilds whose bytes (and hence SHA-256) differ from the official archives, and
/// the official hashes could not be checked from here. They are verified structurally instead (the
/// loader rejects an unreadable zip). `all_runs.zip` and the split files are byte-identical to the
/// official ones, so their hashes are checked.
pub const OMNIGLOT_FILES: &[RemoteFile] = &[
    RemoteFile {
        url: lake!("images_background.zip"),
        path: "omniglot/images_background.zip",
        sha256: None,
    },
    RemoteFile {
        url: lake!("images_evaluation.zip"),
        path: "omniglot/images_evaluation.zip",
        sha256: None,
    },
    RemoteFile {
        url: lake!("one-shot-classification/all_runs.zip"),
        path: "omniglot/all_runs.zip",
        sha256: Some("437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"),
    },
    RemoteFile {
        url: snell!("train.txt"),
        path: "omniglot/splits/vinyals/train.txt",
        sha256: Some("984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0"),
    },
    RemoteFile {
        url: snell!("val.txt"),
        path: "omniglot/splits/vinyals/val.txt",
        sha256: Some("11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a"),
    },
    RemoteFile {
        url: snell!("trainval.txt"),
        path: "omniglot/splits/vinyals/trainval.txt",
        sha256: Some("5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a"),
    },
    RemoteFile {
        url: snell!("test.txt"),
        path: "omniglot/splits/vinyals/test.txt",
        sha256: Some("845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204"),
    },
];

/// Downloads Omniglot (both image zips, Lake's `all_runs.zip`, the Vinyals split files) into
/// `root/omniglot/`. Files already there are kept (and their hashes checked where known).
pub fn fetch_omniglot(root: &Path) -> Result<()> {
    for f in OMNIGLOT_FILES {
        fetch_file(f.url, &root.join(f.path), f.sha256)?;
    }
    Ok(())
}

/// miniImageNet cannot be downloaded (ImageNet's terms do not allow redistribution, and there is no
/// official archive): this checks that the files placed by hand under `root/mini-imagenet/` are
/// there (val and test complete, train possibly partial) and returns the partial-train warning, if
/// any. When they are not, the error is one line saying where to put them.
pub fn fetch_mini_imagenet(root: &Path) -> Result<Option<String>> {
    use super::mini_imagenet::{catalog, dataset_dir, fetch_hint, Subset};
    if !dataset_dir(root).is_dir() {
        bail!("{}", fetch_hint(root));
    }
    let mut warning = None;
    for subset in [Subset::Train, Subset::Val, Subset::Test] {
        let c = catalog(root, subset).map_err(|e| anyhow!("{}", one_line(&format!("{e:#}"))))?;
        warning = warning.or(c.warning);
    }
    Ok(warning)
}

/// Downloads `url` to `dest` unless `dest` already exists (when `sha256` is given, an existing
/// file must match it, else it is downloaded again). The body goes to a temporary file in the same
/// folder, is checked against `sha256`, then renamed to `dest`.
pub fn fetch_file(url: &str, dest: &Path, sha256: Option<&str>) -> Result<()> {
    fetch_file_with(url, dest, sha256, Timeouts::default())
}

/// [`fetch_file`] with explicit timeouts.
pub fn fetch_file_with(
    url: &str,
    dest: &Path,
    sha256: Option<&str>,
    timeouts: Timeouts,
) -> Result<()> {
    let expected = sha256.map(|s| s.trim().to_ascii_lowercase());
    if dest.is_file() {
        match &expected {
            None => return Ok(()),
            Some(want) => {
                let got = sha256_file(dest)?;
                if &got == want {
                    return Ok(());
                }
                eprintln!(
                    "note: {} has sha256 {got}, expected {want}; downloading it again",
                    dest.display()
                );
            }
        }
    }
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.part-{}", std::process::id()));
    let result = download_to(url, &tmp, dest, &file_name, timeouts).and_then(|got| {
        if let Some(want) = &expected {
            if &got != want {
                bail!(
                    "downloaded {url} but its sha256 is {got}, expected {want}; not saved (try again, \
                     or place a verified copy at {})",
                    dest.display()
                );
            }
        }
        fs::rename(&tmp, dest).with_context(|| format!("could not move the download to {}", dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Streams `url` into `tmp`; returns the body's SHA-256.
fn download_to(
    url: &str,
    tmp: &Path,
    dest: &Path,
    label: &str,
    timeouts: Timeouts,
) -> Result<String> {
    let fail = |reason: String| {
        anyhow!(
            "could not download {url}: {}; check your connection, or place the file at {} by hand",
            one_line(&reason),
            dest.display()
        )
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(timeouts.connect))
        .timeout_connect(Some(timeouts.connect))
        .timeout_per_read(Some(timeouts.read))
        .timeout_global(Some(timeouts.total))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let body = response.into_body();
    let len = body.content_length();
    let mut reader = body.into_reader();

    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());

    let mut out =
        fs::File::create(tmp).with_context(|| format!("could not create {}", tmp.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let result = (|| -> Result<()> {
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(e.to_string())),
            };
            out.write_all(&buf[..n])
                .with_context(|| format!("could not write {}", tmp.display()))?;
            hash.update(&buf[..n]);
            bar.inc(n as u64);
        }
        out.flush().with_context(|| format!("could not write {}", tmp.display()))?;
        Ok(())
    })();
    bar.finish_and_clear();
    result?;
    Ok(hex(&hash.finalize()))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        fs::File::open(path).with_context(|| format!("could not open {}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hash.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!("could not read {}: {e}", path.display())),
        }
    }
    Ok(hex(&hash.finalize()))
}

/// Where [`fetch_omniglot`] puts a file of [`OMNIGLOT_FILES`].
pub fn destination(root: &Path, file: &RemoteFile) -> PathBuf {
    root.join(file.path)
}
