//! `/v1/videos` through the router (`oneshot`), on the in-memory queue with an in-process worker.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use serde_json::json;
use x2v_queue::{Stage, Task, WorkerInfo};

#[tokio::test]
async fn multipart_create_returns_a_queued_video_with_headers() {
    let h = harness(config());
    let (status, v, resp) = h
        .json(multipart(
            "/v1/videos",
            &[("prompt", "a cat"), ("seconds", "2"), ("size", "480x832")],
            &[],
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(resp.headers()["x-request-id"].to_str().unwrap().starts_with("req_"));
    assert_eq!(resp.headers()["openai-poll-after-ms"], "50");
    assert!(v["id"].as_str().unwrap().starts_with("video_"));
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str(), v["seconds"].as_str()),
        (Some("video"), Some("queued"), Some("2"))
    );
    assert_eq!(
        (v["size"].as_str(), v["model"].as_str()),
        (Some("480x832"), Some("wan2.1-t2v-1.3b"))
    );
    for key in ["completed_at", "expires_at", "remixed_from_video_id", "error"] {
        assert!(v.get(key).is_some_and(|x| x.is_null()), "{key} must be present and null: {v}");
    }
}

#[tokio::test]
async fn json_create_with_extensions_and_reference_image_by_content() {
    let h = harness(config());
    let mut cfg = config();
    cfg.models[1].name = "wan2.1-i2v-14b-480p".into();
    let (status, v, _) = h
        .json(multipart(
            "/v1/videos",
            &[("prompt", "move"), ("num_inference_steps", "8"), ("seed", "42")],
            &[("input_reference", "upload", PNG)],
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "wan2.1-i2v-14b-480p", "an image reference picks an i2v model");
    assert_eq!(
        (v["x2v"]["seed"].as_u64(), v["x2v"]["num_inference_steps"].as_u64()),
        (Some(42), Some(8))
    );
    let (status, v, _) = h
        .json(multipart(
            "/v1/videos",
            &[("prompt", "move")],
            &[("input_reference", "ref.png", b"GIF89a....")],
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "input_reference");
    assert!(v["error"]["message"].as_str().unwrap().contains("image/gif"), "{v}");
    let (status, v, _) = h
        .json(post_json(
            "/v1/videos",
            json!({"prompt": "json body", "seconds": 3, "negative_prompt": "blur"}),
        ))
        .await;
    assert_eq!((status, v["seconds"].as_str()), (200, Some("3")), "{v}");
}

#[tokio::test]
async fn bad_input_is_a_400_envelope_and_stores_nothing() {
    let h = harness(config());
    let cases = [
        (json!({"prompt": "x", "size": "1920x1080"}), "size"),
        (json!({"prompt": "x", "seconds": "60"}), "seconds"),
        (json!({"prompt": "x", "model": "sora-2"}), "model"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"size": "832x480"}), "prompt"),
        (json!({"prompt": "x", "dit_engine_rank": 9}), "dit_engine_rank"),
    ];
    for (body, param) in cases {
        let (status, v, resp) = h.json(post_json("/v1/videos", body.clone())).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert!(resp.headers().contains_key("x-request-id"));
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{v}");
        assert!(e["message"].as_str().unwrap().len() > 10);
        if param != "dit_engine_rank" {
            assert_eq!(e["param"], param, "{body}: {v}");
        }
    }
    let (status, v, _) = h
        .json(
            Request::post("/v1/videos")
                .header("content-type", "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("body")));
    let (_, list, _) = h.json(get("/v1/videos")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing stored: {list}");
}

#[tokio::test]
async fn unknown_routes_methods_and_ids_use_the_envelope() {
    let h = harness(config());
    for (req, status) in [
        (get("/v1/nope"), 404),
        (get("/v1/videos/video_nope"), 404),
        (get("/v1/videos/video_0190f3a0b1c27d4e8f9a0b1c2d3e4f50"), 404),
        (Request::put("/v1/videos").body(Body::empty()).unwrap(), 405),
    ] {
        let (s, v, resp) = h.json(req).await;
        assert_eq!(s, status, "{v}");
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(resp.headers().contains_key("x-request-id"));
    }
}

#[tokio::test]
async fn video_characters_are_not_served_and_say_so() {
    let h = harness(config());
    let req = Request::post("/v1/videos/characters")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"name": "x"}"#))
        .unwrap();
    let (s, v, _) = h.json(req).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"]["code"], "unsupported_endpoint", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("characters"), "{v}");
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job() {
    let h = harness(config());
    let req = || {
        Request::post("/v1/videos")
            .header("content-type", "application/json")
            .header("idempotency-key", "abc")
            .body(Body::from(r#"{"prompt":"once"}"#))
            .unwrap()
    };
    let (_, a, _) = h.json(req()).await;
    let (_, b, _) = h.json(req()).await;
    assert_eq!(a["id"], b["id"], "{b}");
    let other = Request::post("/v1/videos")
        .header("content-type", "application/json")
        .header("idempotency-key", "abc")
        .body(Body::from(r#"{"prompt":"changed"}"#))
        .unwrap();
    let (s, v, _) = h.json(other).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (_, list, _) = h.json(get("/v1/videos")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
}

/// A retry without a seed matches (each attempt draws its own); a seed the client chose is part
/// of the request: the same key with another explicit seed is a different request.
#[tokio::test]
async fn an_explicit_seed_is_part_of_an_idempotent_request() {
    let h = harness(config());
    let req = |key: &str, body: &'static str| {
        Request::post("/v1/videos")
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Body::from(body))
            .unwrap()
    };
    let (_, a, _) = h.json(req("k1", r#"{"prompt":"p","seed":7}"#)).await;
    let (s, b, _) = h.json(req("k1", r#"{"prompt":"p","seed":7}"#)).await;
    assert_eq!((s, &a["id"]), (200, &b["id"]), "{b}");
    let (s, v, _) = h.json(req("k1", r#"{"prompt":"p","seed":8}"#)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("idempotency_key_reused")), "{v}");
    let (s, v, _) = h.json(req("k1", r#"{"prompt":"p"}"#)).await;
    assert_eq!(s, 409, "a random seed is not the explicit 7: {v}");
    // Without a seed, retries match each other whatever seed each attempt drew.
    let (_, c, _) = h.json(req("k2", r#"{"prompt":"p"}"#)).await;
    let (s, d, _) = h.json(req("k2", r#"{"prompt":"p","seed":null}"#)).await;
    assert_eq!((s, &c["id"]), (200, &d["id"]), "{d}");
    let (_, list, _) = h.json(get("/v1/videos")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_job_completes_and_its_content_downloads_with_ranges() {
    let h = harness(config());
    h.start_worker();
    let (_, v, _) = h.json(post_json("/v1/videos", json!({"prompt": "done"}))).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let done = h.wait_video(&id).await;
    assert_eq!(
        (done["status"].as_str(), done["progress"].as_u64()),
        (Some("completed"), Some(100))
    );
    assert!(done["completed_at"].is_u64() && done["expires_at"].is_u64());
    let (resp, bytes) = h.send(get(&format!("/v1/videos/{id}/content"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "video/mp4");
    assert!(bytes.ends_with(id.trim_start_matches("video_").as_bytes()));
    let ranged = Request::get(format!("/v1/videos/{id}/content"))
        .header("range", "bytes=4-7")
        .body(Body::empty())
        .unwrap();
    let (resp, part) = h.send(ranged).await;
    assert_eq!(resp.status(), 206);
    assert_eq!(&part[..], b"ftyp");
    assert_eq!(resp.headers()["content-range"], format!("bytes 4-7/{}", bytes.len()));
    let bad = Request::get(format!("/v1/videos/{id}/content"))
        .header("range", format!("bytes={}-", bytes.len()))
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(bad).await.0.status(), 416);
    let (s, v, _) = h.json(get(&format!("/v1/videos/{id}/content?variant=spritesheet"))).await;
    assert_eq!(s, 404, "{v}");
    let (s, _, _) = h.json(get(&format!("/v1/videos/{id}/content?variant=poster"))).await;
    assert_eq!(s, 400);
    let (s, v, _) = h
        .json(
            Request::delete(format!("/v1/videos/{id}"))
                .header("content-type", "application/json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (s, v["deleted"].as_bool(), v["object"].as_str()),
        (200, Some(true), Some("video.deleted"))
    );
    assert_eq!(h.json(get(&format!("/v1/videos/{id}"))).await.0, 404);
    assert!(
        h.state
            .storage
            .get(&format!("{}/video.mp4", id.trim_start_matches("video_")))
            .await
            .is_err(),
        "output deleted"
    );
}

#[tokio::test]
async fn delete_cancels_a_running_job_at_the_worker() {
    let h = harness(config());
    h.start_worker();
    let (_, v, _) = h.json(post_json("/v1/videos", json!({"prompt": "[hold] long"}))).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, v, _) = h.json(get(&format!("/v1/videos/{id}"))).await;
        if v["x2v"]["stage"] == "dit"
            && v["status"] == "in_progress"
            && v["progress"].as_u64() > Some(5)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never reached the DiT: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (s, _, _) =
        h.json(Request::delete(format!("/v1/videos/{id}")).body(Body::empty()).unwrap()).await;
    assert_eq!(s, 200);
    // The worker sees the cancel and stops; the decoder never gets the job.
    let q = &h.state.queue;
    assert_eq!(q.depth(x2v_queue::Stage::Decoder).await.unwrap(), 0);
    let (s, _, _) = h.json(get(&format!("/v1/videos/{id}/content"))).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn list_paginates_with_after_and_has_more() {
    let h = harness(config());
    let mut ids = vec![];
    for i in 0..5 {
        let (_, v, _) = h.json(post_json("/v1/videos", json!({"prompt": format!("p{i}")}))).await;
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let (_, p1, _) = h.json(get("/v1/videos?limit=2&order=asc")).await;
    assert_eq!(p1["data"][0]["id"], ids[0]);
    assert_eq!(
        (p1["has_more"].as_bool(), p1["last_id"].as_str()),
        (Some(true), Some(ids[1].as_str()))
    );
    let (_, p3, _) = h.json(get(&format!("/v1/videos?limit=2&order=asc&after={}", ids[3]))).await;
    assert_eq!((p3["data"].as_array().unwrap().len(), p3["has_more"].as_bool()), (1, Some(false)));
    let (_, d, _) = h.json(get("/v1/videos?limit=1")).await;
    assert_eq!(d["data"][0]["id"], ids[4], "newest first by default");
    for bad in ["limit=101", "limit=x", "order=up", "after=zzz"] {
        assert_eq!(h.json(get(&format!("/v1/videos?{bad}"))).await.0, 400, "{bad}");
    }
}

#[tokio::test]
async fn remix_copies_the_source_settings() {
    let h = harness(config());
    let (_, v, _) =
        h.json(post_json("/v1/videos", json!({"prompt": "base", "seconds": "2", "seed": 9}))).await;
    let id = v["id"].as_str().unwrap();
    let (s, r, _) = h
        .json(post_json(&format!("/v1/videos/{id}/remix"), json!({"prompt": "make it blue"})))
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (r["remixed_from_video_id"].as_str(), r["prompt"].as_str(), r["seconds"].as_str()),
        (Some(id), Some("make it blue"), Some("2"))
    );
    assert_eq!(r["x2v"]["seed"], 9);
    assert_eq!(h.json(post_json("/v1/videos/video_x/remix", json!({"prompt": "p"}))).await.0, 404);
}

#[tokio::test]
async fn events_stream_status_and_progress_until_done() {
    let h = harness(config());
    let (_, v, _) = h.json(post_json("/v1/videos", json!({"prompt": "watch"}))).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let stream = tokio::spawn({
        let app = h.app.clone();
        let id = id.clone();
        async move {
            let resp = tower::ServiceExt::oneshot(app, get(&format!("/v1/videos/{id}/events")))
                .await
                .unwrap();
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            String::from_utf8(
                axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap().to_vec(),
            )
            .unwrap()
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    h.start_worker();
    let text =
        tokio::time::timeout(std::time::Duration::from_secs(30), stream).await.unwrap().unwrap();
    assert!(text.contains("event: video.progress"), "{text}");
    assert!(text.contains("\"stage\":\"dit\""), "{text}");
    assert!(text.trim_end().ends_with("}") && text.contains("\"status\":\"completed\""), "{text}");
}

#[tokio::test]
async fn video_edits_take_an_upload_and_keep_its_length_and_aspect() {
    let h = harness(config());
    // 33 frames at 16 fps (2.06 s), landscape: 33 frames at the model's 16 fps, 832x480.
    let mp4 = tiny_mp4(33, 64, 48, 16);
    let (status, v, resp) = h
        .json(multipart(
            "/v1/videos/edits",
            &[("prompt", "make it snow")],
            &[("video", "in.mp4", &mp4)],
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(resp.headers()["openai-poll-after-ms"], "50");
    assert_eq!(
        (v["model"].as_str(), v["size"].as_str()),
        (Some("wan2.1-t2v-1.3b"), Some("832x480"))
    );
    assert_eq!(
        (v["x2v"]["task"].as_str(), v["x2v"]["strength"].as_f64()),
        (Some("v2v"), Some(0.8))
    );
    assert_eq!((v["x2v"]["num_frames"].as_u64(), v["seconds"].as_str()), (Some(33), Some("2")));
    // The upload is stored as the job's `video` input.
    let id = x2v_core::JobId::parse_prefixed(v["id"].as_str().unwrap(), "video").unwrap();
    let rec = h.state.queue.get(id).await.unwrap();
    assert_eq!(rec.spec.inputs.len(), 1);
    assert_eq!(
        (rec.spec.inputs[0].role.as_str(), rec.spec.inputs[0].content_type.as_str()),
        ("video", "video/mp4")
    );
    assert_eq!(&h.state.storage.get(&rec.spec.inputs[0].key).await.unwrap()[..], &mp4[..]);

    // Portrait picks the portrait size; `seconds` keeps the start; 4k+1 frames; strength given.
    let tall = tiny_mp4(40, 48, 64, 16);
    let (status, v, _) = h
        .json(multipart(
            "/v1/videos/edits",
            &[("prompt", "x"), ("seconds", "1"), ("strength", "0.5"), ("seed", "3")],
            &[("video", "in.mp4", &tall)],
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["size"], "480x832");
    assert_eq!((v["x2v"]["num_frames"].as_u64(), v["seconds"].as_str()), (Some(17), Some("1")));
    assert_eq!(v["x2v"]["strength"].as_f64(), Some(0.5));
    // 40 frames at 16 fps: 37 (4k+1); an explicit size wins.
    let (status, v, _) = h
        .json(multipart(
            "/v1/videos/edits",
            &[("prompt", "x"), ("size", "832x480")],
            &[("video", "in.mp4", &tall)],
        ))
        .await;
    assert_eq!(
        (status, v["size"].as_str(), v["x2v"]["num_frames"].as_u64()),
        (200, Some("832x480"), Some(37)),
        "{v}"
    );
}

#[tokio::test]
async fn video_edits_of_a_completed_video_by_id() {
    let h = harness(config());
    h.start_worker();
    let (_, v, _) =
        h.json(post_json("/v1/videos", json!({"prompt": "a cat", "seconds": "1"}))).await;
    let source = v["id"].as_str().unwrap().to_owned();
    // Not completed yet, or unknown: 400 naming `video`.
    let (status, v, _) = h
        .json(post_json(
            "/v1/videos/edits",
            json!({"prompt": "x", "video": {"id": "video_0190f3a0b1c27d4e8f9a0b1c2d3e4f50"}}),
        ))
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("video")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("does not exist"), "{v}");
    assert_eq!(h.wait_video(&source).await["status"], "completed");
    // JSON `{"id"}` and multipart `video[id]` (what the clients send for a reference).
    for req in [
        post_json("/v1/videos/edits", json!({"prompt": "make it blue", "video": {"id": source}})),
        multipart("/v1/videos/edits", &[("prompt", "make it blue"), ("video[id]", &source)], &[]),
    ] {
        let (status, v, _) = h.json(req).await;
        assert_eq!(status, 200, "{v}");
        // The worker's MP4: 9 frames at 8 fps (1.125 s) → 18 at the model's 16 fps → 17 (4k+1).
        assert_eq!(
            (v["x2v"]["task"].as_str(), v["x2v"]["num_frames"].as_u64()),
            (Some("v2v"), Some(17))
        );
        let done = h.wait_video(v["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
}

#[tokio::test]
async fn bad_video_edits_are_400s_that_name_the_field_and_store_nothing() {
    let mut cfg = config();
    cfg.models[1].name = "wan2.1-i2v-14b-480p".into();
    let h = harness(cfg);
    let mp4 = tiny_mp4(9, 64, 48, 16);
    let broken = {
        let mut b = mp4.clone();
        b.truncate(40);
        b
    };
    let cases: Vec<(Request<Body>, &str, &str)> = vec![
        (post_json("/v1/videos/edits", json!({"prompt": "x"})), "video", "required"),
        (
            multipart("/v1/videos/edits", &[("prompt", "x")], &[("video", "a.png", PNG)]),
            "video",
            "image/png",
        ),
        (
            multipart("/v1/videos/edits", &[("prompt", "x")], &[("video", "a.mp4", &broken)]),
            "video",
            "not usable",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("video[id]", "video_x")],
                &[("video", "a.mp4", &mp4)],
            ),
            "video",
            "not both",
        ),
        (
            multipart("/v1/videos/edits", &[("prompt", "x"), ("video[id]", "nope")], &[]),
            "video",
            "video id",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("strength", "0")],
                &[("video", "a.mp4", &mp4)],
            ),
            "strength",
            "above 0",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("strength", "1.5")],
                &[("video", "a.mp4", &mp4)],
            ),
            "strength",
            "from 0 to 1",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("strength", "0.2"), ("num_inference_steps", "4")],
                &[("video", "a.mp4", &mp4)],
            ),
            "strength",
            "leaves none of the 4 steps",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("model", "wan2.1-i2v-14b-480p")],
                &[("video", "a.mp4", &mp4)],
            ),
            "model",
            "does not serve v2v",
        ),
        (
            multipart(
                "/v1/videos/edits",
                &[("prompt", "x"), ("size", "64x48")],
                &[("video", "a.mp4", &mp4)],
            ),
            "size",
            "must be one of",
        ),
        (multipart("/v1/videos/edits", &[], &[("video", "a.mp4", &mp4)]), "prompt", "prompt"),
    ];
    for (req, param, says) in cases {
        let (status, v, _) = h.json(req).await;
        assert_eq!(status, 400, "{param}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{says}: {v}");
    }
    let (_, list, _) = h.json(get("/v1/videos")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "nothing stored: {list}");
}

#[tokio::test]
async fn video_extensions_continue_the_input_on_an_i2v_model() {
    let h = harness(config());
    // 33 frames at 16 fps (2.06 s) kept, then 2 s more (33 frames, the first dropped): 65 frames,
    // 4 s, on the image-to-video model, at the size nearest the input's aspect.
    let mp4 = tiny_mp4(33, 64, 48, 16);
    let (status, v, _) = h
        .json(multipart(
            "/v1/videos/extensions",
            &[("prompt", "the fox jumps"), ("seconds", "2")],
            &[("video", "in.mp4", &mp4)],
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["model"].as_str(), v["size"].as_str()),
        (Some("wan2.1-i2v-14b-480p"), Some("832x480"))
    );
    assert_eq!((v["x2v"]["task"].as_str(), v["seconds"].as_str()), (Some("i2v"), Some("4")));
    assert_eq!(
        (v["x2v"]["extend_frames"].as_u64(), v["x2v"]["num_frames"].as_u64()),
        (Some(33), Some(33))
    );
    let id = x2v_core::JobId::parse_prefixed(v["id"].as_str().unwrap(), "video").unwrap();
    let rec = h.state.queue.get(id).await.unwrap();
    assert_eq!(rec.spec.inputs.iter().map(|i| i.role.as_str()).collect::<Vec<_>>(), ["video"]);
    // An extension is not remixed (it would lose its input video).
    let (status, v, _) = h
        .json(post_json(
            &format!("/v1/videos/{}/remix", v["id"].as_str().unwrap()),
            json!({"prompt": "y"}),
        ))
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("video_id")), "{v}");

    // Too long in all: 81 · 4 frames at most.
    let long = tiny_mp4(330, 64, 48, 16);
    let (status, v, _) = h
        .json(multipart("/v1/videos/extensions", &[("prompt", "x")], &[("video", "in.mp4", &long)]))
        .await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("video")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 324"), "{v}");
    // A model that does not do image-to-video, a bad `seconds`, no video.
    for (fields, param) in [
        (vec![("prompt", "x"), ("model", "wan2.1-t2v-1.3b")], "model"),
        (vec![("prompt", "x"), ("seconds", "60")], "seconds"),
    ] {
        let (status, v, _) =
            h.json(multipart("/v1/videos/extensions", &fields, &[("video", "in.mp4", &mp4)])).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
    }
    let (status, v, _) = h.json(post_json("/v1/videos/extensions", json!({"prompt": "x"}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("video")), "{v}");
    let (_, list, _) = h.json(get("/v1/videos")).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "only the one extension: {list}");
}

#[tokio::test]
async fn jobs_with_the_same_adapters_go_to_the_dit_rank_that_ran_them() {
    let loras = tempfile::tempdir().unwrap();
    for name in ["style", "motion"] {
        std::fs::write(loras.path().join(format!("{name}.safetensors")), b"{}").unwrap();
    }
    let mut cfg = config();
    cfg.models[0].lora_dir = loras.path().display().to_string();
    let h = harness(cfg);
    // Two idle DiT ranks (and one encoder and decoder) of the model; nothing claims, so the jobs
    // queued on a rank are its load.
    for (stage, rank) in
        [(Stage::Encoder, 0), (Stage::Dit, 0), (Stage::Dit, 1), (Stage::Decoder, 0)]
    {
        let info = WorkerInfo {
            stage,
            rank,
            models: vec!["wan2.1-t2v-1.3b".into()],
            tasks: vec![Task::T2v],
            capacity: 1,
            unfit_loras: Default::default(),
        };
        h.state.queue.heartbeat(&info, std::time::Duration::from_secs(60)).await.unwrap();
    }
    let dit_of = |v: &serde_json::Value| v["x2v"]["ranks"]["dit"].as_u64();
    let create = |lora: serde_json::Value| {
        post_json("/v1/videos", json!({"prompt": "a cat", "seconds": "1", "lora": lora}))
    };
    // Without adapters: least loaded first (0, then 1, then 0 again).
    let (_, a, _) = h.json(create(json!([]))).await;
    let (_, b, _) = h.json(create(json!([]))).await;
    assert_eq!((dit_of(&a), dit_of(&b)), (Some(0), Some(1)), "{a} {b}");
    // `style` lands on rank 0 (tied, lowest); the next `style` job follows it although rank 1 is as
    // idle, and so does the one after (one job more than rank 1 is within the slack).
    let (_, s1, _) = h.json(create(json!([{"name": "style"}]))).await;
    let (_, s2, _) = h.json(create(json!([{"name": "style"}]))).await;
    assert_eq!((dit_of(&s1), dit_of(&s2)), (Some(0), Some(0)), "{s1} {s2}");
    // `motion` goes to the least loaded rank, 1, then stays there.
    let (_, m1, _) = h.json(create(json!([{"name": "motion"}]))).await;
    let (_, m2, _) = h.json(create(json!([{"name": "motion"}]))).await;
    assert_eq!((dit_of(&m1), dit_of(&m2)), (Some(1), Some(1)), "{m1} {m2}");
    // Loads are now 3 and 3. Another scale is another adapter set: the least loaded rank (a tie:
    // rank 0), which then keeps `style` too while it is at most one job busier.
    let (_, h1, _) = h.json(create(json!([{"name": "style", "scale": 0.5}]))).await;
    assert_eq!(dit_of(&h1), Some(0), "{h1}");
    let (_, s3, _) = h.json(create(json!([{"name": "style"}]))).await;
    assert_eq!(dit_of(&s3), Some(0), "4 jobs against 3: {s3}");
    // Beyond the slack the least loaded rank takes it.
    let (_, s4, _) = h.json(create(json!([{"name": "style"}]))).await;
    assert_eq!(dit_of(&s4), Some(1), "5 jobs against 3: {s4}");
}

#[tokio::test]
async fn an_adapter_a_dit_worker_found_unfit_is_refused_and_not_listed() {
    let loras = tempfile::tempdir().unwrap();
    for name in ["style", "wide"] {
        std::fs::write(loras.path().join(format!("{name}.safetensors")), b"{}").unwrap();
    }
    let mut cfg = config();
    cfg.models[0].lora_dir = loras.path().display().to_string();
    let h = harness(cfg);
    for stage in Stage::ALL {
        let mut unfit = std::collections::BTreeMap::new();
        if stage == Stage::Dit {
            unfit.insert("wide".to_owned(), "made for a model of width 96".to_owned());
        }
        let info = WorkerInfo {
            stage,
            rank: 0,
            models: vec!["wan2.1-t2v-1.3b".into()],
            tasks: vec![Task::T2v],
            capacity: 1,
            unfit_loras: unfit,
        };
        h.state.queue.heartbeat(&info, std::time::Duration::from_secs(60)).await.unwrap();
    }
    let create = |lora: serde_json::Value| {
        post_json("/v1/videos", json!({"prompt": "a cat", "seconds": "1", "lora": lora}))
    };
    let (status, v, _) = h.json(create(json!([{"name": "style"}, {"name": "wide"}]))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("lora")), "{v}");
    assert_eq!(v["error"]["code"], "lora_unfit", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("`wide` does not fit model `wan2.1-t2v-1.3b`: made for"), "{v}");
    let (status, v, _) = h.json(create(json!([{"name": "style"}]))).await;
    assert_eq!(status, 200, "{v}");
    let (_, models, _) = h.json(get("/v1/models")).await;
    let model = models["data"].as_array().unwrap().iter().find(|m| m["id"] == "wan2.1-t2v-1.3b");
    assert_eq!(model.unwrap()["x2v"]["loras"], json!(["style"]), "{models}");
}
