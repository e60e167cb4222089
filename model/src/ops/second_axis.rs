//! Sum and log-softmax over the second axis of a [B, N, ...] tensor, as f32 CPU graph nodes: the
//! DAN heads reduce over channels (a spatial map's [B, C, h, w] → [B, 1, h, w]) and over heads
//! ([B, K, C]). Candle reduces a non-trailing axis, or a trailing one only a few values long, with
//! a strided loop per output value: forward + backward at [64, 512, 2, 2] (one thread) ReLU + sum
//! over channels took ~1-2 ms and log-softmax over the 4 heads of [64, 4, 512] ~5-6 ms. Here each
//! is one pass over contiguous rows of the trailing axes (length M), in the same order of sums.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_contiguous;

/// (B, N, M) of a tensor of rank ≥ 2, M the product of the trailing axes (1 for rank 2).
fn bnm(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("second-axis op: rank {} below 2 ({dims:?})", dims.len());
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

fn f32_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Σ over axis 1: [B, N, ...] → [B, 1, ...] (`keepdim`) or [B, ...]. Differentiable.
pub fn sum_axis1(x: &Tensor, keepdim: bool) -> Result<Tensor> {
    if !f32_cpu(x) {
        return if keepdim { x.sum_keepdim(1) } else { x.sum(1) };
    }
    let y = x.contiguous()?.apply_op1(SumAxis1)?; // [B, 1, ...]
    if keepdim {
        Ok(y)
    } else {
        y.squeeze(1)
    }
}

/// `log_softmax` over axis 1 of [B, N, ...]. Differentiable.
pub fn log_softmax_axis1(x: &Tensor) -> Result<Tensor> {
    if !f32_cpu(x) {
        return candle_nn::ops::log_softmax(x, 1);
    }
    x.contiguous()?.apply_op1(LogSoftmaxAxis1)
}

struct SumAxis1;

impl CustomOp1 for SumAxis1 {
    fn name(&self) -> &'static str {
        "sum_axis1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, m) = bnm(l.shape())?;
        let x = f32_contiguous(s, l, "sum_axis1")?;
        let mut y = vec![0f32; b * m];
        y.par_chunks_mut(m)
            .zip(x.par_chunks(n * m))
            .for_each(|(yb, xb)| {
                for row in xb.chunks_exact(m) {
                    add_into(yb, row);
                }
            });
        let mut dims = l.dims().to_vec();
        dims[1] = 1;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Each input value's gradient is its output's.
        let n = arg.dim(1)?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&RepeatAxis1(n))?))
    }
}

/// The backward of `SumAxis1`: [B, 1, ...] repeated N times along axis 1.
struct RepeatAxis1(usize);

impl CustomOp1 for RepeatAxis1 {
    fn name(&self) -> &'static str {
        "repeat_axis1"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, _, m) = bnm(l.shape())?;
        let n = self.0;
        let g = f32_contiguous(s, l, "repeat_axis1")?;
        let mut dx = vec![0f32; b * n * m];
        dx.par_chunks_mut(n * m)
            .zip(g.par_chunks(m))
            .for_each(|(db, gb)| {
                db.chunks_exact_mut(m)
                    .for_each(|row| row.copy_from_slice(gb))
            });
        let mut dims = l.dims().to_vec();
        dims[1] = n;
        Ok((CpuStorage::F32(dx), Shape::from(dims)))
    }
}

struct LogSoftmaxAxis1;

impl CustomOp1 for LogSoftmaxAxis1 {
    fn name(&self) -> &'static str {
        "log_softmax_axis1"
    }

    /// Candle's formula: d = x - max, y = d - ln Σ exp(d), the maximum and the sum taken over
    /// axis 1 in order.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, m) = bnm(l.shape())?;
        let x = f32_contiguous(s, l, "log_softmax_axis1")?;
        let mut y = vec![0f32; b * n * m];
        y.par_chunks_mut(n * m)
            .zip(x.par_chunks(n * m))
            .for_each_init(
                || (vec![0f32; m], vec![0f32; m]),
                |(max, sum), (yb, xb)| {
                    max.copy_from_slice(&xb[..m]);
                    for row in xb.chunks_exact(m).skip(1) {
                        max.iter_mut().zip(row).for_each(|(a, &v)| *a = a.max(v));
                    }
                    sum.fill(0.0);
                    for row in xb.chunks_exact(m) {
                        sum.iter_mut()
                            .zip(row.iter().zip(max.iter()))
                            .for_each(|(s, (&v, &mx))| *s += (v - mx).exp());
                    }
                    sum.iter_mut().for_each(|s| *s = s.ln());
                    for (yr, xr) in yb.chunks_exact_mut(m).zip(xb.chunks_exact(m)) {
                        for (((y, &v), &mx), &ls) in
                            yr.iter_mut().zip(xr).zip(max.iter()).zip(sum.iter())
                        {
                            *y = (v - mx) - ls;
                        }
                    }
                },
            );
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &LogSoftmaxAxis1Backward,
        )?))
    }
}

/// dx = g - softmax · Σ_axis1 g, softmax = exp(y).
struct LogSoftmaxAxis1Backward;

impl CustomOp2 for LogSoftmaxAxis1Backward {
    fn name(&self) -> &'static str {
        "log_softmax_axis1_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, m) = bnm(l1.shape())?;
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "log_softmax_axis1 backward: shapes {:?} and {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let y = f32_contiguous(s1, l1, "log_softmax_axis1 backward")?;
        let g = f32_contiguous(s2, l2, "log_softmax_axis1 backward")?;
        let mut dx = vec![0f32; b * n * m];
        dx.par_chunks_mut(n * m)
            .zip(y.par_chunks(n * m).zip(g.par_chunks(n * m)))
            .for_each_init(
                || vec![0f32; m],
                |gsum, (db, (yb, gb))| {
                    gsum.fill(0.0);
                    for row in gb.chunks_exact(m) {
                        add_into(gsum, row);
                    }
                    for ((dr, yr), gr) in db
                        .chunks_exact_mut(m)
                        .zip(yb.chunks_exact(m))
                        .zip(gb.chunks_exact(m))
                    {
                        for (((d, &y), &g), &s) in dr.iter_mut().zip(yr).zip(gr).zip(gsum.iter()) {
                            *d = g - y.exp() * s;
                        }
                    }
                },
            );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `acc += row`.
#[inline(never)]
fn add_into(acc: &mut [f32], row: &[f32]) {
    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradient of Σ (f(x) ⊙ r) for x as f32 and as f64 (Candle's own ops).
    fn both(shape: &[usize], f: &dyn Fn(&Tensor) -> Tensor) -> f64 {
        let dev = Device::Cpu;
        let n: usize = shape.iter().product();
        let x64 = Tensor::arange(0u32, n as u32, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .affine(1.3, 0.2)
            .unwrap()
            .sin()
            .unwrap()
            .affine(2.0, 0.0)
            .unwrap()
            .reshape(shape)
            .unwrap();
        let mut worst = 0f64;
        let mut outs = Vec::new();
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&x64.to_dtype(dtype).unwrap()).unwrap();
            let y = f(x.as_tensor());
            let r = Tensor::arange(0u32, y.elem_count() as u32, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .affine(0.37, -1.0)
                .unwrap()
                .sin()
                .unwrap()
                .reshape(y.shape())
                .unwrap();
            let l = (&y * &r).unwrap().sum_all().unwrap();
            let g = l.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let flat = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            outs.push((flat(&y), flat(&g)));
        }
        for (a, b) in outs[0]
            .0
            .iter()
            .zip(&outs[1].0)
            .chain(outs[0].1.iter().zip(&outs[1].1))
        {
            worst = worst.max((a - b).abs() / a.abs().max(1.0));
        }
        worst
    }

    #[test]
    fn second_axis_sum_and_log_softmax_match_candles_ops_with_gradients() {
        for shape in [&[3usize, 4, 5][..], &[2, 6, 3, 3], &[4, 1, 7], &[2, 5]] {
            let sum = both(shape, &|x| sum_axis1(x, false).unwrap());
            let sum_keep = both(shape, &|x| {
                // Nonlinear after the sum, so the gradient's routing is tested.
                sum_axis1(x, true).unwrap().sqr().unwrap()
            });
            let lsm = both(shape, &|x| log_softmax_axis1(x).unwrap());
            assert!(
                sum < 1e-5 && sum_keep < 1e-5,
                "{shape:?}: sum {sum:e} / keepdim {sum_keep:e}"
            );
            assert!(lsm < 1e-5, "{shape:?}: log_softmax {lsm:e}");
        }
        // Shapes as Candle's ops give them.
        let x = Tensor::zeros((2, 3, 4, 5), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(sum_axis1(&x, true).unwrap().dims(), &[2, 1, 4, 5]);
        assert_eq!(sum_axis1(&x, false).unwrap().dims(), &[2, 4, 5]);
        assert_eq!(log_softmax_axis1(&x).unwrap().dims(), &[2, 3, 4, 5]);
    }
}
