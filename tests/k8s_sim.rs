//! The rendered StatefulSet's pods, simulated without Kubernetes: each pod is the real
//! `opmesh` binary started with exactly the container's command, args and env (POD_NAME
//! and POD_NAMESPACE from the downward API, the cluster secret, the ConfigMap's file),
//! in a network namespace of its own with its own address on a bridge, and a hosts file
//! (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts) that resolves
//! the headless Service's names of the pods that exist, as the cluster DNS would. Its
//! volume is a directory of its own, mounted at the data volume's path in the pod's
//! mount namespace; the ConfigMap's files are written to a directory the args point at.
//!
//! The short test (in the default run) checks that three pods started together
//! bootstrap one cluster, and that ordinal 0 restarted with an empty volume joins the
//! others instead of starting a second cluster. The long one (`#[ignore]`,
//! scripts/k8s-sim) adds scaling to 5 and back to 3, a rolling restart under load with
//! no failed request, and a pod restarted with an empty volume. Both need root (network
//! namespaces); elsewhere they say that they skipped. Every step waits on a condition
//! with a deadline; every namespace, link and process is removed at the end, also when
//! a step fails.

mod common;
mod k8s_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::BIN;
use k8s_support::{kubectl_or_skip, Pod, Rendered};
use serde_json::Value;

/// How long a pod gets to become ready (join), and the cluster to agree.
const READY: Duration = Duration::from_secs(60);

/// One simulated StatefulSet: its namespaces, bridge, processes and volumes.
struct Sim {
    rendered: Rendered,
    /// Unique per run: the prefix of every namespace and link name.
    id: String,
    /// The first three octets of the pods' /24, e.g. "10.77.3".
    net: String,
    bridge: String,
    dir: tempfile::TempDir,
    pods: BTreeMap<u32, Child>,
    /// Ordinals whose namespace exists.
    namespaces: BTreeSet<u32>,
    ip: PathBuf,
    http: reqwest::Client,
}

impl Sim {
    /// Root with network namespaces, and kubectl: `None` (saying why) otherwise.
    fn new(test: &str) -> Option<Sim> {
        if !kubectl_or_skip(test) {
            return None;
        }
        let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let Some(ip) = ip else {
            eprintln!("SKIPPED {test}: the `ip` command (iproute2) is not installed");
            return None;
        };
        // Unique per test and per process: names of links are at most 15 bytes.
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("om{}{run}", pid % 100_000);
        let probe = format!("{id}probe");
        let ok = Command::new(&ip)
            .args(["netns", "add", &probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED {test}: cannot create network namespaces (this needs root); \
                 run scripts/k8s-sim as root"
            );
            return None;
        }
        let _ = Command::new(&ip).args(["netns", "del", &probe]).status();
        let net = format!("10.77.{}", (pid * 4 + run) % 250);
        let sim = Sim {
            rendered: Rendered::render("dev"),
            bridge: format!("{id}br"),
            id,
            net,
            dir: tempfile::tempdir().unwrap(),
            pods: BTreeMap::new(),
            namespaces: BTreeSet::new(),
            ip,
            // The operator's admin token: the pods check tokens (Secret opmesh-tokens).
            http: reqwest::Client::builder()
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::AUTHORIZATION,
                    format!("Bearer {}", k8s_support::ADMIN_TOKEN)
                        .parse()
                        .unwrap(),
                )]))
                .timeout(Duration::from_secs(3))
                .build()
                .unwrap(),
        };
        sim.run(&["link", "add", &sim.bridge, "type", "bridge"]);
        sim.run(&[
            "addr",
            "add",
            &format!("{}.1/24", sim.net),
            "dev",
            &sim.bridge,
        ]);
        sim.run(&["link", "set", &sim.bridge, "up"]);
        Some(sim)
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.ip).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ns(&self, ordinal: u32) -> String {
        format!("{}p{ordinal}", self.id)
    }

    fn addr(&self, ordinal: u32) -> String {
        format!("{}.{}", self.net, 10 + ordinal)
    }

    fn url(&self, ordinal: u32, path: &str) -> String {
        format!("http://{}:7070{path}", self.addr(ordinal))
    }

    fn volume(&self, ordinal: u32) -> PathBuf {
        self.dir.path().join(format!("data-opmesh-{ordinal}"))
    }

    /// The headless Service's DNS name of a pod.
    fn dns(&self, ordinal: u32) -> String {
        let set = self.rendered.statefulset();
        format!(
            "opmesh-{ordinal}.{}.{}.svc.cluster.local",
            set["spec"]["serviceName"].as_str().unwrap(),
            self.rendered.namespace()
        )
    }

    /// Rewrites every pod's hosts file (in place: the mounted file is the same inode) to
    /// name the pods whose namespace exists.
    fn publish_dns(&self) {
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for o in &self.namespaces {
            hosts.push_str(&format!("{} {}\n", self.addr(*o), self.dns(*o)));
        }
        for o in &self.namespaces {
            let dir = PathBuf::from("/etc/netns").join(self.ns(*o));
            std::fs::write(dir.join("hosts"), &hosts).unwrap();
        }
    }

    /// A pod's network namespace, its link to the bridge and its DNS name.
    fn create_namespace(&mut self, ordinal: u32) {
        let ns = self.ns(ordinal);
        let (host, peer) = (
            format!("{}h{ordinal}", self.id),
            format!("{}c{ordinal}", self.id),
        );
        let etc = PathBuf::from("/etc/netns").join(&ns);
        std::fs::create_dir_all(&etc).unwrap();
        // Names not in the hosts file fail at once instead of waiting for a DNS server.
        std::fs::write(
            etc.join("resolv.conf"),
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        self.run(&["netns", "add", &ns]);
        self.namespaces.insert(ordinal);
        self.run(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        self.run(&["link", "set", &host, "master", &self.bridge]);
        self.run(&["link", "set", &host, "up"]);
        self.run(&["link", "set", &peer, "netns", &ns]);
        self.run(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(ordinal)),
            "dev",
            &peer,
        ]);
        self.run(&["-n", &ns, "link", "set", &peer, "up"]);
        self.run(&["-n", &ns, "link", "set", "lo", "up"]);
        self.publish_dns();
    }

    fn delete_namespace(&mut self, ordinal: u32) {
        let ns = self.ns(ordinal);
        let _ = Command::new(&self.ip).args(["netns", "del", &ns]).status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns));
        self.namespaces.remove(&ordinal);
        self.publish_dns();
    }

    /// Starts pod `ordinal` as its container would run (creating its namespace and its
    /// volume when they do not exist yet).
    fn start(&mut self, ordinal: u32) {
        if !self.namespaces.contains(&ordinal) {
            self.create_namespace(ordinal);
        }
        let secrets = k8s_support::operator_secrets();
        let pod: Pod = self.rendered.pod(ordinal, self.dir.path(), &secrets);
        let volume = self.volume(ordinal);
        std::fs::create_dir_all(&volume).unwrap();
        let data_path = self.rendered.container()["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "data")
            .unwrap()["mountPath"]
            .as_str()
            .unwrap()
            .to_owned();
        let parent = Path::new(&data_path)
            .parent()
            .unwrap()
            .display()
            .to_string();
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", pod.name))).unwrap();
        // In the pod's own mount namespace (ip netns exec makes one): the volume at the
        // data path, over an empty tmpfs so that nothing of the host shows there.
        let script = format!(
            "mount -t tmpfs pod {parent} && mkdir -p {data_path} && mount --bind {} {data_path} && exec \"$0\" \"$@\"",
            volume.display()
        );
        let child = Command::new(&self.ip)
            .args(["netns", "exec", &self.ns(ordinal), "sh", "-c", &script, BIN])
            .args(&pod.args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(pod.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("ip netns exec runs");
        self.pods.insert(ordinal, child);
    }

    /// Sends SIGTERM to pod `ordinal` and waits for it to exit, as the kubelet does
    /// (its grace period bounds the wait). Answers the exit code.
    fn stop(&mut self, ordinal: u32) -> Option<i32> {
        let mut child = self.pods.remove(&ordinal).expect("the pod runs");
        let _ = Command::new("kill")
            .args(["-s", "TERM", &child.id().to_string()])
            .status();
        let grace = self.rendered.statefulset()["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(grace);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("pod {ordinal} did not exit within its grace period of {grace} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn json(&self, ordinal: u32, path: &str) -> Option<Value> {
        let r = self.http.get(self.url(ordinal, path)).send().await.ok()?;
        r.json().await.ok()
    }

    async fn ready(&self, ordinal: u32) -> bool {
        let r = self.http.get(self.url(ordinal, "/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    }

    /// Waits until the pods `ordinals` are ready and each sees the same cluster: exactly
    /// these nodes, all up, and one leader.
    async fn one_cluster(&self, ordinals: &[u32], what: &str) {
        let want: BTreeSet<String> = ordinals.iter().map(|o| format!("opmesh-{o}")).collect();
        let until = Instant::now() + READY;
        loop {
            let mut views = Vec::new();
            for o in ordinals {
                if !self.ready(*o).await {
                    views.push(None);
                    continue;
                }
                views.push(self.json(*o, "/v1/cluster").await);
            }
            let agreed = views.iter().all(|v| {
                v.as_ref().is_some_and(|v| {
                    let nodes: BTreeSet<String> = v["nodes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
                        .collect();
                    let up = v["nodes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .all(|n| n["status"] == "up");
                    nodes == want
                        && up
                        && v["leader"].is_string()
                        && v["leader"] == views[0].as_ref().unwrap()["leader"]
                })
            });
            if agreed {
                return;
            }
            assert!(
                Instant::now() < until,
                "{what}: pods {ordinals:?} did not form one cluster within {READY:?}; last views: {views:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {} (last lines)\n", p.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Empties pod `ordinal`'s volume (the PersistentVolumeClaim deleted).
    fn wipe_volume(&self, ordinal: u32) {
        let v = self.volume(ordinal);
        std::fs::remove_dir_all(&v).unwrap();
        std::fs::create_dir_all(&v).unwrap();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.pods) {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Nothing here may panic: a failed step is already unwinding.
        for o in std::mem::take(&mut self.namespaces) {
            let ns = self.ns(o);
            let _ = Command::new(&self.ip).args(["netns", "del", &ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&ns));
        }
        let _ = Command::new(&self.ip)
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs an echo operation through pod `ordinal`; whether it succeeded.
async fn echo(sim: &Sim, ordinal: u32) -> bool {
    let r = sim
        .http
        .post(sim.url(ordinal, "/v1/ops?wait=true"))
        .json(&serde_json::json!({"type": "echo", "payload": ordinal}))
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 200 => r
            .json::<Value>()
            .await
            .is_ok_and(|v| v["status"] == "succeeded"),
        _ => false,
    }
}

/// Three pods started together bootstrap one cluster; ordinal 0 restarted with an empty
/// volume (its claim deleted) while the others run joins them, never a second cluster.
async fn bootstrap_and_ordinal_zero_rejoins_empty(sim: &mut Sim) {
    for o in 0..3 {
        sim.start(o);
    }
    sim.one_cluster(&[0, 1, 2], "3 pods started together").await;
    assert!(echo(sim, 1).await, "the cluster serves");

    let code = sim.stop(0);
    assert_eq!(code, Some(0), "ordinal 0 left cleanly on SIGTERM");
    sim.wipe_volume(0);
    sim.start(0);
    sim.one_cluster(&[0, 1, 2], "ordinal 0 restarted with an empty volume")
        .await;
    assert!(echo(sim, 0).await, "ordinal 0 serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bootstrap_one_cluster_and_ordinal_zero_rejoins_empty() {
    let Some(mut sim) = Sim::new("tests/k8s_sim.rs (short)") else {
        return;
    };
    let t0 = Instant::now();
    bootstrap_and_ordinal_zero_rejoins_empty(&mut sim).await;
    eprintln!("k8s_sim short: {:?}", t0.elapsed());
    if std::env::var_os("OPMESH_SIM_LOGS").is_some() {
        eprintln!("{}", sim.logs());
    }
}

/// Runs `opmesh bench` against pod `target` at a steady rate; answers its JSON report.
fn bench(sim: &Sim, target: u32, ops: u64, rate: u64) -> std::process::Child {
    Command::new(BIN)
        .args(["bench", "--target", &sim.url(target, ""), "--json"])
        .args(["--ops", &ops.to_string(), "--rate", &rate.to_string()])
        .args(["--concurrency", "32", "--warmup", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("opmesh bench runs")
}

fn bench_report(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("bench printed no report: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long (minutes): scripts/k8s-sim runs it"]
async fn a_statefulset_scales_rolls_and_loses_volumes() {
    let Some(mut sim) = Sim::new("tests/k8s_sim.rs (long)") else {
        return;
    };
    bootstrap_and_ordinal_zero_rejoins_empty(&mut sim).await;

    // Scale to 5: the new ordinals join through the seeds.
    sim.start(3);
    sim.start(4);
    sim.one_cluster(&[0, 1, 2, 3, 4], "scaled to 5").await;
    // And back to 3: the highest ordinals get SIGTERM, leave, and are gone.
    for o in [4, 3] {
        assert_eq!(sim.stop(o), Some(0), "ordinal {o} left cleanly");
        sim.delete_namespace(o);
        std::fs::remove_dir_all(sim.volume(o)).unwrap();
    }
    sim.one_cluster(&[0, 1, 2], "scaled back to 3").await;

    // A rolling restart, highest ordinal first, each pod ready before the next, under a
    // steady load on a pod that is not restarting at that moment: no request fails.
    for o in [2, 1, 0] {
        let target = (o + 1) % 3;
        let load = bench(&sim, target, 3_000, 150);
        assert_eq!(sim.stop(o), Some(0), "ordinal {o} stopped cleanly");
        sim.start(o);
        sim.one_cluster(
            &[0, 1, 2],
            &format!("ordinal {o} restarted with its volume"),
        )
        .await;
        let report = bench_report(load);
        assert_eq!(report["errors"], 0, "restarting ordinal {o}: {report}");
    }

    // A pod restarted with an empty volume rejoins as a new member, the quorum intact.
    assert_eq!(sim.stop(2), Some(0));
    sim.wipe_volume(2);
    sim.start(2);
    sim.one_cluster(&[0, 1, 2], "ordinal 2 restarted with an empty volume")
        .await;
    assert!(echo(&sim, 2).await);
}
