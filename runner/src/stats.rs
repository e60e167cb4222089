//! The statistics every summary and report uses: mean and sample standard deviation over seeds,
//! paired differences with Student-t confidence intervals, the seeds a difference would need, and
//! the plateau rule that flags an undertrained trial.

/// Mean, sample standard deviation (0 for one value) and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Stat { mean, std, n })
    }
}

/// The two-sided 95 % quantile of Student's t with `df` degrees of freedom (t such that
/// P(|T| <= t) = 0.95). Exact table values to 4 decimals up to 30 degrees of freedom, then the
/// Cornish-Fisher expansion around the normal quantile (error < 1e-4 there).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010,
        2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739,
        2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
    ];
    assert!(df >= 1, "a t interval needs at least one degree of freedom");
    if df <= TABLE.len() {
        return TABLE[df - 1];
    }
    let z = 1.959_963_984_540_054_f64;
    let v = df as f64;
    let (z3, z5, z7) = (z.powi(3), z.powi(5), z.powi(7));
    z + (z3 + z) / (4.0 * v)
        + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
        + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v * v * v)
}

/// A paired comparison of two cells over the seeds both have: differences a - b.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Number of pairs.
    pub n: usize,
    /// Mean difference.
    pub mean: f64,
    /// Sample standard deviation of the differences.
    pub sd: f64,
    /// 95 % confidence interval of the mean difference (t with n - 1 degrees of freedom);
    /// None with fewer than 2 pairs.
    pub ci: Option<(f64, f64)>,
}

impl Paired {
    pub fn of(a: &[f64], b: &[f64]) -> Option<Paired> {
        assert_eq!(a.len(), b.len(), "paired samples must have equal length");
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        let s = Stat::of(&d)?;
        let ci = (s.n >= 2).then(|| {
            let h = t975(s.n - 1) * s.std / (s.n as f64).sqrt();
            (s.mean - h, s.mean + h)
        });
        Some(Paired {
            n: s.n,
            mean: s.mean,
            sd: s.std,
            ci,
        })
    }

    /// The interval excludes 0.
    pub fn resolved(&self) -> bool {
        self.ci.is_some_and(|(lo, hi)| lo > 0.0 || hi < 0.0)
    }

    /// Pairs needed for a 95 % interval to exclude 0 if the observed mean difference and
    /// standard deviation held: the smallest n >= 2 with t(n-1) * sd / sqrt(n) < |mean|.
    /// None when the observed difference is 0 or the spread is unknown (one pair); capped at
    /// `cap` (Some(cap) means "more than cap - 1").
    pub fn seeds_to_resolve(&self, cap: usize) -> Option<usize> {
        if self.n < 2 || self.mean == 0.0 {
            return None;
        }
        if self.sd == 0.0 {
            return Some(2);
        }
        (2..=cap)
            .find(|&n| t975(n - 1) * self.sd / (n as f64).sqrt() < self.mean.abs())
            .or(Some(cap))
    }
}

/// Whether a trial reached a plateau: the mean of its last `window` epochs is within
/// `tolerance` of its best epoch (accuracies in the same unit as `tolerance`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plateau {
    pub best: f64,
    pub last_mean: f64,
    pub undertrained: bool,
}

/// Epochs the plateau rule averages.
pub const PLATEAU_WINDOW: usize = 3;
/// Accuracy points the mean of the last epochs may sit below the best epoch.
pub const PLATEAU_TOLERANCE: f64 = 0.01;

/// The plateau rule on a per-epoch accuracy curve (fractions): undertrained when the mean of the
/// last 3 epochs is more than 1 point below the best epoch (a curve still rising, or one that
/// has not settled). A curve shorter than the window is undertrained by definition.
pub fn plateau(curve: &[f64]) -> Option<Plateau> {
    let best = curve.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if curve.is_empty() {
        return None;
    }
    let tail = &curve[curve.len().saturating_sub(PLATEAU_WINDOW)..];
    let last_mean = tail.iter().sum::<f64>() / tail.len() as f64;
    Some(Plateau {
        best,
        last_mean,
        undertrained: curve.len() < PLATEAU_WINDOW || best - last_mean > PLATEAU_TOLERANCE + 1e-12,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_standard_deviation() {
        let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.n, 4);
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(Stat::of(&[7.0]).unwrap().std, 0.0);
        assert!(Stat::of(&[]).is_none());
    }

    #[test]
    fn t_quantiles_match_published_values_and_join_smoothly() {
        assert!((t975(1) - 12.7062).abs() < 1e-4);
        assert!((t975(2) - 4.3027).abs() < 1e-4);
        assert!((t975(10) - 2.2281).abs() < 1e-4);
        // The expansion agrees with the table where they meet, and with published values beyond.
        let expansion_at_30 = {
            let z = 1.959_963_984_540_054_f64;
            let v = 30.0;
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z)
                    / (384.0 * v * v * v)
        };
        assert!((expansion_at_30 - t975(30)).abs() < 2e-4);
        assert!((t975(40) - 2.0211).abs() < 1e-4);
        assert!((t975(60) - 2.0003).abs() < 1e-4);
        assert!((t975(120) - 1.9799).abs() < 1e-4);
        for df in 1..200 {
            assert!(t975(df + 1) < t975(df), "t975 must decrease with df ({df})");
        }
    }

    #[test]
    fn paired_interval_of_known_samples() {
        // Differences 1, 2, 3: mean 2, sd 1, half-width t(2) / sqrt(3) = 4.3027 / 1.7321.
        let p = Paired::of(&[11.0, 22.0, 33.0], &[10.0, 20.0, 30.0]).unwrap();
        assert_eq!(p.n, 3);
        assert!((p.mean - 2.0).abs() < 1e-12);
        assert!((p.sd - 1.0).abs() < 1e-12);
        let (lo, hi) = p.ci.unwrap();
        let h = 4.3027 / 3f64.sqrt();
        assert!((lo - (2.0 - h)).abs() < 1e-4 && (hi - (2.0 + h)).abs() < 1e-4);
        assert!(lo < 0.0 && p.resolved() == (lo > 0.0));
        assert!(!p.resolved(), "2 - 2.484 < 0: the interval includes 0");
        // Resolving it needs n with t(n-1)/sqrt(n) < 2: n = 4 gives 3.1824/2 = 1.59.
        assert_eq!(p.seeds_to_resolve(1000), Some(4));

        // A larger, consistent difference is resolved with 3 pairs.
        let q = Paired::of(&[15.0, 16.0, 17.0], &[10.0, 10.5, 11.0]).unwrap();
        assert!(q.resolved());
        assert!(q.ci.unwrap().0 > 0.0);
        // Negative differences resolve below zero.
        let r = Paired::of(&[10.0, 10.5, 11.0], &[15.0, 16.0, 17.0]).unwrap();
        assert!(r.resolved() && r.ci.unwrap().1 < 0.0);
    }

    #[test]
    fn paired_edge_cases() {
        let one = Paired::of(&[3.0], &[1.0]).unwrap();
        assert!(one.ci.is_none() && !one.resolved());
        assert_eq!(one.seeds_to_resolve(1000), None);
        let none = Paired::of(&[1.0, 2.0], &[1.0, 2.0]).unwrap();
        assert!(!none.resolved());
        assert_eq!(none.seeds_to_resolve(1000), None);
        // A tiny difference with a large spread hits the cap.
        let noisy = Paired::of(&[1.0, -1.0, 0.01], &[0.0, 0.0, 0.0]).unwrap();
        assert_eq!(noisy.seeds_to_resolve(50), Some(50));
    }

    #[test]
    fn plateau_flags_rising_and_unsettled_curves() {
        // Still rising: last 3 mean 0.60 vs best 0.65.
        let rising = plateau(&[0.1, 0.3, 0.55, 0.6, 0.65]).unwrap();
        assert!(rising.undertrained);
        // Flat within a point: converged.
        let flat = plateau(&[0.5, 0.8, 0.905, 0.91, 0.9, 0.905]).unwrap();
        assert!(!flat.undertrained, "{flat:?}");
        // Exactly one point below the best is still a plateau.
        let edge = plateau(&[0.92, 0.91, 0.91, 0.91]).unwrap();
        assert!(!edge.undertrained, "{edge:?}");
        // A collapse at the end is not a plateau either.
        assert!(plateau(&[0.9, 0.91, 0.92, 0.7, 0.7]).unwrap().undertrained);
        // Too short to tell.
        assert!(plateau(&[0.9, 0.9]).unwrap().undertrained);
        assert!(plateau(&[]).is_none());
    }
}
