//! `fer serve`: a read-only web dashboard of the results store. One process, its page and
//! scripts compiled in (`assets/`, uPlot vendored from npm), JSON read from the store on each
//! request, and one server-sent-events stream that says when the results changed, so a page
//! showing a running sweep refreshes itself.
//!
//! Safety: the database is opened read-only; the server binds to 127.0.0.1 unless told
//! otherwise, and anywhere else only with a token, checked on every request. Pages never put
//! data into HTML: the scripts build every element from text nodes (tested in a browser).

mod api;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Args;
use tokio::sync::watch;

use crate::store::{DbUrl, Store};
use crate::sweep_cmd::DEFAULT_DB;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Results database (as `fer sweep --db`); opened read-only.
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
    /// Address to listen on (port 0: any free port; the address is printed). Any address but
    /// a loopback one needs a token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Token every request must carry (`?token=`, once per browser, or `Authorization: Bearer`).
    /// Without it, binding to a non-loopback address generates one and prints it.
    #[arg(long, env = "FER_SERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where report names are looked up (as `fer report --experiments`).
    #[arg(long, default_value = "experiments")]
    pub experiments: PathBuf,
    /// The runs folder the sweeps wrote to (as `fer sweep --runs-dir`): where the trial pages
    /// look for checkpoints.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// How often the server looks for new results, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub poll_seconds: f64,
}

/// What every request handler shares.
struct App {
    store: Store,
    experiments: PathBuf,
    runs_dir: PathBuf,
    token: Option<String>,
    /// Loopback without a token: only requests addressed to a loopback name are answered (a
    /// web page elsewhere cannot reach the dashboard through DNS rebinding).
    loopback_only: bool,
    /// The store's `data_version`, refreshed by one poller for all event streams.
    version: watch::Receiver<String>,
}

type Shared = Arc<App>;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if !args.db.may_exist() {
        anyhow::bail!("{}: no results database (pass --db)", args.db);
    }
    // Migrated first if an older `fer` made it, then opened read-only for good.
    Store::open_for_reading(&args.db).await?.close().await;
    let Some(store) = Store::open_read_only(&args.db).await? else {
        anyhow::bail!("{}: no such database", args.db);
    };
    if !(args.poll_seconds > 0.0 && args.poll_seconds.is_finite()) {
        anyhow::bail!(
            "--poll-seconds {}: expected a positive number",
            args.poll_seconds
        );
    }
    let loopback = args.bind.ip().is_loopback();
    let token = match (&args.token, loopback) {
        (Some(t), _) if t.len() < 16 => {
            anyhow::bail!("--token: expected at least 16 characters, got {}", t.len())
        }
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => Some(generated_token()),
    };
    let (tx, rx) = watch::channel(store.data_version().await?);
    let app = Arc::new(App {
        store: store.clone(),
        experiments: args.experiments,
        runs_dir: args.runs_dir,
        loopback_only: loopback && token.is_none(),
        token: token.clone(),
        version: rx,
    });
    tokio::spawn(poll_versions(
        store,
        tx,
        Duration::from_secs_f64(args.poll_seconds),
    ));

    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| anyhow::anyhow!("--bind {}: {e}", args.bind))?;
    let addr = listener.local_addr()?;
    let host = match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    match &token {
        Some(t) if args.token.is_none() => println!(
            "fer serve: http://{host}:{}/?token={t} (a generated token: every request needs it)",
            addr.port()
        ),
        Some(_) => println!(
            "fer serve: http://{host}:{}/ (add ?token=YOUR_TOKEN once)",
            addr.port()
        ),
        None => println!("fer serve: http://{host}:{}/", addr.port()),
    }
    println!("reading {} (read-only); Ctrl-C stops", args.db);
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route(
            "/assets/{file}",
            get(|axum::extract::Path(f): axum::extract::Path<String>| async move { asset(&f) }),
        )
        .route("/api/sweeps", get(api::sweeps))
        .route("/api/sweeps/{name}", get(api::sweep))
        .route("/api/sweeps/{name}/curves", get(api::sweep_curves))
        .route("/api/trials/{key}", get(api::trial))
        .route("/reports/{name}", get(api::report_page))
        .route("/api/events", get(events))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// The compiled-in page, its scripts and styles.
fn asset(name: &str) -> Response {
    let (body, kind): (&'static [u8], &str) = match name {
        "index.html" => (
            include_bytes!("assets/index.html"),
            "text/html; charset=utf-8",
        ),
        "app.js" => (include_bytes!("assets/app.js"), "text/javascript"),
        "app.css" => (include_bytes!("assets/app.css"), "text/css"),
        "uPlot.iife.min.js" => (
            include_bytes!("assets/vendor/uplot-1.6.32/uPlot.iife.min.js"),
            "text/javascript",
        ),
        "uPlot.min.css" => (
            include_bytes!("assets/vendor/uplot-1.6.32/uPlot.min.css"),
            "text/css",
        ),
        _ => return (StatusCode::NOT_FOUND, "no such file").into_response(),
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Every request: the token (when there is one), the Host header (loopback without a token),
/// then headers that keep the browser from running anything but our own scripts.
async fn guard(State(app): State<Shared>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if app.loopback_only && !loopback_host(headers) {
        return (
            StatusCode::FORBIDDEN,
            "fer serve: this dashboard answers only requests addressed to localhost / 127.0.0.1 \
             (start it with --token to serve other names)",
        )
            .into_response();
    }
    let mut set_cookie = None;
    if let Some(token) = &app.token {
        let from_query = query_token(request.uri());
        let given = from_query
            .clone()
            .or_else(|| bearer_token(headers))
            .or_else(|| cookie_token(headers));
        if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                "fer serve: this dashboard needs its token: open the address `fer serve` printed \
                 (…/?token=…), or send `Authorization: Bearer TOKEN`",
            )
                .into_response();
        }
        // Given in the address: the browser keeps it, so the page's own requests carry it.
        if from_query.is_some() {
            set_cookie = Some(format!(
                "fer_token={token}; Path=/; HttpOnly; SameSite=Strict"
            ));
        }
    }
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
             object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    response
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    // Strip the port: `name:port`, `[v6]:port`.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    matches!(name, "localhost" | "127.0.0.1" | "[::1]")
}

/// The `token` parameter of the address, percent-decoded (axum's query parser).
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    let axum::extract::Query(mut params) =
        axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(uri)
            .ok()?;
    params.remove("token")
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("fer_token=").map(str::to_string))
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn generated_token() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One reader of the store's version for every open page.
async fn poll_versions(store: Store, tx: watch::Sender<String>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match store.data_version().await {
            Ok(v) => {
                tx.send_if_modified(|old| {
                    let changed = *old != v;
                    *old = v;
                    changed
                });
            }
            Err(e) => tracing::warn!("reading the store's version: {e:#}"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Server-sent events: `change` with the store's version, once at the start and whenever the
/// results change.
async fn events(State(app): State<Shared>) -> impl IntoResponse {
    let mut rx = app.version.clone();
    rx.mark_changed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let version = rx.borrow_and_update().clone();
        Some((
            Ok::<_, Infallible>(Event::default().event("change").data(version)),
            rx,
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_from_query_header_and_cookie() {
        let q = |uri: &str| query_token(&uri.parse().unwrap());
        assert_eq!(q("/?a=1&token=ab%2Bc+d"), Some("ab+c d".into()));
        assert_eq!(q("/?tokens=x"), None);
        assert_eq!(q("/api/sweeps"), None);
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  xyz ".parse().unwrap());
        h.insert(header::COOKIE, "a=b; fer_token=t0k".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("xyz".into()));
        assert_eq!(cookie_token(&h), Some("t0k".into()));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
        assert_eq!(generated_token().len(), 32);
        assert_ne!(generated_token(), generated_token());
    }

    #[test]
    fn only_loopback_names_pass_the_host_check() {
        let host = |h: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, h.parse().unwrap());
            loopback_host(&m)
        };
        assert!(host("127.0.0.1:8080") && host("localhost") && host("[::1]:80"));
        assert!(!host("evil.example:8080") && !host("127.0.0.1.evil.example"));
        assert!(!loopback_host(&HeaderMap::new()));
    }
}
