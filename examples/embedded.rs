//! Embedding opmesh as a library: one node in this process, a handler of our own, and
//! operations submitted through the API a Rust program uses.
//!
//! Run with `cargo run --example embedded`.

use std::time::Duration;

use opmesh::{HandlerError, Json, Node, Operation};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Resize {
    width: u32,
    height: u32,
    scale: f64,
}

#[derive(Serialize)]
struct Resized {
    width: u32,
    height: u32,
}

async fn resize(op: Operation) -> Result<Json, HandlerError> {
    let r: Resize = op
        .payload
        .decode()
        .map_err(|e| HandlerError::fatal(format!("bad resize payload: {e}")))?;
    if r.scale <= 0.0 {
        return Err(HandlerError::fatal("scale must be positive"));
    }
    let out = Resized {
        width: (r.width as f64 * r.scale).round() as u32,
        height: (r.height as f64 * r.scale).round() as u32,
    };
    Json::encode(&out).map_err(|e| HandlerError::fatal(e.to_string()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let node = Node::builder()
        .node_id("embedded-1")
        .handler("resize", resize)
        .start()
        .await?;

    let payload = Json::encode(&serde_json::json!({"width": 640, "height": 480, "scale": 0.5}))?;
    let op = Operation::new("resize", payload.clone())
        .with_idempotency_key("photo-42")
        .with_timeout(Duration::from_secs(5));
    let first = node.submit(op).await?;
    println!(
        "first:  {:?} {:?} cached={}",
        first.status, first.result, first.cached
    );

    // The same idempotency key answers from the cache without running again.
    let again = node
        .submit(Operation::new("resize", payload).with_idempotency_key("photo-42"))
        .await?;
    println!(
        "again:  {:?} {:?} cached={}",
        again.status, again.result, again.cached
    );

    // A bad payload fails with the handler's reason; nothing panics.
    let bad = node
        .submit(Operation::new("resize", Json::encode(&"not an object")?))
        .await?;
    println!("bad:    {:?} {}", bad.status, bad.error.unwrap_or_default());

    // An unknown type is refused before it is accepted.
    match node.submit(Operation::new("unknown", Json::null())).await {
        Err(e) => println!("refused: {e}"),
        Ok(o) => println!("unexpected: {o:?}"),
    }

    node.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
