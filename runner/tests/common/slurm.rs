//! A one-node Slurm cluster for the tests: munged with its own key, slurmctld and slurmd from
//! Debian's `slurm-wlm` on this host (free ports, `proctrack/linuxproc`, `task/none`, state in a
//! temporary folder; `cred_expire=10` so a requeued task waits 10 s instead of the default 120),
//! started once per test process and stopped when it exits. Commands reach
//! it through `SLURM_CONF`. Skipped with a message where it cannot start (not root, Slurm not
//! installed) unless `FER_REQUIRE_SERVICES=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Cluster {
    /// The slurm.conf every command needs (`SLURM_CONF`).
    pub conf: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static PID_FILES: OnceLock<(PathBuf, Vec<PathBuf>)> = OnceLock::new();

pub fn cluster() -> Option<&'static Cluster> {
    match CLUSTER.get_or_init(start) {
        Ok(c) => Some(c),
        Err(why) if super::postgres::required() => {
            panic!("Slurm is required (FER_REQUIRE_SERVICES=1): {why}")
        }
        Err(why) => {
            eprintln!("skipping this Slurm test: {why}");
            None
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .chain([PathBuf::from("/usr/sbin").join(name)])
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

extern "C" fn stop_cluster() {
    if let Some((root, pids)) = PID_FILES.get() {
        for p in pids {
            if let Ok(pid) = std::fs::read_to_string(p) {
                let _ = Command::new("kill").arg(pid.trim()).output();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::remove_dir_all(root);
    }
}

fn start() -> Result<Cluster, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("slurmd must run as root".into());
    }
    let (ctld, slurmd, munged) = match (which("slurmctld"), which("slurmd"), which("munged")) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => {
            return Err(
                "slurmctld, slurmd or munged not found (apt-get install slurm-wlm munge)".into(),
            )
        }
    };
    let root = std::env::temp_dir().join(format!("fer-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["state", "spool", "log", "munge/key"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    let munge = root.join("munge");
    let key: Vec<u8> = (0..1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let key_file = munge.join("key/munge.key");
    std::fs::write(&key_file, key).map_err(|e| e.to_string())?;
    run(
        Command::new("chown").args(["-R", "munge"]).arg(&munge),
        "chown munge",
    )?;
    // The socket's folder must be reachable by every user, the key's by munge only.
    run(Command::new("chmod").arg("0755").arg(&munge), "chmod")?;
    run(
        Command::new("chmod").arg("0700").arg(munge.join("key")),
        "chmod",
    )?;
    run(Command::new("chmod").arg("0400").arg(&key_file), "chmod")?;
    let socket = munge.join("munge.socket");
    run(
        Command::new("runuser")
            .args(["-u", "munge", "--"])
            .arg(&munged)
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key_file.display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display()))
            .arg(format!("--seed-file={}", munge.join("seed").display())),
        "munged",
    )?;
    // Addresses are given, so the cluster does not depend on this host's name resolving.
    let host = hostname();
    let port = super::postgres::free_port;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let p = |name: &str| root.join(name).display().to_string();
    let conf = format!(
        "ClusterName=fertest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\n\
         SlurmctldPort={}\nSlurmdPort={}\nAuthType=auth/munge\nAuthInfo=socket={},cred_expire=10\n\
         StateSaveLocation={}\nSlurmdSpoolDir={}\nSlurmctldPidFile={}\nSlurmdPidFile={}\n\
         SlurmctldLogFile={}\nSlurmdLogFile={}\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
         SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n\
         JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
         ReturnToService=2\nMpiDefault=none\nKillWait=5\nMinJobAge=30\n\
         NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN\n\
         PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
        port(),
        port(),
        socket.display(),
        p("state"),
        p("spool"),
        p("slurmctld.pid"),
        p("slurmd.pid"),
        p("log/slurmctld.log"),
        p("log/slurmd.log"),
    );
    let conf_path = root.join("slurm.conf");
    std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
    let _ = PID_FILES.set((
        root.clone(),
        vec![
            root.join("slurmd.pid"),
            root.join("slurmctld.pid"),
            munge.join("munged.pid"),
        ],
    ));
    // SAFETY: registers a plain function with no captured state, run once at exit.
    unsafe { libc::atexit(stop_cluster) };
    run(
        Command::new(&ctld).env("SLURM_CONF", &conf_path),
        "slurmctld",
    )?;
    run(
        Command::new(&slurmd).env("SLURM_CONF", &conf_path),
        "slurmd",
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .env("SLURM_CONF", &conf_path)
            .output()
            .map_err(|e| format!("sinfo: {e}"))?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state == "idle" {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(root.join("log/slurmctld.log")).unwrap_or_default();
            return Err(format!(
                "the node did not become idle (state {state:?}): {log}"
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(Cluster { conf: conf_path })
}

/// The short host name, as slurmctld and slurmd compare it with the configuration.
fn hostname() -> String {
    let full = fer_runner::sweep_cmd::hostname();
    full.split('.').next().unwrap_or(&full).to_string()
}

/// Wait until `done()` holds, polling; panics with `what` after `secs`.
pub fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
