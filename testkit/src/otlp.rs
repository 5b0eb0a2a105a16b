//! An OTLP/gRPC trace receiver on 127.0.0.1 that keeps every export request, for tests that check
//! what the services' telemetry sends.
//!
//! It serves from its own thread and runtime, so sync tests (which spawn service processes) and
//! `#[tokio::test]`s use it alike, and dropping it never drops a runtime inside another one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::sync::oneshot;

type Requests = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

/// The collector: its endpoint for `otlp_endpoint`, and what it has received. Stops on drop.
pub struct TraceReceiver {
    endpoint: String,
    requests: Requests,
    _stop: oneshot::Sender<()>,
}

/// The `TraceService`: keeps every export request.
#[derive(Clone, Default)]
struct TraceSink {
    requests: Requests,
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl TraceReceiver {
    /// Binds a free port and serves until dropped.
    pub fn start() -> Self {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("binding the trace receiver");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the receiver's address");
        let sink = TraceSink::default();
        let requests = sink.requests.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    let server = tonic::transport::Server::builder()
                        .add_service(TraceServiceServer::new(sink))
                        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
                            listener,
                        ));
                    // Dropping the receiver ends the server at once, open connections included.
                    tokio::select! {
                        _ = server => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawning the trace receiver thread");
        TraceReceiver { endpoint: format!("http://{addr}"), requests, _stop: stop }
    }

    /// `http://127.0.0.1:PORT`, as `otlp_endpoint` takes it.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every export request received so far.
    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanRecord> {
        let requests = self.requests.lock().unwrap();
        let mut spans = Vec::new();
        for rs in requests.iter().flat_map(|r| &r.resource_spans) {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                spans.push(SpanRecord {
                    service: service.clone(),
                    name: span.name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: attributes(&span.attributes),
                });
            }
        }
        spans
    }
}

/// The parts of an exported span that assertions look at, ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// The `service.name` of the exporting resource.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// Attribute values as text.
    pub attributes: BTreeMap<String, String>,
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(kv.value.as_ref()))).collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Lowercase hex of an id's bytes, as W3C `traceparent` writes it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line per span, grouped by trace, for failure messages.
pub fn describe(spans: &[SpanRecord]) -> String {
    let mut sorted: Vec<&SpanRecord> = spans.iter().collect();
    sorted.sort_by(|a, b| (&a.trace_id, &a.service).cmp(&(&b.trace_id, &b.service)));
    let mut out = format!("{} spans\n", spans.len());
    for s in sorted {
        let shown: BTreeMap<&str, &str> = s
            .attributes
            .iter()
            .filter(|(k, _)| !k.starts_with("code.") && !k.starts_with("thread."))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        out.push_str(&format!(
            "  trace={} span={} parent={:16} {:8} {:20} {shown:?}\n",
            s.trace_id, s.span_id, s.parent_span_id, s.service, s.name
        ));
    }
    out
}
