//! The api over https, against the real binary: certificates made by a test CA, a client
//! that trusts it (and one that does not, and plain http), the CLI with `--cacert`, a
//! renewed certificate served without a restart, client certificates, and the start-up
//! errors of bad TLS files.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tls::{Ca, Leaf};
use common::{cli, wait_until, Server};
use serde_json::{json, Value};

/// Starts a node serving `leaf` (written to `dir`) with `env`.
fn serve(dir: &Path, leaf: &Leaf, env: &[(&str, &str)]) -> Server {
    let (cert, key) = leaf.write(dir, "tls");
    Server::start(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        env,
    )
}

/// The leaf certificate a new connection to `url` is served, DER encoded.
async fn served_certificate(ca: &Ca, url: &str) -> Option<Vec<u8>> {
    // A client per call: a new connection, a new handshake.
    let client = ca.trusting_client().tls_info(true).build().unwrap();
    let resp = client.get(url).send().await.ok()?;
    let info = resp.extensions().get::<reqwest::tls::TlsInfo>()?;
    info.peer_certificate().map(<[u8]>::to_vec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_probes_dashboard_and_operations_to_clients_that_trust_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("opmesh test ca");
    let s = serve(dir.path(), &ca.server("node"), &[]);
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);

    let c = ca.trusting_client().build().unwrap();
    for path in ["/healthz", "/readyz", "/", "/dashboard/app.js", "/metrics"] {
        let r = c.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = c
        .post(s.url("/v1/ops?wait=true"))
        .json(&json!({"type": "echo", "payload": {"over": "tls"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"over": "tls"}));

    // Plain http to the https port: no answer.
    let plain = s.base.replacen("https://", "http://", 1);
    let r = common::client()
        .get(format!("{plain}/healthz"))
        .send()
        .await;
    assert!(r.is_err(), "plain http got an answer: {r:?}");

    // A client that does not trust the CA refuses the certificate.
    let e = reqwest::Client::builder()
        .build()
        .unwrap()
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap_err();
    assert!(opmesh::tls::is_bad_certificate(&e), "{e:?}");
}

#[test]
fn the_cli_reaches_an_https_node_with_cacert_and_says_what_to_do_without() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("opmesh test ca");
    let s = serve(
        dir.path(),
        &ca.server("node"),
        &[("OPMESH_NODE_ID", "tls-1")],
    );
    let ca_file = ca.write(dir.path(), "ca.pem");
    let ca_file = ca_file.to_str().unwrap();

    let (code, out, err) = cli(&["health", "--target", &s.base, "--cacert", ca_file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node:      tls-1"), "{out}");

    let (code, out, err) = cli(&[
        "submit",
        "echo",
        r#"{"n": 7}"#,
        "--wait",
        "--json",
        "--target",
        &s.base,
        "--cacert",
        ca_file,
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"n": 7}));

    let (code, _, err) = cli(&["health", "--target", &s.base]);
    assert_ne!(code, 0);
    assert!(
        err.contains("health: could not reach the node; its TLS certificate did not verify")
            && err.contains("--cacert <PEM> (or OPMESH_CACERT)"),
        "{err}"
    );

    let (code, _, err) = cli(&[
        "health",
        "--target",
        &s.base,
        "--cacert",
        "/nonexistent/ca.pem",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--cacert: cannot read `/nonexistent/ca.pem`"),
        "{err}"
    );

    // The bench drives an https target too.
    let (code, out, err) = cli(&[
        "bench",
        "--target",
        &s.base,
        "--cacert",
        ca_file,
        "--ops",
        "50",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(report["ops"], 50, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_to_new_connections_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("opmesh test ca");
    let first = ca.server("first");
    let s = serve(dir.path(), &first, &[("OPMESH_HTTP__TLS_RELOAD_SECS", "1")]);
    let healthz = s.url("/healthz");
    assert_eq!(served_certificate(&ca, &healthz).await, Some(first.der()));

    // As a Secret update or a renewal does: new files in place, the key a moment after
    // the certificate (the pair in between does not fit and is not taken).
    let renewed = ca.server("renewed");
    common::tls::write(dir.path(), "tls.crt", &renewed.cert_pem);
    common::tls::write(dir.path(), "tls.key", &renewed.key_pem);
    let want = renewed.der();
    wait_until(
        "a new connection is served the renewed certificate",
        Duration::from_secs(20),
        || async { served_certificate(&ca, &healthz).await.as_ref() == Some(&want) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("opmesh test ca");
    let clients = Ca::new("opmesh clients ca");
    let client_ca = clients.write(dir.path(), "clients.pem");
    let s = serve(
        dir.path(),
        &ca.server("node"),
        &[("OPMESH_HTTP__TLS_CLIENT_CA", client_ca.to_str().unwrap())],
    );
    let healthz = s.url("/healthz");

    let anonymous = ca.trusting_client().build().unwrap();
    let r = anonymous.get(&healthz).send().await;
    assert!(r.is_err(), "a client without a certificate got in: {r:?}");

    let stranger = Ca::new("another ca").client_cert("stranger");
    let r = ca
        .trusting_client()
        .identity(stranger.identity())
        .build()
        .unwrap()
        .get(&healthz)
        .send()
        .await;
    assert!(r.is_err(), "a certificate of another CA got in: {r:?}");

    let known = clients.client_cert("ops-team");
    let r = ca
        .trusting_client()
        .identity(known.identity())
        .build()
        .unwrap()
        .get(&healthz)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn bad_tls_files_stop_start_up_with_exit_2_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("opmesh test ca");
    let (cert, key) = ca.server("node").write(dir.path(), "tls");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let absent = dir.path().join("absent.crt");
    let absent = absent.to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--http-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        cli(&args)
    };

    let (code, _, err) = serve(&["--tls-cert", absent, "--tls-key", key]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value for `http.tls_cert` in flag `--tls-cert`: cannot read `")
            && err.contains(absent),
        "{err}"
    );

    let (code, _, err) = serve(&["--tls-cert", cert, "--tls-key", cert]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`http.tls_key`") && err.contains("holds no PEM private key"),
        "{err}"
    );

    let (code, _, err) = serve(&["--tls-cert", cert, "--check-config"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "`http.tls_key` must be set because `http.tls_cert` is set in flag `--tls-cert`"
        ),
        "{err}"
    );

    let (code, out, err) = serve(&["--tls-cert", cert, "--tls-key", key, "--check-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("tls: {cert} (key {key}")), "{out}");
}
