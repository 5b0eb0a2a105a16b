//! Test helpers: a gateway on the in-memory queue and store, an in-process stage worker, and request
//! builders.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use x2v_gateway::{AppState, GatewayConfig};
use x2v_queue::storage::Storage;
use x2v_queue::worker::{StageWorker, WorkerTimings};
use x2v_queue::*;

pub const PNG: &[u8] =
    b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

/// A real H.264 MP4: `frames` frames of `width`x`height` at `fps`, a moving gradient.
pub fn tiny_mp4(frames: usize, width: usize, height: usize, fps: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(frames * width * height * 3);
    for f in 0..frames {
        for y in 0..height {
            for x in 0..width {
                data.extend([(x * 4 + f * 8) as u8, (y * 4) as u8, (f * 16) as u8]);
            }
        }
    }
    let frames = x2v_media::Frames::new(&data, frames, height, width).unwrap();
    x2v_media::encode_mp4(&frames, fps, &x2v_media::Mp4Options::default()).unwrap()
}

pub struct Harness {
    pub app: Router,
    pub state: AppState,
    pub shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config() -> GatewayConfig {
    let mut c = GatewayConfig::default();
    c.queue.backend = x2v_queue::QueueBackend::Memory;
    c.http.poll_after_ms = 50;
    c
}

pub fn harness(config: GatewayConfig) -> Harness {
    let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let storage = Storage::from_store(Arc::new(object_store::memory::InMemory::new()));
    let state = AppState::new(config, queue, storage);
    Harness { app: x2v_gateway::router(state.clone()), state, shutdown: CancellationToken::new() }
}

impl Harness {
    pub async fn send(&self, req: Request<Body>) -> (Response<Body>, Bytes) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (Response::from_parts(parts, Body::empty()), bytes)
    }

    pub async fn json(&self, req: Request<Body>) -> (u16, serde_json::Value, Response<Body>) {
        let (resp, bytes) = self.send(req).await;
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (resp.status().as_u16(), v, resp)
    }

    /// Starts one worker per stage that completes every job (`[hold]` prompts wait for cancel);
    /// a video's content is a real 9-frame 64x48 MP4 at 8 fps.
    pub fn start_worker(&self) {
        for stage in Stage::ALL {
            let info = WorkerInfo {
                stage,
                rank: 0,
                models: vec!["wan2.1-t2v-1.3b".into(), "qwen-image".into()],
                tasks: vec![Task::T2v, Task::I2v, Task::V2v, Task::T2i, Task::Edit],
                capacity: 1,
                unfit_loras: Default::default(),
            };
            let w = StageWorker::new(
                self.state.queue.clone(),
                info,
                WorkerTimings { max_poll: Duration::from_millis(20), ..Default::default() },
            );
            let (storage, shutdown) = (self.state.storage.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                let _reg = w.register(shutdown.clone()).await.unwrap();
                while let Ok(Some(job)) = w.next(&shutdown).await {
                    let spec = job.job().spec.clone();
                    let id = job.job().id;
                    if spec.prompt.contains("[hold]") && stage == Stage::Dit {
                        let _ = job.progress(1, 10).await;
                        job.cancelled().cancelled().await;
                        continue;
                    }
                    for s in 1..=2 {
                        job.progress(s, 2).await.unwrap();
                    }
                    let mut outputs = vec![];
                    if stage == Stage::Decoder {
                        if spec.task.resource() == Resource::Video {
                            let key = format!("{id}/video.mp4");
                            // The MP4 ends with a `free` box holding the job id (which video
                            // a download returned).
                            let mut mp4 = tiny_mp4(9, 64, 48, 8);
                            let tag = format!("video-{id}");
                            mp4.extend(((8 + tag.len()) as u32).to_be_bytes());
                            mp4.extend(b"free");
                            mp4.extend(tag.as_bytes());
                            let body = Bytes::from(mp4);
                            let size = storage.put(&key, body).await.unwrap();
                            outputs.push(OutputRef {
                                variant: "video".into(),
                                index: 0,
                                key,
                                content_type: "video/mp4".into(),
                                size,
                                decoded_by: None,
                            });
                        } else {
                            for i in 0..spec.n {
                                let key = format!("{id}/image-{i}.png");
                                let size =
                                    storage.put(&key, Bytes::from_static(PNG)).await.unwrap();
                                outputs.push(OutputRef {
                                    variant: "image".into(),
                                    index: i,
                                    key,
                                    content_type: "image/png".into(),
                                    size,
                                    decoded_by: None,
                                });
                            }
                        }
                    }
                    let _ = job.complete(outputs).await;
                }
            });
        }
    }

    /// Polls a video until it is terminal (30 s at most).
    pub async fn wait_video(&self, id: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v, _) = self.json(get(&format!("/v1/videos/{id}"))).await;
            if v["status"] == "completed" || v["status"] == "failed" {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "video {id} stuck: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

pub fn post_json(uri: &str, body: serde_json::Value) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// A multipart body: text fields, then file parts `(name, filename, bytes)`.
pub fn multipart(
    uri: &str,
    fields: &[(&str, &str)],
    files: &[(&str, &str, &[u8])],
) -> Request<Body> {
    let boundary = "x2vtestboundary";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .into_bytes(),
        );
    }
    for (name, filename, bytes) in files {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").into_bytes());
        body.extend_from_slice(bytes);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").into_bytes());
    Request::post(uri)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(Body::from(body))
        .unwrap()
}
