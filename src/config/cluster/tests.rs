//! The `[cluster]` section's tests: its flags, file keys and environment forms, every
//! value's range, and that the secret never shows. Kept in a file of their own so that
//! `cluster.rs` reads in one go.

use super::*;
use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
use crate::config::{load, LoadOptions};

const SECRET: &str = "correct-horse-battery-staple";

fn cluster_flags() -> LoadOptions {
    LoadOptions {
        cluster_addr: Some("127.0.0.1:7071".into()),
        cluster_secret: Some(Secret::from(SECRET.to_owned())),
        ephemeral: true,
        ..LoadOptions::default()
    }
}

fn cluster_of(opts: &LoadOptions) -> ClusterConfig {
    load_ok(opts).cluster.expect("a cluster")
}

#[test]
fn cluster_flags_set_a_cluster_with_the_documented_defaults() {
    let _env = EnvGuard::new();
    let c = cluster_of(&cluster_flags());
    assert_eq!(c.listen, "127.0.0.1:7071".parse::<SocketAddr>().unwrap());
    assert_eq!(c.advertise, "127.0.0.1:7071");
    assert!(c.join.is_empty());
    assert_eq!(c.cluster_id, "opmesh");
    assert_eq!(c.secret.expose(), SECRET.as_bytes());
    assert_eq!(c.data_dir, None);
    assert!(c.serves.is_empty());
    assert_eq!(c.heartbeat, Duration::from_millis(100));
    assert_eq!(c.down_after, Duration::from_secs(1));
    assert_eq!(c.write_timeout, Duration::from_secs(3));
    assert_eq!(c.election_timeout, Duration::from_millis(200));
    assert_eq!(c.voters.get(), 3);
    assert_eq!(c.flush_bytes, 64 * 1024);
    assert_eq!(c.linger, Duration::ZERO);
    assert_eq!(c.max_frame, 16 * 1024 * 1024);
    assert!(c.previous_secret.is_none());
    assert_eq!(c.max_pending_handshakes, 64);

    let c = cluster_of(&LoadOptions {
        join: vec!["10.0.0.5:7071".into(), "opmesh-0.opmesh.svc:7071".into()],
        data_dir: Some("/var/lib/opmesh".into()),
        ..cluster_flags()
    });
    assert_eq!(c.join, ["10.0.0.5:7071", "opmesh-0.opmesh.svc:7071"]);
    assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/opmesh")));
}

#[test]
fn cluster_keys_load_from_a_file() {
    let _env = EnvGuard::new();
    let file = user_file(&format!(
        r#"
        [cluster]
        addr = "0.0.0.0:7071"
        advertise = "opmesh-1.opmesh.default.svc.cluster.local:7071"
        join = ["[fd00::5]:7071"]
        id = "prod.eu-1"
        secret = "{SECRET}"
        data_dir = "data"
        serves = ["echo"]
        heartbeat_ms = 50
        down_after_ms = 101
        write_timeout_ms = 100
        election_timeout_ms = 1000
        voters = 5
        flush_bytes = 1024
        linger_us = 250
        max_frame_bytes = 65536
        max_pending_handshakes = 8
        link_buffer_bytes = 1048576
        lanes = 3
        previous_secret = "the-secret-before-this-one"
        "#
    ));
    let c = cluster_of(&with_file(&file));
    assert_eq!(c.listen, "0.0.0.0:7071".parse::<SocketAddr>().unwrap());
    assert_eq!(
        c.advertise,
        "opmesh-1.opmesh.default.svc.cluster.local:7071"
    );
    assert_eq!(c.join, ["[fd00::5]:7071"]);
    assert_eq!(c.cluster_id, "prod.eu-1");
    assert_eq!(c.data_dir, Some(PathBuf::from("data")));
    assert_eq!(c.serves.iter().map(|t| &**t).collect::<Vec<_>>(), ["echo"]);
    assert_eq!(c.heartbeat, Duration::from_millis(50));
    assert_eq!(c.down_after, Duration::from_millis(101));
    assert_eq!(c.write_timeout, Duration::from_millis(100));
    assert_eq!(c.election_timeout, Duration::from_secs(1));
    assert_eq!(c.voters.get(), 5);
    assert_eq!(c.flush_bytes, 1024);
    assert_eq!(c.linger, Duration::from_micros(250));
    assert_eq!(c.max_frame, 65536);
    assert_eq!(c.max_pending_handshakes, 8);
    assert_eq!(c.link_buffer_bytes, 1 << 20);
    assert_eq!(c.lanes, 3);
    assert_eq!(
        c.previous_secret.as_ref().map(Secret::expose),
        Some(&b"the-secret-before-this-one"[..])
    );
}

#[test]
fn cluster_keys_other_than_addr_are_ignored_without_a_cluster() {
    let _env = EnvGuard::new();
    let file = user_file("[cluster]\nvoters = 4\nsecret = \"short\"\n");
    assert!(load_ok(&with_file(&file)).cluster.is_none());
}

#[test]
fn cluster_short_env_forms_are_read_as_written() {
    let mut env = EnvGuard::new();
    env.set("OPMESH_CLUSTER_ADDR", "[::1]:7071");
    // Digits only: parsed as TOML it would be a number.
    env.set("OPMESH_CLUSTER_SECRET", "1234567890123456789");
    env.set("OPMESH_DATA_DIR", "/data/007");
    env.set("OPMESH_JOIN", " 10.0.0.5:7071, opmesh-0.opmesh:7071 ,");
    let c = cluster_of(&LoadOptions::default());
    assert_eq!(c.listen, "[::1]:7071".parse::<SocketAddr>().unwrap());
    assert_eq!(c.advertise, "[::1]:7071");
    assert_eq!(c.secret.expose(), b"1234567890123456789");
    assert_eq!(c.data_dir, Some(PathBuf::from("/data/007")));
    assert_eq!(c.join, ["10.0.0.5:7071", "opmesh-0.opmesh:7071"]);

    // The previous secret, digits too.
    env.set("OPMESH_CLUSTER__PREVIOUS_SECRET", "9876543210987654321");
    let c = cluster_of(&LoadOptions::default());
    assert_eq!(
        c.previous_secret.as_ref().map(Secret::expose),
        Some(&b"9876543210987654321"[..])
    );

    // The two-underscore forms win; lists are comma separated there too.
    env.set("OPMESH_CLUSTER__JOIN", "10.0.0.6:7071");
    env.set("OPMESH_CLUSTER__ID", "42");
    env.set("OPMESH_CLUSTER__SERVES", "echo,sleep");
    let c = cluster_of(&LoadOptions::default());
    assert_eq!(c.join, ["10.0.0.6:7071"]);
    assert_eq!(c.cluster_id, "42");
    assert_eq!(
        c.serves.iter().map(|t| &**t).collect::<Vec<_>>(),
        ["echo", "sleep"]
    );

    // An empty list variable clears the list; flags win over the environment.
    env.set("OPMESH_CLUSTER__JOIN", "");
    assert!(cluster_of(&LoadOptions::default()).join.is_empty());
    let c = cluster_of(&LoadOptions {
        join: vec!["10.0.0.7:7071".into()],
        cluster_addr: Some("127.0.0.1:9000".into()),
        ..LoadOptions::default()
    });
    assert_eq!(c.join, ["10.0.0.7:7071"]);
    assert_eq!(c.listen.port(), 9000);
}

#[test]
fn cluster_without_a_secret_names_cluster_secret_and_how_to_set_it() {
    let _env = EnvGuard::new();
    let err = load_err(&LoadOptions {
        cluster_addr: Some("127.0.0.1:7071".into()),
        ..LoadOptions::default()
    });
    assert!(
        matches!(err, ConfigError::Missing { ref key, .. } if key == "cluster.secret"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "`cluster.secret` must be set because `cluster.addr` is set in flag \
             `--cluster-addr`"
        ),
        "{msg}"
    );
    assert!(msg.contains("--cluster-secret"), "{msg}");
    assert!(msg.contains("OPMESH_CLUSTER_SECRET"), "{msg}");
}

#[test]
fn short_secret_is_rejected() {
    let mut env = EnvGuard::new();
    env.set("OPMESH_CLUSTER_SECRET", "fifteen-bytes!!");
    let msg = load_err(&LoadOptions {
        cluster_addr: Some("127.0.0.1:7071".into()),
        ..LoadOptions::default()
    })
    .to_string();
    assert_eq!(
        msg,
        "invalid value for `cluster.secret`: \"<redacted>\" (allowed: at least 16 bytes; \
         this one has 15) in environment variable `OPMESH_CLUSTER_SECRET`"
    );
}

#[test]
fn a_short_or_mistyped_previous_secret_is_rejected_redacted() {
    let mut env = EnvGuard::new();
    env.set("OPMESH_CLUSTER__PREVIOUS_SECRET", "fifteen-bytes!!");
    let msg = load_err(&cluster_flags()).to_string();
    assert_eq!(
        msg,
        "invalid value for `cluster.previous_secret`: \"<redacted>\" (allowed: at least 16 \
         bytes; this one has 15) in environment variable `OPMESH_CLUSTER__PREVIOUS_SECRET`"
    );
    drop(env);
    let _env = EnvGuard::new();
    let file = user_file("[cluster]\nprevious_secret = 1234567890123456789\n");
    let msg = load_err(&LoadOptions {
        config_file: Some(file.path().to_owned()),
        ..cluster_flags()
    })
    .to_string();
    assert!(
        msg.starts_with("invalid value for `cluster.previous_secret`: \"<redacted>\""),
        "{msg}"
    );
    assert!(!msg.contains("1234567890123456789"), "{msg}");
}

#[test]
fn voters_must_be_one_three_or_five() {
    let mut env = EnvGuard::new();
    for ok in [1, 3, 5] {
        env.set("OPMESH_CLUSTER__VOTERS", &ok.to_string());
        assert_eq!(cluster_of(&cluster_flags()).voters.get(), ok);
    }
    for bad in [0, 2, 4, 7] {
        env.set("OPMESH_CLUSTER__VOTERS", &bad.to_string());
        let msg = load_err(&cluster_flags()).to_string();
        assert_eq!(
            msg,
            format!(
                "invalid value for `cluster.voters`: {bad} (allowed: 1, 3 or 5) in \
                 environment variable `OPMESH_CLUSTER__VOTERS`"
            )
        );
    }
}

#[test]
fn join_without_cluster_addr_is_rejected() {
    let mut env = EnvGuard::new();
    let err = load_err(&LoadOptions {
        join: vec!["10.0.0.5:7071".into()],
        ..LoadOptions::default()
    });
    assert!(
        matches!(err, ConfigError::Missing { ref key, .. } if key == "cluster.addr"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("set in flag `--join`"), "{msg}");
    assert!(msg.contains("--join needs --cluster-addr"), "{msg}");

    env.set("OPMESH_JOIN", "10.0.0.5:7071");
    let msg = load_err(&LoadOptions::default()).to_string();
    assert!(
        msg.contains("in environment variable `OPMESH_JOIN`"),
        "{msg}"
    );
}

#[test]
fn down_after_must_exceed_twice_the_heartbeat() {
    let mut env = EnvGuard::new();
    env.set("OPMESH_CLUSTER__HEARTBEAT_MS", "500");
    let msg = load_err(&cluster_flags()).to_string();
    assert!(
        msg.starts_with(
            "invalid value for `cluster.down_after_ms`: 1000 (allowed: 1001..=600000, \
             more than twice cluster.heartbeat_ms (500))"
        ),
        "{msg}"
    );
    env.set("OPMESH_CLUSTER__DOWN_AFTER_MS", "1001");
    assert_eq!(
        cluster_of(&cluster_flags()).down_after,
        Duration::from_millis(1001)
    );
}

#[test]
fn bad_cluster_values_are_rejected_naming_the_key() {
    let _env = EnvGuard::new();
    let cases = [
        (
            "addr = \"opmesh-0:7071\"",
            "`cluster.addr`: \"opmesh-0:7071\"",
        ),
        (
            "addr = \"0.0.0.0:7071\"",
            "`cluster.advertise`: \"\" (allowed: host:port other nodes can dial",
        ),
        (
            "advertise = \"opmesh-0\"",
            "`cluster.advertise`: \"opmesh-0\"",
        ),
        (
            "advertise = \"-bad-:7071\"",
            "`cluster.advertise`: \"-bad-:7071\"",
        ),
        ("join = [\"a:1\", \"a:0\"]", "`cluster.join[1]`: \"a:0\""),
        ("join = [\"::1:7071\"]", "`cluster.join[0]`: \"::1:7071\""),
        ("id = \"\"", "`cluster.id`: \"\""),
        ("serves = [\"a b\"]", "`cluster.serves[0]`: \"a b\""),
        ("serves = [\"webhook\"]", "`cluster.serves[0]`: \"webhook\""),
        (
            "serves = [\"echo\", \"echo\"]",
            "`cluster.serves[1]`: \"echo\" (allowed: a type this node has a handler \
             for, listed once: echo, resize, sleep)",
        ),
        (
            "heartbeat_ms = 9",
            "`cluster.heartbeat_ms`: 9 (allowed: 10..=10000)",
        ),
        (
            "write_timeout_ms = 99",
            "`cluster.write_timeout_ms`: 99 (allowed: 100..=600000)",
        ),
        (
            "election_timeout_ms = 60001",
            "`cluster.election_timeout_ms`: 60001 (allowed: 50..=60000)",
        ),
        (
            "flush_bytes = 1023",
            "`cluster.flush_bytes`: 1023 (allowed: 1024..=16777216)",
        ),
        (
            "linger_us = 100001",
            "`cluster.linger_us`: 100001 (allowed: 0..=100000)",
        ),
        (
            "max_frame_bytes = 65535",
            "`cluster.max_frame_bytes`: 65535 (allowed: 65536..=1073741824)",
        ),
        (
            "link_buffer_bytes = 65535",
            "`cluster.link_buffer_bytes`: 65535 (allowed: 65536..=4293918720)",
        ),
        (
            "link_buffer_bytes = 4293918721",
            "`cluster.link_buffer_bytes`: 4293918721 (allowed: 65536..=4293918720)",
        ),
        ("lanes = 257", "`cluster.lanes`: 257 (allowed: 0..=256)"),
        (
            "reply_buffer_bytes = 1023",
            "`cluster.reply_buffer_bytes`: 1023 (allowed: 1024..=4293918720)",
        ),
        (
            "max_pending_handshakes = 0",
            "`cluster.max_pending_handshakes`: 0 (allowed: 1..=4096)",
        ),
        (
            "max_pending_handshakes = 4097",
            "`cluster.max_pending_handshakes`: 4097 (allowed: 1..=4096)",
        ),
    ];
    for (line, expected) in cases {
        // A valid cluster, the case's line replacing the key it names.
        let key = line.split(' ').next().unwrap_or_default();
        let mut lines = vec![
            "addr = \"127.0.0.1:7071\"".to_owned(),
            format!("secret = \"{SECRET}\""),
            "ephemeral = true".to_owned(),
        ];
        lines.retain(|l| !l.starts_with(&format!("{key} ")));
        lines.push(line.to_owned());
        let file = user_file(&format!("[cluster]\n{}\n", lines.join("\n")));
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains(expected), "{line:?}: {msg}");
    }
}

#[test]
fn secret_never_shows_in_debug_output_or_error_messages() {
    let mut env = EnvGuard::new();
    let previous = "the-previous-cluster-secret";
    env.set("OPMESH_CLUSTER__PREVIOUS_SECRET", previous);
    let opts = LoadOptions {
        join: vec!["10.0.0.5:7071".into()],
        ..cluster_flags()
    };
    assert!(!format!("{opts:?}").contains(SECRET), "{opts:?}");
    let c = load_ok(&opts);
    let shown = format!("{c:?}");
    assert!(
        !shown.contains(SECRET) && !shown.contains(previous),
        "{shown}"
    );
    assert!(shown.contains("secret: \"<redacted>\""), "{shown}");
    assert!(
        shown.contains("previous_secret: Some(\"<redacted>\")"),
        "{shown}"
    );
    // `serve --check-config` says a previous secret is set, never what it is.
    let summary = c.summary();
    assert!(summary.contains("previous_secret: set"), "{summary}");
    assert!(
        !summary.contains(SECRET) && !summary.contains(previous),
        "{summary}"
    );

    // Errors while a secret is set, or about the secret itself.
    let mut errors = vec![
        load_err(&LoadOptions {
            cluster_secret: Some(Secret::from("correct-horse".to_owned())),
            ..opts.clone()
        }),
        load_err(&LoadOptions {
            cluster_addr: None,
            ..opts.clone()
        }),
        load_err(&LoadOptions {
            cluster_addr: Some("127.0.0.1".into()),
            ..opts.clone()
        }),
    ];
    for contents in [
        // Of the wrong type: figment would quote the value.
        "[cluster]\naddr = \"127.0.0.1:7071\"\nsecret = 1234567890123456789\n".to_owned(),
        format!("[cluster]\nsecret = [\"{SECRET}\"]\naddr = \"127.0.0.1:7071\"\n"),
        // Not TOML, on the secret's line: the parser would quote the line.
        format!("[cluster]\nsecret = \"{SECRET}\n"),
        format!("[cluster]\nsecret = {SECRET}\n"),
        format!("[cluster]\nsecret = \"{SECRET}\"\nsecret = \"{SECRET}\"\n"),
        // Another key wrong beside it.
        format!("[cluster]\naddr = \"127.0.0.1:7071\"\nsecret = \"{SECRET}\"\nvoters = 2\n"),
    ] {
        let file = user_file(&contents);
        errors.push(load_err(&with_file(&file)));
    }
    let digits = "1234567890123456789";
    for err in errors {
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(
                !shown.contains(SECRET)
                    && !shown.contains(digits)
                    && !shown.contains("correct-horse")
                    && !shown.contains(previous),
                "{shown}"
            );
        }
    }
}

/// A pod of the StatefulSet `opmesh`, as Kubernetes starts it: the downward API's
/// POD_NAME and POD_NAMESPACE, and the flag.
fn pod(env: &mut EnvGuard, name: &str) -> LoadOptions {
    env.set("POD_NAME", name);
    env.set("POD_NAMESPACE", "shop");
    env.set("OPMESH_AUTH__ANONYMOUS", "true");
    LoadOptions {
        cluster_addr: Some("0.0.0.0:7071".into()),
        http_addr: Some("0.0.0.0:7070".into()),
        bootstrap_from_ordinal: true,
        ..cluster_flags()
    }
}

#[test]
fn an_ordinal_pod_derives_its_id_addresses_and_seeds() {
    let mut env = EnvGuard::new();
    let c = load_ok(&pod(&mut env, "opmesh-1"));
    assert_eq!(c.node_id, "opmesh-1");
    let c = c.cluster.unwrap();
    assert_eq!(c.node, "opmesh-1");
    assert_eq!(
        c.advertise,
        "opmesh-1.opmesh-peers.shop.svc.cluster.local:7071"
    );
    assert_eq!(
        c.http_addr,
        "opmesh-1.opmesh-peers.shop.svc.cluster.local:7070"
    );
    assert_eq!(
        c.join,
        [
            "opmesh-0.opmesh-peers.shop.svc.cluster.local:7071",
            "opmesh-2.opmesh-peers.shop.svc.cluster.local:7071",
        ]
    );
    assert_eq!(c.bootstrap, SeedBootstrap::Never);

    let c = cluster_of(&pod(&mut env, "opmesh-0"));
    assert_eq!(
        c.bootstrap,
        SeedBootstrap::WhenNoSeedHasACluster {
            wait: Duration::from_secs(30)
        }
    );
    assert_eq!(c.join.len(), 2);

    // The keys, from the environment as a manifest would set them.
    env.set("OPMESH_CLUSTER__SERVICE", "peers");
    env.set("OPMESH_CLUSTER__SEED_ORDINALS", "5");
    env.set("OPMESH_CLUSTER__DOMAIN", "example.org");
    env.set("OPMESH_CLUSTER__BOOTSTRAP_WAIT_MS", "0");
    let c = cluster_of(&pod(&mut env, "opmesh-0"));
    assert_eq!(c.join.len(), 4);
    assert_eq!(c.join[0], "opmesh-1.peers.shop.svc.example.org:7071");
    assert_eq!(
        c.bootstrap,
        SeedBootstrap::WhenNoSeedHasACluster {
            wait: Duration::ZERO
        }
    );

    // Without the flag, the key alone.
    drop(env);
    let mut env = EnvGuard::new();
    let mut opts = pod(&mut env, "opmesh-2");
    opts.bootstrap_from_ordinal = false;
    env.set("OPMESH_CLUSTER__BOOTSTRAP", "ordinal");
    assert_eq!(cluster_of(&opts).node, "opmesh-2");
    // And with neither, POD_NAME changes nothing.
    drop(env);
    let mut env = EnvGuard::new();
    let mut opts = pod(&mut env, "opmesh-2");
    opts.bootstrap_from_ordinal = false;
    opts.cluster_addr = Some("127.0.0.1:7071".into());
    assert_eq!(load_ok(&opts).node_id, "node-1");
}

#[test]
fn a_bad_ordinal_setting_is_named() {
    let mut env = EnvGuard::new();
    let opts = pod(&mut env, "opmesh-x");
    let msg = load_err(&opts).to_string();
    assert!(
        msg.starts_with(
            "invalid value for `cluster.pod`: \"opmesh-x\" (allowed: a StatefulSet pod name"
        ),
        "{msg}"
    );
    assert!(msg.contains("environment variable `POD_NAME`"), "{msg}");

    std::env::remove_var("POD_NAME");
    let msg = load_err(&opts).to_string();
    assert!(msg.contains("`cluster.pod`"), "{msg}");
    assert!(msg.contains("POD_NAME"), "{msg}");

    let opts = pod(&mut env, "opmesh-0");
    std::env::remove_var("POD_NAMESPACE");
    let msg = load_err(&opts).to_string();
    assert!(msg.contains("`cluster.namespace`"), "{msg}");
    assert!(msg.contains("POD_NAMESPACE"), "{msg}");

    let cases: [(&str, &str, &str); 6] = [
        (
            "OPMESH_CLUSTER__SERVICE",
            "Peers",
            "`cluster.service`: \"Peers\" (allowed: a DNS label",
        ),
        (
            "OPMESH_CLUSTER__SEED_ORDINALS",
            "0",
            "`cluster.seed_ordinals`: 0 (allowed: 1..=64)",
        ),
        (
            "OPMESH_CLUSTER__BOOTSTRAP",
            "dns",
            "`cluster.bootstrap`: \"dns\" (allowed: \"seeds\"",
        ),
        (
            "OPMESH_JOIN",
            "a:1",
            "`cluster.join`: \"a:1\" (allowed: empty when cluster.bootstrap = \"ordinal\"",
        ),
        (
            "OPMESH_NODE_ID",
            "n1",
            "`node.id`: \"n1\" (allowed: unset, or the pod name (opmesh-0)",
        ),
        (
            "OPMESH_CLUSTER__DOMAIN",
            "a..b",
            "`cluster.domain`: \"a..b\"",
        ),
    ];
    drop(env);
    for (var, value, expected) in cases {
        let mut env = EnvGuard::new();
        let mut opts = pod(&mut env, "opmesh-0");
        // The flag would win over the variable.
        opts.bootstrap_from_ordinal = var != "OPMESH_CLUSTER__BOOTSTRAP";
        env.set(var, value);
        let msg = match load(&opts) {
            Ok(_) => panic!("{var}={value} should be rejected"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(expected), "{var}={value}: {msg}");
    }

    // The node id may repeat the pod name.
    let mut env = EnvGuard::new();
    let opts = pod(&mut env, "opmesh-0");
    env.set("OPMESH_NODE_ID", "opmesh-0");
    assert_eq!(load_ok(&opts).node_id, "opmesh-0");

    // A cluster port is required, with a fixed port.
    drop(env);
    let mut env = EnvGuard::new();
    let mut opts = pod(&mut env, "opmesh-0");
    opts.cluster_addr = None;
    let msg = load_err(&opts).to_string();
    assert!(msg.contains("`cluster.addr`"), "{msg}");
    assert!(msg.contains("--bootstrap-from-ordinal"), "{msg}");
    opts.cluster_addr = Some("0.0.0.0:0".into());
    let msg = load_err(&opts).to_string();
    assert!(msg.contains("a fixed port"), "{msg}");
}

#[test]
fn a_cluster_node_needs_a_data_dir_unless_it_says_it_is_ephemeral() {
    let _env = EnvGuard::new();
    let in_memory = LoadOptions {
        ephemeral: false,
        ..cluster_flags()
    };
    let msg = load_err(&in_memory).to_string();
    for part in [
        "`cluster.data_dir` must be set",
        "--data-dir",
        "cluster.ephemeral = true",
        "--ephemeral",
    ] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
    let on_disk = LoadOptions {
        data_dir: Some("/var/lib/opmesh".into()),
        ..in_memory.clone()
    };
    assert_eq!(
        cluster_of(&on_disk).data_dir,
        Some(PathBuf::from("/var/lib/opmesh"))
    );
    assert_eq!(
        cluster_of(&cluster_flags()).data_dir,
        None,
        "ephemeral: in memory"
    );
}
