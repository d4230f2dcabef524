//! Text ↔ token ids through the Hugging Face `tokenizers` crate (the
//! checkpoint's `tokenizer.json`), plus incremental decoding for streaming.

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Tokenizer> {
        tokenizers::Tokenizer::from_bytes(json)
            .map(|inner| Tokenizer { inner })
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json: {e}")))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: &std::path::Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        Self::from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Encodes text; `add_special` applies the post-processor (BOS for Llama/Hymba Base).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }
}

/// Turns a growing list of generated ids into text pieces, holding back
/// incomplete UTF-8 (byte-fallback tokens) until the character is complete.
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    pub fn new() -> Self {
        TextStream {
            ids: Vec::new(),
            emitted: 0,
        }
    }
    /// Adds a token and returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        if text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            // The decoder rewrote earlier text (e.g. a leading-space strip); emit nothing new.
            self.emitted = text.len();
            return Ok(String::new());
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(piece)
    }
    /// Everything decoded so far.
    pub fn text(&self, tok: &Tokenizer) -> Result<String> {
        tok.decode(&self.ids, true)
    }
}
