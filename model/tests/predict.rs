//! Loading checkpoints for inference: the architecture from tensor shapes, and a clear error for
//! a state whose tensors do not fit together.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::predict::{dan_config_from_state, Predictor};

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(rel)
}

#[test]
fn architecture_comes_from_the_tensor_shapes() {
    let state =
        fer_model::checkpoint::read_pth_state_dict(&fixture("tiny_h4_c7/checkpoint.pth")).unwrap();
    let (config, centers) = dan_config_from_state(&state).unwrap();
    // What the reference implementation says it built.
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_h4_c7/case.json")).unwrap())
            .unwrap();
    let n = |k: &str| case[k].as_u64().unwrap() as usize;
    let arr = |k: &str| -> [usize; 4] {
        let v: Vec<usize> = serde_json::from_value(case[k].clone()).unwrap();
        v.try_into().unwrap()
    };
    assert_eq!(
        centers,
        n("num_classes"),
        "the release holds no centers: one per class"
    );
    assert_eq!(config.heads, n("num_heads"));
    assert_eq!(config.classes, n("num_classes"));
    let BackboneConfig::ResNet(r) = &config.backbone else {
        panic!("a ResNet trunk")
    };
    assert!(!r.bottleneck, "{}", case["backbone"]);
    assert_eq!((r.widths, r.blocks), (arr("widths"), arr("blocks")));
    // A bottleneck trunk is recognised by its conv3.
    let net = fer_model::DanEac::new(
        &fer_model::DanConfig {
            backbone: BackboneConfig::ResNet(ResNetConfig {
                widths: [4, 4, 8, 16],
                blocks: [1, 2, 1, 1],
                bottleneck: true,
                ..ResNetConfig::resnet18()
            }),
            heads: 3,
            classes: 8,
        },
        8,
        &Device::Cpu,
        DType::F32,
        0,
    )
    .unwrap();
    let state: std::collections::HashMap<String, Tensor> =
        net.store.state().unwrap().into_iter().collect();
    let (config, centers) = dan_config_from_state(&state).unwrap();
    assert_eq!(config, net.dan.config);
    assert_eq!(centers, 8);
}

#[test]
fn a_state_that_does_not_fit_names_the_key() {
    let mut state =
        fer_model::checkpoint::read_safetensors(&fixture("tiny_h4_c7/weights.safetensors"))
            .unwrap();
    state.insert(
        "cat_head1.sa.conv_3x3.0.weight".into(),
        Tensor::zeros((5, 5, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = crate::common::scratch("misfit").join("misfit.safetensors");
    candle_core::safetensors::save(&state, &path).unwrap();
    let e = Predictor::load(&path, None, None)
        .err()
        .expect("a misfit state is an error");
    let e = format!("{e:#}");
    assert!(
        e.contains("key cat_head1.sa.conv_3x3.0.weight: checkpoint shape [5, 5, 3, 3]"),
        "{e}"
    );
}
