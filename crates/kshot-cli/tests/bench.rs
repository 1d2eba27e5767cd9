//! `kshot bench --json`: one JSON object with the CPU and every workload's medians.

mod common;

use common::{run, stderr};
use kshot::bench::Workload;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench", "--json", "--reps", "1", "--warmup", "0", "--rounds", "1"];
    all.extend_from_slice(args);
    let out = run(&all);
    assert!(out.status.success(), "kshot bench failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("kshot bench --json prints one JSON object")
}

#[test]
fn bench_json_has_every_workload_and_the_cpu() {
    let report = bench_json(&[]);
    let workloads = report["workloads"].as_object().expect("a workloads object");
    assert_eq!(workloads.len(), Workload::ALL.len());
    for w in Workload::ALL {
        let row = &workloads[w.name()];
        assert!(row["kshot_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{}: {row}", w.name());
        assert!(row["pytorch_ms"].is_null() && row["ratio"].is_null(), "{}: {row}", w.name());
        assert_eq!(row["description"], w.describe());
    }
    let cpu = &report["cpu"];
    assert!(["avx512", "avx2-fma", "scalar"].contains(&cpu["gemm"].as_str().unwrap()), "{cpu}");
    assert_eq!(cpu["avx2_forced"], false);
    assert!(cpu["features"].is_array() && cpu["missing"].is_array());
    assert!(report["pytorch"].is_null());
}

#[test]
fn bench_cpu_avx2_forces_the_avx2_kernels() {
    let report = bench_json(&["--cpu", "avx2", "--workload", "predict-5w1s-1q"]);
    let cpu = &report["cpu"];
    assert_eq!(cpu["avx2_forced"], true);
    assert_eq!(cpu["avx512_used"], false);
    assert_ne!(cpu["gemm"], "avx512");
    assert_eq!(report["workloads"].as_object().unwrap().len(), 1);
}

#[test]
fn bench_rejects_an_unknown_cpu_choice_in_one_line() {
    let out = common::kshot(&["bench", "--workload", "predict-5w1s-1q"])
        .env("KSHOT_CPU", "avx512")
        .output()
        .expect("kshot runs");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("KSHOT_CPU") && err.contains("avx2"), "{err}");
}
