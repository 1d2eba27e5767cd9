//! Process-wide autograd settings that candle reads from the environment.
//!
//! candle 0.11.1 decides whether a backward pass keeps the graph through the gradients it
//! computes (needed for exact second-order gradients, e.g. second-order MAML) from
//! [`KEEP_GRAPH_VAR`]: in `candle_core::backprop`, a thread-local is initialised from
//! `std::env::var(KEEP_GRAPH_VAR)` as `!s.is_empty() && s != "0"`, and an unset or non-UTF-8
//! value counts as "detach". So `1`, `true` and even `false` or `no` keep the graph; an empty
//! value or `0` detaches, and second-order gradients then silently become first-order.
//!
//! That thread-local is read once per thread, at the thread's first backward pass, so the
//! variable has to be right before then: [`init`] sets it when absent, and
//! [`second_order_available`] reports what candle decides from its current value.

use std::sync::Once;

/// The variable candle reads (once per thread, at the first backward pass) to decide whether the
/// gradient graph is kept. Without it candle detaches gradients and second-order MAML silently
/// becomes first-order.
pub const KEEP_GRAPH_VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

static INIT: Once = Once::new();

/// How long candle's element-wise worker threads spin before they sleep (`candle_core::utils`,
/// default 25 000 spins). Between the small ops of a few-shot step the default keeps a worker
/// spinning most of the time, which on a 2-core machine takes a core from the matrix products.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
const SPIN_LIMIT: &str = "1000";

/// The thread count candle gives its matrix products. Unset, candle asks `num_cpus` for the
/// physical cores on every matrix product, which re-reads and parses /proc/cpuinfo each time
/// (several percent of a MANN step); set once here to the same count.
const THREADS_VAR: &str = "RAYON_NUM_THREADS";

/// Sets [`KEEP_GRAPH_VAR`] to `1` for this process when it is absent. A value the user set,
/// including `0` or the empty string (which make candle detach), is left as it is. Call before
/// any backward pass in any thread; every entry point of the library (trainers, evaluation,
/// learners) calls it. Also sets candle's worker spin limit ([`SPIN_LIMIT_VAR`]) and thread count
/// ([`THREADS_VAR`]) unless the user did.
pub fn init() {
    INIT.call_once(|| {
        if std::env::var_os(KEEP_GRAPH_VAR).is_none() {
            // SAFETY: called once, before the library starts any thread of its own.
            unsafe { std::env::set_var(KEEP_GRAPH_VAR, "1") };
        }
        if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
            // SAFETY: as above.
            unsafe { std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT) };
        }
        if std::env::var_os(THREADS_VAR).is_none() {
            // SAFETY: as above.
            unsafe { std::env::set_var(THREADS_VAR, num_cpus::get_physical().to_string()) };
        }
    });
}

/// True when candle keeps the graph through gradients, i.e. second-order gradients are exact:
/// candle's own test on the current value of [`KEEP_GRAPH_VAR`] (set and UTF-8, neither empty nor
/// `0`). This only reads the variable; call [`init`] first to have it set when absent.
///
/// candle caches its decision per thread at that thread's first backward pass, so the answer
/// holds for threads whose first backward pass comes after the variable last changed, which is
/// every thread when the variable is settled (by [`init`] or by the user) before any backward pass.
pub fn second_order_available() -> bool {
    keeps_graph(std::env::var(KEEP_GRAPH_VAR).ok().as_deref())
}

/// candle 0.11.1's parsing of [`KEEP_GRAPH_VAR`] (`candle_core::backprop`): `None` when unset or
/// not UTF-8.
fn keeps_graph(value: Option<&str>) -> bool {
    match value {
        Some(s) => !s.is_empty() && s != "0",
        None => false,
    }
}
