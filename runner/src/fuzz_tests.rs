//! Bounded mutation fuzzing of the runner's readers of outside input: sweep files (inheritance,
//! grids, profiles, reports) and run configs. Every mutant of the shipped experiment files must
//! load or give a clean error, never panic; the seeds are fixed so a failure reproduces.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn experiments() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments")
}

/// 1 to 4 text edits: a byte changed, a line dropped or repeated, a run of characters deleted,
/// the file cut short; the result is read as UTF-8 lossily, as a user's editor might leave it.
fn mutate(src: &str, rng: &mut ChaCha8Rng) -> String {
    let mut b = src.as_bytes().to_vec();
    const ALPHABET: &[u8] = b" :-[]{},.#'\"\n\t0123456789abcxyz&*!|>%@`\\";
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            break;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..5) {
            0 => b[at] = ALPHABET[rng.random_range(0..ALPHABET.len())],
            1 => {
                b.insert(at, ALPHABET[rng.random_range(0..ALPHABET.len())]);
            }
            2 => {
                let n = rng.random_range(1..=12).min(b.len() - at);
                b.drain(at..at + n);
            }
            3 => {
                // Repeat the line holding `at` (duplicate keys, doubled list items).
                let start = b[..at]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |i| i + 1);
                let end = b[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |i| at + i + 1);
                let line = b[start..end].to_vec();
                b.splice(end..end, line);
            }
            _ => b.truncate(at),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn fuzz(tag: &str, files: &[&str], rounds: usize, check: &dyn Fn(&Path) -> bool) {
    let dir = std::env::temp_dir().join(format!("fer-fuzz-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Sweeps inherit from base.yaml next to them.
    std::fs::copy(experiments().join("base.yaml"), dir.join("base.yaml")).unwrap();
    let (mut ok, mut err) = (0, 0);
    for (i, name) in files.iter().enumerate() {
        let src = std::fs::read_to_string(experiments().join(name)).unwrap();
        for round in 0..rounds {
            let seed = (i * 100_000 + round) as u64;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let path = dir.join(format!("mutant-{name}"));
            std::fs::write(&path, mutate(&src, &mut rng)).unwrap();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&path))) {
                Ok(true) => ok += 1,
                Ok(false) => err += 1,
                Err(_) => panic!("{tag}: a mutant of {name} (seed {seed}) panicked"),
            }
        }
    }
    eprintln!("{tag}: {ok} mutants loaded, {err} refused with an error");
    assert!(
        err > 0 && ok > 0,
        "{tag}: the mutations should both pass and fail"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sweep_files_never_panic() {
    let files = [
        "heads.yaml",
        "noise.yaml",
        "backbones.yaml",
        "datasets.yaml",
    ];
    fuzz("sweeps", &files, 150, &|p| {
        let plain = crate::sweep::load(p, None, None).is_ok();
        // The thesis profile too (a profile's overrides are read on top of the file's).
        let thesis = crate::sweep::load(p, Some("thesis"), None).is_ok();
        plain || thesis
    });
}

#[test]
fn run_configs_never_panic() {
    fuzz("run-configs", &["base.yaml"], 300, &|p| {
        crate::yaml::read::<fer_model::config::RunConfig>(p)
            .and_then(|c| c.validate())
            .is_ok()
    });
}
