//! Size limits: refuse requests too large to be worth forwarding (a runaway agent pasting a
//! whole repository) before a provider bills for them.

use std::sync::Arc;

use super::{Verdict, VerdictKind};
use crate::config::guards::{GuardAction, LimitsGuardConfig};

/// Why a limits guard could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Neither limit is set.
    #[error("max_request_bytes: a limits guard needs max_request_bytes or max_prompt_tokens")]
    Empty,
    /// A limit of zero would refuse everything.
    #[error("{0}: must be greater than 0")]
    Zero(&'static str),
}

/// A compiled limits guard.
#[derive(Debug)]
pub struct SizeLimits {
    pub(crate) name: Arc<str>,
    max_request_bytes: Option<u64>,
    max_prompt_tokens: Option<u64>,
}

impl SizeLimits {
    /// Build from config.
    pub fn new(cfg: &LimitsGuardConfig) -> Result<Self, SizeError> {
        if cfg.max_request_bytes.is_none() && cfg.max_prompt_tokens.is_none() {
            return Err(SizeError::Empty);
        }
        if cfg.max_request_bytes == Some(0) {
            return Err(SizeError::Zero("max_request_bytes"));
        }
        if cfg.max_prompt_tokens == Some(0) {
            return Err(SizeError::Zero("max_prompt_tokens"));
        }
        Ok(SizeLimits {
            name: Arc::from(cfg.name.as_str()),
            max_request_bytes: cfg.max_request_bytes,
            max_prompt_tokens: cfg.max_prompt_tokens,
        })
    }

    /// Whether a token count is needed at all (so callers skip tokenizing otherwise).
    pub fn needs_tokens(&self) -> bool {
        self.max_prompt_tokens.is_some()
    }

    /// Judge a request of `body_len` bytes; `tokens` is asked for the prompt's token count
    /// only when the byte limit passed and a token limit is set (`None`: unknown, passes).
    pub fn check(&self, body_len: u64, tokens: &mut dyn FnMut() -> Option<u64>) -> Option<Verdict> {
        let verdict = |kind, detail| Verdict {
            guard: self.name.clone(),
            action: GuardAction::Block,
            kind,
            count: 1,
            detail: Some(detail),
        };
        if let Some(max) = self.max_request_bytes {
            if body_len > max {
                return Some(verdict(
                    VerdictKind::RequestBytes,
                    format!("request body of {body_len} bytes exceeds {max}"),
                ));
            }
        }
        let max = self.max_prompt_tokens?;
        let n = tokens()?;
        (n > max).then(|| verdict(VerdictKind::PromptTokens, format!("prompt of {n} tokens exceeds {max}")))
    }
}
