//! The grid of `kshot generate`: for each rendered image, the shots it was generated from, the
//! target landmark image, the generated image and the real one.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::prelude::*;

use super::grid::blit;
use super::{canvas, register_font, write_png, PlotImage, FAMILY};

/// One row of the grid.
#[derive(Debug, Clone)]
pub struct FaceRow {
    pub label: String,
    pub shots: Vec<PlotImage>,
    pub landmarks: PlotImage,
    pub generated: PlotImage,
    /// The real image with the target landmarks, when there is one.
    pub real: Option<PlotImage>,
}

const GAP: i32 = 6;
const SECTION: i32 = 18;
const MARGIN: i32 = 14;
const FONT: f64 = 15.0;
const TEXT: RGBColor = RGBColor(20, 20, 20);

/// Writes the rows as one PNG: shots | target landmarks | generated | real, headed by column.
pub fn face_grid(rows: &[FaceRow], out_png: &Path) -> anyhow::Result<()> {
    let Some(first) = rows.first() else {
        bail!("cannot draw {}: there are no generated images", out_png.display());
    };
    let (h, w) = (first.generated.height as i32, first.generated.width as i32);
    let all = rows
        .iter()
        .flat_map(|r| r.shots.iter().chain([&r.landmarks, &r.generated]).chain(r.real.as_ref()));
    for image in all {
        if (image.height as i32, image.width as i32) != (h, w) || image.channels != 1 {
            bail!("cannot draw {}: every image must be gray and {w}×{h}", out_png.display());
        }
    }
    register_font()?;
    let font = (FAMILY, FONT).into_font();
    let mut label_width = 0;
    for r in rows {
        label_width = label_width.max(font.box_size(&r.label)?.0 as i32);
    }
    let label_width = label_width.min(300) + GAP;
    let shots = rows.iter().map(|r| r.shots.len()).max().unwrap_or(0) as i32;
    let cell = |n: i32| n * (w + GAP);
    let shots_x = MARGIN + label_width;
    let landmarks_x = shots_x + cell(shots) + SECTION;
    let generated_x = landmarks_x + cell(1) + SECTION;
    let real_x = generated_x + cell(1) + SECTION;
    let width = (real_x + cell(1) + MARGIN) as u32;
    let line = (1.5 * FONT) as i32;
    let height = (MARGIN + line + rows.len() as i32 * (h + GAP) + MARGIN) as u32;
    let mut rgb = canvas(width, height, out_png)?;
    let top = MARGIN + line;
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as i32 * (h + GAP);
        for (j, s) in r.shots.iter().enumerate() {
            blit(&mut rgb, width, s, (shots_x + cell(j as i32), y));
        }
        blit(&mut rgb, width, &r.landmarks, (landmarks_x, y));
        blit(&mut rgb, width, &r.generated, (generated_x, y));
        if let Some(real) = &r.real {
            blit(&mut rgb, width, real, (real_x, y));
        }
    }
    let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
    let style = font.color(&TEXT);
    let headings = [
        ("shots", shots_x),
        ("landmarks", landmarks_x),
        ("generated", generated_x),
        ("real", real_x),
    ];
    for (text, x) in headings {
        root.draw_text(text, &style, (x, MARGIN)).context("drawing a heading")?;
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + i as i32 * (h + GAP) + (h - line) / 2;
        root.draw_text(&r.label, &style, (MARGIN, y)).context("drawing a row label")?;
    }
    root.present().with_context(|| format!("cannot draw {}", out_png.display()))?;
    drop(root);
    write_png(out_png, width, height, rgb)
}
