//! Where the results store is: `--db` / `FER_DB` as `sqlite:PATH` (or a bare path, the default
//! `fer.db`) or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?...]`. A URL is only ever shown
//! with its password masked.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A results store's location.
#[derive(Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    /// The URL as given (with any password: never print it, use `Display`).
    Postgres(String),
}

impl FromStr for DbUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "an empty database location (expected a path, sqlite:PATH or postgres://...)"
                    .into(),
            );
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DbUrl::Postgres(s.to_string()));
        }
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(format!("{s}: no file after sqlite:"));
            }
            return Ok(DbUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "{scheme}:// is not a database fer can use (expected a path, sqlite:PATH or postgres://...)"
            ));
        }
        Ok(DbUrl::Sqlite(PathBuf::from(s)))
    }
}

impl DbUrl {
    /// Whether there is a database to read: a SQLite file that exists, or any server (whose
    /// existence only a connection can tell).
    pub fn may_exist(&self) -> bool {
        match self {
            DbUrl::Sqlite(p) => p.is_file(),
            DbUrl::Postgres(_) => true,
        }
    }

    /// The password written into the URL, if any (for tests that look for leaks).
    pub fn password(&self) -> Option<String> {
        let DbUrl::Postgres(url) = self else {
            return None;
        };
        password_span(url).map(|(a, b)| url[a..b].to_string())
    }
}

/// Byte range of the password in a URL: in the user info (`user:PASSWORD@`) or a `password=`
/// query parameter.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let rest_start = url.find("://")? + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some(at) = authority.rfind('@') {
        if let Some(colon) = authority[..at].find(':') {
            return Some((rest_start + colon + 1, rest_start + at));
        }
    }
    let query_start = url.find('?')? + 1;
    let mut offset = query_start;
    for pair in url[query_start..].split('&') {
        if let Some(v) = pair.strip_prefix("password=") {
            let a = offset + "password=".len();
            return Some((a, a + v.len()));
        }
        offset += pair.len() + 1;
    }
    None
}

impl fmt::Display for DbUrl {
    /// A SQLite path as given; a URL with its password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbUrl::Sqlite(p) => write!(f, "{}", p.display()),
            DbUrl::Postgres(url) => match password_span(url) {
                Some((a, b)) => write!(f, "{}***{}", &url[..a], &url[b..]),
                None => f.write_str(url),
            },
        }
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_passwords_never_print() {
        let p = |s: &str| s.parse::<DbUrl>();
        assert_eq!(p("fer.db").unwrap(), DbUrl::Sqlite("fer.db".into()));
        assert_eq!(
            p("sqlite:runs/x.db").unwrap(),
            DbUrl::Sqlite("runs/x.db".into())
        );
        assert_eq!(
            p("sqlite:///abs/x.db").unwrap(),
            DbUrl::Sqlite("/abs/x.db".into())
        );
        assert!(p("mysql://h/db").unwrap_err().contains("mysql://"));
        assert!(p("sqlite:").is_err() && p("  ").is_err());
        for (url, shown, secret) in [
            (
                "postgres://fer:s3cr%3At@db.example:5432/fer",
                "postgres://fer:***@db.example:5432/fer",
                Some("s3cr%3At"),
            ),
            (
                "postgresql://fer@db/fer?sslmode=disable",
                "postgresql://fer@db/fer?sslmode=disable",
                None,
            ),
            (
                "postgres://db/fer?user=fer&password=hunter2&x=1",
                "postgres://db/fer?user=fer&password=***&x=1",
                Some("hunter2"),
            ),
            (
                "postgres://u:p@ss@h/d",
                "postgres://u:***@h/d",
                Some("p@ss"),
            ),
        ] {
            let db = p(url).unwrap();
            assert_eq!(db.to_string(), shown);
            assert_eq!(format!("{db:?}"), format!("DbUrl({shown})"));
            assert_eq!(db.password().as_deref(), secret);
        }
    }
}
