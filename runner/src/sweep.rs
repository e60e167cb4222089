//! Sweep files: a base config with overrides, grid axes (dotted keys), paired `zip` axes,
//! `exclude` / `include`, seeds, resources, a retry policy and the report it feeds. Expansion
//! gives trials, each keyed by a hash of its canonical resolved config and seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use fer_model::config::RunConfig;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// Defaults to the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// A run config (path relative to the sweep file) the trials inherit from.
    pub base: PathBuf,
    /// Keys set on every trial (dotted keys or nested maps).
    #[serde(default)]
    pub overrides: BTreeMap<String, serde_yaml_ng::Value>,
    /// Cartesian product of these axes.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<serde_yaml_ng::Value>>,
    /// Paired axes: within one group, the i-th values go together.
    #[serde(default)]
    pub zip: Vec<BTreeMap<String, Vec<serde_yaml_ng::Value>>>,
    /// Trials whose params match every key of an entry are dropped.
    #[serde(default)]
    pub exclude: Vec<BTreeMap<String, serde_yaml_ng::Value>>,
    /// Extra trials: param sets added on top of the grid (then crossed with the seeds).
    #[serde(default)]
    pub include: Vec<BTreeMap<String, serde_yaml_ng::Value>>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub retry: Retry,
    /// The table and figures this sweep feeds (`fer report NAME`, NAME = the file stem).
    #[serde(default)]
    pub report: Option<crate::report::spec::ReportSpec>,
    /// Named override sets, chosen with `--profile` (e.g. `thesis`: RAF-DB, 224 px, GPU).
    #[serde(default)]
    pub profiles: BTreeMap<String, BTreeMap<String, serde_yaml_ng::Value>>,
    /// Hash the code version into trial keys (a new commit re-runs every trial).
    #[serde(default)]
    pub key_includes_code_version: bool,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Compute threads per CPU trial (RAYON_NUM_THREADS).
    #[serde(default = "one")]
    pub threads_per_trial: usize,
    /// Per trial under Slurm (`--launcher slurm`): GPUs (`--gres=gpu:N`).
    #[serde(default)]
    pub gpus: usize,
    /// CPUs per Slurm task (`--cpus-per-task`; default `threads_per_trial`).
    #[serde(default)]
    pub cpus: Option<usize>,
    /// Memory per Slurm task (`--mem`: a number with an optional K, M, G or T suffix).
    #[serde(default)]
    pub memory: Option<String>,
    /// Time limit per Slurm task (`--time`: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH[:MM[:SS]]`). A task
    /// that reaches it mid-trial is requeued and resumes from the trial's last checkpoint.
    #[serde(default)]
    pub time: Option<String>,
}

fn one() -> usize {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            threads_per_trial: 1,
            gpus: 0,
            cpus: None,
            memory: None,
            time: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Attempts for a trial that crashed or was killed by a signal (setup and data errors: never
    /// retried, and they use up no attempt).
    #[serde(default = "three")]
    pub max_attempts: usize,
    /// Retry a trial whose loss diverged (NaN / inf) like a crash; off by default, as the same
    /// seed diverges again unless something changed.
    #[serde(default)]
    pub divergence: bool,
}

fn three() -> usize {
    3
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            divergence: false,
        }
    }
}

/// One expanded trial.
#[derive(Debug, Clone)]
pub struct Trial {
    pub key: String,
    pub seed: u64,
    /// The swept values (dotted key -> value), seed included.
    pub params: BTreeMap<String, Value>,
    pub config: RunConfig,
    /// The resolved config as canonical JSON (sorted keys).
    pub config_json: Value,
}

pub struct Sweep {
    /// The sweep's name in the store: the file's name, `-profile` appended for a profile.
    pub name: String,
    /// The file's own name (without a profile): the report's name.
    pub base_name: String,
    pub spec: SweepFile,
    pub trials: Vec<Trial>,
}

/// A YAML value as JSON. `.nan` and `.inf` have no JSON form (they would become null): no
/// config field takes them, so they are refused here with the key path that holds them.
fn to_json(v: &serde_yaml_ng::Value) -> anyhow::Result<Value> {
    if let Some(at) = non_finite(v, "") {
        bail!("{at}: .nan / .inf is not a value any config field takes");
    }
    Ok(serde_json::to_value(v)?)
}

/// The dotted path of the first non-finite number in `v`, if any.
fn non_finite(v: &serde_yaml_ng::Value, at: &str) -> Option<String> {
    use serde_yaml_ng::Value as Y;
    let join = |k: &str| {
        if at.is_empty() {
            k.to_string()
        } else {
            format!("{at}.{k}")
        }
    };
    match v {
        Y::Number(n) if n.as_f64().is_some_and(|f| !f.is_finite()) => Some(if at.is_empty() {
            "value".into()
        } else {
            at.to_string()
        }),
        Y::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| non_finite(x, &join(&i.to_string()))),
        Y::Mapping(m) => m.iter().find_map(|(k, x)| {
            let key = k
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{k:?}"));
            non_finite(x, &join(&key))
        }),
        Y::Tagged(t) => non_finite(&t.value, at),
        _ => None,
    }
}

/// Set `dotted.key` in a JSON object tree, creating maps on the way.
fn set_dotted(root: &mut Value, key: &str, value: Value) -> anyhow::Result<()> {
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let obj = cur
            .as_object_mut()
            .with_context(|| format!("key {key}: {} is not a map", parts[..i].join(".")))?;
        if i == parts.len() - 1 {
            obj.insert(part.to_string(), value);
            return Ok(());
        }
        cur = obj
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    Ok(())
}

/// Line and column of `key` inside the `index`-th item of the list under the top-level `section`
/// (`include:` items, block or flow style).
fn locate_list_item_key(
    text: &str,
    section: &str,
    index: usize,
    key: &str,
) -> Option<(usize, usize)> {
    let (start, _) = crate::yaml::locate_path(text, &[section])?;
    let lines: Vec<&str> = text.lines().collect();
    let mut item: Option<usize> = None;
    for (i, l) in lines.iter().enumerate().skip(start) {
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = l.len() - t.len();
        if indent == 0 && !t.starts_with("- ") {
            break; // the next top-level key
        }
        if t.starts_with("- ") {
            item = Some(item.map_or(0, |n| n + 1));
        }
        if item == Some(index) {
            if let Some(c) = l.find(&format!("{key}:")) {
                return Some((i + 1, c + 1));
            }
        } else if item.is_some_and(|n| n > index) {
            break;
        }
    }
    None
}

/// An error at the line and column of a YAML key path (`["overrides", "epochs"]`) in `text`, or
/// at the deepest part of the path that is found.
fn at_path(text: &str, path: &[&str], file: &Path, msg: &str) -> anyhow::Error {
    match crate::yaml::locate_path(text, path) {
        Some((l, c)) => anyhow::anyhow!("{}:{l}:{c}: {msg}", file.display()),
        None => anyhow::anyhow!("{}: {msg}", file.display()),
    }
}

/// FNV-1a 64: a stable hash (std's hasher may change between Rust releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn trial_key(config_json: &Value, seed: u64, code_version: Option<&str>) -> String {
    let canonical = serde_json::to_string(
        &serde_json::json!({"config": config_json, "seed": seed, "code": code_version}),
    )
    .expect("json");
    // Two differently salted passes give 128 bits.
    let a = fnv1a(canonical.as_bytes());
    let b = fnv1a(format!("fer:{canonical}").as_bytes());
    format!("{a:016x}{b:016x}")
}

/// A sweep name: 1-100 characters from letters, digits, `-`, `_` and `.`, not starting with `.`.
pub fn valid_sweep_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 100 {
        return Err(format!(
            "{name:?} must be 1 to 100 characters long (letters, digits, '-', '_', '.')"
        ));
    }
    if name.starts_with('.') || !name.chars().all(ok_char) {
        return Err(format!(
            "{name:?} is not a valid sweep name: use letters, digits, '-', '_' and '.' (not first); it names a folder under --runs-dir"
        ));
    }
    Ok(())
}

/// The most trials a sweep may expand to unless the user raises it (`fer sweep --max-trials`).
pub const DEFAULT_MAX_TRIALS: usize = 10_000;
/// Sweep files are short; a larger one is a mistake (a generated grid) to refuse before parsing.
const MAX_SWEEP_FILE_BYTES: u64 = 1 << 20;

/// Read and expand a sweep file. Every error names the file (and line:column where it can).
pub fn load(
    path: &Path,
    profile: Option<&str>,
    code_version: Option<&str>,
) -> anyhow::Result<Sweep> {
    load_capped(path, profile, code_version, DEFAULT_MAX_TRIALS)
}

/// `load` with an explicit cap on the number of trials.
pub fn load_capped(
    path: &Path,
    profile: Option<&str>,
    code_version: Option<&str>,
    max_trials: usize,
) -> anyhow::Result<Sweep> {
    let (text, spec) = read_sweep_file(path)?;
    let name = spec.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    });
    let base_name = name.clone();
    // A profile is another experiment: its results are kept under their own sweep name.
    let name = match profile {
        Some(p) => format!("{name}-{p}"),
        None => name,
    };
    let at = Locator {
        path,
        text: &text,
        spec: &spec,
        profile,
        base_path: path.parent().unwrap_or(Path::new(".")).join(&spec.base),
    };
    // The name becomes a folder under --runs-dir and a key in the store: a plain word only,
    // so `name: ../../x` cannot write outside the runs folder.
    if let Err(why) = valid_sweep_name(&name) {
        return Err(at.key(&["name"], format!("name: {why}")));
    }
    if spec.seeds.is_empty() {
        return Err(at.key(&["seeds"], "seeds: needs at least one seed".into()));
    }
    if let Err((key, why)) = crate::slurm::check_resources(&spec.resources) {
        return Err(at.key(&["resources", key], format!("resources.{key}: {why}")));
    }
    if spec.retry.max_attempts == 0 {
        return Err(at.key(
            &["retry", "max_attempts"],
            "retry.max_attempts: must be at least 1".into(),
        ));
    }
    let base = resolved_base(&at)?;
    check_trial_count(&at, max_trials)?;
    let sets = param_sets(&at)?;
    let trials = expand(&at, &base, sets, code_version)?;
    if let Some(report) = &spec.report {
        let configs: Vec<&Value> = trials.iter().map(|t| &t.config_json).collect();
        report
            .validate(&configs)
            .map_err(|e| at.key(&["report"], e))?;
    }
    drop(at);
    Ok(Sweep {
        name,
        base_name,
        spec,
        trials,
    })
}

/// The sweep file's text (size-capped) and its typed content.
fn read_sweep_file(path: &Path) -> anyhow::Result<(String, SweepFile)> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read sweep file", path.display()))?
        .len();
    if size > MAX_SWEEP_FILE_BYTES {
        bail!(
            "{}: {size} bytes; a sweep file may have at most {} (list values in the file, not data)",
            path.display(),
            MAX_SWEEP_FILE_BYTES
        );
    }
    let text = fer_model::data::read_text(path)
        .with_context(|| format!("{}: cannot read sweep file", path.display()))?;
    let spec: SweepFile = crate::yaml::parse(path, &text)?;
    Ok((text, spec))
}

/// Where in the sweep file (or its base config) a problem is: errors say `file:line:column`.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
    spec: &'a SweepFile,
    profile: Option<&'a str>,
    base_path: PathBuf,
}

impl Locator<'_> {
    /// At the key path `keys` of the sweep file (e.g. `["grid", "model.heads"]`).
    fn key(&self, keys: &[&str], msg: String) -> anyhow::Error {
        at_path(self.text, keys, self.path, &msg)
    }

    /// At `key` inside item `index` of the list `section` (`include`, `exclude`, `zip`), else at
    /// the section.
    fn item(&self, section: &str, index: usize, key: &str, msg: String) -> anyhow::Error {
        match locate_list_item_key(self.text, section, index, key) {
            Some((l, c)) => anyhow::anyhow!("{}:{l}:{c}: {msg}", self.path.display()),
            None => self.key(&[section], msg),
        }
    }

    /// At an axis of the sweep: its grid line, or its key in its zip group.
    fn axis(&self, axis: &str, msg: String) -> anyhow::Error {
        if self.spec.grid.contains_key(axis) {
            return self.key(&["grid", axis], msg);
        }
        match self.spec.zip.iter().position(|g| g.contains_key(axis)) {
            Some(i) => self.item("zip", i, axis, msg),
            None => self.key(&[axis], msg),
        }
    }

    /// Where a config field's value came from, most specific first: an axis of the trial (its
    /// grid or zip line, or the include item it came from), the profile, the overrides, else
    /// the base config. Errors about a trial's config point there.
    fn origin(
        &self,
        field: &str,
        set: &BTreeMap<String, Value>,
        include: Option<usize>,
        what: &str,
    ) -> anyhow::Error {
        let covers = |k: &str| field == k || field.starts_with(&format!("{k}."));
        let most_specific = |keys: Vec<&String>| {
            keys.into_iter()
                .filter(|k| covers(k))
                .max_by_key(|k| k.len())
                .cloned()
        };
        if let Some(axis) = most_specific(set.keys().collect()) {
            return match include {
                Some(i) => self.item("include", i, &axis, what.to_string()),
                None => self.axis(&axis, what.to_string()),
            };
        }
        if let Some(p) = self.profile {
            if let Some(k) = self
                .spec
                .profiles
                .get(p)
                .and_then(|o| most_specific(o.keys().collect()))
            {
                return self.key(&["profiles", p, &k], what.to_string());
            }
        }
        if let Some(k) = most_specific(self.spec.overrides.keys().collect()) {
            return self.key(&["overrides", &k], what.to_string());
        }
        let base_text = fer_model::data::read_text(&self.base_path).unwrap_or_default();
        let parts: Vec<&str> = field.split('.').collect();
        at_path(&base_text, &parts, &self.base_path, what)
    }
}

/// The base config with the overrides and the profile's keys applied (as JSON).
fn resolved_base(at: &Locator) -> anyhow::Result<Value> {
    let spec = at.spec;
    let base_yaml: serde_yaml_ng::Value = crate::yaml::read(&at.base_path)
        .map_err(|e| at.key(&["base"], format!("base config: {e:#}")))?;
    let mut base = to_json(&base_yaml).map_err(|e| {
        let msg = e.to_string();
        let key = msg.split(':').next().unwrap_or("");
        let base_text = fer_model::data::read_text(&at.base_path).unwrap_or_default();
        let parts: Vec<&str> = key.split('.').collect();
        at_path(&base_text, &parts, &at.base_path, &msg)
    })?;
    let mut overrides: Vec<(&String, &serde_yaml_ng::Value, Vec<&str>)> = spec
        .overrides
        .iter()
        .map(|(k, v)| (k, v, vec!["overrides", k.as_str()]))
        .collect();
    if let Some(p) = at.profile {
        let extra = spec.profiles.get(p).ok_or_else(|| {
            at.key(
                &["profiles"],
                format!(
                    "no profile {p:?} (have: {:?})",
                    spec.profiles.keys().collect::<Vec<_>>()
                ),
            )
        })?;
        overrides.extend(
            extra
                .iter()
                .map(|(k, v)| (k, v, vec!["profiles", p, k.as_str()])),
        );
    }
    for (k, v, keys) in overrides {
        let v = to_json(v).map_err(|e| at.key(&keys, format!("{k}.{e}")))?;
        set_dotted(&mut base, k, v).map_err(|e| at.key(&keys, e.to_string()))?;
    }
    Ok(base)
}

/// Count the trials before expanding: a huge grid must fail here, not after filling memory.
fn check_trial_count(at: &Locator, max_trials: usize) -> anyhow::Result<()> {
    let spec = at.spec;
    let count = spec
        .grid
        .values()
        .map(|v| v.len().max(1))
        .chain(
            spec.zip
                .iter()
                .map(|g| g.values().next().map_or(1, |v| v.len().max(1))),
        )
        .try_fold(1usize, |n, k| n.checked_mul(k))
        .and_then(|n| n.checked_add(spec.include.len()))
        .and_then(|n| n.checked_mul(spec.seeds.len()));
    match count {
        Some(n) if n <= max_trials => Ok(()),
        _ => {
            let section = ["grid", "zip", "include", "seeds"]
                .into_iter()
                .find(|s| crate::yaml::locate_path(at.text, &[s]).is_some())
                .unwrap_or("grid");
            Err(at.key(
                &[section],
                format!(
                    "the sweep expands to {} trials, more than the limit of {max_trials} (raise it with --max-trials)",
                    count.map_or("too many".to_string(), |n| n.to_string())
                ),
            ))
        }
    }
}

/// The sweep's parameter sets: grid x zip groups, minus the excludes, then the includes.
struct ParamSets {
    sets: Vec<BTreeMap<String, Value>>,
    /// `sets[first_include + i]` came from `include[i]`.
    first_include: usize,
}

fn param_sets(at: &Locator) -> anyhow::Result<ParamSets> {
    let spec = at.spec;
    let mut sets: Vec<BTreeMap<String, Value>> = vec![BTreeMap::new()];
    for (axis, values) in &spec.grid {
        if values.is_empty() {
            return Err(at.key(
                &["grid", axis],
                format!("grid.{axis}: needs at least one value"),
            ));
        }
        let mut next = Vec::new();
        for set in &sets {
            for v in values {
                let mut s = set.clone();
                let v =
                    to_json(v).map_err(|e| at.key(&["grid", axis], format!("grid.{axis}: {e}")))?;
                s.insert(axis.clone(), v);
                next.push(s);
            }
        }
        sets = next;
    }
    for (gi, group) in spec.zip.iter().enumerate() {
        let len = group.values().next().map(|v| v.len()).unwrap_or(0);
        if let Some((k, v)) = group.iter().find(|(_, v)| v.len() != len) {
            return Err(at.item(
                "zip",
                gi,
                k,
                format!(
                    "zip: axis {k} has {} values, the others in its group have {len}",
                    v.len()
                ),
            ));
        }
        let mut next = Vec::new();
        for set in &sets {
            for i in 0..len {
                let mut s = set.clone();
                for (k, vals) in group {
                    let v = to_json(&vals[i])
                        .map_err(|e| at.item("zip", gi, k, format!("zip {k}: {e}")))?;
                    s.insert(k.clone(), v);
                }
                next.push(s);
            }
        }
        sets = next;
    }
    // The device is the slot's (--jobs / --gpus): a sweep over it would be overwritten.
    let axes: Vec<&String> = spec
        .grid
        .keys()
        .chain(spec.zip.iter().flat_map(|g| g.keys()))
        .collect();
    if axes.iter().any(|a| a.as_str() == "device") {
        return Err(at.axis(
            "device",
            "device: cannot be a sweep axis; `fer sweep` gives each trial its slot's device (--jobs for CPU slots, --gpus for GPUs)".into(),
        ));
    }
    // An exclude matches the sweep's axes only: a key that is no axis (a typo) would exclude
    // nothing, silently.
    let mut excludes: Vec<BTreeMap<String, Value>> = Vec::new();
    for (i, ex) in spec.exclude.iter().enumerate() {
        let mut exclude = BTreeMap::new();
        for (k, v) in ex {
            if !axes.contains(&k) {
                let names: Vec<&str> = axes.iter().map(|a| a.as_str()).collect();
                return Err(at.item(
                    "exclude",
                    i,
                    k,
                    format!(
                        "exclude[{i}]: `{k}` is not an axis of this sweep (axes: {})",
                        names.join(", ")
                    ),
                ));
            }
            let v =
                to_json(v).map_err(|e| at.item("exclude", i, k, format!("exclude[{i}]: {e}")))?;
            exclude.insert(k.clone(), v);
        }
        excludes.push(exclude);
    }
    sets.retain(|s| {
        !excludes
            .iter()
            .any(|ex| ex.iter().all(|(k, v)| s.get(k) == Some(v)))
    });
    let first_include = sets.len();
    for (i, inc) in spec.include.iter().enumerate() {
        let mut set = BTreeMap::new();
        for (k, v) in inc {
            let v =
                to_json(v).map_err(|e| at.item("include", i, k, format!("include[{i}]: {e}")))?;
            set.insert(k.clone(), v);
        }
        sets.push(set);
    }
    Ok(ParamSets {
        sets,
        first_include,
    })
}

/// Every (parameter set, seed) as a trial with its resolved, validated config and its key;
/// duplicates (an include repeating a grid point) once.
fn expand(
    at: &Locator,
    base: &Value,
    params: ParamSets,
    code_version: Option<&str>,
) -> anyhow::Result<Vec<Trial>> {
    let spec = at.spec;
    let mut trials = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (index, set) in params.sets.into_iter().enumerate() {
        let include = index.checked_sub(params.first_include);
        for &seed in &spec.seeds {
            let mut cfg = base.clone();
            for (k, v) in &set {
                set_dotted(&mut cfg, k, v.clone())
                    .map_err(|e| at.origin(k, &set, include, &e.to_string()))?;
            }
            set_dotted(&mut cfg, "seed", Value::from(seed))?;
            let trial = serde_json::to_string(&set).unwrap_or_default();
            let config: RunConfig = serde_path_to_error::deserialize(cfg.clone()).map_err(|e| {
                let field = e.path().to_string();
                let msg = crate::yaml::explain(&e.inner().to_string());
                let what = format!("{field}: {msg} (trial {trial})");
                at.origin(&field, &set, include, &what)
            })?;
            config.validate().map_err(|e| {
                // Validation messages start with the field they are about (`epochs: ...`); one
                // that names no field is put at the trial's first axis.
                let msg = e.to_string();
                let field = msg.split(':').next().unwrap_or_default();
                let what = format!("trial {trial}: {msg}");
                match set.keys().next() {
                    Some(axis) if field.contains(' ') || field.is_empty() => {
                        at.origin(axis, &set, include, &what)
                    }
                    None if field.contains(' ') || field.is_empty() => at.key(&["base"], what),
                    _ => at.origin(field, &set, include, &what),
                }
            })?;
            // Canonical form: the config re-serialised from its typed value (defaults filled
            // in, keys sorted), so equivalent spellings give the same key.
            let config_json: Value = serde_json::from_str(&serde_json::to_string(&config)?)?;
            let version = spec
                .key_includes_code_version
                .then_some(code_version)
                .flatten();
            let key = trial_key(&config_json, seed, version);
            if !seen.insert(key.clone()) {
                continue; // an include may repeat a grid point
            }
            let mut params = set.clone();
            params.insert("seed".into(), Value::from(seed));
            trials.push(Trial {
                key,
                seed,
                params,
                config,
                config_json,
            });
        }
    }
    if trials.is_empty() {
        bail!(
            "{}: the sweep expands to no trials (everything excluded?)",
            at.path.display()
        );
    }
    Ok(trials)
}
