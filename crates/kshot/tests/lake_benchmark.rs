//! Lake's 20-way one-shot benchmark: the demo's scoring rule on hand-made cases, the real archive's
//! layout, the demo's own baseline (modified Hausdorff distance, 38.8% error) reproduced through our
//! reader and scorer, and the refusal to score runs that saw the evaluation alphabets.

mod common;

use kshot::data::lake_runs::{self, LakeReport, LakeRun, LumaImage};

fn blank() -> LumaImage {
    LumaImage { width: 1, height: 1, luma: vec![255] }
}

fn run(answers: &[&str]) -> LakeRun {
    let mut train_files: Vec<String> = answers.iter().map(|s| s.to_string()).collect();
    train_files.sort();
    let test_files: Vec<String> =
        (1..=answers.len()).map(|i| format!("r/test/item{i:02}.png")).collect();
    LakeRun {
        name: "r".into(),
        train: vec![blank(); answers.len()],
        test: vec![blank(); answers.len()],
        train_files,
        test_files,
        answers: answers.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn scorer_follows_the_demo_by_hand() {
    // class_labels.txt: item01 → class03, item02 → class01, item03 → class02.
    let r = run(&["r/training/class03.png", "r/training/class01.png", "r/training/class02.png"]);
    // Sorted training files: class01, class02, class03 (columns 0, 1, 2).
    let scores = vec![
        vec![0.1, 0.2, 0.9], // item01 → class03: correct
        vec![0.5, 0.4, 0.0], // item02 → class01: correct
        vec![0.3, 0.1, 0.3], // item03: tie between class01 and class03, the first wins → class01: wrong
    ];
    let err = lake_runs::score_run(&r, &scores).unwrap();
    assert!((err - 100.0 / 3.0).abs() < 1e-12, "error {err}");
    // All wrong: item01 and item02 pick class02, item03 picks class01.
    let all_wrong = vec![vec![0.0, 1.0, 0.0], vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 0.5]];
    assert_eq!(lake_runs::score_run(&r, &all_wrong).unwrap(), 100.0);
    // Wrong shape is an error, not a panic.
    assert!(lake_runs::score_run(&r, &scores[..2]).is_err());
    // The benchmark's number is the mean of the per-run errors.
    let report = LakeReport::from_runs(vec![("a".into(), 10.0), ("b".into(), 25.0)]);
    assert_eq!((report.error, report.accuracy), (17.5, 82.5));
}

fn lake_archive() -> Vec<LakeRun> {
    lake_runs::load(&lake_runs::archive_path(&common::data_root())).unwrap()
}

#[test]
fn archive_has_twenty_runs_of_twenty_trials() {
    let runs = lake_archive();
    assert_eq!(runs.len(), 20);
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.name, format!("run{:02}", i + 1));
        assert_eq!((r.train.len(), r.test.len(), r.answers.len()), (20, 20, 20));
        assert!(r.train.iter().chain(&r.test).all(|im| (im.width, im.height) == (105, 105)));
        let mut answers = r.answers.clone();
        answers.sort();
        assert_eq!(
            answers, r.train_files,
            "{}: every training image is the answer exactly once",
            r.name
        );
        assert_eq!(r.test_files[0], format!("{}/test/item01.png", r.name));
    }
    // run01/class_labels.txt begins `run01/test/item01.png run01/training/class08.png`.
    assert_eq!(runs[0].answers[0], "run01/training/class08.png");
    let err =
        lake_runs::load(std::path::Path::new("/nonexistent/all_runs.zip")).unwrap_err().to_string();
    assert!(err.contains("all_runs.zip") && err.contains("DATA_DIR/omniglot"), "{err}");
}

/// Inked pixels (black in the 1-bit originals) as coordinates, centred on their mean, as the
/// demo's `LoadImgAsPoints`.
fn points(im: &LumaImage) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = Vec::new();
    for r in 0..im.height {
        for c in 0..im.width {
            if im.luma[r * im.width + c] < 128 {
                p.push((r as f64, c as f64));
            }
        }
    }
    let n = p.len() as f64;
    let (mr, mc) = p.iter().fold((0.0, 0.0), |a, q| (a.0 + q.0, a.1 + q.1));
    p.iter().map(|q| (q.0 - mr / n, q.1 - mc / n)).collect()
}

/// The demo's `ModHausdorffDistance`.
fn modified_hausdorff(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    let mean_min = |x: &[(f64, f64)], y: &[(f64, f64)]| {
        x.iter()
            .map(|p| {
                y.iter()
                    .map(|q| (p.0 - q.0).powi(2) + (p.1 - q.1).powi(2))
                    .fold(f64::INFINITY, f64::min)
                    .sqrt()
            })
            .sum::<f64>()
            / x.len() as f64
    };
    mean_min(a, b).max(mean_min(b, a))
}

#[test]
fn modified_hausdorff_baseline_reproduces_the_demos_38_8_percent() {
    // demo_classification.py: "Running this demo should lead to a result of 38.8 percent errors."
    let runs = lake_archive();
    let mut errors = Vec::new();
    for r in &runs {
        let train: Vec<_> = r.train.iter().map(points).collect();
        let test: Vec<_> = r.test.iter().map(points).collect();
        let scores: Vec<Vec<f64>> = test
            .iter()
            .map(|t| train.iter().map(|c| -modified_hausdorff(t, c)).collect())
            .collect();
        errors.push((r.name.clone(), lake_runs::score_run(r, &scores).unwrap()));
    }
    let report = LakeReport::from_runs(errors);
    assert!(
        (report.error - 38.8).abs() < 0.05 + 1e-9,
        "average error {}% (the demo: 38.8%)",
        report.error
    );
}

#[test]
fn lake_benchmark_refuses_runs_that_saw_the_evaluation_alphabets() {
    let vinyals = kshot::presets::default_config();
    let why = kshot::eval::lake_benchmark_ineligibility(&vinyals)
        .expect("a Vinyals-split run is contaminated");
    assert!(why.contains("--split lake"), "{why}");
    let lake = kshot::presets::config("siamese-omniglot-28").unwrap();
    assert_eq!(kshot::eval::lake_benchmark_ineligibility(&lake), None);
}
