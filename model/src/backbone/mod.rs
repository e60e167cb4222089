//! Backbones: networks that turn an image batch into the spatial feature map F [B, C, h, w]
//! that DAN's heads attend over.

pub mod resnet;

pub use resnet::{ResNet, ResNetConfig, TrunkNames};
