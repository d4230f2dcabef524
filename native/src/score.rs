//! `hymba score`: mean negative log-likelihood per token and perplexity of a text.

use crate::load::load_model;
use crate::{err, out, CliResult, ScoreArgs};
use hymba_engine::model::Logits;
use std::io::Read;

/// -log p(target) from one row of logits, in f64.
pub fn nll_of(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    lse - row[target as usize] as f64
}

pub fn run(a: ScoreArgs) -> CliResult<()> {
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
        s
    } else {
        std::fs::read_to_string(&a.file)
            .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?
    };
    let lm = load_model(&a.model, !a.json)?;
    let ids = lm.tokenizer()?.encode(&text, true).map_err(err)?;
    if ids.len() < 2 {
        return Err(format!(
            "{}: too short to score (needs at least one token after BOS, got {} token(s))",
            a.file.display(),
            ids.len()
        ));
    }
    let model = &lm.model;
    let limit = model.max_positions - model.cfg.n_meta;
    let window = a.window.unwrap_or(limit);
    if window < 2 {
        return Err("--window must be at least 2 tokens".into());
    }
    if window > limit {
        return Err(format!("--window {window} is more than this model allows ({limit} tokens after its {} meta tokens)", model.cfg.n_meta));
    }
    let vocab = model.cfg.vocab_size;
    let t0 = std::time::Instant::now();
    let mut total = 0.0f64;
    let mut scored = 0usize;
    let mut windows = 0usize;
    let mut start = 0usize;
    // Windows overlap by one token: each window's first token is context only, so every
    // token after the first is scored exactly once.
    while start + 1 < ids.len() {
        let end = (start + window).min(ids.len());
        let chunk = &ids[start..end];
        let mut seq = model.new_sequence().map_err(err)?;
        let logits =
            pollster::block_on(model.forward(&mut seq, chunk, Logits::All, None)).map_err(err)?;
        for i in 0..chunk.len() - 1 {
            total += nll_of(&logits[i * vocab..(i + 1) * vocab], chunk[i + 1]);
            scored += 1;
        }
        windows += 1;
        if end == ids.len() {
            break;
        }
        start = end - 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let nll = total / scored as f64;
    let ppl = nll.exp();
    if a.json {
        let v = serde_json::json!({
            "tokens": ids.len(),
            "scored_tokens": scored,
            "windows": windows,
            "nll": nll,
            "perplexity": ppl,
            "seconds": secs,
        });
        out(&format!("{v}\n"));
    } else {
        out(&format!(
            "{}: {} tokens ({} scored, {} window(s) of at most {}), mean NLL {:.4} nats/token, perplexity {:.3} ({:.2} s, {:.1} tok/s)\n",
            a.file.display(),
            ids.len(),
            scored,
            windows,
            window,
            nll,
            ppl,
            secs,
            ids.len() as f64 / secs.max(1e-9)
        ));
    }
    Ok(())
}
