//! Bounded mutation fuzzing of every reader of outside input in the model crate: pretrained
//! weight files (the pickle machine, torch zip and legacy files, numpy pickles), images (libjpeg
//! through its unwinding error path, PNG), RAF-DB label files and EAC noise files. Each corpus
//! file is mutated a few hundred times from a fixed seed (so a failure reproduces); every
//! mutant must give `Ok` or a clean `Err`, never a panic, abort or hang.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn scratch(tag: &str) -> PathBuf {
    crate::common::scratch(&format!("fuzz-{tag}"))
}

/// 1 to 6 random edits: flip a byte, overwrite a run, insert, delete a range, truncate, or
/// duplicate a chunk (lengths and counts are where parsers break).
fn mutate(src: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = src.to_vec();
    for _ in 0..rng.random_range(1..=6) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => {
                let n = rng.random_range(1..=8).min(b.len() - at);
                for x in &mut b[at..at + n] {
                    *x = rng.random();
                }
            }
            2 => b.insert(at, rng.random()),
            3 => {
                let n = rng.random_range(1..=64).min(b.len() - at);
                b.drain(at..at + n);
            }
            4 => b.truncate(at),
            _ => {
                let n = rng.random_range(1..=32).min(b.len() - at);
                let chunk = b[at..at + n].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, chunk);
            }
        }
    }
    b
}

/// Run `check` on `rounds` mutants of each corpus file; a panic fails with the seed and file.
fn fuzz(tag: &str, corpus: &[PathBuf], rounds: usize, check: &dyn Fn(&Path) -> bool) {
    let dir = scratch(tag);
    let (mut ok, mut err) = (0, 0);
    for (i, file) in corpus.iter().enumerate() {
        let src = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let ext = file
            .extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_default();
        for round in 0..rounds {
            let seed = (i * 100_000 + round) as u64;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let path = dir.join(format!("mutant.{ext}"));
            std::fs::write(&path, mutate(&src, &mut rng)).unwrap();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&path)));
            match result {
                Ok(true) => ok += 1,
                Ok(false) => err += 1,
                Err(_) => panic!(
                    "{tag}: a mutant of {} (seed {seed}) panicked",
                    file.display()
                ),
            }
        }
    }
    eprintln!("{tag}: {ok} mutants read, {err} refused with an error");
    assert!(
        err > 0,
        "{tag}: no mutant was refused: the mutations do not reach the parser"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn weight_files_never_panic() {
    let dir = fixtures().join("pretrained");
    let corpus: Vec<PathBuf> = [
        "resnet50_eac_proto0.pkl",
        "resnet50_eac_py3.pkl",
        "resnet50_eac_py2.pkl",
        "resnet18_state_dict_legacy.pth",
        "resnet18_state_dict_module.pth",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    fuzz("weights", &corpus, 400, &|p| {
        fer_model::weights::read_state_dict(p).is_ok()
    });
}

#[test]
fn images_never_panic() {
    let corpus = vec![
        fixtures().join("pil/jpeg_420_97x61.jpg"),
        fixtures().join("pil/jpeg_progressive_100x100.jpg"),
        fixtures().join("pil/jpeg_grey_37x29.jpg"),
        fixtures().join("pil/src_37x29.png"),
    ];
    fuzz("images", &corpus, 300, &|p| {
        fer_model::data::Image::open(p).is_ok()
    });
}

#[test]
fn label_files_never_panic() {
    // A RAF-DB root whose label file is the mutant; the images it lists exist.
    let root = scratch("rafdb-root");
    std::fs::create_dir_all(root.join("EmoLabel")).unwrap();
    std::fs::create_dir_all(root.join("Image/aligned")).unwrap();
    let face = image::RgbImage::from_pixel(8, 8, image::Rgb([120, 90, 70]));
    let mut labels = String::new();
    for (i, split) in ["train", "train", "test", "test"].iter().enumerate() {
        let name = format!("{split}_{i:05}");
        face.save(root.join(format!("Image/aligned/{name}_aligned.jpg")))
            .unwrap();
        labels.push_str(&format!("{name}.jpg {}\n", i % 7 + 1));
    }
    let corpus_dir = scratch("labels-corpus");
    let raf = corpus_dir.join("list_patition_label.txt");
    std::fs::write(&raf, &labels).unwrap();
    let noise = corpus_dir.join("noise03.txt");
    std::fs::write(&noise, "train_00000.jpg 3\ntrain_00001.jpg 5\n").unwrap();
    let label_file = root.join("EmoLabel/list_patition_label.txt");
    fuzz("rafdb-labels", &[raf], 200, &|p| {
        std::fs::copy(p, &label_file).unwrap();
        let spec = fer_model::data::DataSpec::RafDb {
            root: root.clone(),
            skip_bad: false,
        };
        fer_model::data::load(&spec, fer_model::data::Split::Train).is_ok()
    });
    fuzz("noise-labels", &[noise], 200, &|p| {
        fer_model::data::noise::read_label_file(p).is_ok()
    });
    std::fs::remove_dir_all(&root).unwrap();
    std::fs::remove_dir_all(&corpus_dir).unwrap();
}

#[test]
fn fer2013_and_ferplus_csvs_never_panic() {
    // Four 48 x 48 faces (two training, two test) and their FERPlus votes.
    let dir = scratch("fer2013-corpus");
    let pixels = |k: usize| {
        (0..48 * 48)
            .map(|i| ((i * 7 + k * 31) % 256).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let usage = ["Training", "Training", "PublicTest", "PrivateTest"];
    let mut csv = String::from("emotion,pixels,Usage\n");
    let mut plus = String::from(
        "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n",
    );
    for (k, u) in usage.iter().enumerate() {
        csv.push_str(&format!("{},{},{u}\n", k % 7, pixels(k)));
        plus.push_str(&format!("{u},fer{k:07}.png,{},2,1,0,0,0,0,0,0,0\n", 7 - k));
    }
    let (csv_path, plus_path) = (dir.join("fer2013.csv"), dir.join("fer2013new.csv"));
    std::fs::write(&csv_path, &csv).unwrap();
    std::fs::write(&plus_path, &plus).unwrap();
    let load = |csv: &Path, ferplus: Option<&Path>| {
        let spec = fer_model::data::DataSpec::Fer2013 {
            csv: csv.to_path_buf(),
            ferplus: ferplus.map(Path::to_path_buf),
        };
        fer_model::data::load(&spec, fer_model::data::Split::Train).is_ok()
    };
    assert!(load(&csv_path, Some(&plus_path)), "the corpus itself loads");
    fuzz("fer2013", std::slice::from_ref(&csv_path), 150, &|p| {
        load(p, None)
    });
    fuzz("ferplus", std::slice::from_ref(&plus_path), 150, &|p| {
        load(&csv_path, Some(p))
    });
    std::fs::remove_dir_all(&dir).unwrap();
}
