//! A report as text: the Markdown table (also printed), the Markdown page, the CSV, the figures'
//! data, and the index of all reports.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use super::plot;
use super::spec::Curve;
use super::{Cell, Report, Stat};
use crate::store::{Curves, DbUrl};

/// "85.71 ± 4.43 (n=3)"; "n=2 of 3" when trials are missing; "missing (0 of 3)" when none ran.
/// A cell holding an undertrained trial gets a dagger ("† 2" = two of its trials).
pub fn ours(cell: &Cell, stat: Option<Stat>) -> String {
    let of = if cell.done.len() < cell.expected {
        format!(" of {}", cell.expected)
    } else {
        String::new()
    };
    let under = cell.done.iter().filter(|o| o.undertrained).count();
    let dagger = if under > 0 {
        format!(" †{under}")
    } else {
        String::new()
    };
    match stat {
        None => format!("missing (0{of})"),
        Some(s) if s.n == 1 => format!("{:.2} (n=1{of}){dagger}", s.mean),
        Some(s) => format!("{:.2} ± {:.2} (n={}{of}){dagger}", s.mean, s.std, s.n),
    }
}

/// Pairs a contrast's interval would need to exclude 0 at most (the table says "> 200").
const SEEDS_CAP: usize = 200;

/// The contrasts table and what it supports, in words.
pub fn contrasts_section(report: &Report) -> Option<String> {
    let contrasts = report.contrasts();
    if contrasts.is_empty() {
        return None;
    }
    let mut md = String::from(
        "## Contrasts

",
    );
    md.push_str(
        "Each contrast pairs the two cells' trials by seed (same seed: same initial weights, data order and augmentation) \
and gives the mean difference in accuracy points with a 95 % confidence interval (Student's t over the paired \
differences, n − 1 degrees of freedom). A difference is **resolved** only when its interval excludes 0. \
\"Seeds to resolve\": the pairs a 95 % interval would need to exclude 0 if the observed mean difference and its \
spread held.\n\n",
    );
    md.push_str(
        "| Contrast | Pairs | Mean difference (points) | 95 % CI | Resolved | Seeds to resolve |\n",
    );
    md.push_str("|---|---|---|---|---|---|\n");
    let mut words = Vec::new();
    for c in &contrasts {
        let Some(p) = c.paired else {
            md.push_str(&format!(
                "| {} | 0 | | | no (no shared seed) | |\n",
                c.label
            ));
            continue;
        };
        let ci =
            p.ci.map(|(lo, hi)| format!("[{lo:+.2}, {hi:+.2}]"))
                .unwrap_or_else(|| "(one pair)".into());
        let resolved = if p.resolved() { "**yes**" } else { "no" };
        let seeds = match p.seeds_to_resolve(SEEDS_CAP) {
            None => "—".to_string(),
            Some(n) if n >= SEEDS_CAP => format!("> {}", SEEDS_CAP - 1),
            Some(n) if p.resolved() => format!("{n} (has {})", p.n),
            Some(n) => n.to_string(),
        };
        md.push_str(&format!(
            "| {} | {} | {:+.2} | {ci} | {resolved} | {seeds} |\n",
            c.label, p.n, p.mean
        ));
        let caveat = if c.undertrained > 0 {
            format!(
                " ({} of its trials undertrained: not a finding until they converge)",
                c.undertrained
            )
        } else {
            String::new()
        };
        words.push(if p.resolved() {
            format!(
                "- {}: resolved, {:+.2} points (95 % CI {ci}, n = {}){caveat}.",
                c.label, p.mean, p.n
            )
        } else {
            format!(
                "- {}: not resolved — the interval {ci} includes 0 (n = {}); this sweep does not show a difference{caveat}.",
                c.label, p.n
            )
        });
    }
    md.push_str("\n**What the numbers support**\n\n");
    md.push_str(&words.join("\n"));
    md.push('\n');
    Some(md)
}

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.2}")).unwrap_or_default()
}

/// Published sources in order of first appearance.
fn sources(report: &Report) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in &report.spec.rows {
        for k in r.published.keys() {
            if !out.contains(k) {
                out.push(k.clone());
            }
        }
    }
    out
}

/// The table: per column "ours", then the thesis's number and any published ones.
pub fn markdown_table(report: &Report) -> String {
    let spec = &report.spec;
    let has_thesis = spec.rows.iter().any(|r| r.thesis.is_some());
    let sources = sources(report);
    let multi = report.columns.len() > 1;
    // Per column, only the reference sources that have a number in it.
    let has = |c: usize, source: Option<&str>| {
        spec.rows.iter().any(|r| match source {
            None => r.thesis.as_ref().and_then(|t| t.get(c)).is_some(),
            Some(s) => r.published.get(s).and_then(|p| p.get(c)).is_some(),
        })
    };
    let refs: Vec<(bool, Vec<&String>)> = (0..report.columns.len())
        .map(|c| {
            (
                has_thesis && has(c, None),
                sources
                    .iter()
                    .filter(|s| has(c, Some(s.as_str())))
                    .collect(),
            )
        })
        .collect();
    let mut header = vec![spec.row_header.clone().unwrap_or_else(|| "Method".into())];
    for (c, col) in report.columns.iter().enumerate() {
        let prefix = if multi {
            format!("{}: ", col.label)
        } else {
            String::new()
        };
        header.push(format!("{prefix}ours (%)"));
        if refs[c].0 {
            header.push(format!("{prefix}thesis (%)"));
        }
        for s in &refs[c].1 {
            header.push(format!("{prefix}{s} (%)"));
        }
    }
    let mut lines = vec![
        format!("| {} |", header.join(" | ")),
        format!("|{}", "---|".repeat(header.len())),
    ];
    for (r, row) in spec.rows.iter().enumerate() {
        let mut cells = vec![row.label.clone()];
        for c in 0..report.columns.len() {
            cells.push(match report.cell(r, c) {
                Some(cell) => ours(cell, cell.stat(report.protocol)),
                None => String::new(),
            });
            if refs[c].0 {
                cells.push(num(row.thesis.as_ref().and_then(|t| t.get(c))));
            }
            for s in &refs[c].1 {
                cells.push(num(row.published.get(*s).and_then(|p| p.get(c))));
            }
        }
        lines.push(format!("| {} |", cells.join(" | ")));
    }
    lines.join("\n")
}

pub fn missing_lines(report: &Report) -> Vec<String> {
    report
        .missing()
        .map(|(cell, m)| {
            format!(
                "{}, seed {}: trial {} — {}",
                report.cell_label(cell),
                m.seed,
                &m.key[..16],
                m.status
            )
        })
        .collect()
}

fn get<'a>(setting: &'a [(String, String)], key: &str) -> Option<&'a str> {
    setting
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// One line saying what our numbers were measured on, from the settings all trials share.
pub fn data_summary(report: &Report) -> String {
    let s = &report.setting;
    let unq = |v: &str| v.trim_matches('"').to_string();
    let data = match get(s, "data.kind").map(unq).as_deref() {
        Some("synthetic") => format!(
            "synthetic faces (difficulty {}, {} train / {} test images of {} px)",
            get(s, "data.difficulty").unwrap_or("?"),
            get(s, "data.train").unwrap_or("?"),
            get(s, "data.test").unwrap_or("?"),
            get(s, "data.image_size").unwrap_or("?")
        ),
        Some("raf_db") => "RAF-DB".to_string(),
        Some("affect_net") => format!("AffectNet-{}", get(s, "data.classes").unwrap_or("?")),
        Some(other) => other.to_string(),
        None => "several data sets (see the columns)".to_string(),
    };
    let mut parts = vec![data];
    if let Some(f) = get(s, "validation.fraction") {
        let pct = f.parse::<f64>().map(|f| 100.0 * f).unwrap_or(f64::NAN);
        parts.push(format!(
            "{pct:.1} % of the training images held out per class for validation"
        ));
    }
    if let Some(w) = get(s, "model.backbone.widths") {
        let strides = get(s, "model.backbone.strides")
            .map(|st| format!(", stage strides {st}"))
            .unwrap_or_default();
        parts.push(format!(
            "ResNet widths {w}, blocks {}{strides}",
            get(s, "model.backbone.blocks").unwrap_or("?")
        ));
    }
    if let Some(i) = get(s, "input_size") {
        parts.push(format!("{i} px input"));
    }
    if let Some(e) = get(s, "epochs") {
        parts.push(format!("{e} epochs"));
    }
    parts.join(", ")
}

/// Commits of the trials behind the numbers, with counts.
pub fn code_versions(report: &Report) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for o in report.cells.iter().flat_map(|c| &c.done) {
        let c = o
            .git_commit
            .as_deref()
            .map(|c| &c[..c.len().min(10)])
            .unwrap_or("unknown");
        let label = if o.git_dirty {
            format!("{c} (uncommitted changes)")
        } else {
            c.to_string()
        };
        *counts.entry(label).or_default() += 1;
    }
    if counts.is_empty() {
        return "none (no completed trials)".into();
    }
    counts
        .iter()
        .map(|(c, n)| format!("`{c}` ({n} trial{})", if *n == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}

fn command(report: &Report) -> (String, String) {
    let profile = report
        .profile
        .as_ref()
        .map(|p| format!(" --profile {p}"))
        .unwrap_or_default();
    (
        format!("fer sweep {}{profile}", report.sweep_file.display()),
        format!("fer report {}{profile}", report.name),
    )
}

pub fn markdown(
    report: &Report,
    stem: &str,
    db: &DbUrl,
    pictures: &HashMap<String, (bool, bool)>,
    curves: &[(String, String)],
) -> String {
    let spec = &report.spec;
    let (sweep_cmd, report_cmd) = command(report);
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", spec.title);
    let _ = writeln!(
        md,
        "<!-- fer-report sweep={} sweep_command=\"{sweep_cmd}\" report_command=\"{report_cmd}\" -->\n",
        report.sweep_file.display()
    );
    let _ = writeln!(md, "{}\n", markdown_table(report));
    md.push_str(&claims_section(report, db, &sweep_cmd, &report_cmd));
    if let Some(n) = &spec.notes {
        let _ = writeln!(md, "\n{}", n.trim());
    }
    let _ = writeln!(
        md,
        "\n![{}]({stem}.png)\n\n([SVG]({stem}.svg))\n",
        spec.title
    );
    for (title, file) in curves {
        let _ = writeln!(md, "![{title}]({file}.png)\n\n([SVG]({file}.svg))\n");
    }
    if let Some(section) = contrasts_section(report) {
        let _ = writeln!(md, "{section}");
    }
    let missing = missing_lines(report);
    if !missing.is_empty() {
        let _ = writeln!(md, "## Missing results\n\nThese trials of the sweep have no completed result; their cells show how many of the expected trials they hold.\n");
        for m in missing {
            let _ = writeln!(md, "- {m}");
        }
        let _ = writeln!(md);
    }
    md.push_str(&trials_section(report, stem, pictures));
    let _ = writeln!(
        md,
        "\n<details><summary>Setting shared by every trial of this report</summary>\n"
    );
    for (k, v) in &report.setting {
        let _ = writeln!(md, "- `{k}` = `{v}`");
    }
    let _ = writeln!(md, "\n</details>");
    md
}

/// The bullet list under the table: what the numbers are (data, protocol, n), the published
/// setting, convergence, code version, how the report was made, what varies.
fn claims_section(report: &Report, db: &DbUrl, sweep_cmd: &str, report_cmd: &str) -> String {
    let spec = &report.spec;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "- **Ours**: {}. Protocol: **{}** — {}; mean ± sample standard deviation over seeds, n trials per cell.",
        data_summary(report),
        report.protocol.name(),
        report.protocol.describe()
    );
    if let Some(t) = &spec.thesis_setting {
        let _ = writeln!(md, "- **Thesis and published numbers**: {t}.");
    }
    let total: usize = report.cells.iter().map(|c| c.done.len()).sum();
    let under = report.undertrained();
    let _ = writeln!(
        md,
        "- **Convergence**: {}",
        if total == 0 {
            "no completed trials yet.".to_string()
        } else if under == 0 {
            format!("all {total} trials reached a plateau (the mean test accuracy of their last 3 epochs is within 1 point of their best epoch).")
        } else {
            format!("**{under} of {total} trials are undertrained** (the mean test accuracy of their last 3 epochs is more than 1 point below their best epoch; cells marked †N hold N of them): those cells are not findings.")
        }
    );
    let _ = writeln!(
        md,
        "- **Code version of the trials**: {}.",
        code_versions(report)
    );
    let _ = writeln!(
        md,
        "- **Made with**: `{sweep_cmd}`, then `{report_cmd}` (database `{}`, sweep `{}`).",
        db, report.sweep_name
    );
    if !report.varying.is_empty() {
        let _ = writeln!(
            md,
            "- **Varies between trials**: {}.",
            report
                .varying
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    md
}

/// The per-trial table: every completed trial of every cell with each protocol's accuracy, its
/// plateau verdict, code version and picture links.
fn trials_section(report: &Report, stem: &str, pictures: &HashMap<String, (bool, bool)>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Trials\n");
    let _ = writeln!(md, "| Cell | Seed | Trial | Final (%) | Best (%) | Last 3 (%) | Plateau | Last 5 (%) | Best-val epoch's test (%) | Balanced (%) | Epochs | Code | Pictures |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for cell in &report.cells {
        let label = report.cell_label(cell);
        let mut done: Vec<_> = cell.done.iter().collect();
        done.sort_by_key(|o| o.seed);
        for o in done {
            let short = &o.key[..16];
            let (curves, confusion) = pictures.get(&o.key).copied().unwrap_or((false, false));
            let mut links = Vec::new();
            if curves {
                links.push(format!("[curves]({stem}/trials/{short}-curves.png)"));
            }
            if confusion {
                links.push(format!("[confusion]({stem}/trials/{short}-confusion.png)"));
            }
            let _ = writeln!(
                md,
                "| {label} | {} | `{short}` | {:.2} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {} | `{}`{} | {} |",
                o.seed,
                100.0 * o.final_accuracy,
                100.0 * o.best_accuracy,
                100.0 * o.last3_accuracy,
                if o.undertrained { "**undertrained**" } else { "yes" },
                100.0 * o.last5_accuracy,
                num(o.val_selected_accuracy.map(|a| 100.0 * a)),
                num(o.balanced_accuracy.map(|b| 100.0 * b)),
                o.epochs,
                o.git_commit
                    .as_deref()
                    .map(|c| &c[..c.len().min(10)])
                    .unwrap_or("?"),
                if o.git_dirty { "+" } else { "" },
                links.join(" ")
            );
        }
    }
    md
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One line per table cell: our statistics under every protocol, and the published numbers.
pub fn csv(report: &Report) -> String {
    use super::spec::Protocol;
    let sources = sources(report);
    let mut header: Vec<String> = [
        "row",
        "column",
        "protocol",
        "n",
        "expected",
        "mean",
        "std",
        "min",
        "max",
        "final_mean",
        "best_mean",
        "last5_mean",
        "balanced_mean",
        "undertrained",
        "thesis",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(sources.iter().map(|s| format!("published: {s}")));
    let mut out = header
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",")
        + "\n";
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
    for (r, row) in report.spec.rows.iter().enumerate() {
        for (c, column) in report.columns.iter().enumerate() {
            let cell = report.cell(r, c);
            let thesis = row.thesis.as_ref().and_then(|t| t.get(c));
            let published: Vec<Option<f64>> = sources
                .iter()
                .map(|s| row.published.get(s).and_then(|p| p.get(c)))
                .collect();
            if cell.is_none() && thesis.is_none() && published.iter().all(|p| p.is_none()) {
                continue;
            }
            let stat = cell.and_then(|c| c.stat(report.protocol));
            let values: Vec<f64> = cell
                .map(|c| {
                    c.done
                        .iter()
                        .filter_map(|o| o.accuracy(report.protocol).map(|a| 100.0 * a))
                        .collect()
                })
                .unwrap_or_default();
            let mean_of = |p: Protocol| cell.and_then(|c| c.stat(p)).map(|s| s.mean);
            let balanced = cell.and_then(|c| {
                let v: Vec<f64> = c
                    .done
                    .iter()
                    .filter_map(|o| o.balanced_accuracy.map(|b| 100.0 * b))
                    .collect();
                Stat::of(&v).map(|s| s.mean)
            });
            let mut fields = vec![
                csv_field(&row.label),
                csv_field(&column.label),
                report.protocol.name().to_string(),
                cell.map(|c| c.done.len().to_string()).unwrap_or_default(),
                cell.map(|c| c.expected.to_string()).unwrap_or_default(),
                f(stat.map(|s| s.mean)),
                f(stat.map(|s| s.std)),
                f(values.iter().copied().reduce(f64::min)),
                f(values.iter().copied().reduce(f64::max)),
                f(mean_of(Protocol::Final)),
                f(mean_of(Protocol::Best)),
                f(mean_of(Protocol::Last5)),
                f(balanced),
                cell.map(|c| c.done.iter().filter(|o| o.undertrained).count().to_string())
                    .unwrap_or_default(),
                f(thesis),
            ];
            fields.extend(published.into_iter().map(f));
            out += &(fields.join(",") + "\n");
        }
    }
    out
}

/// The report's main figure: a line over numeric rows, or grouped bars.
pub fn save_main_figure(report: &Report, stem: &Path) -> anyhow::Result<()> {
    use super::spec::FigureKind;
    let spec = &report.spec;
    let y_label = format!("test accuracy, {} (%)", report.protocol.name());
    let data_rows: Vec<usize> = (0..spec.rows.len())
        .filter(|&r| spec.rows[r].filter.is_some())
        .collect();
    match spec.figure.kind {
        FigureKind::Line => {
            let x = |r: usize| spec.rows[r].label.trim().parse::<f64>().unwrap_or(r as f64);
            let series = (0..report.columns.len())
                .map(|c| {
                    let pts = data_rows
                        .iter()
                        .zip(report.column_stats(&data_rows, c))
                        .filter_map(|(&r, st)| st.map(|s| (x(r), s.mean, s.std)))
                        .collect();
                    (format!("ours{}", report.column_suffix(c)), pts)
                })
                .collect();
            let mut references = Vec::new();
            for c in 0..report.columns.len() {
                let suffix = report.column_suffix(c);
                let thesis: Vec<(f64, f64)> = data_rows
                    .iter()
                    .filter_map(|&r| {
                        spec.rows[r]
                            .thesis
                            .as_ref()
                            .and_then(|t| t.get(c))
                            .map(|y| (x(r), y))
                    })
                    .collect();
                if !thesis.is_empty() {
                    references.push((format!("thesis (reported){suffix}"), thesis));
                }
            }
            plot::save(
                &plot::LineChart {
                    title: spec.title.clone(),
                    x_label: spec.figure.x_label.clone().unwrap_or_default(),
                    y_label,
                    series,
                    references,
                },
                stem,
                (900, 560),
                true,
            )
        }
        FigureKind::Bars => {
            let groups: Vec<String> = data_rows
                .iter()
                .map(|&r| spec.rows[r].label.clone())
                .collect();
            let series = (0..report.columns.len())
                .map(|c| {
                    let v = report
                        .column_stats(&data_rows, c)
                        .into_iter()
                        .map(|st| st.map(|s| (s.mean, s.std)))
                        .collect();
                    (format!("ours{}", report.column_suffix(c)), v)
                })
                .collect();
            let thesis: Vec<Vec<Option<f64>>> = data_rows
                .iter()
                .map(|&r| {
                    (0..report.columns.len())
                        .map(|c| spec.rows[r].thesis.as_ref().and_then(|t| t.get(c)))
                        .collect()
                })
                .collect();
            let references = if thesis.iter().flatten().any(|v| v.is_some()) {
                vec![("thesis (reported)".to_string(), thesis)]
            } else {
                vec![]
            };
            plot::save(
                &plot::BarChart {
                    title: spec.title.clone(),
                    y_label,
                    groups,
                    series,
                    references,
                },
                stem,
                (900, 560),
                true,
            )
        }
    }
}

/// Learning curves of one trial; false when it has no per-epoch metrics.
pub fn save_learning_curves(metrics: &Curves, title: &str, stem: &Path) -> anyhow::Result<bool> {
    let series = |split: &str, name: &str, label: &str, scale: f64| {
        metrics
            .get(&(split.to_string(), name.to_string()))
            .filter(|v| !v.is_empty())
            .map(|v| {
                (
                    label.to_string(),
                    v.iter()
                        .map(|&(e, x)| (e as f64, scale * x))
                        .collect::<Vec<_>>(),
                )
            })
    };
    let losses: Vec<_> = [
        ("loss_total", "total"),
        ("loss_ce", "cross-entropy"),
        ("loss_affinity", "affinity"),
        ("loss_partition", "partition"),
        ("loss_consistency", "consistency"),
    ]
    .iter()
    .filter_map(|(n, l)| series("train", n, l, 1.0))
    .collect();
    let accuracies: Vec<_> = [
        ("train", "accuracy", "train"),
        ("test", "accuracy", "test"),
        ("test", "balanced_accuracy", "test, balanced"),
        ("train", "memorised_noisy", "noisy labels memorised"),
    ]
    .iter()
    .filter_map(|(s, n, l)| series(s, n, l, 100.0))
    .collect();
    if losses.is_empty() && accuracies.is_empty() {
        return Ok(false);
    }
    plot::save(
        &plot::LearningCurves {
            title: title.to_string(),
            losses,
            accuracies,
        },
        stem,
        (1000, 420),
        false,
    )?;
    Ok(true)
}

/// A per-epoch metric averaged over each cell's trials; false when no trial has it.
pub fn save_curve_figure(report: &Report, curve: &Curve, stem: &Path) -> anyhow::Result<bool> {
    let mut series = Vec::new();
    for cell in &report.cells {
        let mut by_epoch: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for o in &cell.done {
            for &(e, v) in o
                .curves
                .get(&(curve.split.clone(), curve.metric.clone()))
                .map(|v| v.as_slice())
                .unwrap_or(&[])
            {
                by_epoch.entry(e).or_default().push(100.0 * v);
            }
        }
        if by_epoch.is_empty() {
            continue;
        }
        let pts = by_epoch
            .iter()
            .filter_map(|(&e, v)| Stat::of(v).map(|s| (e as f64, s.mean, s.std)))
            .collect();
        series.push((report.cell_label(cell), pts));
    }
    if series.is_empty() {
        return Ok(false);
    }
    plot::save(
        &plot::LineChart {
            title: curve.title.clone(),
            x_label: "epoch".into(),
            y_label: curve
                .y_label
                .clone()
                .unwrap_or_else(|| curve.metric.clone()),
            series,
            references: vec![],
        },
        stem,
        (900, 560),
        true,
    )?;
    Ok(true)
}

/// reports/README.md: every report in the folder, its sweep and the commands that made it.
pub fn write_index(out: &Path) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(out)? {
        let p = entry?.path();
        let Some(stem) = p.file_stem().map(|s| s.to_string_lossy().to_string()) else {
            continue;
        };
        if p.extension().is_none_or(|e| e != "md") || stem == "README" {
            continue;
        }
        let text = std::fs::read_to_string(&p)?;
        let title = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("# ")
            .to_string();
        let attr = |name: &str| -> String {
            text.lines()
                .find(|l| l.starts_with("<!-- fer-report"))
                .and_then(|l| l.split(&format!("{name}=\"")).nth(1))
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        entries.push((stem, title, attr("sweep_command"), attr("report_command")));
    }
    entries.sort();
    let mut md = String::from(
        "# Reports\n\nTables and figures of the thesis regenerated from the results database (`fer.db`). Each report\n\
         has `NAME.md` (table, figure, per-trial learning curves and confusion matrices), `NAME.csv` (one\n\
         line per cell, every protocol) and `NAME.png` / `NAME.svg`. This index is rewritten by every\n\
         `fer report`.\n\n| Report | What | Made with |\n|---|---|---|\n",
    );
    for (stem, title, sweep, report) in entries {
        let _ = writeln!(
            md,
            "| [{stem}]({stem}.md) | {title} | `{sweep}`, then `{report}` |"
        );
    }
    std::fs::write(out.join("README.md"), md)?;
    Ok(())
}
