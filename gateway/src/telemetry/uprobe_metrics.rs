//! `tollgate_uprobe_*`: what the TLS uprobes saw and lost, read at scrape time from the kernel's
//! per-CPU counters and the reader's own (absolute values, exported as-is).

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};

/// One reading of the uprobe counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UprobeSnapshot {
    /// The kernel has uprobe support and the programs are attached.
    pub available: bool,
    /// Events delivered by the kernel, by kind (`data`, `close`).
    pub events: Vec<(&'static str, u64)>,
    /// Plaintext bytes the kernel emitted.
    pub bytes: u64,
    /// Events (or SSL calls) lost, by reason (`ring_full`, `per_call_cap`, `no_fd`,
    /// `read_failed`, `channel_full`).
    pub dropped: Vec<(&'static str, u64)>,
    /// SSL calls on connections that are not captured: nothing left the kernel.
    pub not_captured: u64,
    /// Library files probed, by kind (`shared`, `static`).
    pub attached_files: Vec<(&'static str, u64)>,
}

/// Reads the snapshot at scrape time.
pub type UprobeSource = Box<dyn Fn() -> UprobeSnapshot + Send + Sync>;

const AVAILABLE: &str = "tollgate_uprobe_available";
const EVENTS: &str = "tollgate_uprobe_events_total";
const BYTES: &str = "tollgate_uprobe_bytes_total";
const DROPPED: &str = "tollgate_uprobe_events_dropped_total";
const NOT_CAPTURED: &str = "tollgate_uprobe_not_captured_total";
const ATTACHED: &str = "tollgate_uprobe_attached_files";

/// Exposes an [`UprobeSource`] once one is set (nothing before: capture may be off).
pub struct UprobeCollector {
    descs: Vec<Desc>,
    source: parking_lot::Mutex<Option<UprobeSource>>,
}

fn help(name: &str) -> &'static str {
    match name {
        AVAILABLE => {
            "1 when TLS uprobes are attached, 0 when the kernel lacks uprobe support or they failed to start (L4 only)"
        }
        EVENTS => "TLS uprobe events delivered by the kernel, by kind (data, close)",
        BYTES => "TLS plaintext bytes emitted by the uprobes",
        DROPPED => {
            "TLS uprobe events or calls lost, by reason (ring_full, per_call_cap, no_fd, read_failed, channel_full)"
        }
        NOT_CAPTURED => "SSL calls on connections no capture rule matched: their plaintext never left the kernel",
        _ => "TLS library files with uprobes attached, by kind (shared libssl, static executable)",
    }
}

impl UprobeCollector {
    /// Descriptors for every family.
    pub fn new() -> Result<Self, prometheus::Error> {
        let mut descs = Vec::new();
        for (name, labels) in [
            (AVAILABLE, vec![]),
            (EVENTS, vec!["kind".to_string()]),
            (BYTES, vec![]),
            (DROPPED, vec!["reason".to_string()]),
            (NOT_CAPTURED, vec![]),
            (ATTACHED, vec!["kind".to_string()]),
        ] {
            descs.push(Desc::new(name.into(), help(name).into(), labels, Default::default())?);
        }
        Ok(UprobeCollector { descs, source: parking_lot::Mutex::new(None) })
    }

    /// Export `source` from now on.
    pub fn set_source(&self, source: UprobeSource) {
        *self.source.lock() = Some(source);
    }
}

fn counters(name: &str, label: &str, values: &[(&'static str, u64)]) -> Vec<MetricFamily> {
    let Ok(vec) = IntCounterVec::new(Opts::new(name, help(name)), &[label]) else {
        return Vec::new();
    };
    for (l, v) in values {
        vec.with_label_values(&[l]).inc_by(*v);
    }
    vec.collect()
}

fn counter(name: &str, v: u64) -> Vec<MetricFamily> {
    match prometheus::IntCounter::new(name, help(name)) {
        Ok(c) => {
            c.inc_by(v);
            c.collect()
        }
        Err(_) => Vec::new(),
    }
}

impl Collector for UprobeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(s) = self.source.lock().as_ref().map(|f| f()) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Ok(g) = IntGauge::new(AVAILABLE, help(AVAILABLE)) {
            g.set(i64::from(s.available));
            out.extend(g.collect());
        }
        out.extend(counters(EVENTS, "kind", &s.events));
        out.extend(counter(BYTES, s.bytes));
        out.extend(counters(DROPPED, "reason", &s.dropped));
        out.extend(counter(NOT_CAPTURED, s.not_captured));
        if let Ok(g) = IntGaugeVec::new(Opts::new(ATTACHED, help(ATTACHED)), &["kind"]) {
            for (k, v) in &s.attached_files {
                g.with_label_values(&[k]).set(i64::try_from(*v).unwrap_or(i64::MAX));
            }
            out.extend(g.collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_is_exported_once_set() {
        let c = UprobeCollector::new().expect("descs");
        assert!(c.collect().is_empty());
        c.set_source(Box::new(|| UprobeSnapshot {
            available: true,
            events: vec![("data", 3), ("close", 1)],
            bytes: 99,
            dropped: vec![("ring_full", 2), ("channel_full", 0)],
            not_captured: 4,
            attached_files: vec![("shared", 1), ("static", 0)],
        }));
        let r = prometheus::Registry::new();
        r.register(Box::new(c)).expect("register");
        let mut text = String::new();
        prometheus::TextEncoder::new().encode_utf8(&r.gather(), &mut text).expect("encode");
        for line in [
            "tollgate_uprobe_available 1",
            "tollgate_uprobe_events_total{kind=\"data\"} 3",
            "tollgate_uprobe_bytes_total 99",
            "tollgate_uprobe_events_dropped_total{reason=\"ring_full\"} 2",
            "tollgate_uprobe_not_captured_total 4",
            "tollgate_uprobe_attached_files{kind=\"shared\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
