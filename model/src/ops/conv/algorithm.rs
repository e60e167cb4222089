//! `FER_CONV`: which algorithm computes the convolutions that have a faster one than the direct
//! GEMM (Winograd for 3x3 stride-1, the dense product on small maps), read once per process.

use std::sync::OnceLock;

/// The `FER_CONV` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Winograd where it was measured faster (`auto`, the default; `winograd::applies`), the
    /// small-map product where it fits.
    Auto,
    /// Winograd for every 3x3 stride-1 padding-1 convolution the small-map product does not take,
    /// its weight gradient too (`winograd`).
    Winograd,
    /// The packed-column GEMM, as for every other geometry (`direct`): neither Winograd nor the
    /// small-map product.
    Direct,
}

impl Algorithm {
    /// Its `FER_CONV` value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Auto => "auto",
            Algorithm::Winograd => "winograd",
            Algorithm::Direct => "direct",
        }
    }
}

/// The algorithm `FER_CONV` asks for (unset: `Auto`), or why its value is not one.
pub fn requested() -> Result<Algorithm, String> {
    parse(std::env::var("FER_CONV").ok().as_deref())
}

/// `FER_CONV`'s value (None: unset) as an algorithm.
fn parse(value: Option<&str>) -> Result<Algorithm, String> {
    match value {
        None => Ok(Algorithm::Auto),
        Some(v) => match v.trim() {
            "auto" => Ok(Algorithm::Auto),
            "winograd" => Ok(Algorithm::Winograd),
            "direct" => Ok(Algorithm::Direct),
            _ => Err(format!(
                "FER_CONV={v:?}: expected auto, winograd or direct (the algorithm for 3x3 stride-1 convolutions)"
            )),
        },
    }
}

/// `requested`, decided once. A misspelt value stops the process (`fer` checks it at start).
pub(super) fn algorithm() -> Algorithm {
    static ALGO: OnceLock<Algorithm> = OnceLock::new();
    *ALGO.get_or_init(|| requested().unwrap_or_else(|why| panic!("{why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_algorithm_is_refused_by_name() {
        assert_eq!(parse(None), Ok(Algorithm::Auto));
        assert_eq!(parse(Some(" direct")), Ok(Algorithm::Direct));
        assert_eq!(parse(Some("winograd")), Ok(Algorithm::Winograd));
        let err = parse(Some("winogard")).unwrap_err();
        assert!(
            err.contains("FER_CONV=\"winogard\"") && err.contains("auto, winograd or direct"),
            "{err}"
        );
    }
}
