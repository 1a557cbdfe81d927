//! The deployment files under `deploy/` are shipped, not compiled: this test keeps them honest.
//! Every YAML file must parse (all documents), Grafana must be provisioned from `dashboards/`
//! (every dashboard, at the path the provider reads), and Prometheus must scrape tollgate's
//! admin listener, on the laptop and in Kubernetes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml_ng::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of a YAML file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn one(path: &Path) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{}: expected one document", path.display());
    docs.remove(0)
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

/// Absolute form of `rel` against `base`, for comparing paths written from different places.
fn resolve(base: &Path, rel: &str) -> PathBuf {
    let p = base.join(rel);
    p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Where the repository's dashboard provider expects the dashboard files.
fn provider_path() -> String {
    let doc = one(&repo().join("dashboards/provisioning/dashboards.yaml"));
    str_of(&doc["providers"][0]["options"]["path"], "dashboards.yaml providers[0].options.path").to_string()
}

fn dashboards() -> BTreeSet<PathBuf> {
    let dir = repo().join("dashboards");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            out.insert(path.canonicalize().unwrap());
        }
    }
    assert!(!out.is_empty(), "no dashboards in {}", dir.display());
    out
}

#[test]
fn deploy_yaml_parses() {
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy"), &mut files);
    assert!(files.len() >= 10, "expected the observability stack under deploy/, found {files:?}");
    for f in &files {
        let docs = documents(f);
        assert!(!docs.is_empty(), "{}: no YAML document", f.display());
        // Kubernetes manifests: every document names its kind and object.
        if f.components().any(|c| c.as_os_str() == "k8s") && !f.ends_with("kustomization.yaml") {
            if f.parent().is_some_and(|p| p.ends_with("config")) {
                continue;
            }
            for d in &docs {
                str_of(&d["kind"], &format!("{}: kind", f.display()));
                str_of(&d["metadata"]["name"], &format!("{}: metadata.name", f.display()));
            }
        }
    }
}

#[test]
fn compose_grafana_mounts_dashboards_and_prometheus_scrapes_admin() {
    let base = repo().join("deploy/observability");
    let compose = one(&base.join("compose.yaml"));
    let services = &compose["services"];
    for name in ["otel-collector", "prometheus", "tempo", "grafana"] {
        assert!(services[name].is_mapping(), "compose.yaml: no service {name}");
    }
    // Every bind mount's source exists.
    let mut mounts = BTreeSet::new();
    for (name, svc) in services.as_mapping().unwrap() {
        let name = str_of(name, "service name");
        for v in svc["volumes"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let spec = str_of(v, "volume");
            let (src, rest) = spec.split_once(':').unwrap_or_else(|| panic!("{name}: volume {spec}"));
            if src.starts_with('.') {
                let target = rest.split(':').next().unwrap();
                mounts.insert((name.to_string(), resolve(&base, src), target.to_string()));
            }
        }
    }
    let mounted = |svc: &str, src: PathBuf, target: &str| {
        assert!(
            mounts.contains(&(svc.to_string(), src.clone(), target.to_string())),
            "compose.yaml: {svc} does not mount {} at {target}: {mounts:#?}",
            src.display()
        );
    };
    mounted("grafana", resolve(&repo(), "dashboards"), &provider_path());
    let provisioning = |f: &str| resolve(&repo(), &format!("dashboards/provisioning/{f}"));
    let (dash_prov, ds_prov) = ("/etc/grafana/provisioning/dashboards/", "/etc/grafana/provisioning/datasources/");
    assert!(
        mounts
            .iter()
            .any(|(s, src, t)| s == "grafana" && *src == provisioning("dashboards.yaml") && t.starts_with(dash_prov)),
        "compose.yaml: grafana lacks the dashboard provider"
    );
    assert!(
        mounts
            .iter()
            .any(|(s, src, t)| s == "grafana" && *src == provisioning("datasources.yaml") && t.starts_with(ds_prov)),
        "compose.yaml: grafana lacks the Prometheus datasource"
    );

    // Prometheus scrapes tollgate's default admin address, which is loopback: it must share the
    // host's network namespace for that address to be tollgate's.
    assert_eq!(services["prometheus"]["network_mode"].as_str(), Some("host"));
    mounted("prometheus", base.join("prometheus.yml").canonicalize().unwrap(), "/etc/prometheus/prometheus.yml");
    let prom = one(&base.join("prometheus.yml"));
    let job = &seq(&prom["scrape_configs"], "scrape_configs")[0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let admin = tollgate::config::AdminConfig::default().listen.to_string();
    let targets = seq(&job["static_configs"][0]["targets"], "targets");
    assert!(targets.iter().any(|t| t.as_str() == Some(admin.as_str())), "prometheus.yml does not scrape {admin}");
}

#[test]
fn kubernetes_grafana_provisions_every_dashboard() {
    let k8s = repo().join("deploy/observability/k8s");
    let kust = one(&k8s.join("kustomization.yaml"));
    let generator = |name: &str| -> Vec<PathBuf> {
        let gens = seq(&kust["configMapGenerator"], "configMapGenerator");
        let g = gens.iter().find(|g| g["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no generator {name}"));
        seq(&g["files"], name)
            .iter()
            .map(|f| {
                let f = str_of(f, name);
                resolve(&k8s, f.split_once('=').map_or(f, |(_, path)| path))
            })
            .collect()
    };
    let listed: BTreeSet<PathBuf> = generator("grafana-dashboards").into_iter().collect();
    assert_eq!(listed, dashboards(), "kustomization.yaml grafana-dashboards must list every dashboards/*.json");
    assert_eq!(generator("grafana-dashboard-providers"), [resolve(&repo(), "dashboards/provisioning/dashboards.yaml")]);
    assert!(generator("grafana-datasources").contains(&resolve(&repo(), "dashboards/provisioning/datasources.yaml")));
    for g in ["otel-collector-config", "tempo-config", "prometheus-config"] {
        assert!(!generator(g).is_empty());
    }

    let grafana = documents(&k8s.join("grafana.yaml"));
    let deploy = grafana.iter().find(|d| d["kind"].as_str() == Some("Deployment")).expect("grafana Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let mount_of = |configmap: &str| -> String {
        let volume = seq(&pod["volumes"], "volumes")
            .iter()
            .find(|v| v["configMap"]["name"].as_str() == Some(configmap))
            .unwrap_or_else(|| panic!("grafana.yaml: no volume of ConfigMap {configmap}"));
        let mounts = seq(&pod["containers"][0]["volumeMounts"], "volumeMounts");
        let m = mounts.iter().find(|m| m["name"] == volume["name"]).expect("volume not mounted");
        str_of(&m["mountPath"], "mountPath").to_string()
    };
    assert_eq!(mount_of("grafana-dashboards"), provider_path());
    assert_eq!(mount_of("grafana-dashboard-providers"), "/etc/grafana/provisioning/dashboards");
    assert_eq!(mount_of("grafana-datasources"), "/etc/grafana/provisioning/datasources");
}

#[test]
fn kubernetes_prometheus_scrapes_tollgate_admin_port() {
    let cfg = one(&repo().join("deploy/observability/k8s/config/prometheus.yml"));
    let job = seq(&cfg["scrape_configs"], "scrape_configs")
        .iter()
        .find(|j| j["job_name"].as_str() == Some("tollgate"))
        .expect("tollgate job");
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    assert_eq!(job["kubernetes_sd_configs"][0]["role"].as_str(), Some("pod"));
    let keeps: Vec<(String, String)> = seq(&job["relabel_configs"], "relabel_configs")
        .iter()
        .filter(|r| r["action"].as_str() == Some("keep"))
        .map(|r| {
            (str_of(&r["source_labels"][0], "source_labels").to_string(), str_of(&r["regex"], "regex").to_string())
        })
        .collect();
    let keep = |label: &str, regex: &str| keeps.contains(&(label.to_string(), regex.to_string()));
    assert!(keep("__meta_kubernetes_pod_label_app_kubernetes_io_name", "tollgate"), "{keeps:?}");
    assert!(keep("__meta_kubernetes_pod_container_port_name", "admin"), "{keeps:?}");

    // Any tollgate DaemonSet shipped under deploy/ must match that discovery: the label, and
    // the admin listener exposed as a port named `admin`.
    let mut files = Vec::new();
    yaml_files(&repo().join("deploy"), &mut files);
    for f in files {
        for d in documents(&f) {
            if d["kind"].as_str() != Some("DaemonSet") {
                continue;
            }
            let labels = &d["spec"]["template"]["metadata"]["labels"];
            if labels["app.kubernetes.io/name"].as_str() != Some("tollgate") {
                continue;
            }
            let containers = seq(&d["spec"]["template"]["spec"]["containers"], "containers");
            let named_admin = containers
                .iter()
                .flat_map(|c| c["ports"].as_sequence().map(Vec::as_slice).unwrap_or_default())
                .any(|p| p["name"].as_str() == Some("admin"));
            assert!(named_admin, "{}: tollgate DaemonSet has no container port named admin", f.display());
        }
    }
}

#[test]
fn collector_and_tempo_agree_on_otlp() {
    let base = repo().join("deploy/observability");
    let collector = one(&base.join("otel-collector.yaml"));
    assert_eq!(collector["exporters"]["otlp/tempo"]["endpoint"].as_str(), Some("tempo:4317"));
    let tempo = one(&base.join("tempo.yaml"));
    let grpc = &tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"];
    assert_eq!(grpc.as_str(), Some("0.0.0.0:4317"));
    let ds = one(&base.join("grafana/datasources-tempo.yaml"));
    let port = tempo["server"]["http_listen_port"].as_u64().expect("tempo http port");
    assert_eq!(ds["datasources"][0]["url"].as_str(), Some(format!("http://tempo:{port}").as_str()));
}
