//! Generation: prefill a prompt (or a new chat turn) into a sequence, then
//! decode one token at a time with the GPU sampler, streaming each token to a
//! callback; stop on EOS, a stop string or a token limit. The same async code
//! runs natively and in the browser.

use crate::cache::Sequence;
use crate::error::{Error, Result};
use crate::model::{Logits, Model};
use crate::sampling::SamplingParams;
use crate::tokenizer::{TextStream, Tokenizer};
use web_time::Instant;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop when one of these strings appears in the generated text (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Stop at the model's end-of-sequence token(s).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_strings: Vec::new(),
            stop_at_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    Cancelled,
    ContextFull,
}

/// What a generation call produced, with measured timings.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (the stop token or stop string's tokens included).
    pub ids: Vec<u32>,
    /// Decoded text of `ids` (empty without a tokenizer), cut before a stop string.
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub cache_bytes: u64,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_secs > 0.0 {
            self.prompt_tokens as f64 / self.prefill_secs
        } else {
            0.0
        }
    }
    /// Decode rate over the tokens produced by decode steps (all but the first).
    pub fn decode_tok_s(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1);
        if self.decode_secs > 0.0 && n > 0 {
            n as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// A streamed event: the new token and the text it completed.
pub struct TokenEvent<'a> {
    pub id: u32,
    pub text: &'a str,
}

impl Model {
    /// Appends `prompt` to `seq` (prefill, only the new tokens) and generates.
    /// `on_token` gets each token as it is chosen; returning false cancels.
    pub async fn generate(
        &self,
        seq: &mut Sequence,
        prompt: &[u32],
        opts: &GenerateOptions,
        tokenizer: Option<&Tokenizer>,
        mut on_token: impl FnMut(TokenEvent<'_>) -> bool,
    ) -> Result<Generation> {
        opts.sampling.validate()?;
        if prompt.is_empty() && seq.tokens().is_empty() {
            return Err(Error::Invalid(
                "empty prompt: give at least one token".into(),
            ));
        }
        if !opts.stop_strings.is_empty() && tokenizer.is_none() {
            return Err(Error::Invalid("stop strings need a tokenizer".into()));
        }
        let meta = if seq.position() == 0 {
            self.cfg.n_meta
        } else {
            0
        };
        if seq.position() + meta + prompt.len() > self.max_positions {
            return Err(Error::ContextTooLong {
                needed: seq.position() + meta + prompt.len(),
                meta: self.cfg.n_meta,
                limit: self.max_positions,
            });
        }
        let t0 = Instant::now();
        let mut ids = Vec::new();
        let mut stream = TextStream::new();
        let mut text = String::new();
        let mut stop = StopReason::MaxTokens;
        if prompt.is_empty() {
            // Continue from the last token in the cache: re-feed nothing, sample from it by decoding it again is not possible;
            // the caller must supply at least one new token.
            return Err(Error::Invalid(
                "nothing to continue from: give at least one new token".into(),
            ));
        }
        self.forward(seq, prompt, Logits::Last, None).await?;
        if opts.max_new_tokens == 0 {
            self.gpu.finish().await?;
            return Ok(Generation {
                ids,
                text,
                stop,
                prompt_tokens: prompt.len(),
                prefill_secs: t0.elapsed().as_secs_f64(),
                decode_secs: 0.0,
                cache_bytes: seq.cache_bytes(),
            });
        }
        self.record_sample(seq, &opts.sampling)?.run(&self.gpu);
        let mut prefill_secs = 0.0;
        let mut t1 = Instant::now();
        loop {
            // While the GPU computes the token read below, encode the step that will feed it
            // (it takes the token from the GPU-side slot, so its commands do not depend on
            // the value). It is submitted only once the token is known not to end the reply,
            // so stopping leaves the cache exactly as without the overlap.
            let more = ids.len() + 1 < opts.max_new_tokens && seq.position() < self.max_positions;
            let mut prepared = if more {
                self.prepare_decode(seq, &opts.sampling, true).ok()
            } else {
                None
            };
            let next = self.read_token(seq).await?;
            if ids.is_empty() {
                prefill_secs = t0.elapsed().as_secs_f64();
                t1 = Instant::now();
            }
            ids.push(next);
            let piece = match tokenizer {
                Some(t) => stream.push(t, next)?,
                None => String::new(),
            };
            text.push_str(&piece);
            if !on_token(TokenEvent {
                id: next,
                text: &piece,
            }) {
                stop = StopReason::Cancelled;
                break;
            }
            if opts.stop_at_eos && self.cfg.eos_token_ids.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            if let Some(pos) = opts
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(pos);
                stop = StopReason::StopString;
                break;
            }
            if ids.len() >= opts.max_new_tokens {
                break;
            }
            if seq.position() + 1 > self.max_positions {
                stop = StopReason::ContextFull;
                break;
            }
            // Feed `next` (already in the token slot) and sample the one after it.
            match prepared.take() {
                Some(step) => self.submit_prepared(seq, step),
                None => self.submit_decode(seq, &opts.sampling, true)?,
            }
            seq.tokens.push(next);
        }
        // The last chosen token is not in the cache yet; the next turn's prompt should start with it
        // only if the caller wants it there (chat templates add their own text).
        let decode_secs = t1.elapsed().as_secs_f64();
        Ok(Generation {
            ids,
            text,
            stop,
            prompt_tokens: prompt.len(),
            prefill_secs,
            decode_secs,
            cache_bytes: seq.cache_bytes(),
        })
    }
}
