//! `kshot plot RUN`: the learning curves of a run as a PNG.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use kshot::train;

#[derive(Args)]
pub struct PlotArgs {
    /// The run directory (holds metrics.csv).
    #[arg(value_name = "RUN_DIR")]
    run: PathBuf,
    /// Where to write the PNG (default RUN_DIR/curves.png).
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
    /// Width of the figure in pixels.
    #[arg(long, default_value_t = 1200)]
    width: u32,
    /// Height of the figure in pixels.
    #[arg(long, default_value_t = 800)]
    height: u32,
}

pub fn run(a: PlotArgs) -> anyhow::Result<()> {
    let metrics = a.run.join(train::METRICS_FILE);
    if !metrics.is_file() {
        bail!(
            "{} not found; is this a kshot run directory? (`kshot train --out {}` writes it)",
            metrics.display(),
            a.run.display()
        );
    }
    let out = a.out.unwrap_or_else(|| a.run.join("curves.png"));
    kshot::plot::learning_curves(&metrics, &out, a.width, a.height)?;
    println!("{}", out.display());
    Ok(())
}
