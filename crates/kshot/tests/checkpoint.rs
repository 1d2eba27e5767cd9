//! Tensor files and atomic writes: round trips, the content hash, corruption and truncation,
//! files of earlier versions, and no temporary file left behind on success or failure.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kshot::checkpoint::{content_hash, load_tensors, save_tensors, write_atomic, HASH_KEY};
use sha2::{Digest, Sha256};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kshot-test-checkpoint-").tempdir().unwrap()
}

/// Tensors of several dtypes and shapes, including a scalar and an empty one.
fn sample() -> Vec<(String, Tensor)> {
    let cpu = &Device::Cpu;
    let f32s: Vec<f32> = (0..6).map(|i| i as f32 * 0.25 - 1.0).collect();
    let f64s = vec![std::f64::consts::PI, -0.0, 1e-300, f64::MAX];
    let i64s: Vec<i64> = vec![i64::MIN, -1, 0, 1, 42, i64::MAX, 7, -7];
    vec![
        ("a.weight".into(), Tensor::from_vec(f32s, (2, 3), cpu).unwrap()),
        ("b.f64".into(), Tensor::from_vec(f64s, 4, cpu).unwrap()),
        ("c.steps".into(), Tensor::from_vec(i64s, (2, 2, 2), cpu).unwrap()),
        ("d.scalar".into(), Tensor::new(3.5f32, cpu).unwrap()),
        ("e.empty".into(), Tensor::zeros((0, 3), DType::F32, cpu).unwrap()),
        ("f.u32".into(), Tensor::new(&[[1u32, 2], [3, 4]], cpu).unwrap()),
        (
            "g.transposed".into(),
            Tensor::from_vec((0..12).map(|i| i as f64).collect(), (3, 4), cpu)
                .unwrap()
                .t()
                .unwrap(),
        ),
    ]
}

/// Bit-exact element values, whatever the dtype.
fn values(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t.to_vec1::<f32>().unwrap().into_iter().map(|v| v.to_bits() as u64).collect(),
        DType::F64 => t.to_vec1::<f64>().unwrap().into_iter().map(f64::to_bits).collect(),
        DType::I64 => t.to_vec1::<i64>().unwrap().into_iter().map(|v| v as u64).collect(),
        DType::U32 => t.to_vec1::<u32>().unwrap().into_iter().map(u64::from).collect(),
        d => panic!("no comparison for {d:?}"),
    }
}

fn assert_same(got: &HashMap<String, Tensor>, want: &[(String, Tensor)]) {
    let got_names: BTreeSet<&str> = got.keys().map(String::as_str).collect();
    let want_names: BTreeSet<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got_names, want_names);
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.dtype(), w.dtype(), "{name}");
        assert_eq!(g.dims(), w.dims(), "{name}");
        assert_eq!(values(g), values(w), "{name}");
        assert!(g.device().is_cpu(), "{name}");
    }
}

/// Entries of `dir` other than `keep`: temporary files a write left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

fn stored_metadata(path: &Path) -> Option<HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().clone()
}

/// The documented hash, computed independently of the library.
fn documented_hash(tensors: &[(String, Tensor)]) -> String {
    fn len(h: &mut Sha256, n: usize) {
        h.update((n as u64).to_le_bytes());
    }
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    len(&mut h, sorted.len());
    for (name, t) in sorted {
        len(&mut h, name.len());
        h.update(name.as_bytes());
        let dtype = match t.dtype() {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U32 => "U32",
            d => panic!("no name for {d:?}"),
        };
        len(&mut h, dtype.len());
        h.update(dtype.as_bytes());
        len(&mut h, t.rank());
        for &d in t.dims() {
            len(&mut h, d);
        }
        let flat = t.flatten_all().unwrap();
        let data: Vec<u8> = match t.dtype() {
            DType::F32 => {
                flat.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DType::F64 => {
                flat.to_vec1::<f64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DType::I64 => {
                flat.to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DType::U32 => {
                flat.to_vec1::<u32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            _ => unreachable!(),
        };
        len(&mut h, data.len());
        h.update(&data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Offset of the tensor data in a safetensors file: after the 8-byte header length and header.
fn data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

fn saved_sample(dir: &Path) -> (std::path::PathBuf, Vec<(String, Tensor)>) {
    let path = dir.join("model.safetensors");
    let tensors = sample();
    save_tensors(&path, &tensors).unwrap();
    (path, tensors)
}

#[test]
fn round_trip_keeps_names_dtypes_shapes_and_values() {
    let dir = tempdir();
    let (path, tensors) = saved_sample(dir.path());
    assert_same(&load_tensors(&path).unwrap(), &tensors);
}

#[test]
fn metadata_holds_the_documented_content_hash() {
    let dir = tempdir();
    let (path, tensors) = saved_sample(dir.path());
    let metadata = stored_metadata(&path).expect("a __metadata__ section");
    let stored = &metadata[HASH_KEY];
    assert_eq!(stored.len(), 64);
    assert!(stored.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(*stored, documented_hash(&tensors));
    let loaded = load_tensors(&path).unwrap();
    assert_eq!(content_hash(&loaded).unwrap(), *stored);
    let input: HashMap<String, Tensor> = tensors.into_iter().collect();
    assert_eq!(content_hash(&input).unwrap(), *stored);
}

#[test]
fn content_hash_sees_every_part_of_a_tensor() {
    let cpu = &Device::Cpu;
    let one = |name: &str, t: Tensor| HashMap::from([(name.to_string(), t)]);
    let base = content_hash(&one("w", Tensor::new(&[1f32, 2., 3., 4.], cpu).unwrap())).unwrap();
    let variants = [
        one("v", Tensor::new(&[1f32, 2., 3., 4.], cpu).unwrap()),
        one("w", Tensor::new(&[1f32, 2., 3., 5.], cpu).unwrap()),
        one("w", Tensor::new(&[[1f32, 2.], [3., 4.]], cpu).unwrap()),
        one("w", Tensor::new(&[1u32, 2, 3, 4], cpu).unwrap().to_dtype(DType::U32).unwrap()),
        one("w", Tensor::new(&[1i64, 2, 3, 4], cpu).unwrap()),
    ];
    for v in &variants {
        assert_ne!(content_hash(v).unwrap(), base, "{v:?}");
    }
    // Framing: moving a byte between a name and the next field changes the hash.
    let a = HashMap::from([
        ("ab".to_string(), Tensor::new(&[1f32], cpu).unwrap()),
        ("c".to_string(), Tensor::new(&[2f32], cpu).unwrap()),
    ]);
    let b = HashMap::from([
        ("a".to_string(), Tensor::new(&[1f32], cpu).unwrap()),
        ("bc".to_string(), Tensor::new(&[2f32], cpu).unwrap()),
    ]);
    assert_ne!(content_hash(&a).unwrap(), content_hash(&b).unwrap());
}

fn assert_corrupted(path: &Path) {
    let err = format!("{:#}", load_tensors(path).unwrap_err());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("corrupted"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn a_flipped_bit_in_the_data_is_an_error_naming_the_file() {
    let dir = tempdir();
    let (path, _) = saved_sample(dir.path());
    let clean = std::fs::read(&path).unwrap();
    let start = data_start(&clean);
    // Every tensor's region: first, middle and last data byte.
    for at in [start, (start + clean.len()) / 2, clean.len() - 1] {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_corrupted(&path);
    }
    std::fs::write(&path, &clean).unwrap();
    assert!(load_tensors(&path).is_ok());
}

#[test]
fn a_flipped_bit_in_a_name_is_an_error_naming_the_file() {
    let dir = tempdir();
    let (path, _) = saved_sample(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.windows(8).position(|w| w == b"a.weight").unwrap();
    bytes[at] ^= 0x01; // 'a' -> '`': still valid JSON, a different name
    std::fs::write(&path, &bytes).unwrap();
    assert_corrupted(&path);
}

#[test]
fn a_truncated_file_is_a_one_line_error_naming_it() {
    let dir = tempdir();
    let (path, _) = saved_sample(dir.path());
    let clean = std::fs::read(&path).unwrap();
    for len in [clean.len() - 1, data_start(&clean), 20, 4, 0] {
        std::fs::write(&path, &clean[..len]).unwrap();
        let err = format!("{:#}", load_tensors(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{len}: {err}");
        assert!(err.contains("truncated"), "{len}: {err}");
        assert!(!err.contains('\n'), "{len}: {err}");
    }
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let dir = tempdir();
    let path = dir.path().join("checkpoint.safetensors");
    let err = format!("{:#}", load_tensors(&path).unwrap_err());
    assert!(err.contains(&path.display().to_string()) && err.contains("not found"), "{err}");
}

#[test]
fn a_file_without_a_hash_still_loads() {
    let dir = tempdir();
    let path = dir.path().join("old.safetensors");
    let tensors = sample();
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    assert_eq!(stored_metadata(&path), None);
    assert_same(&load_tensors(&path).unwrap(), &tensors);
}

#[test]
fn saving_over_a_file_replaces_it_and_leaves_no_temporary_file() {
    let dir = tempdir();
    let (path, _) = saved_sample(dir.path());
    assert_eq!(leftovers(dir.path(), &["model.safetensors"]), Vec::<String>::new());
    let newer = vec![("x".to_string(), Tensor::new(&[9f64, 8.], &Device::Cpu).unwrap())];
    save_tensors(&path, &newer).unwrap();
    assert_same(&load_tensors(&path).unwrap(), &newer);
    assert_eq!(leftovers(dir.path(), &["model.safetensors"]), Vec::<String>::new());
}

#[test]
fn a_failed_save_names_the_file_and_leaves_no_temporary_file() {
    let dir = tempdir();
    let target = dir.path().join("model.safetensors");
    std::fs::create_dir(&target).unwrap(); // a directory cannot be replaced by a file
    let err = format!("{:#}", save_tensors(&target, &sample()).unwrap_err());
    assert!(err.contains(&target.display().to_string()), "{err}");
    assert!(!err.contains('\n'), "{err}");
    assert_eq!(leftovers(dir.path(), &["model.safetensors"]), Vec::<String>::new());
    assert!(target.is_dir() && std::fs::read_dir(&target).unwrap().next().is_none());
}

#[test]
fn concurrent_saves_of_one_file_all_succeed() {
    let dir = tempdir();
    let path = dir.path().join("checkpoint.safetensors");
    let sets: Vec<Vec<(String, Tensor)>> = (0..8)
        .map(|i| vec![("step".to_string(), Tensor::new(&[i as i64], &Device::Cpu).unwrap())])
        .collect();
    std::thread::scope(|s| {
        for set in &sets {
            let path = &path;
            s.spawn(move || {
                for _ in 0..5 {
                    save_tensors(path, set).unwrap();
                }
            });
        }
    });
    let step = values(&load_tensors(&path).unwrap()["step"]);
    assert!(step.len() == 1 && step[0] < 8);
    assert_eq!(leftovers(dir.path(), &["checkpoint.safetensors"]), Vec::<String>::new());
}

#[test]
fn write_atomic_writes_replaces_and_leaves_no_temporary_file() {
    let dir = tempdir();
    let path = dir.path().join("nested/config.json");
    write_atomic(&path, b"first").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"first");
    write_atomic(&path, b"second, longer").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
    assert_eq!(leftovers(&dir.path().join("nested"), &["config.json"]), Vec::<String>::new());
}

#[test]
fn a_failed_write_atomic_names_the_file_and_leaves_no_temporary_file() {
    let dir = tempdir();
    let target = dir.path().join("metrics.csv");
    std::fs::create_dir(&target).unwrap();
    let err = format!("{:#}", write_atomic(&target, b"data").unwrap_err());
    assert!(err.contains(&target.display().to_string()), "{err}");
    assert!(!err.contains('\n'), "{err}");
    assert_eq!(leftovers(dir.path(), &["metrics.csv"]), Vec::<String>::new());
}
