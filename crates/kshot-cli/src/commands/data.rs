//! `kshot data`: download and verify datasets.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use kshot::data;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download a dataset's official archives into the data directory and verify them
    /// (miniImageNet has no public download: this checks the files placed by hand).
    Fetch {
        #[arg(value_enum)]
        dataset: FetchDataset,
        #[arg(long, env = "KSHOT_DATA")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FetchDataset {
    Omniglot,
    #[value(name = "mini-imagenet")]
    MiniImagenet,
}

pub fn run(command: DataCommand) -> anyhow::Result<()> {
    let DataCommand::Fetch { dataset, data_dir } = command;
    let root = data::resolve_root(data_dir.as_deref())?;
    match dataset {
        FetchDataset::Omniglot => {
            data::download::fetch_omniglot(&root)?;
            eprintln!("Omniglot is ready in {}", root.join("omniglot").display());
        }
        FetchDataset::MiniImagenet => {
            if let Some(w) = data::download::fetch_mini_imagenet(&root)? {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "miniImageNet is in place in {} (placed by hand; it has no public download)",
                data::mini_imagenet::dataset_dir(&root).display()
            );
        }
    }
    Ok(())
}
