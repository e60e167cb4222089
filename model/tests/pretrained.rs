//! Pretrained weights in the formats DAN, EAC and torchvision users have (`fixtures/pretrained/`,
//! written by PyTorch and by Python 2-style pickling, see its `generate.py`): each loads, gives
//! the features PyTorch computes with the same weights, and trains.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fer_model::backbone::{BackboneConfig, InceptionConfig, ResNetConfig};
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

/// The backbone as a user writes it for this network (the EAC pickle's Caffe layout and
/// Inception's transform_input left for the loader's rules to decide).
fn backbone(net: &Value) -> BackboneConfig {
    if net["arch"] == "inception_v3" {
        return BackboneConfig::InceptionV3(InceptionConfig::new(net["width"].as_f64().unwrap()));
    }
    BackboneConfig::ResNet(ResNetConfig {
        caffe: false,
        ..resnet(net)
    })
}

fn section(net: &Value, file: &Path) -> ModelSection {
    ModelSection {
        backbone: backbone(net),
        pretrained: Some(file.to_path_buf()),
        heads: 2,
        classes: 7,
        num_centers: None,
    }
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
    net_with(&DanConfig {
        backbone: backbone.clone(),
        heads: 2,
        classes: 7,
    })
}

fn net_with(config: &DanConfig) -> DanEac {
    DanEac::new(config, 7, &Device::Cpu, DType::F32, 5).unwrap()
}

#[test]
fn every_format_loads_and_gives_the_features_pytorch_computes() {
    let expected =
        candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap();
    let m = manifest();
    let mut checked = 0;
    for (name, net) in m["networks"].as_object().unwrap() {
        let x = match net["input"].as_u64() {
            Some(80) => &expected["inception_v3_x80"],
            _ => &expected["x"],
        };
        let want = flat(&expected[name.as_str()]);
        let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
        for file in net["files"].as_array().unwrap() {
            let path = dir().join(file.as_str().unwrap());
            // The network the run would build: the file's format and presence decide the Caffe
            // layout and transform_input.
            let config = section(net, &path).dan_config();
            let dan = net_with(&config);
            load_pretrained_backbone(&path, &config.backbone, &dan)
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let got = flat(&dan.dan.forward(x, false).unwrap().feat);
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f64, f64::max)
                / scale;
            eprintln!(
                "{}: max error {err:.1e} of the largest feature",
                path.display()
            );
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
    assert_eq!(checked, 7, "every fixture file was checked");
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

    let tmp = crate::common::scratch("weights");
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

/// A run config that trains `model` for one short epoch.
fn run_from(model: ModelSection) -> RunConfig {
    let mut c = RunConfig::embedded_default();
    c.model = model;
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
fn training_starts_from_each_format_and_the_file_decides_layout_and_transform_input() {
    let m = manifest();
    for (name, file) in [
        ("resnet18", "resnet18_state_dict_module.pth"),
        ("resnet50", "resnet50_torchvision.pth"),
        ("resnet50_eac", "resnet50_eac_py2.pkl"),
        ("inception_v3", "inception_v3_imagenet_x16.pth"),
    ] {
        let net = &m["networks"][name];
        let mut config = run_from(section(net, &dir().join(file)));
        if name == "inception_v3" {
            config.input_size = 80;
            if let DataSpec::Synthetic(s) = &mut config.data {
                s.image_size = 80;
            }
        }
        let resolved = config.model.dan_config().backbone;
        match &resolved {
            BackboneConfig::ResNet(r) => {
                assert_eq!(
                    r.caffe,
                    name == "resnet50_eac",
                    "{name}: layout chosen by the file"
                )
            }
            BackboneConfig::InceptionV3(i) => assert_eq!(i.transform_input, Some(true)),
            BackboneConfig::Vit(_) => unreachable!(),
        }
        let out = crate::common::scratch(&format!("pretrained-run-{name}")).join("run");
        let mut epochs = 0;
        fer_model::trainer::run(&config, &out, &mut |e| {
            if let fer_model::trainer::Event::Epoch(m) = e {
                assert!(m.loss.total.is_finite(), "{name}: loss {}", m.loss.total);
                epochs += 1;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(epochs, 1, "{name}");
        let meta = fer_model::checkpoint::read_meta(&out.join("checkpoint.safetensors")).unwrap();
        assert_eq!(
            meta.model.backbone, resolved,
            "{name}: the checkpoint records the network"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
    // Without pretrained weights Inception-v3 keeps torchvision's default (off).
    let mut plain = section(&m["networks"]["inception_v3"], Path::new("x"));
    plain.pretrained = None;
    let BackboneConfig::InceptionV3(i) = plain.dan_config().backbone else {
        unreachable!()
    };
    assert_eq!(i.transform_input, Some(false));
}
