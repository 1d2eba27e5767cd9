//! `kshot generate`: render a person's face in new poses from a few shots, with a trained
//! few-shot GAN run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use kshot::data::orl::{self, Face, Faces, Landmarks};
use kshot::generate::{self, choose_shots};
use kshot::methods::FewShotGenerator;
use kshot::plot::{FaceRow, PlotImage};

use super::data_root_for;

#[derive(Args)]
pub struct GenerateArgs {
    /// The few-shot GAN run directory.
    #[arg(long, value_name = "RUN_DIR")]
    run: PathBuf,
    /// A held-out ORL person (s31 … s40), or `all` for every one of them: T of their images are
    /// the shots, the others are rendered from their landmarks.
    #[arg(long, value_name = "sN|all", conflicts_with = "support")]
    person: Option<String>,
    /// Shots T of the held-out person (the seeded choice `kshot eval` makes).
    #[arg(long, default_value_t = 8)]
    shots: usize,
    /// Fine-tuning steps on the shots before rendering (default: the run's; 0: feed-forward).
    #[arg(long, value_name = "S")]
    finetune_steps: Option<usize>,
    /// Seed of the shot choice (as `kshot eval --seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Your own face images (one person), used as the shots instead of --person.
    #[arg(long, value_name = "DIR", requires = "landmarks")]
    support: Option<PathBuf>,
    /// With --support: their 68-point landmarks, in the tsv format of ORL's landmarks_dlib68.tsv.
    #[arg(long, value_name = "FILE.tsv")]
    landmarks: Option<PathBuf>,
    /// With --support: the poses to render, as images with landmarks (a folder and its tsv,
    /// `DIR:FILE.tsv`); default: the poses of the support images themselves.
    #[arg(long, value_name = "DIR:FILE.tsv")]
    poses: Option<String>,
    /// Where the images go: OUT/PERSON/M.png for target image M, and OUT/PERSON/grid.png.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Data root (holds orl-faces/). Defaults to $KSHOT_DATA.
    #[arg(long, env = "KSHOT_DATA")]
    data_dir: Option<PathBuf>,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let (config, learner) = kshot::train::load_learner(&a.run)?;
    let Some(generator) = learner.generator() else {
        bail!(
            "{} is a {} run, not a few-shot generator; train one with --preset fewshot-gan-orl",
            a.run.display(),
            config.method.name()
        );
    };
    let steps = a.finetune_steps.unwrap_or(generator.default_finetune_steps());
    let size = generator.image_size();
    let (mut grid_rows, mut written) = (Vec::new(), 0);
    let grid = match (&a.person, &a.support) {
        (Some(person), None) => {
            let root = data_root_for(a.data_dir.as_deref(), &config)?;
            let faces = orl::load_orl(&root, size)?;
            let held_out = orl::held_out_people();
            let all = person == "all";
            let people = if all { held_out.clone() } else { vec![person.clone()] };
            for person in &people {
                let Some(k) = held_out.iter().position(|p| p == person) else {
                    bail!(
                        "--person {person}: choose one of the held-out people {}–{} (or all); the others were seen in meta-training",
                        held_out[0],
                        held_out[held_out.len() - 1]
                    );
                };
                let own = faces.of_person(person);
                let (shots, targets) = choose_shots(own.len(), a.shots, a.seed, k)?.pick(&own);
                eprintln!("{person}: {} shots, rendering {} images ({steps} fine-tuning steps)", shots.len(), targets.len());
                let rows = render_rows(generator, &shots, &targets, steps, &a.out.join(person))?;
                written += rows.len();
                let take = if all { 2 } else { rows.len() };
                grid_rows.extend(rows.into_iter().take(take));
            }
            if all {
                a.out.join("grid.png")
            } else {
                a.out.join(person).join("grid.png")
            }
        }
        (None, Some(dir)) => {
            let marks = a.landmarks.as_ref().expect("clap requires --landmarks");
            let support = orl::load_folder(dir, marks, size)?;
            let poses: Option<Faces> = match &a.poses {
                Some(spec) => {
                    let (pdir, pfile) = spec.split_once(':').with_context(|| {
                        format!("--poses {spec}: give a folder and its landmark file as DIR:FILE.tsv")
                    })?;
                    Some(orl::load_folder(Path::new(pdir), Path::new(pfile), size)?)
                }
                None => None,
            };
            let shots: Vec<&Face> = support.faces.iter().collect();
            let targets: Vec<&Face> = poses.as_ref().unwrap_or(&support).faces.iter().collect();
            let person = shots.first().map(|f| f.person.clone()).unwrap_or_default();
            eprintln!("{person}: {} shots, rendering {} poses ({steps} fine-tuning steps)", shots.len(), targets.len());
            grid_rows = render_rows(generator, &shots, &targets, steps, &a.out.join(&person))?;
            if poses.is_some() {
                // The pose images are of someone else: there is no real image to show.
                grid_rows.iter_mut().for_each(|r| r.real = None);
            }
            written = grid_rows.len();
            a.out.join(person).join("grid.png")
        }
        _ => bail!("say whose face to render: --person sN (a held-out ORL person) or --support DIR --landmarks FILE.tsv"),
    };
    kshot::plot::face_grid(&grid_rows, &grid)?;
    println!("wrote {written} images and {}", grid.display());
    Ok(())
}

fn plot_image(pixels: Vec<u8>, size: usize) -> PlotImage {
    PlotImage { pixels, channels: 1, height: size, width: size }
}

/// Renders `targets`, writes each as `dir/M.png`, and returns the grid rows.
fn render_rows(
    generator: &dyn FewShotGenerator,
    shots: &[&Face],
    targets: &[&Face],
    steps: usize,
    dir: &Path,
) -> anyhow::Result<Vec<FaceRow>> {
    let size = generator.image_size();
    let poses: Vec<&Landmarks> = targets.iter().map(|f| &f.landmarks).collect();
    let rendered = generate::render(generator, shots, &poses, steps)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shot_images: Vec<PlotImage> =
        shots.iter().map(|f| plot_image(f.pixels.clone(), size)).collect();
    let mut rows = Vec::new();
    for (target, image) in targets.iter().zip(&rendered) {
        let pixels = generate::to_u8(image);
        let path = dir.join(format!("{}.png", target.index));
        generate::write_gray_png(&path, &pixels, size)?;
        rows.push(FaceRow {
            label: format!("{} {}", target.person, target.index),
            shots: shot_images.clone(),
            landmarks: plot_image(orl::rasterise(&target.landmarks, size), size),
            generated: plot_image(pixels, size),
            real: Some(plot_image(target.pixels.clone(), size)),
        });
    }
    Ok(rows)
}
