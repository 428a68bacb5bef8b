//! A cluster of real `opmesh` processes on 127.0.0.1: routes replicated by Raft,
//! operations run on their owner, and the faults a cluster must survive: the owner killed
//! under load, the leader killed, a node restarted with its data dir, a node cut off by a
//! proxy that drops its traffic, garbage on the cluster port, a node leaving.
//!
//! Every wait is on a condition with a deadline.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, free_port, get_json, try_get_json, wait_until, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "a-test-secret-of-enough-length";
/// The admin token of the tests that turn tokens on (nodes without tokens ignore it).
const ADMIN_TOKEN: &str = "deployer-secret-0000";

struct NodeSpec<'a> {
    name: &'a str,
    cluster_port: u16,
    join: Option<String>,
    data_dir: Option<&'a std::path::Path>,
    /// The address others dial, when it is not the cluster port (a proxy in front).
    advertise: Option<String>,
    /// An API tokens file (`auth.tokens_file`).
    tokens: Option<&'a std::path::Path>,
    /// More environment (settings of the test).
    env: &'a [(&'a str, &'a str)],
}

fn start(spec: &NodeSpec) -> Server {
    let addr = format!("127.0.0.1:{}", spec.cluster_port);
    let mut args = vec![
        "--node-id".to_string(),
        spec.name.to_string(),
        "--cluster-addr".into(),
        addr,
    ];
    if let Some(j) = &spec.join {
        args.push("--join".into());
        args.push(j.clone());
    }
    match spec.data_dir {
        Some(d) => {
            args.push("--data-dir".into());
            args.push(d.display().to_string());
        }
        // In memory: the test accepts what a voter without its log risks.
        None => args.push("--ephemeral".into()),
    }
    let mut env = vec![("OPMESH_CLUSTER_SECRET", SECRET.to_string())];
    if let Some(a) = &spec.advertise {
        env.push(("OPMESH_CLUSTER__ADVERTISE", a.clone()));
    }
    if let Some(t) = spec.tokens {
        env.push(("OPMESH_AUTH__TOKENS_FILE", t.display().to_string()));
    }
    for (k, v) in spec.env {
        env.push((k, v.to_string()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(&args, &env)
}

async fn get(s: &Server, path: &str) -> Value {
    get_json(&s.url(path)).await
}

async fn try_get(s: &Server, path: &str) -> Option<Value> {
    try_get_json(&s.url(path)).await
}

/// Whether `s` sees `n` nodes up and a leader.
async fn sees_up(s: &Server, n: usize) -> bool {
    let c = client()
        .get(s.url("/v1/cluster"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    let Some(c) = (match c {
        Ok(r) => r.json::<Value>().await.ok(),
        Err(_) => None,
    }) else {
        return false;
    };
    let up = c["nodes"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|x| x["status"] == "up").count());
    up == n && c["leader"].is_string()
}

async fn leader_of(s: &Server) -> Option<String> {
    try_get(s, "/v1/cluster").await?["leader"]
        .as_str()
        .map(str::to_owned)
}

/// Starts node-1 (bootstraps) and node-2, node-3 (join it); waits until all see three up.
async fn three_nodes(dirs: Option<&[std::path::PathBuf; 3]>) -> (Vec<Server>, Vec<u16>) {
    three_nodes_with(dirs, None, &[]).await
}

/// [`three_nodes`], checking the API tokens of `tokens` when given, with more `env`.
async fn three_nodes_with(
    dirs: Option<&[std::path::PathBuf; 3]>,
    tokens: Option<&std::path::Path>,
    env: &[(&str, &str)],
) -> (Vec<Server>, Vec<u16>) {
    let ports = [free_port(), free_port(), free_port()];
    let seed = format!("127.0.0.1:{}", ports[0]);
    let mut servers = Vec::new();
    for (i, name) in ["node-1", "node-2", "node-3"].iter().enumerate() {
        servers.push(start(&NodeSpec {
            name,
            cluster_port: ports[i],
            join: (i > 0).then(|| seed.clone()),
            data_dir: dirs.map(|d| d[i].as_path()),
            advertise: None,
            tokens,
            env,
        }));
    }
    for s in &servers {
        wait_until(
            "three nodes up with a leader",
            Duration::from_secs(20),
            || sees_up(s, 3),
        )
        .await;
    }
    (servers, ports.to_vec())
}

async fn set_route(s: &Server, ty: &str, strategy: &str, nodes: &[&str]) -> reqwest::Response {
    client()
        .put(s.url(&format!("/v1/routes/{ty}")))
        .json(&json!({ "strategy": strategy, "nodes": nodes }))
        .send()
        .await
        .unwrap()
}

async fn submit_wait(s: &Server, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url("/v1/ops?wait=true"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The route of `ty` as `s` sees it: (strategy, nodes, version).
async fn route_on(s: &Server, ty: &str) -> Option<(String, Vec<String>)> {
    let v = try_get(s, &format!("/v1/routes/{ty}")).await?;
    let r = v.get("route")?;
    Some((
        r["strategy"].as_str()?.to_owned(),
        r["nodes"]
            .as_array()?
            .iter()
            .filter_map(|n| n.as_str().map(str::to_owned))
            .collect(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_set_on_one_node_is_seen_by_all_and_operations_run_on_the_owner() {
    let (s, _) = three_nodes(None).await;
    let c = get(&s[0], "/v1/cluster").await;
    let roles: Vec<&str> = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == "voter").count(), 3, "{c}");
    assert!(c["term"].as_u64().unwrap() >= 1);
    assert!(c["last_applied_index"].as_u64().is_some());

    // Written on node-3 (a follower or the leader: either way it reaches the leader).
    let r = set_route(&s[2], "echo", "pinned", &["node-2"]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    for n in &s {
        wait_until(
            "the route on every node",
            Duration::from_secs(5),
            || async {
                route_on(n, "echo").await == Some(("pinned".into(), vec!["node-2".into()]))
            },
        )
        .await;
    }
    // Submitted to node-1, run by node-2.
    for _ in 0..20 {
        let (code, v) = submit_wait(&s[0], json!({"type": "echo", "payload": {"x": 1}})).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["executed_by"], "node-2", "{v}");
        assert_eq!(v["result"], json!({"x": 1}));
    }
    // A batch too.
    let r = client()
        .post(s[2].url("/v1/ops/batch?wait=true"))
        .json(&json!({"ops": (0..100).map(|i| json!({"type": "echo", "payload": i})).collect::<Vec<_>>()}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["executed_by"], "node-2", "{r}");
        assert_eq!(r["result"], json!(i));
    }
    // The CLI against any node.
    let (code, out, err) = common::cli(&["cluster", "status", "--target", &s[1].base]);
    assert_eq!(code, 0, "{err}");
    for n in ["node-1", "node-2", "node-3"] {
        assert!(out.contains(n), "{out}");
    }
    assert!(out.starts_with("leader node-"), "{out}");
    let (code, out, _) = common::cli(&["routes", "list", "--target", &s[2].base]);
    assert_eq!(code, 0);
    assert!(out.contains("echo") && out.contains("node-2"), "{out}");
    let (code, _, err) = common::cli(&["cluster", "join", "127.0.0.1:1", "--target", &s[0].base]);
    assert_ne!(code, 0);
    assert!(err.contains("already_member"), "{err}");
    // A route naming an unknown node is refused, naming it.
    let r = set_route(&s[0], "echo", "pinned", &["node-9"]).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("node-9"));
    // An idempotency key has one owner in the cluster whatever the strategy: repeats sent
    // to any node, round robin over two owners, are answered by the first run.
    let r = set_route(&s[0], "echo", "round_robin", &["node-2", "node-3"]).await;
    assert_eq!(r.status(), 200);
    for n in &s {
        wait_until(
            "the round robin route everywhere",
            Duration::from_secs(5),
            || async {
                route_on(n, "echo")
                    .await
                    .is_some_and(|(strategy, _)| strategy == "round_robin")
            },
        )
        .await;
    }
    let mut ran_on = std::collections::BTreeSet::new();
    let mut first_id = None;
    for i in 0..12 {
        let body = json!({"type": "echo", "payload": {"order": 7}, "idempotency_key": "order-7"});
        let (code, v) = submit_wait(&s[i % 3], body).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "succeeded", "{v}");
        ran_on.insert(v["executed_by"].as_str().unwrap().to_owned());
        match &first_id {
            None => {
                assert_eq!(v["cached"], false, "{v}");
                first_id = Some(v["id"].clone());
            }
            Some(_) => {
                // The first run's result is stored when its completion reaches the cache,
                // just after its answer: a repeat joins or reads it, never runs again.
                assert_eq!(v["cached"], true, "run again: {v}");
            }
        }
    }
    assert_eq!(ran_on.len(), 1, "one owner for the key: {ran_on:?}");
}

/// Every node answers the same audit trail: who changed which route (the token's name)
/// and which node joined (the node itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_set_with_a_token_shows_its_name_in_every_nodes_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"deployer\"\nsecret = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n\n\
             [[token]]\nname = \"app\"\nsecret = \"app-secret-000000000\"\nscopes = [\"submit\"]\n"
        ),
    )
    .unwrap();
    let (s, _) = three_nodes_with(None, Some(&tokens), &[]).await;
    let r = client()
        .put(s[2].url("/v1/routes/echo"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"strategy": "pinned", "nodes": ["node-2"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let audit = |n: &Server| {
        let url = n.url("/v1/audit?limit=50");
        async move {
            let r = client()
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["entries"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    for n in &s {
        wait_until(
            "the route change in the node's audit trail",
            Duration::from_secs(5),
            || async {
                audit(n).await.first().is_some_and(|e| {
                    e["by"] == "deployer"
                        && e["action"] == "route.set"
                        && e["subject"] == "echo"
                        && e["detail"] == "pinned [node-2]"
                })
            },
        )
        .await;
        let entries = audit(n).await;
        for joined in ["node-2", "node-3"] {
            assert!(
                entries.iter().any(|e| e["action"] == "node.joined"
                    && e["subject"] == joined
                    && e["by"] == format!("node:{joined}")),
                "{joined} joined, by itself: {entries:?}"
            );
        }
        // Newest first, versions going down, times set.
        let versions: Vec<u64> = entries
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert!(versions.windows(2).all(|w| w[0] > w[1]), "{versions:?}");
        assert!(entries
            .iter()
            .all(|e| e["at_ms"].as_u64().unwrap() > 1_600_000_000_000));
    }
    // Only an admin reads it; the CLI prints it.
    let r = client()
        .get(s[0].url("/v1/audit"))
        .bearer_auth("app-secret-000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (code, out, err) = common::cli(&["audit", "--target", &s[1].base, "--token", ADMIN_TOKEN]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("deployer") && first.contains("route.set") && first.contains("echo"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_under_load_moves_its_types_and_every_request_completes() {
    let (mut s, _) = three_nodes(None).await;
    let r = set_route(&s[0], "sleep", "pinned", &["node-2", "node-3"]).await;
    assert_eq!(r.status(), 200);
    for n in &s {
        wait_until("the route everywhere", Duration::from_secs(5), || async {
            route_on(n, "sleep").await.is_some()
        })
        .await;
    }
    // Load from node-1: operations that take a while on the owner.
    let base = s[0].base.clone();
    let mut load = Vec::new();
    for i in 0..200 {
        let url = format!("{base}/v1/ops?wait=true");
        load.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .json(&json!({"type": "sleep", "payload": {"ms": 300 + i % 200}}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    // Once node-2 runs some of them, kill it.
    wait_until(
        "node-2 running operations",
        Duration::from_secs(10),
        || async {
            try_get(&s[1], "/v1/metrics")
                .await
                .is_some_and(|m| m["activeOperations"].as_u64().unwrap_or(0) > 0)
        },
    )
    .await;
    let killed = Instant::now();
    s[1].signal("KILL");
    s[1].wait_exit(Duration::from_secs(5));

    let mut by_node = std::collections::BTreeMap::<String, usize>::new();
    for h in load {
        let (code, v) = h.await.unwrap();
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["status"], "succeeded",
            "every waiting request completes: {v}"
        );
        *by_node
            .entry(v["executed_by"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        by_node.get("node-3").copied().unwrap_or(0) > 0,
        "{by_node:?}"
    );
    // node-2 is marked down everywhere, and new work goes to node-3.
    for n in [&s[0], &s[2]] {
        wait_until("node-2 marked down", Duration::from_secs(5), || async {
            try_get(n, "/v1/cluster").await.is_some_and(|c| {
                c["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["id"] == "node-2" && x["status"] == "down")
            })
        })
        .await;
    }
    let (code, v) = submit_wait(&s[0], json!({"type": "sleep", "payload": {"ms": 1}})).await;
    assert_eq!((code, v["executed_by"].as_str()), (200, Some("node-3")));
    eprintln!(
        "owner killed: all 200 requests done {:?} after the kill",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_route_writes_work_again() {
    let (mut s, _) = three_nodes(None).await;
    let leader = leader_of(&s[0]).await.unwrap();
    let idx = ["node-1", "node-2", "node-3"]
        .iter()
        .position(|n| *n == leader)
        .unwrap();
    s[idx].signal("KILL");
    s[idx].wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let other = if idx == 0 { 1 } else { 0 };
    wait_until(
        "a route write succeeds",
        Duration::from_secs(10),
        || async {
            set_route(&s[other], "echo", "round_robin", &[])
                .await
                .status()
                == 200
        },
    )
    .await;
    let took = killed.elapsed();
    let new_leader = leader_of(&s[other]).await.unwrap();
    assert_ne!(new_leader, leader);
    eprintln!("leader killed: route writes work again after {took:?}");
}

/// SIGTERM always ends a node, in bounded time, whatever is left of its cluster: each
/// cluster step of the hand-off gives up after `cluster.leave_timeout_ms`, the drain
/// after the grace period (what a StatefulSet's deletion and a lost quorum do together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_node_in_bounded_time_even_without_a_quorum() {
    const LEAVE_MS: u64 = 1000;
    const GRACE_S: u64 = 2;
    let env = [
        ("OPMESH_CLUSTER__LEAVE_TIMEOUT_MS", "1000"),
        ("OPMESH_SHUTDOWN__GRACE_SECS", "2"),
    ];
    // Two cluster steps, the drain, and 5 s for the process to start and stop.
    let bound = Duration::from_millis(2 * LEAVE_MS) + Duration::from_secs(GRACE_S + 5);
    let exit_code = |code: Option<i32>| code.expect("exited, not killed by a signal");

    // One of three killed, SIGTERM to the other two together.
    let (mut s, _) = three_nodes_with(None, None, &env).await;
    s[2].signal("KILL");
    s[2].wait_exit(Duration::from_secs(5));
    let t = Instant::now();
    s[0].signal("TERM");
    s[1].signal("TERM");
    for n in &mut s[..2] {
        let code = exit_code(n.wait_exit(bound));
        assert!(code == 0 || code == 1, "exit code {code}");
    }
    eprintln!("two of three stopped together in {:?}", t.elapsed());

    // A leader whose followers are both gone: it cannot mark itself leaving nor be
    // removed, says so and exits 1, within the bound.
    let (mut s, _) = three_nodes_with(None, None, &env).await;
    let leader = leader_of(&s[0]).await.unwrap();
    let idx = ["node-1", "node-2", "node-3"]
        .iter()
        .position(|n| *n == leader)
        .unwrap();
    for (i, n) in s.iter_mut().enumerate() {
        if i != idx {
            n.signal("KILL");
            n.wait_exit(Duration::from_secs(5));
        }
    }
    let t = Instant::now();
    s[idx].signal("TERM");
    assert_eq!(
        exit_code(s[idx].wait_exit(bound)),
        1,
        "a hand-off cut short exits 1"
    );
    eprintln!("a leader without quorum stopped in {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_data_dir_rejoins_with_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [
        tmp.path().join("n1"),
        tmp.path().join("n2"),
        tmp.path().join("n3"),
    ];
    let (mut s, ports) = three_nodes(Some(&dirs)).await;
    assert_eq!(
        set_route(&s[0], "echo", "pinned", &["node-1"])
            .await
            .status(),
        200
    );
    wait_until(
        "node-3 has the first route",
        Duration::from_secs(5),
        || async { route_on(&s[2], "echo").await.is_some() },
    )
    .await;
    s[2].signal("KILL");
    s[2].wait_exit(Duration::from_secs(5));
    // A change while it is away.
    assert_eq!(
        set_route(&s[0], "sleep", "round_robin", &[]).await.status(),
        200
    );
    let back = start(&NodeSpec {
        name: "node-3",
        cluster_port: ports[2],
        join: None,
        data_dir: Some(&dirs[2]),
        advertise: None,
        tokens: None,
        env: &[],
    });
    wait_until(
        "node-3 has the route set while it was away",
        Duration::from_secs(10),
        || async {
            route_on(&back, "sleep").await.is_some() && route_on(&back, "echo").await.is_some()
        },
    )
    .await;
    for n in [&s[0], &s[1], &back] {
        wait_until("three up again", Duration::from_secs(10), || sees_up(n, 3)).await;
    }
}

/// TCP proxies in front of every node's cluster port (each node advertises its proxy),
/// which can cut one node off both ways: a connection is dropped when the node it goes
/// to, or the node that dialed it (read from its `Hello`), is the isolated one.
#[derive(Clone, Default)]
struct Partition {
    isolated: Arc<parking_lot::Mutex<Option<String>>>,
}

impl Partition {
    /// A proxy for `target` (a node's name) at its cluster `port`; returns the proxy's port.
    async fn proxy(&self, target: &'static str, port: u16) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_port = listener.local_addr().unwrap().port();
        let this = self.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(this.clone().carry(client, target, port));
            }
        });
        proxy_port
    }

    fn cut(&self, a: &str, b: Option<&str>) -> bool {
        let g = self.isolated.lock();
        g.as_deref().is_some_and(|i| i == a || Some(i) == b)
    }

    async fn carry(self, mut client: TcpStream, target: &'static str, port: u16) {
        if self.cut(target, None) {
            return;
        }
        let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)).await else {
            return;
        };
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        // The node's challenge goes to the dialer; the dialer's first frame is its Hello.
        let handshake = async {
            let mut prefix = [0u8; 4];
            cr.read_exact(&mut prefix).await.ok()?;
            let len = u32::from_le_bytes(prefix) as usize;
            if len > 65_536 {
                return None;
            }
            let mut body = vec![0u8; len];
            cr.read_exact(&mut body).await.ok()?;
            let dialer = match opmesh::cluster::codec::decode(&body) {
                Ok(opmesh::cluster::codec::Frame::Hello(h)) => h.node,
                _ => return None,
            };
            sw.write_all(&prefix).await.ok()?;
            sw.write_all(&body).await.ok()?;
            Some(dialer)
        };
        let dialer = tokio::select! {
            d = handshake => d,
            _ = tokio::io::copy(&mut sr, &mut cw) => None,
        };
        let Some(dialer) = dialer else { return };
        let watch = async {
            while !self.cut(target, Some(&dialer)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            _ = tokio::io::copy(&mut cr, &mut sw) => {}
            _ = tokio::io::copy(&mut sr, &mut cw) => {}
            _ = watch => {}
        }
    }

    fn isolate(&self, node: Option<&str>) {
        *self.isolated.lock() = node.map(str::to_owned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_node_cannot_change_routes_the_majority_goes_on_and_it_heals() {
    // Every node is reached through a proxy that the test can cut.
    let names = ["node-1", "node-2", "node-3"];
    let ports = [free_port(), free_port(), free_port()];
    let partition = Partition::default();
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(partition.proxy(names[i], ports[i]).await);
    }
    let seed = format!("127.0.0.1:{}", proxies[0]);
    let s: Vec<Server> = (0..3)
        .map(|i| {
            start(&NodeSpec {
                name: names[i],
                cluster_port: ports[i],
                join: (i > 0).then(|| seed.clone()),
                data_dir: None,
                advertise: Some(format!("127.0.0.1:{}", proxies[i])),
                tokens: None,
                env: &[],
            })
        })
        .collect();
    for n in &s {
        wait_until("three up", Duration::from_secs(20), || sees_up(n, 3)).await;
    }
    partition.isolate(Some("node-3"));
    // The majority marks node-3 down and keeps changing routes.
    for n in &s[..2] {
        wait_until(
            "node-3 down on the majority",
            Duration::from_secs(10),
            || async {
                try_get(n, "/v1/cluster").await.is_some_and(|c| {
                    c["nodes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["id"] == "node-3" && x["status"] == "down")
                })
            },
        )
        .await;
    }
    wait_until(
        "a write on the majority",
        Duration::from_secs(10),
        || async {
            set_route(&s[0], "echo", "pinned", &["node-2"])
                .await
                .status()
                == 200
        },
    )
    .await;
    let (code, v) = submit_wait(&s[1], json!({"type": "echo", "payload": 7})).await;
    assert_eq!((code, v["result"].clone()), (200, json!(7)));
    // The minority refuses, with a clear error and without hanging.
    let t = Instant::now();
    let r = set_route(&s[2], "sleep", "round_robin", &[]).await;
    let took = t.elapsed();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_quorum", "{body}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Healed: node-3 catches up by itself and is up again.
    partition.isolate(None);
    wait_until(
        "node-3 has the majority's route",
        Duration::from_secs(15),
        || async {
            route_on(&s[2], "echo").await == Some(("pinned".into(), vec!["node-2".into()]))
        },
    )
    .await;
    for n in &s {
        wait_until("three up again", Duration::from_secs(15), || sees_up(n, 3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_secrets_on_the_cluster_port_are_refused_and_a_node_leaves_cleanly() {
    let (mut s, ports) = three_nodes(None).await;
    // Garbage, an oversized length prefix, and a node with the wrong secret.
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        u32::MAX.to_be_bytes().to_vec(),
    ] {
        let mut c = TcpStream::connect(("127.0.0.1", ports[0])).await.unwrap();
        let _ = c.write_all(&bytes).await;
    }
    let wrong = common::Server::start(
        &[
            "--node-id",
            "intruder",
            "--cluster-addr",
            "127.0.0.1:0",
            "--ephemeral",
            "--join",
            &format!("127.0.0.1:{}", ports[0]),
        ],
        &[("OPMESH_CLUSTER_SECRET", "another-secret-of-enough-length")],
    );
    // The cluster still works and never admits the intruder.
    assert_eq!(
        set_route(&s[0], "echo", "round_robin", &[]).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = get(&s[0], "/v1/cluster").await;
    assert!(!c.to_string().contains("intruder"), "{c}");
    let ready = client().get(wrong.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "a node that could not join is not ready"
    );

    // node-3 leaves: it exits, and the others no longer list it.
    let r = client()
        .post(s[2].url("/v1/cluster/leave"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(s[2].wait_exit(Duration::from_secs(20)), Some(0));
    for n in &s[..2] {
        wait_until("two nodes left", Duration::from_secs(10), || async {
            try_get(n, "/v1/cluster")
                .await
                .is_some_and(|c| c["nodes"].as_array().unwrap().len() == 2)
        })
        .await;
    }
    let (code, _) = submit_wait(&s[0], json!({"type": "echo", "payload": 1})).await;
    assert_eq!(code, 200);

    // SIGTERM hands off and leaves the same way.
    s[1].signal("TERM");
    assert_eq!(s[1].wait_exit(Duration::from_secs(20)), Some(0));
    wait_until("one node left", Duration::from_secs(10), || async {
        try_get(&s[0], "/v1/cluster")
            .await
            .is_some_and(|c| c["nodes"].as_array().unwrap().len() == 1)
    })
    .await;
    let (code, v) = submit_wait(&s[0], json!({"type": "echo", "payload": 2})).await;
    assert_eq!((code, v["executed_by"].as_str()), (200, Some("node-1")));
}

/// Soak: load runs from node-1 while node-2 and node-3 are killed (`kill -9`) and
/// restarted in turn, `OPMESH_SOAK_ROUNDS` times (default 10). Every request must succeed.
/// Run by `scripts/soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/soak"]
async fn soak_owners_killed_and_restarted_under_load() {
    let rounds: usize = std::env::var("OPMESH_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (mut s, ports) = three_nodes(None).await;
    let seed = format!("127.0.0.1:{}", ports[0]);
    let stop = Arc::new(parking_lot::Mutex::new(false));
    let mut load = Vec::new();
    for w in 0..32 {
        let base = s[0].base.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !*stop.lock() {
                let r = client()
                    .post(format!("{base}/v1/ops?wait=true"))
                    .json(&json!({"type": "sleep", "payload": {"ms": 20}, "key": format!("w{w}-{done}")}))
                    .send()
                    .await
                    .unwrap();
                let code = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                assert_eq!((code, &v["status"]), (200, &json!("succeeded")), "{v}");
                done += 1;
            }
            done
        }));
    }
    for round in 0..rounds {
        let i = 1 + round % 2;
        s[i].signal("KILL");
        s[i].wait_exit(Duration::from_secs(5));
        wait_until(
            "the victim marked down",
            Duration::from_secs(10),
            || async {
                try_get(&s[0], "/v1/cluster").await.is_some_and(|c| {
                    c["nodes"].as_array().unwrap().iter().any(|x| {
                        x["id"] == ["node-1", "node-2", "node-3"][i] && x["status"] == "down"
                    })
                })
            },
        )
        .await;
        s[i] = start(&NodeSpec {
            name: ["node-1", "node-2", "node-3"][i],
            cluster_port: ports[i],
            join: Some(seed.clone()),
            data_dir: None,
            advertise: None,
            tokens: None,
            env: &[],
        });
        for n in &s {
            wait_until(
                "three up and voting again",
                Duration::from_secs(20),
                || async {
                    sees_up(n, 3).await
                        && try_get(n, "/v1/cluster").await.is_some_and(|c| {
                            c["nodes"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .filter(|x| x["role"] == "voter")
                                .count()
                                == 3
                        })
                },
            )
            .await;
        }
        eprintln!("soak round {} of {rounds} done", round + 1);
    }
    *stop.lock() = true;
    let mut total = 0;
    for h in load {
        total += h.await.unwrap();
    }
    eprintln!("soak: {total} operations, all succeeded, over {rounds} kills");
    assert!(total > 0);
}
