//! L4 splice: bytes copied untouched between the agent and its original destination, with
//! byte counts and duration reported when the connection ends (even when it ends in an error,
//! which is why the counts live in a wrapper rather than in `copy_bidirectional`'s result).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::capture::Agent;
use crate::telemetry::{L4Conn, Telemetry};
use crate::upstream::Upstream;

/// Copy both ways between `client` and `dst` until both sides close, then report.
pub async fn splice(
    client: TcpStream,
    dst: SocketAddr,
    sni: Option<String>,
    agent: Arc<Agent>,
    upstream: &Upstream,
    telemetry: &Telemetry,
) {
    let t0 = Instant::now();
    let mut client = Counted { inner: client, read: 0, written: 0 };
    let error = match upstream.connect_tcp(dst).await {
        Ok(mut server) => tokio::io::copy_bidirectional(&mut client, &mut server).await.err().map(|e| e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(e) = &error {
        tracing::debug!(%dst, sni = sni.as_deref(), error = %e, "splice ended with error");
    }
    telemetry.l4_done(&L4Conn {
        agent,
        sni,
        dst,
        bytes_up: client.read,
        bytes_down: client.written,
        duration: t0.elapsed(),
        error,
    });
}

/// Counts bytes read from (agent → destination) and written to (destination → agent) a stream.
struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written += n as u64;
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
