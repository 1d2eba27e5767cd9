//! The figures of `kshot::plot` are real PNGs of the requested size with something drawn in them.

use std::path::Path;

use kshot::plot::{learning_curves, prediction_grid, GridQuery, PlotImage};

const HEADER: &str = "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95,val_loss,event";

/// A run's metrics: 200 episodes, a learning rate halved at 100, validation every 50.
fn metrics(dir: &Path) -> std::path::PathBuf {
    let mut text = format!("{HEADER}\n");
    for e in 1..=200u32 {
        let loss = 2.0 / f64::from(e).sqrt() + 0.1 * f64::from(e % 7) / 7.0;
        let acc = 1.0 - loss / 2.5;
        let lr = if e <= 100 { 1e-3 } else { 5e-4 };
        let val = if e % 50 == 0 {
            format!("{:.5},{:.5},{:.6},best", acc - 0.05, 0.02, loss + 0.1)
        } else {
            ",,,".into()
        };
        text.push_str(&format!("{e},{loss:.6},{acc:.5},{lr:e},{:.3},{val}\n", 0.01 * f64::from(e)));
    }
    let path = dir.join("metrics.csv");
    std::fs::write(&path, text).unwrap();
    path
}

fn decode(path: &Path) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap().to_rgb8()
}

fn distinct_colours(image: &image::RgbImage) -> usize {
    let mut colours: Vec<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    colours.len()
}

#[test]
fn learning_curves_are_a_png_of_the_requested_size() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = metrics(tmp.path());
    let out = tmp.path().join("curves.png");
    learning_curves(&csv, &out, 900, 640).unwrap();
    let image = decode(&out);
    assert_eq!(image.dimensions(), (900, 640));
    // Text, axes, curves and the CI band: many colours, not a blank canvas.
    assert!(distinct_colours(&image) > 20, "{} colours", distinct_colours(&image));
    // The atomic write leaves no temporary file behind.
    let names: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn learning_curves_tolerate_missing_columns_and_cells() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("metrics.csv");
    std::fs::write(&csv, "episode,loss,accuracy\n1,2.0,0.2\n2,,0.3\n3,NaN,0.4\n4,1.5\n").unwrap();
    let out = tmp.path().join("curves.png");
    learning_curves(&csv, &out, 400, 300).unwrap();
    assert_eq!(decode(&out).dimensions(), (400, 300));
}

#[test]
fn a_metrics_file_without_rows_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("metrics.csv");
    std::fs::write(&csv, format!("{HEADER}\n")).unwrap();
    let out = tmp.path().join("curves.png");
    let err = format!("{:#}", learning_curves(&csv, &out, 800, 600).unwrap_err());
    assert_eq!(
        err,
        format!(
            "{} has no training rows yet; plot again once training has logged a step",
            csv.display()
        )
    );
    assert!(!out.exists());
}

fn image(channels: usize, side: usize, seed: usize) -> PlotImage {
    let pixels = (0..channels * side * side).map(|i| ((i * 37 + seed * 91) % 256) as u8).collect();
    PlotImage { pixels, channels, height: side, width: side }
}

fn grid(queries: usize, out: &Path) -> image::RgbImage {
    let support: Vec<(String, Vec<PlotImage>)> = ["cat", "dog", "horse"]
        .iter()
        .enumerate()
        .map(|(c, name)| (name.to_string(), vec![image(3, 28, 2 * c), image(3, 28, 2 * c + 1)]))
        .collect();
    let queries: Vec<GridQuery> = (0..queries)
        .map(|i| GridQuery {
            image: image(3, 28, 10 + i),
            label: if i % 3 == 2 { "none of these (0.41)".into() } else { format!("dog 0.9{i}") },
            correct: [Some(true), Some(false), None][i % 3],
        })
        .collect();
    prediction_grid(&support, &queries, out).unwrap();
    decode(out)
}

#[test]
fn the_prediction_grid_grows_with_the_queries() {
    let tmp = tempfile::tempdir().unwrap();
    let four = grid(4, &tmp.path().join("four.png"));
    let twenty = grid(20, &tmp.path().join("twenty.png"));
    // 3 rows of two 28 px images scaled ×3 to 84 px, then the queries.
    assert!(four.height() > 3 * 84 + 84, "{:?}", four.dimensions());
    assert!(
        twenty.height() > four.height(),
        "{:?} vs {:?}",
        twenty.dimensions(),
        four.dimensions()
    );
    assert!(distinct_colours(&four) > 100);
    // The first query is right: its frame is green; the second is wrong: red.
    let has = |img: &image::RgbImage, rgb: [u8; 3]| img.pixels().any(|p| p.0 == rgb);
    assert!(has(&four, [0, 130, 0]) && has(&four, [200, 0, 0]));
}

#[test]
fn a_gray_image_of_the_wrong_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("grid.png");
    let mut bad = image(1, 28, 0);
    bad.pixels.pop();
    let err = prediction_grid(&[("a".into(), vec![image(1, 28, 1), bad])], &[], &out).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("support image 2 of class \"a\"") && err.contains("783"), "{err}");
    assert!(!out.exists());
    prediction_grid(&[("a".into(), vec![image(1, 28, 1)])], &[], &out).unwrap();
    let gray = decode(&out);
    assert!(gray.width() >= 84 && gray.height() >= 84);
}
