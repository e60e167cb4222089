//! `fer`: sets up the process (allocator, threads, signals) and runs the command line of the
//! `fer_runner` library.

use clap::Parser;
use fer_runner::Cli;

// Training allocates and frees large tensors every op; mimalloc reuses them instead of
// returning pages to the OS (measured: much less system time than glibc malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Candle's element-wise CPU ops (gradient sums, the heads' and losses' arithmetic) run on a
/// pool of its own whose idle thread spins for ~25k rounds after every op, taking a core from
/// the rayon threads that run our kernels: on 2 cores the training step was ~20% slower with it
/// (docs/cpu-kernels.md, "Threads"). One Candle thread makes those ops run inline on the
/// calling rayon thread instead. A user's own CANDLE_NUM_THREADS is kept.
fn single_threaded_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: at start-up, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// mimalloc's `purge_delay` option: -1 keeps freed pages instead of returning them to the OS,
/// which otherwise re-zeroes them on every step (measured: ~5% faster training steps).
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn main() {
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY as _, -1) };
    single_threaded_candle_elementwise();
    fer_runner::threads::pin_if_asked();
    // Like other Unix tools, end quietly when the reader of our output goes away (`fer runs |
    // head`), instead of panicking in println!. A trial whose runner died ends the same way.
    // SAFETY: restoring the default disposition of one signal at start-up.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(err) = fer_runner::run(cli.command) {
        eprintln!("error: {err:#}");
        std::process::exit(fer_runner::exit_code(&err));
    }
}
