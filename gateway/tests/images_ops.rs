//! Images, auth, rate limits, body limits and operational endpoints through the router.

mod common;

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use common::*;
use serde_json::json;
use x2v_core::JobErrorCode;
use x2v_queue::JobError;

#[tokio::test]
async fn generation_answers_b64_json_and_url() {
    let h = harness(config());
    h.start_worker();
    let (s, v, _) = h.json(post_json("/v1/images/generations", json!({"prompt": "a fox", "n": 2, "size": null, "response_format": "b64_json", "quality": null}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(png, PNG);
    let (s, v, _) = h
        .json(
            Request::post("/v1/images/generations")
                .header("host", "gw.test")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"prompt":"u","response_format":"url"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let url = v["data"][0]["url"].as_str().unwrap();
    let path = url.strip_prefix("http://gw.test").expect(url);
    let (resp, bytes) = h.send(get(path)).await;
    assert_eq!((resp.status().as_u16(), &bytes[..]), (200, PNG));
    assert_eq!(resp.headers()["content-type"], "image/png");
}

#[tokio::test]
async fn edits_take_image_arrays_and_a_mask() {
    let h = harness(config());
    h.start_worker();
    let req = multipart(
        "/v1/images/edits",
        &[("prompt", "edit"), ("model", "qwen-image")],
        &[("image[]", "a.png", PNG), ("image[]", "b.png", PNG), ("mask", "m.png", PNG)],
    );
    let (s, v, _) = h.json(req).await;
    assert_eq!(s, 200, "{v}");
    let id = v["x2v"]["id"].as_str().unwrap().trim_start_matches("image_").parse().unwrap();
    let rec = h.state.queue.get(id).await.unwrap();
    let roles: Vec<&str> = rec.spec.inputs.iter().map(|i| i.role.as_str()).collect();
    assert_eq!(roles, ["image", "image", "mask"]);
    let (s, v, _) = h.json(multipart("/v1/images/edits", &[("prompt", "edit")], &[])).await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("image")));
}

#[tokio::test]
async fn streaming_generation_sends_completed_events() {
    let h = harness(config());
    h.start_worker();
    let (resp, body) = h
        .send(post_json(
            "/v1/images/generations",
            json!({"prompt": "s", "stream": true, "partial_images": 1}),
        ))
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("event: image_generation.completed"), "{text}");
    assert!(text.contains("\"type\":\"image_generation.completed\""), "{text}");
}

/// Fails every job at the encoder with `error`.
fn fail_every_job(h: &Harness, error: JobError) {
    let q = h.state.queue.clone();
    tokio::spawn(async move {
        let w = x2v_queue::WorkerInfo {
            stage: x2v_queue::Stage::Encoder,
            rank: 0,
            // The default config's image model (workers claim only jobs of their models and tasks).
            models: vec!["qwen-image".into()],
            tasks: vec![x2v_queue::Task::T2i, x2v_queue::Task::Edit],
            capacity: 1,
            unfit_loras: Default::default(),
        };
        loop {
            if let Some(l) = q.claim(&w, std::time::Duration::from_secs(30)).await.unwrap() {
                q.fail(&l.handle(), &error).await.unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

#[tokio::test]
async fn failed_generation_is_an_error_in_both_modes() {
    let h = harness(config());
    fail_every_job(&h, JobError::new(JobErrorCode::InternalError, "the encoder exploded"));
    let (s, v, _) = h.json(post_json("/v1/images/generations", json!({"prompt": "x"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (500, Some("internal_error")), "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    let (_, body) =
        h.send(post_json("/v1/images/generations", json!({"prompt": "x", "stream": true}))).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("event: error") && text.contains("the encoder exploded"), "{text}");
}

#[tokio::test]
async fn a_job_refused_for_its_input_answers_400() {
    let h = harness(config());
    fail_every_job(
        &h,
        JobError::new(JobErrorCode::InvalidImage, "`image` is not a readable image"),
    );
    let (s, v, _) = h.json(post_json("/v1/images/generations", json!({"prompt": "x"}))).await;
    assert_eq!(
        (s, v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (400, Some("invalid_request_error"), Some("invalid_image")),
        "{v}"
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("not a readable image"), "{v}");
    let (_, body) =
        h.send(post_json("/v1/images/generations", json!({"prompt": "x", "stream": true}))).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("event: error") && text.contains("invalid_request_error"), "{text}");
}

#[tokio::test]
async fn api_keys_are_required_and_rate_limited_per_key() {
    let mut c = config();
    c.auth.api_keys = vec!["sk-a".into(), "sk-b".into()];
    c.auth.rate_limit_per_s = 0.01;
    c.auth.rate_limit_burst = 2;
    let h = harness(c);
    let with = |key: &str| {
        Request::get("/v1/videos")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap()
    };
    let (s, v, _) = h.json(get("/v1/videos")).await;
    assert_eq!(
        (s, v["error"]["type"].as_str(), v["error"]["code"].as_str()),
        (401, Some("authentication_error"), Some("invalid_api_key"))
    );
    assert_eq!(h.json(with("sk-wrong")).await.0, 401);
    assert_eq!(h.json(with("sk-a")).await.0, 200);
    assert_eq!(h.json(with("sk-a")).await.0, 200);
    let (s, v, resp) = h.json(with("sk-a")).await;
    assert_eq!((s, v["error"]["type"].as_str()), (429, Some("rate_limit_error")));
    assert!(resp.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(h.json(with("sk-b")).await.0, 200, "limits are per key");
    assert_eq!(h.json(get("/healthz")).await.0, 200, "health needs no key");
}

#[tokio::test]
async fn oversized_bodies_are_a_413_envelope() {
    let mut c = config();
    c.http.max_body_bytes = 1024;
    let h = harness(c);
    let big = "x".repeat(4096);
    let (s, v, resp) = h.json(post_json("/v1/videos", json!({"prompt": big}))).await;
    assert_eq!(s, 413, "{v}");
    assert!(v["error"]["message"].is_string());
    assert!(resp.headers().contains_key("x-request-id"));
    let (s, _, _) = h
        .json(multipart(
            "/v1/videos",
            &[("prompt", "p")],
            &[("input_reference", "r.png", &[0u8; 4096])],
        ))
        .await;
    assert_eq!(s, 413);
}

#[tokio::test]
async fn operational_endpoints() {
    let h = harness(config());
    assert_eq!(h.json(get("/healthz")).await.0, 200);
    assert_eq!(h.json(get("/readyz")).await.0, 200);
    let (s, doc, _) = h.json(get("/openapi.json")).await;
    assert_eq!(s, 200);
    assert!(doc["paths"]["/v1/videos"]["post"].is_object());
    let (_, models, _) = h.json(get("/v1/models")).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 0, "no live workers yet");
    h.start_worker();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, models, _) = h.json(get("/v1/models")).await;
        if models["data"].as_array().unwrap().len() == 2 {
            assert_eq!(models["data"][0]["id"], "qwen-image");
            assert_eq!(models["data"][1]["x2v"]["ranks"]["dit"], json!([0]));
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    h.json(post_json("/v1/videos", json!({"prompt": "m"}))).await;
    let (resp, body) = h.send(get("/metrics")).await;
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("x2v_jobs_created_total{resource=\"video\",service=\"gateway\"} 1"),
        "{text}"
    );
    assert!(text.contains("x2v_http_requests_total"), "{text}");
}

#[tokio::test]
async fn cors_answers_preflight_when_configured() {
    let mut c = config();
    c.http.cors_origins = vec!["https://app.example".into()];
    let h = harness(c);
    let pre = Request::options("/v1/videos")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let (resp, _) = h.send(pre).await;
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://app.example");
    let (resp, _) = h
        .send(
            Request::get("/v1/videos")
                .header("origin", "https://evil.example")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
}
