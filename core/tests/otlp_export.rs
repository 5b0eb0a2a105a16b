//! Spans reach a real OTLP/gRPC receiver: `telemetry::init` with an endpoint exports the spans of
//! the current process, with the service name, and a parent context restored from a job record
//! (a string map) makes the exported span a child in the same trace.

use std::collections::HashMap;
use std::time::Duration;

use x2v_core::propagation;
use x2v_core::telemetry::{self, TelemetryConfig};
use x2v_testkit::otlp::{TraceReceiver, hex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_with_service_name_and_restored_parent() {
    let receiver = TraceReceiver::start();

    let config = TelemetryConfig {
        otlp_endpoint: Some(receiver.endpoint().to_owned()),
        ..Default::default()
    };
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
            .requests()
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
