//! `fer train`: one training run from a resolved config file (or the embedded default),
//! reporting JSON lines on stdout. A sweep runs each trial through this command; it can also be
//! used alone. Restarted on the same run directory, it resumes from its last checkpoint.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use fer_model::config::RunConfig;
use fer_model::events::{Event, EventLine};
use fer_model::trainer::{self, classified, FailureClass};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Resolved run config (YAML or JSON). Without it, the embedded default (synthetic faces).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory: checkpoint.safetensors, metrics.jsonl and config.yaml go here.
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    /// Override the number of epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Print only the JSON lines (no human progress on stderr).
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut started = false;
    let result = train(args, &mut started);
    match result {
        // An error before the first training step (config, data set): retrying cannot fix it.
        Err(e) if !started => Err(classified(FailureClass::Setup, e)),
        other => other,
    }
}

fn train(args: TrainArgs, started: &mut bool) -> anyhow::Result<()> {
    let mut config: RunConfig = match &args.config {
        Some(path) => crate::yaml::read(path)?,
        None => RunConfig::embedded_default(),
    };
    if let Some(e) = args.epochs {
        config.epochs = e;
    }
    config.validate().map_err(|e| match &args.config {
        Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
        None => e,
    })?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("config.yaml"),
        serde_yaml_ng::to_string(&config)?,
    )?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("metrics.jsonl"))?;
    let stdout = std::io::stdout();
    let quiet = args.quiet;
    trainer::run(&config, &args.out, &mut |event| {
        let line = EventLine::line(event);
        if let Event::Epoch(m) = event {
            if !m.replayed {
                writeln!(metrics, "{line}")
                    .map_err(|e| fer_model::trainer::classify_io(e.into()))?;
            }
        }
        // A parent that died closes the pipe: the write fails and this run stops at its
        // next event instead of training on as an orphan.
        let mut out = stdout.lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        if matches!(event, Event::Started { .. }) {
            *started = true;
        }
        match event {
            Event::Epoch(m) if !quiet && !m.replayed => {
                eprintln!(
                        "epoch {:>3}  loss {:.4}  train acc {:.3}  test acc {:.3}  balanced {:.3}  {:.1} img/s",
                        m.epoch, m.loss.total, m.train_accuracy, m.test_accuracy, m.test_balanced_accuracy, m.train_img_per_s
                    );
            }
            Event::Started {
                start_epoch,
                epochs,
                ..
            } if !quiet && *start_epoch > 0 => {
                eprintln!("resumed at epoch {start_epoch} of {epochs}");
            }
            _ => {}
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use fer_model::config::RunConfig;

    /// `experiments/base.yaml` is the embedded default written out: what `fer train` runs
    /// without a config is what every embedded sweep inherits.
    #[test]
    fn base_yaml_is_the_embedded_default() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/base.yaml");
        let base: RunConfig = crate::yaml::read(&path).unwrap();
        assert_eq!(base, RunConfig::embedded_default());
        base.validate().unwrap();
    }
}
