//! Where the filter's metrics go: a small interface over the host's stats, so the same metric set
//! ([`crate::metrics`], [`crate::accuracy`]) serves the proxy-wasm module and a native host. A
//! metric the host refuses to define is skipped; a failed update is the host's to report.

/// What kind of metric a definition asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MetricKind {
    /// Only ever increases (`_total`).
    Counter,
    /// Set to a value.
    Gauge,
    /// Records values into buckets.
    Histogram,
}

/// The host's stats.
pub trait StatsSink {
    /// Defines a metric of `kind` called `name`; `None` when the host refuses (the metric is then
    /// skipped). Ids are the host's, one space per kind.
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Adds `by` (more than 0) to counter `id`.
    fn add(&self, id: u32, by: u64) -> Result<(), String>;
    /// Sets gauge `id` to `value`.
    fn set(&self, id: u32, value: u64) -> Result<(), String>;
    /// Records `value` in histogram `id`.
    fn record(&self, id: u32, value: u64) -> Result<(), String>;
}

#[cfg(test)]
pub(crate) mod fake {
    //! Stats kept in memory, for unit tests of what the filter counts.

    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::{MetricKind, StatsSink};

    /// Every defined metric by name, with its sum (counters), last value (gauges) or values
    /// (histograms).
    #[derive(Default)]
    pub(crate) struct FakeStats {
        names: RefCell<Vec<(MetricKind, String)>>,
        values: RefCell<HashMap<String, Vec<u64>>>,
    }

    impl FakeStats {
        /// A counter's total, or a gauge's value (0 when never touched).
        pub(crate) fn value(&self, name: &str) -> u64 {
            let kind = self.names.borrow().iter().find(|(_, n)| n == name).map(|(k, _)| *k);
            let values = self.values.borrow();
            let values = values.get(name).map(Vec::as_slice).unwrap_or_default();
            match kind {
                Some(MetricKind::Gauge) => values.last().copied().unwrap_or(0),
                _ => values.iter().sum(),
            }
        }

        /// The values recorded in a histogram.
        pub(crate) fn recorded(&self, name: &str) -> Vec<u64> {
            self.values.borrow().get(name).cloned().unwrap_or_default()
        }

        fn push(&self, id: u32, value: u64) -> Result<(), String> {
            let name =
                self.names.borrow().get(id as usize).map(|(_, n)| n.clone()).ok_or("no such metric")?;
            self.values.borrow_mut().entry(name).or_default().push(value);
            Ok(())
        }
    }

    impl StatsSink for FakeStats {
        fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
            let mut names = self.names.borrow_mut();
            names.push((kind, name.to_owned()));
            Some(names.len() as u32 - 1)
        }

        fn add(&self, id: u32, by: u64) -> Result<(), String> {
            if by == 0 {
                return Err("an increment of 0".to_owned());
            }
            self.push(id, by)
        }

        fn set(&self, id: u32, value: u64) -> Result<(), String> {
            self.push(id, value)
        }

        fn record(&self, id: u32, value: u64) -> Result<(), String> {
            self.push(id, value)
        }
    }
}
