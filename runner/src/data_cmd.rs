//! `fer data synth`: write the synthetic face set to disk as an ImageFolder tree with a labels
//! file and a contact sheet. `fer data decode`: an image as the data pipeline decodes it (and
//! optionally resizes it, as PIL does), written losslessly, to compare with another decoder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use fer_model::data::synth::{ClassBalance, SynthConfig, CLASS_NAMES};
use fer_model::data::{self, Image, Split};

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Render the synthetic face set into DIR/{train,test}/<class>/*.png plus labels.csv and
    /// contact_sheet.png (one row per class).
    Synth(SynthArgs),
    /// Decode IMAGE as training and `fer predict` do (and with --size resize it as PIL's bilinear
    /// does) and write the pixels to OUT as PNG, to compare with PIL / OpenCV.
    Decode {
        image: PathBuf,
        out: PathBuf,
        /// Resize to SIZE x SIZE first (the first step of the eval transform).
        #[arg(long)]
        size: Option<usize>,
    },
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// easy, medium, hard, or a number in [0, 1].
    #[arg(long, default_value = "medium")]
    pub difficulty: String,
    #[arg(long, default_value_t = 64)]
    pub image_size: usize,
    #[arg(long, default_value_t = 700)]
    pub train: usize,
    #[arg(long, default_value_t = 350)]
    pub test: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use RAF-DB's class proportions instead of balanced classes.
    #[arg(long)]
    pub rafdb_balance: bool,
}

pub fn parse_difficulty(s: &str) -> anyhow::Result<f32> {
    if let Some(d) = SynthConfig::preset(s) {
        return Ok(d);
    }
    let d: f32 = s.parse().map_err(|_| {
        anyhow::anyhow!("difficulty {s:?}: expected easy, medium, hard or a number in [0, 1]")
    })?;
    anyhow::ensure!((0.0..=1.0).contains(&d), "difficulty {d} is outside [0, 1]");
    Ok(d)
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Synth(args) => synth(args),
        DataCommand::Decode { image, out, size } => {
            let img = Image::open(&image)?;
            let img = match size {
                Some(s) => img.resize_pil(s, s),
                None => img,
            };
            img.save_png(&out)
        }
    }
}

fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        difficulty: parse_difficulty(&args.difficulty)?,
        image_size: args.image_size,
        train: args.train,
        test: args.test,
        seed: args.seed,
        balance: if args.rafdb_balance {
            ClassBalance::RafDb
        } else {
            ClassBalance::Balanced
        },
    };
    let spec = data::DataSpec::Synthetic(cfg.clone());
    let mut labels = std::fs::File::create(args.out.join("labels.csv")).or_else(|_| {
        std::fs::create_dir_all(&args.out)?;
        std::fs::File::create(args.out.join("labels.csv"))
    })?;
    writeln!(labels, "split,path,label,class")?;
    let mut sheet_rows: Vec<Vec<Image>> = vec![Vec::new(); CLASS_NAMES.len()];
    for (split, name) in [(Split::Train, "train"), (Split::Test, "test")] {
        let set = data::load(&spec, split)?;
        for class in &set.class_names {
            std::fs::create_dir_all(args.out.join(name).join(class))?;
        }
        for i in 0..set.len() {
            let y = set.samples[i].label as usize;
            let rel = format!("{name}/{}/{i:05}.png", set.class_names[y]);
            let img = set.image(i)?;
            img.save_png(&args.out.join(&rel))?;
            writeln!(labels, "{name},{rel},{y},{}", set.class_names[y])?;
            if split == Split::Train && sheet_rows[y].len() < 10 {
                sheet_rows[y].push(img);
            }
        }
        eprintln!("{name}: {} images", set.len());
    }
    contact_sheet(
        &sheet_rows,
        args.image_size,
        &args.out.join("contact_sheet.png"),
    )?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// A grid of images, one row per class.
pub fn contact_sheet(rows: &[Vec<Image>], size: usize, path: &Path) -> anyhow::Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let gap = 2;
    let mut sheet = Image::new(cols * (size + gap) + gap, rows.len() * (size + gap) + gap);
    sheet.data.fill(1.0);
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let img = img.resize_pil(size, size);
            for ch in 0..3 {
                for y in 0..size {
                    for x in 0..size {
                        sheet.set(
                            ch,
                            gap + r * (size + gap) + y,
                            gap + c * (size + gap) + x,
                            img.get(ch, y, x),
                        );
                    }
                }
            }
        }
    }
    sheet.save_png(path).context("contact sheet")
}
