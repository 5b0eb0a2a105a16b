//! gRPC health and admin, HTTP metrics (being written).
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
#[derive(Debug, Clone, Default)]
pub struct AdminEndpoints { pub grpc: Option<SocketAddr>, pub http: Option<SocketAddr> }
pub async fn serve(_state: Arc<crate::ServiceState>, _queue: Option<Arc<dyn x2v_queue::Queue>>, _grpc: &str, _http: &str, _shutdown: CancellationToken) -> anyhow::Result<(AdminEndpoints, tokio::task::JoinHandle<()>)> {
    Ok((AdminEndpoints::default(), tokio::spawn(async {})))
}
