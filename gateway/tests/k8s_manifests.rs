//! The Kubernetes install under `deploy/kubernetes/` is shipped, not compiled: this test renders
//! it with `kubectl kustomize` (base, each overlay, base + the ServiceMonitor component),
//! validates every document against the Kubernetes 1.32 OpenAPI schemas in strict mode
//! (`kubernetes-validate` from the repository's venv), loads every embedded tollgate config with
//! the real parser, and checks that the DaemonSet, RBAC and Service agree with that config.
//!
//! Needs `kubectl` (machine image) and `.venv/bin/kubernetes-validate` (`cargo xtask setup`);
//! a missing tool is a failure, not a skip.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;
use tollgate::config::{Config, InterceptMode, PodCaptureMode};

/// Kubernetes version the manifests are validated against (oldest supported minor we target).
const KUBERNETES_VERSION: &str = "1.32.0";
/// Capabilities the agent runs with, nothing more.
const CAPABILITIES: [&str; 5] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"];

fn repo() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn k8s_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// `kubectl kustomize DIR`; a missing kubectl fails with instructions.
fn kustomize(dir: &Path) -> String {
    let out = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "kubectl not found in PATH: it is part of the machine image and renders deploy/kubernetes \
             (`kubectl kustomize`); install kubectl >= 1.27"
        ),
        Err(e) => panic!("running kubectl kustomize {}: {e}", dir.display()),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed ({}):\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

fn documents(what: &str, text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// `to` relative to `from` (both absolute, canonical): kustomize refuses absolute paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let (f, t): (Vec<Component>, Vec<Component>) = (from.components().collect(), to.components().collect());
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c.as_os_str());
    }
    rel
}

/// One rendered variant of the install.
struct Render {
    name: &'static str,
    docs: Vec<Value>,
}

impl Render {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = self.all(kind);
        assert_eq!(found.len(), 1, "{}: expected exactly one {kind}, found {}", self.name, found.len());
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs.iter().find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.docs.iter().map(|d| str_of(&d["kind"], &format!("{}: kind", self.name)).to_string()).collect()
    }
}

const BASE: &str = "base";
const OBSERVE: &str = "observe-only";
const ENFORCE: &str = "enforce";
const WITH_SERVICEMONITOR: &str = "base+servicemonitor";

/// Every variant, rendered once per test process.
fn renders() -> &'static [Render] {
    static RENDERS: OnceLock<Vec<Render>> = OnceLock::new();
    RENDERS.get_or_init(|| {
        let dir = k8s_dir();
        let mut out = Vec::new();
        for (name, path) in [
            (BASE, dir.clone()),
            (OBSERVE, dir.join("overlays/observe-only")),
            (ENFORCE, dir.join("overlays/enforce")),
        ] {
            out.push(Render { name, docs: documents(name, &kustomize(&path)) });
        }
        // The component is meant to be added to a user's overlay: do exactly that, from a
        // scratch kustomization outside the repository.
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let from = tmp.path().canonicalize().unwrap();
        let kust = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
            relative(&from, &dir).display(),
            relative(&from, &dir.join("components/servicemonitor")).display()
        );
        std::fs::write(from.join("kustomization.yaml"), kust).unwrap();
        out.push(Render { name: WITH_SERVICEMONITOR, docs: documents(WITH_SERVICEMONITOR, &kustomize(&from)) });
        out
    })
}

fn render(name: &str) -> &'static Render {
    renders().iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no render {name}"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    seq(v, what).iter().map(|s| str_of(s, what).to_string()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A string-to-string map (labels, selectors).
fn string_map(v: &Value, what: &str) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what}: expected a mapping, got {v:?}"))
        .iter()
        .map(|(k, v)| (str_of(k, what).to_string(), str_of(v, what).to_string()))
        .collect()
}

/// The element of a list whose `name` is `name`.
fn by_name<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    seq(list, what)
        .iter()
        .find(|v| v["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("{what}: no entry named {name:?} in {list:?}"))
}

fn pod_spec(r: &Render) -> &Value {
    &r.one("DaemonSet")["spec"]["template"]["spec"]
}

fn container(r: &Render) -> &Value {
    let containers = seq(&pod_spec(r)["containers"], "containers");
    assert_eq!(containers.len(), 1, "{}: the DaemonSet runs one container", r.name);
    &containers[0]
}

/// The volume named `name` of the DaemonSet and where the container mounts it.
fn volume_and_mount<'a>(r: &'a Render, name: &str) -> (&'a Value, &'a Value) {
    let what = format!("{}: DaemonSet", r.name);
    let volume = by_name(&pod_spec(r)["volumes"], name, &format!("{what} volumes"));
    let mount = by_name(&container(r)["volumeMounts"], name, &format!("{what} volumeMounts"));
    (volume, mount)
}

fn mount_path(mount: &Value) -> PathBuf {
    PathBuf::from(str_of(&mount["mountPath"], "mountPath"))
}

/// The tollgate config the DaemonSet runs with: the `--config` file, looked up in the ConfigMap
/// mounted over its directory, parsed and validated by tollgate itself.
fn embedded_config(r: &Render) -> (String, Config) {
    let args = strings(&container(r)["args"], "args");
    let i = args.iter().position(|a| a == "--config").unwrap_or_else(|| panic!("{}: no --config in {args:?}", r.name));
    let file = PathBuf::from(&args[i + 1]);
    let (volume, mount) = volume_and_mount(r, "config");
    assert_eq!(file.parent(), Some(mount_path(mount).as_path()), "{}: --config is not in the config mount", r.name);
    let cm_name = str_of(&volume["configMap"]["name"], "config volume configMap.name");
    let cm = r
        .named("ConfigMap", cm_name)
        .unwrap_or_else(|| panic!("{}: the DaemonSet mounts ConfigMap {cm_name}, which is not rendered", r.name));
    let key = file.file_name().unwrap().to_str().unwrap();
    let text = str_of(&cm["data"][key], &format!("{}: ConfigMap {cm_name} data.{key}", r.name)).to_string();
    let cfg = tollgate::config::from_str(&format!("{} ConfigMap {cm_name}/{key}", r.name), &text)
        .unwrap_or_else(|e| panic!("{e}"));
    (text, cfg)
}

fn installs() -> [&'static Render; 3] {
    [render(BASE), render(OBSERVE), render(ENFORCE)]
}

#[test]
fn every_variant_renders_the_expected_objects() {
    let install: BTreeSet<String> =
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "Service", "ServiceAccount"]
            .map(String::from)
            .into();
    for r in installs() {
        assert_eq!(r.kinds(), install, "{}: kinds", r.name);
        assert_eq!(r.docs.len(), install.len(), "{}: one object of each kind", r.name);
    }
    let mut with_sm = install.clone();
    with_sm.insert("ServiceMonitor".into());
    assert_eq!(render(WITH_SERVICEMONITOR).kinds(), with_sm);
    // No Secret is ever shipped (the CA and provider keys are created by the operator), and
    // everything namespaced lands in the Namespace the install creates.
    for r in renders() {
        let ns = str_of(&r.one("Namespace")["metadata"]["name"], "Namespace name");
        assert_eq!(ns, "tollgate");
        for d in &r.docs {
            let kind = str_of(&d["kind"], "kind");
            if matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
                assert!(d["metadata"]["namespace"].is_null(), "{}: {kind} is cluster-scoped", r.name);
            } else {
                assert_eq!(d["metadata"]["namespace"].as_str(), Some(ns), "{}: {kind} namespace", r.name);
            }
        }
    }
}

/// Run kubernetes-validate on `text`; (success, output).
fn kubernetes_validate(text: &str) -> (bool, String) {
    let bin = repo().join(".venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask setup` (it installs tests/clients/requirements.txt into .venv)",
        bin.display()
    );
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = tmp.path().join("manifests.yaml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(&bin)
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn to_yaml_stream(docs: &[&Value]) -> String {
    docs.iter().map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap())).collect()
}

/// Strict schema validation of every built-in object. kubernetes-validate only knows the
/// Kubernetes API: for a CRD kind (ServiceMonitor) it prints a warning and succeeds, so CRD
/// documents are not sent to it (checked in `servicemonitor_component_scrapes_the_admin_port`)
/// and every other document must be reported as passed, by kind and name.
#[test]
fn manifests_validate_strictly_against_kubernetes_schemas() {
    // The validator is strict: an unknown field fails (guards against a silently lax run).
    let ds = render(BASE).one("DaemonSet").clone();
    let mut typo = ds.clone();
    typo["spec"]["template"]["spec"]["hostPId"] = Value::Bool(true);
    let (ok, out) = kubernetes_validate(&to_yaml_stream(&[&typo]));
    assert!(!ok && out.contains("'hostPId'"), "strict validation missed an unknown field:\n{out}");

    for r in renders() {
        let (crds, builtin): (Vec<&Value>, Vec<&Value>) =
            r.docs.iter().partition(|d| str_of(&d["apiVersion"], "apiVersion").starts_with("monitoring.coreos.com/"));
        assert_eq!(crds.len(), usize::from(r.name == WITH_SERVICEMONITOR), "{}: CRD objects", r.name);
        let (ok, out) = kubernetes_validate(&to_yaml_stream(&builtin));
        assert!(ok, "{}: kubernetes-validate --strict -k {KUBERNETES_VERSION} failed:\n{out}", r.name);
        let bad: Vec<&str> = out.lines().filter(|l| !l.starts_with("INFO ")).collect();
        assert!(bad.is_empty(), "{}: kubernetes-validate reported:\n{}", r.name, bad.join("\n"));
        for d in builtin {
            let kn = format!(
                "passed for resource {}/{} against version 1.32",
                str_of(&d["kind"], "kind").to_lowercase(),
                str_of(&d["metadata"]["name"], "name")
            );
            assert!(out.contains(&kn), "{}: kubernetes-validate did not report `{kn}`:\n{out}", r.name);
        }
    }
}

#[test]
fn every_embedded_config_is_a_valid_tollgate_config() {
    let hosts_of =
        |c: &Config| -> Vec<String> { c.capture.hosts.iter().map(|h| format!("{}:{}", h.host, h.port)).collect() };
    let default = tollgate::config::from_str("<default>", tollgate::config::DEFAULT_CONFIG_YAML).unwrap();
    for r in renders() {
        // Every ConfigMap that holds a config.yaml, not only the mounted one.
        for cm in r.all("ConfigMap") {
            if let Some(text) = cm["data"]["config.yaml"].as_str() {
                tollgate::config::from_str(&format!("{} ConfigMap config.yaml", r.name), text)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let (_, c) = embedded_config(r);
        assert!(c.kubernetes.enabled, "{}: kubernetes.enabled", r.name);
        assert_eq!(c.kubernetes.node_name, None, "{}: the node comes from NODE_NAME", r.name);
        assert_eq!(c.capture.cgroup_root.as_deref(), Some(Path::new("/sys/fs/cgroup")), "{}", r.name);
        assert!(c.capture.enabled, "{}", r.name);
        assert!(c.capture.scope.is_empty(), "{}: pod scope comes from the kubernetes section", r.name);
        assert_eq!(c.admin.listen.to_string(), "0.0.0.0:15000", "{}: admin must be reachable on the node IP", r.name);
        assert_eq!(c.listen.port, 15001, "{}", r.name);
        assert_eq!(c.listen.ipv4, Ipv4Addr::LOCALHOST, "{}", r.name);
        assert_eq!(c.listen.pod_ipv4, None, "{}: the DaemonSet passes the node IP with --pod-ipv4", r.name);
        assert!(!c.capture.fail_closed, "{}: fail-open (see the enforce config)", r.name);
        assert_eq!(c.limits.drain_timeout, Duration::from_secs(20), "{}", r.name);
        // The usual AI provider hosts, as in the embedded default.
        assert_eq!(hosts_of(&c), hosts_of(&default), "{}: capture.hosts", r.name);
        // The routes a host-only install has, minus Ollama on the node's loopback (a pod's
        // loopback is its own and never redirected).
        let route_hosts: Vec<String> = c.routes.iter().flat_map(|r| r.matcher.hosts.clone()).collect();
        for h in ["api.openai.com", "api.anthropic.com"] {
            assert!(route_hosts.iter().any(|x| x == h), "{}: no route for {h}", r.name);
        }
    }
}

#[test]
fn overlays_change_the_config_as_intended() {
    let (base_text, base) = embedded_config(render(BASE));
    let (observe_text, observe) = embedded_config(render(OBSERVE));
    let (enforce_text, enforce) = embedded_config(render(ENFORCE));
    assert_ne!(base_text, observe_text);
    assert_ne!(base_text, enforce_text);
    let intercepted = |c: &Config| -> Vec<String> {
        c.routes.iter().filter(|r| r.intercept.may_intercept()).map(|r| r.name.clone()).collect()
    };
    let auto = |c: &Config| {
        c.routes.iter().filter(|r| r.intercept.may_intercept()).all(|r| r.intercept == InterceptMode::Auto)
    };
    let gateways = |c: &Config| -> Vec<String> {
        c.routes.iter().filter(|r| !r.targets.is_empty()).map(|r| r.name.clone()).collect()
    };

    // Base: opted-in pods, token counts on the main providers with the agents' own keys.
    assert_eq!(base.kubernetes.capture, PodCaptureMode::OptIn);
    assert_eq!(intercepted(&base), ["openai", "anthropic", "gemini"]);
    assert!(auto(&base) && auto(&enforce), "base and enforce intercept only where trust is proven");
    assert!(gateways(&base).is_empty() && base.providers.is_empty());
    assert_eq!(base.kubernetes.ca_configmap.as_deref(), Some("tollgate-ca"));

    // Observe-only: every pod, nothing intercepted, no keys, no CA published.
    assert_eq!(observe.kubernetes.capture, PodCaptureMode::All);
    assert!(intercepted(&observe).is_empty(), "observe-only intercepts {:?}", intercepted(&observe));
    assert!(!observe_text.contains("intercept: true") && !observe_text.contains("intercept: auto"));
    assert!(gateways(&observe).is_empty() && observe.providers.is_empty());
    assert_eq!(observe.kubernetes.ca_configmap, None);
    assert_eq!(observe.kubernetes.exclude_namespaces, ["kube-system", "kube-public", "kube-node-lease"]);

    // Enforce: opted-in pods, OpenAI and Anthropic through the gateway with tollgate's keys.
    assert_eq!(enforce.kubernetes.capture, PodCaptureMode::OptIn);
    assert_eq!(intercepted(&enforce), ["openai", "anthropic"]);
    assert_eq!(gateways(&enforce), ["openai", "anthropic"]);
    for route in enforce.routes.iter().filter(|r| !r.targets.is_empty()) {
        let providers: Vec<&str> = route.targets.iter().map(|t| t.provider.as_str()).collect();
        assert_eq!(providers, [route.name.as_str()], "enforce route {}", route.name);
    }
    let key_files: Vec<String> = enforce
        .providers
        .iter()
        .map(|p| {
            let c = p.credentials.as_ref().unwrap_or_else(|| panic!("enforce provider {} has no credentials", p.name));
            assert_eq!(c.env, None, "enforce provider {}: keys come from the Secret files", p.name);
            c.file.as_ref().unwrap().display().to_string()
        })
        .collect();
    assert_eq!(key_files, ["/var/lib/tollgate/keys/openai", "/var/lib/tollgate/keys/anthropic"]);
    assert_eq!(enforce.kubernetes.ca_configmap.as_deref(), Some("tollgate-ca"));

    // The overlays change the config and nothing else: same DaemonSet, RBAC, Service.
    for r in [render(OBSERVE), render(ENFORCE)] {
        for kind in ["DaemonSet", "ClusterRole", "ClusterRoleBinding", "Service", "ServiceAccount", "Namespace"] {
            assert_eq!(r.one(kind), render(BASE).one(kind), "{}: {kind} differs from the base", r.name);
        }
    }
}

#[test]
fn daemonset_runs_the_node_agent_with_least_privilege() {
    for r in installs() {
        let n = r.name;
        let ds = r.one("DaemonSet");
        let spec = pod_spec(r);
        let c = container(r);
        let (_, cfg) = embedded_config(r);

        let labels = string_map(&ds["spec"]["template"]["metadata"]["labels"], "pod labels");
        assert_eq!(labels.get("app.kubernetes.io/name").map(String::as_str), Some("tollgate"), "{n}");
        assert_eq!(spec["hostNetwork"].as_bool(), Some(true), "{n}: hostNetwork");
        assert_eq!(spec["hostPID"].as_bool(), Some(true), "{n}: hostPID");
        assert_eq!(spec["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"), "{n}");
        assert_eq!(spec["priorityClassName"].as_str(), Some("system-node-critical"), "{n}");
        let tolerations = seq(&spec["tolerations"], "tolerations");
        assert_eq!(tolerations.len(), 1, "{n}: tolerations");
        assert_eq!(string_map(&tolerations[0], "toleration"), [("operator".into(), "Exists".into())].into(), "{n}");
        assert_eq!(ds["spec"]["updateStrategy"]["type"].as_str(), Some("RollingUpdate"), "{n}");
        assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(1), "{n}");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
        assert!(
            Duration::from_secs(grace) >= cfg.limits.drain_timeout + Duration::from_secs(10),
            "{n}: terminationGracePeriodSeconds {grace} < drain_timeout {:?} + 10s",
            cfg.limits.drain_timeout
        );

        // Least privilege: exactly these capabilities, everything else dropped, not privileged.
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"].as_bool(), Some(false), "{n}: privileged");
        assert_eq!(sc["runAsUser"].as_u64(), Some(0), "{n}: runAsUser");
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{n}: readOnlyRootFilesystem");
        assert_eq!(strings(&sc["capabilities"]["drop"], "drop"), ["ALL"], "{n}: capabilities.drop");
        assert_eq!(sorted(strings(&sc["capabilities"]["add"], "add")), CAPABILITIES, "{n}: capabilities.add");
        // The API server refuses allowPrivilegeEscalation: false together with SYS_ADMIN.
        assert_ne!(sc["allowPrivilegeEscalation"].as_bool(), Some(false), "{n}");
        assert!(spec["securityContext"].is_null() || spec["securityContext"]["privileged"].is_null(), "{n}");

        // Ports, probes, resources.
        let port = |name: &str| by_name(&c["ports"], name, "ports")["containerPort"].as_u64();
        assert_eq!(port("proxy"), Some(u64::from(cfg.listen.port)), "{n}: proxy port = listen.port");
        assert_eq!(port("admin"), Some(u64::from(cfg.admin.listen.port())), "{n}: admin port = admin.listen");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{n}: {probe} path");
            assert_eq!(get["port"].as_str(), Some("admin"), "{n}: {probe} port");
        }
        let res = &c["resources"];
        assert_eq!(res["requests"]["cpu"].as_str(), Some("100m"), "{n}");
        assert_eq!(res["requests"]["memory"].as_str(), Some("128Mi"), "{n}");
        assert_eq!(res["limits"]["cpu"].as_str(), Some("1"), "{n}");
        assert_eq!(res["limits"]["memory"].as_str(), Some("512Mi"), "{n}");

        // Environment from the downward API, and the node IP as the pod-facing proxy address.
        for (var, field) in [
            ("NODE_NAME", "spec.nodeName"),
            ("HOST_IP", "status.hostIP"),
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ] {
            let e = by_name(&c["env"], var, "env");
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some(field), "{n}: env {var}");
            assert!(e["value"].is_null(), "{n}: env {var} has a literal value too");
        }
        assert_eq!(
            strings(&c["args"], "args"),
            ["run", "--config", "/etc/tollgate/config.yaml", "--pod-ipv4", "$(HOST_IP)", "--log-format", "json"],
            "{n}: args"
        );
        assert!(c["command"].is_null(), "{n}: the image's entrypoint is tollgate");

        // Config: a directory mount (live reload), of a ConfigMap with a stable name.
        let (volume, mount) = volume_and_mount(r, "config");
        assert!(mount["subPath"].is_null() && mount["subPathExpr"].is_null(), "{n}: config mounted by subPath");
        assert_eq!(mount_path(mount), Path::new("/etc/tollgate"), "{n}");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{n}");
        assert_eq!(volume["configMap"]["name"].as_str(), Some("tollgate-config"), "{n}: no hash suffix");
        assert!(volume["configMap"]["items"].is_null(), "{n}: the whole ConfigMap is mounted");

        // The CA Secret at tls.ca_dir, read-only, key readable by root only.
        let (volume, mount) = volume_and_mount(r, "ca");
        assert_eq!(mount_path(mount), cfg.tls.ca_dir, "{n}: CA mount = tls.ca_dir");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{n}");
        assert!(mount["subPath"].is_null(), "{n}");
        let secret = &volume["secret"];
        assert_eq!(secret["secretName"].as_str(), Some("tollgate-ca"), "{n}");
        assert_eq!(secret["defaultMode"].as_u64(), Some(0o400), "{n}: CA defaultMode");
        assert_ne!(secret["optional"].as_bool(), Some(true), "{n}: the CA Secret is required");
        let items: Vec<(String, String)> = seq(&secret["items"], "ca items")
            .iter()
            .map(|i| (str_of(&i["key"], "key").to_string(), str_of(&i["path"], "path").to_string()))
            .collect();
        assert_eq!(items, [("ca.pem".into(), "ca.pem".into()), ("ca.key".into(), "ca.key".into())], "{n}");

        // Provider keys: an optional Secret; every credentials.file of the config lies in it.
        let (volume, mount) = volume_and_mount(r, "provider-keys");
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("tollgate-provider-keys"), "{n}");
        assert_eq!(volume["secret"]["optional"].as_bool(), Some(true), "{n}");
        assert_eq!(volume["secret"]["defaultMode"].as_u64(), Some(0o400), "{n}");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{n}");
        let keys_dir = mount_path(mount);
        for p in &cfg.providers {
            let file = p.credentials.as_ref().and_then(|c| c.file.as_ref());
            assert_eq!(file.and_then(|f| f.parent()), Some(keys_dir.as_path()), "{n}: provider {} key file", p.name);
        }

        // Host filesystems: cgroup2 at capture.cgroup_root, bpffs covering capture.bpffs_dir.
        let (volume, mount) = volume_and_mount(r, "cgroup");
        assert_eq!(volume["hostPath"]["path"].as_str(), Some("/sys/fs/cgroup"), "{n}");
        assert_eq!(Some(mount_path(mount)), cfg.capture.cgroup_root, "{n}: cgroup mount = capture.cgroup_root");
        let (volume, mount) = volume_and_mount(r, "bpffs");
        assert_eq!(volume["hostPath"]["path"].as_str(), Some("/sys/fs/bpf"), "{n}");
        assert_eq!(mount_path(mount), Path::new("/sys/fs/bpf"), "{n}");
        assert!(cfg.capture.bpffs_dir.starts_with(mount_path(mount)), "{n}: capture.bpffs_dir outside the bpffs mount");
        // Bidirectional propagation is only allowed in privileged containers.
        assert_eq!(mount["mountPropagation"].as_str(), Some("HostToContainer"), "{n}");
        assert_ne!(mount["readOnly"].as_bool(), Some(true), "{n}: stale pins are removed at start");
        let (volume, mount) = volume_and_mount(r, "run");
        assert!(volume["emptyDir"].is_mapping(), "{n}: /run/tollgate is an emptyDir");
        assert_eq!(mount_path(mount), Path::new("/run/tollgate"), "{n}");

        // TLS uprobes: the host's tracefs read-only where the tracepoint ids are looked up
        // (hostPID gives the agents' /proc/<pid>/maps and /proc/<pid>/root, checked above).
        assert!(cfg.capture.uprobes.enabled, "{n}: capture.uprobes off in the DaemonSet's config");
        let (volume, mount) = volume_and_mount(r, "tracefs");
        assert_eq!(volume["hostPath"]["path"].as_str(), Some("/sys/kernel/tracing"), "{n}");
        assert_eq!(volume["hostPath"]["type"].as_str(), Some("Directory"), "{n}");
        assert_eq!(mount_path(mount), Path::new("/sys/kernel/tracing"), "{n}");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{n}: tracefs is only read");
        assert_eq!(mount["mountPropagation"].as_str(), Some("HostToContainer"), "{n}");

        // Nothing else is mounted from the host.
        let host_paths: BTreeSet<&str> =
            seq(&spec["volumes"], "volumes").iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
        assert_eq!(
            host_paths,
            ["/sys/fs/bpf", "/sys/fs/cgroup", "/sys/kernel/tracing"].into(),
            "{n}: hostPath volumes"
        );
    }
}

/// An RBAC (apiGroup, resource) pair.
type GroupResource = (String, String);
type Verbs = BTreeSet<String>;

#[test]
fn rbac_grants_what_the_kubernetes_section_uses_and_no_more() {
    for r in installs() {
        let n = r.name;
        let (_, cfg) = embedded_config(r);
        let spec = pod_spec(r);
        let sa = r.one("ServiceAccount");
        let sa_name = str_of(&sa["metadata"]["name"], "ServiceAccount name");
        assert_eq!(spec["serviceAccountName"].as_str(), Some(sa_name), "{n}");
        assert_ne!(
            spec["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{n}: in-cluster client needs the token"
        );

        let role = r.one("ClusterRole");
        let binding = r.one("ClusterRoleBinding");
        assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"], "{n}: roleRef");
        let subjects = seq(&binding["subjects"], "subjects");
        assert_eq!(subjects.len(), 1, "{n}");
        assert_eq!(subjects[0]["kind"].as_str(), Some("ServiceAccount"));
        assert_eq!(subjects[0]["name"].as_str(), Some(sa_name), "{n}: subject");
        assert_eq!(subjects[0]["namespace"], sa["metadata"]["namespace"], "{n}: subject namespace");

        // (group, resource) -> (verbs, resourceNames), merged over the rules.
        let mut grants: BTreeMap<GroupResource, (Verbs, Option<Vec<String>>)> = BTreeMap::new();
        for rule in seq(&role["rules"], "rules") {
            let names = rule["resourceNames"].as_sequence().map(|_| strings(&rule["resourceNames"], "resourceNames"));
            for g in strings(&rule["apiGroups"], "apiGroups") {
                for res in strings(&rule["resources"], "resources") {
                    let e = grants.entry((g.clone(), res)).or_default();
                    e.0.extend(strings(&rule["verbs"], "verbs"));
                    assert!(e.1.is_none() || names.is_none(), "{n}: split resourceNames rules");
                    e.1 = e.1.take().or(names.clone());
                }
            }
        }
        let read: BTreeSet<String> = ["get", "list", "watch"].map(String::from).into();
        let expected: BTreeMap<GroupResource, Verbs> = [
            (("", "pods"), read.clone()),
            (("", "namespaces"), read.clone()),
            (("apps", "replicasets"), read.clone()),
            (("batch", "jobs"), read.clone()),
            (("", "configmaps"), ["get", "create", "patch"].map(String::from).into()),
        ]
        .into_iter()
        .map(|((g, r), v)| ((g.to_string(), r.to_string()), v))
        .collect();
        let verbs: BTreeMap<GroupResource, Verbs> = grants.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
        assert_eq!(verbs, expected, "{n}: ClusterRole rules");
        // ConfigMap access is limited to the published CA ConfigMap (server-side apply
        // authorizes the create by name); read rules are not narrowed.
        let cm_names = grants[&(String::new(), "configmaps".to_string())].1.clone();
        assert_eq!(cm_names, Some(vec!["tollgate-ca".to_string()]), "{n}: configmaps resourceNames");
        if let Some(name) = &cfg.kubernetes.ca_configmap {
            assert_eq!(cm_names.as_deref(), Some(std::slice::from_ref(name)), "{n}: RBAC vs kubernetes.ca_configmap");
        }
        for ((g, res), (_, names)) in &grants {
            if res != "configmaps" {
                assert!(names.is_none(), "{n}: {g}/{res} limited by name");
            }
        }
    }
}

#[test]
fn service_exposes_the_admin_port_of_the_agent_pods() {
    for r in installs() {
        let n = r.name;
        let svc = r.one("Service");
        let ds = r.one("DaemonSet");
        let pod_labels = string_map(&ds["spec"]["template"]["metadata"]["labels"], "pod labels");
        let selector = string_map(&svc["spec"]["selector"], "Service selector");
        assert!(!selector.is_empty(), "{n}: Service selector");
        for (k, v) in &selector {
            assert_eq!(pod_labels.get(k), Some(v), "{n}: Service selects {k}={v}, pods have {pod_labels:?}");
        }
        assert_eq!(
            string_map(&ds["spec"]["selector"]["matchLabels"], "DaemonSet selector"),
            selector,
            "{n}: Service and DaemonSet select the same pods"
        );
        assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"), "{n}: headless");
        let ports = seq(&svc["spec"]["ports"], "Service ports");
        assert_eq!(ports.len(), 1, "{n}");
        assert_eq!(ports[0]["name"].as_str(), Some("admin"), "{n}");
        assert_eq!(ports[0]["port"].as_u64(), Some(15000), "{n}");
        assert_eq!(ports[0]["targetPort"].as_str(), Some("admin"), "{n}: targetPort is the container port name");
        let container_ports: Vec<&str> =
            seq(&container(r)["ports"], "ports").iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(container_ports.contains(&"admin"), "{n}");

        let ns = r.one("Namespace");
        let ns_labels = string_map(&ns["metadata"]["labels"], "Namespace labels");
        assert_eq!(ns_labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"), "{n}");
        let (_, cfg) = embedded_config(r);
        assert_eq!(ns_labels.get(&cfg.kubernetes.namespace_label).map(String::as_str), Some("disabled"), "{n}");
    }
}

/// ServiceMonitor is a CRD kubernetes-validate has no schema for: its structure is checked
/// here against the Prometheus Operator v1 API fields this install uses.
#[test]
fn servicemonitor_component_scrapes_the_admin_port() {
    for r in installs() {
        assert!(r.all("ServiceMonitor").is_empty(), "{}: the ServiceMonitor is not in the base", r.name);
    }
    let r = render(WITH_SERVICEMONITOR);
    let sm = r.one("ServiceMonitor");
    let svc = r.one("Service");
    assert_eq!(sm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(str_of(&sm["metadata"]["name"], "name"), "tollgate");
    assert_eq!(sm["metadata"]["namespace"], svc["metadata"]["namespace"]);
    let keys = |v: &Value, what: &str| -> BTreeSet<String> {
        v.as_mapping()
            .unwrap_or_else(|| panic!("{what}: expected a mapping"))
            .keys()
            .map(|k| str_of(k, what).to_string())
            .collect()
    };
    let allowed_spec: BTreeSet<String> =
        ["selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels", "podTargetLabels"]
            .map(String::from)
            .into();
    assert!(
        keys(&sm["spec"], "spec").is_subset(&allowed_spec),
        "ServiceMonitor spec keys {:?}",
        keys(&sm["spec"], "spec")
    );
    let svc_labels = string_map(&svc["metadata"]["labels"], "Service labels");
    for (k, v) in string_map(&sm["spec"]["selector"]["matchLabels"], "ServiceMonitor selector") {
        assert_eq!(svc_labels.get(&k), Some(&v), "ServiceMonitor selects {k}={v}; Service has {svc_labels:?}");
    }
    assert_eq!(
        strings(&sm["spec"]["namespaceSelector"]["matchNames"], "matchNames"),
        [str_of(&svc["metadata"]["namespace"], "ns")]
    );
    let endpoints = seq(&sm["spec"]["endpoints"], "endpoints");
    assert_eq!(endpoints.len(), 1);
    let ep = &endpoints[0];
    let allowed_ep: BTreeSet<String> =
        ["port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings", "honorLabels"]
            .map(String::from)
            .into();
    assert!(keys(ep, "endpoint").is_subset(&allowed_ep), "endpoint keys {:?}", keys(ep, "endpoint"));
    assert_eq!(ep["port"].as_str(), Some("admin"));
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
    let svc_ports: Vec<&str> = seq(&svc["spec"]["ports"], "ports").iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(svc_ports.contains(&"admin"), "ServiceMonitor port is not a Service port name: {svc_ports:?}");
    for rl in seq(&ep["relabelings"], "relabelings") {
        let k = keys(rl, "relabeling");
        let allowed: BTreeSet<String> =
            ["sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"].map(String::from).into();
        assert!(k.is_subset(&allowed), "relabeling keys {k:?}");
    }
    // Everything else is the unchanged base.
    for kind in ["DaemonSet", "ConfigMap", "Service", "ClusterRole"] {
        assert_eq!(r.one(kind), render(BASE).one(kind), "{kind}");
    }
}

#[test]
fn docs_and_image_build_match_the_manifests() {
    let dir = k8s_dir();
    // The install guide is the top-level README's "Install on Kubernetes" section.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(readme.contains("## Install on Kubernetes"), "README.md has no Install on Kubernetes section");
    for needle in [
        "tollgate ca --dir ./ca",
        "kubectl -n tollgate create secret generic tollgate-ca --from-file=ca.pem=./ca/ca.pem --from-file=ca.key=./ca/ca.key",
        "create secret generic tollgate-provider-keys",
        "kubectl apply -k deploy/kubernetes/",
        "deploy/observability/k8s",
    ] {
        assert!(readme.contains(needle), "README.md does not mention `{needle}`");
    }
    // Every key file the enforce config reads is named in the README's Secret command.
    let (_, enforce) = embedded_config(render(ENFORCE));
    for p in &enforce.providers {
        let file = p.credentials.as_ref().and_then(|c| c.file.as_ref()).unwrap();
        let key = file.file_name().unwrap().to_str().unwrap();
        assert!(
            readme.contains(&format!("--from-file={key}=")),
            "README: no --from-file={key}= for the enforce Secret"
        );
    }

    // The image is built with the workspace's Rust and the eBPF object the binary embeds.
    let dockerfile = std::fs::read_to_string(dir.join("Dockerfile")).unwrap();
    let workspace = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let rust_version = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("workspace rust-version");
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust_version}\n")),
        "Dockerfile RUST_VERSION differs from the workspace rust-version {rust_version}"
    );
    assert!(dockerfile.contains("cargo xtask build-ebpf"), "Dockerfile does not build the eBPF object");
    assert!(dockerfile.contains("ebpf/target/bpfel-unknown-none/release/tollgate-ebpf"));
    let ds = render(BASE).one("DaemonSet");
    let image = str_of(&container(render(BASE))["image"], "image");
    let tag = format!(":{}", env!("CARGO_PKG_VERSION"));
    assert!(image.ends_with(&tag), "{image}: the base pins the image tag to the crate version");
    assert!(ds["spec"]["template"]["spec"]["initContainers"].is_null());
}
