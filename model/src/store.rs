//! The named state of a model: trainable parameters and buffers (BN running statistics and
//! counters), in PyTorch's registration order, under PyTorch's state-dict key names.
//!
//! Modules keep clones of the `Var`s they register (a `Var` shares its storage), so loading a
//! state here updates every module in place.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

/// What an entry is: optimised by gradient, or state updated by the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Param,
    Buffer,
}

#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub var: Var,
    pub kind: EntryKind,
}

/// Every tensor of a model and its losses, keyed by state-dict name.
pub struct ParamStore {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    device: Device,
    dtype: DType,
    rng: ChaCha8Rng,
}

impl ParamStore {
    /// A store whose initial values are drawn from a generator seeded by `seed` (Candle's own
    /// CPU generator cannot be seeded).
    pub fn new(device: &Device, dtype: DType, seed: u64) -> Self {
        Self {
            entries: Vec::new(),
            index: HashMap::new(),
            device: device.clone(),
            dtype,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn register(&mut self, name: String, t: Tensor, kind: EntryKind) -> anyhow::Result<Var> {
        if self.index.contains_key(&name) {
            bail!("duplicate state entry {name}");
        }
        let var = Var::from_tensor(&t)?;
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(Entry {
            name,
            var: var.clone(),
            kind,
        });
        Ok(var)
    }

    fn float_tensor(&self, data: Vec<f64>, shape: &[usize]) -> anyhow::Result<Tensor> {
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    /// A trainable parameter initialised by `init`.
    pub fn param(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        init: Init,
    ) -> anyhow::Result<Var> {
        let n: usize = shape.iter().product();
        let data = init.sample(n, &mut self.rng);
        let t = self.float_tensor(data, shape)?;
        self.register(name.into(), t, EntryKind::Param)
    }

    /// A float buffer filled with `value` (BN running mean 0 / running var 1).
    pub fn buffer(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        value: f64,
    ) -> anyhow::Result<Var> {
        let n: usize = shape.iter().product();
        let t = self.float_tensor(vec![value; n], shape)?;
        self.register(name.into(), t, EntryKind::Buffer)
    }

    /// A 0-d int64 counter buffer (`num_batches_tracked`).
    pub fn counter(&mut self, name: impl Into<String>) -> anyhow::Result<Var> {
        let t = Tensor::new(0i64, &self.device)?;
        self.register(name.into(), t, EntryKind::Buffer)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Trainable parameters in registration order.
    pub fn params(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.kind == EntryKind::Param)
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.entries[i].var)
    }

    pub fn num_trainable(&self) -> usize {
        self.params().map(|e| e.var.elem_count()).sum()
    }

    /// A snapshot of every entry (detached copies), keyed by name.
    pub fn state(&self) -> anyhow::Result<BTreeMap<String, Tensor>> {
        self.entries
            .iter()
            .map(|e| Ok((e.name.clone(), e.var.as_tensor().copy()?)))
            .collect()
    }

    /// Load a state strictly: every entry must be present with its shape, and nothing else
    /// may be there except names matched by `ignore` (e.g. a classifier being replaced).
    /// Values are converted to the store's dtype (counters stay int64).
    pub fn load_state(
        &self,
        state: &HashMap<String, Tensor>,
        source: &str,
        ignore: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        check_keys(self, state, source, &|_| true, ignore)?;
        for e in &self.entries {
            let t = &state[&e.name];
            let target = e.var.dtype();
            let t = t.to_dtype(target)?.to_device(&self.device)?;
            e.var
                .set(&t)
                .with_context(|| format!("{source}: setting {}", e.name))?;
        }
        Ok(())
    }
}

impl ParamStore {
    /// Strict loading of the entries `select` picks (e.g. a pretrained backbone): each must be in
    /// `state` with its shape, and `state` may hold nothing else.
    pub fn load_subset(
        &self,
        state: &HashMap<String, Tensor>,
        source: &str,
        select: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        check_keys(self, state, source, select, &|_| false)?;
        for e in self.entries.iter().filter(|e| select(&e.name)) {
            let t = state[&e.name]
                .to_dtype(e.var.dtype())?
                .to_device(&self.device)?;
            e.var
                .set(&t)
                .with_context(|| format!("{source}: setting {}", e.name))?;
        }
        Ok(())
    }
}

/// The missing / unexpected / mis-shaped key check of strict loading, with both shapes named,
/// over the entries `select` picks.
fn check_keys(
    store: &ParamStore,
    state: &HashMap<String, Tensor>,
    source: &str,
    select: &dyn Fn(&str) -> bool,
    ignore: &dyn Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for e in store.entries.iter().filter(|e| select(&e.name)) {
        match state.get(&e.name) {
            None => problems.push(format!(
                "missing key {} (expected shape {:?})",
                e.name,
                e.var.dims()
            )),
            Some(t) if t.dims() != e.var.dims() => problems.push(format!(
                "key {}: checkpoint shape {:?}, model expects {:?}",
                e.name,
                t.dims(),
                e.var.dims()
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<_> = state
        .iter()
        .filter(|(k, _)| !(ignore(k) || store.index.contains_key(*k) && select(k)))
        .map(|(k, t)| format!("unexpected key {k} (shape {:?})", t.dims()))
        .collect();
    unexpected.sort();
    problems.extend(unexpected);
    if !problems.is_empty() {
        let shown = problems.len().min(20);
        bail!(
            "{source}: state does not fit the model ({} problem(s)):\n  {}{}",
            problems.len(),
            problems[..shown].join("\n  "),
            if problems.len() > shown {
                "\n  ..."
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// How a parameter is initialised (PyTorch's rules, with our own seeded generator).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Const(f64),
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    /// `kaiming_normal_(mode='fan_out', nonlinearity='relu')`: std = sqrt(2 / fan_out).
    KaimingFanOut {
        fan_out: usize,
    },
}

impl Init {
    fn sample(self, n: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        match self {
            Init::Const(v) => vec![v; n],
            Init::Normal { std } => {
                let d = Normal::new(0.0, std).expect("finite std");
                (0..n).map(|_| d.sample(rng)).collect()
            }
            Init::Uniform { bound } => {
                let d = Uniform::new_inclusive(-bound, bound).expect("finite bound");
                (0..n).map(|_| d.sample(rng)).collect()
            }
            Init::KaimingFanOut { fan_out } => Init::Normal {
                std: (2.0 / fan_out as f64).sqrt(),
            }
            .sample(n, rng),
        }
    }
}
