//! Mirror along the last axis as one f32 CPU graph node (EAC's flipped image and flipped CAMs).
//! Candle's `flip` goes through `index_select` and took ~3.5-5 ms for a batch of 64 px or 112 px
//! images; this is one parallel pass of reversed rows.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_contiguous;

/// `t` mirrored along its last axis. Differentiable (the gradient is mirrored back).
pub fn flip_last(t: &Tensor) -> Result<Tensor> {
    if t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() >= 1 {
        t.contiguous()?.apply_op1(FlipLast)
    } else {
        t.flip(&[t.rank() - 1])
    }
}

struct FlipLast;

impl CustomOp1 for FlipLast {
    fn name(&self) -> &'static str {
        "flip_last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(s, l, "flip_last")?;
        let w = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = crate::ops::zeroed(x.len());
        // Rows in groups, so a task is not one short row.
        let rows_per_task = (4096 / w).max(1) * w;
        y.par_chunks_mut(rows_per_task)
            .zip(x.par_chunks(rows_per_task))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(w).zip(xc.chunks_exact(w)) {
                    yr.iter_mut()
                        .zip(xr.iter().rev())
                        .for_each(|(d, &v)| *d = v);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(flip_last(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn flip_last_matches_candles_flip_with_its_gradient() {
        let dev = Device::Cpu;
        for shape in [&[2usize, 3, 4, 5][..], &[7], &[3, 1], &[2, 2, 9000]] {
            let n: usize = shape.iter().product();
            let x = Tensor::arange(0u32, n as u32, &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .reshape(shape)
                .unwrap();
            let want = x.flip(&[shape.len() - 1]).unwrap();
            let got = flip_last(&x).unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{shape:?}"
            );
            // Σ flip(x) ⊙ r has gradient flip(r).
            let v = Var::from_tensor(&x).unwrap();
            let r = x.sin().unwrap();
            let g = (flip_last(v.as_tensor()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = g.get(v.as_tensor()).unwrap();
            assert_eq!(
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                r.flip(&[shape.len() - 1])
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                "{shape:?}: gradient"
            );
        }
    }
}
