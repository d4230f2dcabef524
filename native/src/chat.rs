//! `hymba chat`: multi-turn chat with the Hymba Instruct template, keeping the
//! cache between turns so each turn prefills only its new tokens.
//!
//! Template (spec §9, the chat_template of Hymba's tokenizer_config.json, no BOS):
//! `<extra_id_0>System\n{system}\n\n<extra_id_1>User\n{user}\n<extra_id_1>Assistant\n{reply}\n<extra_id_1>User\n…`

use crate::load::{load_model, LoadedModel};
use crate::{
    err, out, print_stats, stop_name, ChatArgs, CliResult, StopFilter, CANCEL, GENERATING,
};
use hymba_engine::cache::Sequence;
use hymba_engine::generate::{Generation, StopReason};
use hymba_engine::tokenizer::Tokenizer;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::Ordering;

pub use hymba_engine::chat::REPLY_STOPS;

/// The text of a conversation's start: system block and the first user turn, ready for the reply.
pub fn render_first(system: Option<&str>, user: &str) -> String {
    let turn = hymba_engine::chat::Message {
        role: "user".into(),
        content: user.trim().to_string(),
    };
    hymba_engine::chat::render(system.map(str::trim), &[turn]).expect("a user turn renders")
}

struct Turn {
    gen: Generation,
}

struct Chat<'a> {
    lm: &'a LoadedModel,
    tok: &'a Tokenizer,
    system: Option<String>,
    seq: Sequence,
    last: Option<Turn>,
    turns: usize,
    last_prefill: usize,
    verbose: bool,
}

impl Chat<'_> {
    fn reset(&mut self) -> CliResult<()> {
        self.lm.model.reset_sequence(&mut self.seq).map_err(err)?;
        self.last = None;
        self.turns = 0;
        Ok(())
    }

    /// The ids to prefill for a new user message: everything on the first turn; afterwards
    /// the last reply's final token (not yet in the cache) and the text that follows it.
    fn turn_ids(&self, user: &str) -> CliResult<Vec<u32>> {
        let Some(last) = &self.last else {
            return self
                .tok
                .encode(&render_first(self.system.as_deref(), user), false)
                .map_err(err);
        };
        hymba_engine::chat::next_turn_ids(self.tok, &last.gen, &last.gen.text, user).map_err(err)
    }

    fn stats(&self) {
        let m = &self.lm.model;
        eprintln!(
            "turns: {}; cache: {} of {} positions used ({} meta), {} allocated (KV {})",
            self.turns,
            self.seq.position(),
            m.max_positions,
            m.cfg.n_meta,
            crate::output::human_bytes(self.seq.cache_bytes()),
            m.kv_dtype.name()
        );
        if let Some(t) = &self.last {
            eprintln!("last turn: prefill {} tokens", self.last_prefill);
            print_stats(&t.gen);
        }
    }

    fn say(&mut self, user: &str, opts: &hymba_engine::generate::GenerateOptions) -> CliResult<()> {
        let ids = self.turn_ids(user)?;
        if self.verbose {
            eprintln!(
                "prefill {} tokens (cache at {} positions): {:?}",
                ids.len(),
                self.seq.position(),
                ids
            );
        }
        let mut filter = StopFilter::new(&opts.stop_strings);
        CANCEL.store(false, Ordering::SeqCst);
        GENERATING.store(true, Ordering::SeqCst);
        let mut shown_any = false;
        let mut last_nl = false;
        let res = pollster::block_on(self.lm.model.generate(
            &mut self.seq,
            &ids,
            opts,
            Some(self.tok),
            |ev| {
                let s = filter.push(ev.text);
                // Replies start after "Assistant\n": do not echo leading blank space.
                let s = if shown_any {
                    s
                } else {
                    s.trim_start().to_string()
                };
                if !s.is_empty() {
                    shown_any = true;
                    last_nl = s.ends_with('\n');
                    out(&s);
                }
                !CANCEL.load(Ordering::SeqCst)
            },
        ));
        GENERATING.store(false, Ordering::SeqCst);
        let g = match res {
            Ok(g) => g,
            Err(e @ hymba_engine::Error::ContextTooLong { .. }) => {
                eprintln!("error: {e}\n(type /reset to start a new conversation)");
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        if g.stop != StopReason::StopString {
            let rest = filter.flush();
            let rest = if shown_any {
                rest.trim_end().to_string()
            } else {
                rest.trim().to_string()
            };
            if !rest.is_empty() {
                last_nl = rest.ends_with('\n');
                out(&rest);
            }
        }
        if !last_nl {
            out("\n");
        }
        if self.verbose {
            eprintln!(
                "reply {} tokens, stop: {}: {:?}",
                g.ids.len(),
                stop_name(g.stop),
                g.ids
            );
        }
        if g.stop == StopReason::Cancelled {
            eprintln!("[cancelled]");
            print_stats(&g);
        } else if self.verbose {
            print_stats(&g);
        }
        if g.stop == StopReason::ContextFull {
            eprintln!("[the context is full; type /reset to start a new conversation]");
        }
        self.last_prefill = ids.len();
        self.turns += 1;
        self.last = Some(Turn { gen: g });
        Ok(())
    }
}

pub fn run(a: ChatArgs) -> CliResult<()> {
    let lm = load_model(&a.model, true)?;
    let tok = lm.tokenizer()?;
    let seq = lm.model.new_sequence().map_err(err)?;
    let interactive = std::io::stdin().is_terminal();
    let mut chat = Chat {
        lm: &lm,
        tok,
        system: a.system.clone(),
        seq,
        last: None,
        turns: 0,
        last_prefill: 0,
        verbose: a.verbose,
    };
    let opts = a.sampling.options(&REPLY_STOPS);
    if interactive {
        eprintln!("chatting with {} — commands: /reset, /system TEXT, /stats, /quit (Ctrl-C stops a reply)", lm.name);
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        if interactive {
            print!("you> ");
            let _ = std::io::stdout().flush();
        }
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read stdin: {e}")),
        }
        let msg = line.trim_end_matches(['\n', '\r']);
        if msg.trim().is_empty() {
            continue;
        }
        let trimmed = msg.trim();
        if let Some(cmd) = trimmed.strip_prefix('/') {
            let (name, rest) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            match name {
                "quit" | "exit" => break,
                "reset" => {
                    chat.reset()?;
                    eprintln!("[new conversation]");
                }
                "system" => {
                    let s = rest.trim();
                    chat.system = if s.is_empty() {
                        None
                    } else {
                        Some(s.to_string())
                    };
                    chat.reset()?;
                    eprintln!(
                        "[system prompt {}; new conversation]",
                        if s.is_empty() { "cleared" } else { "set" }
                    );
                }
                "stats" => chat.stats(),
                _ => eprintln!(
                    "unknown command /{name}; commands: /reset, /system TEXT, /stats, /quit"
                ),
            }
            continue;
        }
        if interactive {
            print!("assistant> ");
            let _ = std::io::stdout().flush();
        }
        chat.say(msg, &opts)?;
    }
    Ok(())
}
