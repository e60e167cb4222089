//! Finite-difference checks (float64) of every op written here or relied on where Candle has a
//! known defect: convolution (all geometries DAN uses, including stride 2 on inputs whose
//! height and width differ in parity), padded max pooling, batch norm in train mode, the
//! losses, log-softmax / sigmoid, and the whole network end to end.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{gradcheck, project, rand_tensor};
use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::layers::BatchNorm;
use fer_model::ops::{conv2d, max_pool2d, max_pool2d_native, ConvGeometry};
use fer_model::store::ParamStore;
use fer_model::{loss, train, DanConfig, DanEac, LossWeights};

const TOL: f64 = 1e-5;

#[test]
fn conv2d_gradients_for_every_geometry_dan_uses() {
    // (input h, w, kernel, stride, padding)
    let cases = [
        (9, 11, (7, 7), (2, 2), (3, 3)), // stem
        (7, 8, (3, 3), (2, 2), (1, 1)), // stride 2, mixed parity: Candle's stock backward errors here
        (4, 5, (3, 3), (2, 2), (1, 1)), // the fixtures' layer4 input
        (4, 5, (1, 1), (2, 2), (0, 0)), // downsample
        (5, 6, (3, 3), (1, 1), (1, 1)),
        (2, 3, (1, 3), (1, 1), (0, 1)), // DAN conv_1x3
        (2, 3, (3, 1), (1, 1), (1, 0)), // DAN conv_3x1
        (3, 3, (1, 1), (1, 1), (0, 0)),
    ];
    for (i, &(h, w, k, s, p)) in cases.iter().enumerate() {
        let x = rand_tensor(&[2, 3, h, w], 10 + i as u64);
        let wt = rand_tensor(&[4, 3, k.0, k.1], 20 + i as u64);
        let b = rand_tensor(&[4], 30 + i as u64);
        let g = ConvGeometry::new(k, s, p);
        let f = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], Some(&t[2]), g).unwrap(), 7);
        let err = gradcheck(&[x, wt, b], &f, 60);
        assert!(
            err < TOL,
            "conv2d case {i} ({h}x{w}, k{k:?} s{s:?} p{p:?}): relative error {err:e}"
        );
    }
}

#[test]
fn conv2d_forward_matches_a_direct_loop() {
    let x = rand_tensor(&[2, 2, 5, 6], 1);
    let w = rand_tensor(&[3, 2, 3, 1], 2);
    let g = ConvGeometry::new((3, 1), (2, 1), (1, 0));
    let y = conv2d(&x, &w, None, g).unwrap();
    assert_eq!(y.dims(), &[2, 3, 3, 6]);
    let x4: Vec<Vec<Vec<Vec<f64>>>> = (0..2)
        .map(|b| x.get(b).unwrap().to_vec3().unwrap())
        .collect();
    let w4: Vec<Vec<Vec<Vec<f64>>>> = (0..3)
        .map(|o| w.get(o).unwrap().to_vec3().unwrap())
        .collect();
    let y4: Vec<Vec<Vec<Vec<f64>>>> = (0..2)
        .map(|b| y.get(b).unwrap().to_vec3().unwrap())
        .collect();
    for b in 0..2 {
        for o in 0..3 {
            for oy in 0..3 {
                for ox in 0..6 {
                    let mut acc = 0.0;
                    for c in 0..2 {
                        for i in 0..3 {
                            let iy = (oy * 2 + i) as isize - 1;
                            if (0..5).contains(&iy) {
                                acc += x4[b][c][iy as usize][ox] * w4[o][c][i][0];
                            }
                        }
                    }
                    assert!((acc - y4[b][o][oy][ox]).abs() < 1e-12);
                }
            }
        }
    }
}

#[test]
fn max_pool_matches_pytorch_semantics_and_routes_gradient_to_one_winner() {
    // 1x1x4x4 with ties (post-ReLU zeros): window 3x3/2/1 -> 2x2.
    let x = Tensor::from_vec(
        vec![
            0f64, 0., 0., 0., 0., 0., 0., 5., 1., 0., 0., 0., 0., 0., 3., 3.,
        ],
        (1, 1, 4, 4),
        &Device::Cpu,
    )
    .unwrap();
    let y = max_pool2d(&x, 3, 2, 1).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        vec![0., 5., 1., 5.]
    );
    let var = candle_core::Var::from_tensor(&x).unwrap();
    let g = max_pool2d(var.as_tensor(), 3, 2, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g
        .get(&var)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    // The all-zero window gives its gradient to its first cell only (PyTorch), not 1/9 to each.
    let mut expected = vec![0f64; 16];
    expected[0] = 1.0;
    expected[7] = 2.0; // 5 wins two windows
    expected[8] = 1.0;
    assert_eq!(g, expected);
}

#[test]
fn max_pool_gradient_matches_finite_differences() {
    for (i, &(h, w)) in [(7usize, 8usize), (8, 8), (5, 3)].iter().enumerate() {
        let x = rand_tensor(&[2, 3, h, w], 40 + i as u64);
        let f = |t: &[Tensor]| project(&max_pool2d(&t[0], 3, 2, 1).unwrap(), 8);
        let err = gradcheck(&[x], &f, 80);
        assert!(err < TOL, "max_pool {h}x{w}: relative error {err:e}");
    }
}

/// The accelerators' max pool (Candle's own ops, run here on the CPU) gives the CPU op's values
/// and the same one-winner gradient, ties and negative inputs included, in both rounding modes.
#[test]
fn the_accelerator_max_pool_matches_the_cpu_op_exactly() {
    for (case, &(h, w, k, s, p, ceil)) in [
        (4usize, 4usize, 3usize, 2usize, 1usize, false),
        (7, 8, 3, 2, 1, false),
        (5, 3, 3, 2, 1, false),
        (7, 6, 3, 2, 0, true),
        (6, 5, 2, 2, 0, false),
        (5, 5, 3, 1, 1, false),
    ]
    .iter()
    .enumerate()
    {
        for dtype in [DType::F64, DType::F32] {
            // Few distinct values (many ties), negatives too; zeros as after a ReLU.
            let vals: Vec<f64> = (0..2 * 3 * h * w)
                .map(|i| [0.0, -1.5, 2.0, 0.0, 2.0, -0.25][(i * 7 + i / 5) % 6])
                .collect();
            let x = Tensor::from_vec(vals, (2, 3, h, w), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |native: bool| {
                let var = candle_core::Var::from_tensor(&x).unwrap();
                let y = if native {
                    max_pool2d_native(var.as_tensor(), k, s, p, ceil).unwrap()
                } else if ceil {
                    fer_model::ops::max_pool2d_ceil(var.as_tensor(), k, s, p).unwrap()
                } else {
                    max_pool2d(var.as_tensor(), k, s, p).unwrap()
                };
                // Distinct weights per output, so each element's gradient names its windows.
                let n = y.elem_count();
                let wts = Tensor::arange(1.0, n as f64 + 1.0, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .reshape(y.shape())
                    .unwrap();
                let g = (&y * wts).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| -> Vec<f64> {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                (y.dims().to_vec(), flat(&y), flat(g.get(&var).unwrap()))
            };
            assert_eq!(
                run(true),
                run(false),
                "case {case} ({h}x{w} k{k} s{s} p{p} ceil {ceil}, {dtype:?})"
            );
        }
    }
}

#[test]
fn batch_norm_train_mode_gradients_and_running_stats() {
    for dims in [vec![4usize, 3, 2, 3], vec![5, 3]] {
        let mut store = ParamStore::new(&Device::Cpu, DType::F64, 0);
        let bn = BatchNorm::new(&mut store, "bn", 3).unwrap();
        let x = rand_tensor(&dims, 50);
        let gamma = rand_tensor(&[3], 51).affine(0.5, 1.0).unwrap();
        let beta = rand_tensor(&[3], 52);
        bn.weight.set(&gamma).unwrap();
        bn.bias.set(&beta).unwrap();
        // Gradient w.r.t. x through the module.
        let f = |t: &[Tensor]| project(&bn.forward(&t[0], true).unwrap(), 9);
        let err = gradcheck(std::slice::from_ref(&x), &f, 60);
        assert!(err < TOL, "BN {dims:?} input gradient: {err:e}");
        // Running stats after exactly one train forward from (0, 1): 0.1*mean, 0.9 + 0.1*unbiased var.
        let mut store = ParamStore::new(&Device::Cpu, DType::F64, 0);
        let bn = BatchNorm::new(&mut store, "bn", 3).unwrap();
        bn.forward(&x, true).unwrap();
        let xt = x
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((3, ()))
            .unwrap();
        let mean = xt.mean(1).unwrap().to_vec1::<f64>().unwrap();
        let var = xt.var(1).unwrap().to_vec1::<f64>().unwrap();
        let rm = bn.running_mean.as_tensor().to_vec1::<f64>().unwrap();
        let rv = bn.running_var.as_tensor().to_vec1::<f64>().unwrap();
        for c in 0..3 {
            assert!((rm[c] - 0.1 * mean[c]).abs() < 1e-12);
            assert!((rv[c] - (0.9 + 0.1 * var[c])).abs() < 1e-12);
        }
        assert_eq!(
            bn.num_batches_tracked
                .as_tensor()
                .to_scalar::<i64>()
                .unwrap(),
            1
        );
        // Eval mode leaves the stats alone.
        bn.forward(&x, false).unwrap();
        assert_eq!(
            bn.num_batches_tracked
                .as_tensor()
                .to_scalar::<i64>()
                .unwrap(),
            1
        );
    }
}

#[test]
fn loss_functions_match_the_spec_hand_vectors() {
    // Spec 2.6, partition: x = arange(24).reshape(2,4,3)/10, log_softmax over axis 1.
    let x = (Tensor::arange(0f64, 24., &Device::Cpu)
        .unwrap()
        .reshape((2, 4, 3))
        .unwrap()
        / 10.0)
        .unwrap();
    let h = candle_nn::ops::log_softmax(&x, 1).unwrap();
    let h00: Vec<f64> = h
        .get(0)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
        .iter()
        .map(|r| r[0])
        .collect();
    for (a, e) in h00
        .iter()
        .zip([-1.89184319, -1.59184319, -1.29184319, -0.99184319])
    {
        assert!((a - e).abs() < 1e-8);
    }
    let lpt = loss::partition_loss(&h)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((lpt - 3.3202283191284865).abs() < 1e-12, "L_pt = {lpt}");
    let fused = h.sum(1).unwrap().get(0).unwrap().to_vec1::<f64>().unwrap();
    assert!(fused.iter().all(|v| (v + 5.76737278).abs() < 1e-8));
    // K = 1: the partition loss is 0.
    assert_eq!(
        loss::partition_loss(&x.narrow(1, 0, 1).unwrap())
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );

    // Spec 2.6, affinity.
    let f = Tensor::from_vec(vec![1f64, 2., 0.5, -1., 3., 0.], (3, 2), &Device::Cpu).unwrap();
    let c = Tensor::from_vec(vec![0f64, 1., 1., -1., 2., 2.], (3, 2), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let laf = loss::affinity_loss(&f, &c, &y)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((laf - 1.8250000000020004).abs() < 1e-15, "L_af = {laf}");
}

#[test]
fn loss_gradients_match_finite_differences() {
    let y = Tensor::new(&[0u32, 2, 1, 2], &Device::Cpu).unwrap();
    // Affinity: gradient into both the features and the centers (through sigma^2 too).
    let f = |t: &[Tensor]| loss::affinity_loss(&t[0], &t[1], &y).unwrap();
    let err = gradcheck(
        &[rand_tensor(&[4, 5], 70), rand_tensor(&[3, 5], 71)],
        &f,
        40,
    );
    assert!(err < TOL, "affinity: {err:e}");
    // Partition through log-softmax over the head axis.
    let f = |t: &[Tensor]| {
        loss::partition_loss(&candle_nn::ops::log_softmax(&t[0], 1).unwrap()).unwrap()
    };
    let err = gradcheck(&[rand_tensor(&[3, 4, 5], 72)], &f, 40);
    assert!(err < TOL, "partition: {err:e}");
    // Flip consistency w.r.t. both maps.
    let f = |t: &[Tensor]| loss::flip_consistency_loss(&t[0], &t[1]).unwrap();
    let err = gradcheck(
        &[
            rand_tensor(&[2, 3, 2, 3], 73),
            rand_tensor(&[2, 3, 2, 3], 74),
        ],
        &f,
        40,
    );
    assert!(err < TOL, "consistency: {err:e}");
    // Cross entropy and sigmoid (Candle ops we rely on).
    let f = |t: &[Tensor]| {
        let logits = candle_nn::ops::sigmoid(&t[0]).unwrap();
        loss::cross_entropy(&logits.narrow(1, 0, 3).unwrap(), &y).unwrap()
    };
    let err = gradcheck(&[rand_tensor(&[4, 4], 75)], &f, 40);
    assert!(err < TOL, "sigmoid + cross entropy: {err:e}");
}

/// Two heads, three classes, a one-block-per-stage trunk: small enough for finite differences.
fn tiny_net(dtype: DType) -> DanEac {
    let config = DanConfig {
        backbone: BackboneConfig::ResNet(ResNetConfig::basic([4, 4, 8, 16], [1, 1, 1, 1])),
        heads: 2,
        classes: 3,
    };
    DanEac::new(&config, 3, &Device::Cpu, dtype, 5).unwrap()
}

#[test]
fn whole_network_gradient_matches_finite_differences() {
    // A tiny network in float64; every loss term on, both forwards. Train-mode BN running
    // stats change between evaluations but do not enter the train-mode output.
    let net = tiny_net(DType::F64);
    let x = rand_tensor(&[3, 3, 32, 40], 80);
    let y = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let eps = 1e-6;
    // The CAM detaches fc.weight, so finite differences of fc.weight only agree with the
    // analytic gradient when the consistency term is off.
    let no_cam = LossWeights {
        consistency: 0.0,
        ..LossWeights::default()
    };
    for (name, w) in [
        ("features.0.weight", LossWeights::default()),
        ("features.7.0.conv1.weight", LossWeights::default()),
        ("cat_head1.sa.conv_1x3.0.weight", LossWeights::default()),
        ("cat_head0.ca.attention.3.weight", LossWeights::default()),
        ("affinity.centers", LossWeights::default()),
        ("features.1.weight", LossWeights::default()), // BN2d gamma
        ("features.5.0.downsample.1.bias", LossWeights::default()), // BN2d beta
        ("cat_head0.ca.attention.1.weight", LossWeights::default()), // BN1d gamma
        ("bn.weight", no_cam),                         // BN1d on the logits
        ("fc.weight", no_cam),
    ] {
        let rel = common::network_gradient_error(&net, &x, &y, w, name, eps, 6);
        assert!(rel < 1e-4, "{name}: relative error {rel:e}");
    }
}

#[test]
fn switched_off_terms_leave_no_gradient() {
    let net = tiny_net(DType::F32);
    let x = rand_tensor(&[3, 3, 32, 32], 81)
        .to_dtype(DType::F32)
        .unwrap();
    let y = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
    let w = LossWeights {
        affinity: 0.0,
        partition: 0.0,
        consistency: 0.0,
        ..LossWeights::default()
    };
    let before = net
        .store
        .get("bn.num_batches_tracked")
        .unwrap()
        .as_tensor()
        .to_scalar::<i64>()
        .unwrap();
    let graph = train::step_graph(&net.dan, &net.centers, &x, &y, w).unwrap();
    assert!(graph.flipped.is_none() && graph.consistency.is_none());
    let after = net
        .store
        .get("bn.num_batches_tracked")
        .unwrap()
        .as_tensor()
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(after, before + 1, "no second forward when lambda3 = 0");
    let grads = graph.total.backward().unwrap();
    assert!(
        grads.get(&net.centers.centers).is_none(),
        "centers must get no gradient when lambda1 = 0"
    );
    // With the consistency term on, the classifier still gets no gradient from it alone.
    let w = LossWeights {
        affinity: 0.0,
        partition: 0.0,
        consistency: 4.0,
        ..LossWeights::default()
    };
    let graph = train::step_graph(&net.dan, &net.centers, &x, &y, w).unwrap();
    let lc_grads = graph.consistency.unwrap().backward().unwrap();
    assert!(
        lc_grads.get(&net.dan.fc.weight).is_none(),
        "L_c must not reach fc.weight (detached CAM weights)"
    );
    assert!(lc_grads
        .get(net.store.get("features.0.weight").unwrap())
        .is_some());
}
