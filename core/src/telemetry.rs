//! One telemetry set-up for every x2v binary: a `tracing` subscriber writing text or JSON, filtered
//! by `RUST_LOG` or the configured level, plus an OpenTelemetry OTLP (gRPC) span exporter when an
//! endpoint is configured. The returned [`Telemetry`] owns the tracer provider; call
//! [`Telemetry::shutdown`] on exit so buffered spans are flushed.

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the span stack.
    Json,
}

/// Telemetry settings shared by every binary's config (section `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax; `RUST_LOG` itself wins when set.
    pub log_level: String,
    /// OTLP gRPC endpoint (e.g. `http://otel-collector:4317`); no span export when unset.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled, 0.0..=1.0 (child spans follow their parent's decision).
    pub sample_ratio: f64,
    /// Overrides the binary's default `service.name` resource attribute.
    pub service_name: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Text,
            log_level: "info".into(),
            otlp_endpoint: None,
            sample_ratio: 1.0,
            service_name: None,
        }
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {0:?}: {1}")]
    Filter(String, String),
    #[error("sample_ratio must be within 0.0..=1.0, got {0}")]
    SampleRatio(f64),
    #[error("the OTLP exporter must be started inside a tokio runtime")]
    NoRuntime,
    #[error("cannot build the OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer provider alive; flushes and stops it on [`Telemetry::shutdown`] or drop.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.force_flush() {
                eprintln!("x2v: flushing spans failed: {e}");
            }
            if let Err(e) = provider.shutdown() {
                eprintln!("x2v: stopping the span exporter failed: {e}");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber (and the W3C trace-context propagator) for `service`.
pub fn init(service: &str, config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log_level.clone());
    let filter = EnvFilter::try_new(&directives)
        .map_err(|e| TelemetryError::Filter(directives.clone(), e.to_string()))?;
    if !(0.0..=1.0).contains(&config.sample_ratio) {
        return Err(TelemetryError::SampleRatio(config.sample_ratio));
    }
    let service_name = config.service_name.clone().unwrap_or_else(|| service.to_owned());

    let provider = config
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| build_provider(endpoint, &service_name, config))
        .transpose()?;
    let otel_layer =
        provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("x2v")));

    let fmt_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only on a terminal: log files and collectors get plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Telemetry { provider })
}

fn build_provider(
    endpoint: &str,
    service_name: &str,
    config: &TelemetryConfig,
) -> Result<SdkTracerProvider, TelemetryError> {
    // The tonic channel spawns its connection task on the current runtime.
    tokio::runtime::Handle::try_current().map_err(|_| TelemetryError::NoRuntime)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_owned())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_settings_before_installing_anything() {
        let cfg = TelemetryConfig { log_level: "info,[".into(), ..Default::default() };
        // RUST_LOG takes precedence over the configured level, so the filter check only applies without it.
        if std::env::var_os("RUST_LOG").is_none() {
            assert!(matches!(init("t", &cfg), Err(TelemetryError::Filter(..))));
        }
        let cfg = TelemetryConfig { sample_ratio: 1.5, ..Default::default() };
        assert!(matches!(init("t", &cfg), Err(TelemetryError::SampleRatio(_))));
        let cfg = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        };
        assert!(matches!(init("t", &cfg), Err(TelemetryError::NoRuntime)));
    }

    #[test]
    fn config_reads_from_toml() {
        let cfg: TelemetryConfig =
            toml::from_str("log_format = \"json\"\notlp_endpoint = \"http://c:4317\"").unwrap();
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.otlp_endpoint.as_deref(), Some("http://c:4317"));
        assert_eq!(cfg.log_level, "info");
    }
}
