//! The `kshot` binary end to end on real Omniglot (../shared/data or $KSHOT_DATA): flags that would
//! be silently ignored are refused, and a run killed mid-training resumes to the same model.

mod common;

use std::path::Path;

use common::{kshot, run, stderr};

/// A small, fast ProtoNet run on Omniglot.
const SMALL: &[&str] = &[
    "train",
    "--method",
    "protonet",
    "--train-ways",
    "5",
    "--shots",
    "1",
    "--queries",
    "2",
    "--val-every",
    "0",
    "--seed",
    "9",
];

fn small(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = SMALL.iter().map(|s| s.to_string()).collect();
    args.extend(["--out".to_string(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn resume_refuses_flags_it_would_ignore() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out = run(&args(&small(&dir, &["--episodes", "2"])));
    assert!(out.status.success(), "{}", stderr(&out));
    let dir_s = dir.display().to_string();
    for flag in [&["--lr", "0.1"][..], &["--meta-batch", "4"], &["--val-every", "5"], &["--fce"]] {
        let mut a = vec!["train", "--resume", dir_s.as_str()];
        a.extend_from_slice(flag);
        let out = run(&a);
        let err = stderr(&out);
        assert!(!out.status.success(), "{flag:?} was accepted on resume");
        assert!(err.contains(flag[0]) && err.contains("config.json"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    }
    // What --resume may change is applied and recorded.
    let out = run(&["train", "--resume", &dir_s, "--episodes", "3", "--checkpoint-every", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"checkpoint_every\": 1") && config.contains("\"episodes\": 3"));
}

#[test]
fn method_flags_of_another_method_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, value) in [("--fce", None), ("--inner-lr", Some("0.1")), ("--pairs", Some("8"))] {
        let mut extra = vec![flag];
        extra.extend(value);
        let out = run(&args(&small(&tmp.path().join("x"), &extra)));
        let err = stderr(&out);
        assert!(!out.status.success(), "{flag} accepted for protonet");
        assert!(err.contains(&format!("{flag} does not apply to --method protonet")), "{err}");
    }
    let out = run(&args(&small(&tmp.path().join("y"), &["--checkpoint-every", "0"])));
    assert!(!out.status.success() && stderr(&out).contains("--checkpoint-every"));
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("y").exists());
}

/// Train in one process, kill it (SIGKILL) after its first checkpoint, resume in another: the
/// model equals the uninterrupted run's, and the metrics hold one line per episode.
#[test]
fn a_killed_run_resumes_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let episodes = ["--episodes", "300", "--checkpoint-every", "10"];
    let out = run(&args(&small(&straight, &episodes)));
    assert!(out.status.success(), "{}", stderr(&out));

    let mut child = kshot(&args(&small(&split, &episodes)))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let checkpoint = split.join("checkpoint.safetensors");
    let started = std::time::Instant::now();
    while !checkpoint.exists() {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let tensors = kshot::checkpoint::load_tensors(&checkpoint).unwrap();
    let done = tensors["progress.episodes"].to_vec1::<i64>().unwrap()[0];
    assert!(done < 300, "the run finished before it was killed ({done} episodes)");

    let out = run(&["train", "--resume", &split.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let model =
        |dir: &Path| kshot::checkpoint::load_tensors(&dir.join("model.safetensors")).unwrap();
    let (a, b) = (model(&straight), model(&split));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let flat = |t: &kshot::Tensor| {
            t.to_dtype(kshot::DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        assert_eq!(
            flat(t),
            flat(&b[name]),
            "{name} differs after kill and resume (killed at {done})"
        );
    }
    let metrics = std::fs::read_to_string(split.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 301, "header + one line per episode");
}

/// ProtoNet's two-stage procedure end to end, on a fast setting: stage 1 stops early (patience 1,
/// validation every 5 episodes), says so on stdout, and `kshot eval` scores its best model; stage 2
/// (`--retrain-trainval`) trains on trainval for (best epoch + patience) epochs without validation.
#[test]
fn early_stopping_then_retrain_on_trainval() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    let mut a = small(&first, &["--episodes", "2000", "--lr", "0"]);
    // SMALL turns validation off; this run validates every 5 episodes on 3 episodes.
    let at = a.iter().position(|s| s == "--val-every").unwrap();
    a[at + 1] = "5".into();
    a.extend(["--val-episodes", "3", "--patience", "1"].map(String::from));
    let out = run(&args(&a));
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("early stopping after episode"), "{stdout}");
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(first.join("best.json")).unwrap()).unwrap();
    let best_episode = best["episode"].as_u64().unwrap();
    let out = run(&["eval", "--run", &first.display().to_string(), "--episodes", "3", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["model"], "best_model.safetensors");
    let out = run(&[
        "eval",
        "--run",
        &first.display().to_string(),
        "--episodes",
        "3",
        "--json",
        "--model",
        "last",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["model"], "model.safetensors");

    // A flag that would change the protocol is refused with the retrain.
    let out = run(&[
        "train",
        "--retrain-trainval",
        &first.display().to_string(),
        "--out",
        &second.display().to_string(),
        "--shots",
        "5",
    ]);
    assert!(!out.status.success() && stderr(&out).contains("--retrain-trainval"));
    let out = run(&[
        "train",
        "--retrain-trainval",
        &first.display().to_string(),
        "--out",
        &second.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = kshot::config::RunConfig::load(&second.join("config.json")).unwrap();
    // (best_episode / 5 − 1) + 1 epochs of 5 episodes.
    assert_eq!(c.episodes, best_episode);
    assert_eq!(c.data.train_subset, "trainval");
    assert!(c.validation.is_none());
    let metrics = std::fs::read_to_string(second.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count() as u64, best_episode + 1);
    assert!(!second.join("best_model.safetensors").exists());
}

/// `--resize` and `--invert` reach the run's config (and its own decoded-image cache entry);
/// a bad mode is a one-line error naming the choices.
#[test]
fn resize_and_invert_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let out =
        run(&args(&small(&dir, &["--episodes", "1", "--resize", "nearest", "--invert", "false"])));
    assert!(out.status.success(), "{}", stderr(&out));
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(config.contains("\"resize\": \"nearest\"") && config.contains("\"invert\": false"));
    let out = run(&args(&small(&tmp.path().join("x"), &["--resize", "bicubic"])));
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("area, nearest or bilinear-crop"), "{err}");
}
