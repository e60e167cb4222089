//! The LBP cascade finds the one face in each public-domain photo, near the boxes the assets'
//! README gives.

use std::path::Path;

use fer_model::data::image::Image;
use fer_runner::face_detect::{Cascade, FaceBox};

fn photo(name: &str) -> Image {
    Image::open(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/faces")
            .join(name),
    )
    .unwrap()
}

/// The share of a detected box inside an (x0, y0, x1, y1) box.
fn inside(f: &FaceBox, (x0, y0, x1, y1): (usize, usize, usize, usize)) -> f64 {
    let ix = (f.x + f.width).min(x1).saturating_sub(f.x.max(x0)) as f64;
    let iy = (f.y + f.height).min(y1).saturating_sub(f.y.max(y0)) as f64;
    ix * iy / (f.width * f.height) as f64
}

#[test]
fn one_face_in_each_photo_at_the_expected_box() {
    let cascade = Cascade::frontal_face();
    for (name, expected) in [
        ("grace_hopper_512x512.jpg", (175, 100, 405, 330)),
        ("astronaut.png", (160, 20, 300, 160)),
    ] {
        let faces = cascade.detect(&photo(name), 3);
        eprintln!("{name}: {faces:?}");
        assert_eq!(faces.len(), 1, "{name}: {faces:?}");
        // The cascade's boxes are tight (brows to chin), the README's include hair: the found box
        // must lie inside the expected one, centred in it, and not be a small part of it.
        let f = faces[0];
        let share = inside(&f, expected);
        assert!(
            share > 0.9,
            "{name}: box {f:?} lies {share:.2} inside the expected {expected:?}"
        );
        let (cx, cy) = (f.x + f.width / 2, f.y + f.height / 2);
        let (ex, ey, ew, eh) = (
            expected.0,
            expected.1,
            expected.2 - expected.0,
            expected.3 - expected.1,
        );
        assert!(
            cx > ex + ew / 4 && cx < ex + 3 * ew / 4 && cy > ey + eh / 4 && cy < ey + 3 * eh / 4,
            "{name}: box {f:?} is off-centre in {expected:?}"
        );
        assert!(
            f.width * 5 > ew * 2,
            "{name}: box {f:?} is too small for {expected:?}"
        );
    }
}

#[test]
fn bad_cascades_are_clear_errors() {
    let e = Cascade::parse(
        "<opencv_storage><cascade><featureType>HAAR</featureType></cascade></opencv_storage>",
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("only LBP"), "{e}");
    let e = Cascade::parse("not xml").err().unwrap();
    assert!(!e.to_string().is_empty());
    let e = Cascade::load(Path::new("/no/such/cascade.xml"))
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("/no/such/cascade.xml"), "{e:#}");
}
