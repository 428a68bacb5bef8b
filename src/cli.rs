//! The command line: `opmesh serve`, `submit`, `get`, `routes`, `health`, `metrics` and
//! `bench`. Client commands talk to a running node over HTTP or https (`--target`,
//! default the local node; `--cacert` adds the CA of a node's certificate to the
//! system's roots); every read command has `--json` for the server's answer as is.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::bench::BenchArgs;
use crate::config::Secret;
use crate::tls;

#[derive(Parser, Debug)]
#[command(
    name = "opmesh",
    version,
    about = "An actor-based cluster runtime for operations"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: the engine, the HTTP api and the dashboard.
    Serve(ServeArgs),
    /// Submit one operation to a running node.
    Submit(SubmitArgs),
    /// Show an operation's status and result.
    Get(GetArgs),
    /// List, show, set or delete routes.
    #[command(subcommand)]
    Routes(RoutesCmd),
    /// Show the cluster, join a node to one, or make a node leave.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Show a node's health.
    Health(ReadArgs),
    /// Show a node's metrics.
    Metrics(ReadArgs),
    /// Show who changed which route or member, and when (newest first; needs an admin
    /// token when the node checks tokens).
    Audit(AuditArgs),
    /// Generate load and report throughput and latency.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of the HTTP api and dashboard [default: 127.0.0.1:7070]
    #[arg(long)]
    pub http_addr: Option<String>,
    /// This node's id [default: node-1]
    #[arg(long)]
    pub node_id: Option<String>,
    /// A workload profile: read-heavy, write-heavy, streaming, low-latency, throughput
    #[arg(long, env = "OPMESH_PROFILE")]
    pub profile: Option<String>,
    /// A TOML file layered over the defaults and the profile
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Where this node listens for other nodes, IP:port [default: none, a single node]
    #[arg(long, value_name = "ADDR")]
    pub cluster_addr: Option<String>,
    /// A cluster node to join, host:port; repeat it or separate with commas [default:
    /// none, bootstrap a new cluster]
    #[arg(long, value_name = "ADDR", value_delimiter = ',')]
    pub join: Vec<String>,
    /// The secret every node of the cluster shares, at least 16 bytes. Other users can
    /// see flags in the process list: prefer OPMESH_CLUSTER_SECRET
    #[arg(long, value_name = "SECRET")]
    pub cluster_secret: Option<Secret>,
    /// Where the Raft log, vote and snapshots live [default: in memory]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Export every operation's trace over OTLP to this receiver, such as
    /// http://127.0.0.1:4317 (Jaeger) [default: not exported]
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Take this node's id, cluster address and seeds from its StatefulSet pod
    /// (POD_NAME, POD_NAMESPACE, cluster.service): cluster.bootstrap = "ordinal"
    #[arg(long)]
    pub bootstrap_from_ordinal: bool,
    /// In a cluster, run without a data dir (in memory), accepting that a voter that
    /// restarts empty can lose a committed change: cluster.ephemeral = true
    #[arg(long)]
    pub ephemeral: bool,
    /// Serve https with this PEM certificate chain (with --tls-key); reloaded when the
    /// file changes [default: plain http]
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert's certificate
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Check the configuration (defaults, profile, file, environment and these flags),
    /// print what the node would run as, and exit: 0 when it is valid, 2 otherwise
    #[arg(long)]
    pub check_config: bool,
}

impl ServeArgs {
    /// What these flags contribute to the configuration (see [`crate::config::load`]).
    pub fn load_options(self) -> crate::config::LoadOptions {
        crate::config::LoadOptions {
            profile: self.profile,
            config_file: self.config,
            http_addr: self.http_addr,
            node_id: self.node_id,
            cluster_addr: self.cluster_addr,
            join: self.join,
            cluster_secret: self.cluster_secret,
            data_dir: self.data_dir,
            otlp_endpoint: self.otlp_endpoint,
            bootstrap_from_ordinal: self.bootstrap_from_ordinal,
            ephemeral: self.ephemeral,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The node to talk to: http://HOST:PORT or https://HOST:PORT
    #[arg(long, env = "OPMESH_TARGET", default_value = "http://127.0.0.1:7070")]
    pub target: String,
    /// The API token to send (`Authorization: Bearer`), when the node checks tokens.
    /// Other users can see flags in the process list: prefer OPMESH_TOKEN
    #[arg(
        long,
        env = "OPMESH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<Secret>,
    /// A PEM file of CA certificates to trust, beside the system's, for an https
    /// target whose certificate they signed
    #[arg(long, env = "OPMESH_CACERT", value_name = "PEM")]
    pub cacert: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    #[command(flatten)]
    pub target: Target,
    /// Print the server's JSON answer
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// The operation type, e.g. echo
    #[arg(value_name = "TYPE")]
    pub op_type: String,
    /// The payload, as JSON [default: null]
    pub payload: Option<String>,
    /// Wait for the result
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[arg(long)]
    pub priority: Option<i32>,
    #[arg(long)]
    pub deadline_ms: Option<i64>,
    #[command(flatten)]
    pub target: Target,
    /// Print the server's JSON answer
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GetArgs {
    /// The operation id
    pub id: String,
    #[command(flatten)]
    pub target: Target,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// At most this many entries (1..=10000)
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[command(flatten)]
    pub read: ReadArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum RoutesCmd {
    /// List every route.
    List(ReadArgs),
    /// Show the route of one type.
    Get {
        #[arg(value_name = "TYPE")]
        op_type: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Set the route of one type.
    Set {
        #[arg(value_name = "TYPE")]
        op_type: String,
        /// round_robin, least_loaded, consistent_hash or pinned
        #[arg(long)]
        strategy: String,
        /// Node ids, comma separated; none: every node that serves the type
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Delete the route of one type.
    Delete {
        #[arg(value_name = "TYPE")]
        op_type: String,
        #[command(flatten)]
        read: ReadArgs,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum ClusterCmd {
    /// Show the nodes, their roles and health, the leader, term and links.
    Status(ReadArgs),
    /// Make the target node (started with --join, not yet a member) join via a seed.
    Join {
        /// A member's cluster address, host:port
        #[arg(value_name = "SEED")]
        seed: String,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Make the target node hand off its work and leave the cluster (it then exits).
    Leave(ReadArgs),
}

impl Command {
    /// The node a client command talks to (`None` for `serve` and `bench`).
    fn target(&self) -> Option<&Target> {
        Some(match self {
            Command::Serve(_) | Command::Bench(_) => return None,
            Command::Submit(a) => &a.target,
            Command::Get(a) => &a.target,
            Command::Health(a) | Command::Metrics(a) => &a.target,
            Command::Audit(a) => &a.read.target,
            Command::Routes(
                RoutesCmd::List(read)
                | RoutesCmd::Get { read, .. }
                | RoutesCmd::Set { read, .. }
                | RoutesCmd::Delete { read, .. },
            ) => &read.target,
            Command::Cluster(
                ClusterCmd::Status(read) | ClusterCmd::Join { read, .. } | ClusterCmd::Leave(read),
            ) => &read.target,
        })
    }
}

/// The `Authorization` header of `token`, marked sensitive (kept out of debug output).
pub(crate) fn bearer_header(token: &Secret) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut value = [b"Bearer ", token.expose()].concat();
    value.retain(|b| *b != b'\n' && *b != b'\r');
    let mut value = reqwest::header::HeaderValue::from_bytes(&value)
        .map_err(|_| anyhow::anyhow!("--token / OPMESH_TOKEN holds a character a header cannot"))?;
    value.set_sensitive(true);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, value);
    Ok(headers)
}

/// The client of the client commands: it sends the target's token, trusts the system's
/// roots and, with `--cacert`, the CA certificates of that file.
fn client(target: Option<&Target>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
    if let Some(token) = target.and_then(|t| t.token.as_ref()) {
        builder = builder.default_headers(bearer_header(token)?);
    }
    let builder = match target.and_then(|t| t.cacert.as_deref()) {
        None => builder,
        Some(path) => {
            let certs = tls::read_ca_file(path).context("--cacert")?;
            tls::trust(builder, &certs).context("--cacert")?
        }
    };
    builder.build().context("building the HTTP client")
}

/// Sends a request and returns the JSON answer; a refusal becomes an error naming the
/// server's code and message.
async fn call(req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
    let resp = req.send().await.map_err(|e| {
        let hint = if tls::is_bad_certificate(&e) {
            "; its TLS certificate did not verify: pass the CA that signed it with \
             --cacert <PEM> (or OPMESH_CACERT)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("{what}: could not reach the node{hint}"))
    })?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .with_context(|| format!("{what}: the node's answer is not JSON"))?;
    if !status.is_success() {
        let code = body["error"].as_str().unwrap_or("error");
        let msg = body["message"].as_str().unwrap_or("");
        bail!("{what}: {status} {code}: {msg}");
    }
    Ok(body)
}

fn url(t: &Target, path: &str) -> String {
    format!("{}{}", t.target.trim_end_matches('/'), path)
}

/// The audit trail as a table, newest first; times in UTC.
fn print_audit(v: &Value) {
    let entries = v["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.is_empty() {
        println!("no changes recorded");
        return;
    }
    println!(
        "{:<29}  {:<20}  {:<12}  {:<20}  DETAIL",
        "WHEN", "BY", "ACTION", "SUBJECT"
    );
    for e in entries {
        let when = e["at_ms"]
            .as_u64()
            .map(|ms| httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(ms)))
            .unwrap_or_default();
        let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{when:<29}  {:<20}  {:<12}  {:<20}  {}",
            s("by"),
            s("action"),
            s("subject"),
            s("detail")
        );
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_op(v: &Value) {
    println!("id:          {}", v["id"].as_str().unwrap_or("-"));
    println!("status:      {}", v["status"].as_str().unwrap_or("-"));
    if let Some(t) = v["type"].as_str() {
        println!("type:        {t}");
    }
    if !v["result"].is_null() {
        println!("result:      {}", v["result"]);
    }
    if let Some(e) = v["error"].as_str() {
        println!("error:       {e}");
    }
    println!("cached:      {}", v["cached"]);
    if let Some(n) = v["executed_by"].as_str() {
        println!("executed_by: {n}");
    }
    if let Some(t) = v["trace_id"].as_str() {
        println!("trace_id:    {t}");
    }
}

/// Runs a client command.
pub async fn run_client(cmd: Command) -> anyhow::Result<()> {
    let c = client(cmd.target())?;
    match cmd {
        Command::Submit(a) => {
            let payload: Value = match &a.payload {
                Some(p) => serde_json::from_str(p).context("PAYLOAD is not valid JSON")?,
                None => Value::Null,
            };
            let mut body = serde_json::json!({ "type": a.op_type, "payload": payload });
            for (k, v) in [("key", &a.key), ("idempotency_key", &a.idempotency_key)] {
                if let Some(v) = v {
                    body[k] = Value::from(v.as_str());
                }
            }
            if let Some(p) = a.priority {
                body["priority"] = p.into();
            }
            if let Some(d) = a.deadline_ms {
                body["deadline_ms"] = d.into();
            }
            let path = if a.wait {
                "/v1/ops?wait=true"
            } else {
                "/v1/ops"
            };
            let v = call(c.post(url(&a.target, path)).json(&body), "submit").await?;
            if a.json {
                print_json(&v)
            } else {
                print_op(&v)
            }
        }
        Command::Get(a) => {
            let v = call(c.get(url(&a.target, &format!("/v1/ops/{}", a.id))), "get").await?;
            if a.json {
                print_json(&v)
            } else {
                print_op(&v)
            }
        }
        Command::Health(a) => {
            let v = call(c.get(url(&a.target, "/v1/health")), "health").await?;
            if a.json {
                print_json(&v)
            } else {
                println!("node:      {}", v["nodeId"].as_str().unwrap_or("-"));
                println!("status:    {}", v["status"].as_str().unwrap_or("-"));
                println!("active:    {}", v["activeOperations"]);
                println!("queued:    {}", v["queuedOperations"]);
                println!("completed: {}", v["completedOperations"]);
                println!("cache:     {}", v["cacheStats"]);
            }
        }
        Command::Audit(a) => {
            let path = format!("/v1/audit?limit={}", a.limit);
            let v = call(c.get(url(&a.read.target, &path)), "audit").await?;
            if a.read.json {
                print_json(&v)
            } else {
                print_audit(&v)
            }
        }
        Command::Metrics(a) => {
            let v = call(c.get(url(&a.target, "/v1/metrics")), "metrics").await?;
            if a.json {
                print_json(&v)
            } else {
                println!("node:         {}", v["nodeId"].as_str().unwrap_or("-"));
                println!(
                    "operations:   {} accepted, {} completed, success rate {:.4}",
                    v["totalOperations"],
                    v["completedOperations"],
                    v["successRate"].as_f64().unwrap_or(0.0)
                );
                println!(
                    "throughput:   {:.1} ops/s",
                    v["throughput"].as_f64().unwrap_or(0.0)
                );
                let l = &v["latency"];
                println!(
                    "latency (µs): p50 {} p95 {} p99 {} max {}",
                    l["p50_us"], l["p95_us"], l["p99_us"], l["max_us"]
                );
                println!(
                    "cache:        hit rate {:.4}",
                    v["cacheHitRate"].as_f64().unwrap_or(0.0)
                );
                if let Some(types) = v["perType"].as_object() {
                    for (t, s) in types {
                        println!(
                            "  {t:<16} ok {} failed {} expired {} queued {} p99 {} µs",
                            s["succeeded"],
                            s["failed"],
                            s["expired"],
                            s["queued"],
                            s["latency"]["p99_us"]
                        );
                    }
                }
            }
        }
        Command::Routes(r) => routes(&c, r).await?,
        Command::Cluster(r) => cluster(&c, r).await?,
        Command::Serve(_) | Command::Bench(_) => unreachable!("not client commands"),
    }
    Ok(())
}

async fn routes(c: &reqwest::Client, cmd: RoutesCmd) -> anyhow::Result<()> {
    let (v, json) = match cmd {
        RoutesCmd::List(a) => (
            call(c.get(url(&a.target, "/v1/routes")), "routes list").await?,
            a.json,
        ),
        RoutesCmd::Get { op_type, read } => (
            call(
                c.get(url(&read.target, &format!("/v1/routes/{op_type}"))),
                "routes get",
            )
            .await?,
            read.json,
        ),
        RoutesCmd::Set {
            op_type,
            strategy,
            nodes,
            read,
        } => {
            let body = serde_json::json!({ "strategy": strategy, "nodes": nodes });
            (
                call(
                    c.put(url(&read.target, &format!("/v1/routes/{op_type}")))
                        .json(&body),
                    "routes set",
                )
                .await?,
                read.json,
            )
        }
        RoutesCmd::Delete { op_type, read } => (
            call(
                c.delete(url(&read.target, &format!("/v1/routes/{op_type}"))),
                "routes delete",
            )
            .await?,
            read.json,
        ),
    };
    if json {
        print_json(&v);
    } else if let Some(routes) = v["routes"].as_object() {
        println!("version {}", v["version"]);
        if routes.is_empty() {
            println!("(no explicit routes: every type goes to the nodes that serve it)");
        }
        for (t, r) in routes {
            println!(
                "{t:<20} {:<16} {}",
                r["strategy"].as_str().unwrap_or("-"),
                nodes_text(&r["nodes"])
            );
        }
    } else if let Some(r) = v.get("route") {
        println!(
            "{:<20} {:<16} {}  (version {})",
            v["type"].as_str().unwrap_or("-"),
            r["strategy"].as_str().unwrap_or("-"),
            nodes_text(&r["nodes"]),
            v["version"]
        );
    } else {
        println!(
            "deleted {} (version {})",
            v["type"].as_str().unwrap_or("-"),
            v["version"]
        );
    }
    Ok(())
}

async fn cluster(c: &reqwest::Client, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status(a) => {
            let v = call(c.get(url(&a.target, "/v1/cluster")), "cluster status").await?;
            if a.json {
                print_json(&v);
                return Ok(());
            }
            println!(
                "leader {}  term {}  applied {}  routing version {}  (answered by {}, {})",
                v["leader"].as_str().unwrap_or("(none)"),
                v["term"],
                v["last_applied_index"],
                v["version"],
                v["node"].as_str().unwrap_or("-"),
                v["raft_state"].as_str().unwrap_or("-"),
            );
            println!(
                "{:<12} {:<8} {:<8} {:<13} {:>6}  {:<22} {:<22} serves",
                "node", "status", "role", "link", "load", "http", "cluster"
            );
            for n in v["nodes"].as_array().into_iter().flatten() {
                let serves: Vec<&str> = n["serves"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                println!(
                    "{:<12} {:<8} {:<8} {:<13} {:>6}  {:<22} {:<22} {}",
                    n["id"].as_str().unwrap_or("-"),
                    n["status"].as_str().unwrap_or("-"),
                    n["role"].as_str().unwrap_or("-"),
                    n["link"].as_str().unwrap_or("-"),
                    n["load"].as_u64().unwrap_or(0),
                    n["http_addr"].as_str().unwrap_or("-"),
                    n["cluster_addr"].as_str().unwrap_or("-"),
                    serves.join(","),
                );
            }
        }
        ClusterCmd::Join { seed, read } => {
            let v = call(
                c.post(url(&read.target, "/v1/cluster/join"))
                    .json(&serde_json::json!({ "seed": seed })),
                "cluster join",
            )
            .await?;
            if read.json {
                print_json(&v)
            } else {
                println!("{} joined via {seed}", v["node"].as_str().unwrap_or("-"));
            }
        }
        ClusterCmd::Leave(a) => {
            let v = call(c.post(url(&a.target, "/v1/cluster/leave")), "cluster leave").await?;
            if a.json {
                print_json(&v)
            } else {
                println!(
                    "{} left the cluster and is shutting down",
                    v["node"].as_str().unwrap_or("-")
                );
            }
        }
    }
    Ok(())
}

fn nodes_text(v: &Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(","),
        _ => "(every node serving it)".into(),
    }
}
