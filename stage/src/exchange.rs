//! How a stage hands its output payload to the next stage, addressed by job id.
//!
//! The producing stage publishes the payload and records a locator in the job (an output of
//! variant `phase1` or `phase2`); the consuming stage, whichever rank claims the job, fetches it
//! from that locator. A published payload stays available for `retain` so that a job redelivered
//! after a consumer crash can fetch it again; a fetch never consumes it.
//!
//! - [`InProcess`]: `x2v up`, all stages in one process: payloads are handed over by reference.
//! - [`Network`]: one x2v-transfer engine per process; consumers pull over shm (same host) or TCP,
//!   and every tensor's SHA-256 is verified before the stage sees it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use x2v_core::{JobErrorCode, JobId};
use x2v_transfer::{Engine, Opts, Payload, Received, TensorMeta, TransferError};

/// Locator scheme of an x2v-transfer engine.
const SCHEME: &str = "x2v-transfer://";
/// Locator of the in-process exchange.
const LOCAL: &str = "in-process";

/// The payload a stage received, with each tensor's bytes verified.
pub enum Inputs {
    Local(Payload),
    Remote(Received),
}

impl Inputs {
    /// Every tensor with its bytes, in payload order.
    pub fn tensors(&self) -> Vec<(&TensorMeta, &[u8])> {
        match self {
            Inputs::Local(p) => p.tensors().iter().map(|t| (&t.meta, &t.data[..])).collect(),
            Inputs::Remote(r) => r
                .tensors()
                .iter()
                .map(|m| (m, r.bytes(&m.name).expect("a received tensor has bytes")))
                .collect(),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        match self {
            Inputs::Local(p) => p.total_bytes(),
            Inputs::Remote(r) => r.total_bytes(),
        }
    }

    /// `in-process`, `shm`, `tcp` or `rdma`.
    pub fn transport(&self) -> &'static str {
        match self {
            Inputs::Local(_) => LOCAL,
            Inputs::Remote(r) => r.transport().as_str(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("payload locator `{0}` is not one this exchange can read")]
    Locator(String),
    #[error("no payload for job {0} (expired, or its producer restarted)")]
    NotFound(JobId),
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

impl ExchangeError {
    /// The job error code a stage reports for this failure.
    pub fn code(&self) -> JobErrorCode {
        match self {
            ExchangeError::Transfer(TransferError::Integrity { .. }) => {
                JobErrorCode::TransferIntegrity
            }
            ExchangeError::Transfer(e) if e.kind() == x2v_core::ErrorKind::DeadlineExceeded => {
                JobErrorCode::TransferTimeout
            }
            ExchangeError::NotFound(_) => JobErrorCode::PayloadUnavailable,
            ExchangeError::Transfer(e) if e.kind() == x2v_core::ErrorKind::NotFound => {
                JobErrorCode::PayloadUnavailable
            }
            _ => JobErrorCode::TransferFailed,
        }
    }

    /// Whether another attempt could succeed (a broken connection, a corrupted copy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ExchangeError::Transfer(e) => {
                matches!(e, TransferError::Integrity { .. }) || e.kind().is_retryable()
            }
            _ => false,
        }
    }
}

/// Moves stage payloads between stages.
#[async_trait]
pub trait Exchange: Send + Sync + 'static {
    /// Makes `payload` (the `variant` output, `phase1` or `phase2`) available for `job`'s next
    /// stage and returns the locator to record.
    async fn publish(
        &self,
        job: JobId,
        variant: &str,
        payload: Payload,
    ) -> Result<String, ExchangeError>;
    /// Fetches `job`'s payload from `locator`, verified, within `opts`' deadline.
    async fn fetch(&self, job: JobId, locator: &str, opts: Opts) -> Result<Inputs, ExchangeError>;
    /// The consuming stage finished with `job`'s payload at `locator`: free it where possible.
    fn consumed(&self, job: JobId, locator: &str);
}

type Slots = HashMap<(JobId, String), (Payload, Instant)>;

/// Payloads handed over inside one process.
pub struct InProcess {
    retain: Duration,
    slots: Mutex<Slots>,
}

impl InProcess {
    pub fn new(retain: Duration) -> Self {
        InProcess { retain, slots: Mutex::new(HashMap::new()) }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Exchange for InProcess {
    async fn publish(
        &self,
        job: JobId,
        variant: &str,
        payload: Payload,
    ) -> Result<String, ExchangeError> {
        let now = Instant::now();
        let mut slots = self.slots();
        slots.retain(|_, (_, until)| *until > now);
        slots.insert((job, variant.to_owned()), (payload, now + self.retain));
        Ok(format!("{LOCAL}/{variant}"))
    }

    async fn fetch(&self, job: JobId, locator: &str, _: Opts) -> Result<Inputs, ExchangeError> {
        let variant = local_variant(locator)?;
        let slots = self.slots();
        match slots.get(&(job, variant.to_owned())) {
            Some((p, until)) if *until > Instant::now() => Ok(Inputs::Local(p.clone())),
            _ => Err(ExchangeError::NotFound(job)),
        }
    }

    fn consumed(&self, job: JobId, locator: &str) {
        if let Ok(variant) = local_variant(locator) {
            self.slots().remove(&(job, variant.to_owned()));
        }
    }
}

/// Payloads moved by an x2v-transfer engine: published into its outbox, pulled by the consumer.
pub struct Network {
    engine: Engine,
    advertise: SocketAddr,
    retain: Duration,
}

impl Network {
    /// `advertise`: where other stages reach `engine` (its bound address unless behind NAT/proxy).
    pub fn new(engine: Engine, advertise: SocketAddr, retain: Duration) -> Self {
        Network { engine, advertise, retain }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// This engine's locator.
    pub fn locator(&self) -> String {
        format!("{SCHEME}{}", self.advertise)
    }
}

fn local_variant(locator: &str) -> Result<&str, ExchangeError> {
    locator
        .strip_prefix(LOCAL)
        .and_then(|v| v.strip_prefix('/'))
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ExchangeError::Locator(locator.to_owned()))
}

fn parse_locator(locator: &str) -> Result<SocketAddr, ExchangeError> {
    locator
        .strip_prefix(SCHEME)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| ExchangeError::Locator(locator.to_owned()))
}

#[async_trait]
impl Exchange for Network {
    async fn publish(
        &self,
        job: JobId,
        _variant: &str,
        payload: Payload,
    ) -> Result<String, ExchangeError> {
        // One engine serves one stage, so the job id alone names the payload. A redelivered producer publishes the same job again: the newer payload wins.
        self.engine.unpublish(job);
        self.engine.publish_retained(job, payload, self.retain)?;
        Ok(self.locator())
    }

    async fn fetch(&self, job: JobId, locator: &str, opts: Opts) -> Result<Inputs, ExchangeError> {
        let peer = parse_locator(locator)?;
        Ok(Inputs::Remote(self.engine.pull(peer, job, opts).await?))
    }

    fn consumed(&self, job: JobId, locator: &str) {
        // Only the producer holds the payload; it expires there. A producer in this process frees
        // it at once.
        if parse_locator(locator).is_ok_and(|a| a == self.advertise) {
            self.engine.unpublish(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use x2v_transfer::{Dtype, EngineConfig, Secret};

    fn payload() -> Payload {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        Payload::new(vec![("latents".into(), Dtype::F32, vec![1, 1024], Bytes::from(data))])
            .unwrap()
    }

    #[tokio::test]
    async fn in_process_fetches_until_consumed() {
        let x = InProcess::new(Duration::from_secs(60));
        let job = JobId::new();
        let loc = x.publish(job, "phase2", payload()).await.unwrap();
        let opts = || Opts::timeout(Duration::from_secs(1));
        for _ in 0..2 {
            let got = x.fetch(job, &loc, opts()).await.unwrap();
            assert_eq!(got.tensors()[0].1, &payload().tensors()[0].data[..]);
        }
        x.consumed(job, &loc);
        assert!(matches!(x.fetch(job, &loc, opts()).await, Err(ExchangeError::NotFound(_))));
        assert!(matches!(
            x.fetch(job, "x2v-transfer://127.0.0.1:1", opts()).await,
            Err(ExchangeError::Locator(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn network_pulls_a_retained_payload_twice() {
        let secret = Secret::new(b"exchange-test-secret-0123456789".to_vec()).unwrap();
        let start = || {
            let e = Engine::start(EngineConfig::new(secret.clone())).unwrap();
            let a = e.local_addr();
            Network::new(e, a, Duration::from_secs(60))
        };
        let (producer, consumer) = (start(), start());
        let job = JobId::new();
        let loc = producer.publish(job, "phase1", payload()).await.unwrap();
        assert!(loc.starts_with("x2v-transfer://127.0.0.1:"));
        for _ in 0..2 {
            let got =
                consumer.fetch(job, &loc, Opts::timeout(Duration::from_secs(5))).await.unwrap();
            assert_eq!(got.transport(), "shm");
            assert_eq!(got.total_bytes(), 4096);
        }
        producer.consumed(job, &loc);
        let err = consumer.fetch(job, &loc, Opts::timeout(Duration::from_secs(5))).await;
        assert_eq!(err.err().map(|e| e.code().as_str()), Some("payload_unavailable"));
    }
}
