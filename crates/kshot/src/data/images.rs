//! A user's image files as a model's input pixels: decoding (png, jpg, jpeg, bmp, pgm, pbm) and
//! the pixel pipeline of a run, shared by folder datasets, `kshot predict` and `kshot embed`, so
//! that an image is seen the same way at train, eval and predict time.
//!
//! A run's pipeline ([`Pipeline::of_run`]) follows from its data config:
//! - Omniglot runs: grayscale, ink normalised to Omniglot's own convention ([`normalise_ink`]:
//!   white background, black ink, whatever the input's polarity or gray levels), then the run's
//!   Omniglot resize and inversion ([`super::omniglot::Pixels`]), exactly as its training images.
//! - miniImageNet runs: RGB, stretched to the square with Lanczos-3, as miniImageNet's images.
//! - Folder runs: grayscale (exact area average) or RGB (as miniImageNet) by the backbone's input
//!   channels, with the run's `--polarity` and `--fit`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::omniglot::{Pixels, Resize};

/// File extensions read as images (case-insensitive).
pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "pgm", "pbm"];

/// Largest image side we are willing to decode.
const MAX_SIDE: u32 = 16_384;

/// Whether `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Decodes one image file; the error names the file and what to do.
pub fn decode(path: &Path) -> Result<image::DynamicImage> {
    let fail = |what: String| {
        anyhow!("{}: {what}; remove or replace it (png, jpg, bmp, pgm or pbm)", path.display())
    };
    let mut reader = image::ImageReader::open(path)
        .map_err(|e| fail(format!("cannot read the file ({e})")))?
        .with_guessed_format()
        .map_err(|e| fail(format!("cannot read the file ({e})")))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| {
        fail(format!(
            "cannot decode the image ({})",
            e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
        ))
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(fail("the image is empty".into()));
    }
    Ok(img)
}

/// How gray levels are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Polarity {
    /// As stored.
    #[default]
    AsIs,
    /// Drawings: background 0 and ink 255 whatever the input's polarity or gray levels
    /// ([`normalise_ink`]), Omniglot's convention. Grayscale only.
    Ink,
}

impl std::str::FromStr for Polarity {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "as-is" => Ok(Polarity::AsIs),
            "ink" => Ok(Polarity::Ink),
            other => bail!("unknown polarity `{other}`; choose as-is or ink"),
        }
    }
}

/// How an image's shape becomes the model's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fit {
    /// Resize (stretching a non-square image) to the run's size, as miniImageNet was made.
    #[default]
    Stretch,
    /// Every image must already be the run's size: a different one is an error.
    Exact,
}

impl std::str::FromStr for Fit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stretch" => Ok(Fit::Stretch),
            "exact" => Ok(Fit::Exact),
            other => bail!("unknown fit `{other}`; choose stretch or exact"),
        }
    }
}

/// What a run does to an image file before its backbone sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pipeline {
    /// 1 (grayscale) or 3 (RGB planes).
    pub channels: usize,
    pub size: usize,
    pub polarity: Polarity,
    pub fit: Fit,
    /// Grayscale: the resize (and whether ink is bright) after polarity.
    pub gray: Pixels,
}

impl Pipeline {
    /// A folder dataset's pipeline.
    pub fn folder(channels: usize, size: usize, polarity: Polarity, fit: Fit) -> Result<Self> {
        if channels != 1 && channels != 3 {
            bail!("images are read as 1 (grayscale) or 3 (RGB) channels, not {channels}");
        }
        if channels == 3 && polarity == Polarity::Ink {
            bail!("--polarity ink reads drawings in grayscale; use it with 1 input channel");
        }
        // Area-averaged ink is 255 − luma; as-is pixels keep the stored levels.
        let gray = Pixels { resize: Resize::Area, invert: polarity == Polarity::Ink };
        Ok(Pipeline { channels, size, polarity, fit, gray })
    }

    /// The pipeline of a run's data config, with `channels` the backbone's input channels.
    pub fn of_run(data: &crate::protocol::DataConfig, channels: usize) -> Result<Self> {
        let size = data.image_size;
        match data.dataset.as_str() {
            "omniglot" => Ok(Pipeline {
                channels: 1,
                size,
                polarity: Polarity::Ink,
                fit: Fit::Stretch,
                gray: data.pixels(),
            }),
            "mini-imagenet" => Pipeline::folder(3, size, Polarity::AsIs, Fit::Stretch),
            "folder" => Pipeline::folder(channels, size, data.polarity, data.fit),
            other => bail!("no image pipeline for dataset `{other}`"),
        }
    }

    /// Values per image (C·size·size).
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// One decoded image as [C, size, size] u8. `path` names it in errors.
    pub fn apply(&self, img: &image::DynamicImage, path: &Path) -> Result<Vec<u8>> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if self.fit == Fit::Exact && (w, h) != (self.size, self.size) {
            bail!(
                "{} is {w}×{h}, but the run reads {s}×{s} images as they are (--fit exact); resize it to {s}×{s} or use --fit stretch",
                path.display(),
                s = self.size
            );
        }
        if self.channels == 3 {
            let mut out = vec![0u8; self.image_len()];
            super::mini_imagenet::write_rgb(img, self.size, &mut out)
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            return Ok(out);
        }
        let luma = img.to_luma8().into_raw();
        // Omniglot's resize reads a white background with black ink.
        let source = match self.polarity {
            Polarity::Ink => normalise_ink(&luma),
            Polarity::AsIs => luma,
        };
        Ok(self.gray.apply(&source, w, h, self.size))
    }

    /// Decodes and preprocesses one file.
    pub fn load(&self, path: &Path) -> Result<Vec<u8>> {
        self.apply(&decode(path)?, path)
    }

    /// What the cache key of a folder set adds for this pipeline.
    pub fn cache_param(&self) -> String {
        format!(
            "pipeline=c{},s{},{:?},{:?},{}:{},v1",
            self.channels, self.size, self.polarity, self.fit, self.gray.resize, self.gray.invert
        )
    }
}

/// A drawing's gray levels mapped to Omniglot's source convention, background 255 and ink 0,
/// whatever the input's polarity and levels (black on white, white on black, pencil on gray
/// paper). The background is the median level (ink covers a minority of a drawing); ink is on
/// the side of the median with the longer tail, at its 0.5th percentile from that end. Levels
/// within three median absolute deviations of the background (paper texture, uneven light) are
/// background; the rest is stretched linearly so the ink level maps to 0. A flat image is all
/// background.
pub fn normalise_ink(luma: &[u8]) -> Vec<u8> {
    let mut hist = [0usize; 256];
    for &v in luma {
        hist[v as usize] += 1;
    }
    let n = luma.len();
    let quantile = |q: f64| -> f64 {
        let target = ((n as f64 - 1.0) * q).round() as usize;
        let mut seen = 0;
        for (v, &c) in hist.iter().enumerate() {
            seen += c;
            if seen > target {
                return v as f64;
            }
        }
        255.0
    };
    let background = quantile(0.5);
    let (dark, light) = (quantile(0.005), quantile(0.995));
    let mut deviations = [0usize; 256];
    for (v, &c) in hist.iter().enumerate() {
        deviations[(v as f64 - background).abs() as usize] += c;
    }
    let mut seen = 0;
    let mut mad = 0.0;
    for (d, &c) in deviations.iter().enumerate() {
        seen += c;
        if seen * 2 >= n {
            mad = d as f64;
            break;
        }
    }
    let dark_ink = background - dark >= light - background;
    let span = if dark_ink { background - dark } else { light - background };
    let margin = 3.0 * mad;
    if span <= margin + 8.0 {
        return vec![255; n];
    }
    let full = span - margin;
    luma.iter()
        .map(|&v| {
            let depth = if dark_ink { background - v as f64 } else { v as f64 - background };
            let x = ((depth - margin) / full).clamp(0.0, 1.0);
            (255.0 * (1.0 - x)).round() as u8
        })
        .collect()
}

/// The image files of `paths`: files as given, folders searched recursively, in sorted order;
/// an error names a path that is neither an image nor a folder, or a folder without images.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = out.len();
            walk(p, &mut out)?;
            if out.len() == before {
                bail!(
                    "{} holds no images ({}); point at image files or a folder of them",
                    p.display(),
                    EXTENSIONS.join(", ")
                );
            }
        } else if p.is_file() {
            if !is_image(p) {
                bail!(
                    "{} is not an image file ({}); pass image files or folders",
                    p.display(),
                    EXTENSIONS.join(", ")
                );
            }
            out.push(p.clone());
        } else {
            bail!("{} not found; pass image files or folders", p.display());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = sorted_entries(dir)?;
    entries.retain(|p| !is_hidden(p));
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// The entries of a directory in name order; the error names it.
pub fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("cannot read the folder {} ({e})", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| anyhow!("cannot read the folder {} ({e})", dir.display()))?;
    entries.sort();
    Ok(entries)
}

/// Dot files and folders (`.DS_Store`, `.git`) are not data.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 40×40 glyph: a cross of width 4, `ink` on `paper`.
    fn glyph(ink: u8, paper: u8) -> Vec<u8> {
        (0..40 * 40)
            .map(|i| {
                let (r, c) = (i / 40, i % 40);
                if (18..22).contains(&r) || (18..22).contains(&c) {
                    ink
                } else {
                    paper
                }
            })
            .collect()
    }

    #[test]
    fn ink_normalisation_ignores_polarity_and_levels() {
        let clean = normalise_ink(&glyph(0, 255));
        assert_eq!(clean, glyph(0, 255), "black on white is already the convention");
        for (ink, paper) in [(255, 0), (60, 190), (200, 40), (110, 230)] {
            assert_eq!(normalise_ink(&glyph(ink, paper)), clean, "ink {ink} on paper {paper}");
        }
        assert!(normalise_ink(&[128; 100]).iter().all(|&v| v == 255), "flat is background");
    }

    #[test]
    fn noisy_paper_is_background() {
        let mut img = glyph(50, 200);
        for (i, v) in img.iter_mut().enumerate() {
            if *v == 200 {
                *v = 200 - (i % 7) as u8; // paper texture
            }
        }
        let out = normalise_ink(&img);
        assert_eq!(out, glyph(0, 255));
    }
}
