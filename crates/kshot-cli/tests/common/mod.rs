//! Helpers shared by the binary's integration tests (each test file includes this module).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The data root for tests: `$KSHOT_DATA`, else `../shared/data` beside the checkout.
pub fn data_root() -> PathBuf {
    match std::env::var_os("KSHOT_DATA") {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    }
}

/// `kshot ARGS` with the data root and the tests' shared decoded-image cache.
pub fn kshot(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kshot"));
    cmd.args(args)
        .env("KSHOT_DATA", data_root())
        .env("KSHOT_CACHE", Path::new(env!("CARGO_TARGET_TMPDIR")).join("kshot-data-cache"));
    cmd
}

pub fn run(args: &[&str]) -> Output {
    kshot(args).output().expect("kshot runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
