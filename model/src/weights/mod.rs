//! Pretrained weight files in the formats users of DAN, EAC and torchvision have:
//!
//! * `torch.save` zip files (PyTorch >= 1.6): torchvision's releases, DAN's checkpoints;
//! * `torch.save` legacy files (PyTorch < 1.6, `_use_new_zipfile_serialization=False`), the
//!   format of many face-recognition releases of that time;
//! * plain pickles of numpy arrays, from Python 2 or 3 (EAC's VGGFace2 `resnet50_ft_weight.pkl`,
//!   read as `pickle.load(f, encoding='latin1')` reads it);
//! * safetensors.
//!
//! Inside any of them the state dict may be the top-level dict or sit under `state_dict` (DAN's
//! `resnet18_msceleb.pth`), `model_state_dict` (DAN's releases), `model` or `net`; a
//! `module.` prefix on every key (saved from `nn.DataParallel`) is removed.

pub mod known;
pub mod pickle;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use pickle::Value;

/// The container a weights file came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    TorchZip,
    TorchLegacy,
    /// A plain pickle of numpy arrays (EAC's VGGFace2 weights).
    NumpyPickle,
    Safetensors,
}

impl Container {
    pub fn describe(self) -> &'static str {
        match self {
            Container::TorchZip => "PyTorch zip checkpoint",
            Container::TorchLegacy => "PyTorch legacy (pre-1.6) checkpoint",
            Container::NumpyPickle => "pickle of numpy arrays",
            Container::Safetensors => "safetensors file",
        }
    }
}

/// The tensors of a weights file's state dict, on the CPU (floating point as f32, integers as
/// i64), and where they were found.
pub struct StateDict {
    pub tensors: HashMap<String, Tensor>,
    pub container: Container,
    /// The key path of the state dict inside the file (`state_dict`, ...), empty at the top.
    pub found_at: String,
    /// Whether a `module.` prefix was removed.
    pub stripped_module_prefix: bool,
}

impl StateDict {
    /// Where the tensors came from, e.g. "PyTorch zip checkpoint, state dict in 'state_dict'
    /// ('module.' prefixes removed)".
    pub fn origin(&self) -> String {
        format!(
            "{}, state dict in {}{}",
            self.container.describe(),
            if self.found_at.is_empty() {
                "the top-level dict".to_string()
            } else {
                format!("'{}'", self.found_at)
            },
            if self.stripped_module_prefix {
                " ('module.' prefixes removed)"
            } else {
                ""
            }
        )
    }
}

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// PyTorch's legacy magic number 0x1950a86a20f9469cfc6c, pickled as LONG1 after PROTO 2.
const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19";

/// Which container a file is, from its first bytes (and the safetensors header).
pub fn sniff(path: &Path) -> Result<Container> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head)?;
    let head = &head[..n];
    if head.starts_with(ZIP_MAGIC) {
        return Ok(Container::TorchZip);
    }
    if head.starts_with(LEGACY_MAGIC) {
        return Ok(Container::TorchLegacy);
    }
    if head.first() == Some(&0x80) || head.first().is_some_and(|c| b"(}]cd".contains(c)) {
        return Ok(Container::NumpyPickle);
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if n >= 9 && head[8] == b'{' {
        return Ok(Container::Safetensors);
    }
    bail!(
        "{}: not a weights file this build reads (expected a PyTorch checkpoint, a pickle of numpy arrays or safetensors)",
        path.display()
    )
}

/// Read the state dict of a weights file in any supported format.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    ensure!(path.is_file(), "{}: no such file", path.display());
    let container = sniff(path)?;
    let at = |e: anyhow::Error| e.context(format!("{} ({})", path.display(), container.describe()));
    if container == Container::Safetensors {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading safetensors {}", path.display()))?;
        return finish(map.into_iter().collect(), container, String::new());
    }
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (root, storages) = match container {
        Container::TorchZip => read_torch_zip(&data).map_err(at)?,
        Container::TorchLegacy => read_torch_legacy(&data).map_err(at)?,
        _ => {
            let mut pos = 0;
            (pickle::load(&data, &mut pos).map_err(at)?, Storages::None)
        }
    };
    let (dict, found_at) = find_state_dict(&root).map_err(at)?;
    let mut tensors = HashMap::new();
    for (k, v) in dict.borrow().iter() {
        let name = k
            .text()
            .with_context(|| format!("a state-dict key is {}, not text", k.describe()))
            .map_err(at)?;
        let t = to_tensor(v, &storages)
            .with_context(|| format!("tensor {name}"))
            .map_err(at)?;
        tensors.insert(name, t);
    }
    finish(tensors, container, found_at)
}

fn finish(
    mut tensors: HashMap<String, Tensor>,
    container: Container,
    found_at: String,
) -> Result<StateDict> {
    let stripped = !tensors.is_empty() && tensors.keys().all(|k| k.starts_with("module."));
    if stripped {
        tensors = tensors
            .into_iter()
            .map(|(k, t)| (k["module.".len()..].to_string(), t))
            .collect();
    }
    Ok(StateDict {
        tensors,
        container,
        found_at,
        stripped_module_prefix: stripped,
    })
}

/// Keys under which checkpoints nest their state dict, in the order they are tried.
const NESTED_KEYS: [&str; 4] = ["model_state_dict", "state_dict", "model", "net"];

type Items = std::rc::Rc<std::cell::RefCell<Vec<(Value, Value)>>>;

/// The state dict inside a file's top-level object: the object itself when it is a dict of
/// tensors, else the first of `NESTED_KEYS` that holds one.
fn find_state_dict(root: &Value) -> Result<(Items, String)> {
    let Value::Dict(d) = root else {
        bail!("the file holds {}, not a dict", root.describe());
    };
    let holds_tensors = |items: &Items| {
        let items = items.borrow();
        !items.is_empty() && items.iter().all(|(_, v)| is_array(v))
    };
    if holds_tensors(d) {
        return Ok((d.clone(), String::new()));
    }
    for key in NESTED_KEYS {
        let found = d
            .borrow()
            .iter()
            .find(|(k, _)| k.text().as_deref() == Some(key))
            .map(|(_, v)| v.clone());
        if let Some(Value::Dict(inner)) = found {
            if holds_tensors(&inner) {
                return Ok((inner, key.to_string()));
            }
        }
    }
    let keys: Vec<String> = d
        .borrow()
        .iter()
        .map(|(k, v)| {
            format!(
                "{} ({})",
                k.text().unwrap_or_else(|| k.describe()),
                v.describe()
            )
        })
        .take(12)
        .collect();
    bail!(
        "no state dict found: the top-level dict has [{}]; expected a dict of tensors, or one under {}",
        keys.join(", "),
        NESTED_KEYS.map(|k| format!("'{k}'")).join(", ")
    )
}

fn callable_name(v: &Value) -> Option<String> {
    match v {
        Value::Object(o) => o.borrow().callable.global_name(),
        _ => None,
    }
}

/// A torch tensor or parameter, or a numpy array?
fn is_array(v: &Value) -> bool {
    callable_name(v).is_some_and(|n| {
        n.starts_with("torch._utils._rebuild")
            || n.ends_with("multiarray._reconstruct")
            || n.ends_with("numeric._frombuffer")
    })
}

/// Where the bytes of PyTorch storages are.
enum Storages<'a> {
    None,
    /// Zip entries `<prefix>data/<key>`, read.
    Zip(HashMap<String, Vec<u8>>),
    /// Legacy: each storage's (start, length) inside the file's bytes.
    Legacy(HashMap<String, (usize, usize)>, &'a [u8]),
}

impl Storages<'_> {
    fn bytes(&self, key: &str) -> Result<&[u8]> {
        match self {
            Storages::None => bail!("a torch storage in a file without storages"),
            Storages::Zip(m) => m
                .get(key)
                .map(|v| v.as_slice())
                .with_context(|| format!("storage {key} is not in the archive")),
            Storages::Legacy(m, data) => {
                let &(at, len) = m
                    .get(key)
                    .with_context(|| format!("storage {key} is not in the file"))?;
                Ok(&data[at..at + len])
            }
        }
    }
}

fn read_torch_zip(data: &[u8]) -> Result<(Value, Storages<'static>)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(data)).context("not a zip archive")?;
    let names: Vec<String> = zip
        .file_names()
        .map(|s| s.map(|s| s.to_string()))
        .collect::<Result<_, _>>()
        .context("reading the archive's file names")?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .context("no data.pkl in the archive (not a torch.save file)")?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let mut read = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .with_context(|| format!("zip entry {name}"))?;
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf)
            .with_context(|| format!("zip entry {name}"))?;
        Ok(buf)
    };
    let pickled = read(&pkl)?;
    let mut storages = HashMap::new();
    let data_dir = format!("{prefix}data/");
    for n in &names {
        if let Some(key) = n.strip_prefix(&data_dir) {
            if !key.is_empty() && !key.contains('/') {
                storages.insert(key.to_string(), read(n)?);
            }
        }
    }
    let mut pos = 0;
    let root = pickle::load(&pickled, &mut pos)?;
    Ok((root, Storages::Zip(storages)))
}

/// PyTorch's legacy format: pickles of the magic number, protocol version and system info, the
/// object (storages as persistent ids), the list of storage keys, then each storage as an
/// 8-byte element count followed by its bytes.
fn read_torch_legacy(data: &[u8]) -> Result<(Value, Storages<'_>)> {
    let mut pos = 0;
    for what in ["magic number", "protocol version", "system info"] {
        pickle::load(data, &mut pos).with_context(|| format!("legacy header: {what}"))?;
    }
    let root = pickle::load(data, &mut pos)?;
    let keys = pickle::load(data, &mut pos).context("legacy storage key list")?;
    let keys = keys
        .tuple_items()
        .context("legacy storage keys: not a list")?;
    // Element sizes come from the storage types named in the object's persistent ids.
    let mut elem = HashMap::new();
    collect_storage_types(&root, &mut elem, 0);
    let mut at = HashMap::new();
    for k in keys {
        let key = k.text().context("legacy storage key: not text")?;
        let size = *elem
            .get(&key)
            .with_context(|| format!("storage {key} has no type in the object"))?;
        ensure!(pos + 8 <= data.len(), "storage {key}: truncated file");
        let numel = u64::from_le_bytes(data[pos..pos + 8].try_into().expect("8")) as usize;
        pos += 8;
        let len = numel
            .checked_mul(size)
            .filter(|&l| pos + l <= data.len())
            .with_context(|| format!("storage {key}: {numel} elements run past the end"))?;
        at.insert(key, (pos, len));
        pos += len;
    }
    Ok((root, Storages::Legacy(at, data)))
}

/// Storage key -> element size, from every persistent id in `v` (a state dict nests a few
/// levels; deeper structures are not searched, so a hostile file cannot exhaust the stack).
fn collect_storage_types(v: &Value, out: &mut HashMap<String, usize>, depth: usize) {
    if depth > 64 {
        return;
    }
    let mut walk = |x: &Value| collect_storage_types(x, out, depth + 1);
    match v {
        Value::Persistent(id) => {
            if let Some((_, key, dtype)) = storage_id(id).ok().flatten() {
                out.insert(key, dtype.size_in_bytes());
            }
        }
        Value::Tuple(t) => t.iter().for_each(&mut walk),
        Value::List(l) => l.borrow().iter().for_each(&mut walk),
        Value::Dict(d) => d.borrow().iter().for_each(|(_, x)| walk(x)),
        Value::Object(o) => {
            let o = o.borrow();
            walk(&o.args);
            if let Some(s) = &o.state {
                walk(s);
            }
        }
        _ => {}
    }
}

/// A storage's persistent id `('storage', torch.FloatStorage, key, location, numel[, view])`:
/// (view offset in elements, key, dtype).
fn storage_id(id: &Value) -> Result<Option<(usize, String, DType)>> {
    let Some(items) = id.tuple_items() else {
        return Ok(None);
    };
    if items.first().and_then(|v| v.text()).as_deref() != Some("storage") || items.len() < 5 {
        return Ok(None);
    }
    let ty = items[1]
        .global_name()
        .context("storage type is not a class")?;
    let dtype = storage_dtype(&ty)?;
    let key = items[2].text().context("storage key is not text")?;
    // Legacy views: (view key, offset, size) into the root storage.
    let offset = match items.get(5) {
        Some(Value::Tuple(v)) if v.len() == 3 => v[1].as_int().unwrap_or(0) as usize,
        _ => 0,
    };
    Ok(Some((offset, key, dtype)))
}

fn storage_dtype(class: &str) -> Result<DType> {
    let name = class.rsplit('.').next().unwrap_or(class);
    Ok(match name {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ByteStorage" | "BoolStorage" => DType::U8,
        other => bail!("storage type {other} is not supported"),
    })
}

/// A tuple of non-negative ints (a shape, a stride).
fn sizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.tuple_items()
        .with_context(|| format!("{what} is not a tuple"))?
        .iter()
        .map(|d| match d.as_int() {
            Some(x) if x >= 0 => Ok(x as usize),
            _ => bail!("{what}: {} is not a size", d.describe()),
        })
        .collect()
}

/// One tensor of the state dict: a torch tensor (from its storage) or a numpy array; floating
/// types become f32, integer types i64.
fn to_tensor(v: &Value, storages: &Storages) -> Result<Tensor> {
    let Value::Object(o) = v else {
        bail!("{} is not a tensor", v.describe());
    };
    let o = o.borrow();
    let name = o.callable.global_name().unwrap_or_default();
    let args = o.args.tuple_items().unwrap_or_default();
    if name == "torch._utils._rebuild_parameter"
        || name == "torch._utils._rebuild_parameter_with_state"
    {
        return to_tensor(
            args.first().context("_rebuild_parameter without data")?,
            storages,
        );
    }
    if name.starts_with("torch._utils._rebuild_tensor") {
        ensure!(args.len() >= 4, "{name} with {} arguments", args.len());
        let Value::Persistent(id) = &args[0] else {
            bail!("{name}: the storage is not a persistent id");
        };
        let (view, key, dtype) = storage_id(id)?.context("unknown persistent id")?;
        let offset = match args[1].as_int() {
            Some(o) if o >= 0 => view.checked_add(o as usize),
            _ => None,
        }
        .with_context(|| format!("storage offset {} is not a size", args[1].describe()))?;
        let shape = sizes(&args[2], "size")?;
        let stride = sizes(&args[3], "stride")?;
        return strided(storages.bytes(&key)?, dtype, offset, &shape, &stride);
    }
    if name.ends_with("multiarray._reconstruct") {
        let state = o.state.as_ref().context("numpy array without state")?;
        let s = state
            .tuple_items()
            .context("numpy array state is not a tuple")?;
        // (version, shape, dtype, is_fortran, data); very old pickles omit the version.
        let s = if s.len() == 5 { &s[1..] } else { &s[..] };
        ensure!(s.len() == 4, "numpy array state of {} items", s.len());
        let shape = sizes(&s[0], "numpy shape")?;
        let (dtype, big_endian) = numpy_dtype(&s[1])?;
        let fortran = matches!(s[2], Value::Bool(true)) || s[2].as_int() == Some(1);
        let Value::Bytes(bytes) = &s[3] else {
            bail!(
                "numpy array data is {} (object arrays are not weights)",
                s[3].describe()
            );
        };
        return numpy_array(bytes, dtype, big_endian, &shape, fortran);
    }
    if name.ends_with("numeric._frombuffer") {
        // numpy >= 1.16 at protocol 5: _frombuffer(buffer, dtype, shape, order).
        ensure!(args.len() == 4, "_frombuffer with {} arguments", args.len());
        let Value::Bytes(bytes) = &args[0] else {
            bail!("_frombuffer of {}", args[0].describe());
        };
        let (dtype, big_endian) = numpy_dtype(&args[1])?;
        let shape = sizes(&args[2], "numpy shape")?;
        let fortran = args[3].text().as_deref() == Some("F");
        return numpy_array(bytes, dtype, big_endian, &shape, fortran);
    }
    bail!("{} is not a tensor or numpy array", v.describe())
}

/// A numpy dtype object `numpy.dtype('f4', ...)` with its BUILD state `(3, '<', ...)`:
/// (element type, big-endian).
fn numpy_dtype(v: &Value) -> Result<(DType, bool)> {
    let Value::Object(o) = v else {
        bail!("numpy dtype is {}", v.describe());
    };
    let o = o.borrow();
    let descr = o
        .args
        .tuple_items()
        .and_then(|a| a.first().and_then(|d| d.text()))
        .context("numpy dtype without a type code")?;
    let order = o
        .state
        .as_ref()
        .and_then(|s| s.tuple_items())
        .and_then(|s| s.get(1).and_then(|b| b.text()));
    let code = descr.trim_start_matches(['<', '>', '=', '|']);
    let dtype = match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "u1" | "b1" => DType::U8,
        other => bail!("numpy dtype {other} is not supported"),
    };
    let big = descr.starts_with('>') || order.as_deref() == Some(">");
    Ok((dtype, big))
}

/// Decode `n` elements of `dtype` from little- or big-endian bytes into f64 (exact for every
/// supported type) for conversion.
fn decode(bytes: &[u8], dtype: DType, big_endian: bool) -> Vec<f64> {
    let size = dtype.size_in_bytes();
    bytes
        .chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            if big_endian {
                b[..size].reverse();
            }
            match dtype {
                DType::F32 => f32::from_le_bytes(b[..4].try_into().expect("4")) as f64,
                DType::F64 => f64::from_le_bytes(b),
                DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
                DType::I64 => i64::from_le_bytes(b) as f64,
                DType::I32 => i32::from_le_bytes(b[..4].try_into().expect("4")) as f64,
                _ => b[0] as f64,
            }
        })
        .collect()
}

/// A CPU tensor of `shape` from values in row-major order: f32 for floating types, i64 else.
fn make_tensor(values: Vec<f64>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    Ok(if dtype.is_float() {
        Tensor::from_vec(
            values.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )?
    } else {
        Tensor::from_vec(
            values.into_iter().map(|v| v as i64).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )?
    })
}

fn numpy_array(
    bytes: &[u8],
    dtype: DType,
    big: bool,
    shape: &[usize],
    fortran: bool,
) -> Result<Tensor> {
    let need = elements(shape).and_then(|n| n.checked_mul(dtype.size_in_bytes()));
    ensure!(
        need == Some(bytes.len()),
        "numpy array of shape {shape:?} needs {} bytes, has {}",
        need.map_or("more than 2^64".to_string(), |b| b.to_string()),
        bytes.len()
    );
    let values = decode(bytes, dtype, big);
    if !fortran {
        return make_tensor(values, dtype, shape);
    }
    // Column-major data: strides grow from the first axis.
    let mut stride = vec![1; shape.len()];
    for i in 1..shape.len() {
        stride[i] = stride[i - 1] * shape[i - 1];
    }
    make_tensor(gather(&values, 0, shape, &stride), dtype, shape)
}

/// The number of elements of `shape`, None when it overflows.
fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The elements of a strided view, in row-major order (every index checked by the caller).
fn gather(values: &[f64], offset: usize, shape: &[usize], stride: &[usize]) -> Vec<f64> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let at = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(values[at]);
        for ax in (0..shape.len()).rev() {
            idx[ax] += 1;
            if idx[ax] < shape[ax] {
                break;
            }
            idx[ax] = 0;
        }
    }
    out
}

/// A (possibly non-contiguous) view of a torch storage as a row-major tensor.
fn strided(
    storage: &[u8],
    dtype: DType,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Result<Tensor> {
    ensure!(
        shape.len() == stride.len(),
        "size and stride differ in length"
    );
    let size = dtype.size_in_bytes();
    let past = || {
        anyhow::anyhow!(
            "a view of shape {shape:?}, stride {stride:?} at offset {offset} does not fit its storage of {} bytes",
            storage.len()
        )
    };
    let n = elements(shape).ok_or_else(past)?;
    // The last element's index + 1, in checked arithmetic: a corrupt file must not overflow.
    let end = if n == 0 {
        Some(offset)
    } else {
        shape
            .iter()
            .zip(stride)
            .try_fold(offset.checked_add(1).ok_or_else(past)?, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            })
    }
    .filter(|&e| e.checked_mul(size).is_some_and(|b| b <= storage.len()))
    .ok_or_else(past)?;
    // A broadcast view (stride 0) may hold more elements than its storage, but not without bound.
    ensure!(
        n.saturating_mul(size) <= storage.len().saturating_mul(64).max(1 << 20),
        "a view of shape {shape:?} is far larger than its storage of {} bytes",
        storage.len()
    );
    let values = decode(&storage[offset * size..end * size], dtype, false);
    // Row-major strides (the usual case): the decoded span is the tensor, in order.
    let mut expect = 1;
    let row_major = shape.iter().zip(stride).rev().all(|(&d, &s)| {
        let ok = d == 1 || s == expect;
        expect *= d;
        ok
    });
    if row_major && values.len() == n {
        return make_tensor(values, dtype, shape);
    }
    make_tensor(gather(&values, 0, shape, stride), dtype, shape)
}
