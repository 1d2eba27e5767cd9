//! `kshot calibrate`: fit the temperature that makes a run's probabilities honest.

use std::path::PathBuf;

use clap::Args;
use kshot::calibration;
use kshot::config::RunConfig;
use kshot::data::{self, EpisodeSampler, EpisodeSpec, Grouping};
use kshot::train;

use super::data_root_for;

#[derive(Args)]
pub struct CalibrateArgs {
    /// The run directory; the fitted temperature is written to RUN_DIR/calibration.json.
    #[arg(long, value_name = "RUN_DIR")]
    run: PathBuf,
    /// Class subset to fit on (default: the split's validation classes; never its test classes
    /// if you want honest test scores).
    #[arg(long)]
    subset: Option<String>,
    /// Episodes to fit on (of the run's test ways, shots and queries).
    #[arg(long, default_value_t = 200)]
    episodes: usize,
    /// Seed of the fitting episodes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Data root (defaults to the run's, or $KSHOT_DATA).
    #[arg(long, env = "KSHOT_DATA")]
    data_dir: Option<PathBuf>,
}

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    let mut config = RunConfig::load(&a.run.join(train::CONFIG_FILE))?;
    if let Some(t) = config.method.transductive_mut() {
        *t = false;
    }
    let (config, learner) = train::load_model(&a.run, config, train::ModelChoice::Selected)?;
    let root = data_root_for(a.data_dir.as_deref(), &config)?;
    let d = &config.data;
    let subset = match &a.subset {
        Some(s) => s.clone(),
        None => {
            data::split_subsets(&d.dataset, &d.split)?.val.map(str::to_string).ok_or_else(|| {
                anyhow::anyhow!(
                "{}'s split {} has no validation classes; name the classes to fit on with --subset",
                a.run.display(),
                d.split
            )
            })?
        }
    };
    let set = data::load_data(&root, d, &subset, config.backbone.in_channels())?;
    let spec = EpisodeSpec { ..config.test };
    let sampler = EpisodeSampler::new(&set, spec, Grouping::Any)?;
    let c = calibration::calibrate(learner.as_ref(), &sampler, a.episodes, a.seed)?;
    c.save(&a.run)?;
    println!(
        "temperature {:.3} on {} episodes of {spec} ({} queries) from {}: NLL {:.4} → {:.4}, ECE {:.2}% → {:.2}%; written to {}",
        c.temperature,
        c.episodes,
        c.queries,
        set.name,
        c.nll_before,
        c.nll_after,
        100.0 * c.ece_before,
        100.0 * c.ece_after,
        a.run.join(calibration::CALIBRATION_FILE).display()
    );
    Ok(())
}
