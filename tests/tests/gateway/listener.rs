//! Explicit listeners are no open proxies: a listener outside loopback needs an opt-in
//! (`tollgate check` names the field), and one whose route injects provider keys admits only
//! callers it can identify (a shared token, or a source-address allow-list). Refused callers get
//! a 401/403 in the route's API shape, are counted, and the provider never sees them.

use serde_json::{json, Value};
use tollgate_e2e::client::{curl, python};
use tollgate_e2e::openai::ChatRequest;
use tollgate_e2e::{ensure, free_port, Result};

use super::{last_request, parse_client, Gw};
use crate::support::{wait_metric, MODEL};

/// POST a chat request with curl to `url`, with `extra` curl arguments (headers, interface).
fn post(gw: &Gw, url: &str, extra: &[&str]) -> Result<tollgate_e2e::client::CurlOut> {
    let body = gw.e.path("g11-req.json");
    std::fs::write(&body, serde_json::to_vec(&ChatRequest::simple(MODEL, "Say hi.").to_json())?)?;
    let data = format!("@{}", body.display());
    let args = [&["-H", "Content-Type: application/json", "--data-binary", &data][..], extra, &[url]].concat();
    curl(None, None, &args)
}

fn error_of(r: &tollgate_e2e::client::CurlOut) -> Result<Value> {
    let v: Value = serde_json::from_slice(&r.body)?;
    Ok(v["error"].clone())
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g11_listener_refuses_unidentified_callers() -> crate::Result<()> {
    let gw = Gw::new("g11-agent", 8111)?;
    let m = gw.mock("openai-mock", &["sk-g11-real"], &[])?;
    let key = gw.key_file("g11", "sk-g11-real")?;
    let token = gw.key_file("g11-listener", "tok-g11-listener")?;
    let (p_token, p_cidr) = (free_port("0.0.0.0"), free_port("127.0.0.1"));
    let provider = json!({"name": "oa", "kind": "openai", "base_url": format!("http://{}/v1", m.http[0]), "credentials": {"file": key}});

    // `tollgate check` refuses a wildcard listener without the opt-in, naming the field.
    let bad = gw.e.path("g11-bad.yaml");
    let bad_cfg = json!({"providers": [provider], "routes": [{"name": "gw-token", "listener": format!("0.0.0.0:{p_token}"), "targets": [{"provider": "oa"}]}]});
    std::fs::write(&bad, serde_yaml_ng::to_string(&bad_cfg)?)?;
    let (code, _, stderr) = tollgate_e2e::tollgate::check(&gw.e.tg_bin, &bad)?;
    let want = format!("{}:", bad.display());
    ensure!(
        code != 0
            && stderr.contains(&want)
            && stderr.contains(&format!("routes[0].listener: 0.0.0.0:{p_token} is not a loopback address")),
        "tollgate check accepted or did not explain a non-loopback listener ({code}): {stderr}"
    );

    let t = gw.e.tollgate(
        json!({
            "capture": {"enabled": false},
            "providers": [provider],
            "routes": [
                {"name": "gw-token", "provider": "openai", "listener": format!("0.0.0.0:{p_token}"), "targets": [{"provider": "oa"}],
                 "listener_auth": {"allow_non_loopback": true, "token": {"file": token}}},
                {"name": "gw-cidr", "provider": "openai", "listener": format!("127.0.0.1:{p_cidr}"), "targets": [{"provider": "oa"}],
                 "listener_auth": {"allow_cidrs": ["127.0.0.1/32"]}},
            ],
        }),
        None,
    )?;
    let token_url = format!("http://127.0.0.1:{p_token}/v1/chat/completions");
    let cidr_url = format!("http://127.0.0.1:{p_cidr}/v1/chat/completions");

    // Token listener: no token, a wrong one, a token under the wrong scheme: 401, OpenAI shape.
    for extra in
        [&[][..], &["-H", "Authorization: Bearer tok-g11-listenex"], &["-H", "Authorization: Basic tok-g11-listener"]]
    {
        let r = post(&gw, &token_url, extra)?;
        ensure!(r.http_code == 401, "unauthenticated caller {extra:?}: {}", r.describe());
        let e = error_of(&r)?;
        ensure!(e["type"] == json!("authentication_error") && e["code"] == json!("listener_token_required"), "{e}");
    }
    // CIDR listener: a caller from another address (127.0.0.3) is refused with a 403.
    let r = post(&gw, &cidr_url, &["--interface", "127.0.0.3"])?;
    ensure!(r.http_code == 403, "caller outside allow_cidrs: {}", r.describe());
    ensure!(error_of(&r)?["code"] == json!("listener_source_refused"), "{}", r.text());
    ensure!(m.requests()?.is_empty(), "a refused caller reached the provider: {:?}", m.requests()?);

    // The unmodified SDK with the listener token as its API key is served with the real key;
    // the token never reaches the provider.
    let base = format!("http://127.0.0.1:{p_token}/v1");
    let req = serde_json::to_string(&ChatRequest::simple(MODEL, "Name a colour.").to_json())?;
    let out = python(
        None,
        None,
        "openai_chat.py",
        &["--request", &req],
        &[("OPENAI_API_KEY", "tok-g11-listener"), ("OPENAI_BASE_URL", &base)],
    )?;
    let v = parse_client("openai_chat.py", &out)?;
    ensure!(v["finish_reason"] == json!("stop") || v["content"].is_string(), "{v}");
    let seen = last_request(&m)?;
    ensure!(seen["headers"]["authorization"].as_str().is_some_and(|a| a.contains("sk-g11-real")), "{seen}");
    ensure!(!seen.to_string().contains("tok-g11-listener"), "the listener token reached the provider: {seen}");
    // An allowed source is served without a token.
    let r = post(&gw, &cidr_url, &[])?;
    ensure!(r.http_code == 200, "caller inside allow_cidrs: {}", r.describe());
    ensure!(m.chat_requests()? == 2, "served calls: {}", m.chat_requests()?);

    wait_metric(&t, "tollgate_listener_refusals_total", &[("route", "gw-token"), ("reason", "token")], 3.0)?;
    wait_metric(&t, "tollgate_listener_refusals_total", &[("route", "gw-cidr"), ("reason", "source")], 1.0)?;
    wait_metric(&t, "tollgate_listener_refusals_total", &[], 4.0)?;
    Ok(())
}
