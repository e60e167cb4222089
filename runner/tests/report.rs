//! `fer report` end to end: a real tiny sweep fills the database, the test then sets every
//! trial's test accuracy to values it chose, and the report must give exactly the statistics
//! those values imply, under each protocol; a trial without a result is listed and fails the
//! command unless --allow-missing.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fer, tmp};

const SWEEP: &str = "\
base: base.yaml
overrides: {epochs: 2}
grid:
  model.heads: [1, 2]
seeds: [0, 1]
report:
  title: \"Table T: heads\"
  row_header: Heads
  protocol: final
  thesis_setting: made up for the test
  rows:
    - {label: \"1\", where: {model.heads: 1}, thesis: 87.88, published: {\"Paper\": 80.5}}
    - {label: \"2\", where: {model.heads: 2}, thesis: 89.07}
    - {label: \"Peer\", thesis: 70.25}
  contrasts:
    - {rows: [\"2\", \"1\"]}
";

fn sql(db: &Path, query: &str) -> String {
    let o = Command::new("sqlite3")
        .arg(db)
        .arg(query)
        .output()
        .expect("sqlite3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn report(dir: &Path, extra: &[&str]) -> Output {
    fer()
        .arg("report")
        .arg(dir.join("t.yaml"))
        .arg("--db")
        .arg(dir.join("r.db"))
        .arg("--out")
        .arg(dir.join("reports"))
        .args(extra)
        .output()
        .unwrap()
}

/// Run the sweep, then overwrite test accuracy: 0.1 * heads + 0.01 * seed + 0.05 * epoch.
fn filled(tag: &str) -> std::path::PathBuf {
    let d = tmp(tag);
    std::fs::write(d.join("base.yaml"), common::TINY_CONFIG).unwrap();
    std::fs::write(d.join("t.yaml"), SWEEP).unwrap();
    let o = fer()
        .arg("sweep")
        .arg(d.join("t.yaml"))
        .arg("--db")
        .arg(d.join("r.db"))
        .arg("--runs-dir")
        .arg(d.join("runs"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    sql(
        &d.join("r.db"),
        "UPDATE metrics SET value = (
             SELECT 0.1 * p.value_num + 0.01 * t.seed + 0.05 * metrics.epoch
             FROM attempts a JOIN trials t ON t.key = a.trial_key
             JOIN trial_params p ON p.trial_key = t.key AND p.name = 'model.heads'
             WHERE a.id = metrics.attempt_id)
         WHERE split = 'test' AND name = 'accuracy';",
    );
    d
}

#[test]
fn table_csv_and_figures_from_the_database() {
    let d = filled("report-ok");
    // Reading results never writes the database (it opens read-only).
    sql(&d.join("r.db"), "PRAGMA wal_checkpoint(TRUNCATE);");
    let before = std::fs::read(d.join("r.db")).unwrap();
    let o = report(&d, &[]);
    let runs = fer()
        .args(["runs", "--db"])
        .arg(d.join("r.db"))
        .output()
        .unwrap();
    assert!(runs.status.success(), "{}", text(&runs));
    assert_eq!(
        std::fs::read(d.join("r.db")).unwrap(),
        before,
        "reading changed the database"
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // Final epoch (2): heads 1 -> 0.20, 0.21; heads 2 -> 0.30, 0.31. Sample std of 2 values 1 % apart: 0.71.
    assert!(
        out.contains("| Heads | ours (%) | thesis (%) | Paper (%) |"),
        "{out}"
    );
    assert!(
        out.contains("| 1 | 20.50 ± 0.71 (n=2) †2 | 87.88 | 80.50 |"),
        "{out}"
    );
    assert!(
        out.contains("| 2 | 30.50 ± 0.71 (n=2) †2 | 89.07 |  |"),
        "{out}"
    );
    assert!(out.contains("| Peer |  | 70.25 |  |"), "{out}");

    let reports = d.join("reports");
    let csv = std::fs::read_to_string(reports.join("t.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "row,column,protocol,n,expected,mean,std,min,max,final_mean,best_mean,last5_mean,balanced_mean,undertrained,thesis,published: Paper"
    );
    // Mean of the last 5 (here both) epochs: heads 1 -> 0.175, 0.185.
    let row1: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(
        &row1[..12],
        &[
            "1",
            "Accuracy (%)",
            "final",
            "2",
            "2",
            "20.5000",
            "0.7071",
            "20.0000",
            "21.0000",
            "20.5000",
            "20.5000",
            "18.0000"
        ]
    );
    assert_eq!(row1[13], "2", "both trials of 2 epochs are undertrained");
    assert_eq!(row1[14], "87.8800");
    assert_eq!(row1[15], "80.5000");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("Peer,") && l.contains(",70.2500,")));

    let md = std::fs::read_to_string(reports.join("t.md")).unwrap();
    assert!(md.starts_with("# Table T: heads"));
    assert!(md.contains("Protocol: **final**"));
    assert!(md.contains("synthetic faces (difficulty 0.2"));
    assert!(!md.contains("## Missing results"));
    // Paired by seed: heads 2 - heads 1 is 10 points for both seeds.
    assert!(
        md.contains("| 2 − 1 | 2 | +10.00 | [+10.00, +10.00] | **yes** | 2 (has 2) |"),
        "{md}"
    );
    assert!(md.contains("**4 of 4 trials are undertrained**"), "{md}");
    assert!(md.contains("not a finding until they converge"), "{md}");
    for f in ["t.png", "t.svg", "README.md"] {
        assert!(reports.join(f).is_file(), "{f}");
    }
    let png = image::open(reports.join("t.png")).unwrap();
    assert_eq!((png.width(), png.height()), (900, 560));
    let svg = std::fs::read_to_string(reports.join("t.svg")).unwrap();
    assert!(svg.contains("Table T: heads"));
    // Learning curves and a confusion matrix for each of the 4 trials, linked from the page.
    let pictures: Vec<_> = std::fs::read_dir(reports.join("t/trials"))
        .unwrap()
        .collect();
    assert_eq!(pictures.len(), 8);
    assert_eq!(md.matches("-confusion.png)").count(), 4);
    let index = std::fs::read_to_string(reports.join("README.md")).unwrap();
    assert!(index.contains("| [t](t.md) | Table T: heads |"), "{index}");
}

#[test]
fn protocol_selection() {
    let d = filled("report-protocol");
    let o = report(&d, &["--protocol", "last5"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // Mean of epochs 1 and 2: heads 2 -> 0.275, 0.285.
    assert!(out.contains("| 2 | 28.00 ± 0.71 (n=2) †2 |"), "{out}");
    let md = std::fs::read_to_string(d.join("reports/t.md")).unwrap();
    assert!(md.contains("Protocol: **last5**"));
    // Best epoch: make epoch 1 the best (0.75, 0.76 for heads 2), unlike the final epoch.
    sql(
        &d.join("r.db"),
        "UPDATE metrics SET value = value + 0.5 WHERE split = 'test' AND name = 'accuracy' AND epoch = 1;",
    );
    let o = report(&d, &["--protocol", "best"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| 2 | 75.50 ± 0.71 (n=2) †2 |"), "{out}");
    let o = report(&d, &["--protocol", "final"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| 2 | 30.50 ± 0.71 (n=2) †2 |"), "{out}");
}

#[test]
fn a_missing_cell_is_listed_and_fails_unless_allowed() {
    let d = filled("report-missing");
    let db = d.join("r.db");
    let key = sql(
        &db,
        "SELECT t.key FROM trials t JOIN trial_params p ON p.trial_key = t.key AND p.name = 'model.heads' WHERE p.value_num = 2 AND t.seed = 1;",
    );
    sql(
        &db,
        &format!(
            "DELETE FROM metrics WHERE attempt_id IN (SELECT id FROM attempts WHERE trial_key = '{key}');
             UPDATE attempts SET status = 'failed', failure_class = 'crash', error = 'boom' WHERE trial_key = '{key}';"
        ),
    );
    let o = report(&d, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "2, seed 1: trial {} — failed (crash): boom",
            &key[..16]
        )),
        "{err}"
    );
    assert!(err.contains("--allow-missing"), "{err}");
    assert!(
        !d.join("reports/t.md").exists(),
        "nothing is written for an incomplete report"
    );

    let o = report(&d, &["--allow-missing"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| 2 | 30.00 (n=1 of 2) †1 | 89.07 |"), "{out}");
    let md = std::fs::read_to_string(d.join("reports/t.md")).unwrap();
    assert!(md.contains("## Missing results"));
    assert!(md.contains(&key[..16]));
    // The whole cell gone: still a row, marked missing.
    sql(&db, "DELETE FROM attempts WHERE trial_key IN (SELECT trial_key FROM trial_params WHERE name = 'model.heads' AND value_num = 2) AND status = 'completed';");
    let o = report(&d, &["--allow-missing"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| 2 | missing (0 of 2) | 89.07 |"), "{out}");
}

#[test]
fn report_section_errors_name_the_file_and_row() {
    let d = tmp("report-bad");
    std::fs::write(d.join("base.yaml"), common::TINY_CONFIG).unwrap();
    // A row no trial of the sweep matches is a mistake in the report, not a missing result.
    let bad = SWEEP.replace("where: {model.heads: 2}", "where: {model.heads: 3}");
    std::fs::write(d.join("t.yaml"), bad).unwrap();
    std::fs::write(d.join("r.db"), "").unwrap();
    let o = report(&d, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("t.yaml") && err.contains("row \"2\"") && err.contains("matches no trial"),
        "{err}"
    );
    // Thesis numbers must fit the columns; an unknown config key is named.
    let bad = SWEEP.replace("thesis: 89.07", "thesis: [89.07, 1.0]");
    std::fs::write(d.join("t.yaml"), bad).unwrap();
    let err = text(&report(&d, &[]));
    assert!(
        err.contains("row \"2\": thesis has 2 values, the report has 1 columns"),
        "{err}"
    );
    let bad = SWEEP.replace("where: {model.heads: 2}", "where: {modle.heads: 2}");
    std::fs::write(d.join("t.yaml"), bad).unwrap();
    let err = text(&report(&d, &[]));
    assert!(err.contains("`modle.heads` is not a config key"), "{err}");
    // A protocol the tool does not know: the YAML error has line:column.
    let bad = SWEEP.replace("protocol: final", "protocol: median");
    std::fs::write(d.join("t.yaml"), bad).unwrap();
    let err = text(&report(&d, &[]));
    assert!(err.contains("t.yaml:") && err.contains("median"), "{err}");
}

/// `--html`: one self-contained file (figures and trial pictures inlined, nothing fetched) in
/// which text from the sweep file (title, labels, notes) shows as text, never as markup.
#[test]
fn the_html_report_is_self_contained_and_escapes_what_the_sweep_file_says() {
    let d = filled("html");
    let hostile = SWEEP
        .replace("title: \"Table T: heads\"", "title: \"Table <script>alert(1)</script>\"")
        .replace("{label: \"1\",", "{label: \"<b>1</b>\",")
        .replace("{rows: [\"2\", \"1\"]}", "{rows: [\"2\", \"<b>1</b>\"]}")
        .replace(
            "  thesis_setting: made up for the test\n",
            "  thesis_setting: made up for the test\n  notes: \"<img src=x onerror=alert(2)> & more\"\n",
        );
    std::fs::write(d.join("t.yaml"), hostile).unwrap();
    let o = report(&d, &["--html"]);
    assert!(o.status.success(), "{}", text(&o));
    let html = std::fs::read_to_string(d.join("reports/t.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        !html.contains("<script") && !html.contains("<img src=x") && !html.contains("<b>1</b>")
    );
    assert!(
        html.contains("Table &lt;script&gt;alert(1)&lt;/script&gt;"),
        "title as text"
    );
    assert!(
        html.contains("&lt;b&gt;1&lt;/b&gt;")
            && html.contains("&lt;img src=x onerror=alert(2)&gt; &amp; more")
    );
    // Self-contained: the figure and every trial's two pictures inlined; nothing to fetch.
    assert!(html.contains("<img src=\"data:image/svg+xml;base64,"));
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 8);
    assert!(
        !html.contains("src=\"http")
            && !html.contains("href=\"http")
            && !html.contains("src=\"heads")
    );
    // The same numbers as the Markdown page: every trial key of its trial table.
    let md = std::fs::read_to_string(d.join("reports/t.md")).unwrap();
    for key in md
        .lines()
        .filter_map(|l| l.split('`').nth(1))
        .filter(|k| k.len() == 16)
    {
        assert!(html.contains(&format!("<code>{key}</code>")), "{key}");
    }
}

/// `fer serve` shows each sweep's report as `fer report --html` writes it, rendered from the
/// store at request time (same title, same trial keys); a sweep without one is a 404.
#[test]
fn the_dashboard_serves_the_same_report() {
    let d = filled("serve-report");
    let o = report(&d, &["--html"]);
    assert!(o.status.success(), "{}", text(&o));
    let written = std::fs::read_to_string(d.join("reports/t.html")).unwrap();
    let server = crate::dashboard::Server::start(&d.join("r.db"), &[]);
    let page = server.get("/reports/t", &[]);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.starts_with("<!DOCTYPE html>"));
    assert!(page.body.contains("Table T: heads"));
    let keys = |html: &str| -> Vec<String> {
        html.split("<code>")
            .skip(1)
            .filter_map(|s| s.split("</code>").next())
            .filter(|k| k.len() == 16)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(keys(&page.body), keys(&written));
    assert!(!keys(&written).is_empty());
    assert_eq!(server.get("/reports/nope", &[]).status, 404);
}
