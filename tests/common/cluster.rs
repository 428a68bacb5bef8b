//! Clusters of real `opmesh` processes on 127.0.0.1 for the multi-node tests
//! (`tests/cluster.rs`, `tests/delivery.rs`): how a node starts and restarts
//! ([`NodeSpec`], [`Layout`]), what the tests read from it (the cluster view, a route, the
//! leader), and the [`Partition`] proxy that cuts nodes off each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{client, free_port, get_json, try_get_json, wait_until, Server};

pub const SECRET: &str = "a-test-secret-of-enough-length";
/// The admin token of the tests that turn tokens on (nodes without tokens ignore it).
pub const ADMIN_TOKEN: &str = "deployer-secret-0000";
/// The names of the nodes of a three-node test cluster, by index.
pub const NAMES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// The index of `name` in [`NAMES`].
pub fn index_of(name: &str) -> usize {
    NAMES
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("`{name}` is not a test node"))
}

#[derive(Default)]
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub cluster_port: u16,
    pub join: Option<String>,
    pub data_dir: Option<&'a Path>,
    /// The address others dial, when it is not the cluster port (a proxy in front).
    pub advertise: Option<String>,
    /// An API tokens file (`auth.tokens_file`).
    pub tokens: Option<&'a Path>,
    /// A configuration file (`--config`), e.g. with `[[handlers.http]]` webhooks.
    pub config: Option<&'a Path>,
    /// More environment (settings of the test).
    pub env: &'a [(&'a str, &'a str)],
}

pub fn start(spec: &NodeSpec) -> Server {
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
    if let Some(c) = spec.config {
        args.push("--config".into());
        args.push(c.display().to_string());
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

/// How the three nodes of a test cluster start, the same on every start and restart:
/// their cluster ports, the proxies they advertise (when behind a [`Partition`]), their
/// data dirs, a configuration file and more environment.
#[derive(Clone, Default)]
pub struct Layout {
    pub ports: [u16; 3],
    /// The proxy port in front of each node, which it advertises.
    pub proxies: Option<[u16; 3]>,
    pub dirs: Option<[PathBuf; 3]>,
    pub tokens: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Layout {
    /// Three free cluster ports, everything else unset.
    pub fn new() -> Layout {
        Layout {
            ports: [free_port(), free_port(), free_port()],
            ..Layout::default()
        }
    }

    /// The same, with a data dir for each node under `root`.
    pub fn with_dirs(mut self, root: &Path) -> Layout {
        self.dirs = Some(NAMES.map(|n| root.join(n)));
        self
    }

    /// The same, every node behind a proxy of `partition`.
    pub async fn behind(mut self, partition: &Partition) -> Layout {
        let mut proxies = [0; 3];
        for (i, p) in proxies.iter_mut().enumerate() {
            *p = partition.proxy(NAMES[i], self.ports[i]).await;
        }
        self.proxies = Some(proxies);
        self
    }

    pub fn with_config(mut self, config: &Path) -> Layout {
        self.config = Some(config.to_owned());
        self
    }

    pub fn with_env(mut self, env: &[(&str, &str)]) -> Layout {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    /// The cluster address other nodes dial to reach node `i`.
    pub fn address(&self, i: usize) -> String {
        let port = self.proxies.map_or(self.ports[i], |p| p[i]);
        format!("127.0.0.1:{port}")
    }

    /// Starts node `i`, joining through node `seed` when given (a first start, or a
    /// restart without its state), otherwise from what its data dir holds.
    pub fn start(&self, i: usize, seed: Option<usize>) -> Server {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        start(&NodeSpec {
            name: NAMES[i],
            cluster_port: self.ports[i],
            join: seed.map(|s| self.address(s)),
            data_dir: self.dirs.as_ref().map(|d| d[i].as_path()),
            advertise: self.proxies.map(|_| self.address(i)),
            tokens: self.tokens.as_deref(),
            config: self.config.as_deref(),
            env: &env,
        })
    }

    /// Starts node-1 (it bootstraps), then node-2 and node-3 (they join it); waits until
    /// every node sees three up and a leader.
    pub async fn start_three(&self) -> Vec<Server> {
        let servers: Vec<Server> = (0..3)
            .map(|i| self.start(i, (i > 0).then_some(0)))
            .collect();
        for s in &servers {
            wait_until(
                "three nodes up with a leader",
                Duration::from_secs(20),
                || sees_up(s, 3),
            )
            .await;
        }
        servers
    }
}

pub async fn get(s: &Server, path: &str) -> Value {
    get_json(&s.url(path)).await
}

pub async fn try_get(s: &Server, path: &str) -> Option<Value> {
    try_get_json(&s.url(path)).await
}

/// `GET /v1/cluster` on `s` (with the admin token), or `None` within 2 s.
pub async fn cluster_view(s: &Server) -> Option<Value> {
    client()
        .get(s.url("/v1/cluster"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json::<Value>()
        .await
        .ok()
}

/// Whether `s` sees `n` nodes up and a leader.
pub async fn sees_up(s: &Server, n: usize) -> bool {
    let Some(c) = cluster_view(s).await else {
        return false;
    };
    let up = c["nodes"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|x| x["status"] == "up").count());
    up == n && c["leader"].is_string()
}

/// Whether `s` sees `node` with `status` (up, down, leaving).
pub async fn sees_status(s: &Server, node: &str, status: &str) -> bool {
    cluster_view(s).await.is_some_and(|c| {
        c["nodes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["id"] == node && x["status"] == status))
    })
}

/// How many voters `s` sees.
pub async fn voters_seen(s: &Server) -> usize {
    cluster_view(s).await.map_or(0, |c| {
        c["nodes"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x["role"] == "voter").count())
    })
}

pub async fn leader_of(s: &Server) -> Option<String> {
    cluster_view(s).await?["leader"].as_str().map(str::to_owned)
}

/// Starts node-1 (bootstraps) and node-2, node-3 (join it); waits until all see three up.
pub async fn three_nodes(dirs: Option<&[PathBuf; 3]>) -> (Vec<Server>, Vec<u16>) {
    three_nodes_with(dirs, None, &[]).await
}

/// [`three_nodes`], checking the API tokens of `tokens` when given, with more `env`.
pub async fn three_nodes_with(
    dirs: Option<&[PathBuf; 3]>,
    tokens: Option<&Path>,
    env: &[(&str, &str)],
) -> (Vec<Server>, Vec<u16>) {
    let layout = Layout {
        dirs: dirs.cloned(),
        tokens: tokens.map(Path::to_owned),
        ..Layout::new()
    }
    .with_env(env);
    (layout.start_three().await, layout.ports.to_vec())
}

pub async fn set_route(s: &Server, ty: &str, strategy: &str, nodes: &[&str]) -> reqwest::Response {
    client()
        .put(s.url(&format!("/v1/routes/{ty}")))
        .json(&json!({ "strategy": strategy, "nodes": nodes }))
        .send()
        .await
        .unwrap()
}

/// Sets the route of `ty` through `s`, asserting 200, and waits until every node of
/// `all` has it.
pub async fn set_route_everywhere(
    s: &Server,
    all: &[&Server],
    ty: &str,
    strategy: &str,
    nodes: &[&str],
) {
    let r = set_route(s, ty, strategy, nodes).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let want = Some((
        strategy.to_owned(),
        nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
    ));
    for n in all {
        wait_until(
            "the route on every node",
            Duration::from_secs(10),
            || async { route_on(n, ty).await == want },
        )
        .await;
    }
}

pub async fn submit_wait(s: &Server, body: Value) -> (u16, Value) {
    let r = client()
        .post(s.url("/v1/ops?wait=true"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The route of `ty` as `s` sees it: (strategy, nodes).
pub async fn route_on(s: &Server, ty: &str) -> Option<(String, Vec<String>)> {
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

/// What a [`Partition`] cuts.
#[derive(Clone, Debug, Default)]
enum Cut {
    #[default]
    Nothing,
    /// One node, from every other, both ways.
    Isolated(String),
    /// The links between two nodes, both ways; each still reaches the third. The
    /// connections open at the cut swallow what they carry until healed, then close.
    Pair(String, String),
}

/// TCP proxies in front of every node's cluster port (each node advertises its proxy),
/// which can cut one node off both ways, or the two links between two nodes: a
/// connection is dropped when the node it goes to and the node that dialed it (read from
/// its `Hello`) are on two sides of the cut. Cut off, a node's connections close at
/// once; between a pair, they first swallow everything until healed (bytes in flight
/// are lost, as when a network fails without a reset).
#[derive(Clone, Default)]
pub struct Partition {
    cut: Arc<parking_lot::Mutex<Cut>>,
}

impl Partition {
    /// A proxy for `target` (a node's name) at its cluster `port`; returns the proxy's port.
    pub async fn proxy(&self, target: &'static str, port: u16) -> u16 {
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

    /// Whether traffic from `dialer` (unknown before its `Hello`) to `target` is cut.
    fn is_cut(&self, target: &str, dialer: Option<&str>) -> bool {
        match &*self.cut.lock() {
            Cut::Nothing => false,
            Cut::Isolated(i) => i == target || dialer == Some(i.as_str()),
            Cut::Pair(a, b) => {
                dialer.is_some_and(|d| (d == a && target == b) || (d == b && target == a))
            }
        }
    }

    async fn carry(self, mut client: TcpStream, target: &'static str, port: u16) {
        if self.is_cut(target, None) {
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
            while !self.is_cut(target, Some(&dialer)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let cut = tokio::select! {
            _ = tokio::io::copy(&mut cr, &mut sw) => false,
            _ = tokio::io::copy(&mut sr, &mut cw) => false,
            _ = watch => true,
        };
        if cut && matches!(&*self.cut.lock(), Cut::Pair(..)) {
            // A pair cut fails silently first: the link swallows what either side writes
            // (and what was on its way) until healed, then breaks.
            let swallow = async {
                let (mut a, mut b) = ([0u8; 8192], [0u8; 8192]);
                loop {
                    tokio::select! {
                        r = cr.read(&mut a) => if !matches!(r, Ok(n) if n > 0) { return },
                        r = sr.read(&mut b) => if !matches!(r, Ok(n) if n > 0) { return },
                    }
                }
            };
            let healed = async {
                while self.is_cut(target, Some(&dialer)) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                _ = swallow => {}
                _ = healed => {}
            }
        }
    }

    /// Cuts `node` off from every other node (`None`: heals).
    pub fn isolate(&self, node: Option<&str>) {
        *self.cut.lock() = node.map_or(Cut::Nothing, |n| Cut::Isolated(n.to_owned()));
    }

    /// Cuts the links between `a` and `b` only: what they carry is lost until [`heal`].
    ///
    /// [`heal`]: Partition::heal
    pub fn cut_pair(&self, a: &str, b: &str) {
        *self.cut.lock() = Cut::Pair(a.to_owned(), b.to_owned());
    }

    /// Heals whatever was cut.
    pub fn heal(&self) {
        *self.cut.lock() = Cut::Nothing;
    }
}
