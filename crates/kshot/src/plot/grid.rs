//! The prediction grid of `kshot predict --grid`: support images in rows by class, then the
//! queries, each captioned with its prediction.

use std::path::Path;

use anyhow::{bail, Context};
use plotters::prelude::*;

use super::{canvas, register_font, write_png, GridQuery, PlotImage, FAMILY};

/// `kshot predict --grid`: the support images in rows by class (class name at the row start),
/// then the queries each captioned with its label, as one PNG. Images are scaled up (nearest) to
/// at least 64 px on a side.
pub fn prediction_grid(
    support: &[(String, Vec<PlotImage>)],
    queries: &[GridQuery],
    out_png: &Path,
) -> anyhow::Result<()> {
    let named = |what: String, image: &PlotImage| check(image, &what, out_png);
    for (class, images) in support {
        for (i, image) in images.iter().enumerate() {
            named(format!("support image {} of class {class:?}", i + 1), image)?;
        }
    }
    for (i, q) in queries.iter().enumerate() {
        named(format!("query {}", i + 1), &q.image)?;
    }
    if support.iter().all(|(_, images)| images.is_empty()) && queries.is_empty() {
        bail!("cannot draw {}: there are no support or query images", out_png.display());
    }
    register_font()?;
    let layout = Layout::new(support, queries)?;
    let mut rgb = canvas(layout.width, layout.height, out_png)?;
    draw(&mut rgb, &layout, support, queries)
        .with_context(|| format!("cannot draw {}", out_png.display()))?;
    write_png(out_png, layout.width, layout.height, rgb)
}

fn check(image: &PlotImage, what: &str, out_png: &Path) -> anyhow::Result<()> {
    let PlotImage { channels: c, height: h, width: w, .. } = *image;
    if c != 1 && c != 3 {
        bail!(
            "cannot draw {}: {what} has {c} channels; give 1 (gray) or 3 (RGB)",
            out_png.display()
        );
    }
    if h == 0 || w == 0 || image.pixels.len() != c * h * w {
        bail!(
            "cannot draw {}: {what} has {} pixel values where {c}×{h}×{w} needs {}",
            out_png.display(),
            image.pixels.len(),
            c * h * w
        );
    }
    Ok(())
}

/// Images are drawn at least this many pixels on their shorter side.
const MIN_SIDE: usize = 64;
const GAP: i32 = 8;
const MARGIN: i32 = 16;
const FONT: f64 = 16.0;
const HEADING: f64 = 19.0;
/// Queries per row at most, unless the support rows are wider.
const QUERY_COLUMNS: usize = 8;

const TEXT: RGBColor = RGBColor(20, 20, 20);
const RIGHT: RGBColor = RGBColor(0, 130, 0);
const WRONG: RGBColor = RGBColor(200, 0, 0);

/// Where everything goes, in pixels.
struct Layout {
    width: u32,
    height: u32,
    /// Size of the box each image is drawn in.
    cell: (i32, i32),
    label_width: i32,
    line: i32,
    heading: i32,
    query_width: i32,
    query_columns: usize,
}

impl Layout {
    fn new(support: &[(String, Vec<PlotImage>)], queries: &[GridQuery]) -> anyhow::Result<Layout> {
        let all = support.iter().flat_map(|(_, s)| s).chain(queries.iter().map(|q| &q.image));
        let cell = all.fold((1, 1), |(w, h), image| {
            let s = scale(image) as i32;
            (w.max(image.width as i32 * s), h.max(image.height as i32 * s))
        });
        let font = (FAMILY, FONT).into_font();
        let text_width = |t: &str| font.box_size(t).map(|(w, _)| w as i32);
        let mut label_width = 0;
        for (class, _) in support {
            label_width = label_width.max(text_width(class)?);
        }
        let label_width = label_width.min(400) + GAP;
        let mut caption = 0;
        for q in queries {
            caption = caption.max(text_width(&q.label)?);
        }
        let query_width = cell.0.max(caption) + 2 * GAP;
        let widest = support.iter().map(|(_, s)| s.len()).max().unwrap_or(0) as i32;
        let support_width = label_width + widest * (cell.0 + GAP);
        let fit = (support_width / query_width).max(0) as usize;
        let query_columns = queries.len().clamp(1, QUERY_COLUMNS.max(fit));
        let query_rows = queries.len().div_ceil(query_columns) as i32;
        let line = (1.4 * FONT) as i32;
        let heading = (1.6 * HEADING) as i32;
        let mut height = MARGIN;
        if !support.is_empty() {
            height += heading + support.len() as i32 * (cell.1 + GAP);
        }
        if !queries.is_empty() {
            height += heading + query_rows * (cell.1 + line + GAP);
        }
        let width = support_width.max(query_columns as i32 * query_width).max(200);
        Ok(Layout {
            width: (width + 2 * MARGIN) as u32,
            height: (height + MARGIN) as u32,
            cell,
            label_width,
            line,
            heading,
            query_width,
            query_columns,
        })
    }
}

/// The integer factor that brings an image's shorter side to at least [`MIN_SIDE`].
fn scale(image: &PlotImage) -> usize {
    MIN_SIDE.div_ceil(image.height.min(image.width).max(1)).max(1)
}

fn draw(
    rgb: &mut [u8],
    l: &Layout,
    support: &[(String, Vec<PlotImage>)],
    queries: &[GridQuery],
) -> anyhow::Result<()> {
    let mut texts: Vec<(String, (i32, i32), TextStyle)> = Vec::new();
    let heading = (FAMILY, HEADING).into_font().color(&TEXT);
    let font = (FAMILY, FONT).into_font();
    let mut y = MARGIN;
    if !support.is_empty() {
        texts.push(("support".into(), (MARGIN, y), heading.clone()));
        y += l.heading;
        for (class, images) in support {
            let middle = y + (l.cell.1 - l.line) / 2;
            texts.push((class.clone(), (MARGIN, middle), font.color(&TEXT)));
            for (j, image) in images.iter().enumerate() {
                let x = MARGIN + l.label_width + j as i32 * (l.cell.0 + GAP);
                blit(rgb, l.width, image, (x, y));
            }
            y += l.cell.1 + GAP;
        }
    }
    if !queries.is_empty() {
        texts.push(("queries".into(), (MARGIN, y), heading));
        y += l.heading;
        for (i, q) in queries.iter().enumerate() {
            let (row, col) = ((i / l.query_columns) as i32, (i % l.query_columns) as i32);
            let x = MARGIN + col * l.query_width;
            let top = y + row * (l.cell.1 + l.line + GAP);
            blit(rgb, l.width, &q.image, (x, top));
            let colour = match q.correct {
                Some(true) => RIGHT,
                Some(false) => WRONG,
                None => TEXT,
            };
            if q.correct.is_some() {
                frame(rgb, l.width, &q.image, (x, top), colour);
            }
            texts.push((q.label.clone(), (x, top + l.cell.1 + 2), font.color(&colour)));
        }
    }
    let root = BitMapBackend::with_buffer(rgb, (l.width, l.height)).into_drawing_area();
    for (text, at, style) in &texts {
        root.draw_text(text, style, *at)?;
    }
    root.present()?;
    Ok(())
}

/// Draws `image` scaled up by [`scale`] (nearest) with its top-left corner at `at`.
pub(super) fn blit(rgb: &mut [u8], canvas_width: u32, image: &PlotImage, at: (i32, i32)) {
    let s = scale(image);
    let (h, w, plane) = (image.height, image.width, image.height * image.width);
    for y in 0..h * s {
        for x in 0..w * s {
            let src = (y / s) * w + x / s;
            let value = |c: usize| image.pixels[(c % image.channels) * plane + src];
            let dst = ((at.1 as usize + y) * canvas_width as usize + at.0 as usize + x) * 3;
            rgb[dst..dst + 3].copy_from_slice(&[value(0), value(1), value(2)]);
        }
    }
}

/// A 2-pixel frame in `colour` just inside the edge of the drawn image.
fn frame(rgb: &mut [u8], canvas_width: u32, image: &PlotImage, at: (i32, i32), colour: RGBColor) {
    let s = scale(image);
    let (h, w) = (image.height * s, image.width * s);
    for y in 0..h {
        for x in 0..w {
            if x < 2 || y < 2 || x + 2 >= w || y + 2 >= h {
                let dst = ((at.1 as usize + y) * canvas_width as usize + at.0 as usize + x) * 3;
                rgb[dst..dst + 3].copy_from_slice(&[colour.0, colour.1, colour.2]);
            }
        }
    }
}
