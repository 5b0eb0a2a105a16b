//! The whole service through [`x2v_gateway::run`] on `127.0.0.1:0`, against a real `redis-server`,
//! with a stage worker on the worker-side API completing the job.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;
use x2v_gateway::GatewayConfig;
use x2v_queue::worker::{StageWorker, WorkerTimings};
use x2v_queue::*;
use x2v_testkit::redis::RedisServer;

#[tokio::test]
async fn run_serves_jobs_from_redis_to_a_worker_and_back() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = GatewayConfig::default();
    config.queue.redis_url = redis.url().into();
    config.storage.path = dir.path().display().to_string();
    config.auth.api_keys = vec!["sk-e2e".into()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(x2v_gateway::run(config, listener, shutdown.clone()));

    let queue: Arc<dyn Queue> =
        Arc::new(RedisQueue::connect(&redis.url(), "x2v", Retention::default()).await.unwrap());
    let storage = storage::Storage::local(dir.path()).unwrap();
    for stage in Stage::ALL {
        let info = WorkerInfo {
            stage,
            rank: 2,
            models: vec!["wan2.1-t2v-1.3b".into()],
            tasks: vec![Task::T2v],
            capacity: 1,
            unfit_loras: Default::default(),
        };
        let w = StageWorker::new(
            queue.clone(),
            info,
            WorkerTimings { max_poll: Duration::from_millis(20), ..Default::default() },
        );
        let (storage, stop) = (storage.clone(), shutdown.clone());
        w.register(stop.clone()).await.unwrap();
        tokio::spawn(async move {
            while let Ok(Some(job)) = w.next(&stop).await {
                let id = job.job().id;
                job.progress(1, 1).await.unwrap();
                let mut outputs = vec![];
                if stage == Stage::Decoder {
                    let key = format!("{id}/video.mp4");
                    let size =
                        storage.put(&key, Bytes::from_static(b"\0\0\0\x08ftypmp42")).await.unwrap();
                    outputs.push(OutputRef {
                        variant: "video".into(),
                        index: 0,
                        key,
                        content_type: "video/mp4".into(),
                        size,
                        decoded_by: None,
                    });
                }
                job.complete(outputs).await.unwrap();
            }
        });
    }

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let call = |method: &str, path: &str, body: &'static str| {
        hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("authorization", "Bearer sk-e2e")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let resp = client.request(call("POST", "/v1/videos", r#"{"prompt":"e2e"}"#)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let created: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["x2v"]["ranks"]["dit"], 2, "assigned to the live rank");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let resp = client.request(call("GET", &format!("/v1/videos/{id}"), "")).await.unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        if v["status"] == "completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not completed: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = client.request(call("GET", &format!("/v1/videos/{id}/content"), "")).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"\0\0\0\x08ftypmp42")
    );
    let resp = client.request(call("GET", "/readyz", "")).await.unwrap();
    assert_eq!(resp.status(), 200);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap().unwrap();
}
