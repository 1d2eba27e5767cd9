//! Lake et al.'s 20-way within-alphabet one-shot benchmark (`omniglot/all_runs.zip`, from
//! `brendenlake/omniglot/python/one-shot-classification`), scored exactly as its official demo
//! (`demo_classification.py`) scores it.
//!
//! The archive holds 20 runs, `runNN/`, each with 20 training images (`training/classNN.png`, one
//! per character), 20 test images (`test/itemNN.png`) and `class_labels.txt`, one line
//! `runNN/test/itemXX.png runNN/training/classYY.png` per test image. The characters come from the
//! 20 *evaluation* alphabets, each run from one alphabet, so a model scored here must have been
//! trained on the background alphabets only (`--split lake`).
//!
//! The demo's scoring, reproduced in [`score_run`]: sort the test and the training file names;
//! score every (test, training) pair; each test image's prediction is the training image with the
//! best score (the first one on ties, as `np.argmax`); test image *i* (in sorted order) is correct
//! when the predicted training file equals the training file on line *i* of `class_labels.txt`; a
//! run's error is 100 − percent correct, and the benchmark reports the mean error over the runs.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::omniglot::{decode_luma, preprocess};

/// Where the benchmark lives under a data root.
pub fn archive_path(root: &Path) -> PathBuf {
    root.join("omniglot").join("all_runs.zip")
}

/// One decoded image: 8-bit luma (white background, black ink), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LumaImage {
    pub width: usize,
    pub height: usize,
    pub luma: Vec<u8>,
}

impl LumaImage {
    /// Ink values at `size`×`size` as the Omniglot loader produces them (see
    /// [`super::omniglot::preprocess`]), so a model sees the benchmark as it saw its training data.
    pub fn ink(&self, size: usize) -> Vec<u8> {
        preprocess(&self.luma, self.width, self.height, size)
    }
}

/// One run of 20 trials.
#[derive(Debug, Clone, PartialEq)]
pub struct LakeRun {
    /// e.g. `run01`.
    pub name: String,
    /// Training file names (`runNN/training/classYY.png`), sorted, and their images.
    pub train_files: Vec<String>,
    pub train: Vec<LumaImage>,
    /// Test file names, sorted, and their images.
    pub test_files: Vec<String>,
    pub test: Vec<LumaImage>,
    /// The training file of each line of `class_labels.txt`, in file order (the demo's
    /// `answers_files`).
    pub answers: Vec<String>,
}

/// Per-run error (percent) and its mean over runs, as the demo prints them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LakeReport {
    pub runs: Vec<(String, f64)>,
    /// Mean of the per-run errors, in percent.
    pub error: f64,
    /// 100 − error, in percent.
    pub accuracy: f64,
}

impl LakeReport {
    pub fn from_runs(runs: Vec<(String, f64)>) -> Self {
        let error = runs.iter().map(|r| r.1).sum::<f64>() / runs.len().max(1) as f64;
        Self { runs, error, accuracy: 100.0 - error }
    }
}

/// The demo's error for one run: `scores[i][j]` scores sorted test image i against sorted training
/// image j (larger: more similar; pass negated costs for a distance).
pub fn score_run(run: &LakeRun, scores: &[Vec<f64>]) -> Result<f64> {
    if scores.len() != run.test_files.len()
        || scores.iter().any(|r| r.len() != run.train_files.len())
    {
        bail!(
            "{}: the score matrix must be {}×{} (test × training images)",
            run.name,
            run.test_files.len(),
            run.train_files.len()
        );
    }
    let mut correct = 0usize;
    for (i, row) in scores.iter().enumerate() {
        // np.argmax: the first maximum. NaN never wins.
        let mut best = 0;
        for (j, &s) in row.iter().enumerate() {
            if s > row[best] || (row[best].is_nan() && !s.is_nan()) {
                best = j;
            }
        }
        if run.train_files[best] == run.answers[i] {
            correct += 1;
        }
    }
    Ok(100.0 - 100.0 * correct as f64 / run.test_files.len() as f64)
}

/// Reads every run of the benchmark archive at `path`.
pub fn load(path: &Path) -> Result<Vec<LakeRun>> {
    let file = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {}; the Lake benchmark is `all_runs.zip` from brendenlake/omniglot (python/one-shot-classification), \
             put it in DATA_DIR/omniglot/",
            path.display()
        )
    })?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| anyhow!("{}: not a readable zip ({e})", path.display()))?;
    let mut names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("{}: unreadable entry name ({e})", path.display()))?;
    names.sort();
    let label_files: Vec<String> =
        names.iter().filter(|n| n.ends_with("/class_labels.txt")).cloned().collect();
    if label_files.is_empty() {
        bail!("{}: no runNN/class_labels.txt inside; is this Lake's all_runs.zip?", path.display());
    }
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut entry = zip.by_name(name).map_err(|_| {
            anyhow!("{}: `{name}` is missing, though class_labels.txt names it", path.display())
        })?;
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .with_context(|| format!("{}: cannot read `{name}`", path.display()))?;
        Ok(bytes)
    };
    let mut runs = Vec::new();
    for labels in &label_files {
        let run_name = labels.trim_end_matches("/class_labels.txt").to_string();
        let text = String::from_utf8_lossy(&read(labels)?).into_owned();
        let pairs: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split_whitespace();
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(anyhow!("{}: `{labels}` has a malformed line `{l}`", path.display())),
                }
            })
            .collect::<Result<_>>()?;
        let answers: Vec<String> = pairs.iter().map(|p| p.1.clone()).collect();
        let mut test_files: Vec<String> = pairs.iter().map(|p| p.0.clone()).collect();
        let mut train_files = answers.clone();
        test_files.sort();
        train_files.sort();
        let mut decode = |f: &str| -> Result<LumaImage> {
            let (luma, width, height) =
                decode_luma(&read(f)?).with_context(|| format!("{}: `{f}`", path.display()))?;
            Ok(LumaImage { width, height, luma })
        };
        let train = train_files.iter().map(|f| decode(f)).collect::<Result<Vec<_>>>()?;
        let test = test_files.iter().map(|f| decode(f)).collect::<Result<Vec<_>>>()?;
        runs.push(LakeRun { name: run_name, train_files, train, test_files, test, answers });
    }
    Ok(runs)
}
