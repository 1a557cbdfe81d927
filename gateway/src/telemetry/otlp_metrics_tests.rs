//! Tests of the OTLP metric bridge: conversion of each family type, a push decoded by a real
//! OTLP/HTTP receiver, and failed pushes counted without blocking.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;

use super::*;
use crate::config::{ModelPrice, OtlpMetricsConfig};
use crate::telemetry::cost::PriceTable;
use crate::telemetry::metrics::tests::call;
use crate::telemetry::Metrics;

fn metrics() -> Metrics {
    let prices = PriceTable::new(&[ModelPrice {
        model: "gpt-4o*".into(),
        input_per_mtok: 2.5,
        output_per_mtok: 10.0,
        cached_input_per_mtok: Some(1.25),
    }])
    .unwrap();
    let m = Metrics::with_pricing(8, prices).unwrap();
    m.llm_call(&call("billing", "gpt-4o"));
    m.llm_call(&call("billing", "gpt-4o"));
    m
}

fn find<'a>(req: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
    let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
    metrics.iter().find(|m| m.name == name).unwrap_or_else(|| {
        let names: Vec<_> = metrics.iter().map(|m| m.name.as_str()).collect();
        panic!("{name} not pushed; got {names:?}")
    })
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

fn double(p: &NumberDataPoint) -> f64 {
    match p.value {
        Some(number_data_point::Value::AsDouble(v)) => v,
        other => panic!("not a double: {other:?}"),
    }
}

/// The checks shared by the conversion test and the push test.
fn assert_request(req: &ExportMetricsServiceRequest) {
    let res = req.resource_metrics[0].resource.as_ref().unwrap();
    assert_eq!(attr(&res.attributes, "service.name"), Some("tollgate"));

    let requests = find(req, "tollgate_llm_requests_total");
    let Some(Data::Sum(sum)) = &requests.data else { panic!("{requests:?}") };
    assert!(sum.is_monotonic);
    assert_eq!(sum.aggregation_temporality, AggregationTemporality::Cumulative as i32);
    let p = &sum.data_points[0];
    assert_eq!(double(p), 2.0);
    assert_eq!(attr(&p.attributes, "agent"), Some("billing"));
    assert_eq!(attr(&p.attributes, "model"), Some("gpt-4o-2024"));
    assert_eq!(attr(&p.attributes, "status"), Some("200"));
    assert!(p.start_time_unix_nano > 0 && p.start_time_unix_nano <= p.time_unix_nano);

    // 10 uncached input, 2 cached, 5 output per call.
    let cost = find(req, "tollgate_llm_cost_usd_total");
    let Some(Data::Sum(sum)) = &cost.data else { panic!("{cost:?}") };
    let want = 2.0 * (10.0 * 2.5 + 2.0 * 1.25 + 5.0 * 10.0) / 1e6;
    assert!((double(&sum.data_points[0]) - want).abs() < 1e-15);

    let duration = find(req, "gen_ai.client.operation.duration");
    assert_eq!(duration.unit, "s");
    let Some(Data::Histogram(h)) = &duration.data else { panic!("{duration:?}") };
    assert_eq!(h.aggregation_temporality, AggregationTemporality::Cumulative as i32);
    let p = &h.data_points[0];
    assert_eq!(p.count, 2);
    assert!((p.sum.unwrap() - 0.24).abs() < 1e-9);
    assert_eq!(p.explicit_bounds.len(), 14);
    assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
    assert_eq!(p.bucket_counts.iter().sum::<u64>(), 2);
    // 120ms lands in (0.08, 0.16]: the fifth bucket.
    assert_eq!(p.bucket_counts[4], 2, "{:?}", p.bucket_counts);
    assert_eq!(attr(&p.attributes, "gen_ai.request.model"), Some("gpt-4o"));
    assert_eq!(attr(&p.attributes, "gen_ai.operation.name"), Some("chat"));
    assert_eq!(attr(&p.attributes, "error.type"), None, "empty label is not an attribute");

    let tpot = find(req, "gen_ai.server.time_per_output_token");
    let Some(Data::Histogram(h)) = &tpot.data else { panic!("{tpot:?}") };
    assert_eq!(h.data_points[0].count, 2);

    let build = find(req, "tollgate_build_info");
    let Some(Data::Gauge(g)) = &build.data else { panic!("{build:?}") };
    assert_eq!(double(&g.data_points[0]), 1.0);
}

#[test]
fn families_convert_to_otlp_types() {
    let m = metrics();
    let res = vec![kv("service.name".into(), "tollgate".into())];
    let start = SystemTime::now() - Duration::from_secs(5);
    let req = to_request(&m.gatherer().gather(), &res, start, SystemTime::now());
    assert_request(&req);
}

#[test]
fn histogram_buckets_become_per_bucket_counts() {
    let h = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("h", "h").buckets(vec![1.0, 2.0, 4.0]))
        .unwrap();
    for v in [0.5, 1.5, 1.7, 3.0, 9.0, 10.0] {
        h.observe(v);
    }
    let p = histogram_point(prometheus::core::Metric::metric(&h).get_histogram(), Vec::new(), 1, 2);
    assert_eq!(p.explicit_bounds, vec![1.0, 2.0, 4.0]);
    assert_eq!(p.bucket_counts, vec![1, 2, 1, 2]);
    assert_eq!(p.count, 6);
}

fn otlp(endpoint: String, protocol: OtlpProtocol, interval: Duration, timeout: Duration) -> OtlpConfig {
    OtlpConfig {
        endpoint,
        protocol,
        max_queue: 16,
        traces: false,
        metrics: OtlpMetricsConfig { enabled: true, interval, timeout },
    }
}

type Received = (String, Option<String>, Bytes);

/// An OTLP/HTTP receiver answering 200 to every request and handing over path, content type
/// and body.
async fn receiver() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).map(String::from);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx.send((path, ct, body));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_metrics_to_otlp_http_receiver() {
    let (addr, mut rx) = receiver().await;
    let m = metrics();
    let dropped = IntCounter::new("d", "d").unwrap();
    let cfg =
        otlp(format!("http://{addr}"), OtlpProtocol::HttpProtobuf, Duration::from_millis(50), Duration::from_secs(5));
    let pusher = MetricsPusher::spawn(&cfg, m.gatherer(), dropped.clone()).unwrap();
    let (path, ct, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(path, "/v1/metrics");
    assert_eq!(ct.as_deref(), Some("application/x-protobuf"));
    let req = ExportMetricsServiceRequest::decode(body).unwrap();
    assert_request(&req);

    // Later pushes carry later (cumulative) values; shutdown pushes once more.
    m.llm_call(&call("billing", "gpt-4o"));
    pusher.shutdown().await;
    let mut last = None;
    while let Ok((_, _, body)) = rx.try_recv() {
        last = Some(ExportMetricsServiceRequest::decode(body).unwrap());
    }
    let last = last.expect("final push on shutdown");
    let Some(Data::Sum(sum)) = &find(&last, "tollgate_llm_requests_total").data else { panic!() };
    assert_eq!(double(&sum.data_points[0]), 3.0);
    assert_eq!(dropped.get(), 0);
}

/// Dead collector (closed port, over HTTP and gRPC) and a collector that never answers: each
/// failed push is counted, and neither recording nor shutdown waits on the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pushes_are_counted_and_never_block() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            keep.lock().push(s);
        }
    });
    let fast = Duration::from_millis(30);
    let cases = [
        (format!("http://{closed}"), OtlpProtocol::HttpProtobuf),
        (format!("http://{closed}"), OtlpProtocol::Grpc),
        (format!("http://{silent_addr}"), OtlpProtocol::HttpProtobuf),
    ];
    for (endpoint, protocol) in cases {
        let m = metrics();
        let dropped = IntCounter::new("d", "d").unwrap();
        let cfg = otlp(endpoint.clone(), protocol, fast, Duration::from_millis(200));
        let pusher = MetricsPusher::spawn(&cfg, m.gatherer(), dropped.clone()).unwrap();
        let start = Instant::now();
        for _ in 0..1000 {
            m.llm_call(&call("billing", "gpt-4o"));
        }
        assert!(start.elapsed() < Duration::from_secs(1), "recording waited on the push");
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped.get() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(dropped.get() >= 2, "{endpoint} {protocol:?}: {} failed pushes counted", dropped.get());
        let start = Instant::now();
        pusher.shutdown().await;
        assert!(start.elapsed() < Duration::from_secs(2), "shutdown took {:?}", start.elapsed());
    }
    assert!(!held.lock().is_empty(), "the silent collector was contacted");
}
