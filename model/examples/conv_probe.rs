//! Forward-convolution throughput per ResNet-18 layer and DAN head convolution (inference shapes), to see which layers
//! fall short of the GEMM's rate: `cargo run --release -p fer-model --example conv_probe -- [SIZE
//! BATCH [LAYER [prepared]]]` (default 64 px, batch 64; LAYER: only the layers whose name contains
//! it, "" for all; `prepared`: the inference form's convolution, weights' transformed forms kept;
//! `backward`: the backward's products, with `FER_OP_TIMES=1`, best of `PROBE_REPS` passes, 6 by
//! default: more give a profiler something to sample). `bench/compare_conv_layers.py` sets these
//! numbers beside PyTorch's.
use candle_core::{Device, Tensor};
use fer_model::ops::{conv2d, conv2d_inference, ConvGeometry, PreparedWeights};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (size, batch) = (
        args.first().copied().unwrap_or(64),
        args.get(1).copied().unwrap_or(64),
    );
    let s = size / 4; // after the stem's stride 2 and the max pool
    let f = s.div_ceil(8); // the trunk's last map, which the DAN heads see (3x3/2 convs round up)
                           // (name, input channels, output channels, kernel, stride, padding, input side)
    let layers = [
        ("stem 7x7/2", 3, 64, (7, 7), 2, (3, 3), size),
        ("layer1 3x3", 64, 64, (3, 3), 1, (1, 1), s),
        ("layer2 3x3/2", 64, 128, (3, 3), 2, (1, 1), s),
        ("layer2 3x3", 128, 128, (3, 3), 1, (1, 1), s / 2),
        ("layer2 1x1/2", 64, 128, (1, 1), 2, (0, 0), s),
        ("layer3 3x3/2", 128, 256, (3, 3), 2, (1, 1), s / 2),
        ("layer3 3x3", 256, 256, (3, 3), 1, (1, 1), s / 4),
        ("layer4 3x3/2", 256, 512, (3, 3), 2, (1, 1), s / 4),
        ("layer4 3x3", 512, 512, (3, 3), 1, (1, 1), f),
        ("head 1x1", 512, 256, (1, 1), 1, (0, 0), f),
        ("head 3x3", 256, 512, (3, 3), 1, (1, 1), f),
        ("head 1x3", 256, 512, (1, 3), 1, (0, 1), f),
        ("head 3x1", 256, 512, (3, 1), 1, (1, 0), f),
    ];
    // A third argument keeps only the layers whose name contains it (for a profiler); a fourth,
    // `prepared`, runs the inference form's convolution (weights' transformed forms kept).
    let only = std::env::args().nth(3).filter(|f| !f.is_empty());
    let prepared = std::env::args().nth(4).is_some_and(|a| a == "prepared");
    let backward = std::env::args().nth(4).is_some_and(|a| a == "backward");
    let dev = Device::Cpu;
    for (name, c, o, (kh, kw), st, pad, side) in layers {
        if only.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (batch, c, side, side), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (o, c, kh, kw), &dev)?;
        let g = ConvGeometry::new((kh, kw), (st, st), pad);
        let bias = Tensor::zeros(o, candle_core::DType::F32, &dev)?;
        let kept = PreparedWeights::default();
        let conv = |x: &Tensor| {
            if prepared {
                conv2d_inference(x, &w, &bias, g, &kept)
            } else {
                conv2d(x, &w, None, g)
            }
        };
        if backward {
            backward_rates(name, &x, &w, g)?;
            continue;
        }
        let out = conv(&x)?;
        let (oh, ow) = (out.dim(2)?, out.dim(3)?);
        let flops = 2.0 * (batch * o * oh * ow * c * kh * kw) as f64;
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..3 {
                    std::hint::black_box(conv(&x).unwrap());
                }
                t.elapsed().as_secs_f64() / 3.0
            })
            .fold(f64::MAX, f64::min);
        println!(
            "{name:<14} [{batch}, {c}, {side}, {side}] -> [{o}, {oh}, {ow}]: {:6.1} GFLOP/s, {:7.2} ms",
            flops / best / 1e9,
            best * 1e3
        );
    }
    Ok(())
}

/// The backward's two products for one layer, each timed by its `FER_OP_TIMES` slot (best of
/// `PROBE_REPS` backward passes of `sum(conv(x, w) * r)`), in GFLOP/s of the direct convolution's arithmetic,
/// and the convolution's whole backward (products, copies, packing of the weights).
fn backward_rates(name: &str, x: &Tensor, w: &Tensor, g: ConvGeometry) -> candle_core::Result<()> {
    use fer_model::ops::timing;
    if std::env::var_os("FER_OP_TIMES").is_none() {
        candle_core::bail!("the backward rates need FER_OP_TIMES=1");
    }
    let (x, w) = (
        candle_core::Var::from_tensor(x)?,
        candle_core::Var::from_tensor(w)?,
    );
    let y = conv2d(&x, &w, None, g)?;
    let r = y.randn_like(0.0, 1.0)?;
    let flops = 2.0 * (y.elem_count() * w.dim(1)? * w.dim(2)? * w.dim(3)?) as f64;
    let slot = |times: &[(&str, f64)], s: &str| {
        times
            .iter()
            .find(|(n, _)| n.trim() == s)
            .map_or(0.0, |t| t.1)
    };
    let (mut wg, mut ig, mut all) = (f64::MAX, f64::MAX, f64::MAX);
    let reps: usize = std::env::var("PROBE_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    for _ in 0..reps {
        timing::take();
        let grads = (conv2d(&x, &w, None, g)? * &r)?.sum_all()?.backward()?;
        std::hint::black_box(grads);
        let times = timing::take();
        wg = wg.min(slot(&times, "conv: gemm, weight gradient"));
        ig = ig.min(slot(&times, "conv: gemm, input gradient") + slot(&times, "conv: col2im"));
        all = all.min(slot(&times, "conv backward"));
    }
    println!(
        "{name:<14} {:?}: weight gradient {:6.1} GFLOP/s {:6.2} ms, input gradient {:6.1} GFLOP/s {:6.2} ms, whole backward {:6.2} ms",
        x.dims(),
        flops / wg / 1e9,
        wg * 1e3,
        flops / ig / 1e9,
        ig * 1e3,
        all * 1e3
    );
    Ok(())
}
