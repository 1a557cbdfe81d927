//! Counters in one Redis shared by every node, so a limit holds across the fleet.
//!
//! A call's check-and-reserve over all the limits it touches is ONE Lua script (atomic in
//! Redis: all limits reserve or none), settle is another; both go through one multiplexed
//! connection that the `redis` crate reconnects in the background, each bounded by the
//! configured timeout. Counter keys are `{prefix}{policy}/{count}:{window}|{who}:{bucket}` with
//! a TTL covering the bucket's life as "previous bucket", so Redis never needs a sweeper.
//!
//! Window arithmetic uses the nodes' wall clocks (passed to the script), not Redis `TIME`,
//! so the same code computes windows for Redis and for the local fallback; NTP-synchronised
//! nodes disagree on bucket edges by milliseconds, an error of `skew / window` of a bucket.
//! Multi-key scripts need all keys on one server: Redis Cluster is not supported.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::rules::{Counts, Slot};
use super::{BackendState, LimitError};
use crate::config::limits::{OnRedisError, RedisLimitsConfig};

/// KEYS: per slot the current and the previous bucket. ARGV: per slot limit, amount,
/// previous-bucket weight (ppm, 0 = fixed window, previous not read) and TTL (ms).
/// Returns `[admitted, prev1, cur1, prev2, cur2, ...]`, counts after the add if admitted.
const RESERVE_LUA: &str = r"
local n = #KEYS / 2
local out = {0}
local admitted = 1
for i = 1, n do
  local w = tonumber(ARGV[4*i-1])
  local cur = tonumber(redis.call('GET', KEYS[2*i-1]) or '0')
  local prev = 0
  if w > 0 then prev = tonumber(redis.call('GET', KEYS[2*i]) or '0') end
  if math.ceil(prev * w / 1000000) + cur + tonumber(ARGV[4*i-2]) > tonumber(ARGV[4*i-3]) then
    admitted = 0
  end
  out[2*i] = prev
  out[2*i+1] = cur
end
if admitted == 1 then
  for i = 1, n do
    out[2*i+1] = redis.call('INCRBY', KEYS[2*i-1], ARGV[4*i-2])
    redis.call('PEXPIRE', KEYS[2*i-1], ARGV[4*i])
  end
end
out[1] = admitted
return out
";

/// KEYS: bucket counters a reservation was made in. ARGV: signed deltas. A counter that
/// expired (or vanished with a Redis restart) is left alone rather than recreated without a
/// TTL; counts never go below zero.
const SETTLE_LUA: &str = r"
for i = 1, #KEYS do
  local d = tonumber(ARGV[i])
  if d ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    local v = redis.call('INCRBY', KEYS[i], d)
    if v < 0 then redis.call('INCRBY', KEYS[i], -v) end
  end
end
return 1
";

const STATE_REDIS: u8 = 0;
const STATE_FALLBACK: u8 = 1;
const STATE_DOWN: u8 = 2;

/// Shared-counter store; the engine ([`super::Limiter`]) adds the fallback policy on top.
pub struct RedisBackend {
    conn: ConnectionManager,
    reserve: Script,
    settle: Script,
    timeout: Duration,
    pub(super) on_error: OnRedisError,
    pub(super) probe_interval: Duration,
    pub(super) prefix: String,
    state: AtomicU8,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Bucket key of a slot's counter.
pub(super) fn bucket_key(key: &str, bucket: u64) -> String {
    format!("{key}:{bucket}")
}

impl RedisBackend {
    /// A backend for `cfg`. Connects lazily: an unreachable Redis at start-up is not an error
    /// (the first call or probe finds out and the fallback policy applies). Needs a Tokio
    /// runtime (the connection manager spawns its reconnect task).
    pub fn new(cfg: &RedisLimitsConfig) -> Result<Self, LimitError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| LimitError::Redis(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.timeout.max(Duration::from_millis(10)) * 4))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(cfg.probe_interval);
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| LimitError::Redis(e.to_string()))?;
        Ok(Self {
            conn,
            reserve: Script::new(RESERVE_LUA),
            settle: Script::new(SETTLE_LUA),
            timeout: cfg.timeout,
            on_error: cfg.on_redis_error,
            probe_interval: cfg.probe_interval,
            prefix: cfg.key_prefix.clone(),
            state: AtomicU8::new(STATE_REDIS),
        })
    }

    /// Which store currently decides.
    pub fn state(&self) -> BackendState {
        match self.state.load(Ordering::Acquire) {
            STATE_REDIS => BackendState::Redis,
            STATE_FALLBACK => BackendState::LocalFallback,
            _ => BackendState::Down,
        }
    }

    /// Marks Redis as lost; true if this call made the transition (so the outage is logged
    /// and counted once).
    pub(super) fn mark_lost(&self) -> bool {
        let to = match self.on_error {
            OnRedisError::FailOpen => STATE_FALLBACK,
            OnRedisError::FailClosed => STATE_DOWN,
        };
        self.state.compare_exchange(STATE_REDIS, to, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Marks Redis as back; true if this call made the transition.
    pub(super) fn mark_back(&self) -> bool {
        self.state.swap(STATE_REDIS, Ordering::AcqRel) != STATE_REDIS
    }

    /// The atomic check-and-reserve of all `slots` (see [`RESERVE_LUA`]).
    pub(super) async fn reserve(&self, slots: &[Slot], now_ms: u64) -> Result<(bool, Vec<Counts>), LimitError> {
        let mut inv = self.reserve.prepare_invoke();
        for s in slots {
            inv.key(bucket_key(&s.key, s.geom.bucket));
            inv.key(bucket_key(&s.key, s.geom.bucket.saturating_sub(1)));
        }
        for s in slots {
            inv.arg(s.limit).arg(s.amount).arg(s.geom.prev_weight).arg(s.ttl_ms(now_ms));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| LimitError::Timeout(self.timeout))?
            .map_err(|e| LimitError::Redis(e.to_string()))?;
        if reply.len() != 1 + 2 * slots.len() {
            return Err(LimitError::Redis(format!("reserve script returned {} values", reply.len())));
        }
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        let counts = reply[1..].chunks_exact(2).map(|c| Counts { prev: n(c[0]), cur: n(c[1]) }).collect();
        Ok((reply[0] == 1, counts))
    }

    /// Applies signed deltas to the buckets reservations were made in (see [`SETTLE_LUA`]).
    pub(super) async fn adjust(&self, items: &[(String, i64)]) -> Result<(), LimitError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut inv = self.settle.prepare_invoke();
        for (key, _) in items {
            inv.key(key);
        }
        for (_, delta) in items {
            inv.arg(*delta);
        }
        let mut conn = self.conn.clone();
        let _: i64 = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| LimitError::Timeout(self.timeout))?
            .map_err(|e| LimitError::Redis(e.to_string()))?;
        Ok(())
    }

    /// One PING within the call timeout (the recovery probe).
    pub(super) async fn ping(&self) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let _: String = tokio::time::timeout(self.timeout.max(Duration::from_millis(100)), cmd.query_async(&mut conn))
            .await
            .map_err(|_| LimitError::Timeout(self.timeout))?
            .map_err(|e| LimitError::Redis(e.to_string()))?;
        Ok(())
    }
}
