//! The `report:` section of a sweep file: which cells a table has (rows x columns, each a filter
//! on the trials' resolved configs), the published numbers printed beside ours, the accuracy
//! protocol and the figures.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// Heading of the report, e.g. "Table 4.1: ...".
    pub title: String,
    /// Which epoch's test accuracy stands for a trial (`--protocol` overrides it).
    #[serde(default)]
    pub protocol: Protocol,
    /// Table columns; a cell's trials match its row's and its column's filters.
    /// Default: one column, "Accuracy (%)", matching every trial.
    #[serde(default)]
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    /// Heading of the first column (default "Method").
    #[serde(default)]
    pub row_header: Option<String>,
    /// What the data set of the thesis's numbers was (e.g. "RAF-DB, ResNet-18, 224 px").
    #[serde(default)]
    pub thesis_setting: Option<String>,
    #[serde(default)]
    pub figure: Figure,
    /// Extra figures of a per-epoch metric, one line per cell (e.g. memorisation of noisy labels).
    #[serde(default)]
    pub curves: Vec<Curve>,
    /// Free text printed under the table.
    #[serde(default)]
    pub notes: Option<String>,
    /// The comparisons the thesis makes, each paired over seeds (e.g. 4 heads vs 1).
    #[serde(default)]
    pub contrasts: Vec<ContrastSpec>,
}

/// One comparison: `rows: [A, B]` is row A minus row B in every column; `columns: [A, B]` is
/// column A minus column B in every row. Labels are the rows' / columns' labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastSpec {
    #[serde(default)]
    pub rows: Option<[String; 2]>,
    #[serde(default)]
    pub columns: Option<[String; 2]>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Test accuracy after the last epoch (the thesis's "accuracy").
    #[default]
    Final,
    /// The best test epoch (DAN's protocol: the test set picks the epoch).
    Best,
    /// Mean over the last 5 epochs (EAC's protocol).
    Last5,
    /// The test accuracy of the epoch with the best validation accuracy (no peeking at test).
    BestVal,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Final => "final",
            Protocol::Best => "best",
            Protocol::Last5 => "last5",
            Protocol::BestVal => "best_val",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Protocol::Final => "test accuracy after the final epoch",
            Protocol::Best => "best test accuracy over epochs (DAN's protocol)",
            Protocol::Last5 => "mean test accuracy of the last 5 epochs (EAC's protocol)",
            Protocol::BestVal => {
                "test accuracy at the epoch of best validation accuracy (the epoch chosen without the test set)"
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub label: String,
    /// Dotted config keys and the values a trial must have.
    #[serde(rename = "where", default)]
    pub filter: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub label: String,
    /// Without a filter the row only carries published numbers (a peer method of the thesis).
    #[serde(rename = "where", default)]
    pub filter: Option<BTreeMap<String, Value>>,
    /// The thesis's number: one value, or one per column (null where the thesis has none).
    #[serde(default)]
    pub thesis: Option<Refs>,
    /// Other published numbers, by source (e.g. "DAN paper").
    #[serde(default)]
    pub published: BTreeMap<String, Refs>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Refs {
    One(f64),
    PerColumn(Vec<Option<f64>>),
}

impl Refs {
    pub fn get(&self, column: usize) -> Option<f64> {
        match self {
            Refs::One(x) if column == 0 => Some(*x),
            Refs::One(_) => None,
            Refs::PerColumn(v) => v.get(column).copied().flatten(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Refs::One(_) => 1,
            Refs::PerColumn(v) => v.len(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    #[serde(default)]
    pub kind: FigureKind,
    #[serde(default)]
    pub x_label: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FigureKind {
    /// Grouped bars: one group per row, one bar per column, error bars over seeds.
    #[default]
    Bars,
    /// Rows are points on a numeric x axis (their labels), one line per column.
    Line,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curve {
    /// A per-epoch metric name in the store (e.g. memorised_noisy).
    pub metric: String,
    #[serde(default = "train_split")]
    pub split: String,
    pub title: String,
    #[serde(default)]
    pub y_label: Option<String>,
}

fn train_split() -> String {
    "train".into()
}

impl ReportSpec {
    /// The columns, with the implicit single column filled in.
    pub fn columns(&self) -> Vec<Column> {
        if self.columns.is_empty() {
            vec![Column {
                label: "Accuracy (%)".into(),
                filter: BTreeMap::new(),
            }]
        } else {
            self.columns.clone()
        }
    }

    /// Checks that YAML types alone cannot express. Errors name the row and field.
    pub fn validate(&self, configs: &[&Value]) -> Result<(), String> {
        let columns = self.columns();
        // A filter key must lead somewhere in at least one trial's config (a misspelled key
        // would match nothing, or everything when its value is null).
        let known = |key: &str| -> Result<(), String> {
            if configs.iter().any(|c| lookup(c, key).is_some()) {
                return Ok(());
            }
            let top = key.split('.').next().unwrap_or(key);
            if configs.iter().all(|c| c.get(top).is_none()) {
                return Err(format!(
                    "report: `{key}` is not a config key (no `{top}` in the run config)"
                ));
            }
            Err(format!(
                "report: `{key}` is not a config key of any trial of the sweep (check its spelling)"
            ))
        };
        for c in &columns {
            for k in c.filter.keys() {
                known(k).map_err(|e| format!("column {:?}: {e}", c.label))?;
            }
        }
        for r in &self.rows {
            for k in r.filter.iter().flat_map(|f| f.keys()) {
                known(k).map_err(|e| format!("row {:?}: {e}", r.label))?;
            }
            let refs = r
                .thesis
                .iter()
                .map(|t| ("thesis", t))
                .chain(r.published.iter().map(|(k, v)| (k.as_str(), v)));
            for (source, refs) in refs {
                if refs.len() != columns.len() && !(refs.len() == 1 && columns.len() == 1) {
                    return Err(format!(
                        "row {:?}: {source} has {} values, the report has {} columns",
                        r.label,
                        refs.len(),
                        columns.len()
                    ));
                }
            }
            if self.figure.kind == FigureKind::Line
                && r.filter.is_some()
                && r.label.trim().parse::<f64>().is_err()
            {
                return Err(format!(
                    "row {:?}: a line figure needs numeric row labels (the x axis)",
                    r.label
                ));
            }
        }
        if self.rows.is_empty() {
            return Err("report: needs at least one row".into());
        }
        for (i, c) in self.contrasts.iter().enumerate() {
            let (labels, kind, known): ([String; 2], &str, Vec<&str>) = match (&c.rows, &c.columns) {
                (Some(r), None) => (
                    r.clone(),
                    "row",
                    self.rows
                        .iter()
                        .filter(|r| r.filter.is_some())
                        .map(|r| r.label.as_str())
                        .collect(),
                ),
                (None, Some(k)) => (
                    k.clone(),
                    "column",
                    columns.iter().map(|c| c.label.as_str()).collect(),
                ),
                _ => {
                    return Err(format!(
                        "report.contrasts[{i}]: give exactly one of `rows: [A, B]` or `columns: [A, B]`"
                    ))
                }
            };
            for l in &labels {
                if !known.contains(&l.as_str()) {
                    return Err(format!(
                        "report.contrasts[{i}]: no {kind} labelled {l:?} with trials (known: {})",
                        known
                            .iter()
                            .map(|k| format!("{k:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if labels[0] == labels[1] {
                return Err(format!(
                    "report.contrasts[{i}]: compares {:?} with itself",
                    labels[0]
                ));
            }
        }
        Ok(())
    }
}

/// The value at a dotted key of a config tree (None where a map on the way is missing or null).
pub fn lookup<'a>(config: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(config, |v, part| v.get(part))
}

/// Whether a config has every (key, value) of a filter. Numbers compare by value (0 == 0.0);
/// `null` matches a missing or null key.
pub fn matches(config: &Value, filter: &BTreeMap<String, Value>) -> bool {
    filter.iter().all(|(k, want)| {
        let have = lookup(config, k).unwrap_or(&Value::Null);
        match (have, want) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (a, b) => a == b,
        }
    })
}
