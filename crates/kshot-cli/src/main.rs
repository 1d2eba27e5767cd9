//! `kshot`: the command-line tool over the kshot library.

mod bench;
mod commands;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

/// Training and evaluation allocate and free tensors of tens of megabytes in every step; the system
/// allocator hands them back to the OS each time (a third of evaluation time went to page faults),
/// where mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v3 numbering, as libmimalloc-sys builds it by default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory for reuse instead of returning it to the OS after 10 ms: every training step
/// frees and reallocates the same large buffers, and re-faulting them cost a third of a MAML step.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option before any thread of ours is started.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    keep_freed_memory();
    let matches = commands::Cli::command().get_matches();
    let cli = match commands::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // KSHOT_CPU picks gemm's kernels, which are chosen at the first matrix product: apply it
    // before any command computes anything.
    let result = kshot::cpu::apply_env().and_then(|_| commands::run(cli, &matches));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context first, then its causes.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
