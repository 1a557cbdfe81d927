//! Bounded label values: free-form strings (model, SNI, agent) become metric labels only up to a
//! configured number of distinct values; later ones fold into `other`, so one client sending
//! random model names cannot blow up the Prometheus series count.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;

/// Value used once the set is full.
pub const OTHER: &str = "other";

/// A set of admitted label values with a hard cap.
pub struct LabelLimiter {
    max: usize,
    seen: RwLock<HashSet<Arc<str>>>,
}

impl LabelLimiter {
    /// Admit at most `max` distinct values.
    pub fn new(max: usize) -> Self {
        LabelLimiter { max, seen: RwLock::new(HashSet::new()) }
    }

    /// `value` if admitted (already seen, or room left), else [`OTHER`].
    pub fn get(&self, value: &str) -> Arc<str> {
        if let Some(v) = self.seen.read().get(value) {
            return v.clone();
        }
        let mut w = self.seen.write();
        if let Some(v) = w.get(value) {
            return v.clone();
        }
        if w.len() >= self.max {
            return Arc::from(OTHER);
        }
        let v: Arc<str> = Arc::from(value);
        w.insert(v.clone());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_past_cap() {
        let l = LabelLimiter::new(2);
        assert_eq!(&*l.get("a"), "a");
        assert_eq!(&*l.get("b"), "b");
        assert_eq!(&*l.get("c"), OTHER);
        assert_eq!(&*l.get("a"), "a");
    }
}
