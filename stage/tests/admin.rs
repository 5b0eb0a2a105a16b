//! The admin endpoints end to end: `serve` on port 0 over a `ServiceState` and an in-memory queue,
//! driven with the generated gRPC clients and plain HTTP/1.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use x2v_proto::admin::v1 as pb;
use x2v_proto::admin::v1::admin_client::AdminClient;
use x2v_queue::{MemoryQueue, NewJob, Queue, RedisQueue, Retention, Stage, Task};
use x2v_stage::ServiceState;
use x2v_stage::admin::{self, AdminEndpoints};
use x2v_stage::state::{InFlight, LoadedModel};
use x2v_testkit::jobs;

const WAIT: Duration = Duration::from_secs(5);

struct Harness {
    state: Arc<ServiceState>,
    queue: Arc<MemoryQueue>,
    endpoints: AdminEndpoints,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        let state = Arc::new(ServiceState::new(
            Stage::Dit,
            2,
            "wan2.1-t2v-1.3b".into(),
            vec![Task::T2v, Task::I2v],
        ));
        let queue = Arc::new(MemoryQueue::new(Retention::default()));
        let shutdown = CancellationToken::new();
        let (endpoints, task) = admin::serve(
            state.clone(),
            Some(queue.clone() as Arc<dyn Queue>),
            "127.0.0.1:0",
            "127.0.0.1:0",
            shutdown.clone(),
        )
        .await
        .unwrap();
        Harness { state, queue, endpoints, shutdown, task }
    }

    async fn channel(&self) -> Channel {
        let addr = self.endpoints.grpc.expect("gRPC enabled");
        Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.endpoints.http.expect("HTTP enabled"), path).await
    }

    /// Cancels `shutdown` and waits for every endpoint to stop.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task).await.expect("admin endpoints stop").unwrap();
    }
}

/// One `GET` over a fresh connection; returns the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut response)).await.unwrap().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete HTTP response");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    (status, body.to_string())
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest { service: service.into() };
    let status = client.check(request).await.unwrap().into_inner().status;
    ServingStatus::try_from(status).unwrap()
}

async fn next_status(stream: &mut tonic::Streaming<HealthCheckResponse>) -> Option<ServingStatus> {
    let message = tokio::time::timeout(WAIT, stream.next()).await.expect("a health update in time");
    message.map(|m| ServingStatus::try_from(m.unwrap().status).unwrap())
}

fn in_flight(job: &str, phase: &'static str, step: u32) -> InFlight {
    InFlight { job: job.into(), phase, step, total_steps: 50 }
}

fn new_job() -> NewJob {
    jobs::new_job(jobs::t2v("a cat"))
}

#[tokio::test]
async fn status_reports_identity_progress_and_counts() {
    let h = Harness::start().await;
    h.state.set_transfer_endpoint("tcp://10.0.0.7:7400".into());
    h.state.track(in_flight("video_a", "running", 12));
    h.state.track(in_flight("video_b", "receiving", 0));
    h.state.track(in_flight("video_c", "running", 3));
    h.state.untrack("video_c", "failed");
    h.state.set_ready(true);

    let status = h.admin().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.stage, "dit");
    assert_eq!(status.rank, 2);
    assert_eq!(status.model, "wan2.1-t2v-1.3b");
    assert_eq!(status.tasks, ["t2v", "i2v"]);
    assert!(status.ready);
    assert!(!status.draining);
    assert!(status.uptime_seconds >= 0.0);
    assert_eq!((status.completed, status.failed), (0, 1));
    assert_eq!(status.transfer_endpoint, "tcp://10.0.0.7:7400");
    assert_eq!(
        status.in_flight,
        [
            pb::InFlightJob {
                job: "video_a".into(),
                phase: "running".into(),
                step: 12,
                total_steps: 50
            },
            pb::InFlightJob {
                job: "video_b".into(),
                phase: "receiving".into(),
                step: 0,
                total_steps: 50
            },
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn loaded_models_reports_what_the_worker_loaded() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let before = admin.loaded_models(pb::LoadedModelsRequest {}).await.unwrap().into_inner();
    assert!(before.models.is_empty());

    h.state.set_loaded(vec![LoadedModel {
        name: "wan2.1-t2v-1.3b".into(),
        components: vec!["transformer".into()],
        device: "cuda:0".into(),
        dtype: "bf16".into(),
        parameter_bytes: 2_838_000_000,
        unfit_loras: Default::default(),
    }]);
    let after = admin.loaded_models(pb::LoadedModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(
        after.models,
        [pb::LoadedModel {
            name: "wan2.1-t2v-1.3b".into(),
            components: vec!["transformer".into()],
            device: "cuda:0".into(),
            dtype: "bf16".into(),
            parameter_bytes: 2_838_000_000,
        }]
    );
    h.stop().await;
}

#[tokio::test]
async fn health_follows_readiness_and_drain() {
    let h = Harness::start().await;
    let mut health = h.health().await;
    let service = admin::health_service_name(Stage::Dit);
    assert_eq!(service, "x2v.stage.dit");
    for name in ["", service.as_str()] {
        assert_eq!(check(&mut health, name).await, ServingStatus::NotServing, "{name:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "x2v.stage.vae".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    let mut watch =
        health.watch(HealthCheckRequest { service: service.clone() }).await.unwrap().into_inner();
    assert_eq!(next_status(&mut watch).await, Some(ServingStatus::NotServing));

    h.state.set_ready(true);
    for name in ["", service.as_str()] {
        assert_eq!(check(&mut health, name).await, ServingStatus::Serving, "{name:?}");
    }
    assert_eq!(next_status(&mut watch).await, Some(ServingStatus::Serving));

    h.state.track(in_flight("video_a", "running", 7));
    h.state.track(in_flight("video_b", "sending", 50));
    let mut admin = h.admin().await;
    let drain = admin.drain(pb::DrainRequest {}).await.unwrap().into_inner();
    assert_eq!(drain, pb::DrainResponse { in_flight: 2, started: true });
    assert!(h.state.drain.is_cancelled());
    assert_eq!(next_status(&mut watch).await, Some(ServingStatus::NotServing));
    for name in ["", service.as_str()] {
        assert_eq!(check(&mut health, name).await, ServingStatus::NotServing, "{name:?}");
    }
    let status = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert!(status.draining && !status.ready);

    h.state.untrack("video_a", "completed");
    let again = admin.drain(pb::DrainRequest {}).await.unwrap().into_inner();
    assert_eq!(again, pb::DrainResponse { in_flight: 1, started: false });

    // An open Watch stream must not hold the server up at shutdown.
    h.stop().await;
    assert_eq!(next_status(&mut watch).await, None);
}

#[tokio::test]
async fn http_metrics_and_probes() {
    let h = Harness::start().await;
    assert_eq!(h.get("/healthz").await.0, 200);
    let (code, reason) = h.get("/readyz").await;
    assert_eq!(code, 503);
    assert!(reason.starts_with("not ready"), "{reason}");

    h.state.set_ready(true);
    assert_eq!(h.get("/readyz").await, (200, "ready\n".into()));

    h.queue.create(new_job()).await.unwrap();
    h.state.track(in_flight("video_a", "running", 50));
    h.state.untrack("video_a", "completed");
    let (code, metrics) = h.get("/metrics").await;
    assert_eq!(code, 200);
    let sample = |name: &str, label: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(
        sample("x2v_stage_jobs_total{", "outcome=\"completed\""),
        Some("1".into()),
        "{metrics}"
    );
    assert_eq!(sample("x2v_queue_depth{", "stage=\"encoder\""), Some("1".into()), "{metrics}");
    assert_eq!(sample("x2v_queue_depth{", "stage=\"dit\""), Some("0".into()), "{metrics}");
    assert_eq!(sample("x2v_queue_depth{", "stage=\"decoder\""), Some("0".into()), "{metrics}");
    assert!(metrics.contains("service=\"dit\""), "{metrics}");
    assert!(metrics.contains("rank=\"2\""), "{metrics}");

    h.state.drain.cancel();
    assert_eq!(h.get("/readyz").await, (503, "draining\n".into()));
    assert_eq!(h.get("/healthz").await.0, 200);
    h.stop().await;
}

#[tokio::test]
async fn readyz_and_metrics_when_the_queue_is_down() {
    let mut redis = x2v_testkit::redis::RedisServer::start();
    let queue = RedisQueue::connect(&redis.url(), "x2v", Retention::default()).await.unwrap();
    let state = Arc::new(ServiceState::new(Stage::Encoder, 0, "m".into(), vec![Task::T2v]));
    let shutdown = CancellationToken::new();
    let (endpoints, task) =
        admin::serve(state.clone(), Some(Arc::new(queue)), "", "127.0.0.1:0", shutdown.clone())
            .await
            .unwrap();
    let http = endpoints.http.unwrap();
    state.set_ready(true);
    assert_eq!(http_get(http, "/readyz").await, (200, "ready\n".into()));
    assert!(http_get(http, "/metrics").await.1.contains("x2v_queue_depth{"));

    redis.kill();
    let (code, reason) = http_get(http, "/readyz").await;
    assert_eq!(code, 503);
    assert!(reason.starts_with("queue unavailable"), "{reason}");
    let (code, metrics) = http_get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(!metrics.contains("x2v_queue_depth{"), "a depth nobody could read: {metrics}");
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn empty_listen_strings_disable_endpoints() {
    let state = Arc::new(ServiceState::new(Stage::Encoder, 0, "m".into(), vec![Task::T2v]));
    let shutdown = CancellationToken::new();
    let (endpoints, task) =
        admin::serve(state, None, "", "127.0.0.1:0", shutdown.clone()).await.unwrap();
    assert_eq!(endpoints.grpc, None);
    let http = endpoints.http.expect("HTTP enabled");
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();

    let state = Arc::new(ServiceState::new(Stage::Encoder, 0, "m".into(), vec![Task::T2v]));
    let (endpoints, task) =
        admin::serve(state, None, "", "", CancellationToken::new()).await.unwrap();
    assert_eq!(endpoints, AdminEndpoints { grpc: None, http: None });
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_taken_port_is_an_error_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = Arc::new(ServiceState::new(Stage::Decoder, 0, "m".into(), vec![Task::T2v]));
    let err = admin::serve(state, None, &addr, "", CancellationToken::new()).await.unwrap_err();
    assert!(format!("{err:#}").contains(&format!("admin gRPC listener on {addr}")), "{err:#}");
}
