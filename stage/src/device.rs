//! The one thread a stage's model lives and runs on. The model (libtorch modules and the CUDA
//! context they use) is built on this thread and never leaves it; async callers submit closures
//! that borrow it and await their results, so the tokio executor never blocks on a kernel.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Work<M> = Box<dyn FnOnce(&mut M) + Send>;

/// A named thread owning a model `M` and executing submitted closures on it, in order.
pub struct DeviceThread<M: 'static> {
    tx: Option<mpsc::Sender<Work<M>>>,
    handle: Option<JoinHandle<()>>,
}

/// Why submitted work produced no result.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the device thread has stopped")]
    Gone,
    #[error("the stage panicked: {0}")]
    Panicked(String),
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

impl<M: 'static> DeviceThread<M> {
    /// Starts the thread and builds the model on it with `init`; returns once `init` finished.
    pub async fn spawn<E, F>(name: &str, init: F) -> Result<Self, E>
    where
        E: Send + 'static + From<DeviceError>,
        F: FnOnce() -> Result<M, E> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Work<M>>();
        let (ready, built) = oneshot::channel::<Result<(), E>>();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut model = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(init)) {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                    Err(p) => {
                        let _ = ready.send(Err(DeviceError::Panicked(panic_message(&*p)).into()));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                while let Ok(work) = rx.recv() {
                    work(&mut model);
                }
            })
            .map_err(|_| E::from(DeviceError::Gone))?;
        match built.await {
            Ok(Ok(())) => Ok(DeviceThread { tx: Some(tx), handle: Some(handle) }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DeviceError::Gone.into()),
        }
    }

    /// Runs `f` on the model after the work queued before it. A panic inside `f` is contained: it
    /// is reported as an error and the thread goes on serving.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DeviceError>
    where
        T: Send + 'static,
        F: FnOnce(&mut M) -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let work: Work<M> = Box::new(move |m| {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(m)));
            let _ = done.send(out);
        });
        self.tx.as_ref().ok_or(DeviceError::Gone)?.send(work).map_err(|_| DeviceError::Gone)?;
        match result.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => {
                let msg = panic_message(&*panic);
                tracing::error!(panic = %msg, "stage work panicked on the device thread");
                Err(DeviceError::Panicked(msg))
            }
            Err(_) => Err(DeviceError::Gone),
        }
    }
}

impl<M: 'static> Drop for DeviceThread<M> {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[derive(Debug)]
    struct E(#[allow(dead_code)] String);
    impl From<DeviceError> for E {
        fn from(e: DeviceError) -> Self {
            E(e.to_string())
        }
    }

    #[tokio::test]
    async fn a_thread_bound_model_serves_in_order_and_survives_a_panic() {
        // `Rc` is neither Send nor Sync: the model never leaves its thread.
        let dev = DeviceThread::spawn("x2v-test-device", || Ok::<_, E>(Rc::new(40))).await.unwrap();
        let name = dev.run(|_| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert_eq!(name.as_deref(), Some("x2v-test-device"));
        let err = dev.run(|_| -> i32 { panic!("boom") }).await.unwrap_err();
        assert!(matches!(err, DeviceError::Panicked(m) if m == "boom"));
        assert_eq!(dev.run(|m| **m + 2).await.unwrap(), 42);
    }

    #[tokio::test]
    async fn a_failed_init_is_returned() {
        let r = DeviceThread::<u8>::spawn("x2v-test-init", || Err(E("no weights".into()))).await;
        assert_eq!(r.err().map(|e| e.0), Some("no weights".to_string()));
    }
}
