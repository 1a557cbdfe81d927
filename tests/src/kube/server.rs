//! HTTP side of [`MockKube`](super::MockKube): routing, lists, watches, gets, apply.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{stamp, Res, Shared, State, Sub};

type RespBody = BoxBody<Bytes, Infallible>;

/// Accept connections until `stop` fires.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let conn = tokio::select! {
            _ = &mut stop => return,
            c = listener.accept() => c,
        };
        let Ok((stream, _)) = conn else { continue };
        let sh = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let sh = sh.clone();
                async move { Ok::<_, Infallible>(route(req, &sh).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Parsed `fieldSelector`: `key=value`, `key==value`, `key!=value`, comma-separated.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    fn parse(s: Option<&str>, res: Res) -> Result<FieldSelector, String> {
        let mut out = Vec::new();
        for term in s.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            let (key, eq, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            let supported: &[&str] = match res {
                Res::Pods => &["spec.nodeName", "metadata.name", "metadata.namespace", "status.phase"],
                Res::Namespaces => &["metadata.name", "status.phase"],
            };
            if !supported.contains(&key) {
                return Err(format!("field label not supported: {key}"));
            }
            out.push((key.to_string(), eq, value.to_string()));
        }
        Ok(FieldSelector(out))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(key, eq, want)| {
            let mut v = obj;
            for part in key.split('.') {
                v = &v[part];
            }
            (v.as_str().unwrap_or("") == want) == *eq
        })
    }
}

/// Does a change of `obj` belong on watch `s`?
pub(crate) fn sub_matches(s: &Sub, obj: &Value) -> bool {
    s.namespace.as_deref().is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns)) && s.selector.matches(obj)
}

/// One watch event line.
pub(crate) fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({ "type": typ, "object": object }).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn status(code: u16, reason: &str, message: String, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

fn respond(code: u16, body: &Value) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn error(code: u16, reason: &str, message: String) -> Response<RespBody> {
    respond(code, &status(code, reason, message, None))
}

fn not_found(group: &str, resource: &str, name: &str) -> Response<RespBody> {
    let qualified = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    let details = json!({ "name": name, "group": group, "kind": resource });
    respond(404, &status(404, "NotFound", format!("{qualified} \"{name}\" not found"), Some(details)))
}

/// `application/x-www-form-urlencoded` decoding of one query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn route(req: Request<Incoming>, sh: &Arc<Shared>) -> Response<RespBody> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path_q = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
    sh.lock().requests.push(format!("{method} {path_q}"));
    let q = query(&uri);
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let metadata_only = accept.contains("as=PartialObjectMetadata;");
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["version"]) => respond(
            200,
            &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.1", "gitCommit": "mock",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.2",
                "compiler": "gc", "platform": "linux/amd64"
            }),
        ),
        (&Method::GET, ["api", "v1", "pods"]) => collection(sh, Res::Pods, None, &q).await,
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => collection(sh, Res::Pods, Some(ns), &q).await,
        (&Method::GET, ["api", "v1", "namespaces"]) => collection(sh, Res::Namespaces, None, &q).await,
        (&Method::GET, ["api", "v1", "namespaces", name]) => {
            let obj = sh.lock().namespaces.get(*name).cloned();
            get_one(obj, metadata_only, "", "namespaces", name)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let obj = sh.lock().pods.get(&(ns.to_string(), name.to_string())).cloned();
            get_one(obj, metadata_only, "", "pods", name)
        }
        (&Method::GET, ["apis", "apps", "v1", "namespaces", ns, "replicasets", name]) => {
            let obj = sh.lock().replicasets.get(&(ns.to_string(), name.to_string())).cloned();
            get_one(obj, metadata_only, "apps", "replicasets", name)
        }
        (&Method::GET, ["apis", "batch", "v1", "namespaces", ns, "jobs", name]) => {
            let obj = sh.lock().jobs.get(&(ns.to_string(), name.to_string())).cloned();
            get_one(obj, metadata_only, "batch", "jobs", name)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let obj = sh.lock().configmaps.get(&(ns.to_string(), name.to_string())).cloned();
            get_one(obj, metadata_only, "", "configmaps", name)
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            let (ns, name) = (ns.to_string(), name.to_string());
            let ctype = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error(400, "BadRequest", format!("reading body: {e}")),
            };
            apply_configmap(sh, &ns, &name, &ctype, &q, &body)
        }
        _ => error(404, "NotFound", "the server could not find the requested resource".into()),
    }
}

fn get_one(obj: Option<Value>, metadata_only: bool, group: &str, resource: &str, name: &str) -> Response<RespBody> {
    match obj {
        None => not_found(group, resource, name),
        Some(o) if metadata_only => respond(
            200,
            &json!({ "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"] }),
        ),
        Some(o) => respond(200, &o),
    }
}

fn objects(st: &State, res: Res, ns: Option<&str>, sel: &FieldSelector) -> Vec<Value> {
    let all: Box<dyn Iterator<Item = &Value>> = match res {
        Res::Pods => Box::new(st.pods.values()),
        Res::Namespaces => Box::new(st.namespaces.values()),
    };
    all.filter(|o| ns.is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n)) && sel.matches(o))
        .cloned()
        .collect()
}

async fn collection(sh: &Arc<Shared>, res: Res, ns: Option<&str>, q: &HashMap<String, String>) -> Response<RespBody> {
    if q.contains_key("labelSelector") {
        return error(400, "BadRequest", "labelSelector is not supported by the mock".into());
    }
    let sel = match FieldSelector::parse(q.get("fieldSelector").map(String::as_str), res) {
        Ok(s) => s,
        Err(m) => return error(400, "BadRequest", m),
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch(sh, res, ns.map(str::to_string), sel, q).await
    } else {
        list(sh, res, ns, &sel, q)
    }
}

fn list(
    sh: &Arc<Shared>,
    res: Res,
    ns: Option<&str>,
    sel: &FieldSelector,
    q: &HashMap<String, String>,
) -> Response<RespBody> {
    let mut st = sh.lock();
    let (rv, mut items) = if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        match st.continues.remove(token) {
            Some(c) => c,
            None => {
                return error(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                )
            }
        }
    } else {
        let want = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok());
        if q.get("resourceVersionMatch").map(String::as_str) == Some("Exact") {
            if let Some(w) = want.filter(|&w| w != st.rv) {
                return error(410, "Expired", format!("too old resource version: {w} ({})", st.rv));
            }
        }
        (st.rv, objects(&st, res, ns, sel))
    };
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0);
    let cap = match (limit, st.page_limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if let Some(cap) = cap.filter(|&c| items.len() > c) {
        let rest = items.split_off(cap);
        let token = format!("mock-continue-{}", st.next_continue);
        st.next_continue += 1;
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(rest.len());
        st.continues.insert(token, (rv, rest));
    }
    for it in &mut items {
        if let Some(o) = it.as_object_mut() {
            o.remove("kind");
            o.remove("apiVersion");
        }
    }
    let kind = match res {
        Res::Pods => "PodList",
        Res::Namespaces => "NamespaceList",
    };
    respond(200, &json!({ "kind": kind, "apiVersion": "v1", "metadata": meta, "items": items }))
}

fn bookmark(res: Res, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({ "resourceVersion": rv.to_string(), "creationTimestamp": null });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    match res {
        Res::Pods => {
            json!({ "kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": { "containers": null }, "status": {} })
        }
        Res::Namespaces => {
            json!({ "kind": "Namespace", "apiVersion": "v1", "metadata": meta, "spec": {}, "status": {} })
        }
    }
}

/// A body fed by a channel: each event leaves as its own chunk; ends when every sender is gone.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

async fn watch(
    sh: &Arc<Shared>,
    res: Res,
    ns: Option<String>,
    selector: FieldSelector,
    q: &HashMap<String, String>,
) -> Response<RespBody> {
    let since = q.get("resourceVersion").filter(|v| !v.is_empty()).cloned();
    let since_n = match since.as_deref().map(str::parse::<u64>) {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(400, "BadRequest", format!("invalid resource version: {since:?}")),
        None => None,
    };
    let initial_events = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);

    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let mut paused = sh.paused.subscribe();
    let id = loop {
        // Held while the test has watches paused (the client just sees a slow server).
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return error(503, "ServiceUnavailable", "mock stopping".into());
            }
        }
        let mut st = sh.lock();
        if st.paused {
            continue;
        }
        let matches = |o: &Value| {
            ns.as_deref().is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n)) && selector.matches(o)
        };
        match since_n {
            Some(n) if n != 0 && n < st.compacted => {
                let msg = format!("too old resource version: {n} ({})", st.compacted);
                let _ = tx.send(event_line("ERROR", &status(410, "Expired", msg, None)));
                drop(tx);
                break None;
            }
            Some(n) if n != 0 && !initial_events => {
                for c in st.history.iter().filter(|c| c.rv > n && c.res == res && matches(&c.object)) {
                    let _ = tx.send(event_line(c.typ, &c.object));
                }
            }
            _ => {
                // No resourceVersion, "0", or sendInitialEvents: the current state as ADDED.
                // Stored objects carry kind/apiVersion, as watch events do.
                for o in objects(&st, res, ns.as_deref(), &selector) {
                    let _ = tx.send(event_line("ADDED", &o));
                }
                if initial_events {
                    let _ = tx.send(event_line("BOOKMARK", &bookmark(res, st.rv, true)));
                }
            }
        }
        let id = st.next_sub;
        st.next_sub += 1;
        st.subs.push(Sub { id, res, namespace: ns.clone(), selector: selector.clone(), tx });
        break Some(id);
    };

    if let Some(id) = id {
        // Bookmarks and the server-side timeout; the stream itself is fed by mutations.
        let sh = sh.clone();
        tokio::spawn(async move {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let every = sh.lock().bookmark_every;
                tokio::time::sleep(every).await;
                let mut st = sh.lock();
                let rv = st.rv;
                let Some(pos) = st.subs.iter().position(|s| s.id == id) else { return };
                if st.subs[pos].tx.is_closed() || deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    st.subs.remove(pos);
                    return;
                }
                if bookmarks && st.subs[pos].tx.send(event_line("BOOKMARK", &bookmark(res, rv, false))).is_err() {
                    st.subs.remove(pos);
                    return;
                }
            }
        });
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(BoxBody::new(ChannelBody(rx)))
        .expect("response")
}

fn apply_configmap(
    sh: &Arc<Shared>,
    ns: &str,
    name: &str,
    ctype: &str,
    q: &HashMap<String, String>,
    body: &[u8],
) -> Response<RespBody> {
    if ctype.split(';').next().map(str::trim) != Some("application/apply-patch+yaml") {
        return error(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ctype:?})"),
        );
    }
    let manager = q.get("fieldManager").cloned().unwrap_or_default();
    if manager.is_empty() {
        return error(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
                .into(),
        );
    }
    // The mock accepts the JSON form of YAML (what clients send).
    let mut obj: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, "BadRequest", format!("error decoding YAML: {e}")),
    };
    if obj["apiVersion"] != "v1" || obj["kind"] != "ConfigMap" {
        return error(
            400,
            "BadRequest",
            format!("apply body must be a v1 ConfigMap, got {} {}", obj["apiVersion"], obj["kind"]),
        );
    }
    if obj["metadata"]["name"].as_str() != Some(name) {
        return error(
            400,
            "BadRequest",
            format!("the name of the object ({}) does not match the name on the URL ({name})", obj["metadata"]["name"]),
        );
    }
    let mut st = sh.lock();
    if !st.namespaces.contains_key(ns) {
        return not_found("", "namespaces", ns);
    }
    let key = (ns.to_string(), name.to_string());
    let existing = st.configmaps.get(&key).cloned();
    let rv = st.bump();
    obj["metadata"]["namespace"] = json!(ns);
    if let Some(old) = &existing {
        obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
        obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
    }
    obj["metadata"]["managedFields"] = json!([{
        "manager": manager, "operation": "Apply", "apiVersion": "v1",
        "time": "2026-01-05T09:31:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": { "f:data": { "f:ca.crt": {} }, "f:metadata": { "f:labels": {} } }
    }]);
    stamp(&mut obj, rv, "ConfigMap", "v1");
    st.configmaps.insert(key, obj.clone());
    respond(if existing.is_some() { 200 } else { 201 }, &obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(decode("spec.nodeName%3Dnode-a"), "spec.nodeName=node-a");
        assert_eq!(decode("a+b%2Cc"), "a b,c");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn field_selectors() {
        let pod = json!({"metadata": {"name": "p", "namespace": "n"}, "spec": {"nodeName": "a"}});
        let sel = |s| FieldSelector::parse(Some(s), Res::Pods).expect("selector");
        assert!(sel("spec.nodeName=a").matches(&pod));
        assert!(sel("spec.nodeName==a,metadata.namespace=n").matches(&pod));
        assert!(!sel("spec.nodeName=b").matches(&pod));
        assert!(sel("spec.nodeName!=b").matches(&pod));
        assert!(FieldSelector::parse(Some("spec.hostname=a"), Res::Pods).is_err());
        assert!(FieldSelector::parse(Some("spec.nodeName=a"), Res::Namespaces).is_err());
    }
}
