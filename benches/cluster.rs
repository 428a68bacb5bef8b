//! Cluster timings on three real `opmesh` processes on loopback, printed as a report:
//!
//! - a route change committed and visible on all three nodes (p50/p99 over many changes);
//! - the leader killed (`kill -9`) → route writes succeed again (several rounds);
//! - the owner of a type killed → operations of that type run elsewhere (several rounds).
//!
//! `cargo bench --bench cluster` (add `-- --rounds N --changes N` to change the counts).
//! Every wait has a deadline; the processes are killed on exit.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_opmesh");
const SECRET: &str = "opmesh-bench-cluster-secret";
const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];

struct Proc {
    child: Child,
    http: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(name: &str, port: u16, join: Option<u16>) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--http-addr", "127.0.0.1:0", "--node-id", name])
        .args([
            "--cluster-addr",
            &format!("127.0.0.1:{port}"),
            "--ephemeral",
        ])
        .env("OPMESH_CLUSTER_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(j) = join {
        cmd.args(["--join", &format!("127.0.0.1:{j}")]);
    }
    let mut child = cmd.spawn().expect("opmesh starts");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("opmesh listening on ") {
                let _ = tx.send(a.to_owned());
            }
        }
    });
    let http = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("listening within 30 s");
    Proc { child, http }
}

fn agent() -> ureq_like::Agent {
    ureq_like::Agent::new()
}

/// A tiny blocking HTTP client on reqwest's async one, so the bench reads top to bottom.
mod ureq_like {
    use serde_json::Value;
    use std::time::Duration;

    pub struct Agent {
        rt: tokio::runtime::Runtime,
        c: reqwest::Client,
    }

    impl Agent {
        pub fn new() -> Self {
            Agent {
                rt: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap(),
                c: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap(),
            }
        }

        pub fn get(&self, url: &str) -> Option<Value> {
            self.rt
                .block_on(async { self.c.get(url).send().await.ok()?.json().await.ok() })
        }

        pub fn send(&self, method: reqwest::Method, url: &str, body: &Value) -> (u16, Value) {
            self.rt.block_on(async {
                match self.c.request(method, url).json(body).send().await {
                    Ok(r) => {
                        let code = r.status().as_u16();
                        (code, r.json().await.unwrap_or(Value::Null))
                    }
                    Err(_) => (0, Value::Null),
                }
            })
        }
    }
}

fn wait(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Cluster {
    procs: Vec<Option<Proc>>,
    ports: Vec<u16>,
}

impl Cluster {
    fn start() -> Cluster {
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let procs = (0..3)
            .map(|i| Some(spawn(NAMES[i], ports[i], (i > 0).then_some(ports[0]))))
            .collect();
        let c = Cluster { procs, ports };
        c.wait_up(3);
        c
    }

    fn http(&self, i: usize) -> &str {
        &self.procs[i].as_ref().unwrap().http
    }

    fn alive(&self) -> impl Iterator<Item = usize> + '_ {
        (0..3).filter(|i| self.procs[*i].is_some())
    }

    fn wait_up(&self, n: usize) {
        let a = agent();
        for i in self.alive() {
            wait("nodes up and voting", Duration::from_secs(30), || {
                a.get(&format!("{}/v1/cluster", self.http(i)))
                    .is_some_and(|c| {
                        c["leader"].is_string()
                            && c["nodes"].as_array().is_some_and(|v| {
                                v.iter().filter(|x| x["status"] == "up").count() == n
                                    && v.iter().filter(|x| x["role"] == "voter").count() == n
                            })
                    })
            });
        }
    }

    fn leader(&self) -> usize {
        let a = agent();
        let i = self.alive().next().unwrap();
        let name = a.get(&format!("{}/v1/cluster", self.http(i))).unwrap()["leader"]
            .as_str()
            .unwrap()
            .to_owned();
        NAMES.iter().position(|n| *n == name).unwrap()
    }

    fn kill(&mut self, i: usize) {
        drop(self.procs[i].take());
    }

    fn restart(&mut self, i: usize) {
        let seed = self.alive().next().unwrap();
        self.procs[i] = Some(spawn(NAMES[i], self.ports[i], Some(self.ports[seed])));
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rounds = arg("--rounds", 3);
    let changes = arg("--changes", 300);
    let a = agent();
    let mut c = Cluster::start();

    // 1. Route change → visible on all three.
    let mut ms = Vec::new();
    for k in 0..changes {
        let writer = k % 3;
        let nodes = [NAMES[(k + 1) % 3]];
        let t = Instant::now();
        let (code, v) = a.send(
            reqwest::Method::PUT,
            &format!("{}/v1/routes/echo", c.http(writer)),
            &json!({"strategy": "pinned", "nodes": nodes}),
        );
        assert_eq!(code, 200, "{v}");
        let version = v["version"].as_u64().unwrap();
        for i in 0..3 {
            wait("route visible", Duration::from_secs(5), || {
                a.get(&format!("{}/v1/routes/echo", c.http(i)))
                    .is_some_and(|r| r["version"].as_u64().unwrap_or(0) >= version)
            });
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (p50, p99, max) = (pct(&mut ms, 0.5), pct(&mut ms, 0.99), pct(&mut ms, 1.0));
    println!("route change visible on all 3 nodes: {changes} changes, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (target p99 < 10 ms)");

    // 2. Leader killed → route writes succeed again.
    let mut leader_ms = Vec::new();
    for _ in 0..rounds {
        let l = c.leader();
        let other = (l + 1) % 3;
        c.kill(l);
        let t = Instant::now();
        wait(
            "a route write after the leader died",
            Duration::from_secs(30),
            || {
                a.send(
                    reqwest::Method::PUT,
                    &format!("{}/v1/routes/sleep", c.http(other)),
                    &json!({"strategy": "round_robin"}),
                )
                .0 == 200
            },
        );
        leader_ms.push(t.elapsed().as_secs_f64() * 1e3);
        c.restart(l);
        c.wait_up(3);
    }
    println!(
        "leader killed -> route writes succeed again: {:?} ms (target < 1000 ms)",
        leader_ms
            .iter()
            .map(|v| v.round() as u64)
            .collect::<Vec<_>>()
    );

    // 3. Owner killed → its type served elsewhere.
    let mut owner_ms = Vec::new();
    let mut owner_led = Vec::new();
    for r in 0..rounds {
        let owner = (r % 2) + 1; // node-2 or node-3; submissions go to node-1
        let backup = if owner == 1 { 2 } else { 1 };
        let (code, v) = a.send(
            reqwest::Method::PUT,
            &format!("{}/v1/routes/echo", c.http(0)),
            &json!({"strategy": "pinned", "nodes": [NAMES[owner], NAMES[backup]]}),
        );
        assert_eq!(code, 200, "{v}");
        wait("the owner runs echo", Duration::from_secs(10), || {
            a.send(
                reqwest::Method::POST,
                &format!("{}/v1/ops?wait=true", c.http(0)),
                &json!({"type": "echo", "payload": 1}),
            )
            .1["executed_by"]
                == NAMES[owner]
        });
        owner_led.push(c.leader() == owner);
        c.kill(owner);
        let t = Instant::now();
        wait("echo served by the backup", Duration::from_secs(30), || {
            a.send(
                reqwest::Method::POST,
                &format!("{}/v1/ops?wait=true", c.http(0)),
                &json!({"type": "echo", "payload": 1, "deadline_ms": 5000}),
            )
            .1["executed_by"]
                == NAMES[backup]
        });
        owner_ms.push(t.elapsed().as_secs_f64() * 1e3);
        c.restart(owner);
        c.wait_up(3);
    }
    println!(
        "owner killed -> its type served elsewhere: {:?} ms (target < 2000 ms)",
        owner_ms
            .iter()
            .map(|v| v.round() as u64)
            .collect::<Vec<_>>()
    );
}
