# Tasks of the FER ablation workspace. Install just with `cargo install just`.

# Train one model (default: the embedded synthetic faces; `--config FILE` for any run config).
train *ARGS:
    cargo run -p fer-runner --bin fer -- train {{ARGS}}

# Run a sweep of experiments/NAME.yaml (missing trials only), e.g. `just sweep heads`.
sweep NAME *ARGS:
    cargo run -p fer-runner --bin fer -- sweep experiments/{{NAME}}.yaml {{ARGS}}

# Regenerate reports/NAME.md, .csv, .png, .svg from the database, e.g. `just report heads`.
report NAME *ARGS:
    cargo run -p fer-runner --bin fer -- report {{NAME}} {{ARGS}}

# Submit a sweep to Slurm as a job array of workers (needs --db postgres://... or FER_DB for a shared
# store; with a SQLite file the workers write journals for `just sync`), e.g.
# `just slurm backbones_thesis --partition gpu`.
slurm NAME *ARGS:
    cargo run -p fer-runner --bin fer -- sweep experiments/{{NAME}}.yaml --launcher slurm {{ARGS}}

# Ingest a Slurm sweep's journals (clusters without a database server) into the SQLite store.
sync NAME *ARGS:
    cargo run -p fer-runner --bin fer -- sync experiments/{{NAME}}.yaml {{ARGS}}

# A sweep's trials as TensorBoard runs in tb/NAME (then `tensorboard --logdir tb`).
tensorboard NAME *ARGS:
    cargo run -p fer-runner --bin fer -- export tensorboard --sweep {{NAME}} --out tb/{{NAME}} {{ARGS}}

# The results dashboard on http://127.0.0.1:8080/ (read-only; live while sweeps run), e.g.
# `just serve --db postgres://...`; `--bind 0.0.0.0:8080` serves other machines, with a token.
serve *ARGS:
    cargo run -p fer-runner --bin fer -- serve {{ARGS}}

# Regenerate the README's dashboard screenshots (docs/img/dashboard-*.png) with headless Chromium:
# the browser test that watches a real sweep, keeping its screenshots.
screenshots:
    FER_SCREENSHOTS={{justfile_directory()}}/docs/img cargo test -p fer-runner --test all -- dashboard::the_dashboard_follows_a_running_sweep --exact

# List trials in the results database (filters: --sweep NAME --status failed).
runs *ARGS:
    cargo run -p fer-runner --bin fer -- runs {{ARGS}}

# Open the results database in sqlite3 (a PostgreSQL store: psql "$FER_DB").
db:
    sqlite3 fer.db

# The whole test suite (what CI runs, with `just lint`).
test:
    cargo test --workspace

# Formatting and clippy as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

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

# Check a sweep's setup without training (data, class counts, pretrained files, device), e.g.
# `just doctor heads --profile thesis`.
doctor NAME *ARGS:
    cargo run -p fer-runner --bin fer -- doctor experiments/{{NAME}}.yaml {{ARGS}}

# The PyTorch parity fixtures on a device (default cpu), with the reference's tolerance rules.
parity *ARGS:
    cargo run -p fer-runner --bin fer -- parity fixtures {{ARGS}}

# Build the GPU binary (cuda + cuDNN) into target/cuda/release/fer, with or without a GPU: uses the
# CUDA toolkit on PATH, else installs NVIDIA's CUDA 13 wheels from PyPI (README, GPU).
build-cuda:
    bench/gpu/build.sh

# On a machine with an NVIDIA GPU: parity fixtures on the GPU, a short 224 px batch-64 training run
# and the training step next to PyTorch's on the same GPU, then one summary (README, GPU).
gpu-check *ARGS:
    python3 bench/gpu/check.py {{ARGS}}
