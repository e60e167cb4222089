//! Data: the embedded synthetic face set, the real FER sets, DAN's augmentation, label noise,
//! class-balanced sampling and a parallel prefetching loader.

pub mod augment;
pub mod blobs;
pub mod face_detect;
pub mod image;
pub mod loader;
pub mod noise;
pub mod sets;
pub mod synth;

pub use augment::{AugmentConfig, IMAGENET_MEAN, IMAGENET_STD};
pub use blobs::blobs;
pub use image::Image;
pub use loader::{Batch, Sampling};
pub use sets::{load, DataSet, DataSpec, NoiseSpec, Split};
pub use synth::SynthConfig;
