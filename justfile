# Tasks of the FER ablation workspace. Install just with `cargo install just`.

# The main job (until the sweep runner lands): train one model on the embedded synthetic faces.
train *ARGS:
    cargo run -p fer-runner --bin fer -- train {{ARGS}}

# Run a sweep of experiments/NAME.yaml (missing trials only), e.g. `just sweep heads`.
sweep NAME *ARGS:
    cargo run -p fer-runner --bin fer -- sweep experiments/{{NAME}}.yaml {{ARGS}}

# Regenerate reports/NAME.md, .csv, .png, .svg from the database, e.g. `just report heads`.
report NAME *ARGS:
    cargo run -p fer-runner --bin fer -- report {{NAME}} {{ARGS}}

# List trials in the results database (filters: --sweep NAME --status failed).
runs *ARGS:
    cargo run -p fer-runner --bin fer -- runs {{ARGS}}

# Open the results database in sqlite3.
db:
    sqlite3 fer.db

# The whole test suite (what CI runs).
test:
    cargo test --workspace

# Benchmarks (throughput, JSON lines) on 2 threads: the data loader at 224 and 112 px, then the full
# DAN + EAC training step and inference at the reference PyTorch benchmark's settings.
bench:
    RAYON_NUM_THREADS=2 cargo run -p fer-runner --bin fer -- bench loader
    RAYON_NUM_THREADS=2 cargo run -p fer-runner --bin fer -- bench train --reference bench/pytorch_reference.jsonl

# Render the synthetic face set to DIR (ImageFolder layout, labels.csv, contact_sheet.png).
synth DIR *ARGS:
    cargo run -p fer-runner --bin fer -- data synth --out {{DIR}} {{ARGS}}

# Classify faces in photos with a checkpoint, e.g. `just predict runs/x/checkpoint.safetensors photo.jpg --detect`.
predict CHECKPOINT *ARGS:
    cargo run -p fer-runner --bin fer -- predict {{CHECKPOINT}} {{ARGS}}

# Inspect a checkpoint (ours or an official DAN .pth).
inspect PATH:
    cargo run -p fer-runner --bin fer -- inspect {{PATH}}

# Build the GPU binary (needs a CUDA toolkit, see README).
build-cuda:
    cargo build --release -p fer-runner --features cuda
