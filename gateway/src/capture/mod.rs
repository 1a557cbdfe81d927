//! Kernel capture: loads the eBPF programs, keeps their maps in sync with config, and answers
//! "who made this connection and where was it going?" for the proxy.

pub mod identity;

use std::net::SocketAddr;

pub use gateway_common::CaptureRecord;
pub use identity::{Agent, AgentResolver};

/// Where the proxy finds the kernel's record of an accepted connection. A trait so the proxy can
/// be exercised without BPF (unit tests) while production uses the eBPF map.
pub trait FlowTable: Send + Sync + 'static {
    /// Remove and return the record for the connection whose agent side is `peer` and whose
    /// proxy side is `local` (as seen by `accept`). `None`: not a captured connection.
    fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<CaptureRecord>;
}
