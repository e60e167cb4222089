//! Element ops written into their first operand's buffer, for the inference forward
//! (`Dan::inference`): ReLU, and the residual join `relu(y + shortcut)`, applied to the buffer
//! a convolution just produced instead of a new one. Only for tensors outside any autograd
//! graph (detached weights, no variables): an op that rewrites a value a backward pass still
//! needs would corrupt its gradient. Other devices and dtypes get Candle's ops (new tensors).

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use super::f32_contiguous;
use super::timing::{timed, Slot};

const CHUNK: usize = 4096;

struct ReluInPlace;

impl InplaceOp1 for ReluInPlace {
    fn name(&self) -> &'static str {
        "relu_in_place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let y = super::f32_contiguous_mut(storage, layout, "relu_in_place")?;
        timed(Slot::AddRelu, || {
            y.par_chunks_mut(CHUNK).for_each(relu_chunk);
        });
        Ok(())
    }
}

struct AddReluInPlace;

impl InplaceOp2 for AddReluInPlace {
    fn name(&self) -> &'static str {
        "add_relu_in_place"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        if dst_l.shape() != src_l.shape() {
            candle_core::bail!(
                "add_relu_in_place: shapes {:?} and {:?} differ",
                dst_l.shape(),
                src_l.shape()
            );
        }
        let s = f32_contiguous(src, src_l, "add_relu_in_place shortcut")?;
        let y = super::f32_contiguous_mut(dst, dst_l, "add_relu_in_place")?;
        timed(Slot::AddRelu, || {
            y.par_chunks_mut(CHUNK)
                .zip(s.par_chunks(CHUNK))
                .for_each(|(y, s)| add_relu_chunk(y, s));
        });
        Ok(())
    }
}

fn in_place_ok(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// `max(t, 0)`, in `t`'s buffer where it can be (see the module note), else a new tensor.
pub fn relu(t: Tensor) -> Result<Tensor> {
    if in_place_ok(&t) {
        t.inplace_op1(&ReluInPlace)?;
        Ok(t)
    } else {
        t.relu()
    }
}

/// `max(y + shortcut, 0)`, in `y`'s buffer where it can be (see the module note).
pub fn add_relu(y: Tensor, shortcut: &Tensor) -> Result<Tensor> {
    if in_place_ok(&y) && in_place_ok(shortcut) && shortcut.dtype() == y.dtype() {
        y.inplace_op2(shortcut, &AddReluInPlace)?;
        Ok(y)
    } else {
        (y + shortcut)?.relu()
    }
}

simd_dispatch!(fn relu_chunk(y: &mut [f32]) -> () = relu_chunk_body);

#[inline(always)]
fn relu_chunk_body(y: &mut [f32]) {
    for v in y.iter_mut() {
        *v = v.max(0.0);
    }
}

simd_dispatch!(fn add_relu_chunk(y: &mut [f32], s: &[f32]) -> () = add_relu_chunk_body);

#[inline(always)]
fn add_relu_chunk_body(y: &mut [f32], s: &[f32]) {
    let s = &s[..y.len()];
    for i in 0..y.len() {
        y[i] = (y[i] + s[i]).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_ops_match_candles() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..10_000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w: Vec<f32> = (0..10_000)
            .map(|i| ((i * 13 % 97) as f32 - 48.0) / 5.0)
            .collect();
        let a = Tensor::from_vec(v.clone(), (4, 2500), &dev).unwrap();
        let b = Tensor::from_vec(w, (4, 2500), &dev).unwrap();
        let want = a.relu().unwrap().to_vec2::<f32>().unwrap();
        let got = relu(a.copy().unwrap()).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want);
        let want = (&a + &b).unwrap().relu().unwrap().to_vec2::<f32>().unwrap();
        let got = add_relu(a.copy().unwrap(), &b).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want);
        // The input it was given is the output (no copy); a transposed view is not written.
        let t = a.copy().unwrap().t().unwrap();
        let r = relu(t.clone()).unwrap();
        assert_eq!(
            r.t().unwrap().to_vec2::<f32>().unwrap(),
            a.relu().unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            t.t().unwrap().to_vec2::<f32>().unwrap(),
            v.chunks(2500).map(|c| c.to_vec()).collect::<Vec<_>>()
        );
    }
}
