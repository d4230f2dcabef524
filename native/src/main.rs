//! `hymba`: the native command-line front end of the Hymba wgpu engine.
//!
//! Subcommands: `generate` (one prompt, streamed or as JSON), `chat` (multi-turn
//! with the Hymba Instruct template, keeping the cache between turns), `score`
//! (perplexity of a text), `info` (GPU adapters, or a model's layout and
//! memory needs, with the storage of every weight buffer) and `quantize` (write a
//! pre-quantized q8 / q4 copy of a model). With no `--model`, the built-in tiny-shakespeare checkpoint
//! is used, so everything works offline.

mod chat;
mod load;
mod output;
mod quantize;
mod score;

use clap::{Args, Parser, Subcommand};
use hymba_engine::generate::{GenerateOptions, Generation, StopReason};
use hymba_engine::model::DtypeChoice;
use hymba_engine::sampling::SamplingParams;
use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Result type of the CLI: errors are one printable line.
pub type CliResult<T> = Result<T, String>;

/// Turns any displayable error into the CLI's error string.
pub fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

#[derive(Parser)]
#[command(
    name = "hymba",
    version,
    about = "Run NVIDIA Hymba language models on the GPU through wgpu (Vulkan, Metal, DX12, GL)",
    long_about = "Run NVIDIA Hymba language models on the GPU through wgpu (Vulkan, Metal, DX12, GL).\n\n\
Without --model, every command uses the built-in tiny-shakespeare demo checkpoint \
(7.7 M parameters, trained on Shakespeare's plays), so it works offline. \
--model takes a local model folder (config.json, model.safetensors or a sharded index, tokenizer.json) \
or a Hugging Face repo id such as nvidia/Hymba-1.5B-Instruct, downloaded once into the standard Hugging Face cache."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming the text to stdout
    Generate(GenerateArgs),
    /// Chat with an Instruct model (Hymba chat template; the cache is kept between turns)
    Chat(ChatArgs),
    /// Mean negative log-likelihood per token and perplexity of a text file
    Score(ScoreArgs),
    /// List GPU adapters, or describe a model with --model (layout, weight storage per tensor on the GPU, cache sizes)
    Info(InfoArgs),
    /// Write a copy of a model with its large matrices pre-quantized to q8 or q4 (loads without the full-precision file)
    Quantize(QuantizeArgs),
}

/// Where the model comes from and how it runs.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model folder or Hugging Face repo id (e.g. nvidia/Hymba-1.5B-Instruct); default: built-in tiny-shakespeare
    #[arg(long, value_name = "DIR_OR_REPO")]
    pub model: Option<String>,
    /// GPU backend
    #[arg(long, default_value = "auto", value_parser = ["auto", "vulkan", "metal", "dx12", "gl"])]
    pub backend: String,
    /// Index of the adapter to use among those of the backend (see `hymba info`); default: the best one
    #[arg(long, value_name = "N")]
    pub adapter: Option<usize>,
    /// Weight storage on the GPU: auto = f32 up to 1 GiB of f32 weights, f16 above; q8 / q4 = block-quantized 8 / 4-bit matrices. A folder written by `hymba quantize` loads only as its own q8 / q4 (auto picks it)
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "q8", "q4"])]
    pub dtype: String,
    /// Prompt positions per prefill step; default: 512 where the prompt matrix products run on tensor cores (cooperative matrices), else 256. Smaller uses less GPU memory while a prompt is read (256 instead of 512: 28 MiB less for Hymba-1.5B; given back when decoding starts) and prefills more slowly
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub prefill_chunk: Option<u32>,
}

impl ModelArgs {
    pub fn dtype_choice(&self) -> DtypeChoice {
        self.dtype.parse().unwrap_or(DtypeChoice::Auto)
    }
}

/// How tokens are chosen.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Most tokens to generate
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token)
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0 = off)
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: u32,
    /// Sample only among the most likely tokens whose probabilities add up to P (1 = off)
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Divide the logits of tokens already seen (prompt and output) by this (1 = off)
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repeat_penalty: f32,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this string appears in the output (repeatable)
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn options(&self, extra_stops: &[&str]) -> GenerateOptions {
        let mut stop_strings = self.stop.clone();
        stop_strings.extend(extra_stops.iter().map(|s| s.to_string()));
        GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repeat_penalty,
                seed: self.seed,
            },
            stop_strings,
            stop_at_eos: true,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt text (default: read --file, or stdin)
    prompt: Option<String>,
    /// Read the prompt from this file
    #[arg(long, value_name = "PATH", conflicts_with_all = ["prompt", "ids"])]
    file: Option<std::path::PathBuf>,
    /// Token ids to use as the prompt instead of text, comma-separated (e.g. 1,450,274)
    #[arg(
        long,
        value_name = "IDS",
        value_delimiter = ',',
        conflicts_with = "prompt"
    )]
    ids: Option<Vec<u32>>,
    /// Encode the prompt without special tokens (no BOS)
    #[arg(long)]
    no_bos: bool,
    /// Print one JSON object {prompt_ids, ids, text, prompt_tokens, generated_tokens, prefill_tok_s, decode_tok_s, cache_bytes, stop} instead of streaming (ids: generated only)
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    /// System prompt
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Print each turn's prefill and reply token ids and timings to stderr
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Text file to score ("-" = stdin)
    pub file: std::path::PathBuf,
    /// Print one JSON object {tokens, scored_tokens, windows, nll, perplexity, seconds}
    #[arg(long)]
    pub json: bool,
    /// Longest window in tokens (default and maximum: what the model allows); long texts are scored in windows that overlap by one token
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Describe this model (folder or Hugging Face repo id, or "builtin") instead of listing adapters;
    /// its weights are uploaded with --dtype to report each buffer's storage on the GPU
    #[arg(long, value_name = "DIR_OR_REPO")]
    pub model: Option<String>,
    /// Backends whose adapters to list (with --model: the backend to upload to)
    #[arg(long, default_value = "auto", value_parser = ["auto", "vulkan", "metal", "dx12", "gl"])]
    pub backend: String,
    /// Index of the adapter to upload to (with --model)
    #[arg(long, value_name = "N")]
    pub adapter: Option<usize>,
    /// Weight storage to upload and report (with --model); a folder written by `hymba quantize` loads only as its own q8 / q4 (auto)
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "q8", "q4"])]
    pub dtype: String,
    /// Prompt positions per prefill step to size the report's buffers for (with --model); default as for `generate`
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=8192))]
    pub prefill_chunk: Option<u32>,
    /// List every weight tensor instead of grouping same-role tensors across layers
    #[arg(long)]
    pub tensors: bool,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model folder or Hugging Face repo id to quantize; default: built-in tiny-shakespeare
    #[arg(long, value_name = "DIR_OR_REPO")]
    pub model: Option<String>,
    /// Format of the large matrices (embeddings, in_proj, out_proj, MLP): q8 or q4 (32-weight blocks, f16 scales)
    #[arg(long, value_parser = ["q8", "q4"])]
    pub dtype: String,
    /// Folder to write (config.json, model.safetensors, tokenizer files); created if missing
    #[arg(long, value_name = "DIR")]
    pub out: std::path::PathBuf,
    /// Overwrite an existing model.safetensors in --out
    #[arg(long)]
    pub force: bool,
}

/// Set by Ctrl-C while a generation runs; the token callback returns false when it is set.
pub static CANCEL: AtomicBool = AtomicBool::new(false);
/// True while a generation runs (Ctrl-C outside one exits the program).
pub static GENERATING: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    let _ = ctrlc::set_handler(|| {
        if GENERATING.load(Ordering::SeqCst) {
            CANCEL.store(true, Ordering::SeqCst);
        } else {
            let _ = writeln!(std::io::stderr());
            std::process::exit(130);
        }
    });
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic".to_string()
        };
        let _ = writeln!(std::io::stderr(), "error: internal error: {msg}");
    }));
    let cli = Cli::parse();
    install_ctrlc();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Chat(a) => chat::run(a),
        Command::Score(a) => score::run(a),
        Command::Info(a) => output::info(a),
        Command::Quantize(a) => quantize::run(a),
    }));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = std::io::stdout().flush();
            let _ = writeln!(std::io::stderr(), "error: {e}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(101),
    }
}

pub use hymba_engine::chat::StopFilter;

/// Prints to stdout, ignoring a closed pipe.
pub fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
    let _ = o.flush();
}

pub fn stop_name(s: StopReason) -> &'static str {
    match s {
        StopReason::Eos => "end of sequence",
        StopReason::StopString => "stop string",
        StopReason::MaxTokens => "token limit",
        StopReason::Cancelled => "cancelled",
        StopReason::ContextFull => "context full",
    }
}

pub fn print_stats(g: &Generation) {
    eprintln!(
        "prompt tokens: {}, prefill {:.1} tok/s; generated tokens: {}, decode {:.1} tok/s; stop: {}; cache {}",
        g.prompt_tokens,
        g.prefill_tok_s(),
        g.ids.len(),
        g.decode_tok_s(),
        stop_name(g.stop),
        output::human_bytes(g.cache_bytes)
    );
}

fn run_generate(a: GenerateArgs) -> CliResult<()> {
    // Read the prompt before loading anything, so input errors come first.
    enum Prompt {
        Text(String),
        Ids(Vec<u32>),
    }
    let prompt = if let Some(ids) = a.ids.clone() {
        Prompt::Ids(ids)
    } else if let Some(p) = a.prompt.clone() {
        Prompt::Text(p)
    } else if let Some(f) = &a.file {
        Prompt::Text(
            std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read prompt file {}: {e}", f.display()))?,
        )
    } else {
        if std::io::stdin().is_terminal() {
            eprintln!("(reading the prompt from stdin; end it with Ctrl-D)");
        }
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read the prompt from stdin: {e}"))?;
        Prompt::Text(s)
    };
    let lm = load::load_model(&a.model, !a.json)?;
    let prompt_ids = match prompt {
        Prompt::Ids(ids) => ids,
        Prompt::Text(t) => lm.tokenizer()?.encode(&t, !a.no_bos).map_err(err)?,
    };
    if prompt_ids.is_empty() {
        return Err("the prompt is empty (no tokens); give some text or --ids".into());
    }
    let opts = a.sampling.options(&[]);
    let mut seq = lm.model.new_sequence().map_err(err)?;
    let mut filter = StopFilter::new(&opts.stop_strings);
    let json = a.json;
    CANCEL.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let mut ended_with_newline = true;
    let result = pollster::block_on(lm.model.generate(
        &mut seq,
        &prompt_ids,
        &opts,
        lm.tokenizer.as_ref(),
        |ev| {
            if !json {
                let shown = filter.push(ev.text);
                if !shown.is_empty() {
                    ended_with_newline = shown.ends_with('\n');
                    out(&shown);
                }
            }
            !CANCEL.load(Ordering::SeqCst)
        },
    ));
    GENERATING.store(false, Ordering::SeqCst);
    let g = result.map_err(err)?;
    if json {
        let v = serde_json::json!({
            "prompt_ids": prompt_ids,
            "ids": g.ids,
            "text": g.text,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.ids.len(),
            "prefill_tok_s": g.prefill_tok_s(),
            "decode_tok_s": g.decode_tok_s(),
            "cache_bytes": g.cache_bytes,
            "stop": stop_name(g.stop),
        });
        out(&format!("{v}\n"));
    } else {
        if g.stop != StopReason::StopString {
            let rest = filter.flush();
            if !rest.is_empty() {
                ended_with_newline = rest.ends_with('\n');
                out(&rest);
            }
        }
        if !ended_with_newline {
            out("\n");
        }
        print_stats(&g);
    }
    Ok(())
}
