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

/// Messages of serde that say less than they could, said plainly.
pub fn explain(msg: &str) -> String {
    if msg.contains("untagged enum NoiseSpec") {
        return "expected {rate: R, seed: S} (symmetric noise) or {file: PATH} (an EAC noise file), or null"
            .into();
    }
    msg.replace("floating point `NaN`", "NaN (`.nan`)")
        .replace("floating point `inf`", "infinity (`.inf`)")
}

/// Line and column (1-based) of the key at `path` in a YAML text: each part is looked for inside
/// the block (deeper indentation) or flow mapping (`{a: .., b: ..}` on the line) of the previous
/// one, so a comment or another section that mentions the key does not match. Falls back to the
/// deepest part found.
pub fn locate_path(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_at = |line: &str, key: &str, from: usize| -> Option<usize> {
        // A block key (`key:` after indentation or `- `) or a flow key (`{key:` / `, key:`).
        let code = line.split(" #").next().unwrap_or(line);
        let t = code.trim_start();
        let start = indent(code);
        let t2 = t.trim_start_matches("- ");
        let dash = t.len() - t2.len();
        for quoted in [key.to_string(), format!("\"{key}\""), format!("'{key}'")] {
            let k = format!("{quoted}:");
            if start + dash >= from && t2.starts_with(&k) {
                return Some(start + dash);
            }
            for open in ["{", ", ", "{ "] {
                if let Some(i) = code[from.min(code.len())..].find(&format!("{open}{k}")) {
                    return Some(from.min(code.len()) + i + open.len());
                }
            }
        }
        None
    };
    let (mut line, mut col, mut found) = (0usize, 0usize, None);
    let mut parent_indent: Option<usize> = None;
    for (depth, part) in path.iter().enumerate() {
        let mut hit = None;
        // The first part is searched from the top; later ones from the parent's line on, while
        // the block lasts (a line indented no deeper than the parent ends it).
        for (i, l) in lines.iter().enumerate().skip(line) {
            if l.trim().is_empty() || l.trim_start().starts_with('#') {
                continue;
            }
            if depth > 0 && i > line && parent_indent.is_some_and(|p| indent(l) <= p) {
                break;
            }
            let from = if depth > 0 && i == line { col + 1 } else { 0 };
            if let Some(c) = key_at(l, part, from) {
                if depth == 0 && indent(l) != 0 {
                    continue;
                }
                hit = Some((i, c));
                break;
            }
        }
        let Some((i, c)) = hit else { break };
        parent_indent = Some(indent(lines[i]));
        (line, col) = (i, c);
        found = Some((i + 1, c + 1));
    }
    found
}

pub fn located(path: &Path, e: &serde_yaml_ng::Error) -> anyhow::Error {
    let msg = explain(&e.to_string());
    // The library appends " at line L column C"; we lead with it instead.
    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    match e.location() {
        Some(loc) => anyhow::anyhow!("{}:{}:{}: {msg}", path.display(), loc.line(), loc.column()),
        None => anyhow::anyhow!("{}: {msg}", path.display()),
    }
}
