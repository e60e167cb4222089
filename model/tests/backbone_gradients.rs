//! Every backbone trains: the ops the new backbones add match finite differences, every
//! parameter of each backbone (inside DAN, full thesis loss) receives a non-zero gradient, and the
//! whole network's gradient matches finite differences on tiny configs in float64.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{gradcheck, project, rand_tensor};
use fer_model::backbone::{BackboneConfig, InceptionConfig, ResNetConfig, VitConfig};
use fer_model::layers::{avg_pool_3x3_same, layer_norm, softmax_last};
use fer_model::store::EntryKind;
use fer_model::train::{self, LossWeights};
use fer_model::{DanConfig, DanEac};

const TOL: f64 = 1e-5;

#[test]
fn layer_norm_softmax_gelu_and_avg_pool_match_finite_differences() {
    let f = |t: &[Tensor]| project(&layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap(), 1);
    let err = gradcheck(
        &[
            rand_tensor(&[2, 3, 8], 2),
            rand_tensor(&[8], 3),
            rand_tensor(&[8], 4),
        ],
        &f,
        30,
    );
    assert!(err < TOL, "layer norm: {err:e}");
    let f = |t: &[Tensor]| project(&softmax_last(&(&t[0] * 3.0).unwrap()).unwrap(), 5);
    let err = gradcheck(&[rand_tensor(&[2, 3, 7], 6)], &f, 30);
    assert!(err < TOL, "softmax: {err:e}");
    let f = |t: &[Tensor]| project(&(&t[0] * 2.0).unwrap().gelu_erf().unwrap(), 7);
    let err = gradcheck(&[rand_tensor(&[4, 9], 8)], &f, 30);
    assert!(err < TOL, "gelu (erf): {err:e}");
    let f = |t: &[Tensor]| project(&avg_pool_3x3_same(&t[0]).unwrap(), 9);
    let err = gradcheck(&[rand_tensor(&[2, 2, 5, 4], 10)], &f, 40);
    assert!(err < TOL, "avg pool: {err:e}");
    // count_include_pad: a corner averages 4 values over 9.
    let x = Tensor::ones((1, 1, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let y = avg_pool_3x3_same(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!((y[0] - 4.0 / 9.0).abs() < 1e-12 && (y[4] - 1.0).abs() < 1e-12);
    // Softmax rows sum to one and match exp / sum.
    let s = softmax_last(&rand_tensor(&[3, 5], 11))
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12));
}

/// Tiny variants of the three new backbones and of the embedded default's stride-16 ResNet
/// layout (here with stride-1 stages changing width and no stem pool), with the input size each
/// takes.
pub(crate) fn tiny_backbones() -> Vec<(&'static str, BackboneConfig, usize)> {
    vec![
        (
            "resnet_strided",
            BackboneConfig::ResNet(ResNetConfig {
                widths: [4, 6, 8, 16],
                blocks: [1, 1, 1, 1],
                strides: [1, 1, 2, 1],
                stem_pool: false,
                ..ResNetConfig::resnet18()
            }),
            16,
        ),
        (
            "resnet50",
            BackboneConfig::ResNet(ResNetConfig {
                widths: [4, 4, 4, 4],
                blocks: [1, 2, 1, 1],
                bottleneck: true,
                ..ResNetConfig::resnet18()
            }),
            32,
        ),
        (
            "inception_v3",
            BackboneConfig::InceptionV3(InceptionConfig::new(1.0 / 32.0)),
            75,
        ),
        (
            "vit",
            BackboneConfig::Vit(VitConfig {
                image_size: 32,
                patch_size: 8,
                hidden_dim: 16,
                num_layers: 2,
                num_heads: 2,
                mlp_dim: 32,
            }),
            32,
        ),
    ]
}

fn net(backbone: BackboneConfig, dtype: DType) -> DanEac {
    DanEac::new(
        &DanConfig {
            backbone,
            heads: 2,
            classes: 3,
        },
        3,
        &Device::Cpu,
        dtype,
        7,
    )
    .unwrap()
}

#[test]
fn every_backbone_parameter_receives_a_gradient() {
    for (name, config, size) in tiny_backbones() {
        let net = net(config, DType::F32);
        let x = rand_tensor(&[4, 3, size, size], 20)
            .to_dtype(DType::F32)
            .unwrap();
        let y = Tensor::new(&[0u32, 2, 1, 2], &Device::Cpu).unwrap();
        let graph =
            train::step_graph(&net.dan, &net.centers, &x, &y, LossWeights::default()).unwrap();
        let grads = graph.total.backward().unwrap();
        let mut without = Vec::new();
        let mut count = 0;
        for e in net
            .store
            .entries()
            .iter()
            .filter(|e| e.kind == EntryKind::Param)
        {
            count += 1;
            let g = grads.get(e.var.as_tensor()).map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            // The channel attention's first linear layer feeds a train-mode BatchNorm1d, which
            // subtracts the batch mean: its bias's exact gradient is zero, so only rounding could
            // make it nonzero. It must still be in the graph (present and finite).
            let before_batch_norm = e.name.ends_with("ca.attention.0.bias");
            let ok = if before_batch_norm {
                g.is_some_and(f32::is_finite)
            } else {
                g.is_some_and(|g| g > 0.0 && g.is_finite())
            };
            if !ok {
                without.push(e.name.clone());
            }
        }
        assert!(
            without.is_empty(),
            "{name}: {} of {count} parameters get no (or a zero) gradient: {without:?}",
            without.len()
        );
    }
}

#[test]
fn backbone_gradients_match_finite_differences() {
    let picks: [&[&str]; 4] = [
        &[
            "features.0.weight",
            "features.5.0.conv1.weight",
            "features.5.0.downsample.0.weight",
            "features.7.0.conv2.weight",
            "features.7.0.downsample.1.weight",
        ],
        &[
            "features.0.weight",
            "features.4.0.conv3.weight",
            "features.5.1.bn2.weight",
            "features.7.0.downsample.1.bias",
        ],
        &[
            "features.Conv2d_1a_3x3.conv.weight",
            "features.Mixed_5b.branch_pool.conv.weight",
            "features.Mixed_6b.branch7x7dbl_3.conv.weight",
            "features.Mixed_7c.branch3x3dbl_3b.bn.weight",
        ],
        &[
            "features.conv_proj.weight",
            "features.class_token",
            "features.encoder.pos_embedding",
            "features.encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
            "features.encoder.layers.encoder_layer_1.ln_1.weight",
            "features.encoder.layers.encoder_layer_1.mlp.0.bias",
            "features.encoder.ln.bias",
        ],
    ];
    for ((name, config, size), picks) in tiny_backbones().into_iter().zip(picks) {
        let net = net(config, DType::F64);
        let x = rand_tensor(&[3, 3, size, size], 30);
        let y = Tensor::new(&[0u32, 2, 1], &Device::Cpu).unwrap();
        let w = LossWeights::default();
        // The tiny Inception's loss is steep in its first layers (gradients ~1e4): its
        // finite differences need a smaller step to stay in the linear range.
        let step = if name == "inception_v3" { 1e-8 } else { 1e-6 };
        for &param in picks {
            let err = common::network_gradient_error(&net, &x, &y, w, param, step, 5);
            eprintln!("{name} {param}: {err:e}");
            assert!(
                err < 1e-4,
                "{name} {param}: analytic vs finite differences {err:e}"
            );
        }
    }
}

#[test]
fn inception_geometries_match_finite_differences() {
    use fer_model::ops::{conv2d, max_pool2d, ConvGeometry};
    for (k, s, p, h, w) in [
        ((3, 3), 2, (0, 0), 9, 9),
        ((3, 3), 2, (0, 0), 11, 8),
        ((1, 7), 1, (0, 3), 6, 9),
        ((7, 1), 1, (3, 0), 9, 6),
        ((5, 5), 1, (2, 2), 7, 7),
        ((3, 3), 1, (0, 0), 7, 9),
    ] {
        let g = ConvGeometry::new(k, (s, s), p);
        let f = |t: &[Tensor]| project(&conv2d(&t[0], &t[1], None, g).unwrap(), 3);
        let err = gradcheck(
            &[
                rand_tensor(&[2, 3, h, w], 1),
                rand_tensor(&[4, 3, k.0, k.1], 2),
            ],
            &f,
            40,
        );
        eprintln!("conv {k:?} s{s} p{p:?} on {h}x{w}: {err:e}");
        assert!(err < TOL, "conv {k:?} s{s} p{p:?} on {h}x{w}: {err:e}");
    }
    for (h, w) in [(9, 9), (10, 7), (17, 17)] {
        let f = |t: &[Tensor]| project(&max_pool2d(&t[0], 3, 2, 0).unwrap(), 4);
        let err = gradcheck(&[rand_tensor(&[2, 2, h, w], 5)], &f, 60);
        eprintln!("max pool 3/2/0 on {h}x{w}: {err:e}");
        assert!(err < TOL, "max pool 3/2/0 on {h}x{w}: {err:e}");
    }
}
