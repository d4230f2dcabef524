//! The Hymba Instruct chat template and the bookkeeping that lets a chat turn
//! continue the cached sequence instead of prefilling the whole conversation
//! again, shared by the CLI and the web package; plus the stop-string filter
//! for streamed text.
//!
//! Template (the `chat_template` of Hymba-1.5B-Instruct's tokenizer_config.json, no BOS):
//! `<extra_id_0>System\n{system}\n\n<extra_id_1>User\n{user}\n<extra_id_1>Assistant\n{reply}\n<extra_id_1>User\n…`

use crate::generate::{Generation, StopReason};
use crate::tokenizer::Tokenizer;
use crate::Result;
use serde::{Deserialize, Serialize};

/// Strings that end an assistant reply besides the EOS token.
pub const REPLY_STOPS: [&str; 2] = ["</s>", "<extra_id_1>"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Splits an OpenAI-style message list into the system text and the turns after it.
pub fn split_system(messages: &[Message]) -> (Option<String>, Vec<Message>) {
    let mut system: Option<String> = None;
    let mut rest = Vec::new();
    for m in messages {
        if m.role == "system" && rest.is_empty() {
            let s = m.content.trim();
            system = Some(match system {
                Some(prev) => format!("{prev}\n{s}"),
                None => s.to_string(),
            });
        } else {
            rest.push(Message {
                role: m.role.clone(),
                content: m.content.trim().to_string(),
            });
        }
    }
    (system, rest)
}

/// One user turn followed by the assistant header.
pub fn user_turn(user: &str) -> String {
    format!("<extra_id_1>User\n{}\n<extra_id_1>Assistant\n", user.trim())
}

/// The whole conversation as the template renders it, ending with the assistant header
/// (the last message must be the user's).
pub fn render(system: Option<&str>, turns: &[Message]) -> std::result::Result<String, String> {
    match turns.last() {
        Some(m) if m.role == "user" => {}
        _ => return Err("the last message must have role \"user\"".into()),
    }
    let mut s = String::from("<extra_id_0>System");
    // As the reference template: '\n' + content for a system message, even an empty one.
    if let Some(sys) = system {
        s.push('\n');
        s.push_str(sys);
    }
    s.push_str("\n\n");
    for (i, m) in turns.iter().enumerate() {
        match m.role.as_str() {
            "user" => {
                if i + 1 == turns.len() {
                    s.push_str(&user_turn(&m.content));
                } else {
                    s.push_str(&format!("<extra_id_1>User\n{}\n", m.content));
                }
            }
            "assistant" => s.push_str(&format!("<extra_id_1>Assistant\n{}\n", m.content)),
            r => {
                return Err(format!(
                    "unsupported message role {r:?} (expected system, user or assistant)"
                ))
            }
        }
    }
    Ok(s)
}

/// Tokens of `text` as it tokenizes after a newline inside a longer text (the Llama
/// normalizer would otherwise prepend a word-start marker to a standalone piece).
pub fn encode_continuation(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let nl = tok.encode("\n", false)?;
    let all = tok.encode(&format!("\n{text}"), false)?;
    if all.len() >= nl.len() && all[..nl.len()] == nl[..] {
        Ok(all[nl.len()..].to_vec())
    } else {
        tok.encode(text, false)
    }
}

/// The ids to prefill for a new user message after reply `g` (whose final token is not
/// in the cache yet unless it was EOS, which is dropped): the pending token and the text
/// that follows what the cache holds.
pub fn next_turn_ids(
    tok: &Tokenizer,
    g: &Generation,
    reply_text: &str,
    user: &str,
) -> Result<Vec<u32>> {
    let after_reply = format!("\n{}", user_turn(user));
    let mut held: Vec<u32> = g.ids.clone();
    let mut ids = Vec::new();
    if g.stop == StopReason::Eos {
        held.pop();
    } else if let Some(&l) = g.ids.last() {
        ids.push(l);
    }
    let represented = tok.decode(&held, true)?;
    let full = format!("{}{after_reply}", reply_text.trim());
    let new_text = if !represented.is_empty() && full.starts_with(&represented) {
        &full[represented.len()..]
    } else {
        &after_reply[..]
    };
    ids.extend(encode_continuation(tok, new_text)?);
    Ok(ids)
}

/// Holds back streamed text that could be the start of a stop string, so a
/// stop string never reaches the caller.
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    pub done: bool,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            done: false,
        }
    }

    /// Adds a piece; returns the text that is now safe to show.
    pub fn push(&mut self, piece: &str) -> String {
        if self.done {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            self.done = true;
            return out;
        }
        // Keep the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        out
    }

    /// What is still held at the end of a generation.
    pub fn flush(&mut self) -> String {
        if self.done {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_system_turns_and_generation_prompt() {
        let turns = vec![
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Hello!".into(),
            },
            Message {
                role: "user".into(),
                content: "Bye".into(),
            },
        ];
        let s = render(Some("Be brief."), &turns).unwrap();
        assert_eq!(s, "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello!\n<extra_id_1>User\nBye\n<extra_id_1>Assistant\n");
        assert_eq!(
            render(None, &turns[..1]).unwrap(),
            "<extra_id_0>System\n\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\n"
        );
    }

    #[test]
    fn stop_filter_holds_back_prefixes() {
        let mut f = StopFilter::new(&["<extra_id_1>".to_string()]);
        assert_eq!(f.push("Hello <extra"), "Hello ");
        assert_eq!(f.push("_id"), "");
        assert_eq!(f.push("_1>User"), "");
        assert!(f.done);
        let mut f = StopFilter::new(&["</s>".to_string()]);
        assert_eq!(f.push("a <"), "a ");
        assert_eq!(f.push("b"), "<b");
        assert_eq!(f.flush(), "");
    }
}
