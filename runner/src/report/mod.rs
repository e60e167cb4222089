//! `fer report NAME`: a table and figures of the thesis, regenerated from the results database.
//!
//! The report's cells come from its sweep file (`experiments/NAME.yaml`, section `report:`): the
//! sweep is expanded exactly as `fer sweep` expands it, each trial goes to the cells whose filters
//! its resolved config matches, and each cell takes the completed trials' test accuracy under the
//! chosen protocol. A trial the sweep expects but the database lacks is a missing result: listed,
//! and an error unless `--allow-missing`.

pub mod html;
pub mod plot;
pub mod render;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::store::{Confusion, Curves, DbUrl, Store};
use crate::sweep::{self, Trial};
use crate::sweep_cmd::{git_version, DEFAULT_DB};
use spec::{Column, Protocol, ReportSpec};

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Report name (reads experiments/NAME.yaml) or the path of a sweep file with a `report:` section.
    pub name: String,
    /// Results database (as `fer sweep --db`).
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
    /// The sweep's profile whose results to report (e.g. `thesis`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Accuracy protocol (default: the report's own).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Write the report even when some trials have no result (they are listed as missing).
    #[arg(long)]
    pub allow_missing: bool,
    /// Also write NAME.html: the same report as one self-contained file (figures and trial
    /// pictures inlined, no script, no network).
    #[arg(long)]
    pub html: bool,
    /// Output folder.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Where report names are looked up.
    #[arg(long, default_value = "experiments")]
    pub experiments: PathBuf,
}

/// A completed trial as the report sees it (accuracies as fractions).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub key: String,
    pub seed: u64,
    pub final_accuracy: f64,
    pub best_accuracy: f64,
    pub last5_accuracy: f64,
    pub balanced_accuracy: Option<f64>,
    /// Test accuracy at the epoch with the best validation accuracy (the first such epoch);
    /// None without a validation split.
    pub val_selected_accuracy: Option<f64>,
    /// Mean test accuracy of the last 3 epochs, and whether the trial failed the plateau rule.
    pub last3_accuracy: f64,
    pub undertrained: bool,
    pub epochs: i64,
    pub git_commit: Option<String>,
    pub git_dirty: bool,
    /// Per-epoch metrics (the learning-curve pictures and curve figures).
    pub curves: Curves,
    /// The last epoch's test confusion matrix, when recorded.
    pub confusion: Option<Confusion>,
}

impl Outcome {
    /// The trial's accuracy under `protocol`; None for `best_val` without a validation split.
    pub fn accuracy(&self, protocol: Protocol) -> Option<f64> {
        match protocol {
            Protocol::Final => Some(self.final_accuracy),
            Protocol::Best => Some(self.best_accuracy),
            Protocol::Last5 => Some(self.last5_accuracy),
            Protocol::BestVal => self.val_selected_accuracy,
        }
    }
}

/// A trial's accuracy by epoch on the test and validation splits, and the test curve's plateau
/// (`stats::plateau`): what the reports and the dashboard summarise a trial by.
pub struct AccuracyCurves {
    pub test: Vec<(i64, f64)>,
    pub val: Vec<(i64, f64)>,
    pub plateau: Option<crate::stats::Plateau>,
}

impl AccuracyCurves {
    pub fn of(curves: &Curves) -> Self {
        let curve = |split: &str| {
            curves
                .get(&(split.to_string(), "accuracy".to_string()))
                .cloned()
                .unwrap_or_default()
        };
        let test = curve("test");
        let values: Vec<f64> = test.iter().map(|(_, a)| *a).collect();
        AccuracyCurves {
            plateau: crate::stats::plateau(&values),
            test,
            val: curve("val"),
        }
    }

    /// Test accuracy at the epoch of best validation accuracy (`val_selected`).
    pub fn val_selected(&self) -> Option<f64> {
        val_selected(&self.test, &self.val)
    }
}

/// Test accuracy at the first epoch of highest validation accuracy (curves as (epoch, value)).
pub fn val_selected(test: &[(i64, f64)], val: &[(i64, f64)]) -> Option<f64> {
    let mut best: Option<(i64, f64)> = None;
    for &(e, v) in val {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((e, v));
        }
    }
    let (epoch, _) = best?;
    test.iter().find(|(e, _)| *e == epoch).map(|(_, a)| *a)
}

/// A trial the sweep expects whose result is not in the database, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Missing {
    pub key: String,
    pub seed: u64,
    /// "never run", or the latest attempt's status (and failure class).
    pub status: String,
}

pub use crate::stats::Stat;

/// One (row, column) cell with trials: what the sweep expects and what the database has.
#[derive(Debug, Clone)]
pub struct Cell {
    pub row: usize,
    pub column: usize,
    pub expected: usize,
    pub done: Vec<Outcome>,
    pub missing: Vec<Missing>,
}

impl Cell {
    /// Mean ± std over the completed trials, in percent.
    pub fn stat(&self, protocol: Protocol) -> Option<Stat> {
        let v: Vec<f64> = self
            .done
            .iter()
            .filter_map(|o| o.accuracy(protocol).map(|a| 100.0 * a))
            .collect();
        Stat::of(&v)
    }
}

/// A contrast between two cells, paired by seed (accuracy points).
#[derive(Debug, Clone)]
pub struct Contrast {
    pub label: String,
    /// None when the cells share no completed seed.
    pub paired: Option<crate::stats::Paired>,
    /// Undertrained trials among the two cells' trials.
    pub undertrained: usize,
}

/// Everything a report renders.
pub struct Report {
    pub name: String,
    pub sweep_name: String,
    pub sweep_file: PathBuf,
    pub profile: Option<String>,
    pub spec: ReportSpec,
    pub columns: Vec<Column>,
    pub protocol: Protocol,
    pub cells: Vec<Cell>,
    /// Config keys with one value across the report's trials: (dotted key, value).
    pub setting: Vec<(String, String)>,
    /// Keys that differ between the report's trials.
    pub varying: Vec<String>,
}

impl Report {
    pub fn cell(&self, row: usize, column: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.row == row && c.column == column)
    }

    /// "row" for a one-column report, "row / column" otherwise.
    pub fn cell_label(&self, cell: &Cell) -> String {
        let row = &self.spec.rows[cell.row].label;
        if self.columns.len() > 1 {
            format!("{row} / {}", self.columns[cell.column].label)
        } else {
            row.clone()
        }
    }

    /// ": column" for a multi-column report (series and legend names), empty otherwise.
    pub fn column_suffix(&self, column: usize) -> String {
        if self.columns.len() > 1 {
            format!(": {}", self.columns[column].label)
        } else {
            String::new()
        }
    }

    /// Each row's statistic in one column (None where the cell has no trial or result).
    pub fn column_stats(&self, rows: &[usize], column: usize) -> Vec<Option<Stat>> {
        rows.iter()
            .map(|&r| self.cell(r, column).and_then(|c| c.stat(self.protocol)))
            .collect()
    }

    /// Every contrast of the spec, per column (row contrasts) or per row (column contrasts),
    /// paired by seed over the trials both cells completed (accuracy points).
    pub fn contrasts(&self) -> Vec<Contrast> {
        let mut out = Vec::new();
        let row_of = |l: &str| self.spec.rows.iter().position(|r| r.label == l);
        let col_of = |l: &str| self.columns.iter().position(|c| c.label == l);
        for c in &self.spec.contrasts {
            // (cell a, cell b, label) as ((row, column), (row, column), text).
            type Pair = ((usize, usize), (usize, usize), String);
            let pairs: Vec<Pair> = match (&c.rows, &c.columns) {
                (Some([a, b]), _) => {
                    let (Some(ra), Some(rb)) = (row_of(a), row_of(b)) else {
                        continue;
                    };
                    (0..self.columns.len())
                        .map(|k| {
                            let label = format!("{a} − {b}{}", self.column_suffix(k));
                            ((ra, k), (rb, k), label)
                        })
                        .collect()
                }
                (None, Some([a, b])) => {
                    let (Some(ca), Some(cb)) = (col_of(a), col_of(b)) else {
                        continue;
                    };
                    (0..self.spec.rows.len())
                        .filter(|&r| self.spec.rows[r].filter.is_some())
                        .map(|r| {
                            let label = format!("{a} − {b}: {}", self.spec.rows[r].label);
                            ((r, ca), (r, cb), label)
                        })
                        .collect()
                }
                _ => continue,
            };
            for ((ra, ca), (rb, cb), label) in pairs {
                let (Some(x), Some(y)) = (self.cell(ra, ca), self.cell(rb, cb)) else {
                    continue;
                };
                let by_seed = |cell: &Cell| -> BTreeMap<u64, f64> {
                    cell.done
                        .iter()
                        .filter_map(|o| o.accuracy(self.protocol).map(|a| (o.seed, 100.0 * a)))
                        .collect()
                };
                let (xa, yb) = (by_seed(x), by_seed(y));
                let seeds: Vec<u64> = xa.keys().filter(|s| yb.contains_key(s)).copied().collect();
                let a: Vec<f64> = seeds.iter().map(|s| xa[s]).collect();
                let b: Vec<f64> = seeds.iter().map(|s| yb[s]).collect();
                let undertrained = x
                    .done
                    .iter()
                    .chain(&y.done)
                    .filter(|o| o.undertrained)
                    .count();
                out.push(Contrast {
                    label,
                    paired: crate::stats::Paired::of(&a, &b),
                    undertrained,
                });
            }
        }
        out
    }

    /// Completed trials that failed the plateau rule.
    /// The file name its files share: NAME, or NAME-PROFILE.
    pub fn stem(&self) -> String {
        match &self.profile {
            Some(p) => format!("{}-{p}", self.name),
            None => self.name.clone(),
        }
    }

    pub fn undertrained(&self) -> usize {
        self.cells
            .iter()
            .flat_map(|c| &c.done)
            .filter(|o| o.undertrained)
            .count()
    }

    pub fn missing(&self) -> impl Iterator<Item = (&Cell, &Missing)> {
        self.cells
            .iter()
            .flat_map(|c| c.missing.iter().map(move |m| (c, m)))
    }
}

/// Assign the sweep's trials to the report's cells. A cell whose filters match no trial of the
/// sweep is a mistake in the report section, not a missing result.
pub fn assign_cells(
    spec: &ReportSpec,
    trials: &[(String, u64, Value)],
    done: &HashMap<String, Outcome>,
    status: &HashMap<String, String>,
) -> anyhow::Result<Vec<Cell>> {
    let columns = spec.columns();
    let mut cells = Vec::new();
    for (r, row) in spec.rows.iter().enumerate() {
        let Some(row_filter) = &row.filter else {
            continue;
        };
        for (c, column) in columns.iter().enumerate() {
            let mut cell = Cell {
                row: r,
                column: c,
                expected: 0,
                done: Vec::new(),
                missing: Vec::new(),
            };
            for (key, seed, config) in trials {
                if !(spec::matches(config, row_filter) && spec::matches(config, &column.filter)) {
                    continue;
                }
                cell.expected += 1;
                match done.get(key) {
                    Some(o) => cell.done.push(o.clone()),
                    None => cell.missing.push(Missing {
                        key: key.clone(),
                        seed: *seed,
                        status: status
                            .get(key)
                            .cloned()
                            .unwrap_or_else(|| "never run".into()),
                    }),
                }
            }
            if cell.expected == 0 {
                bail!(
                    "report: row {:?}, column {:?} matches no trial of the sweep (check its `where` filters against the sweep's axes)",
                    row.label,
                    column.label
                );
            }
            cells.push(cell);
        }
    }
    Ok(cells)
}

/// Flatten a config into (dotted key, leaf value) pairs; arrays stay whole.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, x) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Keys shared by every trial (with their value) and keys that vary.
pub fn setting(configs: &[&Value]) -> (Vec<(String, String)>, Vec<String>) {
    let flat: Vec<BTreeMap<String, String>> = configs
        .iter()
        .map(|c| {
            let mut m = BTreeMap::new();
            flatten("", c, &mut m);
            m
        })
        .collect();
    let mut keys: Vec<&String> = flat.iter().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let (mut same, mut varying) = (Vec::new(), Vec::new());
    for k in keys {
        let first = flat[0].get(k);
        if flat.iter().all(|m| m.get(k) == first) {
            same.push((k.clone(), first.cloned().unwrap_or_else(|| "null".into())));
        } else {
            varying.push(k.clone());
        }
    }
    (same, varying)
}

/// The sweep file a report name stands for.
pub fn sweep_file(name: &str, experiments: &Path) -> PathBuf {
    let p = Path::new(name);
    if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
        p.to_path_buf()
    } else {
        experiments.join(format!("{name}.yaml"))
    }
}

/// The completed trials among `keys` as the report sees them, and a status line for the rest
/// (latest attempt: status, failure class, first line of the error).
async fn outcomes(
    store: &Store,
    keys: &[&str],
) -> anyhow::Result<(HashMap<String, Outcome>, HashMap<String, String>)> {
    let mut done = HashMap::new();
    let mut status = HashMap::new();
    for &key in keys {
        if let Some(r) = store.trial_result(key).await? {
            if let Some(final_accuracy) = r.final_accuracy {
                let curves = store.curves(key).await?;
                let accuracy = AccuracyCurves::of(&curves);
                let plateau = accuracy.plateau;
                done.insert(
                    key.to_string(),
                    Outcome {
                        key: key.to_string(),
                        seed: r.seed as u64,
                        final_accuracy,
                        best_accuracy: r.best_accuracy.unwrap_or(final_accuracy),
                        last5_accuracy: r.last5_accuracy.unwrap_or(final_accuracy),
                        balanced_accuracy: r.final_balanced_accuracy,
                        val_selected_accuracy: accuracy.val_selected(),
                        last3_accuracy: plateau.map_or(final_accuracy, |p| p.last_mean),
                        undertrained: plateau.is_none_or(|p| p.undertrained),
                        epochs: r.epochs.unwrap_or(0),
                        git_commit: r.git_commit,
                        git_dirty: r.git_dirty,
                        confusion: store.confusion(key).await?,
                        curves,
                    },
                );
                continue;
            }
        }
        if let Some(a) = store.latest_attempt(key).await? {
            let mut text = match a.failure_class {
                Some(c) => format!("{} ({c})", a.status),
                None => a.status,
            };
            if let Some(e) = a.error {
                text.push_str(&format!(": {}", e.lines().next().unwrap_or("")));
            }
            status.insert(key.to_string(), text);
        }
    }
    Ok((done, status))
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let file = sweep_file(&args.name, &args.experiments);
    if !file.is_file() {
        bail!(
            "{}: no such sweep file (a report NAME reads {}/NAME.yaml)",
            file.display(),
            args.experiments.display()
        );
    }
    if !args.db.may_exist() {
        bail!(
            "{}: no results database (run `fer sweep {}` first, or pass --db)",
            args.db,
            file.display()
        );
    }
    let store = Store::open_for_reading(&args.db).await?;
    let report = load(
        &store,
        &args.name,
        &args.experiments,
        args.profile.as_deref(),
        args.protocol,
    )
    .await?;
    let table = render::markdown_table(&report);
    println!("{}\n", report.spec.title);
    println!("{table}");
    let missing: Vec<_> = report.missing().collect();
    if !missing.is_empty() {
        eprintln!("{} trial(s) without a result:", missing.len());
        for line in render::missing_lines(&report) {
            eprintln!("  {line}");
        }
        if !args.allow_missing {
            bail!(
                "{} of the report's trials have no result; run `fer sweep {}{}` or pass --allow-missing",
                missing.len(),
                report.sweep_file.display(),
                args.profile.as_ref().map(|p| format!(" --profile {p}")).unwrap_or_default()
            );
        }
    }
    write(&report, &args.out, &args.db, args.html)?;
    eprintln!(
        "wrote {}/{}.md, .csv, .png, .svg and the trial pictures",
        args.out.display(),
        report.stem()
    );
    Ok(())
}

/// The report `name` stands for (see `sweep_file`), gathered from the store.
pub async fn load(
    store: &Store,
    name: &str,
    experiments: &Path,
    profile: Option<&str>,
    protocol: Option<Protocol>,
) -> anyhow::Result<Report> {
    let file = sweep_file(name, experiments);
    if !file.is_file() {
        bail!(
            "{}: no such sweep file (a report NAME reads {}/NAME.yaml)",
            file.display(),
            experiments.display()
        );
    }
    let (commit, _) = git_version();
    let sweep = sweep::load(&file, profile, commit.as_deref())?;
    let Some(spec) = sweep.spec.report.clone() else {
        bail!("{}: has no `report:` section", file.display());
    };
    gather(
        store,
        &sweep.base_name,
        &sweep.name,
        &file,
        profile.map(str::to_string),
        &sweep.trials,
        spec,
        protocol,
    )
    .await
}

/// The report as one self-contained HTML page (what `--html` writes), rendered in a scratch
/// folder that is removed afterwards: the dashboard's report pages.
pub fn html_page(report: &Report, db: &DbUrl) -> anyhow::Result<String> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fer-report-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let page = write(report, &dir, db, true).and_then(|()| {
        Ok(std::fs::read_to_string(
            dir.join(format!("{}.html", report.stem())),
        )?)
    });
    let _ = std::fs::remove_dir_all(&dir);
    page
}

#[allow(clippy::too_many_arguments)]
async fn gather(
    store: &Store,
    name: &str,
    sweep_name: &str,
    file: &Path,
    profile: Option<String>,
    trials: &[Trial],
    spec: ReportSpec,
    protocol: Option<Protocol>,
) -> anyhow::Result<Report> {
    let keys: Vec<&str> = trials.iter().map(|t| t.key.as_str()).collect();
    let (done, status) = outcomes(store, &keys).await?;
    let triples: Vec<(String, u64, Value)> = trials
        .iter()
        .map(|t| (t.key.clone(), t.seed, t.config_json.clone()))
        .collect();
    let cells = assign_cells(&spec, &triples, &done, &status)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let in_cells: std::collections::HashSet<&str> = cells
        .iter()
        .flat_map(|c| {
            c.done
                .iter()
                .map(|o| o.key.as_str())
                .chain(c.missing.iter().map(|m| m.key.as_str()))
        })
        .collect();
    let configs: Vec<&Value> = trials
        .iter()
        .filter(|t| in_cells.contains(t.key.as_str()))
        .map(|t| &t.config_json)
        .collect();
    let (setting, varying) = setting(&configs);
    Ok(Report {
        name: name.to_string(),
        sweep_name: sweep_name.to_string(),
        sweep_file: file.to_path_buf(),
        profile,
        columns: spec.columns(),
        protocol: protocol.unwrap_or(spec.protocol),
        spec,
        cells,
        setting,
        varying,
    })
}

/// Write NAME.md, NAME.csv, the figures, the per-trial pictures and the reports index.
fn write(report: &Report, out: &Path, db: &DbUrl, html: bool) -> anyhow::Result<()> {
    let stem = report.stem();
    let trial_dir = out.join(&stem).join("trials");
    std::fs::create_dir_all(&trial_dir)
        .with_context(|| format!("creating {}", trial_dir.display()))?;
    // Pictures of this report's trials only: stale ones from an earlier run go.
    for entry in std::fs::read_dir(&trial_dir)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "png") {
            std::fs::remove_file(&p)?;
        }
    }

    let mut pictures: HashMap<String, (bool, bool)> = HashMap::new();
    for cell in &report.cells {
        let label = report.cell_label(cell);
        for o in &cell.done {
            let short = &o.key[..16];
            let has_curves = render::save_learning_curves(
                &o.curves,
                &format!("{label}, seed {}", o.seed),
                &trial_dir.join(format!("{short}-curves")),
            )?;
            let has_confusion = match &o.confusion {
                Some(Confusion {
                    counts,
                    class_names,
                    ..
                }) => {
                    let names = class_names
                        .clone()
                        .unwrap_or_else(|| default_class_names(counts.len()));
                    plot::save(
                        &plot::ConfusionMatrix {
                            title: format!("{label}, seed {}: test confusion, last epoch", o.seed),
                            class_names: names,
                            counts: counts.clone(),
                        },
                        &trial_dir.join(format!("{short}-confusion")),
                        (560, 500),
                        false,
                    )?;
                    true
                }
                None => false,
            };
            pictures.insert(o.key.clone(), (has_curves, has_confusion));
        }
    }

    render::save_main_figure(report, &out.join(&stem))?;
    let mut curve_files = Vec::new();
    for curve in &report.spec.curves {
        let path = out.join(format!("{stem}-{}", curve.metric));
        if render::save_curve_figure(report, curve, &path)? {
            curve_files.push((curve.title.clone(), format!("{stem}-{}", curve.metric)));
        }
    }
    let md = render::markdown(report, &stem, db, &pictures, &curve_files);
    if html {
        let page = html::from_markdown(&md, out, &report.spec.title)?;
        std::fs::write(out.join(format!("{stem}.html")), page)?;
    }
    std::fs::write(out.join(format!("{stem}.md")), md)?;
    std::fs::write(out.join(format!("{stem}.csv")), render::csv(report))?;
    render::write_index(out)?;
    Ok(())
}

/// RAF-DB's class order (the synthetic faces use it too) for 7 classes; numbers otherwise.
fn default_class_names(n: usize) -> Vec<String> {
    if n == fer_model::data::synth::CLASS_NAMES.len() {
        fer_model::data::synth::CLASS_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        (0..n).map(|i| format!("class {i}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome(key: &str, seed: u64, acc: f64) -> Outcome {
        Outcome {
            key: key.into(),
            seed,
            final_accuracy: acc,
            best_accuracy: acc + 0.1,
            last5_accuracy: acc - 0.1,
            balanced_accuracy: None,
            val_selected_accuracy: None,
            last3_accuracy: acc - 0.05,
            undertrained: false,
            epochs: 3,
            git_commit: None,
            git_dirty: false,
            curves: Curves::new(),
            confusion: None,
        }
    }

    #[test]
    fn filters_compare_numbers_by_value_and_null_matches_absent() {
        let config = json!({"losses": {"affinity": 0.0}, "noise": null, "model": {"heads": 4}});
        let f = |v: Value| serde_json::from_value::<BTreeMap<String, Value>>(v).unwrap();
        assert!(spec::matches(&config, &f(json!({"losses.affinity": 0}))));
        assert!(spec::matches(
            &config,
            &f(json!({"model.heads": 4.0, "noise": null}))
        ));
        assert!(spec::matches(&config, &f(json!({"data.missing": null}))));
        assert!(!spec::matches(&config, &f(json!({"noise.rate": 0.3}))));
        assert!(!spec::matches(&config, &f(json!({"model.heads": "4"}))));
    }

    #[test]
    fn cells_collect_their_trials_and_name_what_is_missing() {
        let spec: ReportSpec = serde_yaml_ng::from_str(
            "title: t\nrows:\n  - {label: a, where: {x: 1}}\n  - {label: b, where: {x: 2}}\n  - {label: peer, thesis: 50}\n",
        )
        .unwrap();
        let trials = vec![
            ("k1".to_string(), 0, json!({"x": 1})),
            ("k2".to_string(), 1, json!({"x": 1})),
            ("k3".to_string(), 0, json!({"x": 2})),
            ("k4".to_string(), 0, json!({"x": 3})),
        ];
        let done = HashMap::from([
            ("k1".to_string(), outcome("k1", 0, 0.5)),
            ("k3".to_string(), outcome("k3", 0, 0.7)),
        ]);
        let status = HashMap::from([("k2".to_string(), "failed (crash)".to_string())]);
        let cells = assign_cells(&spec, &trials, &done, &status).unwrap();
        assert_eq!(cells.len(), 2, "the reference-only row has no cell");
        assert_eq!((cells[0].expected, cells[0].done.len()), (2, 1));
        assert_eq!(
            cells[0].missing,
            vec![Missing {
                key: "k2".into(),
                seed: 1,
                status: "failed (crash)".into()
            }]
        );
        assert_eq!(
            cells[1].stat(Protocol::Final),
            Some(Stat {
                mean: 70.0,
                std: 0.0,
                n: 1
            })
        );
        let best = cells[1].stat(Protocol::Best).unwrap().mean;
        let last5 = cells[1].stat(Protocol::Last5).unwrap().mean;
        assert!((best - 80.0).abs() < 1e-9 && (last5 - 60.0).abs() < 1e-9);
        assert_eq!(
            render::ours(&cells[0], cells[0].stat(Protocol::Final)),
            "50.00 (n=1 of 2)"
        );
    }

    #[test]
    fn setting_separates_shared_and_varying_keys() {
        let a = json!({"data": {"kind": "synthetic"}, "model": {"heads": 1}});
        let b = json!({"data": {"kind": "synthetic"}, "model": {"heads": 2}});
        let (same, varying) = setting(&[&a, &b]);
        assert_eq!(
            same,
            vec![("data.kind".to_string(), "\"synthetic\"".to_string())]
        );
        assert_eq!(varying, vec!["model.heads".to_string()]);
    }
}
