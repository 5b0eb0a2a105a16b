//! x2v-queue: the durable job store and per-stage work queues behind the gateway, and the worker-side
//! API the stage services use. Needs neither axum nor libtorch.
//!
//! - [`spec`]: the typed [`JobSpec`] a validated request becomes, [`Stage`]s, engine [`Ranks`].
//! - [`record`]: the stored [`JobRecord`], its status machine and [`JobEvent`]s.
//! - [`queue`]: the [`Queue`] trait (jobs, leased stage queues, worker registry, events).
//! - [`memory`] / [`redis_queue`]: the in-process and Redis backends of that one contract.
//! - [`assign`]: engine-rank assignment (least outstanding work; pins honoured).
//! - [`worker`]: the stage-service side: claim, heartbeat, progress, cancel, complete, fail.
//! - [`storage`]: output storage (local directory or an S3-compatible store).
#![forbid(unsafe_code)]

pub mod assign;
pub mod error;
mod events;
pub mod memory;
pub mod queue;
pub mod record;
pub mod redis_queue;
mod redis_record;
pub mod spec;
pub mod storage;
pub mod worker;

pub use error::QueueError;
pub use memory::{MemoryQueue, Retention};
pub use queue::{
    Control, Created, Idempotency, Lease, LeaseRef, ListQuery, NewJob, Order, Page, Queue,
    QueueBackend, WorkerInfo,
};
pub use record::{
    JobError, JobEvent, JobRecord, JobStatus, MAX_PREVIEWS, OutputRef, PREVIEW_VARIANT,
    preview_index, preview_of,
};
pub use redis_queue::RedisQueue;
pub use spec::{InputRef, JobSpec, Ranks, Resource, Size, Stage, Task};
