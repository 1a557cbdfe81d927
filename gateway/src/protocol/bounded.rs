//! Reading a body whole, bounded three ways so one request cannot make tollgate do unbounded
//! work: by size (`limits.max_request_body_bytes`), by time (`limits.body_read_timeout`: a
//! client trickling its upload cannot hold a task and a buffer for ever), and by a byte budget
//! shared by the whole process (`limits.max_buffered_body_bytes`: many large bodies at once
//! cannot exhaust memory, whatever the number of connections).
//!
//! The budget is taken before bytes are buffered (all of a declared `content-length` at once,
//! else as chunks arrive) and travels with the buffer: the returned [`Bytes`] own their
//! [`Charge`], so the bytes are given back when the last clone of the body is dropped (after
//! the upstream request is sent and the response observer that keeps the request is done).

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntGauge;

use super::http::L7Context;
use super::ProtocolError;
use crate::telemetry::bounds::{buffered_body_bytes, Bound};

/// A byte budget: a counting semaphore of bytes that never waits (a request that finds no room
/// is refused at once, so a flood turns into quick 503s rather than a queue of held sockets).
#[derive(Debug)]
pub struct ByteBudget {
    capacity: AtomicUsize,
    used: AtomicUsize,
    gauge: Option<IntGauge>,
}

impl ByteBudget {
    /// A budget of `capacity` bytes, not exported as a metric (tests, private budgets).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(ByteBudget { capacity: AtomicUsize::new(capacity), used: AtomicUsize::new(0), gauge: None })
    }

    /// Change the capacity (a reload); bytes already held stay held, and new charges wait for
    /// room under the new capacity.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Take `n` bytes if they fit.
    fn try_take(&self, n: usize) -> bool {
        let cap = self.capacity();
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= cap))
            .is_ok();
        if taken {
            if let Some(g) = &self.gauge {
                g.add(n as i64);
            }
        }
        taken
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
        if let Some(g) = &self.gauge {
            g.sub(n as i64);
        }
    }

    /// A charge of 0 bytes on this budget, grown as a buffer grows.
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge { budget: self.clone(), bytes: 0 }
    }
}

/// The process-wide budget of buffered bodies (`limits.max_buffered_body_bytes` of the current
/// config generation), mirrored in the `tollgate_buffered_body_bytes` gauge.
pub fn budget() -> &'static Arc<ByteBudget> {
    static B: LazyLock<Arc<ByteBudget>> = LazyLock::new(|| {
        let default = crate::config::LimitsConfig::default().max_buffered_body_bytes;
        Arc::new(ByteBudget {
            capacity: AtomicUsize::new(default),
            used: AtomicUsize::new(0),
            gauge: Some(buffered_body_bytes().clone()),
        })
    });
    &B
}

/// Bytes held against a [`ByteBudget`], given back on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Charge {
    /// Hold `total` bytes in all (more or fewer than now); false when the budget has no room
    /// for the growth (the charge is then unchanged).
    pub fn resize(&mut self, total: usize) -> bool {
        if total > self.bytes {
            if !self.budget.try_take(total - self.bytes) {
                return false;
            }
        } else {
            self.budget.give(self.bytes - total);
        }
        self.bytes = total;
        true
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// A buffer and the budget it holds: the owner of the [`Bytes`] [`read_body`] returns.
struct Buffered {
    buf: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Buffered {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// How a body is read: size cap, deadline and budget.
#[derive(Debug, Clone)]
pub struct ReadBounds {
    /// Most bytes accepted (`limits.max_request_body_bytes`).
    pub max: usize,
    /// Deadline for the whole body (`limits.body_read_timeout`).
    pub timeout: Duration,
    /// Budget the buffer is charged to.
    pub budget: Arc<ByteBudget>,
}

/// Read `body` whole within `bounds`; `declared` is its `content-length`, if any (refused at
/// once when over the cap, and charged to the budget before a byte is read).
pub async fn read_body<B>(body: B, declared: Option<u64>, bounds: &ReadBounds) -> Result<Bytes, ProtocolError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let max = bounds.max;
    let too_large = || ProtocolError::BodyTooLarge { limit: max };
    let exhausted = || ProtocolError::BodyBudget { budget: bounds.budget.capacity() };
    let declared = match declared {
        Some(n) if n > max as u64 => return Err(too_large()),
        Some(n) => Some(n as usize),
        None => None,
    };
    let mut charge = bounds.budget.charge();
    let mut buf = Vec::new();
    if let Some(n) = declared {
        if !charge.resize(n) {
            return Err(exhausted());
        }
        buf.reserve_exact(n);
    }
    match tokio::time::timeout(bounds.timeout, collect(body, max, &mut buf, &mut charge)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ProtocolError::BodyTimeout(bounds.timeout)),
    }
    Ok(seal(buf, charge))
}

/// Append `body` to `buf` up to `max` bytes, growing `charge` with the allocation.
async fn collect<B>(body: B, max: usize, buf: &mut Vec<u8>, charge: &mut Charge) -> Result<(), ProtocolError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProtocolError::ClientBody(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        let need = buf.len() + data.len();
        if need > max {
            return Err(ProtocolError::BodyTooLarge { limit: max });
        }
        if need > buf.capacity() {
            // Grow geometrically (bounded by the cap), charging the allocation itself.
            let cap = need.max(buf.capacity().saturating_mul(2)).min(max);
            if !charge.resize(cap.max(charge.bytes())) {
                return Err(ProtocolError::BodyBudget { budget: charge.budget.capacity() });
            }
            buf.reserve_exact(cap - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok(())
}

/// The buffer as [`Bytes`] that own its charge (a declared length the body fell short of gives
/// back what was not used).
fn seal(mut buf: Vec<u8>, mut charge: Charge) -> Bytes {
    buf.shrink_to_fit();
    charge.resize(buf.capacity());
    Bytes::from_owner(Buffered { buf, _charge: charge })
}

/// Read an upstream response tollgate must hold whole (to check, redact or translate it) up to
/// `max` (`limits.max_inspect_bytes`), charged to the process budget like request bodies. The
/// caller bounds the time. A response over `max` or broken off is
/// [`ProtocolError::UpstreamBody`]; no room in the budget is [`ProtocolError::BodyBudget`] (503,
/// counted).
pub(crate) async fn read_held<B>(ctx: &L7Context, body: B, max: usize) -> Result<Bytes, ProtocolError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut charge = budget().charge();
    let mut buf = Vec::new();
    match collect(body, max, &mut buf, &mut charge).await {
        Ok(()) => Ok(seal(buf, charge)),
        Err(e @ ProtocolError::BodyBudget { .. }) => {
            ctx.reporter.telemetry().bounds.refused(Bound::BufferedBodyBytes);
            Err(e)
        }
        Err(ProtocolError::BodyTooLarge { limit }) => {
            Err(ProtocolError::UpstreamBody(format!("response body exceeds {limit} bytes (limits.max_inspect_bytes)")))
        }
        Err(ProtocolError::ClientBody(why)) => Err(ProtocolError::UpstreamBody(why)),
        Err(e) => Err(ProtocolError::UpstreamBody(e.to_string())),
    }
}

/// Read the agent's request body within the connection's `limits` and the process budget;
/// refusals by the deadline or the budget are counted in `tollgate_bound_refusals_total`.
pub(crate) async fn read_request_body(
    ctx: &L7Context,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Bytes, ProtocolError> {
    let limits = &ctx.config.limits;
    let bounds =
        ReadBounds { max: limits.max_request_body_bytes, timeout: limits.body_read_timeout, budget: budget().clone() };
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let r = read_body(body, declared, &bounds).await;
    match &r {
        Err(ProtocolError::BodyTimeout(_)) => ctx.reporter.telemetry().bounds.refused(Bound::BodyReadTimeout),
        Err(ProtocolError::BodyBudget { .. }) => ctx.reporter.telemetry().bounds.refused(Bound::BufferedBodyBytes),
        _ => {}
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::Full;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;

    fn bounds(max: usize, budget: &Arc<ByteBudget>) -> ReadBounds {
        ReadBounds { max, timeout: Duration::from_secs(5), budget: budget.clone() }
    }

    /// A body fed chunk by chunk through a channel (it ends when the sender is dropped).
    struct Chunks(mpsc::Receiver<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunked() -> (mpsc::Sender<Bytes>, Chunks) {
        let (tx, rx) = mpsc::channel(8);
        (tx, Chunks(rx))
    }

    #[tokio::test]
    async fn budget_is_held_while_the_body_lives_and_given_back_on_drop() {
        let b = ByteBudget::new(100);
        let body = read_body(Full::new(Bytes::from(vec![7u8; 60])), Some(60), &bounds(1000, &b)).await.unwrap();
        assert_eq!((body.len(), b.used()), (60, 60));
        let clone = body.clone();
        // A second body of 60 does not fit next to the first: 503 before reading it.
        let e = read_body(Full::new(Bytes::from(vec![1u8; 60])), Some(60), &bounds(1000, &b)).await.unwrap_err();
        assert!(matches!(e, ProtocolError::BodyBudget { budget: 100 }), "{e:?}");
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(b.used(), 60, "a refused body holds nothing");
        drop(body);
        assert_eq!(b.used(), 60, "a clone still holds the buffer");
        drop(clone);
        assert_eq!(b.used(), 0);
        let again = read_body(Full::new(Bytes::from(vec![1u8; 60])), Some(60), &bounds(1000, &b)).await.unwrap();
        assert_eq!(&again[..3], &[1, 1, 1]);
    }

    #[tokio::test]
    async fn chunked_bodies_are_charged_as_they_grow_and_refused_when_the_budget_runs_out() {
        let b = ByteBudget::new(1000);
        let (tx, body) = chunked();
        for _ in 0..3 {
            tx.send(Bytes::from(vec![0u8; 100])).await.unwrap();
        }
        drop(tx);
        let got = read_body(body, None, &bounds(10_000, &b)).await.unwrap();
        assert_eq!(got.len(), 300);
        assert_eq!(b.used(), 300, "charged the buffer's real size once read");
        let (tx, body) = chunked();
        let reader = tokio::spawn({
            let bounds = bounds(10_000, &b);
            async move { read_body(body, None, &bounds).await }
        });
        for _ in 0..20 {
            if tx.send(Bytes::from(vec![0u8; 100])).await.is_err() {
                break;
            }
        }
        drop(tx);
        let e = reader.await.unwrap().unwrap_err();
        assert!(matches!(e, ProtocolError::BodyBudget { budget: 1000 }), "{e:?}");
        assert_eq!(b.used(), 300, "the refused body's partial charge was given back");
        drop(got);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn size_cap_holds_for_declared_and_undeclared_lengths() {
        let b = ByteBudget::new(1 << 20);
        let e = read_body(Full::new(Bytes::from(vec![0u8; 11])), Some(11), &bounds(10, &b)).await.unwrap_err();
        assert!(matches!(e, ProtocolError::BodyTooLarge { limit: 10 }));
        let e = read_body(Full::new(Bytes::from(vec![0u8; 11])), None, &bounds(10, &b)).await.unwrap_err();
        assert!(matches!(e, ProtocolError::BodyTooLarge { limit: 10 }));
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn a_trickled_body_times_out_with_408() {
        let b = ByteBudget::new(1 << 20);
        let (tx, body) = chunked();
        tx.send(Bytes::from_static(b"{\"model\":")).await.unwrap();
        let timeout = Duration::from_millis(300);
        let bounds = ReadBounds { max: 1000, timeout, budget: b.clone() };
        let t0 = std::time::Instant::now();
        let e = read_body(body, Some(500), &bounds).await.unwrap_err();
        let waited = t0.elapsed();
        assert!(matches!(e, ProtocolError::BodyTimeout(d) if d == timeout), "{e:?}");
        assert!(waited >= timeout && waited < timeout * 10, "{waited:?}");
        assert_eq!(e.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(e.to_string(), "request body not received within 300ms (limits.body_read_timeout)");
        assert_eq!(b.used(), 0, "the timed-out body's charge was given back");
        drop(tx);
    }

    #[test]
    fn capacity_changes_apply_to_new_charges() {
        let b = ByteBudget::new(10);
        let mut c = b.charge();
        assert!(c.resize(10));
        b.set_capacity(5);
        let mut d = b.charge();
        assert!(!d.resize(1));
        drop(c);
        assert!(d.resize(5));
        assert!(!d.resize(6));
        assert_eq!(b.used(), 5);
    }
}
