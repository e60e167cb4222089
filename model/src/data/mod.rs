//! Data: the embedded synthetic face set, the real FER sets, DAN's augmentation, label noise,
//! class-balanced sampling and a parallel prefetching loader.

pub mod augment;
pub mod image;
pub mod jpeg;
pub mod loader;
pub mod noise;
pub mod resize;
pub mod sets;
pub mod synth;

pub use augment::{AugmentConfig, IMAGENET_MEAN, IMAGENET_STD};
pub use image::Image;
pub use loader::{Batch, Sampling};
pub use sets::{load, DataSet, DataSpec, NoiseSpec, Split};
pub use synth::SynthConfig;

/// A text file's contents without a leading UTF-8 byte-order mark (editors on Windows write one;
/// left in, it becomes part of the first line's first field).
pub fn read_text(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}
