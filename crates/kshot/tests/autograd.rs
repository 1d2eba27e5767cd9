//! `autograd::second_order_available()` against what candle actually does: in this process after
//! `init()`, and in child processes started with `CANDLE_GRAD_DO_NOT_DETACH` set to values that
//! make candle detach (`0`, empty) or keep the graph (`false` is not `0`, so it keeps it).
//!
//! candle reads the variable once per thread, so each environment gets its own process: the
//! parent re-runs this test executable for the ignored test [`CHILD`] and reads its report.

use std::process::Command;

use candle_core::{Device, Var};
use kshot::autograd::{init, second_order_available, KEEP_GRAPH_VAR};

/// The ignored test a parent runs in a child process.
const CHILD: &str = "child_reports_candle_decision";
/// Marks the child's report line on its stdout.
const REPORT: &str = "KSHOT_AUTOGRAD_REPORT";

const X: f64 = 0.5;

/// f(x) = u³ with u = 2x, an intermediate node (so a detached gradient loses its dependence on x):
/// f'(x) = 24x², f''(x) = 48x. Returns (f'(X), f''(X)), the latter `None` when candle's first
/// gradient carries no graph back to x.
fn derivatives() -> (f64, Option<f64>) {
    let x = Var::new(X, &Device::Cpu).unwrap();
    let u = x.as_tensor().affine(2.0, 0.0).unwrap();
    let f = u.mul(&u).unwrap().mul(&u).unwrap();
    let first = f.backward().unwrap().get(x.as_tensor()).unwrap().clone();
    let second =
        first.backward().unwrap().get(x.as_tensor()).map(|t| t.to_scalar::<f64>().unwrap());
    (first.to_scalar::<f64>().unwrap(), second)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

#[test]
fn after_init_second_order_gradients_are_exact() {
    init();
    assert!(
        second_order_available(),
        "{KEEP_GRAPH_VAR}={:?} in this process",
        std::env::var_os(KEEP_GRAPH_VAR)
    );
    let (first, second) = derivatives();
    assert!(close(first, 24.0 * X * X), "f'({X}) = {first}");
    let second = second.expect("a second derivative");
    assert!(close(second, 48.0 * X), "f''({X}) = {second}");
}

/// Run by the parent tests in a fresh process; prints what `init()` left in the environment,
/// `second_order_available()` and what candle computed, and fails when the last two disagree.
#[test]
#[ignore = "run in a subprocess by the tests below, each with its own environment"]
fn child_reports_candle_decision() {
    init();
    let value = std::env::var_os(KEEP_GRAPH_VAR);
    let available = second_order_available();
    let (first, second) = derivatives();
    let keeps_graph = second.is_some_and(|s| s != 0.0);
    println!(
        "\n{REPORT} value={} available={available} first={first} second={}",
        match &value {
            Some(v) => format!("{:?}", v.to_string_lossy()),
            None => "unset".to_string(),
        },
        second.map_or("none".to_string(), |s| s.to_string())
    );
    assert!(close(first, 24.0 * X * X), "f'({X}) = {first}");
    assert_eq!(available, keeps_graph, "second_order_available() disagrees with candle");
}

/// What a child reported.
#[derive(Debug)]
struct Report {
    /// The variable after `init()`, as `"..."` (Debug-quoted) or `unset`.
    value: String,
    available: bool,
    /// f''(X) as candle computed it, `None` when it was missing.
    second: Option<f64>,
}

/// Runs [`CHILD`] with the variable set to `value` (removed when `None`).
fn run_child(value: Option<&str>) -> Report {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", CHILD, "--nocapture", "--ignored", "--test-threads=1"]);
    match value {
        Some(v) => cmd.env(KEEP_GRAPH_VAR, v),
        None => cmd.env_remove(KEEP_GRAPH_VAR),
    };
    let out = cmd.output().expect("the test executable runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child with {value:?} failed:\n{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find_map(|l| Some(l.split_once(REPORT)?.1))
        .unwrap_or_else(|| panic!("child with {value:?} did not report:\n{stdout}\n{stderr}"));
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_string()
    };
    Report {
        value: field("value"),
        available: field("available").parse().unwrap(),
        second: match field("second").as_str() {
            "none" => None,
            s => Some(s.parse().unwrap()),
        },
    }
}

fn assert_detached(value: &str) {
    let r = run_child(Some(value));
    assert_eq!(r.value, format!("{value:?}"), "init() must keep the user's value: {r:?}");
    assert!(!r.available, "{r:?}");
    assert!(r.second.is_none_or(|s| s == 0.0), "candle kept the graph: {r:?}");
}

#[test]
fn zero_means_detach_and_is_reported_unavailable() {
    assert_detached("0");
}

#[test]
fn empty_means_detach_and_is_reported_unavailable() {
    assert_detached("");
}

#[test]
fn unset_is_set_by_init_and_keeps_the_graph() {
    let r = run_child(None);
    assert_eq!(r.value, "\"1\"", "{r:?}");
    assert!(r.available, "{r:?}");
    assert!(r.second.is_some_and(|s| close(s, 48.0 * X)), "{r:?}");
}

#[test]
fn any_other_value_keeps_the_graph_as_candle_parses_it() {
    for value in ["1", "false", "00"] {
        let r = run_child(Some(value));
        assert_eq!(r.value, format!("{value:?}"), "{r:?}");
        assert!(r.available, "{r:?}");
        assert!(r.second.is_some_and(|s| close(s, 48.0 * X)), "{r:?}");
    }
}
