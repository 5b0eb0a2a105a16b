//! x2v-gateway: the OpenAI-compatible HTTP API (`/v1/videos`, `/v1/images/...`) over a durable
//! Redis job queue with engine-rank assignment.
//!
//! Not implemented yet: this crate is filled by the gateway issue. Nothing here is usable today.
#![forbid(unsafe_code)]
