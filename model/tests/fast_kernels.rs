//! The f32 CPU fast paths (one-node convolution, batch norm + ReLU, add + ReLU, the GEMM behind
//! them) against (a) the float64 composed paths, whose gradients `gradients.rs` checks against
//! finite differences, at float32 tolerance, and (b) finite differences taken in float32
//! directly, at the looser tolerance float32 differences allow.

use crate::common;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{flat, project, rand_tensor, value_and_grads};
use fer_model::layers::BatchNorm;
use fer_model::ops::batch_norm::{batch_norm, BatchStats};
use fer_model::ops::{add_relu, conv2d, conv2d_native, matmul, ConvGeometry};
use fer_model::store::ParamStore;

/// Worst relative difference (max |a - b| / max |b|) between the f32 fast path and the f64
/// reference path, over the value and every input's gradient; infinite where the fast path gave
/// a NaN or an infinity (which `f64::max` would otherwise drop).
fn fast_vs_reference(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> f64 {
    let (v32, g32) = value_and_grads(inputs, DType::F32, f);
    let (v64, g64) = value_and_grads(inputs, DType::F64, f);
    if !v32.is_finite() || g32.iter().flatten().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let mut worst = (v32 - v64).abs() / v64.abs().max(1e-6);
    for (a, b) in g32.iter().zip(&g64) {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
        let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// Central finite differences in f32 (step `eps`) against the f32 analytic gradient.
fn gradcheck_f32(
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    eps: f64,
    samples: usize,
) -> f64 {
    common::gradcheck_in(inputs, f, DType::F32, eps, samples)
}

/// One convolution case: (input height, input width, kernel, stride, padding).
type ConvCase = (usize, usize, (usize, usize), (usize, usize), (usize, usize));

/// The geometries of gradients.rs (every one DAN's backbones use) at sizes where the GEMM's
/// edge panels and several depth blocks are exercised.
const CONV_CASES: [ConvCase; 8] = [
    (19, 21, (7, 7), (2, 2), (3, 3)), // stem
    (7, 8, (3, 3), (2, 2), (1, 1)),   // stride 2, mixed parity
    (4, 5, (3, 3), (2, 2), (1, 1)),
    (4, 5, (1, 1), (2, 2), (0, 0)), // downsample
    (9, 6, (3, 3), (1, 1), (1, 1)),
    (2, 3, (1, 3), (1, 1), (0, 1)), // DAN conv_1x3
    (2, 3, (3, 1), (1, 1), (1, 0)), // DAN conv_3x1
    (3, 3, (1, 1), (1, 1), (0, 0)),
];

#[test]
fn fused_conv_matches_the_float64_reference_and_finite_differences() {
    fer_model::ops::poison_unfilled();
    for (i, &(h, w, k, s, p)) in CONV_CASES.iter().enumerate() {
        // 40 input channels x 9 taps = 360 rows: more than one 256-deep GEMM block.
        let x = rand_tensor(&[3, 40, h, w], 10 + i as u64);
        let wt = rand_tensor(&[13, 40, k.0, k.1], 20 + i as u64)
            .affine(0.1, 0.0)
            .unwrap();
        let b = rand_tensor(&[13], 30 + i as u64);
        let g = ConvGeometry::new(k, s, p);
        let f = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], Some(&t[2]), g).unwrap(), 7);
        let err = fast_vs_reference(&[x.clone(), wt.clone(), b.clone()], &f);
        assert!(
            err < 1e-5,
            "conv case {i} ({h}x{w} k{k:?} s{s:?} p{p:?}): f32 vs f64 {err:e}"
        );
        let err = gradcheck_f32(&[x, wt, b], &f, 1e-2, 40);
        assert!(err < 1e-2, "conv case {i}: f32 finite differences {err:e}");
    }
}

#[test]
fn stride1_input_gradient_over_several_depth_blocks_matches_the_float64_reference() {
    fer_model::ops::poison_unfilled();
    // 40 output channels x 9 taps = 360: the input gradient's depth (o, tap) crosses a 256-deep
    // block boundary inside a channel's taps, with 7 input channels (a partial 6-row panel).
    let x = rand_tensor(&[2, 7, 6, 5], 60);
    let wt = rand_tensor(&[40, 7, 3, 3], 61).affine(0.1, 0.0).unwrap();
    let g = ConvGeometry::new((3, 3), (1, 1), (1, 1));
    let f = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], None, g).unwrap(), 5);
    let err = fast_vs_reference(&[x, wt], &f);
    assert!(err < 1e-5, "f32 vs f64 {err:e}");
}

/// The accelerators' convolution (Candle's own, through the vendored backward's input gradient)
/// run on the CPU in float64 against our composed float64 path: same values and gradients at
/// every geometry, the mixed-parity stride-2 ones included (Candle's stock backward gave their
/// input gradient a column too many: `fer parity --device cuda` failed on a 4x5 map). Then
/// Candle's padding and dilation arguments, which the backward also serves, against finite
/// differences.
#[test]
fn the_accelerator_convolution_has_the_composed_paths_gradients() {
    for (i, &(h, w, k, s, p)) in CONV_CASES.iter().enumerate() {
        let x = rand_tensor(&[2, 5, h, w], 40 + i as u64);
        let wt = rand_tensor(&[3, 5, k.0, k.1], 50 + i as u64);
        let g = ConvGeometry::new(k, s, p);
        let native = |t: &[Tensor]| project(&conv2d_native(&t[0], &t[1], g).unwrap(), 7);
        let composed = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], None, g).unwrap(), 7);
        let (va, ga) = value_and_grads(&[x.clone(), wt.clone()], DType::F64, &native);
        let (vb, gb) = value_and_grads(&[x, wt], DType::F64, &composed);
        assert!(
            (va - vb).abs() <= 1e-9 * vb.abs().max(1.0),
            "case {i}: {va} vs {vb}"
        );
        for (a, b) in ga.iter().zip(&gb) {
            assert_eq!(a.len(), b.len(), "case {i}: gradient length");
            let worst = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst < 1e-9,
                "case {i} ({h}x{w} k{k:?} s{s:?} p{p:?}): {worst:e}"
            );
        }
    }
    // (padding, stride, dilation) given to Candle directly: padding beyond the dilated
    // kernel's reach too, where the gradient's correlation crops instead of padding.
    for (i, &(p, s, d)) in [(1, 2, 1), (2, 1, 2), (3, 2, 1), (2, 3, 2)]
        .iter()
        .enumerate()
    {
        let x = rand_tensor(&[2, 3, 7, 10], 60 + i as u64);
        let wt = rand_tensor(&[4, 3, 3, 2], 70 + i as u64);
        let f = |t: &[Tensor]| project(&t[0].conv2d(&t[1], p, s, d, 1).unwrap(), 5);
        let err = common::gradcheck_in(&[x, wt], &f, DType::F64, 1e-6, 40);
        assert!(
            err < 1e-6,
            "padding {p} stride {s} dilation {d}: finite differences {err:e}"
        );
    }
}

#[test]
fn winograd_sized_conv_matches_the_float64_reference() {
    fer_model::ops::poison_unfilled();
    // 4 x 7 x 7 = 196 output tiles: enough for `FER_CONV=auto` to take Winograd F(2x2, 3x3) on an
    // AVX-512 machine, in the forward and in the input gradient (the direct GEMM elsewhere).
    let x = rand_tensor(&[4, 16, 14, 13], 70);
    let wt = rand_tensor(&[24, 16, 3, 3], 71).affine(0.1, 0.0).unwrap();
    let b = rand_tensor(&[24], 72);
    let g = ConvGeometry::new((3, 3), (1, 1), (1, 1));
    let f = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], Some(&t[2]), g).unwrap(), 9);
    let err = fast_vs_reference(&[x, wt, b], &f);
    assert!(err < 1e-5, "f32 vs f64 {err:e}");
}

#[test]
fn the_inference_convolution_keeps_its_weights_forms_and_matches_conv2d() {
    fer_model::ops::poison_unfilled();
    use fer_model::ops::{conv2d_inference, PreparedWeights};
    // A 3x3 on 4x4 maps (Winograd with kept weights on AVX2 and AVX-512: 2 x 4 tiles), a 3x3 and a 1x3 on
    // 2x2 maps (the dense small-map product), a strided 3x3 (the direct GEMM).
    let cases = [
        ([2, 24, 4, 4], (3, 3), (1, 1), (1, 1)),
        ([3, 16, 2, 2], (3, 3), (1, 1), (1, 1)),
        ([3, 16, 2, 2], (1, 3), (1, 1), (0, 1)),
        ([2, 8, 7, 6], (3, 3), (2, 2), (1, 1)),
    ];
    for (i, (shape, k, s, p)) in cases.into_iter().enumerate() {
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(rand_tensor(&shape, 80 + i as u64));
        let w = f32(rand_tensor(&[20, shape[1], k.0, k.1], 90 + i as u64));
        let b = f32(rand_tensor(&[20], 100 + i as u64));
        let g = ConvGeometry::new(k, s, p);
        let want = flat(&conv2d(&x, &w, Some(&b), g).unwrap());
        let kept = PreparedWeights::default();
        let first = flat(&conv2d_inference(&x, &w, &b, g, &kept).unwrap());
        let again = flat(&conv2d_inference(&x, &w, &b, g, &kept).unwrap());
        assert_eq!(first, again, "case {i}: the kept forms changed the result");
        let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
        let diff = first
            .iter()
            .zip(&want)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff / scale < 1e-5, "case {i}: {:e}", diff / scale);
    }
}

#[test]
fn fused_conv_gives_no_gradient_to_an_input_that_does_not_need_one() {
    let x = rand_tensor(&[2, 3, 8, 8], 1).to_dtype(DType::F32).unwrap(); // a plain tensor
    let w = Var::from_tensor(&rand_tensor(&[4, 3, 3, 3], 2).to_dtype(DType::F32).unwrap()).unwrap();
    let y = conv2d(
        &x,
        w.as_tensor(),
        None,
        ConvGeometry::new((3, 3), (1, 1), (1, 1)),
    )
    .unwrap();
    let grads = project(&y, 3).backward().unwrap();
    assert!(grads.get(&x).is_none(), "the input got a gradient");
    assert!(
        grads.get(w.as_tensor()).is_some(),
        "the weight got no gradient"
    );
}

/// Batch norm (+ ReLU) written out with tensor ops in the input's dtype: the reference.
fn batch_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Tensor {
    let c = x.dim(1).unwrap();
    let xt = x
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((c, ()))
        .unwrap();
    let mean = xt.mean_keepdim(D::Minus1).unwrap();
    let var = xt
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_keepdim(D::Minus1)
        .unwrap();
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    let shape = shape.as_slice();
    let y = x
        .broadcast_sub(&mean.reshape(shape).unwrap())
        .unwrap()
        .broadcast_div(
            &(var + 1e-5)
                .unwrap()
                .sqrt()
                .unwrap()
                .reshape(shape)
                .unwrap(),
        )
        .unwrap()
        .broadcast_mul(&w.reshape(shape).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(shape).unwrap())
        .unwrap();
    if relu {
        y.relu().unwrap()
    } else {
        y
    }
}

#[test]
fn fused_batch_norm_matches_the_reference_and_finite_differences() {
    fer_model::ops::poison_unfilled();
    for (dims, relu) in [
        (vec![4usize, 3, 5, 7], false),
        (vec![4, 3, 5, 7], true),
        (vec![6, 5], false), // BatchNorm1d, as in DAN's heads
        (vec![3, 2, 33], true),
        // Planes under 32 values (per-sample paths), more samples than one task's 8.
        (vec![10, 3, 2, 2], true),
        (vec![9, 4, 4, 4], false),
    ] {
        let c = dims[1];
        let x = rand_tensor(&dims, 50).affine(2.0, 0.5).unwrap();
        let w = rand_tensor(&[c], 51).affine(0.5, 1.0).unwrap();
        let b = rand_tensor(&[c], 52);
        let f = |t: &[Tensor]| {
            let y = if t[0].dtype() == DType::F32 {
                batch_norm(&t[0], &t[1], &t[2], BatchStats::Batch, 1e-5, relu)
                    .unwrap()
                    .0
            } else {
                batch_norm_reference(&t[0], &t[1], &t[2], relu)
            };
            project(&y, 9)
        };
        let err = fast_vs_reference(&[x.clone(), w.clone(), b.clone()], &f);
        assert!(
            err < 1e-5,
            "BN {dims:?} relu={relu}: f32 fused vs f64 reference {err:e}"
        );
        if !relu {
            // (ReLU's kink makes finite differences unreliable; the comparison above covers it.)
            let err = gradcheck_f32(&[x, w, b], &f, 1e-2, 40);
            assert!(err < 1e-2, "BN {dims:?}: f32 finite differences {err:e}");
        }
    }
}

#[test]
fn batch_norm_module_keeps_the_same_running_statistics_and_eval_output_on_both_paths() {
    fer_model::ops::poison_unfilled();
    let x = rand_tensor(&[8, 3, 4, 5], 60).affine(3.0, 1.0).unwrap();
    let mut outputs = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let mut store = ParamStore::new(&Device::Cpu, dtype, 0);
        let bn = BatchNorm::new(&mut store, "bn", 3).unwrap();
        bn.weight
            .set(&rand_tensor(&[3], 61).to_dtype(dtype).unwrap())
            .unwrap();
        let x = x.to_dtype(dtype).unwrap();
        bn.forward_relu(&x, true).unwrap();
        bn.forward(&x, true).unwrap();
        let eval = bn.forward_relu(&x, false).unwrap();
        outputs.push((
            flat(bn.running_mean.as_tensor()),
            flat(bn.running_var.as_tensor()),
            flat(&eval),
            bn.num_batches_tracked
                .as_tensor()
                .to_scalar::<i64>()
                .unwrap(),
        ));
    }
    let (a, b) = (&outputs[0], &outputs[1]);
    let close = |x: &[f64], y: &[f64]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
    };
    assert!(close(&a.0, &b.0), "running mean {:?} vs {:?}", a.0, b.0);
    assert!(close(&a.1, &b.1), "running var {:?} vs {:?}", a.1, b.1);
    assert!(close(&a.2, &b.2), "eval output differs");
    assert_eq!((a.3, b.3), (2, 2));
    assert!(a.2.iter().all(|&v| v >= 0.0) && a.2.iter().any(|&v| v > 0.0));
}

#[test]
fn add_relu_matches_its_composition() {
    fer_model::ops::poison_unfilled();
    let a = rand_tensor(&[3, 4, 5, 6], 70);
    let b = rand_tensor(&[3, 4, 5, 6], 71);
    let f = |t: &[Tensor]| {
        let y = if t[0].dtype() == DType::F32 {
            add_relu(&t[0], &t[1]).unwrap()
        } else {
            (&t[0] + &t[1]).unwrap().relu().unwrap()
        };
        project(&y, 11)
    };
    let err = fast_vs_reference(&[a, b], &f);
    assert!(err < 1e-6, "add_relu: {err:e}");
}

/// Candle's backward as patched (vendor/README.md) adds a gradient's later terms in place, but only
/// into a sum no other gradient shares. add+ReLU hands one tensor to both of its inputs; `a` then
/// gets two more terms (`3a` and `a²`), which must not leak into `b`'s gradient (in this order of
/// the loss's terms Candle reaches add+ReLU first: with the sharing check removed, this fails).
/// Large enough that the in-place add is split between threads.
#[test]
fn gradient_terms_are_summed_without_touching_a_shared_gradient() {
    let shape = [4, 8, 32, 32];
    let a = Var::from_tensor(&rand_tensor(&shape, 80).to_dtype(DType::F32).unwrap()).unwrap();
    let b = Var::from_tensor(&rand_tensor(&shape, 81).to_dtype(DType::F32).unwrap()).unwrap();
    let y = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
    let three_a = (a.as_tensor() * 3.0).unwrap();
    let a_sq = a.as_tensor().sqr().unwrap();
    let loss =
        (three_a.sum_all().unwrap() + a_sq.sum_all().unwrap() + y.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let (av, bv) = (flat(a.as_tensor()), flat(b.as_tensor()));
    let ga = flat(grads.get(a.as_tensor()).unwrap());
    let gb = flat(grads.get(b.as_tensor()).unwrap());
    for i in 0..av.len() {
        let mask = if av[i] + bv[i] > 0.0 { 1.0 } else { 0.0 };
        assert_eq!(gb[i], mask, "b's gradient at {i}: add+ReLU's term alone");
        let want = mask + 3.0 + 2.0 * av[i];
        assert!(
            (ga[i] - want).abs() <= 1e-6 * want.abs().max(1.0),
            "a's gradient at {i}: {} vs {want}",
            ga[i]
        );
    }
}

#[test]
fn gemm_matmul_and_its_gradients_match_the_float64_product() {
    // Shapes around the microkernel's 6 x 16 tile and 256-deep blocks, with transposed views.
    for &(m, k, n) in &[(1, 1, 1), (7, 300, 17), (64, 513, 40)] {
        let a = rand_tensor(&[m, k], 80);
        let bt = rand_tensor(&[n, k], 81);
        let f = |t: &[Tensor]| {
            let b = t[1].t().unwrap();
            let y = if t[0].dtype() == DType::F32 {
                matmul(&t[0], &b).unwrap()
            } else {
                t[0].matmul(&b.contiguous().unwrap()).unwrap()
            };
            project(&y, 12)
        };
        let err = fast_vs_reference(&[a, bt], &f);
        assert!(err < 1e-5, "matmul {m}x{k}x{n}: {err:e}");
    }
}
