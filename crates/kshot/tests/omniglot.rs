//! Omniglot loader, cache and download against the offline copy of the real data.
//!
//! Data root: `$KSHOT_DATA`, else `<repo>/../shared/data`. Every test that touches a cache uses
//! its own directory through the explicit [`Cache`] API, so tests never race on env vars.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kshot::data::cache::Cache;
use kshot::data::download::{fetch_file, fetch_file_with, fetch_omniglot, sha256_file, Timeouts};
use kshot::data::omniglot::{self, LakeSubset, Split, VinyalsSubset};
use kshot::data::ImageSet;

const SIZE: usize = 28;

fn data_root() -> PathBuf {
    match std::env::var_os("KSHOT_DATA") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("kshot-test-{tag}-")).tempdir().unwrap()
}

/// Each split decoded once per test binary (no cache), shared by the read-only tests.
fn set(split: Split) -> &'static ImageSet {
    static SETS: OnceLock<std::sync::Mutex<Vec<(Split, &'static ImageSet)>>> = OnceLock::new();
    let sets = SETS.get_or_init(Default::default);
    let mut guard = sets.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = guard.iter().find(|(s, _)| *s == split) {
        return s;
    }
    let s = Box::leak(Box::new(omniglot::build(&data_root(), &split, SIZE).unwrap()));
    guard.push((split, s));
    s
}

fn class_index(set: &ImageSet, name: &str) -> usize {
    set.classes.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("no class {name}"))
}

/// Symlinks (or copies) the real zips into `dir/omniglot/`.
fn link_zips(dir: &Path) {
    let src = data_root().join("omniglot");
    std::fs::create_dir_all(dir.join("omniglot/splits/vinyals")).unwrap();
    for z in ["images_background.zip", "images_evaluation.zip"] {
        let (from, to) = (src.join(z).canonicalize().unwrap(), dir.join("omniglot").join(z));
        #[cfg(unix)]
        std::os::unix::fs::symlink(&from, &to).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&from, &to).unwrap();
    }
}

fn assert_one_line(msg: &str) {
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
}

#[test]
fn lake_counts() {
    for (subset, classes, alphabets) in
        [(LakeSubset::Background, 964, 30), (LakeSubset::Evaluation, 659, 20)]
    {
        let s = set(Split::Lake(subset));
        assert_eq!(s.name, format!("omniglot/lake/{subset}"));
        assert_eq!((s.channels, s.height, s.width), (1, SIZE, SIZE));
        assert_eq!(s.classes.len(), classes);
        assert_eq!(s.groups().len(), alphabets);
        assert!((0..s.classes.len()).all(|c| s.num_images(c) == 20));
        assert_eq!(s.total_images(), classes * 20);
        let names: HashSet<&str> = s.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), classes, "class names are unique");
    }
    let bg = set(Split::Lake(LakeSubset::Background));
    assert_eq!(bg.classes[0].name, "Alphabet_of_the_Magi/character01");
    assert_eq!(bg.classes[0].group, "Alphabet_of_the_Magi");
}

#[test]
fn vinyals_counts() {
    let expect = [
        (VinyalsSubset::Train, 4112),
        (VinyalsSubset::Val, 688),
        (VinyalsSubset::Trainval, 4800),
        (VinyalsSubset::Test, 1692),
    ];
    for (subset, classes) in expect {
        let s = set(Split::Vinyals(subset));
        assert_eq!(s.name, format!("omniglot/vinyals/{subset}"));
        assert_eq!(s.classes.len(), classes, "{subset}");
        assert!((0..s.classes.len()).all(|c| s.num_images(c) == 20));
        assert_eq!(s.total_images(), classes * 20);
        let names: HashSet<&str> = s.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), classes, "{subset}: names unique");
        assert!(s.classes.iter().all(|c| c.name.starts_with(&format!("{}/", c.group))));
    }
    let names = |s: VinyalsSubset| -> HashSet<String> {
        set(Split::Vinyals(s)).classes.iter().map(|c| c.name.clone()).collect()
    };
    let (train, val, trainval, test) = (
        names(VinyalsSubset::Train),
        names(VinyalsSubset::Val),
        names(VinyalsSubset::Trainval),
        names(VinyalsSubset::Test),
    );
    assert_eq!(&train | &val, trainval);
    assert!(train.is_disjoint(&test) && val.is_disjoint(&test) && train.is_disjoint(&val));
    // Same character, same pixels, whichever split it is loaded through.
    let tv = set(Split::Vinyals(VinyalsSubset::Trainval));
    let tr = set(Split::Vinyals(VinyalsSubset::Train));
    let c = &tr.classes[17];
    assert_eq!(tv.classes[class_index(tv, &c.name)], *c);
    // Vinyals mixes both zips: an evaluation-set alphabet appears in train, and its unrotated
    // class equals the Lake evaluation class of the same character.
    let ev = set(Split::Lake(LakeSubset::Evaluation));
    let angelic = &tr.classes[class_index(tr, "Angelic/character01/rot000")];
    assert_eq!(angelic.pixels, ev.classes[class_index(ev, "Angelic/character01")].pixels);
}

#[test]
fn ink_convention() {
    let s = set(Split::Lake(LakeSubset::Background));
    let all: Vec<u8> = s.classes.iter().flat_map(|c| c.pixels.iter().copied()).collect();
    let mean = all.iter().map(|&v| v as f64).sum::<f64>() / all.len() as f64 / 255.0;
    assert!(mean > 0.01 && mean < 0.2, "mean ink {mean}: background must be 0, ink 1");
    assert!(all.contains(&255), "full-ink pixels exist");
    assert!(all.iter().any(|&v| v > 0 && v < 255), "area resize produces gray edges");
    let n = s.image_len();
    let images = all.len() / n;
    let blank_corners = all
        .chunks_exact(n)
        .filter(|img| img[0] == 0 && img[SIZE - 1] == 0 && img[n - SIZE] == 0 && img[n - 1] == 0)
        .count();
    assert!(
        blank_corners * 100 >= images * 99,
        "corners are background in {blank_corners}/{images}"
    );
    assert_eq!(s.image(0, 0)[0], 0);
}

#[test]
fn rotations_are_counter_clockwise_rotations_of_rot000() {
    let s = set(Split::Vinyals(VinyalsSubset::Val));
    let n = SIZE;
    // Independent of the library: out[r][c] = in[c][n-1-r] is one counter-clockwise quarter turn.
    let ccw = |img: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; n * n];
        for r in 0..n {
            for c in 0..n {
                out[r * n + c] = img[c * n + (n - 1 - r)];
            }
        }
        out
    };
    let mut checked = 0;
    for (i, class) in s.classes.iter().enumerate() {
        let Some(base) = class.name.strip_suffix("/rot000") else {
            continue;
        };
        let r90 = class_index(s, &format!("{base}/rot090"));
        let r180 = class_index(s, &format!("{base}/rot180"));
        let r270 = class_index(s, &format!("{base}/rot270"));
        for k in 0..s.num_images(i) {
            let a = s.image(i, k);
            assert_eq!(ccw(a), s.image(r90, k), "{base} image {k}: rot090");
            assert_eq!(ccw(&ccw(a)), s.image(r180, k), "{base} image {k}: rot180");
            assert_eq!(ccw(&ccw(&ccw(a))), s.image(r270, k), "{base} image {k}: rot270");
        }
        assert_ne!(s.image(i, 0), s.image(r90, 0), "{base}: a glyph is not rotation-invariant");
        checked += 1;
    }
    assert_eq!(checked, 688 / 4);
}

#[test]
fn extracted_folders_load_like_zips() {
    // Extract two alphabets from each zip and point a split file at them.
    let tmp = tempdir("extracted");
    let dir = tmp.path().join("omniglot");
    let pick = [("images_background", "Greek"), ("images_evaluation", "Angelic")];
    for (stem, alphabet) in pick {
        let bytes =
            std::fs::read(data_root().join("omniglot").join(format!("{stem}.zip"))).unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).unwrap();
            let name = f.name().unwrap().to_string();
            if f.is_dir() || !name.starts_with(&format!("{stem}/{alphabet}/")) {
                continue;
            }
            let out = dir.join(&name);
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let mut w = std::fs::File::create(out).unwrap();
            std::io::copy(&mut f, &mut w).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("splits/vinyals")).unwrap();
    let lines =
        "Greek/character03/rot090\nAngelic/character01/rot000\n\nAngelic/character02/rot270\n";
    std::fs::write(dir.join("splits/vinyals/test.txt"), lines).unwrap();

    let got = omniglot::build(tmp.path(), &Split::Vinyals(VinyalsSubset::Test), SIZE).unwrap();
    let names: Vec<&str> = got.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["Greek/character03/rot090", "Angelic/character01/rot000", "Angelic/character02/rot270"]
    );
    // Compare with the same classes loaded from the zips (rot000 + rotation of the zip class).
    let all = set(Split::Vinyals(VinyalsSubset::Trainval));
    for c in &got.classes {
        assert_eq!(*c, all.classes[class_index(all, &c.name)], "{}", c.name);
    }
    let lake = omniglot::build(tmp.path(), &Split::Lake(LakeSubset::Background), SIZE).unwrap();
    assert_eq!(lake.classes.len(), 24, "Greek has 24 characters");
}

#[test]
fn cache_roundtrip_and_corruption() {
    let tmp = tempdir("cache");
    let cache = Cache::at(tmp.path().join("cache"));
    let root = data_root();
    let split = Split::Lake(LakeSubset::Evaluation);
    let fresh = set(split);

    let first = omniglot::load_with_cache(&root, &split, SIZE, &cache).unwrap();
    assert_eq!(&first, fresh);
    let key = omniglot::cache_key(&root, &split, SIZE).unwrap();
    let file = cache.path_for(&key).unwrap();
    assert!(file.is_file(), "cache file written");
    let len = std::fs::metadata(&file).unwrap().len();
    let leftovers: Vec<_> =
        std::fs::read_dir(cache.dir().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");

    let again = omniglot::load_with_cache(&root, &split, SIZE, &cache).unwrap();
    assert_eq!(&again, fresh);

    // A different size is a different key.
    assert_ne!(
        omniglot::cache_key(&root, &split, 14).unwrap().file_name().unwrap(),
        key.file_name().unwrap()
    );

    // Truncated, bit-flipped, and garbage files are all rebuilt.
    let bytes = std::fs::read(&file).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    for bad in [bytes[..bytes.len() / 3].to_vec(), flipped, b"not a cache".to_vec(), Vec::new()] {
        std::fs::write(&file, &bad).unwrap();
        let rebuilt = omniglot::load_with_cache(&root, &split, SIZE, &cache).unwrap();
        assert_eq!(&rebuilt, fresh);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len, "cache file rewritten");
    }
}

#[test]
fn unwritable_cache_dir_still_loads() {
    let tmp = tempdir("unwritable");
    // A cache "directory" below a regular file cannot be created, even by root.
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let cache = Cache::at(blocker.join("cache"));
    let split = Split::Lake(LakeSubset::Evaluation);
    let s = omniglot::load_with_cache(&data_root(), &split, SIZE, &cache).unwrap();
    assert_eq!(&s, set(split));
}

#[test]
fn missing_data_names_the_file() {
    let tmp = tempdir("missing");
    std::fs::create_dir_all(tmp.path().join("omniglot")).unwrap();
    let cache = Cache::at(tmp.path().join("cache"));
    for split in [Split::Lake(LakeSubset::Background), Split::Vinyals(VinyalsSubset::Train)] {
        let err = format!(
            "{:#}",
            omniglot::load_with_cache(tmp.path(), &split, SIZE, &cache).unwrap_err()
        );
        assert!(err.contains("images_background.zip not found"), "{err}");
        assert!(err.contains("kshot data fetch omniglot"), "{err}");
        assert_one_line(&err);
    }
    let err = format!(
        "{:#}",
        omniglot::load(tmp.path(), &Split::Lake(LakeSubset::Evaluation), SIZE).unwrap_err()
    );
    assert!(err.contains("images_evaluation.zip not found"), "{err}");

    // Zips present, split file missing.
    link_zips(tmp.path());
    let err = format!(
        "{:#}",
        omniglot::build(tmp.path(), &Split::Vinyals(VinyalsSubset::Val), SIZE).unwrap_err()
    );
    assert!(err.contains("splits/vinyals/val.txt not found"), "{err}");
    assert_one_line(&err);
    assert!(omniglot::build(tmp.path(), &Split::Lake(LakeSubset::Background), 0).is_err());
}

#[test]
fn bad_split_lines_name_file_and_line() {
    let tmp = tempdir("badsplit");
    link_zips(tmp.path());
    let file = tmp.path().join("omniglot/splits/vinyals/train.txt");
    let cases = [
        (
            "Greek/character01/rot000\nGreek/character99/rot000\n",
            "train.txt:2",
            "Greek/character99",
        ),
        (
            "Greek/character01/rot000\n\nNope/character01/rot090\n",
            "train.txt:3",
            "Nope/character01",
        ),
        ("Greek/character01/rot045\n", "train.txt:1", "rot045"),
        ("Greek/character01\n", "train.txt:1", "Alphabet/characterNN/rotDDD"),
        ("Greek/character01/rot000\nGreek/character01/rot000\n", "train.txt:2", "listed twice"),
        ("\n\n", "lists no classes", "train.txt"),
    ];
    for (text, at, what) in cases {
        std::fs::write(&file, text).unwrap();
        let err = format!(
            "{:#}",
            omniglot::build(tmp.path(), &Split::Vinyals(VinyalsSubset::Train), SIZE).unwrap_err()
        );
        assert!(err.contains(at) && err.contains(what), "{text:?} -> {err}");
        assert_one_line(&err);
    }
}

#[test]
fn corrupt_zip_is_an_error_not_a_panic() {
    let tmp = tempdir("corrupt");
    let dir = tmp.path().join("omniglot");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("images_evaluation.zip"), b"PK\x03\x04 definitely not a zip").unwrap();
    let err = format!(
        "{:#}",
        omniglot::build(tmp.path(), &Split::Lake(LakeSubset::Evaluation), SIZE).unwrap_err()
    );
    assert!(err.contains("images_evaluation.zip"), "{err}");
    assert_one_line(&err);

    // A valid zip holding a broken PNG: the error names the entry.
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "images_evaluation/Angelic/character01/0965_01.png",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    std::io::Write::write_all(&mut w, b"\x89PNG broken").unwrap();
    std::fs::write(dir.join("images_evaluation.zip"), w.finish().unwrap().into_inner()).unwrap();
    let err = format!(
        "{:#}",
        omniglot::build(tmp.path(), &Split::Lake(LakeSubset::Evaluation), SIZE).unwrap_err()
    );
    assert!(err.contains("0965_01.png") && err.contains("PNG"), "{err}");
    assert_one_line(&err);
}

#[test]
fn fetch_unreachable_fails_fast_with_one_line() {
    let tmp = tempdir("fetch");
    let dest = tmp.path().join("sub/x.zip");
    let t = Instant::now();
    let err = fetch_file("http://127.0.0.1:9/x", &dest, None).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    let msg = format!("{err:#}");
    assert!(msg.starts_with("could not download http://127.0.0.1:9/x: "), "{msg}");
    assert!(msg.contains("check your connection"), "{msg}");
    assert_one_line(&msg);
    assert!(!dest.exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("sub")).unwrap().collect();
    assert!(left.is_empty(), "no partial files left");
}

#[test]
fn fetch_from_a_silent_server_times_out() {
    // A local server that accepts the connection and never answers: the read timeout fires.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow.zip", listener.local_addr().unwrap());
    let hold = std::thread::spawn(move || {
        // Read (and never answer) until the client gives up and closes the connection.
        if let Ok((mut conn, _)) = listener.accept() {
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = std::io::Read::read_to_end(&mut conn, &mut Vec::new());
        }
    });
    let tmp = tempdir("fetch-slow");
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        read: Duration::from_secs(1),
        total: Duration::from_secs(3),
    };
    let t = Instant::now();
    let err = fetch_file_with(&url, &tmp.path().join("slow.zip"), None, timeouts).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(msg.starts_with(&format!("could not download {url}: ")), "{msg}");
    assert_one_line(&msg);
    assert!(!tmp.path().join("slow.zip").exists());
    hold.join().unwrap();
}

#[test]
fn fetch_keeps_present_verified_files() {
    // Everything is already in the offline copy: nothing is downloaded (this machine is offline),
    // and the known hashes (all_runs.zip, split files) are verified.
    fetch_omniglot(&data_root()).unwrap();
    assert_eq!(
        sha256_file(&data_root().join("omniglot/all_runs.zip")).unwrap(),
        "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"
    );
    // A present file with the wrong hash is fetched again (and here fails, offline or refused).
    let tmp = tempdir("fetch-bad");
    let dest = tmp.path().join("y.txt");
    std::fs::write(&dest, b"wrong").unwrap();
    let err = fetch_file("http://127.0.0.1:9/y.txt", &dest, Some(&"0".repeat(64))).unwrap_err();
    assert!(format!("{err:#}").contains("could not download"), "{err:#}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"wrong", "existing file untouched on failure");
}

/// Load times for the report: `cargo test --test omniglot timing -- --nocapture`.
#[test]
fn timing_vinyals_train() {
    let tmp = tempdir("timing");
    let cache = Cache::at(tmp.path());
    let split = Split::Vinyals(VinyalsSubset::Train);
    let t = Instant::now();
    let a = omniglot::load_with_cache(&data_root(), &split, SIZE, &cache).unwrap();
    let uncached = t.elapsed();
    let t = Instant::now();
    let b = omniglot::load_with_cache(&data_root(), &split, SIZE, &cache).unwrap();
    let cached = t.elapsed();
    assert_eq!(a, b);
    eprintln!(
        "vinyals train ({} classes, {} images at {SIZE}x{SIZE}): uncached {uncached:?} (incl. cache write), cached {cached:?}",
        a.classes.len(),
        a.total_images()
    );
}

fn names(split: Split) -> Vec<String> {
    set(split).classes.iter().map(|c| c.name.clone()).collect()
}

/// The character (`Alphabet/characterNN`) of a class name.
fn character(name: &str) -> String {
    name.splitn(3, '/').take(2).collect::<Vec<_>>().join("/")
}

#[test]
fn reptile_split_is_run_omniglots_1200_rotated_and_423_unrotated_characters() {
    use omniglot::ShuffledSubset::{Test, Train};
    let test = names(Split::Reptile(Test));
    let train = names(Split::Reptile(Train));
    assert_eq!(test.len(), 423);
    assert!(test.iter().all(|n| !n.contains("/rot")), "Reptile's test classes are unrotated");
    assert_eq!(train.len(), 4800, "1200 characters × 4 rotations");
    // python3: sorted alphabets, sorted characters (both archives), random.seed(0), shuffle.
    assert_eq!(
        &test[..3],
        [
            "Malayalam/character17",
            "Mkhedruli_(Georgian)/character07",
            "Japanese_(hiragana)/character33"
        ]
    );
    assert_eq!(
        &train[..4],
        [
            "Japanese_(hiragana)/character47/rot000",
            "Japanese_(hiragana)/character47/rot090",
            "Japanese_(hiragana)/character47/rot180",
            "Japanese_(hiragana)/character47/rot270"
        ]
    );
    let train_chars: HashSet<String> = train.iter().map(|n| character(n)).collect();
    assert_eq!(train_chars.len(), 1200);
    assert!(test.iter().all(|n| !train_chars.contains(n)), "a test character is also trained on");
    // Rotated classes are the unrotated images turned (rotation commutes with the resize).
    let s = set(Split::Reptile(Train));
    let (c0, c1) = (&s.classes[0].pixels, &s.classes[1].pixels);
    assert_eq!(&omniglot::rotate_ccw(&c0[..SIZE * SIZE], SIZE, 1)[..], &c1[..SIZE * SIZE]);
    assert!("reptile/val".parse::<Split>().is_err(), "Reptile's split has no validation part");
}

#[test]
fn maml_split_is_the_codes_shuffled_1100_100_423_characters() {
    use omniglot::ShuffledSubset::{Test, Train, Val};
    let (train, val, test) =
        (names(Split::Maml(Train)), names(Split::Maml(Val)), names(Split::Maml(Test)));
    assert_eq!((train.len(), val.len(), test.len()), (1100, 100, 423));
    // python3: the same sorted list, random.seed(1), shuffle (cbfinn/maml lists its folder
    // unsorted, so its exact characters depend on the file system).
    assert_eq!(
        &train[..3],
        ["Gurmukhi/character23", "Malayalam/character36", "Tifinagh/character36"]
    );
    assert_eq!(&val[..2], ["Tifinagh/character11", "N_Ko/character16"]);
    assert_eq!(&test[..2], ["Keble/character04", "Atemayar_Qelisayer/character08"]);
    let all: HashSet<&String> = train.iter().chain(&val).chain(&test).collect();
    assert_eq!(all.len(), 1623, "the three parts are disjoint and cover every character");
    assert!(all.iter().all(|n| !n.contains("/rot")));
}
