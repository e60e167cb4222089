//! The inference form (`Dan::inference`: batch norms folded, no autograd graph, ReLUs in place)
//! against the eval forward it replaces, on every backbone, with batch-norm statistics and
//! affine parameters far from their initial values (so a fold that dropped one would show).

use candle_core::{DType, Device, Tensor};
use fer_model::{DanConfig, DanEac};
use rand::{Rng, SeedableRng};

use crate::backbone_gradients::tiny_backbones;

/// Largest |a - b| relative to the largest |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn the_inference_form_matches_the_eval_forward_on_every_backbone() {
    for (tag, backbone, size) in tiny_backbones() {
        let net = DanEac::new(
            &DanConfig {
                backbone,
                heads: 3,
                classes: 5,
            },
            5,
            &Device::Cpu,
            DType::F32,
            11,
        )
        .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for e in net.store.entries() {
            let n = e.var.elem_count();
            let fill = |lo: f32, hi: f32, rng: &mut rand_chacha::ChaCha8Rng| {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
                Tensor::from_vec(v, e.var.shape(), &Device::Cpu).unwrap()
            };
            let t = if e.name.ends_with("running_mean") {
                fill(-0.5, 0.5, &mut rng)
            } else if e.name.ends_with("running_var") {
                fill(0.3, 2.5, &mut rng)
            } else if e.var.rank() == 1 && e.var.dtype() == DType::F32 && e.name.ends_with("weight")
            {
                fill(0.5, 1.5, &mut rng)
            } else if e.var.rank() == 1 && e.var.dtype() == DType::F32 && e.name.ends_with("bias") {
                fill(-0.3, 0.3, &mut rng)
            } else {
                continue;
            };
            e.var.set(&t).unwrap();
        }
        let x: Vec<f32> = (0..2 * 3 * size * size)
            .map(|_| rng.random_range(-1.5f32..1.5))
            .collect();
        let x = Tensor::from_vec(x, (2, 3, size, size), &Device::Cpu).unwrap();
        let want = net.dan.forward(&x, false).unwrap();
        let got = net.dan.inference().unwrap().forward(&x).unwrap();
        for (what, a, b) in [
            ("logits", &got.logits, &want.logits),
            ("feature map", &got.feat, &want.feat),
            ("heads", &got.heads, &want.heads),
            ("spatial maps", &got.spatial_maps, &want.spatial_maps),
        ] {
            let d = rel_diff(a, b);
            assert!(d < 2e-5, "{tag}: {what} differ by {d:e} (relative)");
        }
        // Outside any autograd graph: nothing of the weights is reachable from the output.
        assert!(!got.logits.is_variable());
        // The eval forward's own output is untouched by the in-place ops of the other.
        let again = net.dan.forward(&x, false).unwrap();
        assert_eq!(rel_diff(&again.logits, &want.logits), 0.0, "{tag}");
    }
}
