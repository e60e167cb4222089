//! `fer predict`: classify the expression of the faces in photos with a trained checkpoint (ours
//! or an official DAN `.pth`), optionally finding the faces first and drawing where each
//! attention head looks.

use std::path::{Path, PathBuf};

use crate::face_detect::{crop, expand, Cascade, FaceBox};
use anyhow::Context;
use clap::Args;
use fer_model::data::image::Image;
use fer_model::predict::Predictor;
use serde_json::json;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Checkpoint: ours (`checkpoint.safetensors` of a run) or an official DAN release `.pth`.
    pub checkpoint: PathBuf,
    /// Images (JPEG / PNG): aligned face crops, or whole photos with --detect.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Find faces with the bundled LBP frontal-face cascade and classify each.
    #[arg(long)]
    pub detect: bool,
    /// A different OpenCV LBP cascade (XML) for --detect.
    #[arg(long)]
    pub cascade: Option<PathBuf>,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write, per face, the crop with each head's attention map and the predicted class's CAM (PNG).
    #[arg(long)]
    pub explain: Option<PathBuf>,
    /// Class order for checkpoints that do not record it (official .pth): raf_db or affectnet.
    #[arg(long)]
    pub classes: Option<String>,
    /// Model input size (default: what the checkpoint records; 224 for a .pth).
    #[arg(long)]
    pub input_size: Option<usize>,
}

/// Margin added around a detected box on every side, as a share of its size.
const FACE_MARGIN: f64 = 0.25;

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let predictor = Predictor::load(&args.checkpoint, args.classes.as_deref(), args.input_size)?;
    let cascade = match (&args.cascade, args.detect) {
        (Some(p), _) => Some(Cascade::load(p)?),
        (None, true) => Some(Cascade::frontal_face()),
        (None, false) => None,
    };
    if let Some(dir) = &args.explain {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if !args.json {
        println!(
            "{}: {} heads, {} classes ({}), {} px input",
            args.checkpoint.display(),
            predictor.net.dan.config.heads,
            predictor.class_names.len(),
            predictor.class_source,
            predictor.input_size
        );
    }
    for path in &args.images {
        if !path.is_file() {
            anyhow::bail!("{}: no such image file", path.display());
        }
        let img = Image::open(path)?;
        let faces: Vec<Option<FaceBox>> = match &cascade {
            Some(c) => c.detect(&img, 3).into_iter().map(Some).collect(),
            None => vec![None],
        };
        let mut results = Vec::new();
        if faces.is_empty() && !args.json {
            println!("{}: no face found", path.display());
        }
        for (i, face) in faces.iter().enumerate() {
            let region = face.map(|b| expand(b, FACE_MARGIN, img.width, img.height));
            let input = match region {
                Some(r) => crop(&img, r),
                None => img.clone(),
            };
            let p = predictor.predict(&input)?;
            let names = &predictor.class_names;
            let mut ranked: Vec<(usize, f32)> =
                p.probabilities.iter().copied().enumerate().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut pictures = Vec::new();
            if let Some(dir) = &args.explain {
                pictures = explain(
                    dir,
                    path,
                    i,
                    &input,
                    &p,
                    &names[p.best],
                    predictor.input_size.max(224),
                )?;
            }
            if args.json {
                results.push(json!({
                    "box": face,
                    "crop": region,
                    "prediction": names[p.best],
                    "probabilities": names.iter().zip(&p.probabilities).map(|(n, v)| (n.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
                    "explain": pictures,
                }));
            } else {
                let at = match face {
                    Some(b) => format!(
                        " face {} at x={} y={} {}x{}",
                        i + 1,
                        b.x,
                        b.y,
                        b.width,
                        b.height
                    ),
                    None => String::new(),
                };
                let others: Vec<String> = ranked[1..]
                    .iter()
                    .take(3)
                    .map(|(k, v)| format!("{} {:.2}", names[*k], v))
                    .collect();
                println!(
                    "{}{at}: {} {:.2} ({})",
                    path.display(),
                    names[p.best],
                    p.probabilities[p.best],
                    others.join(", ")
                );
                for pic in &pictures {
                    println!("  wrote {pic}");
                }
            }
        }
        if args.json {
            println!("{}", json!({"image": path, "faces": results}));
        }
    }
    Ok(())
}

/// `<stem>_faceN_input.png`, `_head{k}.png` per head, `_cam_<class>.png`, and `_all.png` (all of
/// them side by side).
fn explain(
    dir: &Path,
    image: &Path,
    face: usize,
    input: &Image,
    p: &fer_model::predict::Prediction,
    class: &str,
    size: usize,
) -> anyhow::Result<Vec<String>> {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "image".into());
    let base = format!("{stem}_face{}", face + 1);
    let mut written = Vec::new();
    let mut save = |name: String, img: Image| -> anyhow::Result<()> {
        let path = dir.join(&name);
        img.save_png(&path)?;
        written.push(path.display().to_string());
        Ok(())
    };
    let mut panels = vec![input.resize_pil(size, size)];
    panels.extend(p.head_maps.iter().map(|map| overlay(input, map, size)));
    panels.push(overlay(input, &p.cam, size));
    save(format!("{base}_input.png"), panels[0].clone())?;
    for k in 0..p.head_maps.len() {
        save(format!("{base}_head{k}.png"), panels[k + 1].clone())?;
    }
    save(
        format!("{base}_cam_{}.png", class.replace(' ', "_")),
        panels[panels.len() - 1].clone(),
    )?;
    // Everything side by side: the crop, head 0 .. K-1, the CAM.
    let mut strip = Image::new(size * panels.len(), size);
    for (i, panel) in panels.iter().enumerate() {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    strip.set(c, y, i * size + x, panel.get(c, y, x));
                }
            }
        }
    }
    save(format!("{base}_all.png"), strip)?;
    Ok(written)
}

/// Blue -> cyan -> yellow -> red for v in [0, 1].
fn heat(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let r = (1.5 - (4.0 * v - 3.0).abs()).clamp(0.0, 1.0);
    let g = (1.5 - (4.0 * v - 2.0).abs()).clamp(0.0, 1.0);
    let b = (1.5 - (4.0 * v - 1.0).abs()).clamp(0.0, 1.0);
    [r, g, b]
}

/// The crop (resized to `size`) with a map, bilinearly upsampled and min-max normalised, blended
/// over it as a heat map.
pub fn overlay(crop: &Image, map: &[Vec<f32>], size: usize) -> Image {
    let base = crop.resize_pil(size, size);
    let (h, w) = (map.len(), map.first().map(|r| r.len()).unwrap_or(0));
    let flat: Vec<f32> = map.iter().flatten().copied().collect();
    let (lo, hi) = flat
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let sample = |fy: f32, fx: f32| -> f32 {
        // Pixel-centre aligned bilinear sampling of the h x w map.
        let sy = (fy * h as f32 - 0.5).clamp(0.0, (h - 1) as f32);
        let sx = (fx * w as f32 - 0.5).clamp(0.0, (w - 1) as f32);
        let (y0, x0) = (sy.floor() as usize, sx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
        let (ty, tx) = (sy - y0 as f32, sx - x0 as f32);
        let top = map[y0][x0] * (1.0 - tx) + map[y0][x1] * tx;
        let bottom = map[y1][x0] * (1.0 - tx) + map[y1][x1] * tx;
        top * (1.0 - ty) + bottom * ty
    };
    let mut out = base.clone();
    if h == 0 || w == 0 {
        return out;
    }
    for y in 0..size {
        for x in 0..size {
            let v = (sample(
                (y as f32 + 0.5) / size as f32,
                (x as f32 + 0.5) / size as f32,
            ) - lo)
                / span;
            let c = heat(v);
            for ch in 0..3 {
                out.set(ch, y, x, 0.5 * base.get(ch, y, x) + 0.5 * c[ch]);
            }
        }
    }
    out
}
