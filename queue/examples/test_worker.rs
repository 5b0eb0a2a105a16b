//! A stand-in for the stage services, built on the worker-side API alone (no axum, no libtorch):
//! registers one rank of every stage for the given models, and for each claimed job reports a few
//! denoising steps, then writes placeholder outputs to storage and completes it. Prompts containing
//! `[fail]` fail at the DiT stage; `[slow]` take 200 ms per step (to test cancellation).
//!
//! `cargo run -p x2v-queue --example test_worker -- <redis-url> <storage-dir> [models...]`
//! (`X2V_TEST_WORKER_LEASE_MS` sets the lease length; default 10 s).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use x2v_core::JobErrorCode;
use x2v_queue::storage::Storage;
use x2v_queue::worker::{ClaimedJob, StageWorker, WorkerTimings};
use x2v_queue::*;

/// A 1x1 transparent PNG.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\0\0\0\0IEND\xaeB`\x82";

async fn run_stage(job: ClaimedJob, stage: Stage, storage: &Storage) -> Result<(), QueueError> {
    let spec = job.job().spec.clone();
    let id = job.job().id;
    let steps = if stage == Stage::Dit { spec.num_inference_steps.min(4) } else { 1 };
    let delay = if spec.prompt.contains("[slow]") {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(5)
    };
    for step in 1..=steps {
        tokio::time::sleep(delay).await;
        if job.progress(step, steps).await? == Control::Cancel {
            return Ok(());
        }
    }
    if stage == Stage::Dit && spec.prompt.contains("[fail]") {
        let error = JobError::new(
            JobErrorCode::InternalError,
            "the test worker was asked to fail this job",
        );
        return job.fail(&error).await;
    }
    let mut outputs = vec![];
    if stage == Stage::Decoder {
        let put = |variant: &str, index: u32, ext: &str, ct: &str, bytes: Vec<u8>| {
            let key = format!("{id}/{variant}-{index}.{ext}");
            let (variant, ct) = (variant.to_owned(), ct.to_owned());
            async move {
                let size = storage.put(&key, Bytes::from(bytes)).await?;
                Ok::<_, QueueError>(OutputRef {
                    variant,
                    index,
                    key,
                    content_type: ct,
                    size,
                    decoded_by: None,
                })
            }
        };
        if spec.task.resource() == Resource::Video {
            let mut mp4 = b"\0\0\0\x18ftypisom".to_vec();
            mp4.extend(format!("x2v test video {id} {}", spec.prompt).into_bytes());
            outputs.push(put("video", 0, "mp4", "video/mp4", mp4).await?);
            outputs.push(
                put("thumbnail", 0, "webp", "image/webp", b"RIFF\0\0\0\0WEBPVP8 ".to_vec()).await?,
            );
        } else {
            for i in 0..spec.n {
                outputs.push(put("image", i, "png", "image/png", PNG.to_vec()).await?);
            }
        }
    }
    job.complete(outputs).await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let storage =
        Storage::local(args.get(2).cloned().unwrap_or_else(|| "./x2v-data/outputs".into()))?;
    let models: Vec<String> = if args.len() > 3 {
        args[3..].to_vec()
    } else {
        vec!["wan2.1-t2v-1.3b".into(), "wan2.1-i2v-14b-480p".into(), "qwen-image".into()]
    };
    let queue: Arc<dyn Queue> =
        Arc::new(RedisQueue::connect(&url, "x2v", Retention::default()).await?);
    let shutdown = CancellationToken::new();
    let timings = WorkerTimings {
        lease: Duration::from_secs(10),
        heartbeat_ttl: Duration::from_secs(5),
        max_poll: Duration::from_millis(50),
    };
    let mut tasks = vec![];
    for stage in Stage::ALL {
        let info = WorkerInfo {
            stage,
            rank: 0,
            models: models.clone(),
            tasks: vec![Task::T2v, Task::I2v, Task::T2i, Task::Edit],
            capacity: 1,
            unfit_loras: Default::default(),
        };
        let worker = StageWorker::new(queue.clone(), info, timings.clone());
        worker.register(shutdown.clone()).await?;
        let (storage, shutdown) = (storage.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match worker.next(&shutdown).await {
                    Ok(Some(job)) => {
                        if let Err(e) = run_stage(job, stage, &storage).await {
                            eprintln!("{stage}: {e}");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("{stage}: claim failed: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    println!("test worker ready");
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
