//! miniImageNet loader (Ravi & Larochelle split) against the offline copy of the real data, and
//! its error paths on small synthetic data roots.
//!
//! Data root: `$KSHOT_DATA`, else `<repo>/../shared/data`. Counts come from the catalog (nothing
//! decoded); only the val subset is decoded (at 84 and at 32), through the shared test cache.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kshot::data::cache::Cache;
use kshot::data::mini_imagenet::{self, catalog, Subset};
use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping, ImageSet};
use kshot::Device;

fn root() -> PathBuf {
    common::data_root()
}

/// The full train set is here when its zip (or an images/ folder) is; the shared copy has part 1.
fn full_train_present() -> bool {
    let dir = mini_imagenet::dataset_dir(&root());
    dir.join("images_train.zip").is_file() || dir.join("images").is_dir()
}

/// The real val subset at `size`, loaded once per test binary through the shared cache.
fn val(size: usize) -> &'static ImageSet {
    static V84: OnceLock<ImageSet> = OnceLock::new();
    static V32: OnceLock<ImageSet> = OnceLock::new();
    let cell = match size {
        84 => &V84,
        32 => &V32,
        _ => unreachable!("val({size})"),
    };
    cell.get_or_init(|| {
        common::use_shared_data_cache();
        data::load(&root(), "mini-imagenet", "ravi", "val", size).unwrap()
    })
}

fn assert_one_line(msg: &str) {
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
}

#[test]
fn subset_counts_and_disjoint_classes() {
    let root = root();
    let test = catalog(&root, Subset::Test).unwrap();
    let val = catalog(&root, Subset::Val).unwrap();
    let train = catalog(&root, Subset::Train).unwrap();
    for (c, classes, per_class) in [(&test, 20, 600), (&val, 16, 600)] {
        assert_eq!(c.classes.len(), classes, "{}", c.subset);
        assert!(
            c.classes.iter().all(|k| k.files.len() == per_class && k.listed == per_class),
            "{}",
            c.subset
        );
        assert_eq!((c.missing, c.warning.as_deref()), (0, None), "{}", c.subset);
        assert!(
            c.classes.iter().all(|k| k.name.starts_with('n') && k.name.len() == 9),
            "labels are WordNet ids"
        );
    }
    assert_eq!(train.classes.len(), 64);
    assert_eq!(train.listed, 64 * 600);
    if full_train_present() {
        assert_eq!((train.total_images(), train.warning.as_deref()), (64 * 600, None));
    } else {
        // images_train_part1.zip: the first 300 file names of each class, in train.csv order.
        assert!(train.classes.iter().all(|k| k.files.len() == 300 && k.listed == 600));
        assert_eq!(train.missing, 64 * 300);
        let w = train.warning.as_deref().expect("a partial train set warns");
        assert!(
            w.contains("partial")
                && w.contains("300 of 600 per class")
                && w.contains("images_train.zip"),
            "{w}"
        );
        assert_one_line(w);
    }
    // Disjoint classes; trainval is train + val.
    let names = |c: &mini_imagenet::Catalog| {
        c.classes.iter().map(|k| k.name.clone()).collect::<HashSet<_>>()
    };
    let (tr, va, te) = (names(&train), names(&val), names(&test));
    assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
    let trainval = catalog(&root, Subset::Trainval).unwrap();
    assert_eq!(names(&trainval), tr.union(&va).cloned().collect());
    assert_eq!(trainval.total_images(), train.total_images() + val.total_images());
    // Each subset's cache depends on the zips that hold its images, not on the others.
    if mini_imagenet::dataset_dir(&root).join("images").is_dir() {
        return; // an images/ folder comes first
    }
    let zip_names = |c: &mini_imagenet::Catalog| {
        c.used_sources()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(zip_names(&val), ["images_val.zip"]);
    assert_eq!(zip_names(&test), ["images_test.zip"]);
}

#[test]
fn val_decodes_to_rgb_84() {
    let set = val(84);
    assert_eq!((set.channels, set.height, set.width), (3, 84, 84));
    assert_eq!((set.classes.len(), set.total_images()), (16, 16 * 600));
    assert_eq!(set.name, "mini-imagenet/ravi/val");
    assert!(set.classes.iter().all(|c| c.group == "mini-imagenet"));
    let expected = catalog(&root(), Subset::Val).unwrap();
    let labels: Vec<&str> = expected.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(set.classes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), labels);

    // Natural photos: mid-range means, real contrast, colour (the channels differ).
    let stats = |v: &[u8]| {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let all: Vec<u8> =
        set.classes.iter().flat_map(|c| c.pixels.iter().step_by(7).copied()).collect();
    let (mean, std) = stats(&all);
    assert!(
        (80.0..180.0).contains(&mean) && (40.0..100.0).contains(&std),
        "mean {mean:.1} std {std:.1}"
    );
    let img = set.image(0, 0);
    assert_eq!(img.len(), 3 * 84 * 84);
    let plane = 84 * 84;
    let (r, g, b) = (stats(&img[..plane]), stats(&img[plane..2 * plane]), stats(&img[2 * plane..]));
    assert!(r.1 > 5.0 && g.1 > 5.0 && b.1 > 5.0, "flat image: {r:?} {g:?} {b:?}");
    let colourful = (0..set.classes.len()).any(|c| {
        let im = set.image(c, 0);
        im[..plane] != im[plane..2 * plane] || im[plane..2 * plane] != im[2 * plane..]
    });
    assert!(colourful, "every image is gray: channels not decoded as RGB");

    // The same pixels as decoding that file straight from the images/ folder or the zip.
    let dir = mini_imagenet::dataset_dir(&root());
    let file = &expected.classes[0].files[0];
    let bytes = std::fs::read(dir.join("images").join(file)).unwrap_or_else(|_| {
        let mut zip =
            zip::ZipArchive::new(std::fs::File::open(dir.join("images_val.zip")).unwrap()).unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut zip.by_name(&format!("images/{file}")).unwrap(),
            &mut bytes,
        )
        .unwrap();
        bytes
    });
    let mut direct = vec![0u8; 3 * plane];
    mini_imagenet::preprocess(&bytes, 84, &mut direct).unwrap();
    assert_eq!(direct, img);
}

#[test]
fn val_resized_to_32() {
    let small = val(32);
    assert_eq!((small.channels, small.height, small.width), (3, 32, 32));
    assert_eq!((small.classes.len(), small.total_images()), (16, 16 * 600));
    // Downscaling keeps each channel's mean (within a few levels: ringing is clamped).
    let big = val(84);
    for (c, i) in [(0, 0), (5, 17), (15, 599)] {
        let (a, b) = (big.image(c, i), small.image(c, i));
        for ch in 0..3 {
            let mean = |v: &[u8]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let (ma, mb) = (
                mean(&a[ch * 84 * 84..(ch + 1) * 84 * 84]),
                mean(&b[ch * 32 * 32..(ch + 1) * 32 * 32]),
            );
            assert!((ma - mb).abs() < 3.0, "class {c} image {i} channel {ch}: {ma:.1} vs {mb:.1}");
        }
    }
}

#[test]
fn five_way_one_shot_episode() {
    let set = val(84);
    let sampler = EpisodeSampler::new(set, EpisodeSpec::new(5, 1, 15), Grouping::Any).unwrap();
    let ep = sampler.episode(0, 0, &Device::Cpu).unwrap();
    assert_eq!(ep.support.dims(), &[5, 3, 84, 84]);
    assert_eq!(ep.query.dims(), &[75, 3, 84, 84]);
    let v: Vec<f32> = ep.support.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    assert!(v.iter().any(|&x| x > 0.0));
}

#[test]
fn names_splits_and_subsets() {
    let s = data::split_subsets("mini-imagenet", "ravi").unwrap();
    assert_eq!((s.train, s.val, s.test), ("train", Some("val"), "test"));
    let err = data::split_subsets("mini-imagenet", "vinyals").err().unwrap().to_string();
    assert!(err.contains("ravi"), "{err}");
    let err = data::split_subsets("imagenet", "ravi").err().unwrap().to_string();
    assert!(err.contains("omniglot") && err.contains("mini-imagenet"), "{err}");
    let d = data::dataset_defaults("mini-imagenet").unwrap();
    assert_eq!((d.split, d.image_size, d.channels), ("ravi", 84, 3));
    for s in Subset::ALL {
        assert_eq!(s.as_str().parse::<Subset>().unwrap(), s);
        assert_eq!(format!("ravi/{s}").parse::<Subset>().unwrap(), s);
    }
    let err =
        data::load(&root(), "mini-imagenet", "ravi", "background", 84).unwrap_err().to_string();
    assert!(err.contains("background") && err.contains("train, val, trainval or test"), "{err}");
    assert_one_line(&err);
}

#[test]
fn presets_point_at_mini_imagenet() {
    use kshot::presets::find;
    for (name, method, train_ways, shots, meta_batch, hidden) in [
        ("maml-miniimagenet-5w1s", "maml", 5, 1, 4, 32),
        ("maml-miniimagenet-5w5s", "maml", 5, 5, 4, 32),
        ("protonet-miniimagenet-1shot", "protonet", 30, 1, 1, 64),
        ("protonet-miniimagenet-5shot", "protonet", 20, 5, 1, 64),
        ("meta-lstm-miniimagenet-5w1s", "meta-lstm", 5, 1, 1, 32),
        ("meta-lstm-miniimagenet-5w5s", "meta-lstm", 5, 5, 1, 32),
    ] {
        let p = find(name).unwrap();
        assert!(!p.summary.contains("not in this build"), "{name}");
        let mut c = kshot::presets::config(name).unwrap();
        assert_eq!(c.method.name(), method, "{name}");
        assert_eq!(
            (c.data.dataset.as_str(), c.data.split.as_str()),
            ("mini-imagenet", "ravi"),
            "{name}"
        );
        assert_eq!(
            (c.data.train_subset.as_str(), c.data.test_subset.as_str()),
            ("train", "test"),
            "{name}"
        );
        assert_eq!(c.data.image_size, 84, "{name}");
        let conv4 = *common::conv4(&mut c);
        assert_eq!((conv4.in_channels, conv4.hidden), (3, hidden), "{name}");
        assert_eq!(c.train, EpisodeSpec::new(train_ways, shots, 15), "{name}");
        // cbfinn/maml tests with K queries per class (main.py: `update_batch_size*2` images).
        let test_queries = if method == "maml" { shots } else { 15 };
        assert_eq!(c.test, EpisodeSpec::new(5, shots, test_queries), "{name}");
        assert_eq!((c.meta_batch, c.test_episodes), (meta_batch, 600), "{name}");
        if method == "maml" {
            let m = *settings!(c, Maml);
            assert_eq!(
                (m.ways, m.inner_steps, m.inner_steps_test, m.inner_lr, m.first_order),
                (5, 5, 10, 0.01, false)
            );
            assert_eq!((c.episodes, c.schedule.lr, c.schedule.step), (60_000, 1e-3, 0));
            assert_eq!(m.inner_loss, kshot::methods::maml::InnerLoss::SumOverShots);
            assert!(!m.adapt_batch_norm && m.clip_official == Some(10.0));
            assert!(!conv4.bn_scale && conv4.bn_eps == 1e-3);
        }
        if method == "protonet" {
            assert_eq!((c.schedule.lr, c.schedule.step, c.schedule.gamma), (1e-3, 2000, 0.5));
            assert_eq!(conv4.embedding_dim(84, 84), 1600);
        }
    }
}

// ---- synthetic data roots: layouts and errors -------------------------------------------------

/// A JPEG of `w`×`h` whose colour encodes (class, index).
fn jpeg(w: u32, h: u32, class: u8, index: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            class.wrapping_mul(60).wrapping_add(30),
            index.wrapping_mul(40).wrapping_add(20),
            ((x + y) % 256) as u8,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(&img).unwrap();
    out
}

fn file_name(class: u8, index: u8) -> String {
    format!("n0{class}00000000000{index:02}.jpg")
}

fn label(class: u8) -> String {
    format!("n0{class}000000")
}

/// `DIR/mini-imagenet/<subset>.csv` listing `classes` × `per_class` images.
fn write_csv(dir: &Path, subset: &str, classes: std::ops::Range<u8>, per_class: u8) {
    let mut text = String::from("filename,label\n");
    for c in classes {
        for i in 0..per_class {
            text.push_str(&format!("{},{}\n", file_name(c, i), label(c)));
        }
    }
    std::fs::write(dir.join(format!("{subset}.csv")), text).unwrap();
}

/// A stored zip of `images/<file>` entries.
fn write_zip(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.add_directory("images/", opts).unwrap();
    for (name, bytes) in files {
        w.start_file(format!("images/{name}"), opts).unwrap();
        std::io::Write::write_all(&mut w, bytes).unwrap();
    }
    std::fs::write(path, w.finish().unwrap().into_inner()).unwrap();
}

/// A root with val (classes 1-2, 3 images each, zipped, 84×84) and test (class 3, 3 images, in an
/// images/ folder, 100×60) complete, and train (classes 4-5, 4 listed) with 2 images each in
/// images_train_part1.zip.
fn synthetic_root() -> tempfile::TempDir {
    let tmp = common::tempdir("mini-imagenet");
    let dir = tmp.path().join("mini-imagenet");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    write_csv(&dir, "val", 1..3, 3);
    write_csv(&dir, "test", 3..4, 3);
    write_csv(&dir, "train", 4..6, 4);
    let val: Vec<_> =
        (1..3).flat_map(|c| (0..3).map(move |i| (file_name(c, i), jpeg(84, 84, c, i)))).collect();
    write_zip(&dir.join("images_val.zip"), &val);
    for i in 0..3 {
        std::fs::write(dir.join("images").join(file_name(3, i)), jpeg(100, 60, 3, i)).unwrap();
    }
    let train: Vec<_> =
        (4..6).flat_map(|c| (0..2).map(move |i| (file_name(c, i), jpeg(84, 84, c, i)))).collect();
    write_zip(&dir.join("images_train_part1.zip"), &train);
    tmp
}

#[test]
fn synthetic_layouts_load() {
    let tmp = synthetic_root();
    let root = tmp.path();
    let cache = Cache::disabled();
    let val = mini_imagenet::load_with_cache(root, Subset::Val, 84, &cache).unwrap();
    assert_eq!((val.classes.len(), val.total_images(), val.channels), (2, 6, 3));
    assert_eq!(val.classes[1].name, label(2));
    // Colour survives (JPEG is lossy: within a few levels) in channel order R, G, B.
    let img = val.image(1, 2);
    let at = |ch: usize| img[ch * 84 * 84 + 40 * 84 + 40] as i32;
    assert!(
        (at(0) - 150).abs() <= 4 && (at(1) - 100).abs() <= 4 && (at(2) - 80).abs() <= 6,
        "{} {} {}",
        at(0),
        at(1),
        at(2)
    );

    // The images/ folder, with non-square images stretched to the requested size; a CSV saved with
    // a byte-order mark and CRLF line ends reads the same.
    let csv = root.join("mini-imagenet/test.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::write(&csv, format!("\u{feff}{}", text.replace('\n', "\r\n"))).unwrap();
    let test = mini_imagenet::load_with_cache(root, Subset::Test, 20, &cache).unwrap();
    assert_eq!((test.classes.len(), test.total_images(), test.height, test.width), (1, 3, 20, 20));

    // A partial train set loads what is there, with a warning.
    let c = catalog(root, Subset::Train).unwrap();
    let w = c.warning.as_deref().unwrap();
    assert!(w.contains("4 of 8 listed images") && w.contains("2 of 4 per class"), "{w}");
    let train = mini_imagenet::load_with_cache(root, Subset::Train, 84, &cache).unwrap();
    assert_eq!((train.classes.len(), train.total_images()), (2, 4));
    let trainval = mini_imagenet::build(root, Subset::Trainval, 84).unwrap();
    assert_eq!((trainval.classes.len(), trainval.total_images()), (4, 10));

    // Through the cache: the second load reads the file and equals the first.
    let cache_dir = common::tempdir("mini-imagenet-cache");
    let cache = Cache::at(cache_dir.path());
    let first = mini_imagenet::load_with_cache(root, Subset::Val, 84, &cache).unwrap();
    let key = mini_imagenet::cache_key(root, Subset::Val, 84).unwrap();
    assert!(cache.path_for(&key).unwrap().is_file());
    assert_eq!(mini_imagenet::load_with_cache(root, Subset::Val, 84, &cache).unwrap(), first);
    assert_ne!(
        key.file_name().unwrap(),
        mini_imagenet::cache_key(root, Subset::Val, 32).unwrap().file_name().unwrap()
    );

    kshot::data::download::fetch_mini_imagenet(root).unwrap().expect("partial train warning");
}

#[test]
fn synthetic_errors_are_one_line_and_name_the_file() {
    let tmp = synthetic_root();
    let root = tmp.path();
    let dir = root.join("mini-imagenet");
    let cache = Cache::disabled();

    // A val image missing from every source.
    let mut text = std::fs::read_to_string(dir.join("val.csv")).unwrap();
    text.push_str(&format!("{},{}\n", file_name(2, 7), label(2)));
    std::fs::write(dir.join("val.csv"), text).unwrap();
    let err = format!("{:#}", mini_imagenet::build(root, Subset::Val, 84).unwrap_err());
    assert!(
        err.contains(&file_name(2, 7))
            && err.contains("val.csv:8")
            && err.contains("images_val.zip"),
        "{err}"
    );
    assert_one_line(&err);
    write_csv(&dir, "val", 1..3, 3);

    // A malformed CSV line.
    std::fs::write(dir.join("test.csv"), "filename,label\njust-a-name\n").unwrap();
    let err = format!("{:#}", mini_imagenet::build(root, Subset::Test, 84).unwrap_err());
    assert!(err.contains("test.csv:2") && err.contains("filename,label"), "{err}");
    assert_one_line(&err);
    write_csv(&dir, "test", 3..4, 3);

    // A corrupt image: the error names it.
    std::fs::write(dir.join("images").join(file_name(3, 1)), b"\xff\xd8\xff broken").unwrap();
    let err = format!(
        "{:#}",
        mini_imagenet::load_with_cache(root, Subset::Test, 84, &cache).unwrap_err()
    );
    assert!(err.contains(&file_name(3, 1)) && err.contains("decode"), "{err}");
    assert_one_line(&err);

    // A zip that is not one.
    std::fs::write(dir.join("images_val.zip"), b"PK\x03\x04 not a zip").unwrap();
    let err = format!("{:#}", mini_imagenet::build(root, Subset::Val, 84).unwrap_err());
    assert!(err.contains("images_val.zip") && err.contains("not a readable zip"), "{err}");
    assert_one_line(&err);

    // No files at all: where to put them (there is no download).
    let empty = common::tempdir("mini-imagenet-empty");
    for err in [
        format!(
            "{:#}",
            data::load(empty.path(), "mini-imagenet", "ravi", "train", 84).unwrap_err()
        ),
        format!("{:#}", kshot::data::download::fetch_mini_imagenet(empty.path()).unwrap_err()),
    ] {
        assert!(
            err.contains("cannot be downloaded")
                && err.contains("mini-imagenet")
                && err.contains("val.csv"),
            "{err}"
        );
        assert!(err.contains("images_train.zip") && err.contains("images/"), "{err}");
        assert_one_line(&err);
    }
    std::fs::create_dir_all(empty.path().join("mini-imagenet")).unwrap();
    let err =
        format!("{:#}", kshot::data::download::fetch_mini_imagenet(empty.path()).unwrap_err());
    assert!(err.contains("train.csv not found") && err.contains("cannot be downloaded"), "{err}");
    assert_one_line(&err);
}
