//! Parity with torchvision for every case folder under `fixtures/backbones/<arch>/<case>/` (a new
//! folder is picked up without code changes): the key set and shapes against `keys.json`, weights
//! and input from the formula initialisation (FI), then eval outputs (features, logits, aux logits,
//! feature sums) or one train-mode forward/backward (loss, running stats, gradients) within the
//! case's own tolerances.

// `!(x <= tol)` on purpose: a NaN must fail the comparison.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fi, flat};
use fer_model::backbone::{
    Backbone, BackboneConfig, InceptionConfig, ResNetConfig, TrunkNames, VitConfig,
};
use fer_model::store::ParamStore;
use serde_json::Value;

fn backbone_dir() -> PathBuf {
    common::fixtures_dir().join("backbones")
}

fn cases() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for arch in std::fs::read_dir(backbone_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
    {
        if !arch.is_dir() {
            continue;
        }
        for case in std::fs::read_dir(&arch)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
        {
            if case.join("case.json").is_file() && case.join("expected.safetensors").is_file() {
                out.push(case);
            }
        }
    }
    out.sort();
    out
}

fn config_for(case: &Value) -> BackboneConfig {
    let kw = &case["constructor_kwargs"];
    match case["architecture"].as_str().unwrap() {
        "resnet18" => BackboneConfig::ResNet(ResNetConfig::resnet18()),
        "resnet50" => BackboneConfig::ResNet(ResNetConfig::resnet50()),
        "resnet50_caffe" => BackboneConfig::ResNet(ResNetConfig {
            caffe: true,
            ..ResNetConfig::resnet50()
        }),
        "inception_v3" => BackboneConfig::InceptionV3(InceptionConfig {
            width: 1.0,
            transform_input: kw["transform_input"].as_bool(),
        }),
        "vit_b_32" => BackboneConfig::Vit(VitConfig::vit_b_32()),
        a if a.starts_with("vit") => BackboneConfig::Vit(VitConfig {
            image_size: kw["image_size"].as_u64().unwrap() as usize,
            patch_size: kw["patch_size"].as_u64().unwrap() as usize,
            hidden_dim: kw["hidden_dim"].as_u64().unwrap() as usize,
            num_layers: kw["num_layers"].as_u64().unwrap() as usize,
            num_heads: kw["num_heads"].as_u64().unwrap() as usize,
            mlp_dim: kw["mlp_dim"].as_u64().unwrap() as usize,
        }),
        other => panic!("no backbone for fixture architecture {other}"),
    }
}

fn max_rel(got: &[f64], exp: &[f64]) -> f64 {
    assert_eq!(got.len(), exp.len());
    let scale = exp.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(exp)
        .map(|(g, e)| (g - e).abs())
        .fold(0f64, f64::max)
        / scale
}

fn l2_rel(got: &[f64], exp: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(exp)
        .map(|(g, e)| (g - e).powi(2))
        .sum::<f64>()
        .sqrt();
    num / exp.iter().map(|e| e * e).sum::<f64>().sqrt()
}

struct Built {
    store: ParamStore,
    net: Backbone,
}

/// The torchvision model with FI weights, after checking its keys and shapes against keys.json.
fn build(case_dir: &Path, case: &Value) -> Built {
    let config = config_for(case);
    let mut store = ParamStore::new(&Device::Cpu, DType::F32, 0);
    let net = Backbone::new(&mut store, "", TrunkNames::Torchvision, &config, Some(1000)).unwrap();
    let keys: Value = serde_json::from_str(
        &std::fs::read_to_string(case_dir.parent().unwrap().join("keys.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<(String, Vec<usize>)> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_string(),
                k["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    let ours: Vec<(String, Vec<usize>, DType)> = store
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.dims().to_vec(), e.var.dtype()))
        .collect();
    let ours_keys: Vec<(String, Vec<usize>)> = ours
        .iter()
        .map(|(k, s, _)| (k.clone(), s.clone()))
        .collect();
    assert_eq!(
        ours_keys,
        expected,
        "{}: state-dict keys, shapes and order must be torchvision's",
        case_dir.display()
    );
    let salt = case["formula"]["salt"].as_u64().unwrap() as u32;
    // A case that ships its weights (the low-variance tiny ViT: FI scaled) uses them as stored.
    let shipped = case_dir.join("weights.safetensors");
    let state = if shipped.is_file() {
        common::load(&shipped)
    } else {
        fi::state(&ours, salt)
    };
    store.load_state(&state, "FI", &|_| false).unwrap();
    Built { store, net }
}

fn input(case_dir: &Path, case: &Value) -> Tensor {
    let shape: Vec<usize> = case["input"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let x = fi::input(&shape, case["formula"]["salt"].as_u64().unwrap() as u32);
    let v = flat(&x);
    let sum: f64 = v.iter().sum();
    assert!(
        (sum - case["input"]["sum"].as_f64().unwrap()).abs() < 1e-6 * v.len() as f64,
        "{}: FI input sum",
        case_dir.display()
    );
    for (i, e) in case["input"]["first8"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(
            v[i] as f32,
            e.as_f64().unwrap() as f32,
            "FI input element {i}"
        );
    }
    x
}

fn tol(case: &Value, name: &str) -> f64 {
    case["tolerance"][name]["tol"]
        .as_f64()
        .unwrap_or_else(|| panic!("no tolerance for {name}"))
}

fn check_sums(
    case: &Value,
    exp: &HashMap<String, Tensor>,
    prefix: &str,
    features: &[f64],
    fails: &mut Vec<String>,
) {
    let t = tol(
        case,
        if prefix.is_empty() {
            "features_sums"
        } else {
            "train.features_sum"
        },
    );
    let got_sum: f64 = features.iter().sum();
    let got_sq: f64 = features.iter().map(|v| v * v).sum();
    let e = |k: &str| exp.get(&format!("{prefix}{k}")).map(|t| flat(t)[0]);
    let sum_abs = e("features_sum_abs").unwrap_or_else(|| features.iter().map(|v| v.abs()).sum());
    let (es, esq) = (e("features_sum").unwrap(), e("features_sumsq").unwrap());
    let (r1, r2) = ((got_sum - es).abs() / sum_abs, (got_sq - esq).abs() / esq);
    if !(r1 <= t && r2 <= t) {
        fails.push(format!("features sum {r1:.2e} / sumsq {r2:.2e} > {t:.0e}"));
    }
}

fn run_eval(case_dir: &Path, case: &Value, exp: &HashMap<String, Tensor>) -> Vec<String> {
    let b = build(case_dir, case);
    let x = input(case_dir, case);
    let out = b.net.forward_all(&x, false).unwrap();
    let mut fails = Vec::new();
    let mut check = |name: &str, got: &[f64], tolname: &str| {
        let e = flat(&exp[name]);
        let err = max_rel(got, &e);
        let t = tol(case, tolname);
        eprintln!("  {name}: max_rel {err:.2e} (tol {t:.0e})");
        if !(err <= t) {
            fails.push(format!("{name}: max_rel {err:.2e} > {t:.0e}"));
        }
    };
    let feats = flat(&out.features);
    assert_eq!(
        out.features.dims(),
        case["outputs"]["features"]["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
            .as_slice(),
        "feature map shape"
    );
    if exp.contains_key("features") {
        check("features", &feats, "features");
    } else {
        let idx = exp["features_sample_index"].to_vec1::<i64>().unwrap();
        let sample: Vec<f64> = idx.iter().map(|&i| feats[i as usize]).collect();
        check("features_sample", &sample, "features");
        let means = flat(&out.features.mean((2, 3)).unwrap());
        check("features_channel_mean", &means, "features");
    }
    check("logits", &flat(out.logits.as_ref().unwrap()), "logits");
    if exp.contains_key("aux_logits") {
        let aux = out.aux_logits.as_ref().expect("aux logits at this size");
        check("aux_logits", &flat(aux), "aux_logits");
    }
    check_sums(case, exp, "", &feats, &mut fails);
    drop(b.store);
    fails
}

fn run_train(case_dir: &Path, case: &Value, exp: &HashMap<String, Tensor>) -> Vec<String> {
    let b = build(case_dir, case);
    let x = input(case_dir, case);
    let feats = b.net.forward(&x, true).unwrap();
    let loss = feats.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut fails = Vec::new();
    for (name, e) in exp {
        let Some(rest) = name.strip_prefix("train.") else {
            continue;
        };
        let got: Vec<f64> = match rest {
            "loss" => vec![loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()],
            "features_sum" | "features_sumsq" => continue,
            _ if rest.ends_with("num_batches_tracked") => {
                let got = flat(b.store.get(rest).unwrap().as_tensor());
                if got != flat(e) {
                    fails.push(format!("{name}: {got:?}, expected {:?}", flat(e)));
                }
                continue;
            }
            _ if rest.ends_with(".grad") || rest.ends_with(".grad_first64") => {
                let (key, first64) = match rest.strip_suffix(".grad_first64") {
                    Some(k) => (k, true),
                    None => (rest.strip_suffix(".grad").unwrap(), false),
                };
                let var = b
                    .store
                    .get(key)
                    .unwrap_or_else(|| panic!("no parameter {key}"));
                let g = flat(
                    grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{key} has no gradient")),
                );
                if first64 {
                    g[..64].to_vec()
                } else {
                    g
                }
            }
            _ => flat(
                b.store
                    .get(rest)
                    .unwrap_or_else(|| panic!("no state entry {rest}"))
                    .as_tensor(),
            ),
        };
        let e = flat(e);
        let t = tol(case, name);
        let metric = case["tolerance"][name]["metric"].as_str().unwrap();
        let err = if metric == "l2_rel" {
            l2_rel(&got, &e)
        } else {
            max_rel(&got, &e)
        };
        eprintln!("  {name}: {metric} {err:.2e} (tol {t:.0e})");
        if !(err <= t) {
            fails.push(format!("{name}: {metric} {err:.2e} > {t:.0e}"));
        }
    }
    check_sums(case, exp, "train.", &flat(&feats), &mut fails);
    fails
}

#[test]
fn formula_initialisation_check_values() {
    // README §1.1 / §1.6 known answers.
    assert_eq!(fi::fnv1a32(""), 0x811C9DC5);
    assert_eq!(fi::fnv1a32("a"), 0xE40C292C);
    assert_eq!(fi::fnv1a32("foobar"), 0xBF9CF968);
    assert_eq!(
        (0..5).map(|i| fi::k(0xBDCEC494, 0, i)).collect::<Vec<_>>(),
        vec![1579653, 689470, 435465, 1358335, 466106]
    );
    let shapes = HashMap::from([("conv1.weight".to_string(), vec![64, 3, 7, 7])]);
    let v = fi::values("conv1.weight", &[64, 3, 7, 7], &shapes, 0);
    let bits: Vec<u32> = v[..5].iter().map(|x| x.to_bits()).collect();
    assert_eq!(
        bits,
        vec![0x3E07D4C6, 0x3D1B0848, 0xBE0CD19C, 0x3E0824B2, 0xBE0F77D0]
    );
    let v = fi::values("conv1.weight", &[64, 3, 7, 7], &shapes, 1);
    assert_eq!(v[4].to_bits(), 0x3E3E718E);
    let shapes = HashMap::from([("fc.weight".to_string(), vec![1000, 512])]);
    let v = fi::values("fc.weight", &[1000, 512], &shapes, 0);
    assert_eq!(
        (v[511998].to_bits(), v[511999].to_bits()),
        (0x3CD70F50, 0x3CD89280)
    );
    // The tiny ViT ships its FI weights: our generator must reproduce all of them bit for bit.
    let dir = backbone_dir().join("vit_tiny/eval_32x32");
    let shipped = common::load(&dir.join("weights.safetensors"));
    let shapes: Vec<(String, Vec<usize>, DType)> = shipped
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
        .collect();
    let ours = fi::state(&shapes, 0);
    for (k, t) in &shipped {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = ours[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "FI of {k} differs from the shipped weights"
        );
    }
    let x = common::load(&dir.join("inputs.safetensors"))["x"].clone();
    let ours = fi::input(x.dims(), 0);
    assert_eq!(flat(&x), flat(&ours));
}

#[test]
fn torchvision_parity_every_fixture_case() {
    let cases = cases();
    assert!(
        cases.len() >= 9,
        "expected the vendored backbone cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for dir in &cases {
        let case: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let exp = common::load(&dir.join("expected.safetensors"));
        eprintln!("{}", dir.strip_prefix(backbone_dir()).unwrap().display());
        let fails = match case["mode"].as_str().unwrap() {
            "eval" => run_eval(dir, &case, &exp),
            "train" => run_train(dir, &case, &exp),
            m => panic!("unknown mode {m}"),
        };
        failures.extend(fails.into_iter().map(|f| format!("{}: {f}", dir.display())));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn backbone_configs_presets_errors_and_stable_serialisation() {
    let parse = |j: &str| serde_json::from_str::<BackboneConfig>(j);
    // The historical ResNet form round-trips unchanged (trial keys of old sweeps stay valid).
    let old = r#"{"widths":[8,16,32,64],"blocks":[1,1,1,1]}"#;
    let c = parse(old).unwrap();
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        serde_json::from_str::<Value>(old).unwrap()
    );
    assert_eq!(c.out_channels(), 64);
    // Presets expand; width multipliers scale every stage.
    let r50 = parse(r#"{"arch":"resnet50","width":0.125}"#).unwrap();
    assert_eq!(
        r50,
        BackboneConfig::ResNet(ResNetConfig {
            widths: [8, 16, 32, 64],
            blocks: [3, 4, 6, 3],
            bottleneck: true,
            ..ResNetConfig::resnet18()
        })
    );
    assert_eq!(r50.out_channels(), 256);
    assert_eq!(
        parse(r#"{"arch":"resnet18"}"#).unwrap(),
        BackboneConfig::ResNet(ResNetConfig::resnet18())
    );
    let inc = parse(r#"{"arch":"inception_v3"}"#).unwrap();
    assert_eq!(inc.out_channels(), 2048);
    assert_eq!(
        parse(r#"{"arch":"inception_v3","width":0.125}"#)
            .unwrap()
            .out_channels(),
        256
    );
    assert_eq!(inc.feature_size(299).unwrap(), (8, 8));
    assert_eq!(inc.feature_size(160).unwrap(), (3, 3));
    assert_eq!(inc.feature_size(75).unwrap(), (1, 1));
    let e = inc.feature_size(74).unwrap_err().to_string();
    assert!(
        e.contains("74 px is too small") && e.contains("at least 75 px"),
        "{e}"
    );
    let vit = parse(r#"{"arch":"vit_b_32"}"#).unwrap();
    assert_eq!(vit, BackboneConfig::Vit(VitConfig::vit_b_32()));
    assert_eq!(vit.feature_size(224).unwrap(), (7, 7));
    let e = vit.feature_size(112).unwrap_err().to_string();
    assert!(e.contains("image_size is 224"), "{e}");
    let small = parse(r#"{"arch":"vit_b_32","image_size":48,"patch_size":8,"hidden_dim":64,"num_layers":4,"num_heads":4,"mlp_dim":128}"#).unwrap();
    // An expanded preset serialises in its explicit form and parses back to itself.
    assert_eq!(
        parse(&serde_json::to_string(&small).unwrap()).unwrap(),
        small
    );
    assert_eq!(small.feature_size(48).unwrap(), (6, 6));
    // Errors say what was expected.
    let e = parse(r#"{"arch":"resnet51"}"#).unwrap_err().to_string();
    assert!(e.contains("unknown arch \"resnet51\""), "{e}");
    let e = parse(r#"{"arch":"resnet50","widths":[1,2,3,4]}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown field `widths` for arch resnet50"),
        "{e}"
    );
    let e = parse(r#"{"arch":"vit_b_32","depth":3}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `depth`"), "{e}");
    // A run config with a size the backbone cannot take fails validation, naming the field.
    let mut run = fer_model::config::RunConfig::embedded_default();
    run.model.backbone = parse(r#"{"arch":"inception_v3","width":0.125}"#).unwrap();
    let e = run.validate().unwrap_err().to_string();
    assert!(
        e.contains("input_size") && e.contains("at least 75 px"),
        "{e}"
    );
    run.input_size = 80;
    run.validate().unwrap();
    // Forward on a too-small input is an error, not a panic.
    let mut store = ParamStore::new(&Device::Cpu, DType::F32, 0);
    let net = Backbone::new(
        &mut store,
        "",
        TrunkNames::Torchvision,
        &run.model.backbone,
        None,
    )
    .unwrap();
    let x = Tensor::zeros((2, 3, 60, 60), DType::F32, &Device::Cpu).unwrap();
    assert!(net.forward(&x, false).is_err());
}

#[test]
fn pretrained_torchvision_checkpoints_load_into_dan() {
    use fer_model::checkpoint::load_pretrained_backbone;
    let dir = crate::common::scratch("pretrained");
    let vit = BackboneConfig::Vit(VitConfig {
        image_size: 32,
        patch_size: 8,
        hidden_dim: 16,
        num_layers: 2,
        num_heads: 2,
        mlp_dim: 32,
    });
    let resnet = BackboneConfig::ResNet(ResNetConfig {
        widths: [4, 4, 8, 16],
        blocks: [1, 1, 1, 1],
        bottleneck: true,
        ..ResNetConfig::resnet18()
    });
    for (tag, config, probe_tv, probe_dan) in [
        (
            "vit",
            vit,
            "encoder.layers.encoder_layer_1.mlp.3.weight",
            "features.encoder.layers.encoder_layer_1.mlp.3.weight",
        ),
        (
            "resnet",
            resnet,
            "layer3.0.conv3.weight",
            "features.6.0.conv3.weight",
        ),
    ] {
        // A torchvision-format checkpoint (with its classifier), FI-filled so it differs from
        // the network's own initialisation.
        let mut src = ParamStore::new(&Device::Cpu, DType::F32, 0);
        Backbone::new(&mut src, "", TrunkNames::Torchvision, &config, Some(10)).unwrap();
        let shapes: Vec<(String, Vec<usize>, DType)> = src
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.var.dims().to_vec(), e.var.dtype()))
            .collect();
        let state = fi::state(&shapes, 3);
        let save = |state: &HashMap<String, Tensor>| {
            let p = dir.join(format!("{tag}.safetensors"));
            candle_core::safetensors::save(state, &p).unwrap();
            p
        };
        let net = fer_model::DanEac::new(
            &fer_model::DanConfig {
                backbone: config.clone(),
                heads: 2,
                classes: 7,
            },
            7,
            &Device::Cpu,
            DType::F32,
            1,
        )
        .unwrap();
        let path = save(&state);
        load_pretrained_backbone(&path, &config, &net).unwrap();
        assert_eq!(
            flat(net.store.get(probe_dan).unwrap().as_tensor()),
            flat(&state[probe_tv]),
            "{tag}: weights arrive under DAN's names"
        );
        // Without the classifier: fine.
        let mut no_head = state.clone();
        no_head.retain(|k, _| !(k.starts_with("fc.") || k.starts_with("heads.")));
        load_pretrained_backbone(&save(&no_head), &config, &net).unwrap();
        // A missing trunk key, a mis-shaped one, an unexpected one: errors naming them.
        let mut missing = state.clone();
        missing.remove(probe_tv);
        let e = load_pretrained_backbone(&save(&missing), &config, &net)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("missing key {probe_dan}")),
            "{tag}: {e}"
        );
        let mut bad = state.clone();
        bad.insert(
            probe_tv.to_string(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = load_pretrained_backbone(&save(&bad), &config, &net)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("key {probe_dan}: checkpoint shape [3, 3]")),
            "{tag}: {e}"
        );
        let mut extra = state.clone();
        extra.insert(
            "encoder.extra.weight".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = load_pretrained_backbone(&save(&extra), &config, &net)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unexpected key features.encoder.extra.weight"),
            "{tag}: {e}"
        );
    }
}

#[test]
fn resnet_stage_strides_and_stem_pool_change_the_grid_not_the_parameters() {
    let parse = |j: &str| serde_json::from_str::<BackboneConfig>(j).unwrap();
    let tv = parse(r#"{"widths":[8,16,32,64],"blocks":[1,1,1,1]}"#);
    let s8 = parse(r#"{"widths":[8,16,32,64],"blocks":[1,1,1,1],"strides":[1,1,2,1]}"#);
    let no_pool = parse(
        r#"{"widths":[8,16,32,64],"blocks":[1,1,1,1],"strides":[1,2,2,1],"stem_pool":false}"#,
    );
    // torchvision's layout: total stride 32; 56 px -> 2 x 2. Stride 8: 56 px -> 7 x 7.
    assert_eq!(tv.feature_size(56).unwrap(), (2, 2));
    assert_eq!(s8.feature_size(56).unwrap(), (7, 7));
    assert_eq!(s8.feature_size(48).unwrap(), (6, 6));
    assert_eq!(no_pool.feature_size(56).unwrap(), (7, 7));
    // The torchvision layout serialises without the new fields (old trial keys stay valid); the
    // others keep theirs and round-trip.
    assert!(!serde_json::to_string(&tv).unwrap().contains("strides"));
    assert_eq!(parse(&serde_json::to_string(&s8).unwrap()), s8);
    assert_eq!(parse(&serde_json::to_string(&no_pool).unwrap()), no_pool);
    assert!(s8.describe().contains("strides [1, 1, 2, 1]"));
    let bad = serde_json::from_str::<BackboneConfig>(
        r#"{"widths":[8,16,32,64],"blocks":[1,1,1,1],"strides":[1,3,2,1]}"#,
    )
    .unwrap();
    assert!(bad.validate().unwrap_err().to_string().contains("1 or 2"));
    // The presets take the switches too.
    let r50 = parse(r#"{"arch":"resnet50","width":0.125,"strides":[1,2,2,1]}"#);
    assert_eq!(r50.feature_size(64).unwrap(), (4, 4));
    assert_eq!(r50.out_channels(), 256);
    let e = serde_json::from_str::<BackboneConfig>(r#"{"arch":"resnet18","strides":[1,2]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("four stage strides"), "{e}");

    let build = |c: &BackboneConfig| {
        let mut store = ParamStore::new(&Device::Cpu, DType::F32, 0);
        let net = Backbone::new(&mut store, "", TrunkNames::Torchvision, c, None).unwrap();
        let names: Vec<(String, Vec<usize>)> = store
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.var.dims().to_vec()))
            .collect();
        (net, names)
    };
    let (tv_net, tv_names) = build(&tv);
    for c in [&s8, &no_pool] {
        let (net, names) = build(c);
        assert_eq!(names, tv_names, "same state-dict keys and shapes");
        let x = Tensor::ones((2, 3, 56, 56), DType::F32, &Device::Cpu).unwrap();
        let (h, w) = c.feature_size(56).unwrap();
        assert_eq!(net.forward(&x, true).unwrap().dims(), &[2, 64, h, w]);
    }
    let x = Tensor::ones((2, 3, 56, 56), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tv_net.forward(&x, true).unwrap().dims(), &[2, 64, 2, 2]);
}

#[test]
fn zero_init_residual_zeroes_the_last_bn_of_each_branch_and_nothing_else() {
    let parse = |j: &str| serde_json::from_str::<BackboneConfig>(j).unwrap();
    for (plain, zeroed, last) in [
        (
            r#"{"arch":"resnet18","width":0.125}"#,
            r#"{"arch":"resnet18","width":0.125,"zero_init_residual":true}"#,
            ".bn2.weight",
        ),
        (
            r#"{"arch":"resnet50","width":0.0625}"#,
            r#"{"arch":"resnet50","width":0.0625,"zero_init_residual":true}"#,
            ".bn3.weight",
        ),
    ] {
        let state = |c: &BackboneConfig| {
            let mut store = ParamStore::new(&Device::Cpu, DType::F32, 3);
            Backbone::new(&mut store, "", TrunkNames::Torchvision, c, None).unwrap();
            store.state().unwrap()
        };
        let (a, b) = (state(&parse(plain)), state(&parse(zeroed)));
        assert_eq!(a.len(), b.len());
        let mut zeroed_count = 0;
        for (k, ta) in &a {
            let (va, vb) = (flat(ta), flat(&b[k]));
            let is_last = k.starts_with("layer") && k.ends_with(last);
            if is_last {
                zeroed_count += 1;
                assert!(vb.iter().all(|&v| v == 0.0), "{k} starts at 0");
                assert!(
                    va.iter().all(|&v| v == 1.0),
                    "{k} starts at 1 without the switch"
                );
            } else {
                assert_eq!(va, vb, "{k} is unchanged by the switch");
            }
        }
        // One residual branch per block: ResNet-18 has 8 blocks, ResNet-50 16.
        assert_eq!(zeroed_count, if last == ".bn2.weight" { 8 } else { 16 });
        assert!(serde_json::to_string(&parse(zeroed))
            .unwrap()
            .contains("zero_init_residual"));
        assert!(!serde_json::to_string(&parse(plain))
            .unwrap()
            .contains("zero_init"));
    }
}
