//! Overload protection through the router: a full pool answers 429 at once with `retry-after`,
//! the image pool does not starve short requests, and a short request past its deadline is a 504.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use common::*;
use serde_json::json;
use x2v_queue::{ListQuery, Order, Resource};

async fn image_jobs(h: &Harness) -> usize {
    let query =
        ListQuery { resource: Resource::Image, after: None, limit: 100, order: Order::Desc };
    h.state.queue.list(query).await.unwrap().jobs.len()
}

/// Waits until `n` image jobs exist: the requests that made them hold their permits.
async fn until_image_jobs(h: &Harness, n: usize) {
    while image_jobs(h).await < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_full_image_pool_answers_429_at_once_and_short_requests_still_pass() {
    let mut cfg = config();
    cfg.http.max_image_requests = 1;
    let h = std::sync::Arc::new(harness(cfg));
    // No worker: a synchronous image request waits for its image, holding the one permit.
    let first = {
        let h = h.clone();
        tokio::spawn(async move {
            h.json(post_json("/v1/images/generations", json!({"prompt": "a"}))).await
        })
    };
    until_image_jobs(&h, 1).await;
    let (s, v, resp) = h.json(post_json("/v1/images/generations", json!({"prompt": "b"}))).await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "server_overloaded", "{v}");
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(image_jobs(&h).await, 1, "a refused request creates no job");
    // Short requests have their own pool.
    let (s, _, _) = h.json(get("/v1/models")).await;
    assert_eq!(s, 200);
    // The permit comes back with the request.
    first.abort();
    let _ = first.await;
    let second = {
        let h = h.clone();
        tokio::spawn(async move {
            h.json(post_json("/v1/images/generations", json!({"prompt": "c"}))).await
        })
    };
    until_image_jobs(&h, 2).await;
    second.abort();
}

#[tokio::test]
async fn a_full_short_pool_answers_429_and_probes_still_answer() {
    let mut cfg = config();
    cfg.http.max_concurrent_requests = 1;
    cfg.http.request_timeout_ms = 0;
    let h = std::sync::Arc::new(harness(cfg));
    // A create whose upload never ends holds the one short permit.
    let stalled = {
        let h = h.clone();
        tokio::spawn(async move { h.send(stalled_upload()).await })
    };
    // Its permit is taken once the router polls it; ask until the pool is seen full.
    let (s, v) = loop {
        let (s, v, _) = h.json(get("/v1/models")).await;
        if s != 200 {
            break (s, v);
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "server_overloaded");
    for probe in ["/healthz", "/metrics"] {
        assert_eq!(h.send(get(probe)).await.0.status(), 200, "{probe}");
    }
    stalled.abort();
}

#[tokio::test]
async fn a_short_request_past_its_deadline_is_a_504_in_the_envelope() {
    let mut cfg = config();
    cfg.http.request_timeout_ms = 100;
    let h = harness(cfg);
    let (s, v, _) = h.json(stalled_upload()).await;
    assert_eq!(s, 504, "{v}");
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("0.1 s"), "{v}");
}

/// `POST /v1/videos` whose JSON body never finishes arriving.
fn stalled_upload() -> Request<Body> {
    let start =
        futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"prompt\": "))]);
    let body = futures::StreamExt::chain(start, futures::stream::pending());
    Request::post("/v1/videos")
        .header("content-type", "application/json")
        .body(Body::from_stream(body))
        .unwrap()
}

/// `POST /v1/videos` of the default model; returns (status, body).
async fn create_video(
    h: &Harness,
    prompt: &str,
) -> (u16, serde_json::Value, axum::http::HeaderMap) {
    let (s, v, resp) = h.json(post_json("/v1/videos", json!({"prompt": prompt}))).await;
    (s, v, resp.headers().clone())
}

#[tokio::test]
async fn a_model_whose_backlog_is_at_its_bound_refuses_creates_with_429() {
    let mut cfg = config();
    cfg.models[0].max_queued_jobs = 2;
    let model = cfg.models[0].name.clone();
    let h = harness(cfg);
    h.start_worker();
    while h.state.queue.workers().await.unwrap().len() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One job held in the DiT, one waiting for it: the model's DiT backlog is 2.
    let (s, held, _) = create_video(&h, "[hold] first").await;
    assert_eq!(s, 200, "{held}");
    let (s, waiting, _) = create_video(&h, "[hold] second").await;
    assert_eq!(s, 200, "{waiting}");
    let (s, v, headers) = create_video(&h, "third").await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["error"]["code"], "model_queue_full", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&model), "{v}");
    assert_eq!(headers["retry-after"], "5");
    let (_, metrics) = h.send(get("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.lines().any(|l| l.starts_with("x2v_jobs_refused_total")
            && l.contains(&model)
            && l.ends_with(" 1")),
        "{metrics}"
    );
    // Cancelling the waiting job frees a place.
    let (s, v, _) = h
        .json(
            Request::delete(format!("/v1/videos/{}", waiting["id"].as_str().unwrap()))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = create_video(&h, "[hold] fourth").await;
    assert_eq!(s, 200, "{v}");
}
