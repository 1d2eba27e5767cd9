//! `kshot embed`: a model's features of a folder of images, for use elsewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use kshot::data::images::{self, Pipeline};
use kshot::models::ModelSource;
use kshot::train::ModelChoice;

#[derive(Args)]
pub struct EmbedArgs {
    /// A built-in model (see `kshot models`) or a trained run directory.
    #[arg(long, default_value = kshot::models::DEFAULT, value_name = "NAME|RUN_DIR")]
    model: String,
    /// Images: files and/or folders (searched recursively).
    #[arg(value_name = "PATH", num_args = 1.., required = true)]
    paths: Vec<PathBuf>,
    /// Output: FILE.safetensors (tensor `embeddings` [n, D] f32, the file names in its metadata
    /// under `files`, a JSON list) or FILE.npy (with the file names in FILE.files.txt, one a line).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub fn run(a: EmbedArgs) -> anyhow::Result<()> {
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    if ext != "safetensors" && ext != "npy" {
        bail!("--out {}: name a .safetensors or .npy file", a.out.display());
    }
    let source = ModelSource::parse(&a.model, ModelChoice::Selected)?;
    let (config, learner) = source.load_with(source.config()?)?;
    if learner.generator().is_some() {
        bail!("this model is a few-shot face generator, not a classifier: render faces with `kshot generate --run RUN`");
    }
    let pipeline = Pipeline::of_run(&config.data, config.backbone.in_channels())?;
    let files = images::collect_files(&a.paths)?;
    kshot::autograd::init();
    let mut rows: Vec<f32> = Vec::new();
    let mut dim = 0;
    for chunk in files.chunks(kshot::predict::BATCH) {
        let x = kshot::predict::load_batch(chunk, &pipeline)?;
        let e = learner.embed(&x).with_context(|| format!("{} cannot embed", source.describe()))?;
        let e = e.flatten_from(1)?;
        dim = e.dim(1)?;
        rows.extend(e.flatten_all()?.to_vec1::<f32>()?);
    }
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    match ext.as_str() {
        "npy" => {
            kshot::checkpoint::write_atomic(&a.out, &npy(&rows, files.len(), dim))?;
            let list = a.out.with_extension("files.txt");
            kshot::checkpoint::write_atomic(&list, (names.join("\n") + "\n").as_bytes())?;
        }
        _ => write_safetensors(&a.out, &rows, files.len(), dim, &names)?,
    }
    eprintln!(
        "{} embeddings of {dim} values from {} written to {}",
        files.len(),
        source.describe(),
        a.out.display()
    );
    Ok(())
}

/// A NumPy .npy (format 1.0) of a C-order little-endian f32 [n, d] array.
fn npy(values: &[f32], n: usize, d: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    for v in values {
        out.extend(v.to_le_bytes());
    }
    out
}

fn write_safetensors(
    path: &Path,
    values: &[f32],
    n: usize,
    d: usize,
    names: &[String],
) -> anyhow::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, d], &bytes)?;
    let metadata = HashMap::from([("files".to_string(), serde_json::to_string(names)?)]);
    let data = safetensors::serialize([("embeddings", view)], Some(metadata))?;
    kshot::checkpoint::write_atomic(path, &data)
}
