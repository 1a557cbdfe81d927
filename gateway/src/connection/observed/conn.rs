//! One observed connection: the request and response framers, and the exchanges between them.
//! Requests queue in order; response *i* belongs to request *i* (pipelining is FIFO in
//! HTTP/1.1), interim 1xx responses (`Expect: 100-continue`) belong to none.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::decode::{DecodeError, Decoder};
use super::exchange::{is_sse, Call, End, Meta, Overflow, RouteInfo};
use super::http1::{BodyKind, FrameError, Framer, Head, Piece, Role};
use super::ObservedLimits;
use crate::capture::{Agent, AgentResolver};
use crate::config::{Config, InterceptMode, RouteProtocol};
use crate::protocol::llm::Reporter;

/// What a connection needs from the task to start exchanges.
pub(super) struct Env<'a> {
    /// The config generation current now.
    pub(super) config: &'a Config,
    /// Names callees of A2A hops.
    pub(super) agents: &'a AgentResolver,
    /// Where calls are reported.
    pub(super) reporter: &'a Arc<Reporter>,
    /// The task's bounds.
    pub(super) limits: &'a ObservedLimits,
}

/// The decoding of the body in flight.
enum Dec {
    /// Not encoded (or not read).
    Plain,
    /// Encoded: decoded before the call reads it.
    On(Box<Decoder>),
    /// It could not be decoded: the rest is not read.
    Failed,
}

/// One request and what is known of its fate.
struct Pending {
    call: Call,
    /// `HEAD`: its response has no body whatever its headers say.
    head_method: bool,
    /// Bytes were lost while it was in flight, or a body of it did not decode: its usage
    /// cannot be exact.
    gap: bool,
    /// The body of the direction in flight (request, then response).
    dec: Dec,
}

impl Pending {
    /// The decoding a head's `Content-Encoding` asks for, when the call reads the body.
    fn decode(&mut self, h: &Head, at_once: Option<usize>, whole: bool) {
        self.dec = Dec::Plain;
        let (Some(at_once), Some(coding)) = (at_once, h.header("content-encoding")) else { return };
        match Decoder::new(coding, at_once, whole) {
            Ok(Some(d)) => self.dec = Dec::On(Box::new(d)),
            Ok(None) => {}
            Err(e) => self.fail(&e),
        }
    }

    /// A body did not decode: counted, the rest not read, the call flagged.
    fn fail(&mut self, e: &DecodeError) {
        tracing::debug!(error = %e, "observed body not decoded");
        if let Some(r) = self.call.reporter() {
            r.telemetry().observed.dropped(e.reason());
        }
        self.dec = Dec::Failed;
        self.gap = true;
    }

    /// Request body bytes, decoded. `Err`: over the request bound.
    fn request_body(&mut self, b: &Bytes) -> Result<(), Overflow> {
        match &mut self.dec {
            Dec::Plain => self.call.request_body(b),
            Dec::Failed => Ok(()),
            Dec::On(d) => {
                let call = &mut self.call;
                let mut over = Ok(());
                let r = d.feed(b, |p| {
                    if over.is_ok() {
                        over = call.request_body(p);
                    }
                });
                if let Err(e) = r {
                    self.fail(&e);
                }
                over
            }
        }
    }

    /// The request body ended: what its decoder holds is read.
    fn request_end(&mut self) {
        if let Dec::On(d) = &mut self.dec {
            let call = &mut self.call;
            let mut over = false;
            let r = d.finish(|p| over |= call.request_body(p).is_err());
            if let Err(e) = r {
                self.fail(&e);
            } else if over {
                self.fail(&DecodeError::TooLarge(0));
            }
        }
        self.dec = Dec::Plain;
        self.call.request_end();
    }

    /// Response body bytes, decoded.
    fn response_body(&mut self, b: &Bytes) {
        match &mut self.dec {
            Dec::Plain => self.call.response_body(b),
            Dec::Failed => {}
            Dec::On(d) => {
                let call = &mut self.call;
                if let Err(e) = d.feed(b, |p| call.response_body(p)) {
                    self.fail(&e);
                    self.call.lose_response_body();
                }
            }
        }
    }

    fn finish(mut self, end: End) {
        if end == End::Complete {
            if let Dec::On(d) = &mut self.dec {
                let call = &mut self.call;
                if let Err(e) = d.finish(|p| call.response_body(p)) {
                    self.fail(&e);
                    self.call.lose_response_body();
                }
            }
        }
        let end = if self.gap && end == End::Complete { End::Flagged } else { end };
        self.call.finish(end);
    }
}

/// The L7 state of one observed connection.
pub(super) struct Conn {
    agent: Arc<Agent>,
    orig: SocketAddr,
    req: Framer,
    resp: Framer,
    /// The request being read (head seen, body in progress).
    req_call: Option<Pending>,
    /// Requests read whole, waiting for (the start of) their responses.
    pending: VecDeque<Pending>,
    /// The exchange whose response is being read.
    resp_call: Option<Pending>,
    /// The response being read is an interim 1xx: its end belongs to no exchange.
    interim: bool,
    /// Response bytes were lost: until a response head has a single request to belong to,
    /// whole responses may have been lost with them and the pairing is in doubt.
    doubt: bool,
    /// Last event seen (idle timeout).
    pub(super) last: Instant,
    /// The proxy terminates this connection's TLS (`intercept: auto` decided so): its calls
    /// are reported by the proxy, not from here.
    pub(super) intercepted: bool,
}

impl Conn {
    /// A connection of `agent` to `orig`.
    pub(super) fn new(agent: Arc<Agent>, orig: SocketAddr, limits: &ObservedLimits) -> Self {
        Conn {
            agent,
            orig,
            req: Framer::new(Role::Request, limits.max_head_bytes),
            resp: Framer::new(Role::Response, limits.max_head_bytes),
            req_call: None,
            pending: VecDeque::new(),
            resp_call: None,
            interim: false,
            doubt: false,
            last: Instant::now(),
            intercepted: false,
        }
    }

    /// The agent of this connection.
    pub(super) fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    /// Plaintext the agent wrote. `Err(reason)`: the state must be dropped.
    pub(super) fn egress(&mut self, env: &Env<'_>, mut data: Bytes, gap: bool) -> Result<(), &'static str> {
        self.last = Instant::now();
        if gap {
            self.egress_lost();
        }
        while let Some(piece) = self.req.next(&mut data).map_err(reason)? {
            match piece {
                Piece::Head(h) => {
                    if let Some(mut prev) = self.req_call.take() {
                        prev.request_end();
                        self.pending.push_back(prev);
                    }
                    if self.pending.len() >= env.limits.max_pipeline {
                        return Err("pipeline");
                    }
                    let meta = self.meta(env, &h);
                    let call = Call::start(meta, &h, env.limits.max_body_bytes);
                    self.req.set_body(h.body_kind(Role::Request));
                    let mut p = Pending { call, head_method: h.method == "HEAD", gap: false, dec: Dec::Plain };
                    let bound = p.call.body_bound().map(|_| env.limits.max_body_bytes);
                    p.decode(&h, bound, true);
                    self.req_call = Some(p);
                }
                Piece::Body(b) => {
                    if let Some(p) = self.req_call.as_mut() {
                        p.request_body(&b).map_err(|_| "body_bytes")?;
                    }
                }
                Piece::End => {
                    if let Some(mut p) = self.req_call.take() {
                        p.request_end();
                        self.pending.push_back(p);
                    }
                }
            }
        }
        Ok(())
    }

    /// Request bytes were lost (reported before the next request bytes, or by a response event
    /// when the loss was a request's tail): the request in flight ends flagged, and the
    /// request side looks for the next message start. Repeating it changes nothing more.
    pub(super) fn egress_lost(&mut self) {
        // Whole requests lost with them leave no exchange, so their responses find none to
        // belong to (an agent sends its next request once it has read the previous response).
        if let Some(mut p) = self.req_call.take() {
            p.gap = true;
            p.dec = Dec::Plain;
            p.request_end();
            self.pending.push_back(p);
        }
        self.req.gap();
    }

    /// Plaintext the agent read. `Err(reason)`: the state must be dropped.
    pub(super) fn ingress(&mut self, mut data: Bytes, gap: bool) -> Result<(), &'static str> {
        self.last = Instant::now();
        if gap {
            if let Some(p) = self.resp_call.take() {
                p.finish(End::Gap);
            }
            // Whole responses may have been lost too: see `doubt`.
            self.doubt = true;
            self.interim = false;
            self.resp.gap();
        }
        while let Some(piece) = self.resp.next(&mut data).map_err(reason)? {
            match piece {
                Piece::Head(h) => self.response_head(h)?,
                Piece::Body(b) => {
                    if let Some(p) = self.resp_call.as_mut() {
                        p.response_body(&b);
                    }
                }
                Piece::End => {
                    if std::mem::take(&mut self.interim) {
                        continue;
                    }
                    if let Some(p) = self.resp_call.take() {
                        p.finish(End::Complete);
                    }
                }
            }
        }
        Ok(())
    }

    fn response_head(&mut self, h: Head) -> Result<(), &'static str> {
        if h.status == 101 {
            return Err("upgrade");
        }
        if (100..200).contains(&h.status) {
            self.interim = true;
            self.resp.set_body(BodyKind::None);
            return Ok(());
        }
        // A response before its request ended (an early error) belongs to that request.
        let waiting = self.pending.len();
        let mut p = self.pending.pop_front().or_else(|| self.req_call.take());
        if self.doubt {
            // One request waiting: this is its response, whatever was lost. More: the
            // responses of the first ones may have been lost, so none of them can be exact
            // until the queue drains.
            match waiting {
                0 | 1 => self.doubt = false,
                _ => {
                    if let Some(p) = p.as_mut() {
                        p.gap = true;
                    }
                }
            }
        }
        let no_body = p.as_ref().is_some_and(|p| p.head_method) || h.status == 204 || h.status == 304;
        self.resp.set_body(if no_body { BodyKind::None } else { h.body_kind(Role::Response) });
        if let Some(p) = p.as_mut() {
            // A response before its request's end: the request decoder ends here.
            p.request_end();
            p.call.response_head(&h);
            let bound = p.call.body_bound();
            p.decode(&h, bound, !is_sse(&h));
        }
        self.resp_call = p;
        Ok(())
    }

    /// The agent closed the socket: a read-until-close response ends, anything else in flight
    /// is cut.
    pub(super) fn close(mut self) {
        let until_close = self.resp.close();
        self.req.close();
        if let Some(p) = self.resp_call.take() {
            p.finish(if until_close { End::Complete } else { End::Closed });
        }
        self.end_all(End::Closed);
    }

    /// The state is dropped (a bound, shutdown): everything in flight ends as cut.
    pub(super) fn drop_state(mut self, why: &'static str) {
        if let Some(p) = self.resp_call.take() {
            p.finish(End::Dropped(why));
        }
        self.end_all(End::Dropped(why));
    }

    fn end_all(&mut self, end: End) {
        for p in self.pending.drain(..) {
            p.finish(end.clone());
        }
        if let Some(p) = self.req_call.take() {
            p.finish(end);
        }
    }

    /// The route of a request by its `Host` (else the original destination), as the proxy
    /// chooses it by SNI; `None` when no route matches (the exchange is only framed).
    fn meta(&self, env: &Env<'_>, h: &Head) -> Option<Meta> {
        let host = h.header("host").map(strip_port);
        let route = env.config.route_for(host, Some(self.orig))?;
        if route.intercept == InterceptMode::Always || self.intercepted {
            // tollgate terminates this TLS itself and reports the call from the proxy: the
            // plaintext the uprobes see is the agent's side of that same call.
            return None;
        }
        let callee_pod = (route.protocol == RouteProtocol::A2a).then(|| env.agents.pod_agent_at(self.orig.ip()));
        let server = match &route.upstream {
            // As the proxy reports a route with an `upstream` override.
            Some(url) => (
                url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string(),
                url.port_or_known_default().unwrap_or(self.orig.port()),
            ),
            None => (host.map_or_else(|| self.orig.ip().to_string(), str::to_string), self.orig.port()),
        };
        let limits = &env.config.limits;
        Some(Meta {
            agent: self.agent.clone(),
            route: RouteInfo {
                name: Arc::from(route.name.as_str()),
                protocol: route.protocol,
                provider: route.provider,
                log_payloads: route.log_payloads.enabled.then_some(route.log_payloads.max_bytes),
                paths: Arc::from(route.matcher.paths.as_slice()),
                server,
                callee_pod: callee_pod.flatten(),
            },
            reporter: env.reporter.clone(),
            max_sse_event: limits.max_sse_event_bytes,
            max_inspect: limits.max_inspect_bytes,
            max_batch: env.config.mcp.max_batch_len,
        })
    }
}

/// `host[:port]` → `host` (`[v6]:port` → `v6`).
fn strip_port(h: &str) -> &str {
    let h = h.trim();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// The drop reason of a framing failure.
fn reason(e: FrameError) -> &'static str {
    match e {
        FrameError::HeadTooLarge(_) => "header_bytes",
        FrameError::Http2 => "http2",
        FrameError::NotHttp(_) | FrameError::BadChunk => "not_http",
    }
}
