//! Folder datasets: layout, class splits (ratio, kshot spec, easyfsl spec), errors that name the
//! file, and the pixel pipelines that read a user's images.

mod common;

use std::path::{Path, PathBuf};

use kshot::data::cache::Cache;
use kshot::data::folder::{self, ClassSplit};
use kshot::data::images::{Fit, Pipeline, Polarity};
use kshot::data::{EpisodeSampler, EpisodeSpec, Grouping};

/// Writes a `w`×`h` gray PNG whose pixels depend on `seed`.
fn png(path: &Path, w: u32, h: u32, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 7 + y * 13 + seed * 31) % 251) as u8])
    });
    img.save(path).unwrap();
}

/// `classes` classes of `per_class` images each, flat: DIR/c0/i.png …
fn flat_folder(dir: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        for i in 0..per_class {
            png(&dir.join(format!("c{c}/{i}.png")), 30 + i as u32, 28, (c * 10 + i) as u32);
        }
    }
}

fn gray28() -> Pipeline {
    Pipeline::folder(1, 28, Polarity::AsIs, Fit::Stretch).unwrap()
}

fn load(dir: &Path, split: &str, subset: &str) -> anyhow::Result<kshot::data::ImageSet> {
    folder::load_with_cache(dir, split, subset, &gray28(), &Cache::disabled())
}

fn err(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn flat_folder_loads_every_class_and_image() {
    let t = common::tempdir("folder-flat");
    flat_folder(t.path(), 4, 3);
    std::fs::write(t.path().join("c0/notes.txt"), "not an image").unwrap();
    std::fs::write(t.path().join("README.md"), "top-level files are ignored").unwrap();
    let set = load(t.path(), "all", "test").unwrap();
    assert_eq!(set.classes.len(), 4);
    assert_eq!((set.channels, set.height, set.width), (1, 28, 28));
    for c in 0..4 {
        assert_eq!(set.num_images(c), 3, "class {c}");
        assert_eq!(set.classes[c].name, format!("c{c}"));
    }
    let rgb = Pipeline::folder(3, 20, Polarity::AsIs, Fit::Stretch).unwrap();
    let set = folder::load_with_cache(t.path(), "all", "all", &rgb, &Cache::disabled()).unwrap();
    assert_eq!((set.channels, set.height), (3, 20));
    assert_eq!(set.image(0, 0).len(), 3 * 20 * 20);
}

#[test]
fn nested_groups_become_groups_of_classes() {
    let t = common::tempdir("folder-groups");
    for (g, c) in [("latin", "a"), ("latin", "b"), ("latin", "c"), ("greek", "alpha")] {
        for i in 0..2 {
            png(&t.path().join(format!("{g}/{c}/{i}.png")), 28, 28, i);
        }
    }
    let set = load(t.path(), "all", "all").unwrap();
    let names: Vec<&str> = set.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["greek/alpha", "latin/a", "latin/b", "latin/c"]);
    assert_eq!(set.classes[0].group, "greek");
    let groups = set.groups();
    assert_eq!(groups["latin"].len(), 3);
    // Within-group 3-way episodes can only come from `latin`.
    let s = EpisodeSampler::new(&set, EpisodeSpec::new(3, 1, 1), Grouping::WithinGroup).unwrap();
    for i in 0..20 {
        let draw = s.draw(0, i);
        assert!(draw.classes.iter().all(|&c| set.classes[c].group == "latin"));
    }
    let e = err(EpisodeSampler::new(&set, EpisodeSpec::new(4, 1, 1), Grouping::WithinGroup));
    assert!(e.contains("no group") && e.contains("largest has 3"), "{e}");
}

#[test]
fn bad_input_is_one_line_naming_the_file() {
    let t = common::tempdir("folder-bad");
    flat_folder(t.path(), 3, 3);
    // An unreadable image.
    std::fs::write(t.path().join("c1/broken.png"), b"not a png at all").unwrap();
    let e = err(load(t.path(), "all", "all"));
    assert!(e.contains("c1/broken.png") && e.contains("cannot decode"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    std::fs::remove_file(t.path().join("c1/broken.png")).unwrap();
    // An empty class.
    std::fs::create_dir(t.path().join("empty")).unwrap();
    let e = err(load(t.path(), "all", "all"));
    assert!(e.contains("empty") && e.contains("holds no images"), "{e}");
    std::fs::remove_dir(t.path().join("empty")).unwrap();
    let set = load(t.path(), "all", "all").unwrap();
    // A class too small for K + M.
    let e = err(EpisodeSampler::new(&set, EpisodeSpec::new(2, 2, 2), Grouping::Any));
    assert!(e.contains("`c0`") && e.contains("has 3 images") && e.contains("need 4"), "{e}");
    // Fewer classes than ways.
    let e = err(EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 1), Grouping::Any));
    assert!(e.contains("3 classes") && e.contains("5-way"), "{e}");
    // Mixed sizes where the run needs images of its own size.
    let exact = Pipeline::folder(1, 28, Polarity::AsIs, Fit::Exact).unwrap();
    let e = err(folder::load_with_cache(t.path(), "all", "all", &exact, &Cache::disabled()));
    assert!(e.contains("c0/0.png") && e.contains("30×28") && e.contains("--fit"), "{e}");
    // Not a folder at all.
    let e = err(load(&t.path().join("missing"), "all", "all"));
    assert!(e.contains("missing") && e.contains("not a folder"), "{e}");
}

#[test]
fn ratio_split_is_disjoint_seeded_and_complete() {
    let t = common::tempdir("folder-ratio");
    flat_folder(t.path(), 10, 1);
    let names = |split: &str, subset: &str| -> Vec<String> {
        let classes = folder::classes(t.path(), &split.parse().unwrap(), subset).unwrap();
        classes.into_iter().map(|c| c.name).collect()
    };
    let (train, val, test) = (
        names("ratio:0.6,0.2,0.2", "train"),
        names("ratio:0.6,0.2,0.2", "val"),
        names("ratio:0.6,0.2,0.2", "test"),
    );
    assert_eq!((train.len(), val.len(), test.len()), (6, 2, 2));
    let mut all: Vec<String> = [train.clone(), val.clone(), test.clone()].concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "disjoint and complete");
    assert_eq!(names("ratio:0.6,0.2,0.2", "trainval").len(), 8);
    assert_eq!(names("ratio:0.6,0.2,0.2@0", "train"), train, "seed 0 is the default");
    let other: Vec<_> = (1..5).map(|s| names(&format!("ratio:0.6,0.2,0.2@{s}"), "train")).collect();
    assert!(other.iter().any(|o| *o != train), "the seed changes the split");
    for bad in ["ratio:0.5,0.2", "ratio:0.7,0.2,0.2", "ratio:a,b,c", "ratio:0.6,0.2,0.2@x"] {
        assert!(bad.parse::<ClassSplit>().is_err(), "{bad}");
    }
}

#[test]
fn spec_files_name_the_classes_of_each_subset() {
    let t = common::tempdir("folder-spec");
    let data = t.path().join("data");
    flat_folder(&data, 4, 1);
    let json = t.path().join("split.json");
    std::fs::write(&json, r#"{"train": ["c0", "c1"], "val": ["c2"], "test": ["c3"]}"#).unwrap();
    let csv = t.path().join("split.csv");
    std::fs::write(&csv, "class,subset\nc0,train\nc1,train\nc2,val\nc3,test\n").unwrap();
    for spec in [&json, &csv] {
        let spec = spec.display().to_string();
        let names = |subset| -> Vec<String> {
            folder::classes(&data, &spec.parse().unwrap(), subset)
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(names("train"), ["c0", "c1"]);
        assert_eq!(names("val"), ["c2"]);
        assert_eq!(names("test"), ["c3"]);
    }
    std::fs::write(&json, r#"{"train": ["c0", "nope"], "test": ["c3"]}"#).unwrap();
    let e = err(load(&data, &json.display().to_string(), "train"));
    assert!(e.contains("split.json") && e.contains("`nope`"), "{e}");
    std::fs::write(&csv, "c0,train\nc0,test\n").unwrap();
    let e = err(csv.display().to_string().parse::<ClassSplit>());
    assert!(e.contains("split.csv:2") && e.contains("twice"), "{e}");
}

#[test]
fn easyfsl_specs_are_read() {
    let t = common::tempdir("folder-easyfsl");
    let images = t.path().join("images");
    flat_folder(&images, 3, 2);
    let specs = t.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let spec = |names: &[&str]| {
        let roots: Vec<String> = names.iter().map(|n| format!("../images/{n}")).collect();
        serde_json::json!({"class_names": names, "class_roots": roots}).to_string()
    };
    std::fs::write(specs.join("train.json"), spec(&["c0", "c1"])).unwrap();
    std::fs::write(specs.join("test.json"), spec(&["c2"])).unwrap();
    let dir_split = specs.display().to_string();
    let set = load(&images, &dir_split, "train").unwrap();
    assert_eq!(set.classes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["c0", "c1"]);
    assert_eq!(set.num_images(0), 2);
    let one_file = specs.join("test.json").display().to_string();
    let set = load(&images, &one_file, "test").unwrap();
    assert_eq!(set.classes.len(), 1);
    assert_eq!(set.classes[0].name, "c2");
    std::fs::write(
        specs.join("test.json"),
        r#"{"class_names": ["x"], "class_roots": ["../images/x"]}"#,
    )
    .unwrap();
    let e = err(load(&images, &one_file, "test"));
    assert!(e.contains("test.json") && e.contains("not found"), "{e}");
}

#[test]
fn a_cached_folder_is_the_decoded_folder_and_changes_with_it() {
    let t = common::tempdir("folder-cache");
    let data = t.path().join("data");
    flat_folder(&data, 3, 2);
    let cache = Cache::at(t.path().join("cache"));
    let first = folder::load_with_cache(&data, "all", "all", &gray28(), &cache).unwrap();
    let again = folder::load_with_cache(&data, "all", "all", &gray28(), &cache).unwrap();
    assert_eq!(first, again);
    assert_eq!(first.fingerprint(), again.fingerprint());
    png(&data.join("c1/0.png"), 30, 28, 99);
    let changed = folder::load_with_cache(&data, "all", "all", &gray28(), &cache).unwrap();
    assert_ne!(changed.fingerprint(), first.fingerprint(), "a changed image changes the set");
    let rebuilt =
        folder::load_with_cache(&data, "all", "all", &gray28(), &Cache::disabled()).unwrap();
    assert_eq!(changed, rebuilt);
}

/// An Omniglot-like glyph at `scale`× 105 px: a ring and a bar, `ink` on `paper` with texture.
fn glyph(path: &PathBuf, scale: u32, ink: u8, paper: u8) {
    let n = 105 * scale;
    let img = image::GrayImage::from_fn(n, n, |x, y| {
        let (fx, fy) = (x as f64 / scale as f64, y as f64 / scale as f64);
        let r = ((fx - 52.0).powi(2) + (fy - 52.0).powi(2)).sqrt();
        let on =
            (25.0..31.0).contains(&r) || ((20.0..85.0).contains(&fx) && (50.0..56.0).contains(&fy));
        let texture = ((x * 31 + y * 17) % 5) as u8;
        image::Luma([if on { ink } else { paper.saturating_sub(texture) }])
    });
    img.save(path).unwrap();
}

#[test]
fn drawings_read_the_same_whatever_their_polarity_levels_and_size() {
    let t = common::tempdir("folder-polarity");
    let clean = t.path().join("clean.png");
    glyph(&clean, 1, 0, 255);
    let omniglot_run = kshot::protocol::DataConfig::omniglot();
    let p = Pipeline::of_run(&omniglot_run, 1).unwrap();
    let reference = p.load(&clean).unwrap();
    assert!(reference.iter().filter(|&&v| v > 128).count() > 40, "ink is bright");
    assert_eq!(reference[0], 0, "background is 0");
    for (name, scale, ink, paper) in
        [("photo.jpg", 3, 70, 205), ("inverted.png", 1, 255, 0), ("chalk.png", 2, 220, 40)]
    {
        let path = t.path().join(name);
        glyph(&path, scale, ink, paper);
        let got = p.load(&path).unwrap();
        let diff: f64 =
            got.iter().zip(&reference).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>()
                / got.len() as f64;
        assert!(diff < 6.0, "{name}: mean |difference| {diff:.1} of 255 from the clean glyph");
    }
}
