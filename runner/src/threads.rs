//! `FER_PIN_THREADS=1`: each rayon worker bound to its own CPU.
//!
//! On a machine with more cores than fer's threads (2 threads on a 16-core server, as the speed
//! comparisons run), the scheduler is free to move a worker to another core, whose caches are
//! cold; pinning helped once at 224 px and not at 64 px (README, "On a 16-core Xeon"). Opt-in:
//! two processes that each pinned their workers to the first CPUs of the same set would share
//! those cores, so it is for a process that has the CPUs of its affinity mask (`taskset`, a Slurm
//! job's cgroup) to itself.

/// The CPUs this process may run on (its affinity mask), in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); sched_getaffinity writes at
    // most size_of::<cpu_set_t>() bytes into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Binds the calling thread to `cpu` (one of `allowed_cpus`); false if the kernel refused.
pub fn pin_to(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: as in `allowed_cpus`; CPU_SET writes inside the set (cpu < CPU_SETSIZE).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// With `FER_PIN_THREADS=1`, builds rayon's global pool with worker i bound to the i-th allowed
/// CPU (round robin), and binds the calling thread, which waits while the workers run a kernel,
/// to the first. Call before anything uses rayon; otherwise it does nothing.
pub fn pin_if_asked() {
    if std::env::var("FER_PIN_THREADS").map_or(true, |v| v.trim() != "1") {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.is_empty() {
        return;
    }
    pin_to(cpus[0]);
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(move |i| {
            pin_to(cpus[i % cpus.len()]);
        })
        .build_global();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_alone_and_others_keep_the_mask() {
        let before = allowed_cpus();
        assert!(!before.is_empty(), "a process runs on at least one CPU");
        let last = *before.last().unwrap();
        let inside = std::thread::spawn(move || (pin_to(last), allowed_cpus()))
            .join()
            .unwrap();
        assert_eq!(inside, (true, vec![last]));
        // Affinity is per thread: this one keeps its mask.
        assert_eq!(allowed_cpus(), before);
        assert!(!pin_to(libc::CPU_SETSIZE as usize));
    }
}
