//! The integration tests of `fer_runner` as one test binary (one link instead of one per file):
//! each file of this folder is a module; `cargo test -p fer-runner --test all -- NAME::` runs one.

mod cli;
mod cluster;
mod common;
mod dashboard;
mod export;
mod face_detect;
mod predict;
mod report;
mod store;
mod sweep;
