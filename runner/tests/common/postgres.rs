//! A throwaway PostgreSQL server for the tests: `initdb` into a temporary folder, `pg_ctl start`
//! on 127.0.0.1 and a free port, password authentication (so the tests see a real password),
//! stopped when the test process exits. Started once per test process; each test gets its own
//! database. Without PostgreSQL installed the tests that need it are skipped with a message,
//! unless `FER_REQUIRE_SERVICES=1` (set by `.ci/run`), where that is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use fer_runner::store::DbUrl;

pub struct Server {
    pub port: u16,
    pub password: String,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static PG_CTL: OnceLock<(PathBuf, PathBuf, bool)> = OnceLock::new();

/// Whether the services must run (CI): then a server that cannot start fails the test.
pub fn required() -> bool {
    std::env::var("FER_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// The server, or None (with the reason printed) when PostgreSQL is not available here.
pub fn server() -> Option<&'static Server> {
    match SERVER.get_or_init(start) {
        Ok(s) => Some(s),
        Err(why) if required() => panic!("PostgreSQL is required (FER_REQUIRE_SERVICES=1): {why}"),
        Err(why) => {
            eprintln!("skipping the PostgreSQL part of this test: {why}");
            None
        }
    }
}

/// A new, empty database on the server: its URL (password included), or None without a server.
pub async fn fresh_db(tag: &str) -> Option<DbUrl> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let s = server()?;
    let name = format!(
        "fer_{}_{}_{}",
        tag.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    use sqlx::Connection;
    let admin = format!(
        "postgres://fer:{}@127.0.0.1:{}/postgres",
        s.password, s.port
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connecting to the test server");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("creating a test database");
    let url = format!("postgres://fer:{}@127.0.0.1:{}/{name}", s.password, s.port);
    Some(url.parse().unwrap())
}

fn bin_dir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

/// `program args` as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_server_user(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A TCP port on 127.0.0.1 free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

extern "C" fn stop_server() {
    if let Some((pg_ctl, data, as_postgres)) = PG_CTL.get() {
        let _ = as_server_user(pg_ctl, *as_postgres)
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(data.parent().unwrap_or(data));
    }
}

fn start() -> Result<Server, String> {
    let bin = bin_dir().ok_or("PostgreSQL's initdb was not found (apt-get install postgresql)")?;
    let root = std::env::temp_dir().join(format!("fer-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let data = root.join("data");
    // SAFETY: geteuid has no preconditions.
    let as_postgres = unsafe { libc::geteuid() } == 0;
    let password = format!("pw-{}-s3cret", std::process::id());
    let pwfile = root.join("pw");
    std::fs::write(&pwfile, &password).map_err(|e| e.to_string())?;
    if as_postgres {
        let out = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&root)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "chown to postgres failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let out = as_server_user(&bin.join("initdb"), as_postgres)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "fer",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = free_port();
    let _ = PG_CTL.set((bin.join("pg_ctl"), data.clone(), as_postgres));
    let out = as_server_user(&bin.join("pg_ctl"), as_postgres)
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off -c max_connections=200",
            root.display()
        ))
        .arg("-l")
        .arg(root.join("log"))
        .args(["-w", "start"])
        .output()
        .map_err(|e| format!("running pg_ctl: {e}"))?;
    if !out.status.success() {
        let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
        return Err(format!(
            "pg_ctl start failed: {}{log}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // SAFETY: registers a plain function with no captured state, run once at exit.
    unsafe { libc::atexit(stop_server) };
    Ok(Server { port, password })
}
