//! `kshot models`: the built-in models, how they were made and what they score.

use clap::Args;

#[derive(Args)]
pub struct ModelsArgs {
    /// Print the model cards as one JSON array.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ModelsArgs) -> anyhow::Result<()> {
    let models = kshot::models::all();
    if a.json {
        let cards = models
            .iter()
            .map(|m| {
                let config = m.config()?;
                Ok(serde_json::json!({
                    "name": m.name,
                    "default": m.name == kshot::models::DEFAULT,
                    "method": config.method.name(),
                    "backbone": config.backbone.kind(),
                    "image_size": config.data.image_size,
                    "channels": config.backbone.in_channels(),
                    "weight_bytes": m.weight_bytes(),
                    "card": m.card()?,
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        println!("{}", serde_json::Value::Array(cards));
        return Ok(());
    }
    for m in &models {
        let (config, card) = (m.config()?, m.card()?);
        let c = card.calibration;
        println!(
            "{}{}: {} ({}, {}×{} {}, {} KB of weights)",
            m.name,
            if m.name == kshot::models::DEFAULT { " (default)" } else { "" },
            card.summary,
            config.method.name(),
            config.data.image_size,
            config.data.image_size,
            if config.backbone.in_channels() == 1 { "grayscale" } else { "RGB" },
            m.weight_bytes() / 1000
        );
        println!("  trained with:  {}", card.trained_with);
        println!("  training time: {}", card.training_time);
        println!("  training data: {}", card.training_data);
        println!("  preprocessing: {}", card.preprocessing);
        println!(
            "  calibration:   temperature {:.3} fitted on {} validation episodes ({} queries): NLL {:.3} → {:.3}, ECE {:.1}% → {:.1}%",
            c.temperature,
            c.episodes,
            c.queries,
            c.nll_before,
            c.nll_after,
            100.0 * c.ece_before,
            100.0 * c.ece_after
        );
        println!("  scores:");
        for s in &card.scores {
            println!(
                "    {:<14} {:>6.2}% ± {:.2} ({} episodes){}   {}",
                s.setting,
                100.0 * s.accuracy,
                100.0 * s.ci95,
                s.episodes,
                s.paper.map_or(String::new(), |p| format!(", paper {p}")),
                s.command
            );
        }
        println!();
    }
    println!("use one: kshot predict --model NAME --support DIR --query IMAGE...");
    Ok(())
}
