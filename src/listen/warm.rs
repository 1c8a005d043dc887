//! The background service whose runtime runs warm jobs (`crate::warm`): it hands the engine
//! its runtime at start and stops the refresh loops at shutdown.

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

pub struct WarmService {
    pub warmer: crate::warm::Warmer,
}

#[async_trait]
impl BackgroundService for WarmService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        self.warmer.attach(tokio::runtime::Handle::current());
        let _ = shutdown.changed().await;
        self.warmer.stop();
    }
}
