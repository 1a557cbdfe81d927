//! Periodic OTLP push of the metrics, for sites that collect over OTLP instead of scraping.
//!
//! The Prometheus registry stays the single source of truth: a background task gathers it every
//! `interval`, converts the families to an OTLP `ExportMetricsServiceRequest` (counters become
//! cumulative monotonic sums, gauges gauges, histograms cumulative explicit-bucket histograms)
//! and sends it with a timeout. Instruments are therefore never duplicated and the request path
//! does no extra work. The GenAI semconv families are pushed under their OpenTelemetry names and
//! attribute keys (`gen_ai.client.operation.duration`, `gen_ai.request.model`); tollgate's own
//! families keep their Prometheus names. A failed or timed-out push is counted in
//! `tollgate_telemetry_dropped_total{sink="otlp_metrics"}` and the next push carries the same
//! cumulative values, so nothing queues up.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use parking_lot::Mutex;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::IntCounter;
use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::metrics::Gatherer;
use super::resource;
use crate::config::{OtlpConfig, OtlpProtocol};

/// Prometheus families of the GenAI semantic conventions: `(prometheus name, OTel name, unit)`.
const SEMCONV_METRICS: [(&str, &str, &str); 4] = [
    ("gen_ai_client_token_usage", "gen_ai.client.token.usage", "{token}"),
    ("gen_ai_client_operation_duration_seconds", "gen_ai.client.operation.duration", "s"),
    ("gen_ai_server_time_to_first_token_seconds", "gen_ai.server.time_to_first_token", "s"),
    ("gen_ai_server_time_per_output_token_seconds", "gen_ai.server.time_per_output_token", "s"),
];

/// Label names of the semconv families and their OTel attribute keys.
const SEMCONV_ATTRS: [(&str, &str); 5] = [
    ("gen_ai_operation_name", "gen_ai.operation.name"),
    ("gen_ai_provider_name", "gen_ai.provider.name"),
    ("gen_ai_request_model", "gen_ai.request.model"),
    ("gen_ai_token_type", "gen_ai.token.type"),
    ("error_type", "error.type"),
];

/// Largest collector response body read (it is only drained, never used).
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// Why a push could not be set up or failed.
#[derive(Debug, thiserror::Error)]
pub enum OtlpMetricsError {
    /// The endpoint is not a usable URI.
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// As configured.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// Connection or protocol failure.
    #[error("send: {0}")]
    Send(String),
    /// The collector answered with an error status.
    #[error("collector answered HTTP {0}")]
    Status(http::StatusCode),
    /// The collector did not answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// How pushes travel.
enum Transport {
    /// Boxed: the client is large and the enum is held once per pusher.
    Http {
        client: Box<Client<HttpConnector, Full<Bytes>>>,
        uri: http::Uri,
    },
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
}

impl Transport {
    /// The gRPC channel connects lazily (and reconnects), so a collector that is down at
    /// start-up only costs failed pushes.
    fn new(cfg: &OtlpConfig, timeout: Duration) -> Result<Self, OtlpMetricsError> {
        let bad = |message: String| OtlpMetricsError::Endpoint { endpoint: cfg.endpoint.clone(), message };
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                let ep = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(timeout)
                    .timeout(timeout);
                Ok(Transport::Grpc(MetricsServiceClient::new(ep.connect_lazy())))
            }
            OtlpProtocol::HttpProtobuf => {
                let base = cfg.endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/metrics") { base.to_string() } else { format!("{base}/v1/metrics") };
                let uri = url.parse::<http::Uri>().map_err(|e| bad(e.to_string()))?;
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(timeout));
                let client = Client::builder(TokioExecutor::new()).build(connector);
                Ok(Transport::Http { client: Box::new(client), uri })
            }
        }
    }

    async fn send(&mut self, req: ExportMetricsServiceRequest) -> Result<(), OtlpMetricsError> {
        match self {
            Transport::Grpc(client) => {
                client.export(req).await.map(drop).map_err(|s| OtlpMetricsError::Send(s.to_string()))
            }
            Transport::Http { client, uri } => {
                let body = Full::new(Bytes::from(req.encode_to_vec()));
                let request = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body)
                    .map_err(|e| OtlpMetricsError::Send(e.to_string()))?;
                let resp = client.request(request).await.map_err(|e| OtlpMetricsError::Send(e.to_string()))?;
                let status = resp.status();
                // Drain (bounded) so the connection can be reused.
                let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(OtlpMetricsError::Status(status))
                }
            }
        }
    }
}

/// The running push task; [`MetricsPusher::shutdown`] pushes once more and stops it.
pub struct MetricsPusher {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    timeout: Duration,
}

impl MetricsPusher {
    /// Start pushing what `gatherer` sees every `cfg.metrics.interval`; failed pushes count in
    /// `dropped`. Must be called inside a tokio runtime.
    pub fn spawn(cfg: &OtlpConfig, gatherer: Gatherer, dropped: IntCounter) -> Result<Self, OtlpMetricsError> {
        let (interval, timeout) = (cfg.metrics.interval.max(Duration::from_millis(1)), cfg.metrics.timeout);
        let transport = Transport::new(cfg, timeout)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(transport, gatherer, interval, timeout, dropped, stop_rx));
        Ok(MetricsPusher { stop: Mutex::new(Some(stop_tx)), task: Mutex::new(Some(task)), timeout })
    }

    /// Push the final values and stop (bounded by the push timeout).
    pub async fn shutdown(&self) {
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(());
        }
        let task = self.task.lock().take();
        if let Some(mut task) = task {
            if tokio::time::timeout(self.timeout + Duration::from_secs(1), &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

impl Drop for MetricsPusher {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

async fn run(
    mut transport: Transport,
    gatherer: Gatherer,
    interval: Duration,
    timeout: Duration,
    dropped: IntCounter,
    mut stop: oneshot::Receiver<()>,
) {
    let resource = resource_attributes();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = &mut stop => true,
        };
        let req = to_request(&gatherer.gather(), &resource, gatherer.start_time(), SystemTime::now());
        let result = match tokio::time::timeout(timeout, transport.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(OtlpMetricsError::Timeout(timeout)),
        };
        match result {
            Ok(()) if failing => {
                tracing::info!("otlp metrics push recovered");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                dropped.inc();
                // One warning per outage, not one per interval.
                if !failing {
                    tracing::warn!(error = %e, "otlp metrics push failed");
                }
                failing = true;
            }
        }
        if last {
            break;
        }
    }
}

fn resource_attributes() -> Vec<KeyValue> {
    resource::attributes().into_iter().map(|(k, v)| kv(k.to_string(), v)).collect()
}

fn kv(key: String, value: String) -> KeyValue {
    KeyValue { key, value: Some(AnyValue { value: Some(any_value::Value::StringValue(value)) }) }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One OTLP request holding every family: cumulative points from `start` to `now`.
pub fn to_request(
    families: &[MetricFamily],
    resource: &[KeyValue],
    start: SystemTime,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let (start, now) = (unix_nanos(start), unix_nanos(now));
    let metrics = families.iter().filter_map(|f| to_metric(f, start, now)).collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes: resource.to_vec(), ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: resource::SERVICE_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

/// OTel name and unit of a Prometheus family, and whether it is a semconv family. tollgate's
/// own families keep their names and carry no unit, so a collector that translates back to
/// Prometheus names (unit and `_total` suffixes) yields exactly the scraped names.
fn otel_name(prom: &str) -> (String, &'static str, bool) {
    match SEMCONV_METRICS.iter().find(|(p, ..)| *p == prom) {
        Some((_, name, unit)) => (name.to_string(), unit, true),
        None => (prom.to_string(), "", false),
    }
}

fn to_metric(f: &MetricFamily, start: u64, now: u64) -> Option<Metric> {
    let (name, unit, semconv) = otel_name(f.name());
    let attrs = |m: &prometheus::proto::Metric| -> Vec<KeyValue> {
        m.get_label()
            .iter()
            // An empty Prometheus label value means "no label" (e.g. `error_type` on success).
            .filter(|l| !l.value().is_empty())
            .map(|l| {
                let key = match SEMCONV_ATTRS.iter().find(|(p, _)| semconv && *p == l.name()) {
                    Some((_, k)) => k.to_string(),
                    None => l.name().to_string(),
                };
                kv(key, l.value().to_string())
            })
            .collect()
    };
    let number = |m: &prometheus::proto::Metric, v: f64| NumberDataPoint {
        attributes: attrs(m),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsDouble(v)),
        ..Default::default()
    };
    let points = f.get_metric();
    let data = match f.get_field_type() {
        MetricType::COUNTER => metric::Data::Sum(Sum {
            data_points: points.iter().map(|m| number(m, m.get_counter().get_value())).collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        MetricType::GAUGE => metric::Data::Gauge(Gauge {
            data_points: points.iter().map(|m| number(m, m.get_gauge().get_value())).collect(),
        }),
        MetricType::HISTOGRAM => metric::Data::Histogram(Histogram {
            data_points: points.iter().map(|m| histogram_point(m.get_histogram(), attrs(m), start, now)).collect(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        }),
        // tollgate registers neither; summaries have no lossless OTLP form worth the code.
        MetricType::SUMMARY | MetricType::UNTYPED => return None,
    };
    Some(Metric { name, description: f.help().to_string(), unit: unit.into(), metadata: Vec::new(), data: Some(data) })
}

/// Prometheus buckets are cumulative with an implicit `+Inf`; OTLP wants per-bucket counts
/// with one more count than bounds.
fn histogram_point(
    h: &prometheus::proto::Histogram,
    attributes: Vec<KeyValue>,
    start: u64,
    now: u64,
) -> HistogramDataPoint {
    let buckets: Vec<_> = h.get_bucket().iter().filter(|b| b.upper_bound().is_finite()).collect();
    let mut bucket_counts = Vec::with_capacity(buckets.len() + 1);
    let mut prev = 0u64;
    for b in &buckets {
        bucket_counts.push(b.cumulative_count().saturating_sub(prev));
        prev = b.cumulative_count();
    }
    bucket_counts.push(h.get_sample_count().saturating_sub(prev));
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        count: h.get_sample_count(),
        sum: Some(h.get_sample_sum()),
        bucket_counts,
        explicit_bounds: buckets.iter().map(|b| b.upper_bound()).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "otlp_metrics_tests.rs"]
mod tests;
