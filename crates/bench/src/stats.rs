//! Latency histograms and the summaries kept in the results file.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A latency histogram in nanoseconds (1 ns .. 1 h, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.max(1));
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// One value per target, in the order the table prints them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerTarget<T> {
    pub direct: Option<T>,
    pub nestor: Option<T>,
    pub nginx: Option<T>,
    /// The byte relay (crate::relay): the floor any proxy pays on this machine.
    #[serde(default = "absent")]
    pub relay: Option<T>,
}

/// A target missing from an older results file.
fn absent<T>() -> Option<T> {
    None
}

impl<T> Default for PerTarget<T> {
    fn default() -> Self {
        PerTarget { direct: None, nestor: None, nginx: None, relay: None }
    }
}

impl<T> PerTarget<T> {
    pub fn get(&self, t: Target) -> Option<&T> {
        match t {
            Target::Direct => self.direct.as_ref(),
            Target::Nestor => self.nestor.as_ref(),
            Target::Nginx => self.nginx.as_ref(),
            Target::Relay => self.relay.as_ref(),
        }
    }

    pub fn get_mut(&mut self, t: Target) -> &mut Option<T> {
        match t {
            Target::Direct => &mut self.direct,
            Target::Nestor => &mut self.nestor,
            Target::Nginx => &mut self.nginx,
            Target::Relay => &mut self.relay,
        }
    }
}

/// What a workload runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Nestor,
    Nginx,
    /// A byte relay (crate::relay): the floor.
    Relay,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Direct, Target::Nestor, Target::Nginx, Target::Relay];

    pub fn name(&self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nestor => "nestor",
            Target::Nginx => "nginx",
            Target::Relay => "relay",
        }
    }
}

/// `--rounds`: a count of at least 1 (the results are medians of rounds, and none has no
/// median).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The order targets take within round `round` of a comparison: as listed in even rounds,
/// reversed in odd ones. On a machine whose speed drifts, a fixed order gives the target that
/// always runs last (or first) the drift's whole effect; alternating shares it out.
pub fn round_order(targets: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..targets).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Round-by-round ratios `a[i] / b[i]` of two targets measured in the same rounds. Each round's
/// ratio compares the two under one machine state, so drift between rounds (a shared VM's
/// speed moves by several percent within a minute) cancels, where a ratio of the two medians
/// would carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Rounds in which `a` was ahead (ratio above 1).
    pub ahead: usize,
    pub rounds: usize,
}

/// `None` when there is no round both were measured in (a round without a finite figure on
/// either side does not count).
pub fn paired(a: &[f64], b: &[f64]) -> Option<Paired> {
    let ratios: Vec<f64> = a.iter().zip(b).filter(|(a, b)| a.is_finite() && b.is_finite() && **b > 0.0).map(|(a, b)| a / b).collect();
    if ratios.is_empty() {
        return None;
    }
    let (min, max) = min_max(&ratios);
    Some(Paired { median: median(&ratios), min, max, ahead: ratios.iter().filter(|r| **r > 1.0).count(), rounds: ratios.len() })
}

/// Median of a list (NaN for none).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// (max − min) / median of a list, as a percentage: how much rounds disagreed.
pub fn spread_pct(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = median(v);
    let (lo, hi) = min_max(v);
    if m == 0.0 {
        0.0
    } else {
        (hi - lo) / m * 100.0
    }
}

/// The smallest and the largest of a list ((MAX, MIN) for none).
fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(spread_pct(&[90.0, 100.0, 110.0]), 20.0);
        assert_eq!(spread_pct(&[5.0]), 0.0);
    }

    #[test]
    fn orders_alternate_and_pairs_compare_round_by_round() {
        assert_eq!(round_order(3, 0), vec![0, 1, 2]);
        assert_eq!(round_order(3, 1), vec![2, 1, 0]);
        assert_eq!(round_order(3, 2), vec![0, 1, 2]);
        let p = paired(&[110.0, 90.0, 102.0], &[100.0, 100.0, 100.0]).unwrap();
        assert_eq!((p.median, p.min, p.max, p.ahead, p.rounds), (1.02, 0.9, 1.1, 2, 3));
        // Only rounds both have, and none against a zero.
        assert_eq!(paired(&[5.0, 7.0], &[0.0]), None);
        assert_eq!(paired(&[], &[1.0]), None);
        assert_eq!(paired(&[2.0, 9.0], &[1.0]).map(|p| p.rounds), Some(1));
        assert_eq!(paired(&[f64::NAN, 3.0], &[1.0, 2.0]).map(|p| (p.rounds, p.median)), Some((1, 1.5)), "a round without a figure is left out");
    }

    #[test]
    fn rounds_are_at_least_one() {
        assert_eq!(at_least_one("3"), Ok(3));
        assert!(at_least_one("0").is_err());
        assert!(at_least_one("-1").is_err());
        assert!(at_least_one("x").is_err());
    }

    #[test]
    fn latency_summary_in_microseconds() {
        let mut h = new_hist();
        for us in 1..=100u64 {
            record(&mut h, us * 1000);
        }
        let l = Latency::from_hist(&h);
        assert_eq!(l.count, 100);
        assert!((l.p50_us - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99_us - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max_us - 100.0).abs() < 0.1, "{l:?}");
    }
}
