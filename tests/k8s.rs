//! The rendered Kubernetes manifests hold together with the binary they run: every
//! overlay under k8s/overlays, rendered by `kubectl kustomize`, is checked against the
//! real `opmesh` (its `serve --check-config`, a running node's probes) and against the
//! Dockerfile and observability/. scripts/check-k8s runs the schema, lint and security
//! checks beside it. Skips, saying so, when kubectl is not installed.

mod common;
mod k8s_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::{client, Server, BIN};
use k8s_support::{kubectl_or_skip, overlays, root, strings, summary, Rendered};
use serde_json::Value;

fn secrets() -> BTreeMap<String, String> {
    k8s_support::operator_secrets()
}

fn rendered() -> Option<Vec<Rendered>> {
    if !kubectl_or_skip("tests/k8s.rs") {
        return None;
    }
    let all: Vec<Rendered> = overlays().iter().map(|o| Rendered::render(o)).collect();
    assert!(
        all.iter().any(|r| r.overlay == "dev") && all.iter().any(|r| r.overlay == "prod"),
        "the dev and prod overlays exist"
    );
    Some(all)
}

/// Runs `opmesh serve --check-config` as pod `ordinal` of `r` would start; returns its
/// summary.
fn check_config(r: &Rendered, ordinal: u32) -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let pod = r.pod(ordinal, dir.path(), &secrets());
    let out = Command::new(BIN)
        .args(&pod.args)
        .arg("--check-config")
        .env_clear()
        .envs(pod.env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("opmesh runs");
    assert!(
        out.status.success(),
        "{}: pod {} does not pass `opmesh serve --check-config` ({:?}): {}",
        r.overlay,
        pod.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    summary(&String::from_utf8_lossy(&out.stdout))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The container's ports, by name.
fn container_ports(r: &Rendered) -> BTreeMap<String, u64> {
    r.container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn every_pod_passes_check_config_and_takes_its_place_from_its_ordinal() {
    let Some(all) = rendered() else { return };
    for r in &all {
        let set = r.statefulset();
        let replicas = set["spec"]["replicas"].as_u64().unwrap() as u32;
        let svc = set["spec"]["serviceName"].as_str().unwrap();
        let ns = r.namespace();
        for ordinal in [0, 1, replicas - 1] {
            let s = check_config(r, ordinal);
            let pod = format!("opmesh-{ordinal}");
            let host = |p: &str| format!("{p}.{svc}.{ns}.svc.cluster.local");
            assert_eq!(s["node"], pod, "{}", r.overlay);
            assert_eq!(
                s["advertise"],
                format!("{}:{}", host(&pod), container_ports(r)["cluster"]),
                "{}: the pod advertises its name in the headless Service",
                r.overlay
            );
            let seeds: Vec<&str> = s["join"].split(',').collect();
            assert!(
                !seeds.contains(&s["advertise"].as_str()),
                "{}: not its own seed",
                r.overlay
            );
            for seed in &seeds {
                assert!(
                    seed.ends_with(&format!(".{svc}.{ns}.svc.cluster.local:7071")),
                    "{seed}"
                );
            }
            let may_bootstrap = s["bootstrap"].starts_with("when no seed belongs");
            assert_eq!(may_bootstrap, ordinal == 0, "{}: {s:?}", r.overlay);
            // Every seed is a pod the set always has, whatever the autoscaler does.
            let min = r
                .find("HorizontalPodAutoscaler", "opmesh")
                .map_or(replicas as u64, |h| {
                    h["spec"]["minReplicas"].as_u64().unwrap()
                });
            let highest_seed = seeds
                .iter()
                .map(|s| {
                    s.split('.')
                        .next()
                        .unwrap()
                        .rsplit_once('-')
                        .unwrap()
                        .1
                        .parse::<u64>()
                        .unwrap()
                })
                .max()
                .unwrap();
            assert!(
                highest_seed < min,
                "{}: seed ordinal {highest_seed} is not always there",
                r.overlay
            );
            // `sleep` is for tests: off.
            assert!(
                !s["handlers"].split(", ").any(|h| h == "sleep"),
                "{}: {s:?}",
                r.overlay
            );
            // The data dir is on the volume claim.
            let data = r.container()["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == "data")
                .expect("the data volume is mounted");
            assert_eq!(
                s["data_dir"],
                data["mountPath"].as_str().unwrap(),
                "{}",
                r.overlay
            );
            let claims = set["spec"]["volumeClaimTemplates"].as_array().unwrap();
            assert!(
                claims.iter().any(|c| c["metadata"]["name"] == "data"),
                "{}",
                r.overlay
            );
        }
    }
}

#[test]
fn ports_agree_between_the_services_the_statefulset_and_the_config() {
    let Some(all) = rendered() else { return };
    for r in &all {
        let ports = container_ports(r);
        let s = check_config(r, 0);
        assert_eq!(
            ports["http"],
            port_of(&s["http"]),
            "{}: http port",
            r.overlay
        );
        assert_eq!(
            ports["cluster"],
            port_of(&s["cluster"]),
            "{}: cluster port",
            r.overlay
        );

        let set = r.statefulset();
        let peers = r.get("Service", set["spec"]["serviceName"].as_str().unwrap());
        assert_eq!(
            peers["spec"]["clusterIP"], "None",
            "{}: headless",
            r.overlay
        );
        assert_eq!(
            peers["spec"]["publishNotReadyAddresses"], true,
            "{}",
            r.overlay
        );
        let client_svc = r.get("Service", "opmesh");
        let labels = set["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .unwrap();
        for svc in [peers, client_svc] {
            for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{}: a Service selects the pods",
                    r.overlay
                );
            }
            for p in svc["spec"]["ports"].as_array().unwrap() {
                let target = p["targetPort"].as_str().expect("named target ports");
                assert_eq!(
                    Some(&p["port"].as_u64().unwrap()),
                    ports.get(target),
                    "{}: Service {} port {target}",
                    r.overlay,
                    svc["metadata"]["name"]
                );
            }
        }
        let peer_ports: BTreeSet<&str> = peers["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert!(peer_ports.contains("cluster"), "{}", r.overlay);

        // The NetworkPolicy opens the cluster port to opmesh pods only.
        let np = r.get("NetworkPolicy", "opmesh");
        for rule in np["spec"]["ingress"].as_array().unwrap() {
            for p in rule["ports"].as_array().unwrap() {
                let name = p["port"].as_str().unwrap();
                assert!(
                    ports.contains_key(name),
                    "{}: NetworkPolicy port {name}",
                    r.overlay
                );
                if name == "cluster" {
                    let from = &rule["from"][0]["podSelector"]["matchLabels"];
                    assert_eq!(from["app.kubernetes.io/name"], "opmesh", "{}", r.overlay);
                }
            }
        }
        if let Some(pm) = r.find("PodMonitor", "opmesh") {
            let ep = &pm["spec"]["podMetricsEndpoints"][0];
            assert!(
                ports.contains_key(ep["port"].as_str().unwrap()),
                "{}",
                r.overlay
            );
            assert_eq!(ep["path"], "/metrics");
        }
    }
}

#[tokio::test]
async fn the_probes_answer_on_a_running_node() {
    let Some(all) = rendered() else { return };
    let node = Server::start(&[], &[]);
    let c = client();
    for r in &all {
        let ports = container_ports(r);
        let probes = [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ];
        for (probe, path) in probes {
            let p = &r.container()[probe]["httpGet"];
            assert_eq!(p["path"], path, "{}: {probe}", r.overlay);
            assert!(
                ports.contains_key(p["port"].as_str().unwrap()),
                "{}: {probe} port",
                r.overlay
            );
            let resp = c.get(node.url(path)).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{}: {probe} {path}", r.overlay);
        }
    }
}

#[test]
fn the_grace_period_covers_the_leave_and_the_drain() {
    let Some(all) = rendered() else { return };
    for r in &all {
        let s = check_config(r, 0);
        let grace: u64 = s["shutdown_grace_secs"].parse().unwrap();
        let write_ms: u64 = s["write_timeout_ms"].parse().unwrap();
        // The leave's hand-off, the drain and the HTTP server's stop each wait up to the
        // grace; four cluster writes up to the write timeout; the last spans 5 s.
        let needed = 3 * grace + (4 * write_ms).div_ceil(1000) + 5;
        let period = r.statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            period >= needed,
            "{}: terminationGracePeriodSeconds {period} < {needed}",
            r.overlay
        );
        // No preStop hook: SIGTERM itself starts the leave.
        assert!(r.container()["lifecycle"].is_null(), "{}", r.overlay);
    }
}

#[test]
fn every_container_is_hardened_and_has_resources() {
    let Some(all) = rendered() else { return };
    for r in &all {
        for kind in ["StatefulSet", "Deployment"] {
            for w in r.all(kind) {
                let name = &w["metadata"]["name"];
                let spec = &w["spec"]["template"]["spec"];
                assert_eq!(
                    spec["automountServiceAccountToken"], false,
                    "{}: {name}",
                    r.overlay
                );
                assert_eq!(
                    spec["securityContext"]["runAsNonRoot"], true,
                    "{}: {name}",
                    r.overlay
                );
                assert_eq!(
                    spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
                    "{}: {name}",
                    r.overlay
                );
                for c in spec["containers"].as_array().unwrap() {
                    for what in ["requests", "limits"] {
                        for res in ["cpu", "memory"] {
                            assert!(
                                c["resources"][what][res].is_string(),
                                "{}: {name}: {what}.{res}",
                                r.overlay
                            );
                        }
                    }
                    let sc = &c["securityContext"];
                    assert_eq!(
                        sc["allowPrivilegeEscalation"], false,
                        "{}: {name}",
                        r.overlay
                    );
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{}: {name}", r.overlay);
                    assert_eq!(
                        sc["capabilities"]["drop"][0], "ALL",
                        "{}: {name}",
                        r.overlay
                    );
                    assert!(c["livenessProbe"].is_object() && c["readinessProbe"].is_object());
                }
            }
        }
        let sa = r.get("ServiceAccount", "opmesh");
        assert_eq!(sa["automountServiceAccountToken"], false);
        let pdb = r.get("PodDisruptionBudget", "opmesh");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        let set = r.statefulset();
        assert_eq!(set["spec"]["podManagementPolicy"], "Parallel");
        assert!(
            set["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["topologyKey"]
                .as_str()
                .is_some()
        );
        // The pod runs as the image's user.
        let uid = set["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap();
        assert!(dockerfile().contains(&format!("USER {uid}:")), "USER {uid}");
    }
}

#[test]
fn every_secret_and_configmap_referenced_exists_or_is_provided_by_the_operator() {
    let Some(all) = rendered() else { return };
    let text = std::fs::read_to_string(root().join("k8s/OPERATOR_PROVIDED")).unwrap();
    let provided: BTreeMap<(String, String), bool> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            ((f[0].to_owned(), f[1].to_owned()), f[2] == "optional")
        })
        .collect();
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (kind, name) in provided.keys() {
        assert!(
            readme.contains(name.as_str()),
            "README says how to provide {kind} {name}"
        );
    }
    for r in &all {
        for kind in ["StatefulSet", "Deployment"] {
            for w in r.all(kind) {
                let spec = &w["spec"]["template"]["spec"];
                let mut refs: Vec<(&str, String, bool)> = Vec::new();
                for v in spec["volumes"].as_array().into_iter().flatten() {
                    if let Some(n) = v["secret"]["secretName"].as_str() {
                        refs.push(("Secret", n.into(), v["secret"]["optional"] == true));
                    }
                    if let Some(n) = v["configMap"]["name"].as_str() {
                        refs.push(("ConfigMap", n.into(), v["configMap"]["optional"] == true));
                    }
                }
                for c in spec["containers"].as_array().unwrap() {
                    for e in c["env"].as_array().into_iter().flatten() {
                        for (field, kind) in
                            [("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")]
                        {
                            let rf = &e["valueFrom"][field];
                            if let Some(n) = rf["name"].as_str() {
                                refs.push((kind, n.into(), rf["optional"] == true));
                            }
                        }
                    }
                    assert!(c["envFrom"].is_null(), "envFrom is not used");
                }
                // An object is optional when every reference to it is (a required key
                // and an optional one of the same Secret make it required).
                let mut objects: BTreeMap<(&str, String), bool> = BTreeMap::new();
                for (kind, name, optional) in refs {
                    *objects.entry((kind, name)).or_insert(true) &= optional;
                }
                for ((kind, name), optional) in objects {
                    if r.find(kind, &name).is_some() {
                        continue;
                    }
                    let listed = provided.get(&(kind.to_owned(), name.clone()));
                    assert!(
                        listed.is_some(),
                        "{}: {kind} {name} is neither in the overlay nor in k8s/OPERATOR_PROVIDED",
                        r.overlay
                    );
                    assert_eq!(
                        listed.copied(),
                        Some(optional),
                        "{}: {kind} {name}: optional in the manifest as listed",
                        r.overlay
                    );
                }
            }
        }
    }
}

#[test]
fn the_overlays_are_as_documented() {
    let Some(all) = rendered() else { return };
    let env = |r: &Rendered, name: &str| -> Option<String> {
        r.container()["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    };
    for r in &all {
        let replicas = r.statefulset()["spec"]["replicas"].as_u64().unwrap();
        match r.overlay.as_str() {
            "dev" => {
                assert_eq!(replicas, 3);
                assert_eq!(env(r, "LOG_FORMAT").as_deref(), Some("pretty"));
                // Jaeger v2 all-in-one, and opmesh's traces sent to its OTLP/gRPC port.
                let svc = r.get("Service", "jaeger");
                let ports: BTreeSet<u64> = svc["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["port"].as_u64().unwrap())
                    .collect();
                assert_eq!(ports, BTreeSet::from([4317, 4318, 16686]));
                let image = r.get("Deployment", "jaeger")["spec"]["template"]["spec"]["containers"]
                    [0]["image"]
                    .as_str()
                    .unwrap();
                assert!(image.starts_with("jaegertracing/jaeger:2."), "{image}");
                assert_eq!(
                    env(r, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
                    Some("http://jaeger:4317")
                );
                let s = check_config(r, 0);
                assert_eq!(s["traces"], "http://jaeger:4317 (grpc)");
            }
            "prod" => {
                assert_eq!(replicas, 5);
                assert_eq!(env(r, "LOG_FORMAT").as_deref(), Some("json"));
                let hpa = r.get("HorizontalPodAutoscaler", "opmesh");
                assert_eq!(hpa["spec"]["minReplicas"], 5);
                assert_eq!(hpa["spec"]["maxReplicas"], 15);
                assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
                assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "opmesh");
                assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");
                assert!(
                    env(r, "OTEL_EXPORTER_OTLP_ENDPOINT").is_some_and(|e| !e.contains("jaeger"))
                );
                assert!(r.find("Deployment", "jaeger").is_none());
                let s = check_config(r, 0);
                assert!(s["traces"].ends_with("(grpc)"), "{s:?}");
                // Scaled-in pods leave; their volumes go with them.
                assert_eq!(
                    r.statefulset()["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"],
                    "Delete"
                );
            }
            other => panic!("an overlay this test does not know: {other}"),
        }
    }
}

#[test]
fn the_observability_component_carries_observability_as_it_is() {
    let Some(all) = rendered() else { return };
    let prod = all.iter().find(|r| r.overlay == "prod").unwrap();
    let stale = "k8s/components/observability is stale: run scripts/sync-k8s-observability";
    let dashboard =
        std::fs::read_to_string(root().join("observability/grafana-dashboard.json")).unwrap();
    let cm = prod.get("ConfigMap", "opmesh-grafana-dashboard");
    assert_eq!(
        cm["data"]["grafana-dashboard.json"].as_str(),
        Some(dashboard.as_str()),
        "{stale}"
    );
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let alerts =
        std::fs::read_to_string(root().join("observability/prometheus-alerts.yml")).unwrap();
    let cm = prod.get("ConfigMap", "opmesh-alert-rules");
    assert_eq!(
        cm["data"]["prometheus-alerts.yml"].as_str(),
        Some(alerts.as_str()),
        "{stale}"
    );
    let rules: Value = serde_norway::from_str(&alerts).unwrap();
    assert_eq!(
        prod.get("PrometheusRule", "opmesh")["spec"],
        rules,
        "{stale}"
    );
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).unwrap()
}

#[test]
fn the_image_runs_what_the_manifests_expect() {
    let d = dockerfile();
    assert!(d.contains("ENTRYPOINT [\"opmesh\"]"), "ENTRYPOINT");
    assert!(d.contains("CMD [\"serve\"]"), "CMD");
    assert!(!d.contains("HEALTHCHECK"), "probes are Kubernetes' job");
    assert!(
        d.contains("cargo build --release --locked"),
        "a locked release build"
    );
    // The dependency layer stubs every target the manifests declare, or cargo refuses.
    for manifest in ["Cargo.toml", "cluster/Cargo.toml", "actors/Cargo.toml"] {
        let text = std::fs::read_to_string(root().join(manifest)).unwrap();
        let doc: toml_like::Doc = toml_like::parse(&text);
        let dir = manifest.trim_end_matches("Cargo.toml");
        for bench in doc.benches {
            let stub = format!("{dir}benches/{bench}");
            assert!(d.contains(&stub), "the Dockerfile stubs {stub}.rs");
        }
    }
    let Some(all) = rendered() else { return };
    for r in &all {
        assert_eq!(
            strings(&r.container()["command"]),
            ["opmesh"],
            "{}",
            r.overlay
        );
        for (_, port) in container_ports(r) {
            let exposed = d.lines().any(|l| {
                l.starts_with("EXPOSE") && l.split_whitespace().any(|p| p == port.to_string())
            });
            assert!(exposed, "the Dockerfile exposes {port}");
        }
    }
}

/// Just enough of a Cargo manifest: the names of its `[[bench]]` targets.
mod toml_like {
    pub struct Doc {
        pub benches: Vec<String>,
    }

    pub fn parse(text: &str) -> Doc {
        let mut benches = Vec::new();
        let mut in_bench = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bench = line == "[[bench]]";
            } else if in_bench {
                if let Some(name) = line.strip_prefix("name = ") {
                    benches.push(name.trim_matches('"').to_owned());
                }
            }
        }
        Doc { benches }
    }
}
