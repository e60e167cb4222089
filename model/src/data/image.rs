//! A planar RGB float image (values in [0,1] until normalised) and the geometric operations the
//! augmentation pipeline needs.

use std::path::Path;

use anyhow::Context;

#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// Planar: channel-major, then rows: data[(c * height + y) * width + x].
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0.0; 3 * width * height],
        }
    }

    #[inline]
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }

    #[inline]
    pub fn set(&mut self, c: usize, y: usize, x: usize, v: f32) {
        self.data[(c * self.height + y) * self.width + x] = v;
    }

    /// Decode a JPEG / PNG file as PIL's `Image.open(path).convert('RGB')` does: JPEGs with
    /// libjpeg (`super::jpeg`), other formats with the `image` crate. The error names the file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{}: cannot read image", path.display()))?;
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            let decoded = super::jpeg::decode_rgb(&bytes)
                .with_context(|| format!("{}: cannot decode image", path.display()))?;
            if let Some((w, h, pixels)) = decoded {
                let rgb =
                    image::RgbImage::from_raw(w as u32, h as u32, pixels).with_context(|| {
                        format!("{}: libjpeg returned a short image", path.display())
                    })?;
                return Ok(Self::from_rgb8(&rgb));
            }
        }
        let img = image::load_from_memory(&bytes)
            .with_context(|| format!("{}: cannot decode image", path.display()))?;
        Ok(Self::from_rgb8(&img.to_rgb8()))
    }

    pub fn from_rgb8(rgb: &image::RgbImage) -> Self {
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut out = Self::new(w, h);
        for (x, y, p) in rgb.enumerate_pixels() {
            for c in 0..3 {
                out.set(c, y as usize, x as usize, p[c] as f32 / 255.0);
            }
        }
        out
    }

    /// 8-bit RGB (values clamped to [0,1]).
    pub fn to_rgb8(&self) -> image::RgbImage {
        image::RgbImage::from_fn(self.width as u32, self.height as u32, |x, y| {
            image::Rgb([0, 1, 2].map(|c| {
                (self.get(c, y as usize, x as usize).clamp(0.0, 1.0) * 255.0).round() as u8
            }))
        })
    }

    pub fn save_png(&self, path: &Path) -> anyhow::Result<()> {
        self.to_rgb8()
            .save(path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// PIL's `Image.resize((width, height), BILINEAR)` of the 8-bit image: a separable triangle
    /// filter whose support widens with the scale when shrinking (antialiasing), 8-bit rounding
    /// after each pass. This is torchvision's `Resize` on a PIL image, the first step of DAN's and
    /// EAC's training and test pipelines, so a model sees what it saw in PyTorch. The image is
    /// taken as 8-bit (exact for a decoded file); the same size returns it unchanged.
    pub fn resize_pil(&self, width: usize, height: usize) -> Self {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let n = self.width * self.height;
        let mut out = Self::new(width, height);
        let m = width * height;
        for c in 0..3 {
            let plane: Vec<u8> = self.data[c * n..(c + 1) * n]
                .iter()
                .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            let resized =
                super::resize::resize_plane(&plane, self.width, self.height, width, height);
            for (o, &v) in out.data[c * m..(c + 1) * m].iter_mut().zip(&resized) {
                *o = v as f32 / 255.0;
            }
        }
        out
    }

    /// Bilinear interpolation with half-pixel centres and no antialiasing, on float values (for
    /// maps and overlays; images entering the model use [`Image::resize_pil`]).
    pub fn resize(&self, width: usize, height: usize) -> Self {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let mut out = Self::new(width, height);
        let sx = self.width as f32 / width as f32;
        let sy = self.height as f32 / height as f32;
        for y in 0..height {
            let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (self.height - 1) as f32);
            let (y0, ty) = (fy.floor() as usize, fy - fy.floor());
            let y1 = (y0 + 1).min(self.height - 1);
            for x in 0..width {
                let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (self.width - 1) as f32);
                let (x0, tx) = (fx.floor() as usize, fx - fx.floor());
                let x1 = (x0 + 1).min(self.width - 1);
                for c in 0..3 {
                    let top = self.get(c, y0, x0) * (1.0 - tx) + self.get(c, y0, x1) * tx;
                    let bottom = self.get(c, y1, x0) * (1.0 - tx) + self.get(c, y1, x1) * tx;
                    out.set(c, y, x, top * (1.0 - ty) + bottom * ty);
                }
            }
        }
        out
    }

    /// Mirror along the width.
    pub fn flip_horizontal(&self) -> Self {
        let mut out = Self::new(self.width, self.height);
        for c in 0..3 {
            for y in 0..self.height {
                for x in 0..self.width {
                    out.set(c, y, x, self.get(c, y, self.width - 1 - x));
                }
            }
        }
        out
    }

    /// Rotate about the centre by `degrees` (counter-clockwise), nearest neighbour, same size,
    /// fill 0 (torchvision RandomRotation defaults).
    pub fn rotate(&self, degrees: f32) -> Self {
        let (s, c) = degrees.to_radians().sin_cos();
        let (cx, cy) = (self.width as f32 * 0.5, self.height as f32 * 0.5);
        let mut out = Self::new(self.width, self.height);
        for y in 0..self.height {
            for x in 0..self.width {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                // Inverse map: output pixel -> source pixel.
                let sx = c * dx - s * dy + cx;
                let sy = s * dx + c * dy + cy;
                let (ix, iy) = (sx.floor() as isize, sy.floor() as isize);
                if ix >= 0 && iy >= 0 && (ix as usize) < self.width && (iy as usize) < self.height {
                    for ch in 0..3 {
                        out.set(ch, y, x, self.get(ch, iy as usize, ix as usize));
                    }
                }
            }
        }
        out
    }

    /// Zero-pad by `pad` on every side, then take the `width` x `height` window at (top, left)
    /// of the padded image (torchvision RandomCrop with padding).
    pub fn padded_crop(&self, pad: usize, top: usize, left: usize) -> Self {
        let mut out = Self::new(self.width, self.height);
        for c in 0..3 {
            for y in 0..self.height {
                let sy = (y + top) as isize - pad as isize;
                if sy < 0 || sy as usize >= self.height {
                    continue;
                }
                for x in 0..self.width {
                    let sx = (x + left) as isize - pad as isize;
                    if sx >= 0 && (sx as usize) < self.width {
                        out.set(c, y, x, self.get(c, sy as usize, sx as usize));
                    }
                }
            }
        }
        out
    }
}
