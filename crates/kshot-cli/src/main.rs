//! `kshot`: the command-line tool over the kshot library.

mod bench;
mod commands;

use std::process::ExitCode;

use clap::Parser;

/// Training and evaluation allocate and free tensors of tens of megabytes in every step; the system
/// allocator hands them back to the OS each time (a third of evaluation time went to page faults),
/// where mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context first, then its causes.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
