//! Clusters without a database server: workers write what their trial reports to a journal in
//! the shared runs folder (`RUNS/<sweep>/<key>/journal.jsonl`), and `fer sync` ingests the
//! journals into the SQLite file on the login node.
//!
//! A journal is JSON lines, appended by one writer at a time (Slurm runs each array task once):
//! a `start` record, the trial's event lines as they come (`line`), an `end` record. Each
//! journal attempt has an id; the store remembers how many of its records are ingested
//! (`journal_attempts`), so syncing again adds only what is new, and a last line still being
//! written (no newline yet) waits for the next sync: never lost, never counted twice. Without
//! claims to race for, the submitter gives each array task one trial (a manifest file of
//! trial keys, task i = line i).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::store::{AttemptEnd, Claimant, Store};
use crate::sweep::Sweep;

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The journal attempt this record belongs to.
    pub attempt: String,
    #[serde(flatten)]
    pub body: Body,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    Start(Start),
    /// A line the trial printed (an event line, or anything else it wrote to stdout).
    Line(String),
    End(End),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Start {
    pub at: String,
    /// Who ran the attempt (device, host, pid, Slurm job, code version).
    #[serde(flatten)]
    pub who: Claimant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct End {
    pub status: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub failure_class: Option<String>,
    pub error: Option<String>,
    pub stderr_tail: Option<String>,
}

/// The journal of a trial.
pub fn path(runs_dir: &Path, sweep: &str, key: &str) -> PathBuf {
    crate::scheduler::trial_dir(runs_dir, sweep, key).join("journal.jsonl")
}

/// Appends records to a journal, one `write` per line.
pub struct Writer {
    file: std::fs::File,
    path: PathBuf,
    pub attempt: String,
}

impl Writer {
    pub fn open(path: &Path, attempt: String) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening journal {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            attempt,
        })
    }

    pub fn write(&mut self, body: Body) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&Record {
            attempt: self.attempt.clone(),
            body,
        })?;
        line.push('\n');
        // One write of the whole line: a reader sees it whole or not at all (until the newline).
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing journal {}", self.path.display()))
    }
}

/// The complete records of a journal (a last line without its newline is left for later).
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading journal {}", path.display())),
    };
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &[][..],
    };
    String::from_utf8_lossy(complete)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: not a journal record (expected {{\"attempt\": ..., \"start\" | \"line\" | \"end\": ...}})",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// What one `fer sync` ingested.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Synced {
    pub records: usize,
    pub attempts_started: usize,
    pub attempts_ended: usize,
    /// Running attempts whose Slurm task left the queue without an end record.
    pub abandoned: usize,
}

/// Ingest the journals of a sweep's trials into the store (idempotent).
pub async fn sync(store: &Store, sweep: &Sweep, runs_dir: &Path) -> anyhow::Result<Synced> {
    let mut out = Synced::default();
    let bar = indicatif::ProgressBar::hidden();
    for trial in &sweep.trials {
        let path = path(runs_dir, &sweep.name, &trial.key);
        let records = read(&path)?;
        // Records per journal attempt, in the order the attempts appear.
        let mut attempts: Vec<(String, Vec<&Record>)> = Vec::new();
        for r in &records {
            match attempts.iter_mut().find(|(id, _)| *id == r.attempt) {
                Some((_, rs)) => rs.push(r),
                None => attempts.push((r.attempt.clone(), vec![r])),
            }
        }
        for (jid, recs) in attempts {
            let (attempt, done) = match store.journal_attempt(&jid).await? {
                Some((id, lines)) => (id, lines as usize),
                None => {
                    let Body::Start(s) = &recs[0].body else {
                        anyhow::bail!(
                            "{}: journal attempt {jid} does not begin with a start record",
                            path.display()
                        );
                    };
                    let id = store
                        .start_journal_attempt(&trial.key, &jid, &s.who, &s.at)
                        .await?;
                    out.attempts_started += 1;
                    out.records += 1;
                    (id, 1)
                }
            };
            for (i, r) in recs.iter().enumerate().skip(done) {
                match &r.body {
                    Body::Start(_) => {}
                    Body::Line(line) => {
                        crate::scheduler::record_line(store, attempt, line, &bar).await?;
                    }
                    Body::End(e) => {
                        store
                            .finish(
                                attempt,
                                AttemptEnd {
                                    status: &e.status,
                                    exit_code: e.exit_code,
                                    signal: e.signal,
                                    failure_class: e.failure_class.as_deref(),
                                    error: e.error.clone(),
                                    stderr_tail: e.stderr_tail.clone(),
                                },
                            )
                            .await?;
                        out.attempts_ended += 1;
                    }
                }
                store.journal_progress(&jid, i as i64 + 1).await?;
                out.records += 1;
            }
        }
    }
    // A worker killed outright (node failure, scancel after its grace) writes no end record:
    // its attempt ends when its task has left the queue.
    let running = store.running_slurm_attempts(&sweep.name).await?;
    if !running.is_empty() {
        let jobs: Vec<String> = running
            .iter()
            .map(|(_, j)| j.split('_').next().unwrap_or(j).to_string())
            .collect();
        if let Ok(queue) = crate::slurm::squeue(&jobs) {
            for (id, job) in running {
                if !queue.iter().any(|t| t.id == job) {
                    out.abandoned += store
                        .interrupt(id, "its Slurm task left the queue without recording an end")
                        .await?;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_written_line_waits_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("fer-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("j.jsonl");
        let mut w = Writer::open(&p, "a1".into()).unwrap();
        w.write(Body::Line("{\"x\":1}".into())).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"attempt\":\"a1\",\"li").unwrap();
        assert_eq!(
            read(&p).unwrap().len(),
            1,
            "the partial line is not read yet"
        );
        f.write_all(b"ne\":\"two\"}\n").unwrap();
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].body, Body::Line("two".into()));
        f.write_all(b"garbage\n").unwrap();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(e.contains("j.jsonl:3"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
