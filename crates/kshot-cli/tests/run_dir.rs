//! Run directories end to end with the `kshot` binary on real Omniglot (../shared/data or
//! $KSHOT_DATA): a new run never writes over files that are not its own, a start that stopped
//! before its first checkpoint can start again, a run stopped early says where it stopped, and
//! `kshot plot` draws a run's curves.

mod common;

use std::path::Path;
use std::process::Output;

use common::{run, stderr};

/// `kshot train` of a small, fast ProtoNet run into `dir`.
fn train(dir: &Path, extra: &[&str]) -> Output {
    let dir = dir.display().to_string();
    let mut args = vec![
        "train",
        "--method",
        "protonet",
        "--train-ways",
        "5",
        "--shots",
        "1",
        "--queries",
        "1",
        "--val-every",
        "0",
        "--out",
        &dir,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The names in `dir` with their contents, sorted.
fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_non_empty_directory_that_is_not_a_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("project");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    std::fs::write(dir.join("metrics.csv"), "episode,loss\n1,2\n").unwrap();
    let before = listing(&dir);
    let out = train(&dir, &["--episodes", "2"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a new run was written into a project folder");
    assert!(
        err.contains(&format!(
            "{} is not empty and is not a kshot run (found metrics.csv",
            dir.display()
        )) && err.contains("choose an empty or new --out directory"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert_eq!(listing(&dir), before, "the refused run wrote into the directory");

    std::fs::remove_file(dir.join("metrics.csv")).unwrap();
    let err = stderr(&train(&dir, &["--episodes", "2"]));
    assert!(err.contains("(found notes.txt)"), "{err}");
    assert_eq!(listing(&dir).len(), 1);
}

#[test]
fn a_start_that_stopped_before_its_first_checkpoint_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{\"from\": \"the failed start\"}").unwrap();
    std::fs::write(
        dir.join("metrics.csv"),
        "episode,loss,accuracy,lr,seconds,val_accuracy,val_ci95,val_loss,event\n",
    )
    .unwrap();
    std::fs::write(dir.join(".checkpoint.safetensors.4242.0.tmp"), "half a checkpoint").unwrap();

    let d = dir.display().to_string();
    let out = run(&["train", "--resume", &d]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{d}'s run stopped before its first checkpoint; start it again with the same kshot train command (without --resume)")),
        "{err}"
    );

    let out = train(&dir, &["--episodes", "2"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "starting again in {d}: its earlier start stopped before the first checkpoint"
        )),
        "{err}"
    );
    let names: Vec<String> = listing(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["checkpoint.safetensors", "config.json", "metrics.csv", "model.safetensors"]
    );
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"episodes\": 2"), "{config}");
    assert_eq!(std::fs::read_to_string(dir.join("metrics.csv")).unwrap().lines().count(), 3);
}

#[test]
fn an_existing_run_is_refused_with_the_resume_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = train(&dir, &["--episodes", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = listing(&dir);
    let out = train(&dir, &["--episodes", "2"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "{} already holds a run; continue it with `kshot train --resume {}`",
            dir.display(),
            dir.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert_eq!(listing(&dir), before);
}

/// The last lines of a run that `--max-minutes` stops: where it stopped (not its length), how to
/// resume, and how to plot it.
#[test]
fn a_run_stopped_by_max_minutes_says_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let d = dir.display().to_string();
    let out = train(&dir, &["--episodes", "100000", "--max-minutes", "0.01"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.starts_with("stopped after ")).expect(&err);
    let done: u64 = line["stopped after ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(line.contains(&format!("stopped after {done} of 100000 episodes")), "{line}");
    assert!(done < 100000, "{line}");
    assert!(
        err.contains(&format!(
            "episode {done}/100000, stopped (--max-minutes 0.01); resume with kshot train --resume {d}"
        )),
        "{err}"
    );
    assert_eq!(
        err.trim().lines().last(),
        Some(format!("plot the learning curves: kshot plot {d}").as_str())
    );
    let tensors = kshot::checkpoint::load_tensors(&dir.join("checkpoint.safetensors")).unwrap();
    assert_eq!(tensors["progress.episodes"].to_vec1::<i64>().unwrap()[0] as u64, done);
}

#[test]
fn plot_draws_a_runs_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = train(&dir, &["--episodes", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = dir.display().to_string();
    let out = run(&["plot", &d, "--width", "500", "--height", "400"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let png = dir.join("curves.png");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), png.display().to_string());
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    // Width and height from the IHDR chunk.
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (500, 400));

    let elsewhere = tmp.path().join("elsewhere.png");
    let out = run(&["plot", &d, "--out", &elsewhere.display().to_string()]);
    assert!(out.status.success() && elsewhere.exists(), "{}", stderr(&out));

    let out = run(&["plot", &tmp.path().display().to_string()]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&tmp.path().display().to_string())
            && err.contains("is this a kshot run directory?"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
}
