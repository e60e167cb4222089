//! `fer export`: a sweep's results for other tools. `tensorboard` writes one TensorBoard run per
//! trial (every per-epoch scalar, the swept parameters as hparams), so `tensorboard --logdir DIR`
//! (and Aim's converter) read them; `csv` writes the per-epoch metrics as one tidy table.
//!
//! TensorBoard's event files are TFRecords (length, masked CRC-32C of the length, data, masked
//! CRC-32C of the data) of `Event` protocol buffers. The few messages needed are encoded here
//! (`Proto`): the only Rust crate for the format (tensorboard-rs) is unmaintained since 2022,
//! pins protobuf 2 and writes no hparams.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::store::{DbUrl, Store};
use crate::sweep_cmd::DEFAULT_DB;

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// One TensorBoard run per trial of a sweep: every per-epoch scalar (`split/name`), the
    /// swept parameters as hparams. Then `tensorboard --logdir DIR`.
    Tensorboard(ExportArgs),
    /// The per-epoch metrics of a sweep's trials as one CSV table (one row per trial, split,
    /// metric and epoch; the swept parameters as columns), for pandas and spreadsheets.
    Csv(ExportArgs),
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The sweep (its name in the store, e.g. `heads` or `heads-thesis`).
    #[arg(long)]
    pub sweep: String,
    /// Output folder (tensorboard) or file (csv).
    #[arg(long)]
    pub out: PathBuf,
    /// Results database.
    #[arg(long, env = "FER_DB", default_value = DEFAULT_DB, hide_env_values = true)]
    pub db: DbUrl,
}

pub async fn run(cmd: ExportCommand) -> anyhow::Result<()> {
    let (args, tensorboard) = match &cmd {
        ExportCommand::Tensorboard(a) => (a, true),
        ExportCommand::Csv(a) => (a, false),
    };
    let store = Store::open_for_reading(&args.db).await?;
    let known = store.sweep_names().await?;
    anyhow::ensure!(
        known.contains(&args.sweep),
        "--sweep {:?}: no such sweep in {} (sweeps: {})",
        args.sweep,
        args.db,
        if known.is_empty() {
            "none yet".to_string()
        } else {
            known.join(", ")
        }
    );
    let mut trials = Vec::new();
    for row in store.trial_rows(Some(&args.sweep), None).await? {
        let params: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&row.params_json).unwrap_or_default();
        let curves = store.curves(&row.trial_key).await?;
        let completed = row.latest.as_ref().is_some_and(|a| a.status == "completed");
        trials.push(TrialExport {
            key: row.trial_key,
            params,
            curves,
            completed,
        });
    }
    store.close().await;
    if tensorboard {
        let n = write_tensorboard(&trials, &args.out)?;
        println!(
            "wrote {} TensorBoard run(s) ({n} scalars) under {}; view with `tensorboard --logdir {}`",
            trials.len(),
            args.out.display(),
            args.out.display()
        );
    } else {
        let n = write_csv(&trials, &args.out)?;
        println!("wrote {n} rows to {}", args.out.display());
    }
    Ok(())
}

/// What is exported of one trial.
pub struct TrialExport {
    pub key: String,
    /// The sweep's axis values (and the seed).
    pub params: BTreeMap<String, serde_json::Value>,
    pub curves: crate::store::Curves,
    pub completed: bool,
}

impl TrialExport {
    /// A readable, file-system-safe run name: the swept values, then the key's start.
    pub fn run_name(&self) -> String {
        let mut parts: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("{k}={v}")
            })
            .collect();
        parts.push(self.key[..8].to_string());
        parts
            .join(",")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "=.,_-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// Write each trial's run folder; returns the number of scalars written.
pub fn write_tensorboard(trials: &[TrialExport], out: &Path) -> anyhow::Result<usize> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let host = crate::sweep_cmd::hostname();
    let mut scalars = 0;
    for t in trials {
        let dir = out.join(t.run_name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A fresh export replaces the run's earlier event files.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
            {
                std::fs::remove_file(e.path())?;
            }
        }
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
        );
        let mut record = |event: Vec<u8>| write_record(&mut file, &event);
        record(event(now, 0, |e| e.string(3, "brain.Event:2")))?;
        record(event(now, 0, |e| {
            e.message(5, &hparams_summary(&session_start(t, now)))
        }))?;
        for ((split, name), points) in &t.curves {
            let tag = format!("{split}/{name}");
            for &(epoch, value) in points {
                record(event(now, epoch, |e| {
                    e.message(5, &scalar_summary(&tag, value))
                }))?;
                scalars += 1;
            }
        }
        if t.completed {
            record(event(now, 0, |e| {
                e.message(5, &hparams_summary(&session_end(now)))
            }))?;
        }
        file.flush()?;
    }
    Ok(scalars)
}

fn write_csv(trials: &[TrialExport], out: &Path) -> anyhow::Result<usize> {
    let mut columns: Vec<&String> = trials.iter().flat_map(|t| t.params.keys()).collect();
    columns.sort();
    columns.dedup();
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut text = String::from("trial_key");
    for c in &columns {
        text.push(',');
        text.push_str(&field(c));
    }
    text.push_str(",split,name,epoch,value\n");
    let mut rows = 0;
    for t in trials {
        let params: Vec<String> = columns
            .iter()
            .map(|c| match t.params.get(*c) {
                Some(serde_json::Value::String(s)) => field(s),
                Some(v) => field(&v.to_string()),
                None => String::new(),
            })
            .collect();
        for ((split, name), points) in &t.curves {
            for &(epoch, value) in points {
                text.push_str(&t.key);
                for p in &params {
                    text.push(',');
                    text.push_str(p);
                }
                text.push_str(&format!(
                    ",{},{},{epoch},{value}\n",
                    field(split),
                    field(name)
                ));
                rows += 1;
            }
        }
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(rows)
}

/// `Event { wall_time = 1; step = 2; ...what `body` adds }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Proto)) -> Vec<u8> {
    let mut e = Proto::default();
    e.double(1, wall_time);
    if step != 0 {
        e.varint(2, step as u64);
    }
    body(&mut e);
    e.0
}

/// `Summary { value = 1: Value { tag = 1; simple_value = 2 } }`.
fn scalar_summary(tag: &str, value: f64) -> Proto {
    let mut v = Proto::default();
    v.string(1, tag);
    v.float(2, value as f32);
    let mut s = Proto::default();
    s.message(1, &v);
    s
}

/// The hparams plugin's summary: `Summary { value = 1: Value { tag = 1; metadata = 9:
/// SummaryMetadata { plugin_data = 1: PluginData { plugin_name = 1: "hparams"; content = 2 } } } }`
/// with `content` a serialized `HParamsPluginData { version = 1: 0; <data> }`.
fn hparams_summary(data: &(u32, String, Proto)) -> Proto {
    let (field, tag, message) = data;
    let mut content = Proto::default();
    content.message(*field, message);
    let mut plugin = Proto::default();
    plugin.string(1, "hparams");
    plugin.bytes(2, &content.0);
    let mut meta = Proto::default();
    meta.message(1, &plugin);
    let mut v = Proto::default();
    v.string(1, tag);
    v.message(9, &meta);
    let mut s = Proto::default();
    s.message(1, &v);
    s
}

/// `SessionStartInfo { hparams = 1: map<string, google.protobuf.Value>; group_name = 4;
/// start_time_secs = 5 }`; the group is the trial's parameters without its seed, so TensorBoard
/// groups a cell's seeds.
fn session_start(t: &TrialExport, now: f64) -> (u32, String, Proto) {
    let mut info = Proto::default();
    for (name, value) in &t.params {
        let mut v = Proto::default();
        match value {
            serde_json::Value::Number(n) => v.double(2, n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::Bool(b) => v.varint(4, *b as u64),
            serde_json::Value::String(s) => v.string(3, s),
            other => v.string(3, &other.to_string()),
        }
        let mut entry = Proto::default();
        entry.string(1, name);
        entry.message(2, &v);
        info.message(1, &entry);
    }
    let group: Vec<String> = t
        .params
        .iter()
        .filter(|(k, _)| k.as_str() != "seed")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info.string(4, &group.join(","));
    info.double(5, now);
    (3, "_hparams_/session_start_info".into(), info)
}

/// `SessionEndInfo { status = 1: STATUS_SUCCESS (1); end_time_secs = 2 }`.
fn session_end(now: f64) -> (u32, String, Proto) {
    let mut info = Proto::default();
    info.varint(1, 1);
    info.double(2, now);
    (4, "_hparams_/session_end_info".into(), info)
}

/// A protocol buffer being written: fields appended in order.
#[derive(Default)]
pub struct Proto(pub Vec<u8>);

impl Proto {
    fn key(&mut self, field: u32, wire: u8) {
        self.raw_varint(((field as u64) << 3) | wire as u64);
    }

    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub fn varint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.raw_varint(v);
    }

    pub fn double(&mut self, field: u32, v: f64) {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    pub fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    pub fn message(&mut self, field: u32, m: &Proto) {
        self.bytes(field, &m.0);
    }
}

/// CRC-32C (Castagnoli), bitwise: event files are small.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn write_record(w: &mut impl Write, data: &[u8]) -> anyhow::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    w.write_all(&len)?;
    w.write_all(&masked_crc(&len).to_le_bytes())?;
    w.write_all(data)?;
    w.write_all(&masked_crc(data).to_le_bytes())?;
    Ok(())
}

/// The records of a TFRecord file, every CRC checked.
pub fn read_records(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        anyhow::ensure!(
            bytes.len() >= at + 12,
            "a truncated record header at byte {at}"
        );
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        anyhow::ensure!(crc == masked_crc(len_bytes), "bad length CRC at byte {at}");
        let start = at + 12;
        anyhow::ensure!(
            bytes.len() >= start + len + 4,
            "a truncated record at byte {at}"
        );
        let data = &bytes[start..start + len];
        let crc = u32::from_le_bytes(bytes[start + len..start + len + 4].try_into().unwrap());
        anyhow::ensure!(crc == masked_crc(data), "bad data CRC at byte {at}");
        out.push(data.to_vec());
        at = start + len + 4;
    }
    Ok(out)
}

/// One field of a protocol buffer: (field number, wire type, the bytes of a length-delimited or
/// fixed-width value, the value of a varint).
pub type Field = (u32, u8, Vec<u8>, u64);

/// A protocol buffer's fields, for checking what was written.
pub fn fields(mut b: &[u8]) -> anyhow::Result<Vec<Field>> {
    fn varint(b: &mut &[u8]) -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b
                .split_first()
                .ok_or_else(|| anyhow::anyhow!("truncated varint"))?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        anyhow::bail!("varint too long")
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let (bytes, num) = match wire {
            0 => (Vec::new(), varint(&mut b)?),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                anyhow::ensure!(b.len() >= n, "truncated fixed field");
                let (v, rest) = b.split_at(n);
                b = rest;
                (v.to_vec(), 0)
            }
            2 => {
                let n = varint(&mut b)? as usize;
                anyhow::ensure!(b.len() >= n, "truncated field");
                let (v, rest) = b.split_at(n);
                b = rest;
                (v.to_vec(), 0)
            }
            w => anyhow::bail!("wire type {w}"),
        };
        out.push((field, wire, bytes, num));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_the_published_values() {
        // RFC 3720's check value, and TensorFlow's masking of it.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        // TFRecord's mask of it: rotated right by 15, plus 0xa282ead8.
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let mut buf = Vec::new();
        write_record(&mut buf, b"hello").unwrap();
        write_record(
            &mut buf,
            &event(1.5, 3, |e| {
                e.message(5, &scalar_summary("test/accuracy", 0.5))
            }),
        )
        .unwrap();
        let recs = read_records(&buf).unwrap();
        assert_eq!(recs[0], b"hello");
        let f = fields(&recs[1]).unwrap();
        assert_eq!((f[0].0, f[0].2.clone()), (1, 1.5f64.to_le_bytes().to_vec()));
        assert_eq!((f[1].0, f[1].3), (2, 3));
        let summary = fields(&f[2].2).unwrap();
        let value = fields(&summary[0].2).unwrap();
        assert_eq!(value[0].2, b"test/accuracy");
        assert_eq!(value[1].2, 0.5f32.to_le_bytes());
        let mut bad = buf.clone();
        bad[14] ^= 1;
        assert!(read_records(&bad).is_err());
        assert!(read_records(&buf[..buf.len() - 1]).is_err());
    }
}
