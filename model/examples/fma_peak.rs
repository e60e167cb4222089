//! What one core of this CPU can do, independent of our GEMM: a register-only FMA loop with 256-
//! and 512-bit vectors, and microkernel shapes (6x16 AVX2, 6x32 and 12x32 AVX-512) on packed
//! panels that stay in L1. Single thread: `cargo run --release -p fer-model --example fma_peak`.
//! (docs/cpu-kernels.md, "AVX-512": on Zen 4 both widths reach the same GFLOP/s.) The loops are
//! written here, not taken from `ops::gemm`, so the probe can try tile shapes the GEMM does not
//! use (12x32) and stays a measure of the CPU; its 6x16 loop is the GEMM's AVX2 kernel loop.

#[cfg(target_arch = "x86_64")]
mod probe {
    use std::arch::x86_64::*;

    const MR: usize = 6;
    const NR: usize = 16;

    /// Twelve independent FMA chains in registers, `n` rounds; returns GFLOP/s.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn ymm_peak(n: usize) -> f64 {
        let t = std::time::Instant::now();
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
        for _ in 0..n {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(a, *r, b);
            }
        }
        std::hint::black_box(acc);
        (n * 12 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn zmm_peak(n: usize) -> f64 {
        let t = std::time::Instant::now();
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
        for _ in 0..n {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(a, *r, b);
            }
        }
        std::hint::black_box(acc);
        (n * 12 * 32) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// The AVX2 6x16 kernel's loop over kc-deep packed panels, C += A B.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2_6x16(kc: usize, mut a: *const f32, mut b: *const f32, c: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for _ in 0..kc {
            let (b0, b1) = (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8)));
            for (r, cr) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, cr) in acc.iter().enumerate() {
            let p = c.add(r * 64);
            _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), cr[0]));
            _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), cr[1]));
        }
    }

    /// An AVX-512 (H * 6) x (P * 16) kernel over H A panels and P B panels.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512<const H: usize, const P: usize>(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
    ) {
        let mut acc = [[[_mm512_setzero_ps(); P]; MR]; H];
        for p in 0..kc {
            let bv: [__m512; P] =
                std::array::from_fn(|q| _mm512_loadu_ps(b.add((q * kc + p) * NR)));
            for (h, acc) in acc.iter_mut().enumerate() {
                let a = a.add((h * kc + p) * MR);
                for (r, cr) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r));
                    for q in 0..P {
                        cr[q] = _mm512_fmadd_ps(av, bv[q], cr[q]);
                    }
                }
            }
        }
        for (r, cr) in acc.iter().flatten().enumerate() {
            for (q, v) in cr.iter().enumerate() {
                let p = c.add(r * 64 + q * NR);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use probe::*;
    let kc = 256;
    let (a, b) = (vec![1.0f32; 2 * 6 * kc], vec![0.5f32; 2 * 16 * kc]);
    let mut c = vec![0f32; 12 * 64];
    let calls = 200_000;
    // GFLOP/s of `calls` calls of a kernel computing `tile` values of C.
    let rate = |tile: usize, run: &mut dyn FnMut()| {
        let n = calls * 96 / tile;
        let t = std::time::Instant::now();
        for _ in 0..n {
            run();
        }
        (2 * n * kc * tile) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let has_avx512 = is_x86_feature_detected!("avx512f");
    for round in 1..=3 {
        // SAFETY: each probe runs only where `is_x86_feature_detected!` found its features; the
        // panels hold 2 * 6 * kc and 2 * 16 * kc values and C 12 rows of 64, the most any reads.
        unsafe {
            let (pa, pb, pc) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            let mut line = format!("round {round}:");
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                line += &format!(" ymm FMA {:.1},", ymm_peak(50_000_000));
                line += &format!(
                    " 6x16 avx2 {:.1}",
                    rate(96, &mut || avx2_6x16(kc, pa, pb, pc))
                );
            }
            if has_avx512 {
                line += &format!(", zmm FMA {:.1}", zmm_peak(50_000_000));
                line += &format!(
                    ", 6x32 {:.1}",
                    rate(192, &mut || avx512::<1, 2>(kc, pa, pb, pc))
                );
                line += &format!(
                    ", 12x32 {:.1}",
                    rate(384, &mut || avx512::<2, 2>(kc, pa, pb, pc))
                );
            }
            println!("{line} GFLOP/s (one thread)");
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("fma_peak probes x86-64 vector units only");
}
