//! GEMM throughput at the shapes of a ResNet-18 step (64 px, batch 64): `cargo run --example gemm_probe`.
use fer_model::ops::gemm::{sgemm, MatRef};
use std::time::Instant;

fn main() {
    // (m, k, n, B transposed)
    for &(m, k, n, bt) in &[
        (64usize, 576usize, 16384usize, false),
        (64, 16384, 576, true),
        (576, 64, 16384, false),
        (256, 2304, 1024, false),
        (512, 4608, 256, false),
        // One of Winograd's 16 products per chunk of 128 tiles (layer1, layer4).
        (64, 64, 128, false),
        (512, 512, 128, false),
    ] {
        let a = vec![1.0f32; m * k];
        let b = vec![0.5f32; k * n];
        let mut c = vec![0f32; m * n];
        let bv = if bt {
            MatRef {
                data: &b,
                rs: 1,
                cs: k,
            }
        } else {
            MatRef {
                data: &b,
                rs: n,
                cs: 1,
            }
        };
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
                bv,
                c,
                n,
                false,
            )
        };
        run(&mut c);
        // Best of 5 batches of 4: the machine's speed varies from moment to moment.
        let s = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..4 {
                    run(&mut c);
                }
                t.elapsed().as_secs_f64() / 4.0
            })
            .fold(f64::MAX, f64::min);
        println!(
            "{m}x{k}x{n}{}: {:.1} GFLOP/s",
            if bt { " (B^T)" } else { "" },
            2.0 * (m * k * n) as f64 / s / 1e9
        );
    }
}
