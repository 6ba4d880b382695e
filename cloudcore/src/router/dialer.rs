//! How the router reaches edge endpoints: a byte stream per request, opened by whatever
//! implements [`EdgeDialer`] (the tunnels in production, a fake in tests).

use async_trait::async_trait;
use edgehub::tunnel::{OpenError, OpenRequest};

use crate::tunnel::{BoxedIo, Tunnels};

#[async_trait]
pub trait EdgeDialer: Send + Sync {
    /// Opens a stream to `req.endpoint` (through `req.node`'s link, or dialled by cloudcore
    /// for a cloud endpoint).
    async fn open(&self, req: OpenRequest) -> Result<BoxedIo, OpenError>;
}

#[async_trait]
impl EdgeDialer for Tunnels {
    async fn open(&self, req: OpenRequest) -> Result<BoxedIo, OpenError> {
        Tunnels::open(self, req).await
    }
}

/// A dialer with no links, for tests that never route.
#[cfg(test)]
pub(crate) struct NoLinks;

#[cfg(test)]
#[async_trait]
impl EdgeDialer for NoLinks {
    async fn open(&self, _req: OpenRequest) -> Result<BoxedIo, OpenError> {
        Err(OpenError::LinkDown)
    }
}
