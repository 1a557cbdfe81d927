//! Run-time state of the gateway: one [`Provider`] per configured provider (shared by every
//! route naming it, so keys, slots and connections are shared too) and, per route with targets,
//! its balancer and retry budget. Built once per config generation.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderName;

use crate::config::{Config, FailoverConfig, RouteConfig};
use crate::policy::{Balancer, RetryBudget};
use crate::upstream::provider::{Provider, ProviderError};

/// Why the gateway could not start (bad key source, bad URL): names the provider.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A provider failed to initialise.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// One backend of a route.
#[derive(Debug)]
pub struct RouteTarget {
    /// Shared provider.
    pub provider: Arc<Provider>,
    /// Model sent upstream; `None` keeps the agent's.
    pub model: Option<String>,
}

/// A route that dispatches to targets.
pub struct RouteRuntime {
    /// Route name.
    pub name: Arc<str>,
    /// Targets in config order (the balancer's indices).
    pub targets: Vec<RouteTarget>,
    /// Target choice and passive health.
    pub balancer: Balancer,
    /// Bounds retries during outages.
    pub budget: RetryBudget,
    /// Retry rules and deadlines.
    pub failover: FailoverConfig,
    /// `consistent_hash` header, parsed once.
    pub hash_header: Option<HeaderName>,
    /// Ask OpenAI-shaped streams for usage.
    pub include_usage: bool,
}

/// All providers and dispatching routes.
#[derive(Default)]
pub struct Gateway {
    routes: HashMap<String, Arc<RouteRuntime>>,
}

impl Gateway {
    /// Build providers (loading keys) and route state from config.
    pub fn new(config: &Config) -> Result<Self, GatewayError> {
        let mut providers: HashMap<&str, Arc<Provider>> = HashMap::new();
        for p in &config.providers {
            providers.insert(p.name.as_str(), Arc::new(Provider::new(p)?));
        }
        let mut routes = HashMap::new();
        for r in config.routes.iter().filter(|r| !r.targets.is_empty()) {
            routes.insert(r.name.clone(), Arc::new(route_runtime(r, &providers)));
        }
        Ok(Gateway { routes })
    }

    /// The dispatching state of route `name`, if it has targets.
    pub fn route(&self, name: &str) -> Option<Arc<RouteRuntime>> {
        self.routes.get(name).cloned()
    }

    /// Every dispatching route (metrics of circuit state).
    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteRuntime>> {
        self.routes.values()
    }
}

fn route_runtime(r: &RouteConfig, providers: &HashMap<&str, Arc<Provider>>) -> RouteRuntime {
    // Validation guarantees every target names a provider.
    let targets = r
        .targets
        .iter()
        .filter_map(|t| {
            Some(RouteTarget { provider: providers.get(t.provider.as_str())?.clone(), model: t.model.clone() })
        })
        .collect();
    RouteRuntime {
        name: Arc::from(r.name.as_str()),
        targets,
        balancer: Balancer::new(&r.targets, &r.balance, &r.circuit),
        budget: RetryBudget::new(&r.failover),
        failover: r.failover.clone(),
        hash_header: r.balance.hash_header.as_deref().and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
        include_usage: r.include_usage,
    }
}
