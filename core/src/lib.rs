//! x2v-core: the pieces every x2v crate shares and that need neither libtorch nor an HTTP stack.
//!
//! - [`id`]: time-ordered job ids (UUIDv7), rendered as lowercase hex with an optional prefix.
//! - [`error`]: the closed [`ErrorKind`] every crate's error enum maps into, rendered once per protocol.
//! - [`config`]: layered configuration: defaults, then a TOML/JSON file, then `X2V_*` variables.
//! - [`telemetry`]: tracing subscriber (text or JSON) with an optional OTLP exporter.
//! - [`propagation`]: W3C trace-context inject/extract for HTTP headers, gRPC metadata and string maps.
//! - [`secret`]: strings that configs hold but logs must not show.
//! - [`lora`]: the LoRA adapters a job asks for, and the rule for their names.
//! - [`metrics`]: a Prometheus registry with the service's constant labels and text encoding.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod id;
pub mod lora;
pub mod metrics;
pub mod propagation;
pub mod secret;
pub mod telemetry;

pub use error::{ErrorKind, JobErrorCode};
pub use id::JobId;
pub use secret::{Secret, SecretUrl};
