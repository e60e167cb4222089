# Tasks of the FER ablation workspace. Install just with `cargo install just`.

# The main job (until the sweep runner lands): train one model end to end on the built-in images.
train *ARGS:
    cargo run -p fer-runner --bin fer -- train {{ARGS}}

# The whole test suite (what CI runs).
test:
    cargo test --workspace

# Inspect a checkpoint (ours or an official DAN .pth).
inspect PATH:
    cargo run -p fer-runner --bin fer -- inspect {{PATH}}

# Build the GPU binary (needs a CUDA toolkit, see README).
build-cuda:
    cargo build --release -p fer-runner --features cuda
