//! Helpers shared by the integration tests: start the real `opmesh` binary on a free
//! loopback port, talk to it, and wait on conditions with deadlines.

#![allow(dead_code)]

pub mod cluster;
pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

/// The `opmesh` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_opmesh");

/// A running `opmesh serve` process, killed when dropped.
pub struct Server {
    pub base: String,
    /// The cluster port, when the node runs with one.
    pub cluster_addr: Option<String>,
    pub child: Child,
}

impl Server {
    /// Starts `opmesh serve --http-addr 127.0.0.1:0 <args>` with `env` and waits for it to
    /// listen.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--http-addr", "127.0.0.1:0"])
            .args(args)
            // As the binary's default filter: without openraft's replication errors, which
            // it logs twice a second for each unreachable peer.
            .env("RUST_LOG", "warn,openraft=error,openraft::replication=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the opmesh binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut cluster = None;
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("opmesh cluster port ") {
                    cluster = Some(addr.to_owned());
                }
                if let Some(addr) = line.strip_prefix("opmesh listening on ") {
                    let _ = tx.send((addr.to_owned(), cluster.take()));
                }
            }
        });
        let (base, cluster_addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("opmesh printed its listening address within 30 s");
        Server {
            base,
            cluster_addr,
            child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "TERM", "INT") to the server process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} succeeded");
    }

    /// Waits for the process to exit, up to `deadline`; returns its exit code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait works") {
                return status.code();
            }
            assert!(
                Instant::now() < until,
                "opmesh did not exit within {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

/// GETs `url` and reads its JSON answer.
pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The whole seconds an answer's `Retry-After` header says to wait.
pub fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// GETs `url` and reads its answer as text (`/metrics`, say).
pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GETs `url` and reads its JSON answer; `None` if there is none within 2 s (a node
/// starting or stopping).
pub async fn try_get_json(url: &str) -> Option<serde_json::Value> {
    client()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// A free loopback port (bound, then released; the node binds it right after), below
/// the kernel's range for outgoing connections (32768-60999 on Linux): a port the kernel
/// hands out for binding to 0 comes from that range, and an outgoing connection of a
/// test running beside this one could take it before the node binds it (CI saw a node
/// fail so, "Address already in use"). Picks in this process never repeat until the
/// 12,768 ports below that range are used up.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Test binaries of one run start apart: the process id spreads their picks.
    let start = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port from {FIRST} to 32767");
}

/// Runs an operation with `POST {base}/v1/ops?wait=true`; asserts 200 and answers the
/// outcome.
pub async fn run_op(base: &str, body: &serde_json::Value) -> serde_json::Value {
    let r = client()
        .post(format!("{base}/v1/ops?wait=true"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Waits until `cond` returns true, failing after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the CLI with `args`; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn,openraft=error")
        .output()
        .expect("the opmesh binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether an operation's answer is final: succeeded, failed or expired.
pub fn is_terminal(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("succeeded" | "failed" | "expired")
    )
}

/// GETs every URL of `reads` (16 at a time, 2 s each); answers each item with the JSON
/// answer, `None` when there was none.
pub async fn read_all<T>(reads: Vec<(String, T)>) -> Vec<(T, Option<Value>)> {
    futures::stream::iter(reads)
        .map(|(url, item)| async move {
            let r = client()
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let v = match r {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            };
            (item, v)
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Reads `GET /v1/ops/{id}` on `s` for every id until each is terminal or `within` has
/// passed; answers the last answer of each (absent: never readable).
pub async fn follow_ops(s: &Server, ids: &[String], within: Duration) -> HashMap<String, Value> {
    let until = Instant::now() + within;
    let mut last: HashMap<String, Value> = HashMap::new();
    let mut pending: Vec<String> = ids.to_vec();
    while !pending.is_empty() {
        let reads = pending
            .drain(..)
            .map(|id| (s.url(&format!("/v1/ops/{id}")), id))
            .collect();
        for (id, v) in read_all(reads).await {
            let done = v.as_ref().is_some_and(is_terminal);
            if let Some(v) = v {
                last.insert(id.clone(), v);
            }
            if !done {
                pending.push(id);
            }
        }
        if pending.is_empty() || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}
