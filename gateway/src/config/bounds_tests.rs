//! `tollgate check` on the bounds of one request's work (issue 13, defect 9): defaults, and
//! absurd values refused with `file:line:col` and the field.

use std::time::Duration;

use super::load::from_str;

fn err(text: &str) -> String {
    from_str("b.yaml", text).expect_err("invalid").to_string()
}

#[test]
fn defaults_bound_time_bytes_and_batches() {
    let c = from_str("b.yaml", "{}\n").expect("valid");
    assert_eq!(c.limits.body_read_timeout, Duration::from_secs(30));
    assert_eq!(c.limits.max_buffered_body_bytes, 256 << 20);
    assert_eq!((c.mcp.max_batch_len, c.mcp.legacy_queue_len), (64, 64));
    let c = from_str("b.yaml", "limits: {body_read_timeout: 2s, max_buffered_body_bytes: 16777216}\nmcp: {max_batch_len: 8, legacy_queue_len: 4}\n")
        .expect("valid");
    assert_eq!(c.limits.body_read_timeout, Duration::from_secs(2));
    assert_eq!((c.limits.max_buffered_body_bytes, c.mcp.max_batch_len, c.mcp.legacy_queue_len), (16 << 20, 8, 4));
}

#[test]
fn limits_errors_point_at_the_line() {
    assert_eq!(
        err("listen: {port: 15001}\nlimits:\n  body_read_timeout: 0s\n"),
        "b.yaml:3:22: limits.body_read_timeout: must be positive"
    );
    let e = err("limits:\n  max_request_body_bytes: 8388608\n  max_buffered_body_bytes: 1048576\n");
    assert!(
        e.starts_with("b.yaml:3:28: limits.max_buffered_body_bytes: 1048576 is below max_request_body_bytes (8388608)"),
        "{e}"
    );
}

#[test]
fn mcp_batch_and_queue_bounds_point_at_the_line() {
    assert_eq!(err("mcp:\n  max_batch_len: 0\n"), "b.yaml:2:18: mcp.max_batch_len: must be between 1 and 10000");
    assert_eq!(err("mcp:\n  max_batch_len: 100000\n"), "b.yaml:2:18: mcp.max_batch_len: must be between 1 and 10000");
    assert_eq!(err("mcp:\n  legacy_queue_len: 0\n"), "b.yaml:2:21: mcp.legacy_queue_len: must be between 1 and 65536");
}

#[test]
fn payload_log_size_is_capped_at_one_mebibyte() {
    let route = |n: u64| {
        format!("routes:\n- name: r\n  match: {{hosts: [api.openai.com]}}\n  log_payloads:\n    enabled: true\n    max_bytes: {n}\n")
    };
    let c = from_str("b.yaml", &route(1 << 20)).expect("1 MiB is accepted");
    assert_eq!(c.routes[0].log_payloads.max_bytes, 1 << 20);
    assert_eq!(
        err(&route((1 << 20) + 1)),
        "b.yaml:6:16: routes[0].log_payloads.max_bytes: 1048577 is above the most accepted, 1048576 (1 MiB)"
    );
    assert!(err(&route(1 << 40)).starts_with("b.yaml:6:16: routes[0].log_payloads.max_bytes:"));
}

#[test]
fn uprobe_defaults_and_bounds_point_at_the_line() {
    let c = from_str("b.yaml", "{}\n").expect("valid");
    let u = &c.capture.uprobes;
    assert!(u.enabled && u.shared_libraries && u.static_executables);
    assert_eq!((u.ring_buffer_bytes, u.max_bytes_per_call, u.max_connections), (8 << 20, 256 << 10, 65_536));
    assert_eq!(u.rescan_interval, Duration::from_secs(2));
    let c = from_str("b.yaml", "capture:\n  uprobes:\n    ring_buffer_bytes: 65536\n    paths: [/usr/bin/node]\n")
        .expect("valid");
    assert_eq!(c.capture.uprobes.ring_buffer_bytes, 64 << 10);
    assert_eq!(
        err("capture:\n  uprobes:\n    ring_buffer_bytes: 1000000\n"),
        "b.yaml:3:24: capture.uprobes.ring_buffer_bytes: 1000000 must be a power of two between 65536 (64 KiB) and 1073741824 (1 GiB)"
    );
    assert!(err("capture:\n  uprobes:\n    ring_buffer_bytes: 4096\n")
        .starts_with("b.yaml:3:24: capture.uprobes.ring_buffer_bytes:"));
    assert_eq!(
        err("capture:\n  uprobes:\n    max_bytes_per_call: 0\n"),
        "b.yaml:3:25: capture.uprobes.max_bytes_per_call: must be between 1 and 262144"
    );
    assert_eq!(
        err("capture:\n  uprobes:\n    max_bytes_per_call: 262145\n"),
        "b.yaml:3:25: capture.uprobes.max_bytes_per_call: must be between 1 and 262144"
    );
    assert_eq!(
        err("capture:\n  uprobes:\n    rescan_interval: 10ms\n"),
        "b.yaml:3:22: capture.uprobes.rescan_interval: must be at least 100ms"
    );
    assert!(err("capture:\n  uprobes:\n    libssl: true\n").contains("unknown field"));
    assert_eq!(u.l7, crate::config::ObservedL7Config::default());
    assert_eq!(
        err("capture:\n  uprobes:\n    l7:\n      max_pipeline: 0\n"),
        "b.yaml:4:21: capture.uprobes.l7.max_pipeline: 0 must be between 1 and 1024"
    );
    assert_eq!(
        err("capture:\n  uprobes:\n    l7:\n      idle_timeout: 10ms\n"),
        "b.yaml:4:21: capture.uprobes.l7.idle_timeout: must be at least 1s"
    );
    assert!(err("capture:\n  uprobes:\n    l7:\n      max_body: 1\n").contains("unknown field"));
}
