//! W3C trace-context (`traceparent`/`tracestate`) carried across process boundaries.
//!
//! One job is one trace: the gateway stores the context in the job record (a string map), the stage
//! services restore it and pass it on over gRPC metadata and HTTP headers. These helpers use their
//! own propagator, so they work whether or not [`crate::telemetry::init`] ran.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// The OpenTelemetry context of the current `tracing` span.
pub fn current_context() -> Context {
    tracing::Span::current().context()
}

/// Makes `cx` the parent of `span` (call before the span is entered).
pub fn set_parent(span: &tracing::Span, cx: Context) {
    // Only fails when no OpenTelemetry layer is installed, in which case there is nothing to link.
    let _ = span.set_parent(cx);
}

/// The W3C trace id of `cx` as 32 hex digits, if it carries a valid span context.
pub fn trace_id(cx: &Context) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes `cx` into HTTP headers.
pub fn inject_http(cx: &Context, headers: &mut http::HeaderMap) {
    propagator().inject_context(cx, &mut HeaderInjector(headers));
}

/// Reads a context from HTTP headers (an empty context when none is present or it is malformed).
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `cx` into gRPC request metadata.
pub fn inject_grpc(cx: &Context, metadata: &mut MetadataMap) {
    propagator().inject_context(cx, &mut MetadataInjector(metadata));
}

/// Reads a context from gRPC metadata.
pub fn extract_grpc(metadata: &MetadataMap) -> Context {
    propagator().extract(&MetadataExtractor(metadata))
}

/// Writes `cx` into a plain string map (e.g. fields of a Redis job hash).
pub fn inject_map(cx: &Context, map: &mut HashMap<String, String>) {
    propagator().inject_context(cx, map);
}

/// Reads a context from a plain string map.
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    propagator().extract(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    fn sample_context() -> Context {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("x2v", "gw")]).unwrap(),
        );
        Context::new().with_remote_span_context(sc)
    }

    fn assert_same_span(cx: &Context) {
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
        assert_eq!(sc.trace_state().get("x2v"), Some("gw"));
    }

    #[test]
    fn http_round_trip() {
        let mut headers = http::HeaderMap::new();
        inject_http(&sample_context(), &mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_same_span(&extract_http(&headers));
    }

    #[test]
    fn grpc_round_trip() {
        let mut md = MetadataMap::new();
        inject_grpc(&sample_context(), &mut md);
        assert_same_span(&extract_grpc(&md));
    }

    #[test]
    fn map_round_trip_and_trace_id() {
        let mut map = HashMap::new();
        inject_map(&sample_context(), &mut map);
        assert!(map.contains_key("traceparent"));
        let cx = extract_map(&map);
        assert_same_span(&cx);
        assert_eq!(trace_id(&cx).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    }

    #[test]
    fn malformed_or_missing_context_is_empty() {
        let mut map = HashMap::new();
        assert_eq!(trace_id(&extract_map(&map)), None);
        map.insert("traceparent".to_owned(), "00-zz-00f067aa0ba902b7-01".to_owned());
        assert_eq!(trace_id(&extract_map(&map)), None);
        // Without an OpenTelemetry layer the current span carries no context to send.
        let mut out = HashMap::new();
        inject_map(&current_context(), &mut out);
        assert!(out.is_empty());
    }
}
