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
        // Token i is read back while the GPU already runs the step that feeds it: that step is
        // submitted before the CPU knows whether token i ends the reply, with a backup of the
        // recurrent state it overwrites, and undone if it does, so stopping leaves the cache
        // exactly as if it had never been submitted. At most one such step is unconfirmed,
        // and the GPU always has the next step queued while the CPU reads, decodes text and
        // checks stops. Two small read-back buffers alternate between tokens.
        let rb = TokenReadback::new(&self.gpu);
        let first = rb.copy(&self.gpu, seq, 0);
        let mut pending = self.gpu.queue.submit([first]);
        loop {
            let slot = ids.len() % 2;
            // Feed token i (already in the GPU's token slot) and sample the one after it, unless
            // token i is the last the limits allow.
            let more = ids.len() + 1 < opts.max_new_tokens && seq.position() < self.max_positions;
            let mut next_pending = None;
            if more {
                let step = self.prepare_decode_with(seq, &opts.sampling, true, true)?;
                let copy = rb.copy(&self.gpu, seq, 1 - slot);
                next_pending = Some(self.submit_prepared_then(seq, step, Some(copy)));
            }
            let st = rb.read(&self.gpu, slot, pending).await?;
            let next = st[0];
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
            let mut end = None;
            if !on_token(TokenEvent {
                id: next,
                text: &piece,
            }) {
                end = Some(StopReason::Cancelled);
            } else if opts.stop_at_eos && self.cfg.eos_token_ids.contains(&next) {
                end = Some(StopReason::Eos);
            } else if let Some(pos) = opts
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(pos);
                end = Some(StopReason::StopString);
            } else if ids.len() >= opts.max_new_tokens {
                end = Some(StopReason::MaxTokens);
            } else if !more {
                end = Some(StopReason::ContextFull);
            }
            if let Some(reason) = end {
                if next_pending.is_some() {
                    self.undo_decode(seq, [st[0], st[1], st[2]]).await?;
                }
                stop = reason;
                break;
            }
            seq.tokens.push(next);
            pending = next_pending.expect("a step was submitted when the reply goes on");
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

/// Two MAP_READ buffers that take turns holding the token slot ([token, sampled count, flag,
/// unused]) as a decode step left it.
struct TokenReadback {
    bufs: [wgpu::Buffer; 2],
}

impl TokenReadback {
    fn new(gpu: &crate::gpu::Gpu) -> TokenReadback {
        let mk = || {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("token read-back"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        TokenReadback { bufs: [mk(), mk()] }
    }

    /// Commands copying the sequence's token slot into buffer `i`.
    fn copy(&self, gpu: &crate::gpu::Gpu, seq: &Sequence, i: usize) -> wgpu::CommandBuffer {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&seq.tok_state, 0, &self.bufs[i], 0, 16);
        enc.finish()
    }

    /// Buffer `i`'s words once submission `after` (which holds its copy) is done.
    async fn read(
        &self,
        gpu: &crate::gpu::Gpu,
        i: usize,
        after: wgpu::SubmissionIndex,
    ) -> Result<[u32; 4]> {
        let b = gpu.map_read_after(&self.bufs[i], 16, Some(after)).await?;
        let w: &[u32] = bytemuck::cast_slice(&b);
        Ok([w[0], w[1], w[2], w[3]])
    }
}
