//! ORL faces with dlib landmarks (the data layer of few-shot face generation) against the real
//! data under `$KSHOT_DATA` (else `<repo>/../shared/data`), the landmark rasteriser and the crop
//! on hand-made cases, a user's folder of faces, and the image metrics.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kshot::data::orl::{self, Faces, Landmarks, POINTS};
use kshot::data::{self, ImageSet};
use kshot::image_metrics::{l1, psnr, ssim};

const SIZE: usize = 64;

fn root() -> PathBuf {
    common::data_root()
}

/// All 400 faces at 64×64, loaded once per test binary.
fn faces() -> &'static Faces {
    static FACES: OnceLock<Faces> = OnceLock::new();
    FACES.get_or_init(|| orl::load_orl(&root(), SIZE).unwrap())
}

fn zip_entry(name: &str) -> Vec<u8> {
    let bytes = std::fs::read(root().join("orl-faces/att_faces.zip")).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = Vec::new();
    zip.by_name(name).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// The original landmark file's header and its rows by `file`.
fn tsv() -> (String, Vec<(String, String)>) {
    let text = std::fs::read_to_string(root().join("orl-faces/landmarks_dlib68.tsv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let rows = lines
        .map(|l| {
            let (file, rest) = l.split_once('\t').unwrap();
            (file.to_string(), rest.to_string())
        })
        .collect();
    (header, rows)
}

fn row(rows: &[(String, String)], file: &str) -> String {
    rows.iter().find(|(f, _)| f == file).unwrap().1.clone()
}

fn mean_y(points: &Landmarks, range: std::ops::RangeInclusive<usize>) -> f32 {
    let n = range.clone().count() as f32;
    range.map(|i| points[i][1]).sum::<f32>() / n
}

#[test]
fn orl_has_400_aligned_faces_of_40_people() {
    let faces = faces();
    assert_eq!(faces.size, SIZE);
    assert_eq!(faces.faces.len(), 400);
    let people = faces.people();
    let expected: Vec<String> = (1..=40).map(|i| format!("s{i}")).collect();
    assert_eq!(people, expected, "40 people in natural order");
    for p in &people {
        let of = faces.of_person(p);
        assert_eq!(of.iter().map(|f| f.index).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
        for f in of {
            assert_eq!(f.file, format!("att_faces/{p}/{}.pgm", f.index));
        }
    }
    // Jaw points may sit a little outside the crop (the crop is 1.25× the landmarks' box, moved
    // up by 10% of its height); every other point is inside.
    let margin = 3.0;
    for f in &faces.faces {
        assert_eq!(f.pixels.len(), SIZE * SIZE);
        for (k, p) in f.landmarks.iter().enumerate() {
            let m = if k <= 16 { margin } else { 0.0 };
            for v in p {
                assert!(
                    (-m..=SIZE as f32 - 1.0 + m).contains(v),
                    "{}: point {k} at {p:?} is outside the crop",
                    f.file
                );
            }
        }
        let eyes = mean_y(&f.landmarks, 36..=47);
        let mouth = mean_y(&f.landmarks, 48..=67);
        assert!(eyes + 5.0 < mouth, "{}: eyes at y {eyes}, mouth at y {mouth}", f.file);
        assert!(orl::inter_ocular(&f.landmarks) > 10.0, "{}: eyes too close", f.file);
        // Not a flat crop: a face has contrast.
        let (lo, hi) = (f.pixels.iter().min().unwrap(), f.pixels.iter().max().unwrap());
        assert!(hi - lo > 60, "{}: pixels span only {lo}..{hi}", f.file);
    }
}

#[test]
fn orl_decodes_the_pgm_pixels() {
    // The raw PGM's last pixel is the image's bottom-right; the decoded face is built from it.
    let bytes = zip_entry("att_faces/s1/1.pgm");
    assert!(bytes.starts_with(b"P5\n92 112\n255\n"));
    assert_eq!(bytes.len(), 14 + 92 * 112);
    let gray = image::load_from_memory(&bytes).unwrap().to_luma8();
    assert_eq!((gray.width(), gray.height()), (92, 112));
    assert_eq!(gray.as_raw()[..], bytes[14..]);
    // Aligning the decoded image by hand gives load_orl's face.
    let (_, rows) = tsv();
    let fields: Vec<f32> =
        row(&rows, "att_faces/s1/1.pgm").split('\t').skip(6).map(|v| v.parse().unwrap()).collect();
    let mut points = [[0f32; 2]; POINTS];
    for (k, p) in points.iter_mut().enumerate() {
        *p = [fields[2 * k], fields[2 * k + 1]];
    }
    let (pixels, landmarks) = orl::align(gray.as_raw(), 92, 112, &points, SIZE);
    let face = faces().of_person("s1")[0];
    assert_eq!(face.pixels, pixels);
    assert_eq!(face.landmarks, landmarks);
}

#[test]
fn the_people_split_is_disjoint_and_complete() {
    let (train, held) = (orl::meta_train_people(), orl::held_out_people());
    assert_eq!((train.len(), held.len()), (30, 10));
    let a: BTreeSet<&String> = train.iter().collect();
    let b: BTreeSet<&String> = held.iter().collect();
    assert!(a.is_disjoint(&b));
    let all: BTreeSet<String> = a.union(&b).map(|s| s.to_string()).collect();
    assert_eq!(all, faces().people().into_iter().collect::<BTreeSet<_>>());

    let d = data::dataset_defaults("orl-faces").unwrap();
    assert_eq!((d.split, d.image_size, d.channels), ("people", 64, 2));
    let s = data::split_subsets("orl-faces", "people").unwrap();
    assert_eq!((s.train, s.val, s.test), ("train", None, "test"));
    assert!(data::DATASETS.contains(&"orl-faces"));

    let load = |subset| data::load(&root(), "orl-faces", "people", subset, SIZE).unwrap();
    let (train_set, test_set) = (load("train"), load("test"));
    let names = |s: &ImageSet| s.classes.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&train_set), train);
    assert_eq!(names(&test_set), held);
    for name in names(&train_set) {
        assert!(!held.contains(&name), "held-out {name} in train");
    }
    for name in names(&test_set) {
        assert!(!train.contains(&name), "meta-training {name} in test");
    }
    assert_eq!(train_set.name, "orl-faces/people/train");
    assert_eq!(test_set.name, "orl-faces/people/test");
    for s in [&train_set, &test_set] {
        assert_eq!((s.channels, s.height, s.width), (2, SIZE, SIZE));
        assert!(s.classes.iter().all(|c| c.group == "orl"));
        assert!((0..s.classes.len()).all(|c| s.num_images(c) == 10));
    }
    // Channel 0 is the face, channel 1 its landmark raster, images in index order.
    let face = faces().of_person("s31")[3];
    let image = test_set.image(0, 3);
    assert_eq!(image[..SIZE * SIZE], face.pixels[..]);
    assert_eq!(image[SIZE * SIZE..], orl::rasterise(&face.landmarks, SIZE)[..]);

    let err = data::load(&root(), "orl-faces", "people", "val", SIZE).unwrap_err().to_string();
    assert!(err.contains("train") && err.contains("test"), "{err}");
    let err = data::split_subsets("orl-faces", "random").err().unwrap().to_string();
    assert!(err.contains("people"), "{err}");
}

/// Every point off the image (so parts draw nothing) except those set afterwards.
fn nowhere() -> Landmarks {
    [[-100.0, -100.0]; POINTS]
}

fn lit(points: &Landmarks, size: usize) -> BTreeSet<(usize, usize)> {
    let img = orl::rasterise(points, size);
    assert!(img.iter().all(|&v| v == 0 || v == 255));
    (0..size * size).filter(|&i| img[i] == 255).map(|i| (i % size, i / size)).collect()
}

fn set(pixels: impl IntoIterator<Item = (usize, usize)>) -> BTreeSet<(usize, usize)> {
    pixels.into_iter().collect()
}

#[test]
fn rasterise_draws_one_segment_exactly() {
    let mut p = nowhere();
    p[0] = [2.0, 3.0];
    for q in &mut p[1..=16] {
        *q = [6.0, 3.0];
    }
    assert_eq!(lit(&p, 20), set((2..=6).map(|x| (x, 3))));
    // Points are rounded to the nearest pixel.
    p[0] = [2.4, 2.6];
    assert_eq!(lit(&p, 20), set((2..=6).map(|x| (x, 3))));
    // A diagonal lights one pixel per step of its longer axis.
    p[0] = [2.0, 1.0];
    // (2,1) → (6,3): y = 1 + t/2 for t = 0..=4, halves rounded away from the start.
    assert_eq!(lit(&p, 20), set([(2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]));
}

#[test]
fn rasterise_leaves_open_parts_open() {
    // Jaw: (2,3) → (6,3) → (6,8); closing it would add the diagonal (6,8) → (2,3).
    let mut p = nowhere();
    p[0] = [2.0, 3.0];
    for q in &mut p[1..=15] {
        *q = [6.0, 3.0];
    }
    p[16] = [6.0, 8.0];
    let expected = set((2..=6).map(|x| (x, 3)).chain((3..=8).map(|y| (6, y))));
    assert_eq!(lit(&p, 20), expected);
}

#[test]
fn rasterise_closes_closed_parts() {
    // Right eye: (10,10) → (14,10) → (14,14), then back to (10,10) along the diagonal.
    let mut p = nowhere();
    p[36] = [10.0, 10.0];
    p[37] = [14.0, 10.0];
    for q in &mut p[38..=41] {
        *q = [14.0, 14.0];
    }
    let expected = set((10..=14)
        .map(|x| (x, 10))
        .chain((10..=14).map(|y| (14, y)))
        .chain((10..=14).map(|d| (d, d))));
    assert_eq!(lit(&p, 20), expected);
}

#[test]
fn rasterise_does_not_join_parts() {
    // Each part collapsed to one pixel: joined parts would draw lines between them.
    let mut p = nowhere();
    let spots: [(usize, usize, [f32; 2]); 9] = [
        (0, 16, [1.0, 1.0]),
        (17, 21, [1.0, 15.0]),
        (22, 26, [5.0, 15.0]),
        (27, 30, [10.0, 17.0]),
        (31, 35, [16.0, 17.0]),
        (36, 41, [3.0, 8.0]),
        (42, 47, [9.0, 8.0]),
        (48, 59, [9.0, 12.0]),
        (60, 67, [15.0, 12.0]),
    ];
    for (first, last, at) in spots {
        for q in &mut p[first..=last] {
            *q = at;
        }
    }
    let expected = set(spots.iter().map(|s| (s.2[0] as usize, s.2[1] as usize)));
    assert_eq!(lit(&p, 20), expected);
}

#[test]
fn rasterise_clips_to_the_image() {
    let mut p = nowhere();
    p[17] = [-5.0, 2.0];
    for q in &mut p[18..=21] {
        *q = [25.0, 2.0];
    }
    assert_eq!(lit(&p, 20), set((0..20).map(|x| (x, 2))));
    // Far-off points are clipped without walking the whole segment; non-finite ones draw nothing.
    let mut p = nowhere();
    p[0] = [-1e30, 5.0];
    p[1] = [-1e30, 9.0];
    p[2] = [f32::NAN, 5.0];
    p[17] = [-1e30, 5.0];
    for q in &mut p[18..=21] {
        *q = [1e30, 5.0];
    }
    assert_eq!(lit(&p, 20), set((0..20).map(|x| (x, 5))));
}

/// A dark 92×112 image with a bright 3×3 square at each of `points` (rounded), like a face.
fn dotted(points: &Landmarks) -> Vec<u8> {
    let (w, h) = (92usize, 112usize);
    let mut img = vec![20u8; w * h];
    for p in points {
        let (x, y) = (p[0].round() as i64, p[1].round() as i64);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (x, y) = (x + dx, y + dy);
                if (0..w as i64).contains(&x) && (0..h as i64).contains(&y) {
                    img[y as usize * w + x as usize] = 240;
                }
            }
        }
    }
    img
}

/// 68 points spread over a 60×70 box from (16, 30), not on a regular grid.
fn spread_points() -> Landmarks {
    let mut p = [[0f32; 2]; POINTS];
    for (k, q) in p.iter_mut().enumerate() {
        *q = [16.0 + ((k * 37) % 61) as f32, 30.0 + ((k * 23) % 71) as f32];
    }
    p
}

#[test]
fn align_maps_landmarks_onto_their_pixels() {
    let points = spread_points();
    let img = dotted(&points);
    for size in [64, 48, 128, 20] {
        let (crop, mapped) = orl::align(&img, 92, 112, &points, size);
        assert_eq!(crop.len(), size * size);
        // Whether a crop pixel within 1 px of `p` is bright (the background is 20, dots 240).
        let bright_near = |p: [f32; 2]| {
            let (x, y) = (p[0].round() as i64, p[1].round() as i64);
            (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (x + dx, y + dy))).any(|(x, y)| {
                (0..size as i64).contains(&x)
                    && (0..size as i64).contains(&y)
                    && crop[y as usize * size + x as usize] > 60
            })
        };
        for (k, &p) in mapped.iter().enumerate() {
            assert!(bright_near(p), "size {size}: point {k} maps to {p:?}, not onto its dot");
        }
    }
}

#[test]
fn align_puts_each_dot_at_its_mapped_landmark() {
    // One bright source pixel at a time: the crop's brightest pixel is within 1 px of where the
    // landmark on it maps (points at integer pixels, the crop square set by all of them).
    let points = spread_points();
    for size in [64, 48, 128, 20] {
        for k in [0, 8, 16, 19, 30, 36, 45, 48, 57, 67] {
            let mut img = vec![20u8; 92 * 112];
            img[points[k][1] as usize * 92 + points[k][0] as usize] = 240;
            let (crop, mapped) = orl::align(&img, 92, 112, &points, size);
            let best = (0..crop.len()).max_by_key(|&i| (crop[i], std::cmp::Reverse(i))).unwrap();
            let (x, y) = ((best % size) as f32, (best / size) as f32);
            let p = mapped[k];
            assert!(
                (x - p[0]).abs() <= 1.0 && (y - p[1]).abs() <= 1.0,
                "size {size}: point {k} maps to {p:?}, its dot is brightest at ({x}, {y})"
            );
        }
    }
}

#[test]
fn align_crops_the_documented_square() {
    let points = spread_points();
    // Box x 16..76, y 30..100: centre (46, 65 − 7), side 1.25 × 70.
    let (cx, cy, side) = orl::crop_square(&points, 92, 112);
    assert_eq!((cx, cy, side), (46.0, 58.0, 87.5));
    // At 70×70 (1.25 source pixels a crop pixel) the box's centre maps to the crop's centre
    // (34.5, 34.5) moved down by 7 / 1.25 and the box keeps its shape, scaled by 1 / 1.25.
    let (_, mapped) = orl::align(&dotted(&points), 92, 112, &points, 70);
    let extent = |k: usize| {
        let lo = mapped.iter().map(|p| p[k]).fold(f32::MAX, f32::min);
        let hi = mapped.iter().map(|p| p[k]).fold(f32::MIN, f32::max);
        ((lo + hi) / 2.0, hi - lo)
    };
    let ((x, w), (y, h)) = (extent(0), extent(1));
    for (got, want) in [(x, 34.5), (w, 48.0), (y, 34.5 + 5.6), (h, 56.0)] {
        assert!((got - want).abs() < 1e-4, "{got} ≠ {want}");
    }
    // Pixels outside the image repeat its edge: a crop around a point at the corner.
    let mut corner = [[0f32; 2]; POINTS];
    corner[1] = [4.0, 4.0];
    let img: Vec<u8> = (0..92 * 112).map(|i| if i == 0 { 200 } else { 10 }).collect();
    let (crop, _) = orl::align(&img, 92, 112, &corner, 9);
    assert_eq!(crop[0], 200, "the top-left corner of the crop lies outside: it is pixel (0,0)");
}

fn copy_into(dir: &Path, name: &str, entry: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, zip_entry(entry)).unwrap();
}

#[test]
fn load_folder_matches_rows_by_path_then_name() {
    let tmp = common::tempdir("orl-folder");
    let dir = tmp.path().join("me");
    copy_into(&dir, "a.pgm", "att_faces/s31/1.pgm");
    copy_into(&dir, "b.pgm", "att_faces/s31/2.pgm");
    copy_into(&dir, "more/c.pgm", "att_faces/s31/3.pgm");
    let (header, rows) = tsv();
    let tsv_path = tmp.path().join("points.tsv");
    let write = |lines: &[(&str, &str)]| {
        let mut text = format!("{header}\n");
        for (file, source) in lines {
            text += &format!("{file}\t{}\n", row(&rows, source));
        }
        std::fs::write(&tsv_path, text).unwrap();
    };
    // By relative path, by file name, and by a nested relative path.
    write(&[
        ("a.pgm", "att_faces/s31/1.pgm"),
        ("elsewhere/b.pgm", "att_faces/s31/2.pgm"),
        ("more/c.pgm", "att_faces/s31/3.pgm"),
    ]);
    let faces = orl::load_folder(&dir, &tsv_path, SIZE).unwrap();
    assert_eq!(faces.people(), vec!["me".to_string()]);
    let files: Vec<&str> = faces.faces.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(files, ["a.pgm", "b.pgm", "more/c.pgm"]);
    let orl31 = crate::faces().of_person("s31");
    for (i, f) in faces.of_person("me").into_iter().enumerate() {
        assert_eq!(f.index, i + 1);
        assert_eq!(f.pixels, orl31[i].pixels, "{}", f.file);
        assert_eq!(f.landmarks, orl31[i].landmarks, "{}", f.file);
    }
    let set = faces.to_image_set("mine", &faces.people()).unwrap();
    assert_eq!((set.classes.len(), set.num_images(0), set.channels), (1, 3, 2));

    // A missing row names the image.
    write(&[("a.pgm", "att_faces/s31/1.pgm"), ("b.pgm", "att_faces/s31/2.pgm")]);
    let err = orl::load_folder(&dir, &tsv_path, SIZE).unwrap_err().to_string();
    assert!(err.contains("c.pgm") && err.contains("points.tsv"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    // A bad number names the row.
    let mut fields: Vec<String> =
        row(&rows, "att_faces/s31/1.pgm").split('\t').map(str::to_string).collect();
    fields[6] = "abc".into(); // x0
    std::fs::write(&tsv_path, format!("{header}\na.pgm\t{}\n", fields.join("\t"))).unwrap();
    let err = orl::load_folder(&dir, &tsv_path, SIZE).unwrap_err().to_string();
    assert!(err.contains("points.tsv:2") && err.contains("abc") && err.contains("x0"), "{err}");
}

#[test]
fn load_orl_names_an_image_without_landmarks() {
    let tmp = common::tempdir("orl-root");
    let dir = tmp.path().join("orl-faces");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("orl-faces/att_faces.zip"), dir.join("att_faces.zip")).unwrap();
    let (header, rows) = tsv();
    let text: String = std::iter::once(header)
        .chain(
            rows.iter()
                .filter(|(f, _)| f != "att_faces/s7/5.pgm")
                .map(|(f, r)| format!("{f}\t{r}")),
        )
        .map(|l| l + "\n")
        .collect();
    std::fs::write(dir.join("landmarks_dlib68.tsv"), text).unwrap();
    let err = orl::load_orl(tmp.path(), SIZE).unwrap_err().to_string();
    assert!(err.contains("att_faces/s7/5.pgm") && err.contains("landmarks_dlib68.tsv"), "{err}");
    assert!(!err.contains('\n'), "{err}");

    let err = orl::load_orl(&tmp.path().join("nowhere"), SIZE).unwrap_err().to_string();
    assert!(err.contains("att_faces.zip"), "{err}");
}

#[test]
fn l1_and_psnr_on_hand_values() {
    let a = [0.0f32, 0.5, 1.0, 0.25];
    let b = [0.5f32, 0.5, 0.5, 0.25];
    assert!((l1(&a, &b) - 0.25).abs() < 1e-12);
    // MSE = (0.25 + 0 + 0.25 + 0) / 4 = 0.125 → 10·log10(8).
    assert!((psnr(&a, &b) - 10.0 * 8f64.log10()).abs() < 1e-9);
    assert_eq!(psnr(&a, &a), f64::INFINITY);
    assert_eq!(l1(&a, &a), 0.0);
    assert!((psnr(&[0.0; 9], &[0.1; 9]) - 20.0).abs() < 1e-5);
}

/// The fixed 16×13 test images of the SSIM reference values.
fn ssim_images() -> [Vec<f32>; 3] {
    let (w, h) = (16, 13);
    let at = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
        (0..h).flat_map(|r| (0..w).map(move |c| (r, c))).map(|(r, c)| f(r, c)).collect()
    };
    let a = at(&|r, c| ((r * 7 + c * 13) % 17) as f32 / 16.0);
    let b = at(&|r, c| ((r * r + 3 * c) % 11) as f32 / 16.0);
    let d = at(&|r, c| {
        let v = ((r * 7 + c * 13) % 17) as f32 / 16.0 + (((r * 5 + c * 3) % 7) as f32 - 3.0) / 32.0;
        v.clamp(0.0, 1.0)
    });
    [a, b, d]
}

#[test]
fn ssim_matches_scikit_image() {
    // Expected values from scikit-image 0.26.0 (pip, Python 3.11):
    //   r, c = np.mgrid[0:13, 0:16]
    //   a = ((r*7 + c*13) % 17) / 16;  b = ((r*r + 3*c) % 11) / 16
    //   d = np.clip(a + ((r*5 + c*3) % 7 - 3) / 32, 0, 1)
    //   structural_similarity(x, y, data_range=1, gaussian_weights=True, sigma=1.5,
    //                         use_sample_covariance=False)
    let [a, b, d] = ssim_images();
    for (x, y, expected) in
        [(&a, &b, 0.14052382869427396), (&a, &d, 0.9799831222060228), (&b, &d, 0.14385526970824702)]
    {
        let got = ssim(x, y, 16, 13);
        assert!((got - expected).abs() < 1e-6, "ssim {got}, scikit-image {expected}");
        assert!((ssim(y, x, 16, 13) - got).abs() < 1e-12, "symmetric");
    }
}

#[test]
fn ssim_properties() {
    let [a, b, _] = ssim_images();
    assert!((ssim(&a, &a, 16, 13) - 1.0).abs() < 1e-12);
    // Flat images p and q: (2pq + C1) / (p² + q² + C1), C1 = 0.01² (scikit-image: 0.60006399).
    let (p, q) = (0.25f32, 0.75f32);
    let c1 = 1e-4;
    let closed = (2.0 * 0.25 * 0.75 + c1) / (0.25f64.powi(2) + 0.75f64.powi(2) + c1);
    assert!((ssim(&[p; 144], &[q; 144], 12, 12) - closed).abs() < 1e-12);
    assert!((closed - 0.6000639897616381).abs() < 1e-12);
    // More noise, lower SSIM.
    let noisy = |amount: f32| -> Vec<f32> {
        a.iter()
            .enumerate()
            .map(|(i, &v)| {
                let n = ((i * 2654435761) % 1000) as f32 / 1000.0 - 0.5;
                (v + amount * n).clamp(0.0, 1.0)
            })
            .collect()
    };
    let (s1, s2) = (ssim(&a, &noisy(0.1), 16, 13), ssim(&a, &noisy(0.4), 16, 13));
    assert!(1.0 > s1 && s1 > s2, "{s1} {s2}");
    assert!(ssim(&a, &b, 16, 13) < s2);
}
