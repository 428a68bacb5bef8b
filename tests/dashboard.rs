//! The dashboard at `/`, in a real browser: headless Chromium opens the page of the real
//! binary after known work, and the test reads the rendered page: the node, the route,
//! figures that move while it watches (the live event stream), and the failed operations
//! (loaded, and arriving live), each linked to its trace when a Jaeger UI is configured.
//! It leaves a screenshot in `<target>/test-artifacts/dashboard.png`.
//!
//! Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`):
//! `--dump-dom --virtual-time-budget` never finishes on a page that keeps an event stream
//! open (virtual time waits for pending fetches), and a plain `--dump-dom` reads the page
//! before its first fetch answers. The protocol lets the test wait on what the page shows,
//! with a deadline.
//!
//! Without Chromium (`scripts/install-test-deps` installs it) the tests say so loudly and
//! pass, unless `OPMESH_REQUIRE_BROWSER=1` (as `scripts/test` sets), where they fail.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{client, get_json, run_op, wait_until, Server};
use serde_json::{json, Value};

/// The longest a browser may run for one test.
const BROWSER_LIFETIME: Duration = Duration::from_secs(90);
/// How long the page gets to show what a test waits for.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// A headless Chromium on a DevTools pipe

/// Where Chromium is: `OPMESH_CHROMIUM`, or Debian's `/usr/bin/chromium`. `None` when it is
/// missing and the browser is not required (the caller then skips).
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("OPMESH_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        return Some(path);
    }
    if std::env::var("OPMESH_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!(
            "Chromium is required (OPMESH_REQUIRE_BROWSER=1) but {} does not exist: run \
             scripts/install-test-deps, or point OPMESH_CHROMIUM at a Chromium binary",
            path.display()
        );
    }
    eprintln!(
        "\n========================================================================\n\
         SKIPPED: the dashboard browser test needs Chromium at {} (run\n\
         scripts/install-test-deps, or set OPMESH_CHROMIUM). Set\n\
         OPMESH_REQUIRE_BROWSER=1 to make its absence a failure.\n\
         ========================================================================\n",
        path.display()
    );
    None
}

/// A Chromium process and one page in it, driven over the DevTools protocol.
struct Browser {
    child: Child,
    /// Commands go here, NUL-terminated JSON (the browser's fd 3).
    commands: ChildStdin,
    /// Messages from the browser (its fd 4), one JSON value each.
    messages: Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    /// Exceptions the page threw and errors it logged.
    page_errors: Vec<String>,
    profile: tempfile::TempDir,
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("a temp dir for the browser profile");
        let log = std::fs::File::create(profile.path().join("chromium.log")).unwrap();
        // The pipe protocol reads fd 3 and writes fd 4: a shell moves the child's stdin and
        // stdout there (no unsafe code needed to hand over extra descriptors).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("sh")
            .arg(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("chromium starts");
        let commands = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, messages) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            loop {
                let mut msg = Vec::new();
                match r.read_until(0, &mut msg) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if msg.last() == Some(&0) {
                            msg.pop();
                        }
                        if let Ok(v) = serde_json::from_slice(&msg) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        // A watchdog: the browser never outlives its time, whatever the test does.
        let pid = child.id();
        std::thread::spawn(move || {
            std::thread::sleep(BROWSER_LIFETIME);
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        Browser {
            child,
            commands,
            messages,
            next_id: 0,
            session: None,
            page_errors: Vec::new(),
            profile,
        }
    }

    /// Sends a command (to the page, once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .and_then(|_| self.commands.flush())
            .unwrap_or_else(|e| panic!("writing to chromium: {e}{}", self.log_tail()));
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let m = match self.messages.recv_timeout(left) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "chromium did not answer {method} in 30 s{}",
                        self.log_tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("chromium exited during {method}{}", self.log_tail())
                }
            };
            if m["id"] == id {
                if let Some(e) = m.get("error") {
                    panic!("chromium refused {method}: {e}");
                }
                return m["result"].clone();
            }
            self.note_event(&m);
        }
    }

    fn note_event(&mut self, m: &Value) {
        match m["method"].as_str() {
            Some("Runtime.exceptionThrown") => {
                let d = &m["params"]["exceptionDetails"];
                self.page_errors
                    .push(format!("{} {}", d["text"], d["exception"]["description"]));
            }
            Some("Runtime.consoleAPICalled") if m["params"]["type"] == "error" => {
                self.page_errors
                    .push(format!("console.error {}", m["params"]["args"]));
            }
            _ => {}
        }
    }

    /// Opens `url` in a new 1400×1000 page and attaches to it.
    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }));
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        self.call("Runtime.enable", json!({}));
        self.call("Page.enable", json!({}));
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false }),
        );
        self.call("Page.navigate", json!({ "url": url }));
    }

    /// Evaluates a JavaScript expression in the page; answers its JSON value.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expression}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page (an expression that throws, say on
    /// an element not rendered yet, is not).
    fn wait_for(&mut self, what: &str, expression: &str) {
        let until = Instant::now() + PAGE_DEADLINE;
        loop {
            let v = self.eval(&format!(
                "(() => {{ try {{ return !!({expression}); }} catch (e) {{ return String(e); }} }})()"
            ));
            if v == json!(true) {
                return;
            }
            if Instant::now() >= until {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "the dashboard never showed {what} within {PAGE_DEADLINE:?}: `{expression}` \
                     was {v};\npage errors: {:?}\npage text:\n{}",
                    self.page_errors,
                    text.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn html(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("the screenshot is base64")
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.profile.path().join("chromium.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let tail: Vec<&str> = s.lines().rev().take(20).collect();
        format!(
            "\n--- chromium log (last lines) ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<target>/test-artifacts`, created.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `s` as a JavaScript string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ---------------------------------------------------------------------------------------
// Known work

async fn op(base: &str, body: Value) -> Value {
    run_op(base, &body).await
}

async fn failing_op(base: &str) -> Value {
    let v = op(base, json!({"type": "resize", "payload": {"width": -1}})).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["trace_id"].is_string(), "{v}");
    v
}

/// Echo operations, a pinned route for `echo`, a keyed repeat (a cache hit) and a failed
/// `resize`; answers the failed operation.
async fn known_work(base: &str, node: &str) -> Value {
    let r = client()
        .put(format!("{base}/v1/routes/echo"))
        .json(&json!({"strategy": "pinned", "nodes": [node]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for i in 0..20 {
        op(base, json!({"type": "echo", "payload": {"n": i}})).await;
    }
    for _ in 0..3 {
        op(
            base,
            json!({"type": "echo", "idempotency_key": "same", "payload": 1}),
        )
        .await;
    }
    let bad = failing_op(base).await;
    // The dashboard loads recent failures from /v1/failures: wait until it lists this one.
    let failures = format!("{base}/v1/failures");
    wait_until(
        "the failure listed first in /v1/failures",
        Duration::from_secs(10),
        || async { get_json(&failures).await["failures"][0]["id"] == bad["id"] },
    )
    .await;
    bad
}

/// What every dashboard shows after [`known_work`], checked in the browser.
fn check_page(b: &mut Browser, rt: &tokio::runtime::Runtime, base: &str, node: &str, bad: &Value) {
    let node_js = js(node);
    b.wait_for(
        "the node id",
        &format!("document.getElementById('node-id').textContent === {node_js}"),
    );
    b.wait_for(
        "the node in the cluster table, healthy and leading",
        &format!(
            "document.querySelector('tr[data-node-id=' + JSON.stringify({node_js}) + \
             '][data-status=\"up\"][data-leader=\"true\"]')"
        ),
    );
    b.wait_for(
        "the echo route",
        &format!(
            "(r => r && r.dataset.strategy === 'pinned' && r.textContent.includes({node_js}))\
             (document.querySelector('tr[data-route-type=\"echo\"]'))"
        ),
    );
    b.wait_for(
        "echo latency percentiles",
        "['p50', 'p95', 'p99'].every(f => /\\d/.test(document.querySelector(\
         'tr[data-op-type=\"echo\"] [data-field=\"' + f + '\"]').textContent))",
    );
    b.wait_for(
        "a cache hit rate",
        "document.getElementById('cache-hit-rate').textContent.includes('%')",
    );
    b.wait_for(
        "the event stream connected",
        "document.getElementById('stream-status').dataset.state === 'live'",
    );
    let bad_id = js(bad["id"].as_str().unwrap());
    b.wait_for(
        "the failed operation (loaded from /v1/failures)",
        &format!(
            "(r => r && r.textContent.includes('resize expects'))\
             (document.querySelector('tr[data-failure-id=' + JSON.stringify({bad_id}) + ']'))"
        ),
    );

    // Figures move while the page watches: more work, then the counters follow (from
    // the metrics:collected events), and a new failure arrives (operation:failure).
    let completed = b.eval("Number(document.getElementById('completed').dataset.value)");
    let completed = completed.as_f64().unwrap();
    assert!(completed >= 24.0, "completed operations shown: {completed}");
    let live_bad = rt.block_on(async {
        for i in 0..10 {
            op(base, json!({"type": "echo", "payload": {"live": i}})).await;
        }
        failing_op(base).await
    });
    b.wait_for(
        "the completed count to follow new work",
        &format!(
            "Number(document.getElementById('completed').dataset.value) >= {}",
            completed + 11.0
        ),
    );
    b.wait_for(
        "a non-zero throughput",
        "Number(document.getElementById('throughput').dataset.value) > 0",
    );
    let live_id = js(live_bad["id"].as_str().unwrap());
    b.wait_for(
        "the failure that happened while the page was open",
        &format!("document.querySelector('tr[data-failure-id=' + JSON.stringify({live_id}) + ']')"),
    );
    b.wait_for(
        "newest failure first",
        &format!("document.querySelector('#failures tr').dataset.failureId === {live_id}"),
    );
}

/// Where the failed operation `bad`'s row links its trace (empty if it has no link).
fn trace_link(b: &mut Browser, bad: &Value) -> String {
    let id = js(bad["id"].as_str().unwrap());
    b.eval(&format!(
        "(a => a ? a.href : '')(document.querySelector('tr[data-failure-id=' + JSON.stringify({id}) + '] a.trace-link'))"
    ))
    .as_str()
    .unwrap_or_default()
    .to_string()
}

fn save_page(b: &mut Browser, name: &str) -> PathBuf {
    let dir = artifacts();
    std::fs::write(dir.join(format!("{name}.html")), b.html()).unwrap();
    let png = b.screenshot();
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    assert!(
        size > 20_000,
        "the screenshot is {size} bytes: a blank page?"
    );
    eprintln!("dashboard screenshot: {} ({size} bytes)", path.display());
    path
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn the_dashboard_shows_the_node_routes_live_figures_and_failures() {
    let Some(chromium) = chromium() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The Jaeger UI from the environment, as a pod's manifest would set it.
    let jaeger = "http://jaeger.example.test:16686";
    let s = Server::start(
        &["--node-id", "dash-1"],
        &[("OPMESH_TELEMETRY__JAEGER_UI_URL", jaeger)],
    );
    let bad = rt.block_on(known_work(&s.base, "dash-1"));
    let config: Value = rt.block_on(async { get_json(&s.url("/v1/dashboard/config")).await });
    assert_eq!(config["node"], "dash-1");

    let started = Instant::now();
    let mut b = Browser::launch(&chromium);
    b.open(&s.url("/"));
    check_page(&mut b, &rt, &s.base, "dash-1", &bad);
    b.wait_for(
        "the single node's summary",
        "document.getElementById('cluster-summary').textContent === 'single node'",
    );
    assert_eq!(
        trace_link(&mut b, &bad),
        format!("{jaeger}/trace/{}", bad["trace_id"].as_str().unwrap()),
        "the failed operation links to its trace in the configured Jaeger UI"
    );
    save_page(&mut b, "dashboard");
    assert!(b.page_errors.is_empty(), "page errors: {:?}", b.page_errors);
    eprintln!("browser part took {:?}", started.elapsed());
}

/// The Jaeger links, through the api served in process, with the URL set on the
/// telemetry handle (a trailing `/` dropped); and the server stops promptly with the
/// page's event stream open.
#[test]
fn failed_operations_link_to_their_traces_in_jaeger() {
    let Some(chromium) = chromium() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let jaeger = "http://jaeger.test:16686";
    let (node, server, base) = rt.block_on(async {
        let telemetry = opmesh::telemetry::Telemetry::start(
            &opmesh::telemetry::TelemetrySettings {
                traces: None,
                jaeger_ui_url: Some(format!("{jaeger}/")),
            },
            "node-1",
        )
        .expect("telemetry without export starts");
        let builder = opmesh::Node::builder()
            .node_id("jaeger-1")
            .tracing(telemetry.tracing());
        let node = opmesh::handlers::register_builtins(builder, &[])
            .start()
            .await
            .unwrap();
        let settings = opmesh::api::ApiSettings {
            addr: "127.0.0.1:0".parse().unwrap(),
            workers: 1,
            max_body_bytes: 1 << 20,
            max_batch_ops: 1000,
            max_subscribers: 16,
            keep_alive: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
            telemetry,
            tokens: None,
            protect_metrics: false,
            limits: opmesh::config::LimitsConfig::off(),
            journal: None,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = opmesh::api::start(node.clone(), None, listener, &settings).unwrap();
        let base = format!("http://{}", server.addr);
        (node, server, base)
    });
    let bad = rt.block_on(known_work(&base, "jaeger-1"));
    let mut b = Browser::launch(&chromium);
    b.open(&format!("{base}/"));
    check_page(&mut b, &rt, &base, "jaeger-1", &bad);
    assert_eq!(
        trace_link(&mut b, &bad),
        format!("{jaeger}/trace/{}", bad["trace_id"].as_str().unwrap()),
        "the operation id links to its trace (the configured URL's trailing / dropped)"
    );
    save_page(&mut b, "dashboard-jaeger");
    assert!(b.page_errors.is_empty(), "page errors: {:?}", b.page_errors);
    // The server stops promptly with the page's event stream still open.
    let stopped = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            opmesh::server::run_until(node, server, Duration::from_secs(1), async {}),
        )
        .await
        .expect("the server stops promptly")
        .unwrap()
    });
    assert!(stopped.is_clean(), "{stopped:?}");
    drop(b);
}

/// A node that checks tokens: the page asks for one, keeps it in the tab, and then shows
/// the node and its live figures with it (the event stream included).
#[test]
fn the_dashboard_asks_for_a_token_when_the_node_checks_them() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"viewer\"\nsecret = \"viewer-secret-000000\"\nscopes = [\"read\"]\n",
    )
    .unwrap();
    let s = Server::start(
        &["--node-id", "locked-1"],
        &[("OPMESH_AUTH__TOKENS_FILE", tokens.to_str().unwrap())],
    );
    let mut b = Browser::launch(&chromium);
    b.open(&s.url("/"));
    b.wait_for(
        "the token form",
        "!document.getElementById('token-form').hidden",
    );
    assert_eq!(
        b.eval("document.getElementById('node-id').textContent"),
        json!("?"),
        "nothing is shown without a token"
    );
    b.eval(
        "document.getElementById('token-input').value = 'viewer-secret-000000'; \
         document.getElementById('token-form').requestSubmit(); true",
    );
    b.wait_for(
        "the node, read with the token",
        "document.getElementById('node-id').textContent === 'locked-1'",
    );
    b.wait_for(
        "the live event stream",
        "document.getElementById('stream-status').dataset.state === 'live'",
    );
    assert_eq!(
        b.eval("document.getElementById('token-form').hidden"),
        json!(true)
    );
    assert_eq!(
        b.eval("sessionStorage.getItem('opmesh-token')"),
        json!("viewer-secret-000000"),
        "kept in this tab's session storage"
    );
    assert_eq!(
        b.eval("localStorage.length"),
        json!(0),
        "never in storage that outlives the tab"
    );
}

/// A webhook whose target is down: after five failures its circuit breaker opens, and the
/// types table shows it (a loud badge), beside each type's running slots.
#[test]
fn the_dashboard_shows_an_open_circuit_breaker_and_the_running_slots() {
    let Some(chromium) = chromium() else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Nothing listens there: every call is refused, a retryable failure.
    let dead = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hook.toml");
    std::fs::write(
        &config,
        format!(
            "[[handlers.http]]\ntype = \"hook\"\nurl = \"http://127.0.0.1:{dead}/hook\"\n\
             timeout_ms = 1000\nmax_attempts = 1\n"
        ),
    )
    .unwrap();
    let s = Server::start(
        &[
            "--node-id",
            "breaker-1",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    rt.block_on(async {
        op(&s.base, json!({"type": "echo", "payload": 1})).await;
        for _ in 0..5 {
            let v = op(&s.base, json!({"type": "hook", "payload": 1})).await;
            assert_eq!(v["status"], "failed", "{v}");
        }
        let m = get_json(&s.url("/v1/metrics")).await;
        assert_eq!(m["perType"]["hook"]["breaker"], "open", "{}", m["perType"]);
    });
    let mut b = Browser::launch(&chromium);
    b.open(&s.url("/"));
    b.wait_for(
        "the hook's breaker shown open",
        "(c => c && c.dataset.state === 'open' && c.textContent === 'open')\
         (document.querySelector('tr[data-op-type=\"hook\"] [data-field=\"breaker\"]'))",
    );
    b.wait_for(
        "echo's breaker shown closed",
        "document.querySelector('tr[data-op-type=\"echo\"] [data-field=\"breaker\"]')\
         .dataset.state === 'closed'",
    );
    b.wait_for(
        "echo's running slots: none of its half of 16384",
        "document.querySelector('tr[data-op-type=\"echo\"] [data-field=\"running\"]')\
         .textContent.replace(/[^0-9\\/]/g, '') === '0/8192'",
    );
    save_page(&mut b, "dashboard-breaker");
    assert!(b.page_errors.is_empty(), "page errors: {:?}", b.page_errors);
}
