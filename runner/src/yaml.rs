//! Reading YAML into typed configs with errors that say file:line:column.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Parse `text` (read from `path`) as `T`. Syntax errors, unknown keys and bad values are
/// reported as `path:line:column: message`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
    serde_yaml_ng::from_str(text).map_err(|e| located(path, &e))
}

pub fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    parse(path, &text)
}

pub fn located(path: &Path, e: &serde_yaml_ng::Error) -> anyhow::Error {
    let msg = e.to_string();
    // The library appends " at line L column C"; we lead with it instead.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    match e.location() {
        Some(loc) => anyhow::anyhow!("{}:{}:{}: {msg}", path.display(), loc.line(), loc.column()),
        None => anyhow::anyhow!("{}: {msg}", path.display()),
    }
}
