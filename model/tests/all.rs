//! The integration tests of `fer_model` as one test binary (one link instead of one per file):
//! each file of this folder is a module; `cargo test -p fer-model --test all -- NAME::` runs one.

mod backbone_gradients;
mod backbones;
mod common;
mod data;
mod fast_kernels;
mod fuzz;
mod gradients;
mod inference;
mod parity;
mod predict;
mod pretrained;
mod pth_reader;
mod trainer;
mod training;
