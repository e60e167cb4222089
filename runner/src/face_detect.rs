//! Face detection with an OpenCV LBP cascade (Viola-Jones boosting over multi-block LBP features),
//! for `fer predict --detect`: an image pyramid, a sliding window, the cascade's stages, then
//! OpenCV's rectangle grouping. Reads OpenCV's XML format (`lbpcascade_frontalface*.xml`).

use std::path::Path;

use anyhow::{bail, Context};

use fer_model::data::image::Image;

/// A face box in pixels of the original image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FaceBox {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

struct Weak {
    feature: usize,
    /// 256-bit category subset: LBP code c goes left when bit c is set.
    subset: [i32; 8],
    left: f32,
    right: f32,
}

struct Stage {
    threshold: f32,
    weak: Vec<Weak>,
}

pub struct Cascade {
    width: usize,
    height: usize,
    stages: Vec<Stage>,
    /// Each feature: (x, y, block width, block height) of a 3x3 grid of blocks.
    features: Vec<(usize, usize, usize, usize)>,
}

fn numbers<T: std::str::FromStr>(node: roxmltree::Node, what: &str) -> anyhow::Result<Vec<T>> {
    node.text()
        .unwrap_or("")
        .split_whitespace()
        .map(|t| {
            t.parse::<T>()
                .map_err(|_| anyhow::anyhow!("{what}: bad number {t:?}"))
        })
        .collect()
}

fn child<'a>(node: roxmltree::Node<'a, 'a>, name: &str) -> anyhow::Result<roxmltree::Node<'a, 'a>> {
    node.children()
        .find(|c| c.has_tag_name(name))
        .with_context(|| format!("missing <{name}> in <{}>", node.tag_name().name()))
}

fn items<'a>(node: roxmltree::Node<'a, 'a>) -> impl Iterator<Item = roxmltree::Node<'a, 'a>> {
    node.children().filter(|c| c.has_tag_name("_"))
}

impl Cascade {
    /// The bundled OpenCV `lbpcascade_frontalface_improved.xml` (BSD-3, runner/assets/).
    pub fn frontal_face() -> Self {
        Self::parse(include_str!(
            "../assets/lbpcascade_frontalface_improved.xml"
        ))
        .expect("bundled cascade parses")
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read cascade", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}: not an OpenCV LBP cascade", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let doc = roxmltree::Document::parse(text)?;
        let cascade = doc
            .descendants()
            .find(|n| n.has_tag_name("cascade"))
            .context("no <cascade>")?;
        let kind = child(cascade, "featureType")?.text().unwrap_or("").trim();
        if kind != "LBP" {
            bail!("featureType {kind:?}: only LBP cascades are supported");
        }
        let dim = |name: &str| -> anyhow::Result<usize> {
            Ok(child(cascade, name)?.text().unwrap_or("").trim().parse()?)
        };
        let (width, height) = (dim("width")?, dim("height")?);
        let mut stages = Vec::new();
        for s in items(child(cascade, "stages")?) {
            let threshold: f32 = child(s, "stageThreshold")?
                .text()
                .unwrap_or("")
                .trim()
                .parse()?;
            let mut weak = Vec::new();
            for w in items(child(s, "weakClassifiers")?) {
                let nodes: Vec<i64> = numbers(child(w, "internalNodes")?, "internalNodes")?;
                let leaves: Vec<f32> = numbers(child(w, "leafValues")?, "leafValues")?;
                if nodes.len() != 11 || leaves.len() != 2 {
                    bail!("weak classifier: expected a categorical stump (11 node values, 2 leaves), got {} and {}", nodes.len(), leaves.len());
                }
                let mut subset = [0i32; 8];
                for (i, v) in nodes[3..].iter().enumerate() {
                    subset[i] = *v as i32;
                }
                weak.push(Weak {
                    feature: nodes[2] as usize,
                    subset,
                    left: leaves[0],
                    right: leaves[1],
                });
            }
            stages.push(Stage { threshold, weak });
        }
        let mut features = Vec::new();
        for f in items(child(cascade, "features")?) {
            let r: Vec<usize> = numbers(child(f, "rect")?, "rect")?;
            if r.len() != 4 {
                bail!("feature rect: expected 4 numbers, got {}", r.len());
            }
            features.push((r[0], r[1], r[2], r[3]));
        }
        for s in &stages {
            for w in &s.weak {
                if w.feature >= features.len() {
                    bail!(
                        "weak classifier uses feature {} of {}",
                        w.feature,
                        features.len()
                    );
                }
            }
        }
        Ok(Self {
            width,
            height,
            stages,
            features,
        })
    }

    /// Whether the window at (x, y) of an integral image passes every stage.
    fn accepts(&self, ii: &Integral, x: usize, y: usize) -> bool {
        for stage in &self.stages {
            let mut sum = 0f32;
            for w in &stage.weak {
                let code = self.lbp(ii, x, y, w.feature);
                let set = w.subset[(code >> 5) as usize] & (1 << (code & 31)) != 0;
                sum += if set { w.left } else { w.right };
            }
            if sum < stage.threshold {
                return false;
            }
        }
        true
    }

    /// Multi-block LBP code: the 8 blocks around the centre of a 3x3 grid, each compared
    /// (>=) with the centre block, clockwise from the top-left as the most significant bit.
    fn lbp(&self, ii: &Integral, x: usize, y: usize, f: usize) -> u32 {
        let (fx, fy, bw, bh) = self.features[f];
        let block = |r: usize, c: usize| ii.sum(x + fx + c * bw, y + fy + r * bh, bw, bh);
        let centre = block(1, 1);
        let order = [
            (0, 0),
            (0, 1),
            (0, 2),
            (1, 2),
            (2, 2),
            (2, 1),
            (2, 0),
            (1, 0),
        ];
        order.iter().fold(0u32, |code, &(r, c)| {
            (code << 1) | (block(r, c) >= centre) as u32
        })
    }

    /// Faces in an image: windows at scales 1, 1.1, 1.21, … that pass the cascade, grouped as
    /// OpenCV's detectMultiScale does (neighbours >= `min_neighbours`), largest first.
    pub fn detect(&self, img: &Image, min_neighbours: usize) -> Vec<FaceBox> {
        let gray = to_gray(img);
        let mut hits = Vec::new();
        let mut scale = 1.0f64;
        loop {
            let (w, h) = (
                (img.width as f64 / scale) as usize,
                (img.height as f64 / scale) as usize,
            );
            if w < self.width || h < self.height {
                break;
            }
            let small = resize_gray(&gray, img.width, img.height, w, h);
            let ii = Integral::new(&small, w, h);
            let step = if scale > 2.0 { 1 } else { 2 };
            for y in (0..=h - self.height).step_by(step) {
                for x in (0..=w - self.width).step_by(step) {
                    if self.accepts(&ii, x, y) {
                        hits.push(Rect {
                            x: (x as f64 * scale).round(),
                            y: (y as f64 * scale).round(),
                            w: (self.width as f64 * scale).round(),
                            h: (self.height as f64 * scale).round(),
                        });
                    }
                }
            }
            scale *= 1.1;
        }
        let mut faces: Vec<FaceBox> = group(&hits, min_neighbours, 0.2)
            .into_iter()
            .map(|r| FaceBox {
                x: r.x as usize,
                y: r.y as usize,
                width: r.w as usize,
                height: r.h as usize,
            })
            .collect();
        faces.sort_by_key(|f| std::cmp::Reverse(f.width * f.height));
        faces
    }
}

/// Grayscale bytes with ITU-R BT.601 weights (OpenCV's RGB2GRAY).
fn to_gray(img: &Image) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.width * img.height);
    for y in 0..img.height {
        for x in 0..img.width {
            let v = 0.299 * img.get(0, y, x) + 0.587 * img.get(1, y, x) + 0.114 * img.get(2, y, x);
            out.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    out
}

/// Bilinear downscale of a grayscale image (pixel centres aligned).
fn resize_gray(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    let (fx, fy) = (sw as f64 / dw as f64, sh as f64 / dh as f64);
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        let sy = ((y as f64 + 0.5) * fy - 0.5).clamp(0.0, (sh - 1) as f64);
        let (y0, ty) = (sy.floor() as usize, sy - sy.floor());
        let y1 = (y0 + 1).min(sh - 1);
        for x in 0..dw {
            let sx = ((x as f64 + 0.5) * fx - 0.5).clamp(0.0, (sw - 1) as f64);
            let (x0, tx) = (sx.floor() as usize, sx - sx.floor());
            let x1 = (x0 + 1).min(sw - 1);
            let p = |yy: usize, xx: usize| src[yy * sw + xx] as f64;
            let top = p(y0, x0) * (1.0 - tx) + p(y0, x1) * tx;
            let bottom = p(y1, x0) * (1.0 - tx) + p(y1, x1) * tx;
            out.push((top * (1.0 - ty) + bottom * ty).round() as u8);
        }
    }
    out
}

/// Summed-area table with a zero row and column in front.
struct Integral {
    stride: usize,
    sums: Vec<i64>,
}

impl Integral {
    fn new(img: &[u8], w: usize, h: usize) -> Self {
        let stride = w + 1;
        let mut sums = vec![0i64; stride * (h + 1)];
        for y in 0..h {
            let mut row = 0i64;
            for x in 0..w {
                row += img[y * w + x] as i64;
                sums[(y + 1) * stride + x + 1] = sums[y * stride + x + 1] + row;
            }
        }
        Self { stride, sums }
    }

    fn sum(&self, x: usize, y: usize, w: usize, h: usize) -> i64 {
        let s = |xx: usize, yy: usize| self.sums[yy * self.stride + xx];
        s(x + w, y + h) - s(x, y + h) - s(x + w, y) + s(x, y)
    }
}

#[derive(Debug, Clone, Copy)]
struct Rect {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

/// OpenCV's groupRectangles: cluster similar rectangles, keep clusters with more than
/// `min_neighbours` members as their average, and drop clusters nested inside a stronger one.
fn group(rects: &[Rect], min_neighbours: usize, eps: f64) -> Vec<Rect> {
    let similar = |a: &Rect, b: &Rect| {
        let delta = eps * (a.w.min(b.w) + a.h.min(b.h)) * 0.5;
        (a.x - b.x).abs() <= delta
            && (a.y - b.y).abs() <= delta
            && (a.x + a.w - b.x - b.w).abs() <= delta
            && (a.y + a.h - b.y - b.h).abs() <= delta
    };
    // Union-find over the similarity relation.
    let mut parent: Vec<usize> = (0..rects.len()).collect();
    fn root(p: &mut [usize], mut i: usize) -> usize {
        while p[i] != i {
            p[i] = p[p[i]];
            i = p[i];
        }
        i
    }
    for i in 0..rects.len() {
        for j in 0..i {
            if similar(&rects[i], &rects[j]) {
                let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                parent[a] = b;
            }
        }
    }
    let mut clusters: std::collections::BTreeMap<usize, (Rect, usize)> = Default::default();
    for (i, r) in rects.iter().enumerate() {
        let c = root(&mut parent, i);
        let e = clusters.entry(c).or_insert((
            Rect {
                x: 0.0,
                y: 0.0,
                w: 0.0,
                h: 0.0,
            },
            0,
        ));
        e.0.x += r.x;
        e.0.y += r.y;
        e.0.w += r.w;
        e.0.h += r.h;
        e.1 += 1;
    }
    let kept: Vec<(Rect, usize)> = clusters
        .into_values()
        .filter(|(_, n)| *n > min_neighbours)
        .map(|(s, n)| {
            (
                Rect {
                    x: s.x / n as f64,
                    y: s.y / n as f64,
                    w: s.w / n as f64,
                    h: s.h / n as f64,
                },
                n,
            )
        })
        .collect();
    kept.iter()
        .filter(|(r, n)| {
            !kept.iter().any(|(o, m)| {
                let dx = (o.w * eps).round();
                let dy = (o.h * eps).round();
                !std::ptr::eq(r, o)
                    && (*m > 3.max(*n) || *n < 3)
                    && r.x >= o.x - dx
                    && r.y >= o.y - dy
                    && r.x + r.w <= o.x + o.w + dx
                    && r.y + r.h <= o.y + o.h + dy
            })
        })
        .map(|(r, _)| *r)
        .collect()
}

/// A detected box grown by `margin` of its size on every side (the cascade's boxes are tight,
/// aligned FER crops include the whole face), clamped to the image.
pub fn expand(b: FaceBox, margin: f64, width: usize, height: usize) -> FaceBox {
    let dx = (b.width as f64 * margin) as usize;
    let dy = (b.height as f64 * margin) as usize;
    let x0 = b.x.saturating_sub(dx);
    let y0 = b.y.saturating_sub(dy);
    let x1 = (b.x + b.width + dx).min(width);
    let y1 = (b.y + b.height + dy).min(height);
    FaceBox {
        x: x0,
        y: y0,
        width: x1 - x0,
        height: y1 - y0,
    }
}

pub fn crop(img: &Image, b: FaceBox) -> Image {
    let mut out = Image::new(b.width, b.height);
    for c in 0..3 {
        for y in 0..b.height {
            for x in 0..b.width {
                out.set(c, y, x, img.get(c, b.y + y, b.x + x));
            }
        }
    }
    out
}
