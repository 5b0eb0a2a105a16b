//! Spans reach a real OTLP/gRPC receiver: `telemetry::init` with an endpoint exports the spans of
//! the current process, with the service name, and a parent context restored from a job record
//! (a string map) makes the exported span a child in the same trace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};
use x2v_core::propagation;
use x2v_core::telemetry::{self, TelemetryConfig};

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_with_service_name_and_restored_parent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let config =
        TelemetryConfig { otlp_endpoint: Some(format!("http://{addr}")), ..Default::default() };
    let guard = telemetry::init("x2v-test", &config).expect("telemetry starts");
    assert!(guard.exporting());

    // A job record as the gateway stores it: the W3C context of the request that created the job.
    let mut record = HashMap::new();
    record.insert(
        "traceparent".to_owned(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    );
    let span = tracing::info_span!("dit.denoise", job_id = "job_1");
    propagation::set_parent(&span, propagation::extract_map(&record));
    span.in_scope(|| {
        // Inside the span, the context carries the restored trace id on to the next hop.
        let mut next_hop = HashMap::new();
        propagation::inject_map(&propagation::current_context(), &mut next_hop);
        assert!(
            next_hop["traceparent"].contains("0af7651916cd43dd8448eb211c80319c"),
            "{next_hop:?}"
        );
        tracing::info!("step done");
    });
    drop(span);
    // Shutdown flushes the batch processor; it blocks, so keep it off the runtime's worker threads.
    tokio::task::spawn_blocking(move || guard.shutdown()).await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<_> = receiver
            .requests
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_spans.iter())
            .flat_map(|rs| {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| r.attributes.iter())
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| kv.value.as_ref())
                    .map(|v| format!("{:?}", v.value));
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| ss.spans.iter())
                    .map(move |s| (service.clone(), s.clone()))
            })
            .collect();
        if !spans.is_empty() || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (service, span) =
        spans.iter().find(|(_, s)| s.name == "dit.denoise").expect("the span was exported");
    assert!(service.as_deref().unwrap_or_default().contains("x2v-test"), "{service:?}");
    assert_eq!(hex(&span.trace_id), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(hex(&span.parent_span_id), "b7ad6b7169203331");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
