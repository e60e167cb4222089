//! Data behaviour: determinism across thread counts, label noise statistics, the real data-set
//! loaders on small trees made here (with their errors), augmentation geometry, sampling.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fer_model::data::augment::{erase_rect, sample_rng, train_transform, AugmentConfig};
use fer_model::data::loader::{epoch_order, make_batch, BatchPlan, Sampling};
use fer_model::data::synth::{ClassBalance, SynthConfig};
use fer_model::data::{self, noise, DataSpec, Image, NoiseSpec, Split};

fn tempdir(tag: &str) -> PathBuf {
    crate::common::scratch(&format!("data-{tag}"))
}

fn synth(n: usize) -> SynthConfig {
    SynthConfig {
        difficulty: 0.5,
        image_size: 32,
        train: n,
        test: n / 2,
        seed: 7,
        balance: ClassBalance::Balanced,
    }
}

fn batch_bytes(threads: usize) -> Vec<u32> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let set = data::load(&DataSpec::Synthetic(synth(28)), Split::Train).unwrap();
        let order = epoch_order(&set, Sampling::Shuffle, 3, 1);
        let aug = AugmentConfig::dan(40);
        let b = make_batch(&set, &order[..16], Some(&aug), 40, 3, 1).unwrap();
        b.pixels.iter().map(|v| v.to_bits()).collect()
    })
}

#[test]
fn batches_are_byte_identical_with_one_and_two_threads() {
    let one = batch_bytes(1);
    let two = batch_bytes(2);
    assert_eq!(one.len(), 16 * 3 * 40 * 40);
    assert!(one == two, "batches differ between 1 and 2 threads");
    // And the same seed renders the same faces; another seed does not.
    let a =
        fer_model::data::synth::render_face(&synth(1), fer_model::data::synth::Split::Train, 5, 3);
    let b =
        fer_model::data::synth::render_face(&synth(1), fer_model::data::synth::Split::Train, 5, 3);
    let mut other = synth(1);
    other.seed = 8;
    let c = fer_model::data::synth::render_face(&other, fer_model::data::synth::Split::Train, 5, 3);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn synthetic_splits_have_exact_class_counts_and_differ() {
    let cfg = synth(700);
    let train = data::load(&DataSpec::Synthetic(cfg.clone()), Split::Train).unwrap();
    let test = data::load(&DataSpec::Synthetic(cfg.clone()), Split::Test).unwrap();
    assert_eq!(train.class_counts(), vec![100; 7]);
    assert_eq!(test.class_counts(), vec![50; 7]);
    assert_ne!(train.image(0).unwrap(), test.image(0).unwrap());
    let raf = SynthConfig {
        balance: ClassBalance::RafDb,
        ..cfg
    };
    let counts = data::load(&DataSpec::Synthetic(raf), Split::Train)
        .unwrap()
        .class_counts();
    assert_eq!(counts.iter().sum::<usize>(), 700);
    assert!(
        counts[3] > 5 * counts[1],
        "RAF-DB proportions: happiness >> fear, got {counts:?}"
    );
}

#[test]
fn symmetric_noise_has_the_rate_never_keeps_a_flipped_class_and_is_seeded() {
    let clean: Vec<u32> = (0..10_000).map(|i| (i % 7) as u32).collect();
    for rate in [0.1, 0.2, 0.3] {
        let noisy = noise::symmetric(&clean, 7, rate, 42).unwrap();
        let flipped = clean.iter().zip(&noisy).filter(|(c, n)| c != n).count() as f64 / 10_000.0;
        assert!(
            (flipped - rate).abs() <= 0.01,
            "rate {rate}: measured {flipped}"
        );
        assert!(noisy.iter().all(|&y| y < 7));
        // Destinations are spread over all other classes.
        let mut dest = [0usize; 7];
        for (c, n) in clean.iter().zip(&noisy) {
            if c != n && *c == 0 {
                dest[*n as usize] += 1;
            }
        }
        assert_eq!(dest[0], 0);
        assert!(dest[1..].iter().all(|&k| k > 0), "{dest:?}");
        assert_eq!(noisy, noise::symmetric(&clean, 7, rate, 42).unwrap());
        assert_ne!(noisy, noise::symmetric(&clean, 7, rate, 43).unwrap());
    }
    // Applied to a data set: the clean label is kept beside the noisy one; the test split is
    // loaded separately and never touched.
    let mut train = data::load(&DataSpec::Synthetic(synth(700)), Split::Train).unwrap();
    train
        .apply_noise(&NoiseSpec::Symmetric { rate: 0.3, seed: 1 })
        .unwrap();
    let changed = train
        .samples
        .iter()
        .filter(|s| s.label != s.clean_label)
        .count();
    assert!(
        (150..270).contains(&changed),
        "{changed} of 700 flipped at 30%"
    );
    let test = data::load(&DataSpec::Synthetic(synth(700)), Split::Test).unwrap();
    assert!(test.samples.iter().all(|s| s.label == s.clean_label));
    let m = noise::memorisation(&train.clean_labels(), &train.labels(), &train.labels());
    assert_eq!(
        (m.flipped, m.predicted_noisy, m.predicted_clean),
        (changed, 1.0, 0.0)
    );
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn write_jpg(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_pixel(20, 20, image::Rgb([shade, 100, 50]))
        .save(path)
        .unwrap();
}

#[test]
fn rafdb_loader_reads_the_official_layout_and_names_bad_input() {
    let root = tempdir("raf");
    let labels = "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\n";
    write(&root.join("EmoLabel/list_patition_label.txt"), labels);
    for name in ["train_00001", "train_00002", "test_0001"] {
        write_jpg(&root.join(format!("Image/aligned/{name}_aligned.jpg")), 10);
    }
    let spec = DataSpec::RafDb {
        root: root.clone(),
        skip_bad: false,
    };
    let train = data::load(&spec, Split::Train).unwrap();
    assert_eq!(train.labels(), vec![4, 0]); // 1..7 -> 0..6
    assert_eq!(train.class_names[4], "sadness");
    assert_eq!(data::load(&spec, Split::Test).unwrap().labels(), vec![6]);
    assert_eq!(train.image(0).unwrap().width, 20);

    // EAC noise file, matched by name.
    write(
        &root.join("EmoLabel/noise01.txt"),
        "train_00001.jpg 2\ntrain_00002.jpg 1\n",
    );
    let mut noisy = data::load(&spec, Split::Train).unwrap();
    noisy
        .apply_noise(&NoiseSpec::File {
            file: root.join("EmoLabel/noise01.txt"),
        })
        .unwrap();
    assert_eq!(noisy.labels(), vec![1, 0]);
    assert_eq!(noisy.clean_labels(), vec![4, 0]);
    write(
        &root.join("EmoLabel/noise02.txt"),
        "train_00001.jpg 2\ntrain_00002.jpg nine\n",
    );
    let err = noise::read_label_file(&root.join("EmoLabel/noise02.txt"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("noise02.txt:2") && err.contains("\"nine\""),
        "{err}"
    );

    // A missing image names the image and the label-file line.
    std::fs::remove_file(root.join("Image/aligned/train_00002_aligned.jpg")).unwrap();
    let err = data::load(&spec, Split::Train).err().unwrap().to_string();
    assert!(
        err.contains("list_patition_label.txt:2")
            && err.contains("train_00002_aligned.jpg")
            && err.contains("missing"),
        "{err}"
    );
    // ... or is skipped and reported when asked.
    let skipping = data::load(
        &DataSpec::RafDb {
            root: root.clone(),
            skip_bad: true,
        },
        Split::Train,
    )
    .unwrap();
    assert_eq!(skipping.len(), 1);
    assert_eq!(skipping.skipped.len(), 1);
    // A bad label line names the line.
    write(
        &root.join("EmoLabel/list_patition_label.txt"),
        "train_00001.jpg 5\ntrain_00002.jpg 8\n",
    );
    let err = data::load(&spec, Split::Train).err().unwrap().to_string();
    assert!(
        err.contains("list_patition_label.txt:2") && err.contains("unknown label \"8\""),
        "{err}"
    );
    // A missing root.
    let err = data::load(
        &DataSpec::RafDb {
            root: root.join("nope"),
            skip_bad: false,
        },
        Split::Train,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("nope") && err.contains("does not exist"),
        "{err}"
    );
    // An undecodable image is named when it is read.
    write(
        &root.join("Image/aligned/train_00002_aligned.jpg"),
        "not a jpeg",
    );
    write(&root.join("EmoLabel/list_patition_label.txt"), labels);
    let set = data::load(&spec, Split::Train).unwrap();
    let err = set.image(1).unwrap_err().to_string();
    assert!(
        err.contains("train_00002_aligned.jpg") && err.contains("cannot decode"),
        "{err}"
    );
    let skipping = data::load(
        &DataSpec::RafDb {
            root: root.clone(),
            skip_bad: true,
        },
        Split::Train,
    )
    .unwrap();
    assert_eq!((skipping.len(), skipping.skipped.len()), (1, 1));
}

#[test]
fn affectnet_loader_drops_contempt_for_seven_classes() {
    let root = tempdir("affect");
    for split in ["train", "val"] {
        for label in 0..8 {
            write_jpg(
                &root.join(format!("{split}/{label}/a{label}.jpg")),
                label as u8 * 20,
            );
        }
    }
    let eight = data::load(
        &DataSpec::AffectNet {
            root: root.clone(),
            classes: 8,
            skip_bad: false,
        },
        Split::Train,
    )
    .unwrap();
    assert_eq!(eight.labels(), (0..8).collect::<Vec<u32>>());
    let seven = data::load(
        &DataSpec::AffectNet {
            root: root.clone(),
            classes: 7,
            skip_bad: false,
        },
        Split::Test,
    )
    .unwrap();
    assert_eq!(seven.labels(), (0..7).collect::<Vec<u32>>());
    assert_eq!(seven.class_names[6], "anger");
    let err = data::load(
        &DataSpec::AffectNet {
            root: root.clone(),
            classes: 6,
            skip_bad: false,
        },
        Split::Train,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("7 or 8"), "{err}");
    std::fs::remove_dir_all(root.join("val/3")).unwrap();
    let err = data::load(
        &DataSpec::AffectNet {
            root: root.clone(),
            classes: 7,
            skip_bad: false,
        },
        Split::Test,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("val/3"), "{err}");
}

#[test]
fn fer2013_csv_and_image_folder() {
    let root = tempdir("fer");
    let px = vec!["128"; 2304].join(" ");
    write(
        &root.join("fer2013.csv"),
        &format!("emotion,pixels,Usage\n3,{px},Training\n5,{px},PrivateTest\n9,{px},Training\n"),
    );
    let err = data::load(
        &DataSpec::Fer2013 {
            csv: root.join("fer2013.csv"),
            ferplus: None,
        },
        Split::Train,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("fer2013.csv:4") && err.contains("unknown emotion"),
        "{err}"
    );
    write(
        &root.join("fer2013.csv"),
        &format!("emotion,pixels,Usage\n3,{px},Training\n5,{px},PrivateTest\n"),
    );
    let test = data::load(
        &DataSpec::Fer2013 {
            csv: root.join("fer2013.csv"),
            ferplus: None,
        },
        Split::Test,
    )
    .unwrap();
    assert_eq!(test.labels(), vec![5]);
    // FERPlus majority votes (neutral, happiness, surprise, ...; row 2 is mostly "unknown").
    write(&root.join("fer2013new.csv"), "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\nTraining,fer0.png,0,8,2,0,0,0,0,0,0,0\nPrivateTest,fer1.png,1,0,0,0,0,0,0,0,9,0\n");
    let plus = DataSpec::Fer2013 {
        csv: root.join("fer2013.csv"),
        ferplus: Some(root.join("fer2013new.csv")),
    };
    let train = data::load(&plus, Split::Train).unwrap();
    assert_eq!(train.labels(), vec![1]);
    assert_eq!(train.class_names[1], "happiness");
    assert_eq!(data::load(&plus, Split::Test).unwrap().len(), 0);

    for (split, class) in [
        ("train", "cat"),
        ("train", "dog"),
        ("test", "cat"),
        ("test", "dog"),
    ] {
        write_jpg(&root.join(format!("folder/{split}/{class}/x.jpg")), 5);
    }
    let set = data::load(
        &DataSpec::ImageFolder {
            root: root.join("folder"),
            skip_bad: false,
        },
        Split::Train,
    )
    .unwrap();
    assert_eq!(set.class_names, vec!["cat", "dog"]);
    assert_eq!(set.labels(), vec![0, 1]);
}

#[test]
fn augmentation_geometry() {
    let mut img = Image::new(12, 8);
    for (i, v) in img.data.iter_mut().enumerate() {
        *v = (i % 97) as f32 / 97.0;
    }
    let f = img.flip_horizontal();
    for c in 0..3 {
        for y in 0..8 {
            for x in 0..12 {
                assert_eq!(f.get(c, y, x), img.get(c, y, 11 - x));
            }
        }
    }
    assert_eq!(f.flip_horizontal(), img);
    // With every step forced on except rotation/crop, the output is the normalised mirror with
    // one zero rectangle that lies inside the image and respects scale and ratio.
    let cfg = AugmentConfig {
        flip_p: 1.0,
        rotate_crop_p: 0.0,
        erase_p: 1.0,
        ..AugmentConfig::dan(12)
    };
    let square = img.resize(12, 12);
    for index in 0..200 {
        let (out, trace) = train_transform(&square, &cfg, &mut sample_rng(1, 0, index));
        assert!(trace.flipped);
        let (top, left, h, w) = trace.erased.expect("erasing forced on");
        assert!(top + h <= 12 && left + w <= 12);
        let area = (h * w) as f64 / 144.0;
        assert!((0.02 * 0.5..=0.25 * 1.6).contains(&area), "area {area}");
        let ratio = h as f64 / w as f64;
        assert!((0.3 / 2.0..=3.3 * 2.0).contains(&ratio), "ratio {ratio}");
        let mut expect = square.flip_horizontal();
        fer_model::data::augment::normalize(&mut expect);
        for c in 0..3 {
            for y in 0..12 {
                for x in 0..12 {
                    let inside = (top..top + h).contains(&y) && (left..left + w).contains(&x);
                    let want = if inside { 0.0 } else { expect.get(c, y, x) };
                    assert_eq!(out.get(c, y, x), want);
                }
            }
        }
    }
    // The erasing rectangle's area and aspect follow the configured ranges on a large image.
    let mut rng = sample_rng(9, 9, 9);
    for _ in 0..500 {
        let (_, _, h, w) = erase_rect(224, 224, (0.02, 0.25), (0.3, 3.3), &mut rng).unwrap();
        let area = (h * w) as f64 / (224.0 * 224.0);
        assert!((0.018..=0.26).contains(&area), "area {area}");
        let ratio = h as f64 / w as f64;
        assert!((0.28..=3.5).contains(&ratio), "ratio {ratio}");
    }
    // Rotation by 0 and a padded crop at the centre are the identity.
    assert_eq!(square.rotate(0.0), square);
    assert_eq!(square.padded_crop(2, 2, 2), square);
}

#[test]
fn class_balanced_sampling_evens_out_the_classes() {
    let cfg = SynthConfig {
        balance: ClassBalance::RafDb,
        ..synth(700)
    };
    let set = data::load(&DataSpec::Synthetic(cfg), Split::Train).unwrap();
    let mut seen = [0usize; 7];
    for epoch in 0..5 {
        let order = epoch_order(&set, Sampling::ClassBalanced, 1, epoch);
        assert_eq!(order.len(), set.len());
        for i in order {
            seen[set.samples[i].label as usize] += 1;
        }
    }
    let expected = 5.0 * 700.0 / 7.0;
    for (c, &k) in seen.iter().enumerate() {
        assert!(
            (k as f64 - expected).abs() < 0.2 * expected,
            "class {c}: {k} draws, expected ~{expected}"
        );
    }
}

#[test]
fn loader_drops_the_last_short_batch_and_reports_errors() {
    let set = Arc::new(data::load(&DataSpec::Synthetic(synth(21)), Split::Train).unwrap());
    let order: Vec<usize> = (0..21).collect();
    let plan = |augment: Option<AugmentConfig>, drop_last: bool| BatchPlan {
        order: order.clone(),
        batch: 8,
        augment,
        size: 32,
        seed: 0,
        epoch: 0,
        drop_last,
        prefetch: 2,
    };
    let rx =
        fer_model::data::loader::batches(set.clone(), plan(Some(AugmentConfig::dan(32)), true));
    let sizes: Vec<usize> = rx.iter().map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, vec![8, 8]);
    let rx = fer_model::data::loader::batches(set, plan(None, false));
    let sizes: Vec<usize> = rx.iter().map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, vec![8, 8, 5]);
}

#[test]
fn label_files_strip_a_bom_and_refuse_conflicting_lines() {
    let root = tempdir("raf-bom");
    for name in ["train_00001", "train_00002", "train_00003", "test_0001"] {
        write_jpg(&root.join(format!("Image/aligned/{name}_aligned.jpg")), 10);
    }
    let spec = DataSpec::RafDb {
        root: root.clone(),
        skip_bad: false,
    };
    let list = root.join("EmoLabel/list_patition_label.txt");
    // A BOM before the first line used to make that line's name "\u{feff}train_00001.jpg",
    // which matched no split prefix: the sample was silently dropped.
    write(
        &list,
        "\u{feff}train_00001.jpg 5\ntrain_00002.jpg 1\ntrain_00003.jpg 2\ntest_0001.jpg 7\n",
    );
    assert_eq!(
        data::load(&spec, Split::Train).unwrap().labels(),
        vec![4, 0, 1]
    );
    // An identical repeated line is dropped (each image once); a conflicting one is an error
    // naming both lines.
    write(
        &list,
        "train_00001.jpg 5\ntrain_00002.jpg 1\ntrain_00001.jpg 5\ntrain_00003.jpg 2\ntest_0001.jpg 7\n",
    );
    assert_eq!(
        data::load(&spec, Split::Train).unwrap().labels(),
        vec![4, 0, 1]
    );
    write(
        &list,
        "train_00001.jpg 5\ntrain_00002.jpg 1\ntrain_00003.jpg 2\ntrain_00002.jpg 3\ntest_0001.jpg 7\n",
    );
    let err = data::load(&spec, Split::Train).err().unwrap().to_string();
    assert!(
        err.contains("list_patition_label.txt:4")
            && err.contains("train_00002.jpg is labelled 3 here but 1 on line 2"),
        "{err}"
    );
    // EAC's noise files are read the same way.
    let noise_file = root.join("EmoLabel/noise01.txt");
    write(
        &noise_file,
        "\u{feff}train_00001.jpg 2\ntrain_00002.jpg 1\n",
    );
    let lines = noise::read_label_file(&noise_file).unwrap();
    assert_eq!(lines[0].0, "train_00001.jpg");
}

#[test]
fn image_folder_splits_must_share_their_classes() {
    let root = tempdir("folder-mismatch");
    // test/ lacks class a: its c1 images would have been scored as label 0.
    for (split, class) in [("train", "a"), ("train", "c1"), ("test", "c1")] {
        write_jpg(&root.join(format!("{split}/{class}/x.jpg")), 5);
    }
    let spec = DataSpec::ImageFolder {
        root: root.clone(),
        skip_bad: false,
    };
    for split in [Split::Train, Split::Test] {
        let err = data::load(&spec, split).err().unwrap().to_string();
        assert!(
            err.contains("must have the same class folders")
                && err.contains("missing in test/: a")
                && err.contains("missing in train/: none"),
            "{err}"
        );
    }
    write_jpg(&root.join("test/a/y.jpg"), 7);
    let test = data::load(&spec, Split::Test).unwrap();
    assert_eq!(test.class_names, vec!["a", "c1"]);
    assert_eq!(test.labels(), vec![0, 1]);
}

/// `Image::resize_pil` against PIL's own output (`fixtures/pil/`, made by its generate.py):
/// up- and down-scaling at odd sizes and a 512 px photo, pixel for pixel.
#[test]
fn resize_matches_pil_bilinear_pixel_for_pixel() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pil");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let src = Image::open(&dir.join(case["source"].as_str().unwrap())).unwrap();
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let want = image::open(dir.join(case["reference"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        let got = src.resize_pil(w, h).to_rgb8();
        assert_eq!((got.width(), got.height()), (w as u32, h as u32));
        let diffs: Vec<i32> = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let worst = diffs.iter().max().copied().unwrap();
        let off = diffs.iter().filter(|&&d| d > 0).count();
        assert_eq!(
            (worst, off),
            (0, 0),
            "{} -> {w}x{h}: {off} of {} values differ from PIL (worst by {worst})",
            case["source"],
            diffs.len()
        );
    }
}

/// `Image::open` decodes JPEGs as PIL does (`fixtures/pil/`: PIL-encoded variants and a camera
/// photo, with PIL's decode), bit for bit; a truncated JPEG is an error naming the file, as in
/// PIL, instead of a silently grey image.
#[test]
fn jpeg_decoding_matches_pil_and_truncation_is_an_error() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pil");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["decode"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let jpeg = dir.join(case["jpeg"].as_str().unwrap());
        let got = Image::open(&jpeg).unwrap().to_rgb8();
        let want = image::open(dir.join(case["decoded"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{}", jpeg.display());
        let off = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            off,
            0,
            "{}: {off} values differ from PIL's decode",
            jpeg.display()
        );
    }
    let bytes = std::fs::read(dir.join("../faces/grace_hopper_512x512.jpg")).unwrap();
    let cut = crate::common::scratch("truncated").join("fer-truncated.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", Image::open(&cut).unwrap_err());
    assert!(
        e.contains("fer-truncated") && e.contains("Premature end"),
        "{e}"
    );
    std::fs::remove_file(&cut).unwrap();
}
