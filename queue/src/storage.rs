//! Output storage: job outputs and uploaded inputs as objects under `{job id}/{name}`. A local
//! directory by default; an S3-compatible store (MinIO, Ceph, AWS) when configured and built with
//! the `s3` feature. Bytes are opaque here: the decoder writes them, the gateway serves them.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use x2v_core::Secret;

use crate::error::QueueError;

/// The kind of object store outputs go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// A local directory.
    Local,
    /// An S3-compatible store (needs the `s3` cargo feature).
    S3,
}

/// Where outputs live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` or `s3`.
    pub kind: StorageKind,
    /// Directory for `local` (created if missing).
    pub path: String,
    /// Bucket for `s3`.
    pub bucket: String,
    /// Endpoint URL for `s3` (empty: AWS).
    pub endpoint: String,
    /// Region for `s3`.
    pub region: String,
    /// Credentials for `s3` (empty: taken from the `AWS_*` environment).
    pub access_key_id: String,
    pub secret_access_key: Secret,
    /// Allow a plain-HTTP endpoint (local MinIO).
    pub allow_http: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Local,
            path: "./x2v-data/outputs".into(),
            bucket: String::new(),
            endpoint: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            allow_http: false,
        }
    }
}

/// A handle on the configured object store.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
}

fn err(e: object_store::Error) -> QueueError {
    match e {
        object_store::Error::NotFound { path, .. } => QueueError::NotFound(path),
        other => QueueError::Storage(other.to_string()),
    }
}

impl Storage {
    pub fn from_config(config: &StorageConfig) -> Result<Self, QueueError> {
        match config.kind {
            StorageKind::Local => Self::local(&config.path),
            StorageKind::S3 => Self::s3(config),
        }
    }

    /// A local directory (created if missing).
    pub fn local(dir: impl AsRef<std::path::Path>) -> Result<Self, QueueError> {
        std::fs::create_dir_all(dir.as_ref()).map_err(|e| {
            QueueError::Storage(format!("cannot create {}: {e}", dir.as_ref().display()))
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(err)?;
        Ok(Storage { store: Arc::new(fs) })
    }

    #[cfg(feature = "s3")]
    fn s3(c: &StorageConfig) -> Result<Self, QueueError> {
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&c.bucket)
            .with_region(&c.region)
            .with_allow_http(c.allow_http);
        if !c.endpoint.is_empty() {
            b = b.with_endpoint(&c.endpoint);
        }
        if !c.access_key_id.is_empty() {
            b = b
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(c.secret_access_key.expose());
        }
        Ok(Storage { store: Arc::new(b.build().map_err(err)?) })
    }

    #[cfg(not(feature = "s3"))]
    fn s3(_: &StorageConfig) -> Result<Self, QueueError> {
        Err(QueueError::Invalid(
            "storage.kind `s3` needs x2v built with the `s3` cargo feature".into(),
        ))
    }

    /// Any object store (tests use `object_store::memory::InMemory`).
    pub fn from_store(store: Arc<dyn ObjectStore>) -> Self {
        Storage { store }
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<u64, QueueError> {
        let len = bytes.len() as u64;
        self.store.put(&Path::from(key), PutPayload::from(bytes)).await.map_err(err)?;
        Ok(len)
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, QueueError> {
        self.store.get(&Path::from(key)).await.map_err(err)?.bytes().await.map_err(err)
    }

    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, QueueError> {
        self.store.get_range(&Path::from(key), range).await.map_err(err)
    }

    /// Object size in bytes.
    pub async fn size(&self, key: &str) -> Result<u64, QueueError> {
        Ok(self.store.head(&Path::from(key)).await.map_err(err)?.size)
    }

    /// Deletes every object under `prefix/` (a job's outputs and inputs).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), QueueError> {
        let p = Path::from(prefix);
        let keys: Vec<Path> =
            self.store.list(Some(&p)).map_ok(|m| m.location).try_collect().await.map_err(err)?;
        for k in keys {
            match self.store.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(())
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn check(&self) -> Result<(), QueueError> {
        match self.store.head(&Path::from("x2v-readiness-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}
