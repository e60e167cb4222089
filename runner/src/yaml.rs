//! Reading YAML into typed configs with errors that say file:line:column.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;

/// Parse `text` (read from `path`) as `T`. Syntax errors, unknown keys and bad values are
/// reported as `path:line:column: message`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> anyhow::Result<T> {
    // YAML lets a later key silently replace an earlier one; here a repeated key is an error.
    serde_yaml_ng::from_str::<NoDuplicateKeys>(text).map_err(|e| {
        let err = located(path, &e);
        // The parser's location is the mapping's; find the key's lines in it.
        match (duplicate_key(&e), e.location()) {
            (Some(key), Some(loc)) => {
                let lines = key_lines(text, &key, loc.line());
                if lines.len() >= 2 {
                    anyhow::anyhow!("{err} (at lines {} and {})", lines[0], lines[1])
                } else {
                    err
                }
            }
            _ => err,
        }
    })?;
    serde_yaml_ng::from_str(text).map_err(|e| located(path, &e))
}

const DUPLICATE: &str = "duplicate key ";

/// Any YAML document, refused when a mapping repeats a key.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_none<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self, D::Error> {
        NoDuplicateKeys::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen: Vec<serde_yaml_ng::Value> = Vec::new();
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            if seen.contains(&key) {
                let text = match &key {
                    serde_yaml_ng::Value::String(s) => s.clone(),
                    other => serde_yaml_ng::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                return Err(serde::de::Error::custom(format!("{DUPLICATE}`{text}`")));
            }
            seen.push(key);
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(self)
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Self, A::Error> {
        use serde::de::VariantAccess;
        // A tagged value (`!tag value`): check the value.
        let (_, variant) = data.variant::<serde::de::IgnoredAny>()?;
        variant.newtype_variant::<NoDuplicateKeys>()
    }
}

use serde::Deserialize as _;

/// The key named by a duplicate-key error.
fn duplicate_key(e: &serde_yaml_ng::Error) -> Option<String> {
    let msg = e.to_string();
    let rest = msg.split(DUPLICATE).nth(1)?;
    Some(rest.split('`').nth(1)?.to_string())
}

/// The lines (1-based, from `from` on) where `key:` starts a mapping entry: the usual block style
/// (`  key: ...`) or a flow entry (`{key: ...`, `, key: ...`).
fn key_lines(text: &str, key: &str, from: usize) -> Vec<usize> {
    let needles = [
        format!("{key}:"),
        format!("\"{key}\":"),
        format!("'{key}':"),
    ];
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .filter(|(_, line)| {
            let t = line.trim_start().trim_start_matches("- ");
            needles.iter().any(|n| {
                t.starts_with(n.as_str())
                    || line.contains(&format!("{{{n}"))
                    || line.contains(&format!("{{ {n}"))
                    || line.contains(&format!(", {n}"))
            })
        })
        .map(|(i, _)| i + 1)
        .collect()
}

pub fn read<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = fer_model::data::read_text(path)
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
