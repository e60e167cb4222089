use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    own_probe();
    let dev = Device::Cpu;
    for &(m, k, n) in &[
        (64usize, 576usize, 12544usize),
        (128, 1152, 3136),
        (256, 2304, 784),
        (512, 4608, 196),
        (576, 64, 12544),
        (64, 12544, 576),
    ] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1., (k, n), &dev)?;
        let _ = a.matmul(&b)?;
        let t = Instant::now();
        let reps = 10;
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
    Ok(())
}
#[allow(dead_code)]
pub fn mm_probe() {
    for &(m, k, n) in &[
        (64usize, 576usize, 12544usize),
        (128, 1152, 3136),
        (256, 2304, 784),
        (512, 4608, 196),
        (576, 64, 12544),
        (64, 12544, 576),
    ] {
        let a = vec![1.0f32; m * k];
        let b = vec![0.5f32; k * n];
        let mut c = vec![0f32; m * n];
        let run = |c: &mut [f32]| unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                n as isize,
                1,
            )
        };
        run(&mut c);
        let t = Instant::now();
        for _ in 0..10 {
            run(&mut c);
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        println!(
            "mm {m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
}
#[allow(dead_code)]
pub fn own_probe() {
    use fer_model::ops::gemm::{sgemm, MatRef};
    for &(m, k, n) in &[
        (64usize, 576usize, 12544usize),
        (128, 1152, 3136),
        (256, 2304, 784),
        (512, 4608, 196),
        (576, 64, 12544),
        (64, 12544, 576),
    ] {
        let a = vec![1.0f32; m * k];
        let b = vec![0.5f32; k * n];
        let mut c = vec![0f32; m * n];
        let run = |c: &mut [f32]| {
            sgemm(
                m,
                n,
                k,
                MatRef {
                    data: &a,
                    rs: k,
                    cs: 1,
                },
                MatRef {
                    data: &b,
                    rs: n,
                    cs: 1,
                },
                c,
                n,
                false,
            )
        };
        run(&mut c);
        let t = Instant::now();
        for _ in 0..10 {
            run(&mut c);
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        println!(
            "own {m}x{k}x{n}: {:.1} GFLOP/s",
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
}
