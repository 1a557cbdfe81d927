//! Metrics about the node agent itself rather than the traffic: config reloads (did my ConfigMap
//! edit take?) and the Kubernetes view (which pods does tollgate know, capture, and name how?).
//! Pod series are computed from the pod store at scrape time, so a deleted pod's series vanish
//! with it instead of lingering as stale gauges.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// One pod as exported: `(namespace, pod, workload "Kind/name", agent, captured)`.
pub type PodRow = (String, String, String, String, bool);

/// Reads the pods and the Kubernetes watcher's counters at scrape time.
pub type PodSource = Box<dyn Fn() -> (Vec<PodRow>, Vec<(&'static str, u64)>) + Send + Sync>;

/// Config-reload and Kubernetes metrics.
pub struct NodeMetrics {
    reloads: IntCounterVec,
    last_success: Gauge,
    restart_required: IntGauge,
    listener_refusals: IntCounterVec,
    pods: Arc<PodCollector>,
}

impl NodeMetrics {
    /// Register every family in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Config reload attempts by result (success, failure: the previous config stays in force)",
            ),
            &["result"],
        )?;
        for r in ["success", "failure"] {
            reloads.with_label_values(&[r]);
        }
        let last_success = Gauge::new(
            "tollgate_config_last_reload_success_timestamp_seconds",
            "Unix time the running config was loaded (start or last successful reload)",
        )?;
        let restart_required = IntGauge::new(
            "tollgate_config_restart_required",
            "1 when the config file changes settings that only a restart applies (listeners, capture mounts, TLS CA, telemetry sinks, kubernetes)",
        )?;
        let listener_refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_listener_refusals_total",
                "Requests refused on a route's explicit listener: reason source (address outside listener_auth.allow_cidrs, 403) or token (listener token missing or wrong, 401)",
            ),
            &["route", "reason"],
        )?;
        let pods = Arc::new(PodCollector::new()?);
        registry.register(Box::new(listener_refusals.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        registry.register(Box::new(last_success.clone()))?;
        registry.register(Box::new(restart_required.clone()))?;
        registry.register(Box::new(SharedPods(pods.clone())))?;
        last_success.set(unix_now());
        Ok(NodeMetrics { reloads, last_success, restart_required, listener_refusals, pods })
    }

    /// Count a reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reloads.with_label_values(&[if ok { "success" } else { "failure" }]).inc();
        if ok {
            self.last_success.set(unix_now());
        }
    }

    /// Count a caller refused on route `route`'s explicit listener (`reason`: source, token).
    pub fn listener_refused(&self, route: &str, reason: &str) {
        self.listener_refusals.with_label_values(&[route, reason]).inc();
    }

    /// Some changed settings wait for a restart.
    pub fn set_restart_required(&self, pending: bool) {
        self.restart_required.set(i64::from(pending));
    }

    /// Where pod rows come from (set once the Kubernetes watcher runs).
    pub fn set_pod_source(&self, source: PodSource) {
        *self.pods.source.lock() = Some(source);
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

struct PodCollector {
    descs: Vec<Desc>,
    source: Mutex<Option<PodSource>>,
}

const POD_INFO: &str = "tollgate_k8s_pod_info";
const PODS: &str = "tollgate_k8s_pods";
const EVENTS: &str = "tollgate_k8s_events_total";

impl PodCollector {
    fn new() -> Result<Self, prometheus::Error> {
        let d = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(name.into(), help.into(), labels.iter().map(|l| l.to_string()).collect(), Default::default())
        };
        Ok(PodCollector {
            descs: vec![
                d(
                    POD_INFO,
                    "1 per pod on this node known from the API: namespace, pod, owner workload, agent name, captured",
                    &["k8s_namespace", "k8s_pod", "k8s_workload", "agent", "captured"],
                )?,
                d(PODS, "Pods of this node in tollgate's store by capture decision", &["captured"])?,
                d(
                    EVENTS,
                    "Kubernetes watcher events: watch errors, relists, pods over kubernetes.max_pods, CA ConfigMap publishes and failures, owner lookup failures",
                    &["event"],
                )?,
            ],
            source: Mutex::new(None),
        })
    }
}

struct SharedPods(Arc<PodCollector>);

impl Collector for SharedPods {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let guard = self.0.source.lock();
        let Some((rows, events)) = guard.as_ref().map(|s| s()) else { return Vec::new() };
        let help = |i: usize| self.0.descs[i].help.clone();
        let (Ok(info), Ok(count), Ok(ev)) = (
            IntGaugeVec::new(
                Opts::new(POD_INFO, help(0)),
                &["k8s_namespace", "k8s_pod", "k8s_workload", "agent", "captured"],
            ),
            IntGaugeVec::new(Opts::new(PODS, help(1)), &["captured"]),
            IntCounterVec::new(Opts::new(EVENTS, help(2)), &["event"]),
        ) else {
            return Vec::new();
        };
        count.with_label_values(&["true"]);
        count.with_label_values(&["false"]);
        for (ns, pod, workload, agent, captured) in &rows {
            let c = if *captured { "true" } else { "false" };
            info.with_label_values(&[ns, pod, workload, agent, c]).set(1);
            count.with_label_values(&[c]).inc();
        }
        for (event, v) in events {
            ev.with_label_values(&[event]).inc_by(v);
        }
        let mut out = info.collect();
        out.extend(count.collect());
        out.extend(ev.collect());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_rows_and_reloads_are_exported() {
        let r = Registry::new();
        let m = NodeMetrics::register(&r).unwrap();
        m.reload(false);
        m.set_restart_required(true);
        m.set_pod_source(Box::new(|| {
            (
                vec![("team-a".into(), "chat-0".into(), "StatefulSet/chat".into(), "team-a/chat".into(), true)],
                vec![("watch_errors", 3)],
            )
        }));
        let text = prometheus::TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        assert!(text.contains("tollgate_config_reloads_total{result=\"failure\"} 1"), "{text}");
        assert!(text.contains("tollgate_config_reloads_total{result=\"success\"} 0"), "{text}");
        assert!(text.contains("tollgate_config_restart_required 1"), "{text}");
        assert!(text.contains(
            "tollgate_k8s_pod_info{agent=\"team-a/chat\",captured=\"true\",k8s_namespace=\"team-a\",k8s_pod=\"chat-0\",k8s_workload=\"StatefulSet/chat\"} 1"
        ), "{text}");
        assert!(text.contains("tollgate_k8s_pods{captured=\"true\"} 1"), "{text}");
        assert!(text.contains("tollgate_k8s_pods{captured=\"false\"} 0"), "{text}");
        assert!(text.contains("tollgate_k8s_events_total{event=\"watch_errors\"} 3"), "{text}");
    }
}
