//! OTLP spans for LLM calls. A span is built once the call has ended, with its real start time,
//! so the request path holds no live span object; the incoming W3C `traceparent` becomes the
//! parent, which keeps one agent's work in one trace. Export is batched on the SDK's own thread
//! with a bounded queue: a slow or dead collector drops spans, never stalls traffic.
//!
//! Every lost span is counted in `tollgate_telemetry_dropped_total{sink="otlp_spans"}`. The
//! SDK's batch processor drops silently when its queue is full, so [`QueueGuard`] keeps its own
//! count of spans handed over and not yet exported and refuses (and counts) a span before the
//! SDK queue could overflow; [`CountingExporter`] counts the spans of failed exports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span, SpanId, SpanKind, Status, TraceContextExt as _, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::{resource, LlmCall, TelemetryError};
use crate::config::{OtlpConfig, OtlpProtocol};

/// Attribute names from the OpenTelemetry GenAI semantic conventions (current names; the 0.31
/// semconv crate still has the older `gen_ai.system`).
pub(super) mod attr {
    pub const OPERATION: &str = "gen_ai.operation.name";
    pub const PROVIDER: &str = "gen_ai.provider.name";
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
    pub const RESPONSE_ID: &str = "gen_ai.response.id";
    pub const FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
    pub const INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    pub const OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    pub const CACHE_READ_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";
    pub const AGENT_NAME: &str = "gen_ai.agent.name";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const STATUS_CODE: &str = "http.response.status_code";
    pub const ERROR_TYPE: &str = "error.type";
    pub const PID: &str = "process.pid";
    pub const EXE_NAME: &str = "process.executable.name";
    pub const EXE_PATH: &str = "process.executable.path";
    pub const USER_ID: &str = "process.user.id";
    pub const CGROUP_PATH: &str = "tollgate.cgroup.path";
    pub const CGROUP_ID: &str = "tollgate.cgroup.id";
    pub const ESTIMATED: &str = "tollgate.usage.estimated";
    pub const STREAM: &str = "tollgate.stream";
    pub const ROUTE: &str = "tollgate.route";
    pub const CAPTURE: &str = "tollgate.capture";
    pub const TARGET: &str = "tollgate.target";
    pub const ATTEMPTS: &str = "tollgate.attempts";
    pub const REASONING_TOKENS: &str = "gen_ai.usage.reasoning.output_tokens";
    pub const K8S_NAMESPACE: &str = "k8s.namespace.name";
    pub const K8S_POD_NAME: &str = "k8s.pod.name";
    pub const K8S_POD_UID: &str = "k8s.pod.uid";
    pub const CONTAINER_ID: &str = "container.id";
}

/// Span exporter for LLM calls.
pub struct Tracer {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracer {
    /// Build the exporter; spans lost to a full queue or a failed export are counted in
    /// `dropped`. gRPC needs a tokio runtime at construction (tonic's channel).
    pub fn new(cfg: &OtlpConfig, dropped: IntCounter) -> Result<Self, TelemetryError> {
        let exporter = match cfg.protocol {
            OtlpProtocol::Grpc => {
                opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(cfg.endpoint.clone()).build()
            }
            OtlpProtocol::HttpProtobuf => {
                let base = cfg.endpoint.trim_end_matches('/');
                let endpoint =
                    if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary)
                    .with_endpoint(endpoint)
                    .build()
            }
        }
        .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
        let max = cfg.max_queue.max(1);
        let pending = Arc::new(AtomicUsize::new(0));
        let exporter = CountingExporter { inner: exporter, pending: pending.clone(), dropped: dropped.clone() };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(BatchConfigBuilder::default().with_max_queue_size(max).build())
            .build();
        let processor = QueueGuard { inner: batch, pending, max, dropped };
        let attrs = resource::attributes().into_iter().filter(|(k, _)| *k != "service.name");
        let resource = Resource::builder()
            .with_service_name(resource::SERVICE_NAME)
            .with_attributes(attrs.map(|(k, v)| KeyValue::new(k, v)))
            .build();
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
        let tracer = provider.tracer("tollgate");
        Ok(Tracer { provider, tracer })
    }

    /// Emit the span of a finished LLM call: `{operation} {model}`, kind CLIENT.
    pub fn llm_call(&self, c: &LlmCall) {
        let model = c.request_model.as_deref().unwrap_or("unknown");
        let a = &c.agent;
        let mut attrs = vec![
            KeyValue::new(attr::OPERATION, c.operation),
            KeyValue::new(attr::PROVIDER, c.provider.semconv_name()),
            KeyValue::new(attr::REQUEST_MODEL, model.to_string()),
            KeyValue::new(attr::AGENT_NAME, a.name.to_string()),
            KeyValue::new(attr::STATUS_CODE, i64::from(c.status)),
            KeyValue::new(attr::STREAM, c.stream),
            KeyValue::new(attr::ROUTE, c.route.to_string()),
            KeyValue::new(attr::CAPTURE, c.capture.as_str()),
        ];
        let opt = [
            (attr::RESPONSE_MODEL, c.response_model.as_ref()),
            (attr::RESPONSE_ID, c.response_id.as_ref()),
            (attr::SERVER_ADDRESS, c.server_address.as_ref()),
        ];
        attrs.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| KeyValue::new(k, v.clone()))));
        if let Some(p) = c.server_port {
            attrs.push(KeyValue::new(attr::SERVER_PORT, i64::from(p)));
        }
        caller_attributes(a, &mut attrs);
        if !c.finish_reasons.is_empty() {
            let list: Vec<StringValue> = c.finish_reasons.iter().map(|s| s.clone().into()).collect();
            attrs.push(KeyValue::new(attr::FINISH_REASONS, Value::Array(list.into())));
        }
        if let Some(u) = &c.usage {
            attrs.push(KeyValue::new(attr::INPUT_TOKENS, u.input as i64));
            attrs.push(KeyValue::new(attr::OUTPUT_TOKENS, u.output as i64));
            if let Some(v) = u.cached_input {
                attrs.push(KeyValue::new(attr::CACHE_READ_TOKENS, v as i64));
            }
            if let Some(v) = u.reasoning {
                attrs.push(KeyValue::new(attr::REASONING_TOKENS, v as i64));
            }
            attrs.push(KeyValue::new(attr::ESTIMATED, u.estimated));
        }
        if let Some(t) = &c.target {
            attrs.push(KeyValue::new(attr::TARGET, t.to_string()));
            attrs.push(KeyValue::new(attr::ATTEMPTS, i64::from(c.attempts)));
        }
        let error = match (&c.error, c.status) {
            (e, s) if s >= 400 => Some((s.to_string(), e.clone().unwrap_or_else(|| format!("HTTP {s}")))),
            (Some(e), _) => Some(("transport".to_string(), e.clone())),
            _ => None,
        };
        if let Some((t, _)) = &error {
            attrs.push(KeyValue::new(attr::ERROR_TYPE, t.clone()));
        }
        let name = format!("{} {model}", c.operation);
        let mut span = self.client_span(name, c.span_ids.as_ref(), c.traceparent.as_deref(), c.start, attrs);
        for ev in &c.policy_events {
            let attrs = ev.attributes.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
            span.add_event(ev.name, attrs);
        }
        if let Some((_, msg)) = error {
            span.set_status(Status::error(msg));
        }
        span.end_with_timestamp(c.start + c.duration);
    }

    /// Start a CLIENT span of a finished exchange (LLM call, MCP request, A2A hop), child of
    /// the agent's `traceparent`, with the ids fixed on arrival (`ids`: the ones the upstream
    /// request already carries as its parent), so the provider's or callee's work joins below it.
    pub(super) fn client_span(
        &self,
        name: String,
        ids: Option<&super::SpanIds>,
        traceparent: Option<&str>,
        start: SystemTime,
        attrs: Vec<KeyValue>,
    ) -> opentelemetry_sdk::trace::Span {
        let parent = parent_context(traceparent);
        let mut builder = self.tracer.span_builder(name);
        if let Some(ids) = ids {
            builder = builder.with_span_id(SpanId::from_bytes(ids.span_id));
            if !parent.span().span_context().is_valid() {
                builder = builder.with_trace_id(TraceId::from_bytes(ids.trace_id));
            }
        }
        builder
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent)
    }

    /// Export what is queued and stop the exporter thread.
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // The SDK's flush blocks; keep it off the runtime's worker threads.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        })
        .await;
    }
}

/// Span processor in front of the SDK's batch processor: admits a span only while fewer than
/// `max` spans are between here and the end of their export. The batch queue holds at most
/// that many, so it never overflows unseen: every span refused here is counted.
#[derive(Debug)]
struct QueueGuard {
    inner: BatchSpanProcessor,
    /// Spans admitted and not yet through an export (shared with [`CountingExporter`]).
    pending: Arc<AtomicUsize>,
    max: usize,
    dropped: IntCounter,
}

impl SpanProcessor for QueueGuard {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Exporter wrapper: releases the exported spans from [`QueueGuard`]'s count and counts the
/// spans of a failed export (collector down, timeout, rejected) as dropped.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    pending: Arc<AtomicUsize>,
    dropped: IntCounter,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        self.pending.fetch_sub(n, Ordering::AcqRel);
        if result.is_err() {
            self.dropped.inc_by(n as u64);
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Parent context from a W3C `traceparent` header value (invalid values give a root span).
pub(super) fn parent_context(traceparent: Option<&str>) -> Context {
    let Some(tp) = traceparent else { return Context::new() };
    let mut carrier = HashMap::with_capacity(1);
    carrier.insert("traceparent".to_string(), tp.to_string());
    TraceContextPropagator::new().extract(&carrier)
}

/// The calling process as the kernel named it (pid, comm, uid, cgroup, executable) and its pod,
/// on every span tollgate exports for it (LLM, MCP and A2A alike).
pub(super) fn caller_attributes(a: &crate::capture::Agent, attrs: &mut Vec<KeyValue>) {
    attrs.extend([
        KeyValue::new(attr::PID, i64::from(a.pid)),
        KeyValue::new(attr::EXE_NAME, a.comm.clone()),
        KeyValue::new(attr::USER_ID, i64::from(a.uid)),
        KeyValue::new(attr::CGROUP_ID, a.cgroup_id as i64),
    ]);
    let opt = [(attr::EXE_PATH, a.exe.as_ref()), (attr::CGROUP_PATH, a.cgroup_path.as_ref())];
    attrs.extend(opt.into_iter().filter_map(|(k, v)| v.map(|v| KeyValue::new(k, v.clone()))));
    if let Some(k) = &a.k8s {
        k8s_attributes(k, attrs);
    }
}

/// The agent's pod as OpenTelemetry k8s resource-convention keys on the span (the span's resource
/// is tollgate itself, so the caller's pod goes on the span): namespace, pod, UID, container, and
/// the owner as `k8s.<kind>.name` (`k8s.deployment.name`, `k8s.statefulset.name`, ...).
fn k8s_attributes(k: &crate::capture::identity::K8sIdentity, attrs: &mut Vec<KeyValue>) {
    attrs.push(KeyValue::new(attr::K8S_POD_UID, k.pod_uid.clone()));
    if let Some(id) = &k.container_id {
        attrs.push(KeyValue::new(attr::CONTAINER_ID, id.clone()));
    }
    if let Some(p) = &k.pod {
        attrs.push(KeyValue::new(attr::K8S_NAMESPACE, p.namespace.clone()));
        attrs.push(KeyValue::new(attr::K8S_POD_NAME, p.name.clone()));
        let key = match p.workload.kind.as_str() {
            "Deployment" => Some("k8s.deployment.name"),
            "StatefulSet" => Some("k8s.statefulset.name"),
            "DaemonSet" => Some("k8s.daemonset.name"),
            "ReplicaSet" => Some("k8s.replicaset.name"),
            "Job" => Some("k8s.job.name"),
            "CronJob" => Some("k8s.cronjob.name"),
            _ => None,
        };
        if let Some(key) = key {
            attrs.push(KeyValue::new(key, p.workload.name.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn traceparent_becomes_remote_parent() {
        let cx = parent_context(Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert!(sc.is_remote());
        assert!(!parent_context(Some("garbage")).span().span_context().is_valid());
    }

    /// A real OTLP/HTTP receiver: proves the span leaves the process with its name, parent and
    /// GenAI attributes, not just that the SDK was called.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exports_chat_span_over_otlp_http() {
        use http_body_util::BodyExt;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            tx.send((path, body)).unwrap();
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let dropped = IntCounter::new("d", "d").unwrap();
        let t = Tracer::new(&otlp(format!("http://{addr}"), 16), dropped.clone()).unwrap();
        let mut call = crate::telemetry::metrics::tests::call("billing", "gpt-4o");
        call.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let ids = crate::telemetry::SpanIds::new(call.traceparent.as_deref());
        assert_eq!(ids.traceparent()[..36], *"00-0af7651916cd43dd8448eb211c80319c-");
        call.span_ids = Some(ids);
        t.llm_call(&call);
        t.shutdown().await;
        let (path, body) = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        assert_eq!(path, "/v1/traces");
        let req = ExportTraceServiceRequest::decode(body).unwrap();
        let rs = &req.resource_spans[0];
        let res_attrs = &rs.resource.as_ref().unwrap().attributes;
        assert!(res_attrs.iter().any(|kv| kv.key == "service.name" && format!("{:?}", kv.value).contains("tollgate")));
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.name, "chat gpt-4o");
        assert_eq!(hex(&span.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex(&span.parent_span_id), "b7ad6b7169203331");
        // The span id is the one propagated upstream.
        assert_eq!(hex(&span.span_id), ids.traceparent()[36..52]);
        let get = |k: &str| span.attributes.iter().find(|kv| kv.key == k).map(|kv| format!("{:?}", kv.value));
        assert!(get("gen_ai.usage.input_tokens").unwrap().contains("IntValue(12)"));
        assert!(get("gen_ai.usage.output_tokens").unwrap().contains("IntValue(5)"));
        assert!(get("gen_ai.agent.name").unwrap().contains("billing"));
        assert!(get("gen_ai.response.finish_reasons").unwrap().contains("stop"));
        assert_eq!(span.end_time_unix_nano - span.start_time_unix_nano, 120_000_000);
        assert_eq!(dropped.get(), 0);
    }

    fn otlp(endpoint: String, max_queue: usize) -> OtlpConfig {
        OtlpConfig {
            endpoint,
            protocol: OtlpProtocol::HttpProtobuf,
            max_queue,
            traces: true,
            metrics: Default::default(),
        }
    }

    /// Collector down: recording stays fast (the queue is bounded, export runs elsewhere) and
    /// every span is accounted for as dropped, whether refused at the queue or lost in a
    /// failed export.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_collector_counts_drops_and_never_blocks() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let t = Tracer::new(&otlp(format!("http://{closed}"), 8), dropped.clone()).unwrap();
        let call = crate::telemetry::metrics::tests::call("billing", "gpt-4o");
        const N: u64 = 2000;
        let start = std::time::Instant::now();
        for _ in 0..N {
            t.llm_call(&call);
        }
        let elapsed = start.elapsed();
        assert!(elapsed < std::time::Duration::from_secs(2), "recording {N} spans took {elapsed:?}");
        assert!(dropped.get() >= N - 8 - 8, "queue-full drops not counted: {}", dropped.get());
        t.shutdown().await;
        assert_eq!(dropped.get(), N, "every span is dropped somewhere and counted once");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
