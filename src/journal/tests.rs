//! The journal with a real engine and a real file: what a 202 leaves on disk, what a
//! restart does with it, and what a failed write does.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh_actors::{HandlerResult, Json, Node, OpStatus, Operation};

use super::*;

/// Waits until `cond` holds, failing after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn echo(op: Operation) -> HandlerResult {
    Ok(op.payload)
}

/// Answers with the operation's idempotency key.
async fn key_of(op: Operation) -> HandlerResult {
    Ok(Json::encode(&op.idempotency_key).unwrap())
}

/// Never finishes: the operation is still running when the node stops.
fn forever(_: Operation) -> impl Future<Output = HandlerResult> {
    std::future::pending()
}

async fn node_with(
    build: impl FnOnce(opmesh_actors::NodeBuilder) -> opmesh_actors::NodeBuilder,
) -> Node {
    build(Node::builder()).start().await.unwrap()
}

fn ops(op_type: &str, n: usize) -> Vec<Operation> {
    (0..n)
        .map(|i| {
            Operation::new(op_type, Json::encode(&i).unwrap()).with_idempotency_key(format!("k{i}"))
        })
        .collect()
}

fn accepted_ids(answers: Vec<Result<Receipt, SubmitError>>) -> Vec<OpId> {
    answers
        .into_iter()
        .map(|a| a.expect("accepted").id)
        .collect()
}

fn config(dir: &Path) -> JournalConfig {
    JournalConfig {
        path: dir.join(FILE),
    }
}

/// Stops a node whose operations never finish, keeping their entries: the journal is
/// closed first, as a shutdown does.
async fn stop(journal: Journal, node: Node) {
    journal.close().await;
    node.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn an_operation_is_in_the_journal_from_its_acceptance_until_its_result_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(|b| b.handler("slow", forever).handler("echo", echo)).await;
    let (journal, found) = Journal::open(&config(dir.path()), node.clone()).unwrap();
    assert_eq!(found, Recovered::default());

    let slow = accepted_ids(journal.accept(ops("slow", 3)).await.unwrap());
    // Accepted means written: the entries are there when `accept` returns.
    assert_eq!(journal.stats().figures().entries, 3);
    let fast = accepted_ids(journal.accept(ops("echo", 5)).await.unwrap());
    until(
        "the echoes' entries are removed",
        Duration::from_secs(10),
        || journal.stats().figures().entries == 3,
    )
    .await;
    for id in &fast {
        let t = node.status(id).expect("tracked");
        assert_eq!(t.status(), OpStatus::Succeeded);
    }
    for id in &slow {
        assert_eq!(node.status(id).unwrap().status(), OpStatus::Running);
    }
    let f = journal.stats().figures();
    assert_eq!((f.appended, f.removed, f.write_failures), (8, 5, 0));
    assert!(f.commits >= 2, "{f:?}");
    stop(journal, node).await;
}

#[tokio::test]
async fn a_restart_runs_again_what_the_journal_holds_with_the_same_ids_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let first = node_with(|b| b.handler("job", forever)).await;
    let (journal, _) = Journal::open(&config(dir.path()), first.clone()).unwrap();
    let mut batch = ops("job", 5);
    batch.push(Operation::new("job", Json::null()).with_owner("deployer"));
    let ids = accepted_ids(journal.accept(batch).await.unwrap());
    stop(journal, first).await;

    // The next process: the type now finishes.
    let node = node_with(|b| b.handler("job", key_of)).await;
    let (journal, found) = Journal::open(&config(dir.path()), node.clone()).unwrap();
    assert_eq!(
        found,
        Recovered {
            resubmitted: 6,
            expired: 0,
            refused: 0
        }
    );
    until(
        "every recovered operation is done and removed",
        Duration::from_secs(10),
        || journal.stats().figures().entries == 0,
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let t = node.status(id).expect("readable by its original id");
        let o = t.outcome().expect("finished");
        assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
        let key = o.result.as_ref().unwrap().as_str().to_owned();
        if i < 5 {
            assert_eq!(key, format!("\"k{i}\""), "the idempotency key is kept");
        } else {
            assert_eq!(key, "null");
            assert_eq!(t.owner.as_deref(), Some("deployer"), "the owner is kept");
        }
    }
    assert_eq!(journal.stats().figures().recovered.resubmitted, 6);
    journal.close().await;
    node.shutdown(Duration::from_secs(1)).await;

    // Nothing left for a third start.
    let node = node_with(|b| b.handler("job", key_of)).await;
    let (journal, found) = Journal::open(&config(dir.path()), node.clone()).unwrap();
    assert_eq!(found.total(), 0);
    stop(journal, node).await;
}

#[tokio::test]
async fn entries_past_their_deadline_or_refused_now_end_with_a_reason_and_leave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    let now = Instant::now();
    let now_ms = unix_ms();
    let late = Operation::new("job", Json::null());
    let gone = Operation::new("retired", Json::null());
    let alive = Operation::new("job", Json::null());
    {
        let store = JournalStore::open(&path).unwrap();
        let value = |op: &Operation, deadline: Instant| {
            (
                op.id,
                Entry::of(op, deadline, now, now_ms).encode().unwrap(),
            )
        };
        store
            .commit(
                &[
                    value(&late, now),
                    value(&gone, now + Duration::from_secs(60)),
                    value(&alive, now + Duration::from_secs(60)),
                ],
                &[],
            )
            .unwrap();
    }
    let node = node_with(|b| b.handler("job", echo)).await;
    let (journal, found) = Journal::open(&config(dir.path()), node.clone()).unwrap();
    assert_eq!(
        found,
        Recovered {
            resubmitted: 1,
            expired: 1,
            refused: 1
        }
    );
    let outcome = |id: &OpId| node.status(id).and_then(|t| t.outcome().cloned());
    let o = outcome(&late.id).expect("readable");
    assert_eq!(o.status, OpStatus::Expired);
    assert!(o
        .error
        .unwrap()
        .contains("deadline passed while the node was down"));
    let o = outcome(&gone.id).expect("readable");
    assert_eq!(o.status, OpStatus::Failed);
    let e = o.error.unwrap();
    assert!(e.contains("refused now") && e.contains("retired"), "{e}");
    until(
        "all three leave the journal",
        Duration::from_secs(10),
        || journal.stats().figures().entries == 0,
    )
    .await;
    assert_eq!(outcome(&alive.id).unwrap().status, OpStatus::Succeeded);
    stop(journal, node).await;
}

#[tokio::test]
async fn a_failed_write_accepts_nothing_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let node = node_with(move |b| {
        b.handler("count", move |op: Operation| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok(op.payload) }
        })
    })
    .await;
    let store = JournalStore::open(&dir.path().join(FILE)).unwrap();
    let fail = store.fail_writes.clone();
    let (journal, _) = Journal::start(store, node.clone()).unwrap();

    fail.store(true, Ordering::Relaxed);
    let op = Operation::new("count", Json::null());
    let id = op.id;
    let e = journal.accept(vec![op]).await.unwrap_err();
    assert!(matches!(e, JournalError::Write(_)), "{e:?}");
    let o = node
        .status(&id)
        .unwrap()
        .outcome()
        .cloned()
        .expect("ended at once");
    assert_eq!(o.status, OpStatus::Failed);
    assert!(o
        .error
        .unwrap()
        .starts_with("not accepted: cannot write to the journal"));
    let f = journal.stats().figures();
    assert_eq!((f.entries, f.appended, f.write_failures), (0, 0, 1));
    // What the api answers instead of 202.
    let api = crate::api::ApiError::from(e);
    assert_eq!(
        actix_web::ResponseError::status_code(&api),
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(api.body().error, "journal_write_failed");

    // Once writes work again, operations are accepted and run.
    fail.store(false, Ordering::Relaxed);
    let ids = accepted_ids(journal.accept(ops("count", 2)).await.unwrap());
    until("both ran", Duration::from_secs(10), || {
        ids.iter()
            .all(|id| node.status(id).is_some_and(|t| t.status().is_final()))
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the refused one never ran");
    journal.close().await;
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn refusals_at_the_door_are_answered_without_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with(|b| b.handler("echo", echo)).await;
    let (journal, _) = Journal::open(&config(dir.path()), node.clone()).unwrap();
    let answers = journal
        .accept(vec![
            Operation::new("nope", Json::null()),
            Operation::new("echo", Json::null()),
        ])
        .await
        .unwrap();
    assert!(matches!(answers[0], Err(SubmitError::NoRoute { .. })));
    assert!(answers[1].is_ok());
    let answers = journal
        .accept(vec![Operation::new("nope", Json::null())])
        .await
        .unwrap();
    assert!(answers[0].is_err());
    assert_eq!(journal.stats().figures().appended, 1);
    journal.close().await;
    // Closed: a later submission is refused as the node stopping.
    let e = journal.accept(ops("echo", 1)).await.unwrap_err();
    assert!(matches!(e, JournalError::Closed), "{e:?}");
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_damaged_entry_stops_the_start_naming_the_file_and_the_operation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE);
    let id = OpId::new();
    {
        let store = JournalStore::open(&path).unwrap();
        store
            .commit(&[(id, vec![ENTRY_VERSION_FOR_TEST, 1, 2])], &[])
            .unwrap();
    }
    let node = node_with(|b| b.handler("echo", echo)).await;
    let msg = Journal::open(&config(dir.path()), node.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains(&id.to_string()),
        "{msg}"
    );
    node.shutdown(Duration::ZERO).await;
}

const ENTRY_VERSION_FOR_TEST: u8 = entry::ENTRY_VERSION;
