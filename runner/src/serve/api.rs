//! The dashboard's JSON (and the report pages): what each view shows, computed from the store
//! the way `fer runs` and `fer report` compute it (the same plateau rule, the same protocols).

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::Shared;
use crate::report;
use crate::store::{AttemptDetail, Curves, SweepSummary, SweepTrial};

/// A failed request: its status and a message (shown by the page as text).
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, what)
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Every sweep with its trials counted by status.
pub async fn sweeps(State(app): State<Shared>) -> ApiResult {
    let sweeps = app.store.sweep_summaries().await?;
    Ok(Json(
        json!({ "db": app.store.url().to_string(), "sweeps": sweeps }),
    ))
}

/// The sweep named `name` (404 when there is none).
async fn sweep_summary(app: &Shared, name: &str) -> Result<SweepSummary, ApiError> {
    let summaries = app.store.sweep_summaries().await?;
    summaries
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| not_found(format!("no sweep named {name}")))
}

/// Accuracy summaries of a test-accuracy curve (fractions), as the reports compute them.
fn accuracy_summary(curves: Option<&Curves>) -> Value {
    let acc = curves.map(report::AccuracyCurves::of);
    let test = acc.as_ref().map_or(&[][..], |a| &a.test[..]);
    let tail = &test[test.len().saturating_sub(5)..];
    json!({
        "epoch": test.last().map(|(e, _)| e),
        "final": test.last().map(|(_, a)| a),
        "best": acc.as_ref().and_then(|a| a.plateau).map(|p| p.best),
        "last5": (!tail.is_empty()).then(|| tail.iter().map(|(_, a)| a).sum::<f64>() / tail.len() as f64),
        "val_selected": acc.as_ref().and_then(|a| a.val_selected()),
        "undertrained": acc.as_ref().and_then(|a| a.plateau).map(|p| p.undertrained),
    })
}

/// The status line of an attempt: `failed (crash)`, `running`.
fn attempt_json(a: &AttemptDetail) -> Value {
    let mut v = serde_json::to_value(a).unwrap_or(Value::Null);
    if let Some((epoch, step, steps)) = a.progress {
        v["progress"] = json!({ "epoch": epoch, "step": step, "steps": steps });
    }
    v
}

fn configured_epochs(config_json: &str) -> Option<i64> {
    serde_json::from_str::<Value>(config_json)
        .ok()?
        .get("epochs")?
        .as_i64()
}

fn trial_row(t: &SweepTrial, curves: Option<&Curves>) -> Value {
    json!({
        "key": t.key,
        "seed": t.seed,
        "params": serde_json::from_str::<Value>(&t.params_json).unwrap_or(Value::Null),
        "epochs": configured_epochs(&t.config_json),
        "attempts": t.attempts,
        "latest": t.latest.as_ref().map(attempt_json),
        "accuracy": accuracy_summary(curves),
    })
}

/// A sweep's trial table: params, status, progress and accuracies of every trial, and the
/// metrics its trials recorded.
pub async fn sweep(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let summary = sweep_summary(&app, &name).await?;
    let trials = app.store.sweep_trials(&name).await?;
    let curves = app.store.sweep_curves(&name, "accuracy").await?;
    // The swept axes, in the order the trials list them.
    let mut axes: Vec<String> = Vec::new();
    for t in &trials {
        if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(&t.params_json) {
            for k in o.keys() {
                if !axes.contains(k) {
                    axes.push(k.clone());
                }
            }
        }
    }
    let metrics: Vec<String> = app
        .store
        .sweep_metric_names(&name)
        .await?
        .into_iter()
        .map(|(split, name)| format!("{split}/{name}"))
        .collect();
    Ok(Json(json!({
        "sweep": summary,
        "axes": axes,
        "metrics": metrics,
        "trials": trials.iter().map(|t| trial_row(t, curves.get(&t.key))).collect::<Vec<_>>(),
    })))
}

#[derive(serde::Deserialize)]
pub struct MetricQuery {
    /// `split/name`, e.g. `test/accuracy`.
    metric: String,
}

/// One metric's per-epoch curve for every trial of a sweep: `{key: [[epoch, value], ...]}`.
pub async fn sweep_curves(
    State(app): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<MetricQuery>,
) -> ApiResult {
    let Some((split, metric)) = q.metric.split_once('/') else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "metric={}: expected split/name, e.g. test/accuracy",
                q.metric
            ),
        ));
    };
    let curves = app.store.sweep_curves(&name, metric).await?;
    let by_trial: BTreeMap<&String, &Vec<(i64, f64)>> = curves
        .iter()
        .filter_map(|(key, c)| Some((key, c.get(&(split.to_string(), metric.to_string()))?)))
        .collect();
    Ok(Json(json!({ "metric": q.metric, "curves": by_trial })))
}

/// Where a trial's checkpoint is by the runner's layout (`RUNS/SWEEP/KEY16/`), and whether
/// this machine sees it.
fn checkpoint(runs_dir: &std::path::Path, sweeps: &[(String, String)], key: &str) -> Value {
    let candidates: Vec<PathBuf> = sweeps
        .iter()
        .map(|(sweep, _)| {
            crate::scheduler::trial_dir(runs_dir, sweep, key)
                .join(fer_model::trainer::CHECKPOINT_FILE)
        })
        .collect();
    let found = candidates
        .iter()
        .find(|p| p.is_file())
        .or(candidates.first());
    json!({
        "path": found.map(|p| p.display().to_string()),
        "exists": found.is_some_and(|p| p.is_file()),
    })
}

/// A trial: config, sweeps, every per-epoch metric, the last confusion matrix, every attempt.
pub async fn trial(State(app): State<Shared>, Path(key): Path<String>) -> ApiResult {
    let Some((seed, config, sweeps)) = app.store.trial_definition(&key).await? else {
        return Err(not_found(format!("no trial with key {key}")));
    };
    let curves = app.store.curves(&key).await?;
    let series: Vec<Value> = curves
        .iter()
        .map(|((split, name), points)| json!({ "metric": format!("{split}/{name}"), "points": points }))
        .collect();
    let confusion = app
        .store
        .confusion(&key)
        .await?
        .map(|c| json!({ "epoch": c.epoch, "counts": c.counts, "class_names": c.class_names }));
    let attempts: Vec<Value> = app
        .store
        .attempts_of(&key)
        .await?
        .iter()
        .map(attempt_json)
        .collect();
    Ok(Json(json!({
        "key": key,
        "seed": seed,
        "config": serde_json::from_str::<Value>(&config).unwrap_or(Value::String(config.clone())),
        "epochs": configured_epochs(&config),
        "sweeps": sweeps.iter().map(|(name, params)| json!({
            "name": name,
            "params": serde_json::from_str::<Value>(params).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "curves": series,
        "accuracy": accuracy_summary(Some(&curves)),
        "confusion": confusion,
        "attempts": attempts,
        "checkpoint": checkpoint(&app.runs_dir, &sweeps, &key),
    })))
}

/// A sweep's report (`fer report --html` of it), rendered now from the store: the same cells,
/// intervals and thesis numbers; trials without a result are listed as missing.
pub async fn report_page(State(app): State<Shared>, Path(sweep): Path<String>) -> Response {
    match render_report(&app, &sweep).await {
        Ok(page) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn render_report(app: &Shared, sweep: &str) -> Result<String, ApiError> {
    let s = sweep_summary(app, sweep).await?;
    let Some(name) = s.report else {
        return Err(not_found(format!("sweep {sweep} has no report section")));
    };
    let profile = sweep.strip_prefix(&format!("{name}-")).map(str::to_string);
    // The file the sweep ran from, if this machine has it; else the experiments folder's.
    let file = if std::path::Path::new(&s.file).is_file() {
        s.file.clone()
    } else {
        name.clone()
    };
    let report = report::load(
        &app.store,
        &file,
        &app.experiments,
        profile.as_deref(),
        None,
    )
    .await
    .map_err(|e| not_found(format!("{e:#}")))?;
    let db = app.store.url().clone();
    // Plotting is CPU work: off the server's threads.
    tokio::task::spawn_blocking(move || report::html_page(&report, &db))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}
