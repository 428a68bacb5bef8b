//! What the Kubernetes tests share: the overlays rendered by `kubectl kustomize` and
//! parsed, and a pod of the rendered StatefulSet as a process would run it: its program,
//! args and env, with the downward API, Secrets and ConfigMaps resolved.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// A stand-in for the operator's cluster secret (Secret `opmesh-cluster`).
pub const CLUSTER_SECRET: &str = "a-test-secret-of-at-least-16-bytes";
/// The admin token of the tokens file the tests give the pods (Secret `opmesh-tokens`).
pub const ADMIN_TOKEN: &str = "k8s-test-admin-token-0001";

/// The Secrets an operator creates (k8s/OPERATOR_PROVIDED), as `name/key` → value.
pub fn operator_secrets() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("opmesh-cluster/secret".to_owned(), CLUSTER_SECRET.to_owned()),
        (
            "opmesh-tokens/tokens.toml".to_owned(),
            format!("[[token]]\nname = \"operator\"\nsecret = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n"),
        ),
    ])
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `kubectl` runs here. When it does not, a test says so and skips, unless
/// `OPMESH_REQUIRE_KUBECTL` is set (scripts/check-k8s sets it), when it fails.
pub fn kubectl_or_skip(test: &str) -> bool {
    let ok = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("OPMESH_REQUIRE_KUBECTL").is_none(),
            "kubectl is required (OPMESH_REQUIRE_KUBECTL is set) but does not run; \
             scripts/install-k8s-tools installs it"
        );
        eprintln!(
            "SKIPPED {test}: kubectl is not installed (scripts/install-k8s-tools installs it)"
        );
    }
    ok
}

/// Every overlay under k8s/overlays, by name.
pub fn overlays() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root().join("k8s/overlays"))
        .expect("k8s/overlays exists")
        .map(|e| {
            e.expect("readable")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// One overlay, rendered.
pub struct Rendered {
    pub overlay: String,
    pub objects: Vec<Value>,
}

impl Rendered {
    /// `kubectl kustomize k8s/overlays/<overlay>`, parsed.
    pub fn render(overlay: &str) -> Rendered {
        let dir = root().join("k8s/overlays").join(overlay);
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
        let objects = serde_norway::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("each rendered document is YAML"))
            .filter(|v| !v.is_null())
            .collect();
        Rendered {
            overlay: overlay.to_owned(),
            objects,
        }
    }

    pub fn all(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_owned();
        self.objects
            .iter()
            .filter(move |o| o["kind"] == kind.as_str())
    }

    pub fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.all(kind).find(|o| o["metadata"]["name"] == name)
    }

    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.find(kind, name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.overlay))
    }

    pub fn statefulset(&self) -> &Value {
        self.get("StatefulSet", "opmesh")
    }

    /// The opmesh container of the StatefulSet's pod template.
    pub fn container(&self) -> &Value {
        self.statefulset()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == "opmesh"))
            .unwrap_or_else(|| panic!("{}: no container `opmesh`", self.overlay))
    }

    /// The namespace the objects are in (`default` when the overlay sets none).
    pub fn namespace(&self) -> String {
        self.statefulset()["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    }

    /// The opmesh pod of ordinal `ordinal` as a process runs it, its ConfigMap and Secret
    /// volumes written under `dir`, `secrets` giving each Secret's keys (by `name/key`:
    /// for `secretKeyRef`s and as the files of Secret volumes). A path inside a volume's
    /// mount point, in the args, the env or the ConfigMap files, points at its copy.
    pub fn pod(&self, ordinal: u32, dir: &Path, secrets: &BTreeMap<String, String>) -> Pod {
        let set = self.statefulset();
        let name = format!("{}-{ordinal}", set["metadata"]["name"].as_str().unwrap());
        let c = self.container();
        let command = strings(&c["command"]);
        assert_eq!(
            command,
            ["opmesh"],
            "{}: the container runs the image's binary",
            self.overlay
        );

        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap().to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "metadata.name" => name.clone(),
                    "metadata.namespace" => self.namespace(),
                    other => panic!("{}: env {key}: unexpected fieldRef {other}", self.overlay),
                }
            } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
                let id = format!(
                    "{}/{}",
                    r["name"].as_str().unwrap(),
                    r["key"].as_str().unwrap()
                );
                match secrets.get(&id) {
                    Some(v) => v.clone(),
                    // Kubernetes leaves the variable unset.
                    None if r["optional"] == true => continue,
                    None => panic!("{}: env {key}: no value for Secret {id}", self.overlay),
                }
            } else if let Some(r) = e["valueFrom"].get("configMapKeyRef") {
                self.get("ConfigMap", r["name"].as_str().unwrap())["data"]
                    [r["key"].as_str().unwrap()]
                .as_str()
                .unwrap()
                .to_owned()
            } else {
                panic!("{}: env {key}: unexpected value {e}", self.overlay)
            };
            env.push((key, value));
        }

        // ConfigMap and Secret volumes: their files under `dir`, and every path in their
        // mount points pointed there.
        let volumes = set["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut mounts = Vec::new();
        let mut files: Vec<(PathBuf, String)> = Vec::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vol = m["name"].as_str().unwrap();
            let path = m["mountPath"].as_str().unwrap().to_owned();
            let Some(v) = volumes.iter().find(|v| v["name"] == vol) else {
                continue; // a volumeClaimTemplate
            };
            let local = dir.join(format!("{name}-{vol}"));
            if let Some(cm) = v["configMap"]["name"].as_str() {
                let data = self.get("ConfigMap", cm)["data"].as_object().unwrap();
                for (file, content) in data {
                    files.push((local.join(file), content.as_str().unwrap().to_owned()));
                }
            } else if let Some(secret) = v["secret"]["secretName"].as_str() {
                let prefix = format!("{secret}/");
                for (id, content) in secrets {
                    if let Some(file) = id.strip_prefix(&prefix) {
                        files.push((local.join(file), content.clone()));
                    }
                }
            } else {
                continue;
            }
            std::fs::create_dir_all(&local).unwrap();
            mounts.push((path, local));
        }
        let local_path = |s: &str| -> String {
            let mut s = s.to_owned();
            for (path, local) in &mounts {
                s = s.replace(&format!("{path}/"), &format!("{}/", local.display()));
            }
            s
        };
        for (file, content) in files {
            std::fs::write(file, local_path(&content)).unwrap();
        }
        let args = strings(&c["args"])
            .into_iter()
            .map(|a| {
                for (path, local) in &mounts {
                    if let Some(rest) = a.strip_prefix(path.as_str()) {
                        return format!("{}{rest}", local.display());
                    }
                }
                a
            })
            .collect();
        let env = env.into_iter().map(|(k, v)| (k, local_path(&v))).collect();
        Pod { name, args, env }
    }
}

/// A pod's process: `opmesh` (the container's command) with these args and env.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// The lines `opmesh serve --check-config` prints, `name: value`, as a map.
pub fn summary(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}
