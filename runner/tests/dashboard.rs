//! `fer serve` end to end: a store filled through the runner's own event path
//! (`scheduler::record_line`), the real server, and a real headless Chromium that reads the
//! pages as a user would (trial table, filter, trial page chart, compare, parallel coordinates,
//! live updates), with hostile text in a sweep value and an error message. Set
//! `FER_SCREENSHOTS=DIR` to keep the screenshots (the README's come from here).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use fer_model::events::{Event, EventLine};
use fer_runner::scheduler::record_line;
use fer_runner::store::{AttemptEnd, Claimant, DbUrl, Store};
use serde_json::{json, Value};

use crate::common::{self, browser::Browser, http};

const HOSTILE_PARAM: &str = "<img src=x onerror=\"window.__xss=1\">";
const HOSTILE_ERROR: &str = "error: <script>window.__xss=2</script> boom";

/// `fer serve` on `db` (any free port) with extra arguments; its address (`127.0.0.1:PORT`)
/// and the first line it printed.
pub struct Server {
    child: Child,
    pub addr: String,
    pub banner: String,
}

impl Server {
    pub fn start(db: &Path, extra: &[&str]) -> Server {
        let mut child = common::fer()
            .args(["serve", "--db"])
            .arg(db)
            .args(["--poll-seconds", "0.2"])
            .args(if extra.contains(&"--bind") {
                &[][..]
            } else {
                &["--bind", "127.0.0.1:0"][..]
            })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut banner = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut banner).unwrap();
        // Keep reading: a closed pipe would end the server at its next line of output.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let addr = banner
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("no address in {banner:?}"))
            .to_string();
        Server {
            child,
            addr,
            banner,
        }
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> http::Response {
        http::request(&self.addr, "GET", path, headers, None).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn claimant() -> Claimant {
    Claimant {
        device: "cpu0".into(),
        host: "testhost".into(),
        pid: 4242,
        git_commit: Some("0123456789abcdef".into()),
        git_dirty: Some(false),
        slurm_job: None,
    }
}

fn started(steps: usize) -> String {
    EventLine::line(&Event::Started {
        epochs: 3,
        start_epoch: 0,
        steps_per_epoch: steps,
        train_samples: 80,
        test_samples: 40,
        skipped_samples: 0,
        class_names: vec!["calm".into(), "happy".into(), "sad".into()],
    })
}

fn epoch(epoch: usize, accuracy: f64) -> String {
    let m = serde_json::from_value(json!({
        "epoch": epoch, "lr": 0.001, "loss_total": 2.0 / epoch as f64, "loss_ce": 1.5 / epoch as f64,
        "loss_affinity": 0.3, "loss_partition": 0.2, "train_accuracy": accuracy - 0.05,
        "test_accuracy": accuracy, "test_balanced_accuracy": accuracy - 0.01,
        "train_seconds": 1.5, "eval_seconds": 0.5, "train_img_per_s": 50.0,
        "confusion": [[10, 2, 1], [1, 11, 1], [3, 1, 10]]
    }))
    .unwrap();
    EventLine::line(&Event::Epoch(m))
}

fn step(epoch: usize, step: usize, steps: usize) -> String {
    EventLine::line(&Event::Step {
        epoch,
        step,
        steps,
        loss: 1.0,
    })
}

/// The trials of sweep `heads`, by name: A (2 heads, a hostile tag) and B (4 heads) completed,
/// C (4 heads, seed 2) failed with a hostile error, D (8 heads) running in epoch 2.
pub struct Filled {
    pub db: PathBuf,
    pub store: Store,
    pub keys: [String; 4],
    pub running_attempt: i64,
}

/// `fill` in a fresh folder, the store's pool closed (the server opens the file by itself).
fn filled_and_closed(name: &str) -> Filled {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = rt.block_on(fill(&common::tmp(name)));
    rt.block_on(f.store.clone().close());
    f
}

pub async fn fill(dir: &Path) -> Filled {
    let db = dir.join("fer.db");
    let store = Store::open(&DbUrl::Sqlite(db.clone())).await.unwrap();
    let sweep = store
        .upsert_sweep("heads", "experiments/heads.yaml", None)
        .await
        .unwrap();
    let bar = indicatif::ProgressBar::hidden();
    let trials = [
        (2, HOSTILE_PARAM, 1, "a"),
        (4, "plain", 1, "b"),
        (4, "plain", 2, "c"),
        (8, "plain", 1, "d"),
    ];
    let mut keys = Vec::new();
    let mut running_attempt = 0;
    for (heads, tag, seed, name) in trials {
        let key = format!("{name}{}", "0123456789abcdef0123456789abcdef".repeat(2));
        let params = json!({"model.heads": heads, "tag": tag});
        let config = json!({"epochs": 3, "model": {"heads": heads}, "seed": seed});
        store
            .upsert_trial(&key, sweep, seed, &config, &params)
            .await
            .unwrap();
        let attempt = store.claim(&key, &claimant()).await.unwrap().unwrap();
        record_line(&store, attempt, &started(10), &bar)
            .await
            .unwrap();
        match name {
            "a" | "b" => {
                for e in 1..=3 {
                    let acc = 0.3 + 0.1 * e as f64 + if name == "b" { 0.05 } else { 0.0 };
                    record_line(&store, attempt, &epoch(e, acc), &bar)
                        .await
                        .unwrap();
                }
                store
                    .finish(attempt, common::ended("completed"))
                    .await
                    .unwrap();
            }
            "c" => {
                record_line(&store, attempt, &epoch(1, 0.35), &bar)
                    .await
                    .unwrap();
                let failed = AttemptEnd {
                    exit_code: Some(1),
                    failure_class: Some("crash"),
                    error: Some(HOSTILE_ERROR.into()),
                    stderr_tail: Some(format!("traceback line\n{HOSTILE_ERROR}")),
                    ..common::ended("failed")
                };
                store.finish(attempt, failed).await.unwrap();
            }
            _ => {
                record_line(&store, attempt, &epoch(1, 0.31), &bar)
                    .await
                    .unwrap();
                record_line(&store, attempt, &step(2, 3, 10), &bar)
                    .await
                    .unwrap();
                running_attempt = attempt;
            }
        }
        keys.push(key);
    }
    Filled {
        db,
        store,
        keys: keys.try_into().unwrap(),
        running_attempt,
    }
}

/// The API answers what the store holds: the trial table's statuses, progress and accuracies,
/// a trial's curves, confusion matrix and attempts; the database is never written.
#[test]
fn the_api_reports_what_the_store_holds() {
    let f = filled_and_closed("dash-api");
    let before = std::fs::read(&f.db).unwrap();
    let server = Server::start(&f.db, &[]);

    let r = server.get("/api/sweeps/heads", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["axes"], json!(["model.heads", "tag"]));
    let by_key = |k: &str| {
        v["trials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == k)
            .unwrap()
            .clone()
    };
    let [a, b, c, d] = &f.keys;
    let ta = by_key(a);
    assert_eq!(ta["params"]["tag"], HOSTILE_PARAM);
    assert_eq!(ta["latest"]["status"], "completed");
    assert!((ta["accuracy"]["final"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert!((ta["accuracy"]["best"].as_f64().unwrap() - 0.6).abs() < 1e-9);
    assert!((ta["accuracy"]["last5"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    // Three epochs are fewer than the plateau window: not shown as converged.
    assert_eq!(ta["accuracy"]["undertrained"], true);
    assert_eq!(ta["epochs"], 3);
    assert!((by_key(b)["accuracy"]["final"].as_f64().unwrap() - 0.65).abs() < 1e-9);
    let tc = by_key(c);
    assert_eq!(
        (&tc["latest"]["status"], &tc["latest"]["failure_class"]),
        (&json!("failed"), &json!("crash"))
    );
    assert_eq!(tc["latest"]["error"], HOSTILE_ERROR);
    let td = by_key(d);
    assert_eq!(td["latest"]["status"], "running");
    assert_eq!(
        td["latest"]["progress"],
        json!({"epoch": 2, "step": 3, "steps": 10})
    );

    let r = server.get(&format!("/api/trials/{a}"), &[]);
    let t: Value = serde_json::from_str(&r.body).unwrap();
    let metrics: Vec<&str> = t["curves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metric"].as_str().unwrap())
        .collect();
    for m in [
        "test/accuracy",
        "train/loss_total",
        "train/loss_ce",
        "test/balanced_accuracy",
    ] {
        assert!(metrics.contains(&m), "{m} in {metrics:?}");
    }
    assert_eq!(t["confusion"]["epoch"], 3);
    assert_eq!(
        t["confusion"]["class_names"],
        json!(["calm", "happy", "sad"])
    );
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1);
    let tc: Value =
        serde_json::from_str(&server.get(&format!("/api/trials/{c}"), &[]).body).unwrap();
    assert!(tc["attempts"][0]["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("traceback line"));

    let r = server.get("/api/sweeps/heads/curves?metric=test/accuracy", &[]);
    let cv: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(cv["curves"][b].as_array().unwrap().len(), 3);
    assert_eq!(server.get("/api/sweeps/nope", &[]).status, 404);
    assert_eq!(server.get("/api/trials/nope", &[]).status, 404);
    assert_eq!(
        server
            .get("/api/sweeps/heads/curves?metric=accuracy", &[])
            .status,
        400
    );
    // The page itself: our scripts only, never inline ones.
    let page = server.get("/", &[]);
    assert!(page.body.contains("/assets/app.js"));
    let csp = page.header("content-security-policy").unwrap();
    assert!(csp.contains("default-src 'self'") && !csp.contains("script-src 'unsafe-inline'"));
    assert_eq!(server.get("/assets/uPlot.iife.min.js", &[]).status, 200);
    assert_eq!(server.get("/assets/../Cargo.toml", &[]).status, 404);
    drop(server);
    assert!(
        std::fs::read(&f.db).unwrap() == before,
        "serving changed the database file"
    );
}

/// Loopback without a token answers only requests addressed to a loopback name; any other
/// address needs a token (generated and printed when none is given), on every request.
#[test]
fn other_addresses_need_the_token_on_every_request() {
    let f = filled_and_closed("dash-token");

    let local = Server::start(&f.db, &["--bind", "127.0.0.1:0"]);
    assert_eq!(local.get("/api/sweeps", &[]).status, 200);
    let rebound = local.get("/api/sweeps", &[("Host", "evil.example:8080")]);
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    drop(local);

    let open = Server::start(&f.db, &["--bind", "0.0.0.0:0"]);
    let token = open
        .banner
        .split("?token=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token printed: {}", open.banner))
        .to_string();
    assert_eq!(token.len(), 32);
    let port = open.addr.rsplit(':').next().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let get = |path: &str, headers: &[(&str, &str)]| {
        http::request(&addr, "GET", path, headers, None).unwrap()
    };
    for path in ["/", "/api/sweeps", "/api/events", "/assets/app.js"] {
        assert_eq!(get(path, &[]).status, 401, "{path} without the token");
    }
    assert_eq!(get(&format!("/api/sweeps?token={token}x"), &[]).status, 401);
    let first = get(&format!("/?token={token}"), &[]);
    assert_eq!(first.status, 200);
    let cookie = first.header("set-cookie").unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let cookie = cookie.split(';').next().unwrap().to_string();
    assert_eq!(get("/api/sweeps", &[("Cookie", &cookie)]).status, 200);
    let bearer = format!("Bearer {token}");
    assert_eq!(
        get("/api/sweeps", &[("Authorization", &bearer)]).status,
        200
    );
    drop(open);

    let given = Server::start(
        &f.db,
        &["--bind", "127.0.0.1:0", "--token", "0123456789abcdef-given"],
    );
    assert!(!given.banner.contains("0123456789abcdef-given"));
    assert_eq!(given.get("/api/sweeps", &[]).status, 401);
    assert_eq!(
        given
            .get(
                "/api/sweeps",
                &[("Authorization", "Bearer 0123456789abcdef-given")]
            )
            .status,
        200
    );
    let short = common::fer()
        .args(["serve", "--db"])
        .arg(&f.db)
        .args(["--bind", "127.0.0.1:0", "--token", "short"])
        .output()
        .unwrap();
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("--token"));
}

fn shot(browser: &Browser, name: &str) {
    if let Some(dir) = std::env::var_os("FER_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        browser.screenshot(&Path::new(&dir).join(format!("{name}.png")));
    }
}

/// Open `url` and wait until `condition` (a script returning true) holds.
fn visit(browser: &Browser, url: &str, what: &str, condition: &str) {
    browser.goto(url);
    browser.wait_for(30, what, condition);
}

/// The `heads` sweep's trial table, opened afresh (from the sweep list, so filters and
/// selections start empty), with its four trials.
fn heads_table(browser: &Browser, base: &str) {
    browser.goto(&format!("{base}#/"));
    visit(
        browser,
        &format!("{base}#/sweep/heads"),
        "the trial table",
        "return document.querySelectorAll('#trials tbody tr').length === 4",
    );
}

/// Open a trial's page and wait until its confusion matrix is shown and its first chart drawn.
fn trial_page_drawn(browser: &Browser, base: &str, key: &str) {
    visit(
        browser,
        &format!("{base}#/trial/{key}"),
        "the trial page",
        "return !!document.querySelector('#confusion')",
    );
    browser.wait_for(
        30,
        "the trial's charts",
        &format!(
            "return (() => {{ {} }})() > 500",
            drawn_pixels(".chart canvas")
        ),
    );
}

/// How many pixels of the first canvas under `css` are drawn.
fn drawn_pixels(css: &str) -> String {
    format!(
        "const c = document.querySelector({css:?}); if (!c) return 0;
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
         let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
}

/// The dashboard in a real browser.
#[test]
fn the_dashboard_in_a_real_browser() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = common::tmp("dash-browser");
    let f = rt.block_on(fill(&dir));
    let server = Server::start(&f.db, &[]);
    let base = format!("http://{}/", server.addr);
    let [a, b, c, d] = &f.keys;
    let no_injection = "return window.__xss === undefined && document.querySelectorAll('main img, main script').length === 0";

    // The trial table lists every trial; hostile text shows as text.
    heads_table(&browser, &base);
    let table = browser.eval("return document.querySelector('#trials').textContent");
    let table = table.as_str().unwrap();
    assert!(table.contains(HOSTILE_PARAM), "{table}");
    assert!(table.contains(HOSTILE_ERROR), "{table}");
    assert!(table.contains("failed (crash)") && table.contains("epoch 2/3, step 3/10"));
    assert_eq!(browser.eval(no_injection), json!(true));
    shot(&browser, "hostile-dashboard-sweep");

    // Filtering: by column value, then by text.
    browser.type_into("#filter", "status=failed");
    browser.wait_for(
        10,
        "the filter",
        "return document.querySelectorAll('#trials tbody tr').length === 1",
    );
    assert_eq!(
        browser.eval("return document.querySelector('#trials tbody tr').dataset.key"),
        json!(c)
    );
    heads_table(&browser, &base);
    browser.type_into("#filter", "heads=4");
    browser.wait_for(
        10,
        "the filter",
        "return document.querySelectorAll('#trials tbody tr').length === 2",
    );

    // Compare: select two trials, overlay their curves.
    heads_table(&browser, &base);
    browser.click(&format!("tr[data-key='{a}'] input[type=checkbox]"));
    browser.click(&format!("tr[data-key='{b}'] input[type=checkbox]"));
    browser.click("#compare");
    browser.wait_for(
        20,
        "the compare chart",
        &format!(
            "return (() => {{ {} }})() > 500",
            drawn_pixels("#compare-chart canvas")
        ),
    );
    let legend = browser.eval("return [...document.querySelectorAll('#compare-chart .u-legend .u-series')].map(e => e.textContent)");
    let legend: Vec<String> = serde_json::from_value(legend).unwrap();
    assert_eq!(legend.len(), 3, "epoch + two trials: {legend:?}");
    assert!(
        legend[1].contains(&a[..12]) && legend[2].contains(&b[..12]),
        "{legend:?}"
    );
    assert!(legend[1].contains(HOSTILE_PARAM));
    assert_eq!(browser.eval(no_injection), json!(true));
    shot(&browser, "hostile-dashboard-compare");

    // Grouped over seeds: one mean line and band per value of the parameter.
    visit(
        &browser,
        &format!("{base}#/compare/heads?group=model.heads"),
        "the grouped summary",
        "return document.querySelectorAll('#groups tbody tr').length === 3",
    );

    // A trial page draws its charts, its confusion matrix and its attempts.
    trial_page_drawn(&browser, &base, a);
    assert_eq!(
        browser.eval("return document.querySelectorAll('#confusion tbody tr').length"),
        json!(3)
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('.chart').length >= 3"),
        json!(true)
    );
    shot(&browser, "hostile-dashboard-trial");
    visit(
        &browser,
        &format!("{base}#/trial/{c}"),
        "the failed trial",
        "return !!document.querySelector('#attempts')",
    );
    let attempts = browser.eval("return document.querySelector('#attempts').textContent");
    assert!(attempts.as_str().unwrap().contains(HOSTILE_ERROR));
    assert_eq!(browser.eval(no_injection), json!(true));

    // Parallel coordinates: one line per completed trial.
    visit(
        &browser,
        &format!("{base}#/parallel/heads"),
        "parallel coordinates",
        "return document.querySelectorAll('#parallel polyline').length === 2",
    );
    shot(&browser, "hostile-dashboard-parallel");

    // Live: the running trial's progress and a new epoch appear without a reload.
    browser.goto(&format!("{base}#/sweep/heads"));
    let cell =
        format!("return document.querySelector(\"tr[data-key='{d}'] td.progress\")?.textContent");
    browser.wait_for(
        20,
        "the running trial",
        &format!("{cell} === 'epoch 2/3, step 3/10'"),
    );
    browser.eval("window.__same_page = 1; return 1");
    let bar = indicatif::ProgressBar::hidden();
    rt.block_on(record_line(
        &f.store,
        f.running_attempt,
        &step(2, 7, 10),
        &bar,
    ))
    .unwrap();
    browser.wait_for(
        20,
        "live progress",
        &format!("{cell} === 'epoch 2/3, step 7/10'"),
    );
    rt.block_on(record_line(
        &f.store,
        f.running_attempt,
        &epoch(2, 0.777),
        &bar,
    ))
    .unwrap();
    let row = format!("return document.querySelector(\"tr[data-key='{d}']\")?.textContent");
    browser.wait_for(20, "a live epoch", &format!("{row}?.includes('77.70 %')"));
    assert_eq!(
        browser.eval("return window.__same_page"),
        json!(1),
        "no reload"
    );
    assert_eq!(browser.eval(no_injection), json!(true));
}

/// A real sweep watched while it runs: the page shows trials running, then every trial
/// completed, without a reload. With `FER_SCREENSHOTS=DIR`, the README's screenshots come
/// from here (`just screenshots`).
#[test]
fn the_dashboard_follows_a_running_sweep() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let dir = common::tmp("dash-live");
    // The embedded base, smaller: it learns visibly in 6 epochs (~8 s a trial on 2 cores), so
    // the page shows trials running, with progress within an epoch.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/base.yaml");
    std::fs::write(
        dir.join("live.yaml"),
        format!(
            "base: {}\noverrides: {{data.train: 480, data.test: 240, epochs: 6}}\n\
             grid:\n  model.heads: [1, 4]\nseeds: [0, 1]\n",
            base.display()
        ),
    )
    .unwrap();
    let db = dir.join("fer.db");
    let mut sweep = common::fer()
        .arg("sweep")
        .arg(dir.join("live.yaml"))
        .arg("--db")
        .arg(&db)
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The dashboard reads the database the sweep creates: wait until the sweep is in it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    common::slurm::wait_for(120, "the sweep's registration", || {
        db.is_file()
            && rt.block_on(async {
                match Store::open_read_only(&DbUrl::Sqlite(db.clone())).await {
                    Ok(Some(s)) => s.sweep_trials("live").await.is_ok_and(|t| t.len() == 4),
                    _ => false,
                }
            })
    });
    let server = Server::start(&db, &["--runs-dir", dir.join("runs").to_str().unwrap()]);
    let base = format!("http://{}/", server.addr);
    visit(
        &browser,
        &format!("{base}#/sweep/live"),
        "the trial table",
        "return document.querySelectorAll('#trials tbody tr').length === 4",
    );
    browser.eval("window.__same_page = 1; return 1");
    let count = |status: &str| {
        browser
            .eval(&format!(
                "return [...document.querySelectorAll('#trials tbody tr')].filter(r => r.textContent.includes('{status}')).length"
            ))
            .as_i64()
            .unwrap()
    };
    let (mut seen_running, mut seen_step, mut first_completed, mut shot_running) =
        (false, false, None, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let (running, completed) = (count("running"), count("completed"));
        first_completed.get_or_insert(completed);
        seen_running |= running > 0;
        seen_step |= count(", step ") > 0;
        if running > 0 && completed >= 2 && !shot_running {
            shot(&browser, "dashboard-sweep-running");
            shot_running = true;
        }
        if completed == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep did not finish on the page"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(sweep.wait().unwrap().success());
    assert!(seen_running, "a running trial was shown");
    assert!(seen_step, "progress within an epoch was shown");
    assert!(
        first_completed.unwrap() < 4,
        "the page opened before the sweep ended"
    );
    assert_eq!(
        browser.eval("return window.__same_page"),
        json!(1),
        "no reload"
    );
    shot(&browser, "dashboard-sweep");

    let key: String = browser
        .eval("return document.querySelector('#trials tbody tr').dataset.key")
        .as_str()
        .unwrap()
        .to_string();
    trial_page_drawn(&browser, &base, &key);
    assert!(browser
        .eval("return document.querySelector('dl.facts').textContent")
        .as_str()
        .unwrap()
        .contains("(present)"));
    shot(&browser, "dashboard-trial");
    visit(
        &browser,
        &format!("{base}#/compare/live?group=model.heads"),
        "the grouped comparison",
        "return document.querySelectorAll('#groups tbody tr').length === 2",
    );
    shot(&browser, "dashboard-compare");
    visit(
        &browser,
        &format!("{base}#/parallel/live"),
        "parallel coordinates",
        "return document.querySelectorAll('#parallel polyline').length === 4",
    );
    shot(&browser, "dashboard-parallel");
}
