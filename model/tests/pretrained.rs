//! Pretrained weights in the formats DAN, EAC and torchvision users have (`fixtures/pretrained/`,
//! written by PyTorch and by Python 2-style pickling, see its `generate.py`): each loads, gives
//! the features PyTorch computes with the same weights, and trains.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fer_model::backbone::{BackboneConfig, ResNetConfig};
use fer_model::checkpoint::load_pretrained_backbone;
use fer_model::config::{ModelSection, RunConfig};
use fer_model::data::synth::{ClassBalance, SynthConfig};
use fer_model::data::DataSpec;
use fer_model::weights::{read_state_dict, Container};
use fer_model::{DanConfig, DanEac};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pretrained")
}

fn manifest() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap()
}

fn resnet(net: &Value) -> ResNetConfig {
    let arr = |k: &str| -> [usize; 4] {
        let v: Vec<usize> = net[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        v.try_into().unwrap()
    };
    ResNetConfig {
        widths: arr("widths"),
        blocks: arr("blocks"),
        bottleneck: net["bottleneck"].as_bool().unwrap(),
        caffe: net["caffe"].as_bool().unwrap_or(false),
        ..ResNetConfig::resnet18()
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn net_for(backbone: &BackboneConfig) -> DanEac {
    DanEac::new(
        &DanConfig {
            backbone: backbone.clone(),
            heads: 2,
            classes: 7,
        },
        7,
        &Device::Cpu,
        DType::F32,
        5,
    )
    .unwrap()
}

#[test]
fn every_format_loads_and_gives_the_features_pytorch_computes() {
    let expected =
        candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap();
    let x = &expected["x"];
    let m = manifest();
    let mut checked = 0;
    for (name, net) in m["networks"].as_object().unwrap() {
        let backbone = BackboneConfig::ResNet(resnet(net));
        let want = flat(&expected[name.as_str()]);
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        for file in net["files"].as_array().unwrap() {
            let path = dir().join(file.as_str().unwrap());
            let dan = net_for(&backbone);
            load_pretrained_backbone(&path, &backbone, &dan)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let got = flat(&dan.dan.forward(x, false).unwrap().feat);
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f64, f64::max)
                / scale;
            // Float32 through up to 16 blocks against a float64 reference (the backbone
            // fixtures allow 5e-5); a wrong layout or a misplaced tensor is off by O(1).
            assert!(
                err < 1e-4,
                "{}: features differ from PyTorch's by {err:.2e} of the largest",
                path.display()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "every fixture file was checked");
}

#[test]
fn the_reader_says_where_it_found_the_state_dict() {
    let r = read_state_dict(&dir().join("resnet18_state_dict_module.pth")).unwrap();
    assert_eq!(r.container, Container::TorchZip);
    assert_eq!(r.found_at, "state_dict");
    assert!(r.stripped_module_prefix);
    assert!(r.tensors.contains_key("layer4.1.bn2.running_var"));
    assert_eq!(r.tensors["bn1.num_batches_tracked"].dtype(), DType::I64);
    let r = read_state_dict(&dir().join("resnet18_state_dict_legacy.pth")).unwrap();
    assert_eq!(r.container, Container::TorchLegacy);
    assert_eq!(r.found_at, "state_dict");
    assert!(!r.stripped_module_prefix);
    let r = read_state_dict(&dir().join("resnet50_torchvision.pth")).unwrap();
    assert_eq!(
        (r.container, r.found_at.as_str()),
        (Container::TorchZip, "")
    );
    assert_eq!(r.tensors["fc.weight"].dims(), &[100, 128]);
    for f in [
        "resnet50_eac_py2.pkl",
        "resnet50_eac_proto0.pkl",
        "resnet50_eac_py3.pkl",
    ] {
        let r = read_state_dict(&dir().join(f)).unwrap();
        assert_eq!(r.container, Container::NumpyPickle, "{f}");
        assert!(r
            .tensors
            .keys()
            .all(|k| !k.ends_with("num_batches_tracked")));
        assert_eq!(r.tensors["conv1.weight"].dims(), &[4, 3, 7, 7], "{f}");
    }
}

#[test]
fn eac_weights_refuse_the_torchvision_layout_and_bad_files_are_named() {
    let net = &manifest()["networks"]["resnet50_eac"];
    let torchvision_layout = BackboneConfig::ResNet(ResNetConfig {
        caffe: false,
        ..resnet(net)
    });
    let path = dir().join("resnet50_eac_py2.pkl");
    let e = load_pretrained_backbone(&path, &torchvision_layout, &net_for(&torchvision_layout))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("resnet50_caffe") && msg.contains("resnet50_eac_py2.pkl"),
        "{msg}"
    );

    let tmp = std::env::temp_dir().join(format!("fer-weights-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // A truncated pickle: an error naming the file and the format, not a panic.
    let bytes = std::fs::read(&path).unwrap();
    let cut = tmp.join("cut.pkl");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = format!("{:#}", read_state_dict(&cut).err().unwrap());
    assert!(
        msg.contains("cut.pkl") && msg.contains("pickle of numpy arrays"),
        "{msg}"
    );
    // A pickle holding no tensors: the top-level keys are listed.
    let none = tmp.join("none.pkl");
    std::fs::write(&none, b"\x80\x02}q\x00X\x03\x00\x00\x00fooq\x01K\x01s.").unwrap();
    let msg = format!("{:#}", read_state_dict(&none).err().unwrap());
    assert!(
        msg.contains("no state dict found") && msg.contains("foo (1)"),
        "{msg}"
    );
    // Not a weights file at all.
    let text = tmp.join("notes.txt");
    std::fs::write(&text, "hello").unwrap();
    let msg = format!("{:#}", read_state_dict(&text).err().unwrap());
    assert!(msg.contains("not a weights file"), "{msg}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A run config that trains `backbone` from `pretrained` for one short epoch.
fn run_from(backbone: BackboneConfig, pretrained: PathBuf) -> RunConfig {
    let mut c = RunConfig::embedded_default();
    c.model = ModelSection {
        backbone,
        pretrained: Some(pretrained),
        heads: 2,
        classes: 7,
        num_centers: None,
    };
    c.data = DataSpec::Synthetic(SynthConfig {
        difficulty: 0.2,
        image_size: 32,
        train: 32,
        test: 14,
        seed: 3,
        balance: ClassBalance::Balanced,
    });
    c.input_size = 32;
    c.batch = 8;
    c.epochs = 1;
    c.schedule = fer_model::optim::Schedule::Constant;
    c.validation = None;
    c
}

#[test]
fn training_starts_from_each_format_and_eac_weights_select_the_caffe_layout() {
    let m = manifest();
    for (name, file) in [
        ("resnet18", "resnet18_state_dict_module.pth"),
        ("resnet50", "resnet50_torchvision.pth"),
        ("resnet50_eac", "resnet50_eac_py2.pkl"),
    ] {
        // As a user writes it: the EAC pickle with a plain bottleneck ResNet config.
        let backbone = BackboneConfig::ResNet(ResNetConfig {
            caffe: false,
            ..resnet(&m["networks"][name])
        });
        let config = run_from(backbone, dir().join(file));
        let resolved = config.model.dan_config().backbone;
        let BackboneConfig::ResNet(r) = &resolved else {
            unreachable!()
        };
        assert_eq!(
            r.caffe,
            name == "resnet50_eac",
            "{name}: layout chosen by the file"
        );
        let out =
            std::env::temp_dir().join(format!("fer-pretrained-run-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut epochs = 0;
        fer_model::trainer::run(&config, &out, &mut |e| {
            if let fer_model::trainer::Event::Epoch(m) = e {
                assert!(m.loss_total.is_finite(), "{name}: loss {}", m.loss_total);
                epochs += 1;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(epochs, 1, "{name}");
        let meta = fer_model::checkpoint::read_meta(&out.join("checkpoint.safetensors")).unwrap();
        assert_eq!(
            meta.model.backbone, resolved,
            "{name}: the checkpoint records the layout"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}
