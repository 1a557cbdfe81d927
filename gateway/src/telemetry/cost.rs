//! Cost in USD of LLM calls, from the operator's price table (`pricing` in the config). A call
//! is priced once per label combination when its metric series are created (see
//! `CallSeries`), so the glob table is never walked on the hot path.

use glob::{MatchOptions, Pattern};

use super::Usage;
use crate::config::ModelPrice;

/// Model names are matched without regard to case (`GPT-4o` and `gpt-4o` are one model), and
/// `*` crosses `/` (`meta-llama/*`).
const MATCH: MatchOptions =
    MatchOptions { case_sensitive: false, require_literal_separator: false, require_literal_leading_dot: false };

/// Why a price table could not be built (config validation normally catches these first).
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// The model glob does not compile.
    #[error("pricing[{index}].model: {message}")]
    Pattern {
        /// Entry index.
        index: usize,
        /// Glob error.
        message: String,
    },
    /// A price is negative or not finite: the cost counter would decrease or turn NaN.
    #[error("pricing[{index}]: prices must be finite and at least 0")]
    Price {
        /// Entry index.
        index: usize,
    },
}

/// USD per million tokens of one model family.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Input tokens not served from the prompt cache.
    pub input_per_mtok: f64,
    /// Output tokens (reasoning included).
    pub output_per_mtok: f64,
    /// Input tokens served from the prompt cache.
    pub cached_input_per_mtok: f64,
}

impl Price {
    /// Cost of `u`: cached input at the cached rate, the rest of input at the input rate,
    /// output at the output rate. Estimated usage is priced like reported usage, since it is
    /// the best count there is.
    pub fn cost_usd(&self, u: &Usage) -> f64 {
        // A provider reporting more cached than total input tokens would otherwise get a
        // negative uncached count; clamp so the counter only grows.
        let cached = u.cached_input.unwrap_or(0).min(u.input);
        let uncached = u.input - cached;
        (uncached as f64 * self.input_per_mtok
            + cached as f64 * self.cached_input_per_mtok
            + u.output as f64 * self.output_per_mtok)
            / 1_000_000.0
    }
}

/// The configured prices in order; the first entry whose glob matches wins.
#[derive(Debug, Default)]
pub struct PriceTable {
    entries: Vec<(Pattern, Price)>,
}

impl PriceTable {
    /// Compile the `pricing` entries.
    pub fn new(cfg: &[ModelPrice]) -> Result<Self, CostError> {
        let mut entries = Vec::with_capacity(cfg.len());
        for (index, p) in cfg.iter().enumerate() {
            let pattern = Pattern::new(&p.model).map_err(|e| CostError::Pattern { index, message: e.to_string() })?;
            let price = Price {
                input_per_mtok: p.input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                cached_input_per_mtok: p.cached_input_per_mtok.unwrap_or(p.input_per_mtok),
            };
            let prices = [price.input_per_mtok, price.output_per_mtok, price.cached_input_per_mtok];
            if prices.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return Err(CostError::Price { index });
            }
            entries.push((pattern, price));
        }
        Ok(PriceTable { entries })
    }

    /// No prices configured: cost is not measured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Price of a call: the response model names what was actually served (`gpt-4o-mini` is
    /// answered as `gpt-4o-mini-2024-07-18`), so it is tried first; the request model when
    /// the response carried none or no entry matches it.
    pub fn price(&self, response_model: Option<&str>, request_model: Option<&str>) -> Option<Price> {
        [response_model, request_model].into_iter().flatten().find_map(|m| self.lookup(m))
    }

    fn lookup(&self, model: &str) -> Option<Price> {
        self.entries.iter().find(|(p, _)| p.matches_with(model, MATCH)).map(|(_, price)| *price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(model: &str, input: f64, output: f64, cached: Option<f64>) -> ModelPrice {
        ModelPrice {
            model: model.into(),
            input_per_mtok: input,
            output_per_mtok: output,
            cached_input_per_mtok: cached,
        }
    }

    fn usage(input: u64, output: u64, cached: Option<u64>) -> Usage {
        Usage { input, output, total: input + output, cached_input: cached, reasoning: None, estimated: false }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn cached_input_priced_at_cached_rate() {
        let t = PriceTable::new(&[mp("gpt-4o-mini*", 0.15, 0.6, Some(0.075))]).unwrap();
        let p = t.price(Some("gpt-4o-mini-2024-07-18"), None).unwrap();
        // 1M input of which 400k cached, 200k output:
        // 600k * 0.15 + 400k * 0.075 + 200k * 0.6 = 0.09 + 0.03 + 0.12.
        assert!(close(p.cost_usd(&usage(1_000_000, 200_000, Some(400_000))), 0.24));
        // No cache report: all input at the input rate.
        assert!(close(p.cost_usd(&usage(1_000_000, 0, None)), 0.15));
        // More cached than input (provider bug) never goes negative.
        assert!(close(p.cost_usd(&usage(10, 0, Some(50))), 10.0 * 0.075 / 1e6));
    }

    #[test]
    fn cached_rate_defaults_to_input_rate() {
        let t = PriceTable::new(&[mp("claude-*", 3.0, 15.0, None)]).unwrap();
        let p = t.price(None, Some("claude-sonnet-4-5")).unwrap();
        assert_eq!(p.cached_input_per_mtok, 3.0);
        assert!(close(p.cost_usd(&usage(1000, 100, Some(500))), (1000.0 * 3.0 + 100.0 * 15.0) / 1e6));
    }

    #[test]
    fn first_match_wins_response_model_first() {
        let t = PriceTable::new(&[
            mp("gpt-4o-mini*", 0.15, 0.6, None),
            mp("gpt-4o*", 2.5, 10.0, None),
            mp("*", 1.0, 1.0, None),
        ])
        .unwrap();
        let input = |p: Option<Price>| p.map(|p| p.input_per_mtok);
        assert_eq!(input(t.price(Some("gpt-4o-mini-2024-07-18"), Some("gpt-4o"))), Some(0.15));
        assert_eq!(input(t.price(Some("GPT-4o-2024-08-06"), Some("gpt-4o-mini"))), Some(2.5));
        assert_eq!(input(t.price(None, Some("gpt-4o-mini"))), Some(0.15));
        assert_eq!(input(t.price(Some("llama/3"), None)), Some(1.0));
        let narrow = PriceTable::new(&[mp("gpt-4o", 2.5, 10.0, None)]).unwrap();
        // Response model unmatched: the request model is tried.
        assert_eq!(input(narrow.price(Some("gpt-4o-2024-08-06"), Some("gpt-4o"))), Some(2.5));
        assert_eq!(narrow.price(Some("o3"), None), None);
        assert!(PriceTable::default().price(Some("x"), Some("y")).is_none());
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(matches!(PriceTable::new(&[mp("a[", 1.0, 1.0, None)]), Err(CostError::Pattern { index: 0, .. })));
        let err = PriceTable::new(&[mp("a", 1.0, 1.0, None), mp("b", 1.0, 1.0, Some(f64::NAN))]).unwrap_err();
        assert!(matches!(err, CostError::Price { index: 1 }));
    }
}
