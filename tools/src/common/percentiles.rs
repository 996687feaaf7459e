//! Latency percentiles, nearest rank, in milliseconds: the figures every load report prints.

use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            millis(samples[index])
        };
        Percentiles {
            count: samples.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: millis(samples[samples.len() - 1]),
        }
    }

    /// `p50 1.00 ms  p90 … (n=…)`, as the reports print it.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }

    /// `{"p50", "p90", "p99", "max"}`, rounded to hundredths.
    pub fn json(&self) -> Value {
        json!({
            "p50": round2(self.p50),
            "p90": round2(self.p90),
            "p99": round2(self.p99),
            "max": round2(self.max),
        })
    }

    /// As `json`, with the sample count `n`.
    pub fn json_with_count(&self) -> Value {
        let mut value = self.json();
        value["n"] = json!(self.count);
        value
    }
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let ms =
            |v: std::ops::RangeInclusive<u64>| v.map(Duration::from_millis).collect::<Vec<_>>();
        let cases = [
            (ms(1..=100), (100, 50.0, 90.0, 99.0, 100.0)),
            (ms(1..=10), (10, 5.0, 9.0, 10.0, 10.0)),
            (ms(7..=7), (1, 7.0, 7.0, 7.0, 7.0)),
            (vec![], (0, 0.0, 0.0, 0.0, 0.0)),
        ];
        for (samples, expected) in cases {
            let p = Percentiles::of(samples);
            assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), expected);
        }
        let p = Percentiles::of(vec![Duration::from_micros(1234)]);
        assert_eq!(
            p.json(),
            json!({ "p50": 1.23, "p90": 1.23, "p99": 1.23, "max": 1.23 })
        );
        assert_eq!(p.json_with_count()["n"], 1);
        assert_eq!(
            p.line(),
            "p50 1.23 ms  p90 1.23 ms  p99 1.23 ms  max 1.23 ms  (n=1)"
        );
    }
}
