//! Mock LLM upstream for tollgate's end-to-end tests and benchmark: one process speaks every
//! provider API tollgate handles, in each provider's real wire format.
//!
//! * OpenAI: `POST /v1/chat/completions` (non-streaming and SSE with usage chunk and `[DONE]`,
//!   function tools), `/v1/responses` (object and SSE lifecycle), `/v1/embeddings`,
//!   `/v1/completions`; Azure `/openai/deployments/{dep}/chat/completions|embeddings?api-version=`.
//! * Anthropic: `POST /v1/messages` (message or `event:`-framed SSE, `tool_use`),
//!   `/v1/messages/count_tokens`; requires `anthropic-version`.
//! * Gemini: `POST /v1beta/models/{m}:generateContent`, `:streamGenerateContent[?alt=sse]`,
//!   `:countTokens`.
//!
//! Content and usage are pure functions of the request (see `tollgate_e2e::{openai, anthropic,
//! gemini}`). Every response carries `x-mock-peer: ip:port` (the TCP peer the mock saw, so a test
//! can tell a direct connection from a proxied one) and `x-mock-name`. `GET /` answers a fixed
//! text (an ordinary HTTPS origin for splice tests). Control API (see `tollgate_e2e::mock`):
//! `GET|DELETE /__mock/stats`, `GET|DELETE /__mock/requests`, `GET|POST|DELETE /__mock/fault`.
//!
//! Prints one `listening http|https ADDR` line per listener once all are bound, then serves
//! until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use tollgate_e2e::mock::apis::Auth;
use tollgate_e2e::mock::server::{self, Config, Listeners};

#[derive(Parser, Debug)]
#[command(about = "Mock LLM upstream (OpenAI, Azure OpenAI, Anthropic, Gemini)")]
struct Args {
    /// Plain HTTP listener (repeatable), e.g. 127.0.0.2:8000 or [::1]:8000; port 0 picks one.
    #[arg(long = "listen")]
    listen: Vec<SocketAddr>,
    /// HTTPS listener (repeatable; ALPN h2 and http/1.1); needs --cert and --key.
    #[arg(long = "tls-listen")]
    tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain for HTTPS listeners.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key for HTTPS listeners.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Delay between streamed events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Accept API requests without credentials (default: each provider's credential header must
    /// be present with any value).
    #[arg(long)]
    no_auth: bool,
    /// Accept only this API key (repeatable: any listed key is accepted), in the provider's own
    /// header: `Authorization: Bearer` (OpenAI), `api-key` (Azure), `x-api-key` (Anthropic),
    /// `x-goog-api-key` or `?key=` (Gemini).
    #[arg(long = "require-key", conflicts_with = "no_auth")]
    require_key: Vec<String>,
    /// Name echoed in the `x-mock-name` response header and in `/__mock/stats`.
    #[arg(long, default_value = "mock-llm")]
    name: String,
    /// How many recent API requests `/__mock/requests` keeps (0 disables recording).
    #[arg(long, default_value_t = 256)]
    record_requests: usize,
    /// Tokio worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.listen.is_empty() && args.tls_listen.is_empty() {
        bail!("give at least one --listen or --tls-listen");
    }
    let auth = match (args.no_auth, args.require_key.is_empty()) {
        (true, _) => Auth::Off,
        (false, true) => Auth::AnyKey,
        (false, false) => Auth::Keys(args.require_key.clone()),
    };
    let cfg = Config {
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        auth,
        name: args.name.clone(),
        record: args.record_requests,
    };
    let listeners = Listeners { http: args.listen, https: args.tls_listen, cert: args.cert, key: args.key };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    rt.build()?.block_on(server::run(cfg, listeners))
}
