//! Procedural synthetic faces: the embedded default data set (no download needed).
//!
//! A face is drawn from signed-distance primitives in face coordinates ([-1,1]^2, y down).
//! Its expression is an action-unit (AU) intensity vector: each class has a prototype whose
//! evidence spans at least two regions (brows, eyes, nose, mouth), and the confusable pairs
//! (fear/surprise, disgust/anger, sadness/neutral) share part of it and differ in the rest.
//! Identity, skin, lighting, pose, background, occluders and sensor noise vary under one
//! difficulty knob. Everything is symmetric in distribution, so a mirrored face is a valid
//! sample of the same class. Design notes: shared research, "FER landscape" part 3.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::image::Image;

/// RAF-DB's class order.
pub const CLASS_NAMES: [&str; 7] = [
    "surprise",
    "fear",
    "disgust",
    "happiness",
    "sadness",
    "anger",
    "neutral",
];

/// RAF-DB's training-set class counts (spec 5.1), for `ClassBalance::RafDb`.
pub const RAFDB_TRAIN_COUNTS: [usize; 7] = [1290, 281, 717, 4772, 1982, 705, 2524];

/// Action units used by the renderer (FACS numbers in the names).
#[derive(Debug, Clone, Copy, Default)]
struct Aus {
    inner_brow_raise_1: f32,
    outer_brow_raise_2: f32,
    brow_lower_4: f32,
    upper_lid_raise_5: f32,
    cheek_raise_6: f32,
    lid_tighten_7: f32,
    nose_wrinkle_9: f32,
    upper_lip_raise_10: f32,
    lip_corner_pull_12: f32,
    lip_corner_depress_15: f32,
    chin_raise_17: f32,
    lip_stretch_20: f32,
    lip_press_23: f32,
    lips_part_25: f32,
    jaw_drop_26: f32,
}

const N_AU: usize = 15;

impl Aus {
    fn to_array(self) -> [f32; N_AU] {
        [
            self.inner_brow_raise_1,
            self.outer_brow_raise_2,
            self.brow_lower_4,
            self.upper_lid_raise_5,
            self.cheek_raise_6,
            self.lid_tighten_7,
            self.nose_wrinkle_9,
            self.upper_lip_raise_10,
            self.lip_corner_pull_12,
            self.lip_corner_depress_15,
            self.chin_raise_17,
            self.lip_stretch_20,
            self.lip_press_23,
            self.lips_part_25,
            self.jaw_drop_26,
        ]
    }

    fn from_array(a: [f32; N_AU]) -> Self {
        Aus {
            inner_brow_raise_1: a[0],
            outer_brow_raise_2: a[1],
            brow_lower_4: a[2],
            upper_lid_raise_5: a[3],
            cheek_raise_6: a[4],
            lid_tighten_7: a[5],
            nose_wrinkle_9: a[6],
            upper_lip_raise_10: a[7],
            lip_corner_pull_12: a[8],
            lip_corner_depress_15: a[9],
            chin_raise_17: a[10],
            lip_stretch_20: a[11],
            lip_press_23: a[12],
            lips_part_25: a[13],
            jaw_drop_26: a[14],
        }
    }
}

/// Class prototypes (RAF-DB order), from the design notes' table.
fn prototype(class: usize) -> Aus {
    let d = Aus::default();
    match class {
        // Surprise: high arched brows, wide eyes, tall round open mouth.
        0 => Aus {
            inner_brow_raise_1: 0.9,
            outer_brow_raise_2: 0.9,
            upper_lid_raise_5: 0.8,
            lips_part_25: 0.8,
            jaw_drop_26: 0.8,
            ..d
        },
        // Fear: raised *and* pulled-together brows, wide eyes, wide stretched short mouth.
        1 => Aus {
            inner_brow_raise_1: 0.8,
            outer_brow_raise_2: 0.5,
            brow_lower_4: 0.6,
            upper_lid_raise_5: 0.8,
            lip_stretch_20: 0.8,
            lips_part_25: 0.6,
            jaw_drop_26: 0.3,
            ..d
        },
        // Disgust: nose wrinkles, raised upper lip, slight squint, corners down.
        2 => Aus {
            nose_wrinkle_9: 0.9,
            upper_lip_raise_10: 0.7,
            brow_lower_4: 0.3,
            lip_corner_depress_15: 0.4,
            chin_raise_17: 0.4,
            cheek_raise_6: 0.3,
            lid_tighten_7: 0.3,
            ..d
        },
        // Happiness: smile, raised cheeks / crow's feet, teeth.
        3 => Aus {
            lip_corner_pull_12: 0.9,
            cheek_raise_6: 0.8,
            lips_part_25: 0.5,
            ..d
        },
        // Sadness: inner brows up, corners down, chin raised, drooping lids.
        4 => Aus {
            inner_brow_raise_1: 0.8,
            brow_lower_4: 0.5,
            lip_corner_depress_15: 0.8,
            chin_raise_17: 0.4,
            upper_lid_raise_5: -0.3,
            ..d
        },
        // Anger: low V brows, tight eyes, pressed lips.
        5 => Aus {
            brow_lower_4: 0.9,
            upper_lid_raise_5: 0.4,
            lid_tighten_7: 0.7,
            lip_press_23: 0.7,
            ..d
        },
        // Neutral.
        _ => d,
    }
}

/// Real-world confusion partners P(c'|c) used for blending (design notes 3.3).
fn partners(class: usize) -> &'static [(usize, f32)] {
    match class {
        0 => &[(1, 0.6), (3, 0.2), (6, 0.2)],
        1 => &[(0, 0.7), (4, 0.3)],
        2 => &[(5, 0.5), (4, 0.3), (6, 0.2)],
        3 => &[(6, 0.7), (0, 0.3)],
        4 => &[(6, 0.5), (1, 0.2), (2, 0.3)],
        5 => &[(2, 0.6), (4, 0.2), (6, 0.2)],
        _ => &[(4, 0.5), (5, 0.2), (3, 0.3)],
    }
}

/// How samples are distributed over classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassBalance {
    Balanced,
    /// RAF-DB's training proportions (happiness-heavy, fear-light).
    RafDb,
}

/// Settings of a synthetic data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    /// 0 = easy ... 1 = hard (presets: easy 0.2, medium 0.5, hard 0.8).
    pub difficulty: f32,
    pub image_size: usize,
    pub train: usize,
    pub test: usize,
    pub seed: u64,
    pub balance: ClassBalance,
}

impl SynthConfig {
    /// The embedded default: small enough that a head-count sweep runs in minutes on 2 cores.
    pub fn default_small() -> Self {
        Self {
            difficulty: 0.5,
            image_size: 48,
            train: 1400,
            test: 700,
            seed: 0,
            balance: ClassBalance::Balanced,
        }
    }

    pub fn preset(name: &str) -> Option<f32> {
        match name {
            "easy" => Some(0.2),
            "medium" => Some(0.5),
            "hard" => Some(0.8),
            _ => None,
        }
    }
}

/// Split of a synthetic set; seeds different streams so train and test never share a face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

fn stream(seed: u64, split: Split, index: usize, purpose: u64) -> ChaCha8Rng {
    // SplitMix-style mixing so nearby indices give unrelated streams.
    let mut z = seed
        ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED69);
    z ^= match split {
        Split::Train => 0x5151_5151,
        Split::Test => 0xA3A3_A3A3_0000,
    };
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Labels of a split: exact per-class counts (balanced or RAF-DB proportions), shuffled.
pub fn labels(cfg: &SynthConfig, split: Split) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let n = match split {
        Split::Train => cfg.train,
        Split::Test => cfg.test,
    };
    let weights: Vec<f64> = match cfg.balance {
        ClassBalance::Balanced => vec![1.0; 7],
        ClassBalance::RafDb => RAFDB_TRAIN_COUNTS.iter().map(|&c| c as f64).collect(),
    };
    let total: f64 = weights.iter().sum();
    let mut counts: Vec<usize> = weights
        .iter()
        .map(|w| (w / total * n as f64).floor() as usize)
        .collect();
    // Hand out the remainder to the classes with the largest fractional parts.
    let mut order: Vec<usize> = (0..7).collect();
    order.sort_by(|&a, &b| {
        let fa = weights[a] / total * n as f64 - counts[a] as f64;
        let fb = weights[b] / total * n as f64 - counts[b] as f64;
        fb.partial_cmp(&fa).unwrap().then(a.cmp(&b))
    });
    let mut missing = n - counts.iter().sum::<usize>();
    for &c in order.iter().cycle() {
        if missing == 0 {
            break;
        }
        counts[c] += 1;
        missing -= 1;
    }
    let mut out: Vec<u32> = counts
        .iter()
        .enumerate()
        .flat_map(|(c, &k)| std::iter::repeat_n(c as u32, k))
        .collect();
    out.shuffle(&mut stream(cfg.seed, split, usize::MAX, 1));
    out
}

/// Everything that varies between two faces of one class.
struct FaceParams {
    aus: Aus,
    // identity
    aspect: f32,
    eye_dx: f32,
    eye_size: f32,
    nose_len: f32,
    mouth_w: f32,
    lip_w: f32,
    brow_w: f32,
    skin: [f32; 3],
    hair: [f32; 3],
    hair_style: u8,
    iris: [f32; 3],
    // pose and scene
    angle: f32,
    scale: f32,
    shift: (f32, f32),
    light_dir: f32,
    light_amp: f32,
    gamma: f32,
    background: [[f32; 3]; 2],
    bg_noise: f32,
    occluder: Option<(u8, [f32; 3])>,
    noise_sigma: f32,
}

fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

fn sym(rng: &mut ChaCha8Rng, r: f32) -> f32 {
    if r <= 0.0 {
        0.0
    } else {
        rng.random_range(-r..=r)
    }
}

fn draw_params(class: usize, d: f32, rng: &mut ChaCha8Rng) -> FaceParams {
    let d = d.clamp(0.0, 1.0);
    // Expression: a = n + s (mu - n) + eps, with optional blending towards a partner class.
    let mut mu = prototype(class).to_array();
    let p_mix = 0.4 * d;
    if rng.random::<f32>() < p_mix {
        let alpha = rng.random_range(lerp(1.0, 0.55, d)..=1.0);
        let u: f32 = rng.random();
        let mut acc = 0.0;
        let mut partner = partners(class)[0].0;
        for &(c, p) in partners(class) {
            acc += p;
            if u <= acc {
                partner = c;
                break;
            }
        }
        let other = prototype(partner).to_array();
        for k in 0..N_AU {
            mu[k] = alpha * mu[k] + (1.0 - alpha) * other[k];
        }
    }
    let s = rng.random_range(lerp(0.8, 0.25, d)..=1.0);
    let au_noise = Normal::new(0.0, 0.03 + 0.12 * d).unwrap();
    let mut resting = [0f32; N_AU];
    resting[0] = sym(rng, 0.1); // a "resting sad face" confound: brow height ...
    resting[9] = sym(rng, 0.1).max(0.0); // ... and mouth curvature
    resting[8] = sym(rng, 0.1).max(0.0);
    let mut a = [0f32; N_AU];
    for k in 0..N_AU {
        a[k] = (resting[k] + s * (mu[k] - resting[k]) + au_noise.sample(rng)).clamp(-0.4, 1.1);
    }
    let tone: f32 = rng.random();
    let skin = [
        lerp(0.95, 0.35, tone),
        lerp(0.80, 0.24, tone),
        lerp(0.70, 0.16, tone),
    ];
    let jitter =
        |rng: &mut ChaCha8Rng, c: [f32; 3], r: f32| c.map(|v| (v + sym(rng, r)).clamp(0.0, 1.0));
    let skin = jitter(rng, skin, 0.05);
    let hair = jitter(rng, [0.15, 0.1, 0.05], 0.12);
    let hair = if rng.random::<f32>() < 0.2 {
        jitter(rng, [0.6, 0.45, 0.2], 0.15)
    } else {
        hair
    };
    let bg0 = [rng.random(), rng.random(), rng.random()];
    let bg1 = if rng.random::<f32>() < 0.3 + 0.7 * d {
        [rng.random(), rng.random(), rng.random()]
    } else {
        bg0
    };
    let occluder = if rng.random::<f32>() < 0.5 * d {
        Some((
            rng.random_range(0..4u8),
            [rng.random(), rng.random(), rng.random()],
        ))
    } else {
        None
    };
    FaceParams {
        aus: Aus::from_array(a),
        aspect: rng.random_range(0.75..0.95),
        eye_dx: rng.random_range(0.30..0.38),
        eye_size: rng.random_range(0.085..0.115),
        nose_len: rng.random_range(0.22..0.32),
        mouth_w: rng.random_range(0.36..0.48),
        lip_w: rng.random_range(0.022..0.04),
        brow_w: rng.random_range(0.022..0.04),
        skin,
        hair,
        hair_style: rng.random_range(0..3u8),
        iris: jitter(rng, [0.25, 0.2, 0.15], 0.15),
        angle: sym(rng, (3.0 + 17.0 * d).to_radians()),
        scale: 1.0 + sym(rng, 0.03 + 0.17 * d),
        shift: (sym(rng, 0.03 + 0.09 * d), sym(rng, 0.03 + 0.09 * d)),
        light_dir: rng.random_range(0.0..std::f32::consts::TAU),
        light_amp: rng.random_range(0.0..=0.6 * d + 1e-6),
        gamma: (1.0 + sym(rng, 0.6 * d)).max(0.4),
        background: [bg0, bg1],
        bg_noise: rng.random_range(0.0..=0.15 * d + 1e-6),
        occluder,
        noise_sigma: rng.random_range(0.0..=0.08 * d + 1e-6),
    }
}

// ---- signed-distance primitives (face units) ----

fn sd_ellipse(p: (f32, f32), c: (f32, f32), r: (f32, f32)) -> f32 {
    let (x, y) = ((p.0 - c.0) / r.0, (p.1 - c.1) / r.1);
    ((x * x + y * y).sqrt() - 1.0) * r.0.min(r.1)
}

fn sd_segment(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> f32 {
    let (pax, pay) = (p.0 - a.0, p.1 - a.1);
    let (bax, bay) = (b.0 - a.0, b.1 - a.1);
    let h = ((pax * bax + pay * bay) / (bax * bax + bay * bay).max(1e-12)).clamp(0.0, 1.0);
    ((pax - bax * h).powi(2) + (pay - bay * h).powi(2)).sqrt()
}

/// A thick quadratic Bezier stroke, flattened into segments.
struct Stroke {
    pts: Vec<(f32, f32)>,
    half_width: f32,
    color: [f32; 3],
    opacity: f32,
}

impl Stroke {
    fn bezier(
        a: (f32, f32),
        ctrl: (f32, f32),
        b: (f32, f32),
        half_width: f32,
        color: [f32; 3],
        opacity: f32,
    ) -> Self {
        let pts = (0..=8)
            .map(|i| {
                let t = i as f32 / 8.0;
                let u = 1.0 - t;
                (
                    u * u * a.0 + 2.0 * u * t * ctrl.0 + t * t * b.0,
                    u * u * a.1 + 2.0 * u * t * ctrl.1 + t * t * b.1,
                )
            })
            .collect();
        Self {
            pts,
            half_width,
            color,
            opacity,
        }
    }

    /// The Bezier from `a` to `b` whose midpoint is `mid`.
    fn through(
        a: (f32, f32),
        mid: (f32, f32),
        b: (f32, f32),
        half_width: f32,
        color: [f32; 3],
        opacity: f32,
    ) -> Self {
        let ctrl = (
            2.0 * mid.0 - (a.0 + b.0) / 2.0,
            2.0 * mid.1 - (a.1 + b.1) / 2.0,
        );
        Self::bezier(a, ctrl, b, half_width, color, opacity)
    }

    fn sd(&self, p: (f32, f32)) -> f32 {
        self.pts
            .windows(2)
            .map(|w| sd_segment(p, w[0], w[1]))
            .fold(f32::MAX, f32::min)
            - self.half_width
    }

    fn mirrored(&self) -> Self {
        Self {
            pts: self.pts.iter().map(|&(x, y)| (-x, y)).collect(),
            half_width: self.half_width,
            color: self.color,
            opacity: self.opacity,
        }
    }
}

/// A filled shape of the face, drawn in order.
enum Shape {
    Ellipse {
        c: (f32, f32),
        r: (f32, f32),
        color: [f32; 3],
        opacity: f32,
    },
    Stroke(Stroke),
}

impl Shape {
    fn sd(&self, p: (f32, f32)) -> f32 {
        match self {
            Shape::Ellipse { c, r, .. } => sd_ellipse(p, *c, *r),
            Shape::Stroke(s) => s.sd(p),
        }
    }
    /// Axis-aligned bounds (min x, min y, max x, max y): pixels outside are never touched.
    fn bounds(&self) -> (f32, f32, f32, f32) {
        match self {
            Shape::Ellipse { c, r, .. } => (c.0 - r.0, c.1 - r.1, c.0 + r.0, c.1 + r.1),
            Shape::Stroke(s) => {
                let hw = s.half_width;
                s.pts
                    .iter()
                    .fold((f32::MAX, f32::MAX, f32::MIN, f32::MIN), |b, &(x, y)| {
                        (
                            b.0.min(x - hw),
                            b.1.min(y - hw),
                            b.2.max(x + hw),
                            b.3.max(y + hw),
                        )
                    })
            }
        }
    }

    fn paint(&self) -> ([f32; 3], f32) {
        match self {
            Shape::Ellipse { color, opacity, .. } => (*color, *opacity),
            Shape::Stroke(s) => (s.color, s.opacity),
        }
    }
}

/// Both halves of a symmetric feature.
fn pair(shapes: &mut Vec<Shape>, s: Stroke) {
    let m = s.mirrored();
    shapes.push(Shape::Stroke(s));
    shapes.push(Shape::Stroke(m));
}

fn scale3(c: [f32; 3], k: f32) -> [f32; 3] {
    c.map(|v| (v * k).clamp(0.0, 1.0))
}

/// The face's shapes after the head (which is shaded separately), back to front: cheeks and
/// eyes, brows, nose, mouth and chin, then an occluder. Each feature moves with its action units
/// (`f.aus`).
fn face_shapes(f: &FaceParams) -> Vec<Shape> {
    let ink = Ink {
        dark: scale3(f.skin, 0.45),
        line: scale3(f.skin, 0.65),
    };
    let mut s = Vec::new();
    let ey = cheeks_and_eyes(f, ink, &mut s);
    let by = brows(f, ink, ey, &mut s);
    let ny = nose(f, ink, ey, &mut s);
    let my = mouth_and_chin(f, ink, ny, &mut s);
    if let Some(o) = occluder(f, ey, by, my) {
        s.push(o);
    }
    s
}

/// The two darker skin tones features are drawn with.
#[derive(Clone, Copy)]
struct Ink {
    dark: [f32; 3],
    line: [f32; 3],
}

/// Cheek highlights, eyes with lids and crow's feet; returns the eye line's height.
fn cheeks_and_eyes(f: &FaceParams, ink: Ink, s: &mut Vec<Shape>) -> f32 {
    let a = &f.aus;
    let Ink { dark, line } = ink;
    // Cheek highlight (AU6).
    for side in [-1.0f32, 1.0] {
        s.push(Shape::Ellipse {
            c: (side * 0.42, 0.18),
            r: (0.16, 0.1),
            color: scale3(f.skin, 1.18),
            opacity: 0.7 * a.cheek_raise_6.max(0.0),
        });
    }

    // Eyes: aperture opens with AU5, closes with AU6/AU7; lower lid rises with AU6.
    let ey = -0.12;
    let open = (f.eye_size
        * 0.55
        * (1.0 + 0.7 * a.upper_lid_raise_5 - 0.55 * a.lid_tighten_7 - 0.35 * a.cheek_raise_6))
        .max(0.008);
    for side in [-1.0f32, 1.0] {
        let cx = side * f.eye_dx;
        s.push(Shape::Ellipse {
            c: (cx, ey),
            r: (f.eye_size, open),
            color: [0.95, 0.95, 0.93],
            opacity: 1.0,
        });
        let ir = (f.eye_size * 0.5).min(open);
        s.push(Shape::Ellipse {
            c: (cx, ey),
            r: (ir, ir),
            color: f.iris,
            opacity: 1.0,
        });
        s.push(Shape::Ellipse {
            c: (cx, ey),
            r: (ir * 0.45, ir * 0.45),
            color: [0.05, 0.05, 0.05],
            opacity: 1.0,
        });
    }
    // Lids (drawn as strokes over the eye edge).
    let upper = Stroke::bezier(
        (f.eye_dx - f.eye_size, ey),
        (f.eye_dx, ey - open * 2.0),
        (f.eye_dx + f.eye_size, ey),
        0.012,
        dark,
        1.0,
    );
    pair(s, upper);
    let lower_lift = 0.6 * a.cheek_raise_6.max(0.0) * open;
    let lower = Stroke::bezier(
        (f.eye_dx - f.eye_size, ey),
        (f.eye_dx, ey + open * 2.0 - lower_lift * 2.0),
        (f.eye_dx + f.eye_size, ey),
        0.008,
        line,
        0.8,
    );
    pair(s, lower);
    // Crow's feet (AU6).
    for k in [-1.0f32, 0.0, 1.0] {
        let x0 = f.eye_dx + f.eye_size + 0.03;
        let st = Stroke::bezier(
            (x0, ey + k * 0.03),
            (x0 + 0.04, ey + k * 0.045),
            (x0 + 0.08, ey + k * 0.06),
            0.006,
            line,
            a.cheek_raise_6.max(0.0),
        );
        pair(s, st);
    }
    ey
}

/// Brows and glabella lines above the eye line `ey`; returns the brow line's height.
fn brows(f: &FaceParams, ink: Ink, ey: f32, s: &mut Vec<Shape>) -> f32 {
    let a = &f.aus;
    // Brows: inner end up with AU1, outer with AU2, both down and inward with AU4.
    let by = ey - f.eye_size - 0.1;
    let inner_x = 0.1 + 0.06 * (1.0 - a.brow_lower_4.max(0.0));
    let inner_y = by - 0.13 * a.inner_brow_raise_1 + 0.09 * a.brow_lower_4;
    let outer_y = by - 0.12 * a.outer_brow_raise_2 + 0.03 * a.brow_lower_4;
    let outer_x = inner_x + 0.34;
    let arch = 0.05 + 0.06 * a.outer_brow_raise_2 - 0.04 * a.brow_lower_4;
    let brow = Stroke::bezier(
        (inner_x, inner_y),
        ((inner_x + outer_x) / 2.0, (inner_y + outer_y) / 2.0 - arch),
        (outer_x, outer_y),
        f.brow_w,
        f.hair,
        1.0,
    );
    pair(s, brow);
    // Glabella lines (AU4).
    for x in [-0.03f32, 0.03] {
        let st = Stroke::bezier(
            (x, by - 0.02),
            (x * 1.3, by + 0.04),
            (x, by + 0.1),
            0.006,
            ink.line,
            a.brow_lower_4.max(0.0),
        );
        s.push(Shape::Stroke(st));
    }
    by
}

/// Nose below the eye line `ey`; returns the nose tip's height.
fn nose(f: &FaceParams, ink: Ink, ey: f32, s: &mut Vec<Shape>) -> f32 {
    let a = &f.aus;
    let Ink { dark, line } = ink;
    // Nose: bridge, nostrils (lift and widen with AU9), bridge wrinkles (AU9).
    let ny = ey + f.nose_len;
    let nost_w = 0.05 + 0.03 * a.nose_wrinkle_9.max(0.0);
    let nost_y = ny - 0.025 * a.nose_wrinkle_9;
    s.push(Shape::Stroke(Stroke::bezier(
        (0.02, ey + 0.04),
        (0.04, ny - 0.08),
        (0.03, ny - 0.02),
        0.008,
        line,
        0.8,
    )));
    for side in [-1.0f32, 1.0] {
        s.push(Shape::Ellipse {
            c: (side * nost_w, nost_y),
            r: (0.028, 0.016),
            color: dark,
            opacity: 1.0,
        });
    }
    for k in 0..3 {
        let y = ey + 0.05 + k as f32 * 0.035;
        let st = Stroke::bezier(
            (-0.07, y),
            (0.0, y - 0.02),
            (0.07, y),
            0.006,
            line,
            a.nose_wrinkle_9.max(0.0),
        );
        s.push(Shape::Stroke(st));
    }
    ny
}

/// Mouth (cavity, teeth, lips) below the nose tip `ny` and the chin bump; returns the mouth's
/// height.
fn mouth_and_chin(f: &FaceParams, ink: Ink, ny: f32, s: &mut Vec<Shape>) -> f32 {
    let a = &f.aus;
    // Mouth: width (AU20 wider, AU23 narrower), corners (AU12 up, AU15 down), opening
    // (AU25 parts, AU26 drops and rounds), upper lip raise (AU10), chin raise (AU17).
    let my = ny + 0.17 + 0.04 * a.jaw_drop_26.max(0.0);
    let half_w = f.mouth_w / 2.0
        * (1.0 + 0.35 * a.lip_stretch_20 - 0.25 * a.lip_press_23 - 0.25 * a.jaw_drop_26.max(0.0)
            + 0.15 * a.lip_corner_pull_12.max(0.0));
    let corner_y = my - 0.1 * a.lip_corner_pull_12 + 0.09 * a.lip_corner_depress_15;
    let gap = (0.015 * a.lips_part_25 + 0.13 * a.jaw_drop_26 + 0.04 * a.upper_lip_raise_10)
        .max(0.0)
        * (1.0 - 0.4 * a.lip_stretch_20.max(0.0));
    let top_y = my - gap / 2.0 - 0.04 * a.upper_lip_raise_10;
    let bottom_y = my + gap / 2.0 - 0.02 * a.chin_raise_17;
    let sag = 0.5 * (my - corner_y); // smile: centre below the corners
    let lip_w = f.lip_w * (1.0 - 0.5 * a.lip_press_23.max(0.0));
    let lip_color = [f.skin[0] * 0.75 + 0.12, f.skin[1] * 0.5, f.skin[2] * 0.5];
    if gap > 0.01 {
        // Cavity, with an upper teeth strip when the lips part (smile, disgust) or open wide.
        s.push(Shape::Ellipse {
            c: (0.0, (top_y + bottom_y) / 2.0 + sag),
            r: (half_w * 0.8, gap / 2.0),
            color: [0.18, 0.05, 0.06],
            opacity: 1.0,
        });
        let teeth =
            (a.lips_part_25 + a.upper_lip_raise_10 + a.lip_corner_pull_12 - 0.4).clamp(0.0, 1.0);
        s.push(Shape::Ellipse {
            c: (0.0, top_y + sag + gap * 0.2),
            r: (half_w * 0.6, gap * 0.25),
            color: [0.95, 0.95, 0.9],
            opacity: teeth,
        });
    }
    s.push(Shape::Stroke(Stroke::through(
        (-half_w, corner_y),
        (0.0, top_y + sag - 0.02 * a.upper_lip_raise_10),
        (half_w, corner_y),
        lip_w,
        lip_color,
        1.0,
    )));
    s.push(Shape::Stroke(Stroke::through(
        (-half_w, corner_y),
        (0.0, bottom_y + sag + 0.01),
        (half_w, corner_y),
        lip_w * 1.2,
        lip_color,
        1.0,
    )));
    // Chin bump (AU17).
    let cy = my + 0.2;
    s.push(Shape::Stroke(Stroke::bezier(
        (-0.1, cy),
        (0.0, cy - 0.05),
        (0.1, cy),
        0.007,
        ink.line,
        a.chin_raise_17.max(0.0),
    )));
    my
}

/// An occluder over one region (hand, sunglasses, mask, fringe), placed by the eye, brow and
/// mouth lines.
fn occluder(f: &FaceParams, ey: f32, by: f32, my: f32) -> Option<Shape> {
    let (kind, color) = f.occluder?;
    Some(match kind {
        0 => Shape::Ellipse {
            c: (0.35, 0.45),
            r: (0.3, 0.22),
            color: f.skin.map(|v| v * 0.9),
            opacity: 1.0,
        },
        1 => Shape::Ellipse {
            c: (0.0, ey),
            r: (0.62, 0.12),
            color: [0.05, 0.05, 0.07],
            opacity: 0.95,
        },
        2 => Shape::Ellipse {
            c: (0.0, my + 0.05),
            r: (0.45, 0.24),
            color,
            opacity: 1.0,
        },
        _ => Shape::Ellipse {
            c: (0.0, by - 0.05),
            r: (0.7, 0.12),
            color: f.hair,
            opacity: 1.0,
        },
    })
}

/// The face fills the frame like an aligned crop; the features are drawn larger than the head
/// proportions alone would give so that they stay legible at 48 px.
const FACE_ZOOM: f32 = 1.2;
const FEATURE_ZOOM: f32 = 1.35;

/// Render one face as an RGB image in [0,1].
fn render(f: &FaceParams, size: usize, rng: &mut ChaCha8Rng) -> Image {
    let shapes: Vec<(Shape, (f32, f32, f32, f32))> = face_shapes(f)
        .into_iter()
        .filter(|s| s.paint().1 > 0.0)
        .map(|s| {
            let b = s.bounds();
            (s, b)
        })
        .collect();
    let px = 2.0 / size as f32 / f.scale / FACE_ZOOM; // one pixel, in face units
    let pxf = px; // feature distances are rescaled to head units before use
    let (sin, cos) = f.angle.sin_cos();
    let head_r = (0.78 * f.aspect, 0.98);
    let noise = Normal::new(0.0f32, f.noise_sigma.max(1e-6)).unwrap();
    let (lx, ly) = (f.light_dir.cos(), f.light_dir.sin());
    let mut img = Image::new(size, size);
    for y in 0..size {
        for x in 0..size {
            // Pixel centre -> face coordinates (inverse of scale, rotation, shift).
            let u = (x as f32 + 0.5) / size as f32 * 2.0 - 1.0 - f.shift.0;
            let v = (y as f32 + 0.5) / size as f32 * 2.0 - 1.0 - f.shift.1;
            let (u, v) = (u / f.scale, v / f.scale);
            let p = (cos * u + sin * v, -sin * u + cos * v);
            let p = (p.0 / FACE_ZOOM, p.1 / FACE_ZOOM);
            let pf = (p.0 / FEATURE_ZOOM, (p.1 - 0.05) / FEATURE_ZOOM);
            // Background: a vertical gradient between two colours plus texture noise.
            let t = (y as f32 + 0.5) / size as f32;
            let mut c = [0f32; 3];
            for k in 0..3 {
                c[k] = lerp(f.background[0][k], f.background[1][k], t)
                    + f.bg_noise * (rng.random::<f32>() - 0.5);
            }
            let cover = |d: f32| (0.5 - d / px).clamp(0.0, 1.0);
            // Hair behind the head (styles: cap, long, none).
            let hair_d = match f.hair_style {
                0 => sd_ellipse(p, (0.0, -0.25), (head_r.0 + 0.08, 0.85)),
                1 => sd_ellipse(p, (0.0, 0.0), (head_r.0 + 0.12, 1.05)),
                _ => f32::MAX,
            };
            blend(&mut c, f.hair, cover(hair_d));
            // Head, shaded by a directional light on the ellipsoid.
            let hd = sd_ellipse(p, (0.0, 0.0), head_r);
            if hd < px {
                let (nx, ny) = (p.0 / head_r.0, p.1 / head_r.1);
                let shade = 1.0 + f.light_amp * (nx * lx + ny * ly) * 0.8;
                blend(&mut c, scale3(f.skin, shade), cover(hd));
            }
            for (s, b) in &shapes {
                let m = pxf / FEATURE_ZOOM;
                if pf.0 < b.0 - m || pf.0 > b.2 + m || pf.1 < b.1 - m || pf.1 > b.3 + m {
                    continue;
                }
                let (color, opacity) = s.paint();
                let d = s.sd(pf) * FEATURE_ZOOM;
                if d < pxf {
                    blend(
                        &mut c,
                        color,
                        (0.5 - d / pxf).clamp(0.0, 1.0) * opacity.min(1.0),
                    );
                }
            }
            for k in 0..3 {
                let v = (c[k].clamp(0.0, 1.0)).powf(f.gamma) + noise.sample(rng);
                img.set(k, y, x, v.clamp(0.0, 1.0));
            }
        }
    }
    img
}

fn blend(c: &mut [f32; 3], color: [f32; 3], alpha: f32) {
    if alpha > 0.0 {
        for k in 0..3 {
            c[k] = c[k] * (1.0 - alpha) + color[k] * alpha;
        }
    }
}

/// Face `index` of `split` with class `class`: deterministic in (seed, split, index).
pub fn render_face(cfg: &SynthConfig, split: Split, index: usize, class: u32) -> Image {
    let mut rng = stream(cfg.seed, split, index, 2);
    let params = draw_params(class as usize, cfg.difficulty, &mut rng);
    render(&params, cfg.image_size, &mut rng)
}
