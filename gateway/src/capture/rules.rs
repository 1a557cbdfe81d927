//! Capture rules: which destinations the kernel redirects. Static rules (ports, CIDRs) come
//! straight from config; hostname rules are resolved with the system resolver into host routes
//! and refreshed every `resolve_interval`. The kernel maps are kept equal to the wanted set by
//! diffing, so a refresh never leaves a window where an existing rule is missing.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key;
use gateway_common::{Cidr4Key, Cidr6Key};
use ipnet::IpNet;

use super::maps::RuleMaps;
use crate::config::{CaptureConfig, HostRule};

/// Upper bound on one hostname lookup, so one dead name cannot stall the others or startup.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// An address stays captured this many refresh intervals after the resolver last returned it:
/// applications cache answers (and CDNs rotate them), so dropping an address the moment it
/// leaves one answer would let connections to a still-cached address escape capture.
const RETAIN_INTERVALS: u32 = 3;

/// Errors installing rules; each names the map and the rule.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Writing a rule into a kernel map failed (commonly: more rules than `max_rules`).
    #[error("cannot install capture rule {rule} into {map}: {source} (capture.max_rules too small?)")]
    Insert {
        /// Map name.
        map: &'static str,
        /// The rule, human readable.
        rule: String,
        /// aya's reason (boxed: aya's error is large).
        source: Box<aya::maps::MapError>,
    },
}

/// One entry of a CIDR trie: prefix over (port, address), port in host order (0 = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct CidrRule<const N: usize> {
    /// CIDR length in address bits (the trie prefix adds the 16 port bits).
    len: u8,
    port: u16,
    addr: [u8; N],
}

impl<const N: usize> CidrRule<N> {
    fn prefix_len(&self) -> u32 {
        16 + u32::from(self.len)
    }
}

impl<const N: usize> std::fmt::Display for CidrRule<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip: IpAddr = if N == 4 {
            IpAddr::from([self.addr[0], self.addr[1], self.addr[2], self.addr[3]])
        } else {
            let mut b = [0u8; 16];
            b.copy_from_slice(&self.addr[..16]);
            IpAddr::from(b)
        };
        match self.port {
            0 => write!(f, "{ip}/{} any port", self.len),
            p => write!(f, "{ip}/{} port {p}", self.len),
        }
    }
}

/// A complete set of rules, the unit the maps are synchronised to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    ports: BTreeSet<u16>,
    v4: BTreeSet<CidrRule<4>>,
    v6: BTreeSet<CidrRule<16>>,
}

impl RuleSet {
    /// Ports and CIDRs from config (hostnames are added separately once resolved).
    pub fn from_static(cfg: &CaptureConfig) -> RuleSet {
        let mut s = RuleSet { ports: cfg.ports.iter().copied().filter(|p| *p != 0).collect(), ..RuleSet::default() };
        for d in &cfg.destinations {
            s.add_net(d.cidr.trunc(), d.port.unwrap_or(0));
        }
        s
    }

    fn add_net(&mut self, net: IpNet, port: u16) {
        match net {
            IpNet::V4(n) => {
                self.v4.insert(CidrRule { len: n.prefix_len(), port, addr: n.addr().octets() });
            }
            IpNet::V6(n) => {
                self.v6.insert(CidrRule { len: n.prefix_len(), port, addr: n.addr().octets() });
            }
        }
    }

    /// Add a host route for `ip` on `port`.
    pub fn add_host(&mut self, ip: IpAddr, port: u16) {
        let net = match ip {
            IpAddr::V6(a) => IpNet::from(a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip)),
            v4 => IpNet::from(v4),
        };
        self.add_net(net, port);
    }

    /// Number of entries (ports + CIDRs).
    pub fn len(&self) -> usize {
        self.ports.len() + self.v4.len() + self.v6.len()
    }

    /// No rule at all: nothing will be captured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owns the rule maps and keeps them equal to static rules plus resolved hostnames.
pub struct RuleSync {
    maps: RuleMaps,
    installed: RuleSet,
    static_rules: RuleSet,
    hosts: Vec<HostRule>,
    /// Per (host, port): address -> when the resolver last returned it.
    resolved: HashMap<(String, u16), HashMap<IpAddr, Instant>>,
    retain: Duration,
}

impl RuleSync {
    /// Take ownership of the rule maps; nothing is written until [`RuleSync::install_static`].
    pub fn new(maps: RuleMaps, cfg: &CaptureConfig) -> RuleSync {
        RuleSync {
            maps,
            installed: RuleSet::default(),
            static_rules: RuleSet::from_static(cfg),
            hosts: cfg.hosts.clone(),
            resolved: HashMap::new(),
            retain: cfg.resolve_interval.saturating_mul(RETAIN_INTERVALS),
        }
    }

    /// Install the static rules; an error here is a config problem (too many rules), so it is
    /// returned rather than logged.
    pub fn install_static(&mut self) -> Result<(), RulesError> {
        let want = self.static_rules.clone();
        let errors = self.apply(&want);
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The rules currently in the kernel maps.
    pub fn installed(&self) -> &RuleSet {
        &self.installed
    }

    /// Resolve every hostname (concurrently, each bounded by a timeout) and sync the maps.
    /// Failures are logged and keep the host's previous addresses: a resolver hiccup must not
    /// turn capture off.
    pub async fn refresh_hosts(&mut self) {
        if self.hosts.is_empty() {
            let want = self.wanted();
            for e in self.apply(&want) {
                tracing::error!(error = %e, "capture rule not installed");
            }
            return;
        }
        let mut set = tokio::task::JoinSet::new();
        for h in &self.hosts {
            let (host, port) = (h.host.clone(), h.port);
            set.spawn(async move {
                let r = tokio::time::timeout(RESOLVE_TIMEOUT, async {
                    tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .map(|it| it.map(|sa| sa.ip()).collect::<Vec<_>>())
                })
                .await;
                (host, port, r)
            });
        }
        let now = Instant::now();
        while let Some(joined) = set.join_next().await {
            let Ok((host, port, result)) = joined else { continue };
            let addrs: Vec<IpAddr> = match result {
                Ok(Ok(ips)) => ips,
                Ok(Err(e)) => {
                    tracing::warn!(%host, error = %e, "capture host resolution failed; keeping previous addresses");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%host, timeout = ?RESOLVE_TIMEOUT, "capture host resolution timed out; keeping previous addresses");
                    continue;
                }
            };
            let entry = self.resolved.entry((host.clone(), port)).or_default();
            for ip in &addrs {
                entry.insert(*ip, now);
            }
            let retain = self.retain;
            entry.retain(|_, seen| now.duration_since(*seen) <= retain);
            tracing::debug!(%host, port, addresses = ?addrs, "capture host resolved");
        }
        let want = self.wanted();
        for e in self.apply(&want) {
            tracing::error!(error = %e, "capture rule not installed");
        }
    }

    fn wanted(&self) -> RuleSet {
        let mut want = self.static_rules.clone();
        for ((_, port), addrs) in &self.resolved {
            for ip in addrs.keys() {
                want.add_host(*ip, *port);
            }
        }
        want
    }

    /// Make the maps hold exactly `want`: insert what is new first, then remove what is gone.
    /// Returns the insert failures (removals that fail are logged: the entry is gone or the
    /// map is broken, and either way nothing better can be done).
    fn apply(&mut self, want: &RuleSet) -> Vec<RulesError> {
        use gateway_common::maps as names;
        let mut errors = Vec::new();
        let m = &mut self.maps;
        let inst = &mut self.installed;

        let new: Vec<u16> = want.ports.difference(&inst.ports).copied().collect();
        for p in &new {
            match m.ports.insert(*p, 1, 0) {
                Ok(()) => {
                    inst.ports.insert(*p);
                }
                Err(source) => errors.push(RulesError::Insert {
                    map: names::PORT_RULES,
                    rule: format!("port {p}"),
                    source: Box::new(source),
                }),
            }
        }
        let new: Vec<CidrRule<4>> = want.v4.difference(&inst.v4).copied().collect();
        for r in &new {
            let key = Key::new(r.prefix_len(), Cidr4Key { port_be: r.port.to_be_bytes(), addr: r.addr });
            match m.cidr4.insert(&key, 1, 0) {
                Ok(()) => {
                    inst.v4.insert(*r);
                }
                Err(source) => errors.push(RulesError::Insert {
                    map: names::CIDR4_RULES,
                    rule: r.to_string(),
                    source: Box::new(source),
                }),
            }
        }
        let new: Vec<CidrRule<16>> = want.v6.difference(&inst.v6).copied().collect();
        for r in &new {
            let key = Key::new(r.prefix_len(), Cidr6Key { port_be: r.port.to_be_bytes(), addr: r.addr });
            match m.cidr6.insert(&key, 1, 0) {
                Ok(()) => {
                    inst.v6.insert(*r);
                }
                Err(source) => errors.push(RulesError::Insert {
                    map: names::CIDR6_RULES,
                    rule: r.to_string(),
                    source: Box::new(source),
                }),
            }
        }

        let gone: Vec<u16> = inst.ports.difference(&want.ports).copied().collect();
        for p in gone {
            if let Err(e) = m.ports.remove(&p) {
                tracing::warn!(map = names::PORT_RULES, port = p, error = %e, "rule removal failed");
            }
            inst.ports.remove(&p);
        }
        let gone: Vec<CidrRule<4>> = inst.v4.difference(&want.v4).copied().collect();
        for r in gone {
            let key = Key::new(r.prefix_len(), Cidr4Key { port_be: r.port.to_be_bytes(), addr: r.addr });
            if let Err(e) = m.cidr4.remove(&key) {
                tracing::warn!(map = names::CIDR4_RULES, rule = %r, error = %e, "rule removal failed");
            }
            inst.v4.remove(&r);
        }
        let gone: Vec<CidrRule<16>> = inst.v6.difference(&want.v6).copied().collect();
        for r in gone {
            let key = Key::new(r.prefix_len(), Cidr6Key { port_be: r.port.to_be_bytes(), addr: r.addr });
            if let Err(e) = m.cidr6.remove(&key) {
                tracing::warn!(map = names::CIDR6_RULES, rule = %r, error = %e, "rule removal failed");
            }
            inst.v6.remove(&r);
        }
        errors
    }

    /// Take a reloaded rule config: static rules replaced, hostnames no longer listed forgotten
    /// (their addresses leave the maps on the next sync).
    pub fn update(&mut self, cfg: &CaptureConfig) {
        self.static_rules = RuleSet::from_static(cfg);
        self.hosts = cfg.hosts.clone();
        self.retain = cfg.resolve_interval.saturating_mul(RETAIN_INTERVALS);
        let keep: std::collections::HashSet<(String, u16)> =
            self.hosts.iter().map(|h| (h.host.clone(), h.port)).collect();
        self.resolved.retain(|k, _| keep.contains(k));
    }

    /// Re-resolve hostnames every `interval` (the first run is the caller's), and apply
    /// reloaded rule configs as they arrive, until the sender is dropped.
    pub fn spawn_refresher(
        mut self,
        interval: Duration,
        mut updates: tokio::sync::mpsc::Receiver<CaptureConfig>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the immediate first tick: start() already resolved once
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if self.hosts.is_empty() {
                            continue;
                        }
                    }
                    u = updates.recv() => match u {
                        Some(cfg) => {
                            self.update(&cfg);
                            let period = cfg.resolve_interval.max(Duration::from_secs(1));
                            if period != tick.period() {
                                tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            }
                        }
                        None => return,
                    },
                }
                self.refresh_hosts().await;
                tracing::debug!(rules = self.installed.len(), "capture rules synced");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DestinationRule;

    #[test]
    fn static_rules_are_normalised() {
        let cfg = CaptureConfig {
            ports: vec![443, 0, 443],
            destinations: vec![
                DestinationRule { cidr: "10.1.2.3/8".parse().unwrap(), port: None },
                DestinationRule { cidr: "2001:db8::1/32".parse().unwrap(), port: Some(8443) },
            ],
            ..CaptureConfig::default()
        };
        let s = RuleSet::from_static(&cfg);
        assert_eq!(s.ports.iter().copied().collect::<Vec<_>>(), vec![443]);
        let v4 = s.v4.iter().next().unwrap();
        assert_eq!((v4.len, v4.port, v4.addr), (8, 0, [10, 0, 0, 0]));
        assert_eq!(v4.prefix_len(), 24);
        let v6 = s.v6.iter().next().unwrap();
        assert_eq!((v6.len, v6.port), (32, 8443));
        assert_eq!(&v6.addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert!(v6.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(s.len(), 3);
        assert_eq!(v6.to_string(), "2001:db8::/32 port 8443");
    }

    #[test]
    fn mapped_host_addresses_become_v4_rules() {
        let mut s = RuleSet::default();
        s.add_host("::ffff:1.2.3.4".parse().unwrap(), 443);
        s.add_host("::1".parse().unwrap(), 443);
        assert_eq!(s.v4.iter().next().unwrap().addr, [1, 2, 3, 4]);
        assert_eq!(s.v4.iter().next().unwrap().len, 32);
        assert_eq!(s.v6.iter().next().unwrap().len, 128);
    }
}
