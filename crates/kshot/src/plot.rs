//! Figures as PNG files: a run's learning curves ([`learning_curves`]) and a prediction grid of
//! support and query images ([`prediction_grid`]). Text is drawn with the embedded DejaVu Sans
//! (`assets/DejaVuSans.ttf`, licence beside it), never with the system's fonts, so a figure looks
//! the same everywhere and needs nothing installed.

mod curves;
mod faces;
mod grid;

use std::io::Cursor;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{ensure, Context};
use plotters::style::FontStyle;

use crate::checkpoint::write_atomic;

pub use curves::learning_curves;
pub use faces::{face_grid, FaceRow};
pub use grid::prediction_grid;

/// One image to draw: u8 pixels (0..=255) laid out `[channels, height, width]` (planar, the layout
/// kshot stores images in), `channels` 1 (gray) or 3 (RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct PlotImage {
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// A query's prediction for the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct GridQuery {
    pub image: PlotImage,
    /// The caption, e.g. `dog 0.93` or `none of these (0.41)`.
    pub label: String,
    /// Colours the caption green (right) or red (wrong) when the true class is known.
    pub correct: Option<bool>,
}

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
/// The family every figure's text asks for; plotters resolves it to [`FONT`].
const FAMILY: &str = "sans-serif";
/// Figures larger than this many pixels are refused (a typo in --width, thousands of queries).
const MAX_PIXELS: u64 = 200_000_000;

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    ensure!(
        ok,
        "the font embedded in kshot cannot be read; this kshot build is broken, reinstall it"
    );
    Ok(())
}

/// A white RGB canvas of `width`×`height` for plotters' bitmap backend.
fn canvas(width: u32, height: u32, out_png: &Path) -> anyhow::Result<Vec<u8>> {
    let pixels = u64::from(width) * u64::from(height);
    ensure!(
        pixels <= MAX_PIXELS,
        "cannot draw {}: {width}×{height} pixels is more than the {MAX_PIXELS} kshot draws; make it smaller",
        out_png.display()
    );
    Ok(vec![255; pixels as usize * 3])
}

/// Encodes an RGB canvas as PNG and writes it atomically.
fn write_png(out_png: &Path, width: u32, height: u32, rgb: Vec<u8>) -> anyhow::Result<()> {
    let image = image::RgbImage::from_raw(width, height, rgb).with_context(|| {
        format!("cannot write {}: the canvas has the wrong size", out_png.display())
    })?;
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .with_context(|| format!("cannot encode {} as PNG", out_png.display()))?;
    write_atomic(out_png, &bytes)
}
