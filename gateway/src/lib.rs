//! tollgate: transparent capture and governance of AI traffic on a Linux node.
//!
//! Modules follow the request path: [`capture`] (kernel redirect) → [`connection`] (sniff, TLS)
//! → [`protocol`] (LLM wire formats) → [`policy`] (balancing, failover) → [`upstream`] →
//! [`telemetry`].

pub mod admin;
pub mod capture;
pub mod config;
pub mod connection;
pub mod policy;
pub mod protocol;
pub mod reload;
pub mod telemetry;
pub mod top;
pub mod upstream;
