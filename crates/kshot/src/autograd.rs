//! Process-wide autograd settings that candle reads from the environment.

use std::sync::Once;

/// The variable candle reads (once per thread, at the first backward pass) to decide whether the
/// gradient graph is kept. Without it candle detaches gradients and second-order MAML silently
/// becomes first-order.
pub const KEEP_GRAPH_VAR: &str = "CANDLE_GRAD_DO_NOT_DETACH";

static INIT: Once = Once::new();

/// Sets [`KEEP_GRAPH_VAR`] for this process. Call before any backward pass in any thread; every
/// entry point of the library (trainers, evaluation, learners) calls it.
pub fn init() {
    INIT.call_once(|| {
        if std::env::var_os(KEEP_GRAPH_VAR).is_none() {
            // SAFETY: called once, before the library starts any thread of its own.
            unsafe { std::env::set_var(KEEP_GRAPH_VAR, "1") };
        }
    });
}

/// True when candle will keep the graph through gradients, i.e. second-order gradients are exact.
pub fn second_order_available() -> bool {
    init();
    std::env::var_os(KEEP_GRAPH_VAR).is_some()
}
