//! What happens to accepted operations when a cluster of real `opmesh` processes on
//! 127.0.0.1 meets its faults: the owner killed (also when it leads Raft), the leader
//! killed just after acknowledging a route, a partitioned leader, the link between
//! origin and owner cut while replies are in flight, SIGTERM without a quorum, and a
//! seeded chaos schedule under steady keyed load. RELIABILITY.md states the guarantees
//! these tests prove.
//!
//! The operations are webhook calls (`[[handlers.http]]`) to a [`Receiver`] in the test
//! that behaves like a real idempotent endpoint: it applies the first call of each
//! `Idempotency-Key` and answers a repeat with the first answer. It counts what matters:
//! how many times each operation's effect was applied (must be once), and how many repeat
//! calls it absorbed (legitimate: an operation in flight on an owner that dies runs again
//! elsewhere, with the same key). Every accepted operation is followed through
//! `GET /v1/ops/{id}` until it ends: none may be lost, none may fail without a reason.
//!
//! Every wait is on a condition with a deadline.

mod common;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use common::cluster::{
    cluster_view, index_of, leader_of, route_on, sees_status, sees_up, set_route,
    set_route_everywhere, start, voters_seen, Layout, NodeSpec, Partition, NAMES,
};
use common::{client, follow_ops, free_port, is_terminal, read_all, wait_until, Server};
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};

/// The webhook type every node serves, POSTing to the test's [`Receiver`].
const HOOK: &str = "hook";

// ---------------------------------------------------------------------------------------
// The webhook receiver

/// What the receiver saw.
#[derive(Default)]
struct Ledger {
    /// By `Idempotency-Key`: the answer of its first call, and how many calls it had.
    keys: HashMap<String, (Value, u32)>,
    /// By operation (the payload's `k`): how many times its effect was applied.
    applied: HashMap<String, u32>,
    /// Calls without an `Idempotency-Key` (applied every time: nothing to dedupe by).
    unkeyed: u64,
}

impl Ledger {
    /// Calls with a key seen before: answered with the first answer, not applied again.
    fn repeats(&self) -> u64 {
        self.keys.values().map(|(_, n)| u64::from(n - 1)).sum()
    }

    /// Effects applied more than once: an operation that reached the receiver under two
    /// different keys (or none), which no receiver could dedupe.
    fn duplicated_effects(&self) -> u64 {
        self.applied.values().map(|n| u64::from(n - 1)).sum()
    }

    fn applied(&self, k: &str) -> u32 {
        self.applied.get(k).copied().unwrap_or(0)
    }

    /// How many calls the effect with `key` had.
    fn calls(&self, key: &str) -> u32 {
        self.keys.get(key).map_or(0, |(_, n)| *n)
    }
}

struct ReceiverState {
    ledger: Mutex<Ledger>,
    /// Each call is answered after a delay in this range (ms), chosen by its key.
    delay_ms: (u64, u64),
    calls: AtomicU64,
    answered: AtomicU64,
}

/// An idempotent webhook endpoint on a free loopback port (see the module doc).
struct Receiver {
    base: String,
    state: Arc<ReceiverState>,
}

impl Receiver {
    fn start(delay_ms: (u64, u64)) -> Receiver {
        let state = Arc::new(ReceiverState {
            ledger: Mutex::default(),
            delay_ms,
            calls: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        });
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/hook", web::post().to(receive))
        })
        .workers(2)
        .disable_signals()
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        tokio::spawn(server.run());
        Receiver {
            base: format!("http://{addr}"),
            state,
        }
    }

    fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn answered(&self) -> u64 {
        self.state.answered.load(Ordering::SeqCst)
    }

    fn ledger(&self) -> parking_lot::MutexGuard<'_, Ledger> {
        self.state.ledger.lock()
    }

    /// (repeat calls absorbed, effects applied more than once, calls without a key).
    fn effects(&self) -> (u64, u64, u64) {
        let l = self.ledger();
        (l.repeats(), l.duplicated_effects(), l.unkeyed)
    }

    /// A configuration file serving [`HOOK`] by POSTing to this receiver.
    fn config(&self, dir: &Path) -> PathBuf {
        let path = dir.join("hook.toml");
        std::fs::write(
            &path,
            format!(
                "[[handlers.http]]\ntype = \"{HOOK}\"\nurl = \"{}/hook\"\ntimeout_ms = 5000\n\
                 max_attempts = 3\ninitial_backoff_ms = 10\nmax_backoff_ms = 100\n",
                self.base
            ),
        )
        .unwrap();
        path
    }
}

/// One webhook call: applied once per key (the first call), answered after a delay.
async fn receive(st: web::Data<ReceiverState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    st.calls.fetch_add(1, Ordering::SeqCst);
    let payload: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let k = payload["k"].as_str().unwrap_or("").to_owned();
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let answer = {
        let mut l = st.ledger.lock();
        let known = key
            .as_ref()
            .and_then(|key| l.keys.get_mut(key))
            .map(|(answer, calls)| {
                *calls += 1;
                answer.clone()
            });
        match known {
            Some(answer) => answer,
            None => {
                let seq = l.applied.values().map(|n| u64::from(*n)).sum::<u64>() + 1;
                *l.applied.entry(k.clone()).or_default() += 1;
                let answer = json!({"applied": k, "seq": seq});
                match key {
                    Some(key) => {
                        l.keys.insert(key, (answer.clone(), 1));
                    }
                    None => l.unkeyed += 1,
                }
                answer
            }
        }
    };
    let (lo, hi) = st.delay_ms;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    let delay = lo + h.finish() % (hi - lo + 1);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    st.answered.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().json(answer)
}

// ---------------------------------------------------------------------------------------
// Submitting and following operations

/// One operation of [`HOOK`]: its name (the payload's `k`) and whether it carries it as
/// its idempotency key.
#[derive(Clone, Debug)]
struct Op {
    k: String,
    keyed: bool,
    deadline_ms: u64,
}

impl Op {
    fn keyed(k: String, deadline_ms: u64) -> Op {
        Op {
            k,
            keyed: true,
            deadline_ms,
        }
    }

    fn body(&self) -> Value {
        let mut b =
            json!({"type": HOOK, "payload": {"k": self.k}, "deadline_ms": self.deadline_ms});
        if self.keyed {
            b["idempotency_key"] = json!(self.k);
        }
        b
    }
}

/// How operations are submitted (the modes RELIABILITY.md covers).
#[derive(Clone, Debug)]
enum Submission {
    /// `POST /v1/ops`: 202, then followed by its id.
    Single(Op),
    /// `POST /v1/ops?wait=true`: the outcome in the answer.
    Wait(Op),
    /// `POST /v1/ops/batch`: 202, each followed by its id.
    Batch(Vec<Op>),
}

impl Submission {
    fn ops(&self) -> Vec<&Op> {
        match self {
            Submission::Single(o) | Submission::Wait(o) => vec![o],
            Submission::Batch(b) => b.iter().collect(),
        }
    }
}

/// An operation a node acknowledged (202, or 200 with its outcome).
#[derive(Clone, Debug)]
struct Accepted {
    op: Op,
    id: String,
    /// The index of the node that acknowledged it.
    origin: usize,
    /// The origin's incarnation then (how many times the test had killed it).
    incarnation: u32,
    /// The outcome, for a waiting submission.
    outcome: Option<Value>,
}

impl Accepted {
    /// The `Idempotency-Key` its webhook calls carry.
    fn effect_key(&self) -> &str {
        if self.op.keyed {
            &self.op.k
        } else {
            &self.id
        }
    }
}

/// How one submitted operation went.
#[derive(Debug)]
enum Fate {
    Accepted(Accepted),
    /// Refused with an answer (503, 429, ...): never acknowledged.
    Refused(String),
    /// No answer (the node died, or the request timed out): accepted or not, unknown.
    Unknown(Op, String),
}

/// Submits `sub` to node `origin` at `base`.
async fn submit(base: &str, origin: usize, incarnation: u32, sub: &Submission) -> Vec<Fate> {
    let c = client();
    let (url, body, timeout) = match sub {
        Submission::Single(o) => (format!("{base}/v1/ops"), o.body(), 5_000),
        Submission::Wait(o) => (
            format!("{base}/v1/ops?wait=true"),
            o.body(),
            o.deadline_ms + 5_000,
        ),
        Submission::Batch(b) => (
            format!("{base}/v1/ops/batch"),
            json!({"ops": b.iter().map(Op::body).collect::<Vec<_>>()}),
            5_000,
        ),
    };
    let ops = sub.ops();
    let unknown = |why: String| {
        ops.iter()
            .map(|o| Fate::Unknown((*o).clone(), why.clone()))
            .collect()
    };
    let r = match c
        .post(url)
        .timeout(Duration::from_millis(timeout))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return unknown(e.without_url().to_string()),
    };
    let code = r.status().as_u16();
    let v: Value = match r.json().await {
        Ok(v) => v,
        Err(e) => return unknown(format!("{code}, unreadable answer: {e}")),
    };
    let accepted = |op: &Op, item: &Value, outcome: Option<Value>| match item["id"].as_str() {
        Some(id) if item["error"].is_null() || outcome.is_some() => Fate::Accepted(Accepted {
            op: op.clone(),
            id: id.to_owned(),
            origin,
            incarnation,
            outcome,
        }),
        _ => Fate::Refused(format!("{code} {item}")),
    };
    match (sub, code) {
        (Submission::Single(o), 202) => vec![accepted(o, &v, None)],
        (Submission::Wait(o), 200) => vec![accepted(o, &v, Some(v.clone()))],
        (Submission::Batch(b), 202) => match v["results"].as_array() {
            Some(items) if items.len() == b.len() => b
                .iter()
                .zip(items)
                .map(|(o, i)| accepted(o, i, None))
                .collect(),
            _ => vec![Fate::Refused(format!(
                "{code}: batch answer without its results"
            ))],
        },
        _ => ops
            .iter()
            .map(|_| Fate::Refused(format!("{code} {v}")))
            .collect(),
    }
}

/// Submits every entry of `plan` to node `origin`, `parallel` at a time, each submitter
/// pausing `pause` between its submissions (so the load lasts a while); asserts that each
/// operation is acknowledged.
async fn submit_all(
    base: String,
    origin: usize,
    plan: Vec<Submission>,
    parallel: usize,
    pause: Duration,
) -> Vec<Accepted> {
    let fates: Vec<Vec<Fate>> = futures::stream::iter(plan)
        .map(|sub| {
            let base = base.clone();
            async move {
                let f = submit(&base, origin, 0, &sub).await;
                tokio::time::sleep(pause).await;
                f
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    fates
        .into_iter()
        .flatten()
        .map(|f| match f {
            Fate::Accepted(a) => a,
            other => panic!("an operation was not acknowledged: {other:?}"),
        })
        .collect()
}

/// A plan of keyed operations named `{prefix}{n}`: `singles` submitted one by one (202),
/// `batches` batches of 25 (202) and `waits` waiting submissions, spread among them.
fn plan(
    prefix: &str,
    singles: usize,
    batches: usize,
    waits: usize,
    deadline_ms: u64,
) -> Vec<Submission> {
    let mut next = 0;
    let mut op = || {
        next += 1;
        Op::keyed(format!("{prefix}{next}"), deadline_ms)
    };
    let mut out = Vec::new();
    let (mut b, mut w) = (0, 0);
    for i in 0..singles {
        out.push(Submission::Single(op()));
        if w < waits && i % (singles / waits.max(1)).max(1) == 0 {
            out.push(Submission::Wait(op()));
            w += 1;
        }
        if b < batches && i % (singles / batches.max(1)).max(1) == 0 {
            out.push(Submission::Batch((0..25).map(|_| op()).collect()));
            b += 1;
        }
    }
    out.extend((w..waits).map(|_| Submission::Wait(op())));
    out.extend((b..batches).map(|_| Submission::Batch((0..25).map(|_| op()).collect())));
    out
}

/// How the accepted operations ended, judged against what the receiver saw.
#[derive(Default, Debug)]
struct Tally {
    succeeded: usize,
    failed_with_reason: usize,
    /// The failures' reasons, with the names in them left out: how many, and the first
    /// in full.
    reasons: std::collections::BTreeMap<String, (usize, String)>,
    /// Failed or expired without an error: `id status`.
    without_reason: Vec<String>,
    /// Never terminal: `id last-answer`.
    lost: Vec<String>,
    /// Succeeded with a result other than the receiver's answer to its key.
    wrong_result: Vec<String>,
    /// Succeeded, but the receiver did not apply its effect exactly once.
    not_applied_once: Vec<String>,
}

impl Tally {
    fn judge(&mut self, a: &Accepted, answer: Option<&Value>, ledger: &Ledger) {
        let Some(v) = answer.filter(|v| is_terminal(v)) else {
            let last = answer.map_or("never readable".to_owned(), |v| format!("{}", v["status"]));
            self.lost.push(format!("{} {last}", a.id));
            return;
        };
        match v["status"].as_str() {
            Some("succeeded") => {
                self.succeeded += 1;
                let want = ledger.keys.get(a.effect_key()).map(|(answer, _)| answer);
                if want != Some(&v["result"]) {
                    self.wrong_result.push(format!("{} {}", a.id, v["result"]));
                }
                let n = ledger.applied(&a.op.k);
                if n != 1 {
                    self.not_applied_once
                        .push(format!("{} applied {n} times", a.op.k));
                }
            }
            _ => match v["error"].as_str() {
                Some(e) if !e.is_empty() => {
                    self.failed_with_reason += 1;
                    // Names (between backticks) left out, so alike reasons count together.
                    let kind: String = e
                        .split('`')
                        .enumerate()
                        .map(|(i, part)| if i % 2 == 1 { "…" } else { part })
                        .collect();
                    self.reasons.entry(kind).or_insert((0, e.to_owned())).0 += 1;
                }
                _ => self
                    .without_reason
                    .push(format!("{} {}", a.id, v["status"])),
            },
        }
    }

    /// Asserts nothing lost, every failure with its reason, every result the receiver's.
    fn assert_sound(&self, what: &str) {
        let few = |v: &Vec<String>| v.iter().take(5).cloned().collect::<Vec<_>>();
        assert!(
            self.lost.is_empty(),
            "{what}: {} operations lost, e.g. {:?}",
            self.lost.len(),
            few(&self.lost)
        );
        assert!(
            self.without_reason.is_empty(),
            "{what}: {} ended without a reason, e.g. {:?}",
            self.without_reason.len(),
            few(&self.without_reason)
        );
        assert!(
            self.wrong_result.is_empty(),
            "{what}: {} results differ from the receiver's answer, e.g. {:?}",
            self.wrong_result.len(),
            few(&self.wrong_result)
        );
        assert!(
            self.not_applied_once.is_empty(),
            "{what}: {} succeeded operations not applied exactly once, e.g. {:?}",
            self.not_applied_once.len(),
            few(&self.not_applied_once)
        );
    }
}

/// Follows every accepted operation on its origin (a waiting one has its outcome
/// already) and judges how it ended.
async fn follow_and_judge(
    s: &[&Server],
    accepted: &[Accepted],
    within: Duration,
    rx: &Receiver,
) -> Tally {
    let mut answers: HashMap<String, Value> = HashMap::new();
    for (i, node) in s.iter().enumerate() {
        let ids: Vec<String> = accepted
            .iter()
            .filter(|a| a.origin == i && a.outcome.is_none())
            .map(|a| a.id.clone())
            .collect();
        if !ids.is_empty() {
            answers.extend(follow_ops(node, &ids, within).await);
        }
    }
    let ledger = rx.ledger();
    let mut t = Tally::default();
    for a in accepted {
        t.judge(a, a.outcome.as_ref().or(answers.get(&a.id)), &ledger);
    }
    t
}

/// Waits until `forwarded_waiting` is 0 on every node of `s`.
async fn nothing_waits(s: &[&Server]) {
    for n in s {
        wait_until(
            "forwarded_waiting back to 0",
            Duration::from_secs(10),
            || async {
                cluster_view(n)
                    .await
                    .is_some_and(|c| c["forwarded_waiting"] == 0)
            },
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------
// The owner killed

/// Three nodes, a webhook routed round robin to two owners; 450 keyed operations
/// submitted to the third (300 one by one, 4 batches of 25 with 202, 50 waiting) while
/// one owner is killed with `kill -9` (the leader, when `owner_leads`). Every operation
/// ends (followed through `GET /v1/ops/{id}`), succeeded with the receiver's answer; the
/// receiver applied each once.
async fn owner_killed_under_accepted_keyed_operations(owner_leads: bool) {
    let rx = Receiver::start((50, 400));
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new().with_config(&rx.config(tmp.path()));
    let mut s = layout.start_three().await;
    let leader = index_of(&leader_of(&s[0]).await.unwrap());
    let (origin, owners, victim) = if owner_leads {
        let other = (leader + 1) % 3;
        ((leader + 2) % 3, [leader, other], leader)
    } else {
        let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
        (leader, [a, b], b)
    };
    let all: Vec<&Server> = s.iter().collect();
    set_route_everywhere(
        &s[origin],
        &all,
        HOOK,
        "round_robin",
        &[NAMES[owners[0]], NAMES[owners[1]]],
    )
    .await;

    let plan = plan("k-", 300, 4, 50, 30_000);
    let total: usize = plan.iter().map(|p| p.ops().len()).sum();
    let load = tokio::spawn(submit_all(
        s[origin].base.clone(),
        origin,
        plan,
        8,
        Duration::from_millis(15),
    ));
    // Kill the owner once a third of the calls went out: some answered, some in flight,
    // some not yet submitted.
    wait_until(
        "a third of the webhook calls made",
        Duration::from_secs(20),
        || async { rx.calls() >= total as u64 / 3 },
    )
    .await;
    s[victim].signal("KILL");
    s[victim].wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    let accepted = load.await.unwrap();
    assert_eq!(accepted.len(), total);

    let live: Vec<&Server> = (0..3).filter(|i| *i != victim).map(|i| &s[i]).collect();
    let by_origin: Vec<&Server> = (0..3).map(|i| &s[i]).collect();
    let t = follow_and_judge(&by_origin, &accepted, Duration::from_secs(45), &rx).await;
    t.assert_sound("owner killed");
    assert_eq!(
        t.succeeded, total,
        "every operation runs once its key moved to the live owner ({} failed or expired)",
        t.failed_with_reason
    );
    let (repeats, duplicated, unkeyed) = rx.effects();
    assert_eq!(unkeyed, 0, "every webhook call carries its key");
    assert_eq!(duplicated, 0, "no effect applied twice");
    nothing_waits(&live).await;
    eprintln!(
        "owner {} killed{}: {total} accepted, {} succeeded, 0 lost, each applied once; \
         {repeats} repeat calls deduplicated by the receiver; all ended {:?} after the kill",
        NAMES[victim],
        if owner_leads { " (the leader)" } else { "" },
        t.succeeded,
        killed.elapsed(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_under_accepted_keyed_operations_loses_none_and_applies_each_once() {
    owner_killed_under_accepted_keyed_operations(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_leads_killed_under_accepted_keyed_operations_loses_none_and_applies_each_once(
) {
    owner_killed_under_accepted_keyed_operations(true).await;
}

// ---------------------------------------------------------------------------------------
// The leader killed

/// `sleep` operations submitted to `base` with `?wait=true` one after the other until
/// `stop`; answers each (status code, answer).
async fn waiting_sleeps(
    base: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<(u16, Value)> {
    let mut out = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let r = client()
            .post(format!("{base}/v1/ops?wait=true"))
            .json(&json!({"type": "sleep", "payload": {"ms": 50}, "deadline_ms": 15_000}))
            .send()
            .await
            .expect("the node that takes the load stays up");
        let code = r.status().as_u16();
        out.push((code, r.json().await.unwrap_or(Value::Null)));
        done.fetch_add(1, Ordering::SeqCst);
    }
    out
}

/// The status code of `GET /v1/routes/{ty}` on `s`.
async fn route_status(s: &Server, ty: &str) -> u16 {
    client()
        .get(s.url(&format!("/v1/routes/{ty}")))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_acknowledged_just_before_the_leader_is_killed_is_on_every_node_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new().with_dirs(tmp.path());
    let mut s = layout.start_three().await;
    let leader = index_of(&leader_of(&s[0]).await.unwrap());
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    let all: Vec<&Server> = s.iter().collect();
    set_route_everywhere(&s[a], &all, "sleep", "round_robin", &[]).await;
    // Waiting requests through a survivor, a third of them run by the leader.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(waiting_sleeps(
                s[a].base.clone(),
                stop.clone(),
                done.clone(),
            ))
        })
        .collect();
    wait_until("the load running", Duration::from_secs(10), || async {
        done.load(Ordering::SeqCst) >= 30
    })
    .await;

    // Acknowledged by the leader itself, which is killed at once.
    let r = set_route(&s[leader], "echo", "pinned", &[NAMES[b]]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    s[leader].signal("KILL");
    s[leader].wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    // A later write, taken by whichever survivor leads now: once a survivor has it, it
    // has every entry before it, the acknowledged one included.
    wait_until(
        "a new leader takes a write",
        Duration::from_secs(15),
        || async {
            set_route(&s[a], "resize", "round_robin", &[])
                .await
                .status()
                == 200
        },
    )
    .await;
    let elected = killed.elapsed();
    let acked = Some(("pinned".to_owned(), vec![NAMES[b].to_owned()]));
    for i in [a, b] {
        wait_until(
            "the later write on every survivor",
            Duration::from_secs(10),
            || async { route_on(&s[i], "resize").await.is_some() },
        )
        .await;
        assert_eq!(
            route_on(&s[i], "echo").await,
            acked,
            "the acknowledged route on {}",
            NAMES[i]
        );
    }
    stop.store(true, Ordering::SeqCst);
    // Every waiting request ended with a result or a reason.
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for h in load {
        for (code, v) in h.await.unwrap() {
            let what = match code {
                200 if v["status"] == "succeeded" => "succeeded".to_owned(),
                200 => {
                    assert!(is_terminal(&v), "{v}");
                    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
                    format!("{}", v["status"])
                }
                _ => {
                    assert!(v["error"].is_string(), "{code} without a reason: {v}");
                    format!("{code} {}", v["error"])
                }
            };
            *outcomes.entry(what).or_default() += 1;
        }
    }
    // The old leader, back from its data dir, has it too.
    s[leader] = layout.start(leader, None);
    wait_until(
        "the restarted leader has the later write",
        Duration::from_secs(15),
        || async { route_on(&s[leader], "resize").await.is_some() },
    )
    .await;
    assert_eq!(route_on(&s[leader], "echo").await, acked);
    for n in &s {
        wait_until("three up again", Duration::from_secs(20), || sees_up(n, 3)).await;
    }
    eprintln!(
        "leader {} killed just after acknowledging a route: writes taken again after \
         {elected:?}; the route on every node; waiting requests: {outcomes:?}",
        NAMES[leader]
    );
}

// ---------------------------------------------------------------------------------------
// A partition

/// Three nodes with `rx`'s settings whose links go through a [`Partition`] proxy, and
/// the index of their leader. Fields drop in order: the nodes before their data dirs.
struct Partitioned {
    nodes: Vec<Server>,
    partition: Partition,
    leader: usize,
    _dirs: tempfile::TempDir,
}

async fn three_behind_a_partition(rx: &Receiver) -> Partitioned {
    let dirs = tempfile::tempdir().unwrap();
    let partition = Partition::default();
    let layout = Layout::new()
        .with_config(&rx.config(dirs.path()))
        .behind(&partition)
        .await;
    let nodes = layout.start_three().await;
    let leader = index_of(&leader_of(&nodes[0]).await.unwrap());
    Partitioned {
        nodes,
        partition,
        leader,
        _dirs: dirs,
    }
}

/// The leader is cut off from the other two (the [`Partition`] proxy) while keyed
/// operations run. The majority marks it down and goes on; the old leader refuses a
/// route write it cannot commit (503 `no_quorum`), and that write never appears anywhere
/// after the partition heals, also once every node has applied a later write. Every
/// operation that crossed the partition ends with a result or a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leaders_refused_write_never_appears_and_operations_across_it_end() {
    let rx = Receiver::start((20, 200));
    let cut = three_behind_a_partition(&rx).await;
    let (s, partition, l) = (&cut.nodes, &cut.partition, cut.leader);
    let all: Vec<&Server> = s.iter().collect();
    let (m1, m2) = ((l + 1) % 3, (l + 2) % 3);
    set_route_everywhere(&s[m1], &all, HOOK, "round_robin", &[]).await;

    // Keyed operations accepted by the majority, a third of them owned by the leader about
    // to be cut off.
    let before = tokio::spawn(submit_all(
        s[m1].base.clone(),
        m1,
        plan("p-", 150, 2, 10, 30_000),
        8,
        Duration::from_millis(15),
    ));
    wait_until(
        "a third of the calls made",
        Duration::from_secs(20),
        || async { rx.calls() >= 70 },
    )
    .await;
    partition.isolate(Some(NAMES[l]));
    for i in [m1, m2] {
        wait_until(
            "the old leader down on the majority",
            Duration::from_secs(15),
            || sees_status(&s[i], NAMES[l], "down"),
        )
        .await;
    }
    wait_until(
        "a write on the majority",
        Duration::from_secs(10),
        || async {
            set_route(&s[m1], "echo", "pinned", &[NAMES[m2]])
                .await
                .status()
                == 200
        },
    )
    .await;
    // The old leader refuses, with a clear error, without hanging.
    let t = Instant::now();
    let r = set_route(&s[l], "resize", "pinned", &[NAMES[l]]).await;
    let took = t.elapsed();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "no_quorum", "{body}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Operations accepted by the cut-off node: those it forwards cannot reach their
    // owner before their deadline.
    let during = submit_all(
        s[l].base.clone(),
        l,
        plan("q-", 40, 0, 0, 3_000),
        8,
        Duration::ZERO,
    )
    .await;
    wait_until(
        "the cut-off node's forwarded operations ended",
        Duration::from_secs(15),
        || async {
            cluster_view(&s[l])
                .await
                .is_some_and(|c| c["forwarded_waiting"] == 0)
        },
    )
    .await;
    let before = before.await.unwrap();

    // Healed; a later write on the majority reaches every node.
    partition.heal();
    set_route_everywhere(&s[m1], &all, "sleep", "pinned", &[NAMES[m1]]).await;
    // The refused write is nowhere: not now that every node has the later write, nor
    // for a while after.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for (i, n) in s.iter().enumerate() {
            assert_eq!(
                route_status(n, "resize").await,
                404,
                "the refused write appeared on {}",
                NAMES[i]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        route_on(&s[l], "echo").await,
        Some(("pinned".to_owned(), vec![NAMES[m2].to_owned()])),
        "the old leader has the majority's write"
    );
    for n in s {
        wait_until("three up again", Duration::from_secs(15), || sees_up(n, 3)).await;
    }

    let mut accepted = before;
    accepted.extend(during);
    let t = follow_and_judge(&all, &accepted, Duration::from_secs(45), &rx).await;
    t.assert_sound("partition");
    let (repeats, duplicated, _) = rx.effects();
    assert_eq!(duplicated, 0, "no effect applied twice");
    nothing_waits(&all).await;
    eprintln!(
        "partition: the refused write never appeared; {} operations crossed it: {} succeeded, \
         {} failed or expired with their reason, 0 lost; {repeats} repeat calls deduplicated",
        accepted.len(),
        t.succeeded,
        t.failed_with_reason
    );
}

// ---------------------------------------------------------------------------------------
// The link between origin and owner cut

/// Replies in flight when the links between an operation's origin and its owner break
/// (the owner keeps running and answering; the third node, the leader, sees both): every
/// operation ends `succeeded` with its result once the link is back, and none ran twice.
/// Half the operations have no idempotency key (their calls carry the operation's id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_in_flight_when_the_origin_owner_link_is_cut_arrive_without_a_rerun() {
    let rx = Receiver::start((200, 400));
    let cut = three_behind_a_partition(&rx).await;
    let (s, partition, l) = (&cut.nodes, &cut.partition, cut.leader);
    let all: Vec<&Server> = s.iter().collect();
    let (origin, owner) = ((l + 1) % 3, (l + 2) % 3);
    set_route_everywhere(&s[origin], &all, HOOK, "pinned", &[NAMES[owner]]).await;

    let plan: Vec<Submission> = (0..300)
        .map(|i| {
            Submission::Single(Op {
                k: format!("l-{i}"),
                keyed: i % 2 == 0,
                deadline_ms: 30_000,
            })
        })
        .collect();
    let total = plan.len();
    let load = tokio::spawn(submit_all(
        s[origin].base.clone(),
        origin,
        plan,
        8,
        Duration::from_millis(20),
    ));
    // Cut while the owner has calls in flight: their replies are made while the link is
    // down.
    wait_until(
        "20 calls in flight on the owner",
        Duration::from_secs(20),
        || async { rx.calls() >= rx.answered() + 20 },
    )
    .await;
    partition.cut_pair(NAMES[origin], NAMES[owner]);
    let in_flight = rx.calls();
    wait_until(
        "the calls in flight at the cut answered",
        Duration::from_secs(10),
        || async { rx.answered() >= in_flight },
    )
    .await;
    partition.heal();
    let accepted = load.await.unwrap();

    let t = follow_and_judge(&all, &accepted, Duration::from_secs(45), &rx).await;
    let reran: Vec<String> = {
        let ledger = rx.ledger();
        accepted
            .iter()
            .filter(|a| ledger.calls(a.effect_key()) > 1)
            .map(|a| format!("{} ({} calls)", a.op.k, ledger.calls(a.effect_key())))
            .collect()
    };
    let (repeats, _, _) = rx.effects();
    eprintln!(
        "link cut: {total} accepted, {} succeeded, {} failed or expired, {} lost; \
         {} operations ran more than once ({repeats} repeat calls)",
        t.succeeded,
        t.failed_with_reason,
        t.lost.len(),
        reran.len()
    );
    t.assert_sound("link cut");
    assert_eq!(
        t.succeeded, total,
        "every operation ends succeeded ({} failed or expired)",
        t.failed_with_reason
    );
    assert!(
        reran.is_empty(),
        "{} operations ran again, e.g. {:?}",
        reran.len(),
        reran.iter().take(5).collect::<Vec<_>>()
    );
    nothing_waits(&all).await;
}

// ---------------------------------------------------------------------------------------
// Bounded SIGTERM

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
    let layout = Layout::new().with_env(&env);
    let mut s = layout.start_three().await;
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
    let mut s = layout.start_three().await;
    let idx = index_of(&leader_of(&s[0]).await.unwrap());
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

    // A cluster of one, with work that outlasts the grace period: the drain is cut short.
    let mut one = Layout::new().with_env(&env).start(0, None);
    wait_until("a cluster of one", Duration::from_secs(20), || {
        sees_up(&one, 1)
    })
    .await;
    let r = client()
        .post(one.url("/v1/ops"))
        .json(&json!({"type": "sleep", "payload": {"ms": 60_000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let t = Instant::now();
    one.signal("TERM");
    assert_eq!(
        exit_code(one.wait_exit(bound)),
        1,
        "a drain cut short exits 1"
    );
    eprintln!("a cluster of one stopped in {:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------
// A node not admitted yet

/// A node started with `--join` that no seed has admitted yet has no routing table: it
/// refuses operations (503 `joining`, with `Retry-After`) rather than acknowledge them
/// and fail each at once for want of a node, as it did before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_admitted_yet_refuses_operations_rather_than_fail_them() {
    let nowhere = format!("127.0.0.1:{}", free_port());
    let s = start(&NodeSpec {
        name: "node-2",
        cluster_port: free_port(),
        join: Some(nowhere),
        ..NodeSpec::default()
    });
    let one = json!({"type": "echo", "payload": 1});
    for (path, body) in [
        ("/v1/ops", one.clone()),
        ("/v1/ops?wait=true", one.clone()),
        ("/v1/ops/batch", json!({"ops": [one]})),
    ] {
        let r = client().post(s.url(path)).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 503, "{path}");
        assert_eq!(r.headers()["retry-after"], "1", "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "joining", "{path}: {v}");
    }
    let r = client().get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
}

// ---------------------------------------------------------------------------------------
// Chaos

/// SplitMix64: a small generator, so a seed gives the same schedule on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration from `lo` to `hi` ms.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// One fault of the chaos schedule.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `kill -9` a node; after `down`, start it again from its data dir, or with an empty
    /// one (`wipe`: it joins again, as a node that lost its disk).
    Kill {
        node: usize,
        wipe: bool,
        down: Duration,
    },
    /// The same for whichever node leads then.
    KillLeader { wipe: bool, down: Duration },
    /// Cut a node off from the others for `cut`.
    Partition { node: usize, cut: Duration },
}

impl Fault {
    fn draw(rng: &mut Rng) -> Fault {
        match rng.below(4) {
            0 | 1 => Fault::Kill {
                node: rng.below(3) as usize,
                wipe: rng.below(2) == 1,
                down: rng.ms(200, 1500),
            },
            2 => Fault::KillLeader {
                wipe: rng.below(2) == 1,
                down: rng.ms(200, 1500),
            },
            _ => Fault::Partition {
                node: rng.below(3) as usize,
                cut: rng.ms(1000, 3000),
            },
        }
    }
}

/// What the load submits to: each node's base URL while it runs, and its incarnation
/// (how many times the test has killed it).
type Fronts = Arc<Mutex<Vec<(Option<String>, u32)>>>;

/// The client side of a chaos run: what was submitted, and the acknowledged operations
/// it follows to their end, as a client polling `GET /v1/ops/{id}` does.
#[derive(Default)]
struct Client {
    /// Acknowledged, end not seen yet.
    pending: Mutex<Vec<Accepted>>,
    /// Acknowledged, and how they ended.
    ended: Mutex<Vec<(Accepted, Value)>>,
    /// Acknowledged by a node killed before the client saw their end, which no longer
    /// knows them once restarted (restarted without its data dir, or it had finished them
    /// and kept their result in memory only): the client submits them again with their
    /// key.
    orphaned: Mutex<Vec<Accepted>>,
    /// Acknowledged by a node killed before they ended, and read to their end on it once
    /// restarted (the journal ran them again).
    journaled: AtomicU64,
    /// Refused, or without an answer.
    other: Mutex<Vec<Fate>>,
    sent: AtomicU64,
}

impl Client {
    fn record(&self, fates: Vec<Fate>) {
        for f in fates {
            self.sent.fetch_add(1, Ordering::SeqCst);
            match f {
                Fate::Accepted(a) => match a.outcome.clone() {
                    Some(v) => self.ended.lock().push((a, v)),
                    None => self.pending.lock().push(a),
                },
                other => self.other.lock().push(other),
            }
        }
    }

    /// Reads every pending operation once on its origin: an ended one moves to `ended`,
    /// one that its origin, restarted since, does not know to `orphaned`. Answers how
    /// many are pending.
    async fn poll(&self, fronts: &Fronts) -> usize {
        let pending = std::mem::take(&mut *self.pending.lock());
        let now: Vec<(Option<String>, u32)> = fronts.lock().clone();
        let mut ask = Vec::new();
        for a in pending {
            match &now[a.origin].0 {
                Some(base) => ask.push((format!("{base}/v1/ops/{}", a.id), a)),
                None => self.pending.lock().push(a),
            }
        }
        for (a, v) in read_all(ask).await {
            let restarted = a.incarnation != now[a.origin].1;
            match v {
                Some(v) if is_terminal(&v) => {
                    if restarted {
                        self.journaled.fetch_add(1, Ordering::SeqCst);
                    }
                    self.ended.lock().push((a, v))
                }
                Some(v) if restarted && v["error"] == "not_found" => self.orphaned.lock().push(a),
                _ => self.pending.lock().push(a),
            }
        }
        self.pending.lock().len()
    }
}

/// Keyed operations of [`HOOK`] submitted to the running nodes in turn, one every 40 ms,
/// until `stop`: mostly one by one (202), every tenth waiting, every tenth a batch of 4.
async fn keyed_load(worker: usize, fronts: Fronts, stop: Arc<AtomicBool>, c: Arc<Client>) {
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let op = |j: usize| Op::keyed(format!("c{worker}-{n}-{j}"), 15_000);
        let sub = match n % 10 {
            7 => Submission::Wait(op(0)),
            8 => Submission::Batch((0..4).map(op).collect()),
            _ => Submission::Single(op(0)),
        };
        let target = {
            let f = fronts.lock();
            (0..3)
                .map(|d| (n + worker + d) % 3)
                .find_map(|i| f[i].0.clone().map(|b| (i, b, f[i].1)))
        };
        if let Some((i, base, incarnation)) = target {
            c.record(submit(&base, i, incarnation, &sub).await);
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// Polls the pending operations of `c` every 200 ms until `stop`.
async fn follow_load(c: Arc<Client>, fronts: Fronts, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        c.poll(&fronts).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A chaos run's cluster: three nodes with data dirs, behind a [`Partition`].
struct Chaos {
    layout: Layout,
    partition: Partition,
    nodes: Vec<Server>,
    fronts: Fronts,
}

impl Chaos {
    fn kill(&mut self, i: usize) {
        {
            let mut f = self.fronts.lock();
            f[i].0 = None;
            f[i].1 += 1;
        }
        self.nodes[i].signal("KILL");
        self.nodes[i].wait_exit(Duration::from_secs(5));
    }

    /// Starts node `i` again: from its data dir, or (`wipe`) with an empty one, joining
    /// through the next node.
    async fn restart(&mut self, i: usize, wipe: bool) {
        let layout = self.layout.clone();
        if wipe {
            let dir = &layout.dirs.as_ref().expect("chaos nodes have data dirs")[i];
            std::fs::remove_dir_all(dir).unwrap();
        }
        let seed = wipe.then_some((i + 1) % 3);
        let s = tokio::task::spawn_blocking(move || layout.start(i, seed))
            .await
            .unwrap();
        // Like a Service, the load goes to a node once it is ready.
        wait_until(
            "the restarted node ready",
            Duration::from_secs(30),
            || async {
                client()
                    .get(s.url("/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200)
            },
        )
        .await;
        self.fronts.lock()[i].0 = Some(s.base.clone());
        self.nodes[i] = s;
    }

    /// Waits until every node sees three up, three voters and a leader; past 30 s, fails
    /// with what each node sees (and whether its process is gone).
    async fn healed(&mut self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut healed = true;
            for n in &self.nodes {
                if !(sees_up(n, 3).await && voters_seen(n).await == 3) {
                    healed = false;
                    break;
                }
            }
            if healed {
                return;
            }
            if Instant::now() >= until {
                let mut views = Vec::new();
                for (i, n) in self.nodes.iter_mut().enumerate() {
                    let exited = n.child.try_wait().ok().flatten();
                    let seen = cluster_view(n).await.map(|c| {
                        let nodes: Vec<String> = c["nodes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|x| format!("{} {} {}", x["id"], x["status"], x["role"]))
                            .collect();
                        format!("leader {} term {}, {nodes:?}", c["leader"], c["term"])
                    });
                    views.push(format!("{}: exited {exited:?}, sees {seen:?}", NAMES[i]));
                }
                panic!("the cluster did not heal within 30 s: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Applies `fault`; answers what it did and when it ended (the restart, the heal).
    async fn apply(&mut self, fault: Fault) -> (String, Instant) {
        match fault {
            Fault::Kill { node, wipe, down } => {
                self.kill(node);
                tokio::time::sleep(down).await;
                let ended = Instant::now();
                self.restart(node, wipe).await;
                let how = if wipe { "without" } else { "with" };
                (
                    format!(
                        "kill -9 {}, restarted {how} its data dir after {down:?}",
                        NAMES[node]
                    ),
                    ended,
                )
            }
            Fault::KillLeader { wipe, down } => {
                // Elections may still follow the last heal: wait for a leader.
                let until = Instant::now() + Duration::from_secs(10);
                let leader = loop {
                    if let Some(l) = leader_of(&self.nodes[0]).await {
                        break index_of(&l);
                    }
                    assert!(Instant::now() < until, "no leader within 10 s");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                let (what, ended) = Box::pin(self.apply(Fault::Kill {
                    node: leader,
                    wipe,
                    down,
                }))
                .await;
                (format!("{what} (the leader)"), ended)
            }
            Fault::Partition { node, cut } => {
                self.partition.isolate(Some(NAMES[node]));
                tokio::time::sleep(cut).await;
                self.partition.heal();
                (
                    format!("{} cut off for {cut:?}", NAMES[node]),
                    Instant::now(),
                )
            }
        }
    }
}

/// The seed of the chaos schedule: `OPMESH_CHAOS_SEED`, or a fixed one.
fn chaos_seed() -> u64 {
    std::env::var("OPMESH_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_130_613)
}

/// Faults drawn from `seed` (kill -9 and restart with or without the data dir, the
/// leader killed, a node cut off), one at a time with the cluster healed in between,
/// for `run_for` (or `max_faults`), under steady keyed load to every running node, with
/// the journal of accepted operations on. Every acknowledged operation is followed to its
/// end as the load goes; one whose origin was killed after acknowledging it and no longer
/// knows it once restarted is submitted again with its key, as a client would. Prints the summary line; asserts nothing lost, no effect applied
/// twice.
async fn chaos(seed: u64, run_for: Duration, max_faults: usize) {
    let rx = Receiver::start((10, 100));
    let tmp = tempfile::tempdir().unwrap();
    let partition = Partition::default();
    let layout = Layout::new()
        .with_dirs(&tmp.path().join("data"))
        .with_config(&rx.config(tmp.path()))
        .with_env(&[("OPMESH_ENGINE__JOURNAL", "true")])
        .behind(&partition)
        .await;
    let nodes = layout.start_three().await;
    let fronts: Fronts = Arc::new(Mutex::new(
        nodes.iter().map(|n| (Some(n.base.clone()), 0)).collect(),
    ));
    let mut c = Chaos {
        layout,
        partition,
        nodes,
        fronts: fronts.clone(),
    };
    let all: Vec<&Server> = c.nodes.iter().collect();
    set_route_everywhere(&c.nodes[0], &all, HOOK, "round_robin", &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let cl = Arc::new(Client::default());
    let load: Vec<_> = (0..4)
        .map(|w| tokio::spawn(keyed_load(w, fronts.clone(), stop.clone(), cl.clone())))
        .collect();
    let following = tokio::spawn(follow_load(cl.clone(), fronts.clone(), stop.clone()));
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut heal_ms = Vec::new();
    while started.elapsed() < run_for && heal_ms.len() < max_faults {
        let fault = Fault::draw(&mut rng);
        let pause = rng.ms(300, 1500);
        let (what, ended) = c.apply(fault).await;
        c.healed().await;
        let ms = ended.elapsed().as_millis() as u64;
        heal_ms.push(ms);
        eprintln!("chaos fault {}: {what}; healed in {ms} ms", heal_ms.len());
        tokio::time::sleep(pause).await;
    }
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.await.unwrap();
    }
    following.await.unwrap();
    // What is still pending is followed to its end.
    let until = Instant::now() + Duration::from_secs(30);
    while cl.poll(&fronts).await > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Orphans, and submissions that got no answer, are submitted again with their key
    // (waiting for the outcome), as a client would.
    let all: Vec<&Server> = c.nodes.iter().collect();
    let bases: Vec<String> = all.iter().map(|n| n.base.clone()).collect();
    let again = |op: Op, n: usize| {
        let base = bases[n % 3].clone();
        async move {
            match submit(&base, n % 3, 0, &Submission::Wait(op)).await.pop() {
                Some(Fate::Accepted(a)) => a.outcome,
                _ => None,
            }
        }
    };
    let orphans = std::mem::take(&mut *cl.orphaned.lock());
    let orphaned = orphans.len();
    let resubmitted: Vec<(Accepted, Option<Value>)> =
        futures::stream::iter(orphans.into_iter().enumerate())
            .map(|(n, a)| {
                let run = again(a.op.clone(), n);
                async move { (a, run.await) }
            })
            .buffer_unordered(8)
            .collect()
            .await;
    let mut refused = 0;
    let mut unanswered = Vec::new();
    // Why submissions were refused or unanswered, by the first words of the reason.
    let mut why = std::collections::BTreeMap::<String, usize>::new();
    for f in std::mem::take(&mut *cl.other.lock()) {
        let reason = match f {
            Fate::Refused(r) => {
                refused += 1;
                r
            }
            Fate::Unknown(op, r) => {
                unanswered.push(op);
                r
            }
            Fate::Accepted(_) => unreachable!("kept apart"),
        };
        *why.entry(reason.chars().take(60).collect()).or_default() += 1;
    }
    futures::stream::iter(unanswered.iter().cloned().enumerate())
        .map(|(n, op)| again(op, n))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    eprintln!("chaos: submissions refused or unanswered: {why:?}");

    let sent = cl.sent.load(Ordering::SeqCst);
    let ended = std::mem::take(&mut *cl.ended.lock());
    let pending = std::mem::take(&mut *cl.pending.lock());
    let accepted = ended.len() + pending.len() + resubmitted.len();
    let t = {
        let ledger = rx.ledger();
        let mut t = Tally::default();
        for (a, v) in &ended {
            t.judge(a, Some(v), &ledger);
        }
        for (a, v) in &resubmitted {
            t.judge(a, v.as_ref(), &ledger);
        }
        for a in &pending {
            t.judge(a, None, &ledger);
        }
        t
    };
    let (repeats, duplicated, unkeyed) = rx.effects();
    eprintln!(
        "chaos seed={seed} sent={sent} accepted={accepted} succeeded={} failed_with_reason={} lost={} \
         duplicated_effects={duplicated} time_to_heal_ms={} faults={} repeats={repeats} \
         journaled={} orphaned={orphaned} refused={refused} unanswered={}",
        t.succeeded,
        t.failed_with_reason,
        t.lost.len() + t.without_reason.len(),
        heal_ms.iter().max().copied().unwrap_or(0),
        heal_ms.len(),
        cl.journaled.load(Ordering::SeqCst),
        unanswered.len(),
    );
    eprintln!("chaos: failures by reason: {:?}", t.reasons);
    assert!(t.succeeded > 0, "the load ran");
    t.assert_sound("chaos");
    assert_eq!(duplicated, 0, "no effect applied twice");
    assert_eq!(unkeyed, 0, "every webhook call carries its key");
    nothing_waits(&all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_keyed_load_loses_nothing_and_applies_each_effect_once() {
    chaos(chaos_seed(), Duration::from_secs(45), usize::MAX).await;
}

/// The long chaos run: `OPMESH_CHAOS_SECS` of faults (default 600), at most
/// `OPMESH_CHAOS_ROUNDS` of them, seeded by `OPMESH_CHAOS_SEED`. Run by `scripts/chaos`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/chaos"]
async fn chaos_long_run() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let secs = env("OPMESH_CHAOS_SECS").unwrap_or(600);
    let rounds = env("OPMESH_CHAOS_ROUNDS").map_or(usize::MAX, |r| r as usize);
    chaos(chaos_seed(), Duration::from_secs(secs), rounds).await;
}
