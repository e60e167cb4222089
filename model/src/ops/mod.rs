//! Differentiable ops that Candle lacks or gets wrong (see ARCHITECTURE.md, Decisions: "Own ops
//! instead of Candle's where Candle is wrong" and "Fast CPU kernels"; the kernels' design and
//! measurements: docs/cpu-kernels.md).

/// The instruction sets the kernels may use, detected once per process. `FER_ISA` caps them at a
/// level (`baseline`: the portable code paths; `avx2`: AVX2 + FMA, no AVX-512; `avx512`: all
/// present), so the kernel tests run at every level a machine has (CI runs each one below the
/// machine's own).
pub mod isa {
    use std::sync::OnceLock;

    /// Instruction-set levels, lowest first.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Level {
        Baseline,
        Avx2,
        Avx512,
    }

    impl Level {
        pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

        pub fn name(self) -> &'static str {
            match self {
                Level::Baseline => "baseline",
                Level::Avx2 => "avx2",
                Level::Avx512 => "avx512",
            }
        }
    }

    /// The cap `FER_ISA` asks for (None: unset), or why its value is not a level.
    pub fn requested() -> Result<Option<Level>, String> {
        match std::env::var("FER_ISA") {
            Err(_) => Ok(None),
            Ok(v) => Level::ALL
                .into_iter()
                .find(|l| l.name() == v.trim())
                .map(Some)
                .ok_or_else(|| {
                    format!("FER_ISA={v:?}: expected baseline, avx2 or avx512 (a ceiling on the instruction sets the kernels use)")
                }),
        }
    }

    /// The cap in force. A misspelt `FER_ISA` stops the process here rather than silently
    /// testing the wrong code path (`fer` checks it first, with this message, at start).
    fn cap() -> Level {
        static CAP: OnceLock<Level> = OnceLock::new();
        *CAP.get_or_init(|| match requested() {
            Ok(l) => l.unwrap_or(Level::Avx512),
            Err(why) => panic!("{why}"),
        })
    }

    /// The highest level this CPU has: AVX2 needs AVX, AVX2 and FMA; AVX-512 adds F, BW, DQ, VL.
    pub fn detected() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if !(has!("avx") && has!("avx2") && has!("fma")) {
                Level::Baseline
            } else if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") {
                Level::Avx512
            } else {
                Level::Avx2
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Level::Baseline
        }
    }

    /// The level the kernels run at: what the CPU has, capped by `FER_ISA` (decided once).
    pub fn active() -> Level {
        static ACTIVE: OnceLock<Level> = OnceLock::new();
        *ACTIVE.get_or_init(|| detected().min(cap()))
    }

    /// AVX, AVX2 and FMA: 8-lane loops (`simd_dispatch!`, Adam), the GEMM's 6x16 microkernel and
    /// its 8x8 transposes.
    pub fn avx2() -> bool {
        active() >= Level::Avx2
    }

    /// AVX-512 F, BW, DQ and VL (with AVX2 and FMA): 16-lane loops with masked edges, the GEMM's
    /// 6x32 microkernel.
    pub fn avx512() -> bool {
        active() >= Level::Avx512
    }
}

/// `fn name(args) -> R` calling `body(args)` (an `#[inline(always)]` function) compiled for the
/// best level the CPU has: AVX-512 (16 lanes, masked tails), AVX2 (8 lanes), else x86-64's
/// baseline SSE2 (4 lanes). Same operations in the same order at every level, so the same
/// results.
macro_rules! simd_dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$attr])*
        #[inline(never)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if $crate::ops::isa::avx512() {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: the features are present (`isa::avx512` detected them).
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::ops::isa::avx2() {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                // SAFETY: AVX2 is present (`isa::avx2` detected it).
                return unsafe { avx2($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

/// `even[j] = row[2j]`, `odd[j] = row[2j + 1]` (an odd-length row's last value goes to `even`).
/// Inlined into the callers' `simd_dispatch!` bodies (one dispatch per plane, not per row).
#[inline(always)]
pub(crate) fn split_even_odd(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        even[row.len() / 2] = *last;
    }
    for ((pair, e), o) in pairs.zip(even.iter_mut()).zip(odd.iter_mut()) {
        *e = pair[0];
        *o = pair[1];
    }
}

pub(crate) mod adam;
pub mod add_relu;
pub mod batch_norm;
pub mod conv;
pub mod flip;
pub mod gemm;
pub mod in_place;
pub mod pool;
pub mod second_axis;
pub mod timing;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// The elements of a contiguous layout (custom ops get storage + layout, possibly offset).
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The elements of contiguous f32 CPU storage.
pub(crate) fn f32_contiguous<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        other => candle_core::bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

/// `f32_contiguous` for an in-place op's output.
pub(crate) fn f32_contiguous_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{op}: expected a contiguous f32 CPU tensor"),
    }
}

/// `len` zeros, written by all the pool's threads when the buffer is large. An op's output
/// zero-filled by `vec![0; len]` on the calling thread kept the other threads waiting: in a 112 px
/// training step on 2 threads `memset` was ~8 % of the calling thread's samples and ~1 % of the
/// other's (`perf record`, issue 21).
pub(crate) fn zeroed<T: Copy + Default + Send + Sync>(len: usize) -> Vec<T> {
    /// Smaller buffers are filled in place: a parallel region costs a few microseconds.
    const PARALLEL_FROM: usize = 1 << 18;
    if len < PARALLEL_FROM || rayon::current_num_threads() == 1 {
        return vec![T::default(); len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(1 << 15)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(T::default())));
    // SAFETY: the capacity is at least len, and its first len values were just written.
    unsafe { v.set_len(len) };
    v
}

/// `len` values for an op's output that the op writes in full before anything reads it (a GEMM
/// without accumulation, Winograd's output transform): no zero fill, which for an
/// activation-sized output costs a pass over memory that the op's own writes then repeat.
pub(crate) fn unfilled(len: usize) -> Vec<std::mem::MaybeUninit<f32>> {
    if POISON.load(std::sync::atomic::Ordering::Relaxed) {
        return vec![std::mem::MaybeUninit::new(f32::NAN); len];
    }
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is at least len, and MaybeUninit values need no initialisation.
    unsafe { v.set_len(len) };
    v
}

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on `unfilled` buffers start as NaN, so a test fails if an op leaves any value of
/// one unwritten (fresh memory is often zero, which would hide it).
pub fn poison_unfilled() {
    POISON.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `v` as the f32 values it now holds.
///
/// # Safety
/// Every element of `v` has been written.
pub(crate) unsafe fn assume_filled(v: Vec<std::mem::MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<f32> has f32's size and alignment, the allocation is v's own (not
    // dropped: ManuallyDrop), and the caller guarantees every value is initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// Large per-call buffers (packed operands, column matrices, layout copies) are taken from and
/// returned to this pool: allocating tens of MB afresh per convolution cost page faults and
/// zero-filling at every call. Buffers come back with stale contents; every user overwrites all
/// of the elements it reads.
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// A buffer of at least `len` values (stale contents).
pub(crate) fn take_scratch(len: usize) -> Vec<f32> {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    // The smallest free buffer that is large enough, else the largest (grown): big buffers are
    // not spent on small requests.
    let fits = (0..pool.len())
        .filter(|&i| pool[i].len() >= len)
        .min_by_key(|&i| pool[i].len());
    let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
    let mut v = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

/// Returns a buffer from `take_scratch` to the pool.
pub(crate) fn give_scratch(v: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < 8 {
        pool.push(v);
    }
}

pub use add_relu::add_relu;
pub use conv::{conv2d, conv2d_inference, conv2d_native, ConvGeometry, PreparedWeights};
pub use gemm::matmul;
pub use pool::{max_pool2d, max_pool2d_ceil, max_pool2d_native};
