//! `kshot predict`, `kshot eval --model … --dataset folder`, `kshot models`, `kshot embed` and
//! training on a folder, end to end with the built-in models and the README's example images.

mod common;

use std::path::{Path, PathBuf};

use common::run as kshot;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/omniglot")
}

fn ok(args: &[&str]) -> String {
    let out = kshot(args);
    assert!(
        out.status.success(),
        "kshot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = kshot(args);
    assert!(!out.status.success(), "kshot {args:?} should fail");
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    e
}

fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Copies the example support set into `dir` with the class folders renamed by `rename`.
fn copy_support(dir: &Path, rename: impl Fn(&str) -> String) {
    copy_classes("support", dir, rename);
}

/// Adds the example query images to the class folders of `dir`: 3 drawings a class in all.
fn add_queries(dir: &Path) {
    copy_classes("query", dir, |n| n.to_string());
}

fn copy_classes(from: &str, dir: &Path, rename: impl Fn(&str) -> String) {
    for class in std::fs::read_dir(examples().join(from)).unwrap() {
        let class = class.unwrap().path();
        let name = class.file_name().unwrap().to_string_lossy().into_owned();
        let to = dir.join(rename(&name));
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn the_readme_example_classifies_unseen_characters() {
    let support = examples().join("support");
    let query = examples().join("query");
    let out = ok(&[
        "predict",
        "--support",
        support.to_str().unwrap(),
        "--query",
        query.to_str().unwrap(),
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 10);
    let mut correct = 0;
    for l in &lines {
        let probs = l["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 5);
        let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "probabilities sum to {sum}");
        let query = l["query"].as_str().unwrap();
        let truth = Path::new(query).parent().unwrap().file_name().unwrap().to_str().unwrap();
        correct += usize::from(l["class"] == truth);
    }
    // Ten queries of five Tengwar characters the model never trained on.
    assert!(correct >= 9, "{correct} of 10 correct");
}

#[test]
fn renaming_the_support_classes_permutes_the_probabilities_and_nothing_else() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    copy_support(&a, |n| n.to_string());
    // Reversed names: label order is name order, so every label moves.
    copy_support(&b, |n| {
        format!("z{}", 9 - n.trim_start_matches("tengwar-0").parse::<u32>().unwrap())
    });
    let query = examples().join("query");
    let run = |dir: &Path| {
        json_lines(&ok(&[
            "predict",
            "--support",
            dir.to_str().unwrap(),
            "--query",
            query.to_str().unwrap(),
            "--json",
        ]))
    };
    let (pa, pb) = (run(&a), run(&b));
    for (x, y) in pa.iter().zip(&pb) {
        assert_eq!(x["query"], y["query"]);
        for (name, p) in x["probabilities"].as_object().unwrap() {
            let renamed =
                format!("z{}", 9 - name.trim_start_matches("tengwar-0").parse::<u32>().unwrap());
            let q = y["probabilities"][&renamed].as_f64().unwrap();
            assert!((p.as_f64().unwrap() - q).abs() < 1e-6, "{name}: {p} vs {renamed}: {q}");
        }
        let class = x["class"].as_str().unwrap();
        let renamed =
            format!("z{}", 9 - class.trim_start_matches("tengwar-0").parse::<u32>().unwrap());
        assert_eq!(y["class"], renamed.as_str());
    }
}

#[test]
fn rejection_answers_none_of_these_below_the_threshold() {
    let support = examples().join("support");
    let query = examples().join("query");
    let out = ok(&[
        "predict",
        "--support",
        support.to_str().unwrap(),
        "--query",
        query.to_str().unwrap(),
        "--json",
        "--reject-below",
        "0.9999999",
    ]);
    for l in json_lines(&out) {
        let top = l["probabilities"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(0.0, f64::max);
        assert_eq!(l["class"].is_null(), top < 0.9999999, "{l}");
    }
    let csv = ok(&[
        "predict",
        "--support",
        support.to_str().unwrap(),
        "--query",
        query.to_str().unwrap(),
        "--csv",
    ]);
    let mut rows = csv.lines();
    assert_eq!(
        rows.next().unwrap(),
        "query,class,p_tengwar-01,p_tengwar-02,p_tengwar-03,p_tengwar-04,p_tengwar-05"
    );
    assert_eq!(rows.count(), 10);
    let e = fails(&[
        "predict",
        "--support",
        support.to_str().unwrap(),
        "--query",
        query.to_str().unwrap(),
        "--reject-below",
        "2",
    ]);
    assert!(e.contains("between 0 and 1"), "{e}");
}

#[test]
fn predict_errors_name_what_to_fix() {
    let t = tempfile::tempdir().unwrap();
    let support = t.path().join("support");
    copy_support(&support, |n| n.to_string());
    let s = support.to_str().unwrap();
    let query = examples().join("query");
    let q = query.to_str().unwrap();
    std::fs::create_dir(support.join("empty")).unwrap();
    let e = fails(&["predict", "--support", s, "--query", q]);
    assert!(e.contains("empty") && e.contains("holds no images"), "{e}");
    std::fs::remove_dir(support.join("empty")).unwrap();
    let bad = t.path().join("bad.png");
    std::fs::write(&bad, b"garbage").unwrap();
    let e = fails(&["predict", "--support", s, "--query", bad.to_str().unwrap()]);
    assert!(e.contains("bad.png") && e.contains("cannot decode"), "{e}");
    let e = fails(&["predict", "--model", "no-such-model", "--support", s, "--query", q]);
    assert!(e.contains("no-such-model") && e.contains("omniglot"), "{e}");
}

#[test]
fn eval_scores_a_folder_with_a_built_in_model_and_names_the_data() {
    let query = examples().join("query");
    let q = query.to_str().unwrap();
    let common = [
        "eval",
        "--model",
        "omniglot",
        "--dataset",
        "folder",
        "--ways",
        "5",
        "--shots",
        "1",
        "--queries",
        "1",
        "--episodes",
        "20",
        "--seed",
        "0",
        "--json",
    ];
    let mut args = common.to_vec();
    args.extend(["--data-dir", q]);
    let report: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert!(report["accuracy"].as_f64().unwrap() > 0.8, "{report}");
    assert_eq!(report["run"], "omniglot");
    let fingerprint = report["data_fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fingerprint.len(), 16);
    assert!(report["data_root"].as_str().unwrap().ends_with("query"), "{report}");
    // Another folder laid out the same way prints another fingerprint.
    let t = tempfile::tempdir().unwrap();
    copy_support(t.path(), |n| n.to_string());
    add_queries(t.path());
    let mut args = common.to_vec();
    args.extend(["--data-dir", t.path().to_str().unwrap()]);
    let other: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_ne!(other["data_fingerprint"].as_str().unwrap(), fingerprint);
    let e = fails(&[
        "eval",
        "--model",
        "omniglot",
        "--dataset",
        "folder",
        "--data-dir",
        q,
        "--ways",
        "6",
        "--shots",
        "1",
        "--queries",
        "1",
        "--episodes",
        "2",
    ]);
    assert!(e.contains("5 classes") && e.contains("6-way"), "{e}");
}

#[test]
fn models_lists_the_built_in_models_with_provenance_and_scores() {
    let out = ok(&["models", "--json"]);
    let models: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["omniglot", "mini-imagenet"]);
    for m in &models {
        let card = &m["card"];
        assert!(card["trained_with"].as_str().unwrap().starts_with("kshot train"), "{m}");
        assert!(!card["scores"].as_array().unwrap().is_empty(), "{m}");
        assert!(card["calibration"]["temperature"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(models[0]["channels"], 1);
    assert_eq!(models[1]["channels"], 3);
    let text = ok(&["models"]);
    assert!(text.contains("omniglot (default)") && text.contains("300 of the 600"), "{text}");
}

#[test]
fn embed_writes_one_row_per_image_with_the_file_names() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("e.safetensors");
    let query = examples().join("query");
    ok(&["embed", query.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let files: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["files"]).unwrap();
    assert_eq!(files.len(), 10);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("embeddings").unwrap().shape(), [10, 64]);
    let npy = t.path().join("e.npy");
    ok(&["embed", query.to_str().unwrap(), "--out", npy.to_str().unwrap()]);
    let bytes = std::fs::read(&npy).unwrap();
    assert!(bytes.starts_with(b"\x93NUMPY\x01\x00"));
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0);
    assert!(String::from_utf8_lossy(&bytes[10..10 + header_len]).contains("'shape': (10, 64)"));
    assert_eq!(bytes.len(), 10 + header_len + 10 * 64 * 4);
    let names = std::fs::read_to_string(t.path().join("e.files.txt")).unwrap();
    assert_eq!(names.lines().collect::<Vec<_>>(), files);
}

#[test]
fn a_folder_trains_evaluates_and_predicts() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    // The ten example query images and five support images: 5 classes of 3 drawings.
    copy_support(&data, |n| n.to_string());
    add_queries(&data);
    let run = t.path().join("run");
    let (d, r) = (data.to_str().unwrap(), run.to_str().unwrap());
    ok(&[
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        d,
        "--split",
        "all",
        "--channels",
        "1",
        "--image-size",
        "28",
        "--polarity",
        "ink",
        "--method",
        "protonet",
        "--train-ways",
        "3",
        "--shots",
        "1",
        "--queries",
        "1",
        "--episodes",
        "3",
        "--out",
        r,
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["data"]["dataset"], "folder");
    assert_eq!(config["data"]["polarity"], "ink");
    assert_eq!(config["data"]["image_size"], 28);
    let report: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--run",
            r,
            "--ways",
            "5",
            "--shots",
            "1",
            "--queries",
            "2",
            "--episodes",
            "5",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(report["dataset"], "folder");
    let support = examples().join("support");
    let lines = json_lines(&ok(&[
        "predict",
        "--model",
        r,
        "--support",
        support.to_str().unwrap(),
        "--query",
        d,
        "--json",
    ]));
    assert_eq!(lines.len(), 15);
    let e = fails(&[
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        d,
        "--channels",
        "3",
        "--polarity",
        "ink",
        "--out",
        t.path().join("x").to_str().unwrap(),
    ]);
    assert!(e.contains("grayscale"), "{e}");
    let e = fails(&["train", "--polarity", "ink", "--out", t.path().join("y").to_str().unwrap()]);
    assert!(e.contains("--dataset folder"), "{e}");
}
