//! Finding a model (built-in, folder or Hugging Face repo), opening the GPU and uploading the weights.

use crate::{err, CliResult, ModelArgs};
use hymba_engine::gpu::{parse_backends, Gpu, GpuOptions};
use hymba_engine::kernels::Kernels;
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{Model, ModelOptions};
use hymba_engine::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The built-in offline model (tiny-shakespeare), embedded in the binary.
#[allow(dead_code)]
pub mod builtin {
    pub const CONFIG: &str = include_str!("../../models/tiny-shakespeare/config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../../models/tiny-shakespeare/model.safetensors");
    pub const TOKENIZER: &[u8] = include_bytes!("../../models/tiny-shakespeare/tokenizer.json");
    pub const TOKENIZER_CONFIG: &str =
        include_str!("../../models/tiny-shakespeare/tokenizer_config.json");
    pub const GENERATION_CONFIG: &str =
        include_str!("../../models/tiny-shakespeare/generation_config.json");
    pub const SPECIAL_TOKENS: &str =
        include_str!("../../models/tiny-shakespeare/special_tokens_map.json");
    pub const NAME: &str = "built-in tiny-shakespeare";
}

/// A checkpoint with its tokenizer, before anything goes to the GPU.
pub struct Source {
    pub name: String,
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<Tokenizer>,
    /// Why there is no tokenizer, when there is none.
    pub tokenizer_missing: Option<String>,
}

pub struct LoadedModel {
    pub name: String,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    tokenizer_missing: Option<String>,
}

impl LoadedModel {
    pub fn tokenizer(&self) -> CliResult<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            format!(
                "{} has no usable tokenizer ({}); give token ids with --ids instead of text",
                self.name,
                self.tokenizer_missing
                    .as_deref()
                    .unwrap_or("tokenizer.json missing")
            )
        })
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Opens the model named by `spec` (None or "builtin" = the built-in one).
pub fn open_source(spec: Option<&str>, show_progress: bool) -> CliResult<Source> {
    match spec {
        None | Some("builtin") => {
            let checkpoint = Checkpoint::from_bytes(
                builtin::CONFIG,
                vec![("model.safetensors".to_string(), builtin::WEIGHTS.to_vec())],
            )
            .map_err(err)?;
            let tokenizer = Tokenizer::from_bytes(builtin::TOKENIZER).map_err(err)?;
            Ok(Source {
                name: builtin::NAME.to_string(),
                checkpoint,
                tokenizer: Some(tokenizer),
                tokenizer_missing: None,
            })
        }
        Some(s) => {
            let path = Path::new(s);
            let dir = if path.exists() {
                if !path.is_dir() {
                    return Err(format!("--model {s}: not a directory; give a model folder (config.json, model.safetensors, tokenizer.json) or a Hugging Face repo id"));
                }
                path.to_path_buf()
            } else if looks_like_repo_id(s) {
                fetch_repo(s, show_progress)?
            } else {
                return Err(format!("--model {s}: no such directory (and not a Hugging Face repo id like owner/name)"));
            };
            open_dir(&dir, s)
        }
    }
}

fn open_dir(dir: &Path, name: &str) -> CliResult<Source> {
    let checkpoint = Checkpoint::open_dir(dir).map_err(|e| {
        let m = e.to_string();
        if m.contains(&dir.display().to_string()) {
            m
        } else {
            format!("{}: {m}", dir.display())
        }
    })?;
    let tok_path = dir.join("tokenizer.json");
    let (tokenizer, tokenizer_missing) = if tok_path.is_file() {
        match Tokenizer::from_file(&tok_path) {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (
            None,
            Some(format!("no tokenizer.json in {}", dir.display())),
        )
    };
    Ok(Source {
        name: name.to_string(),
        checkpoint,
        tokenizer,
        tokenizer_missing,
    })
}

/// Downloads (or finds in the Hugging Face cache) the files of a repo; returns the snapshot folder.
fn fetch_repo(id: &str, show_progress: bool) -> CliResult<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let cache = hf_hub::Cache::from_env();
    let cache_dir = cache.path().clone();
    let cached = cache.model(id.to_string());
    let show = show_progress && std::io::stderr().is_terminal();
    let api = ApiBuilder::from_cache(cache.clone())
        .with_progress(show)
        .build()
        .map_err(|e| format!("cannot set up Hugging Face downloads: {e}"))?;
    let repo = api.model(id.to_string());
    let offline_hint = |file: &str, e: &dyn std::fmt::Display| {
        format!(
            "cannot get {file} of Hugging Face repo {id}: {e}. It is not in the Hugging Face cache ({}); \
             if you are offline, download the repo on a machine with network access (or copy its folder here) and pass --model DIR",
            cache_dir.display()
        )
    };
    let get = |file: &str| -> CliResult<PathBuf> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        repo.get(file).map_err(|e| offline_hint(file, &e))
    };
    let config = get("config.json")?;
    let snapshot = config.parent().ok_or("bad cache path")?.to_path_buf();
    // Weights: one file, or an index with shards.
    match cached
        .get("model.safetensors")
        .map(Ok)
        .unwrap_or_else(|| repo.get("model.safetensors"))
    {
        Ok(_) => {}
        Err(single_err) => {
            let index = match cached
                .get("model.safetensors.index.json")
                .map(Ok)
                .unwrap_or_else(|| repo.get("model.safetensors.index.json"))
            {
                Ok(p) => p,
                Err(_) => return Err(offline_hint("model.safetensors", &single_err)),
            };
            let text = std::fs::read_to_string(&index)
                .map_err(|e| format!("cannot read {}: {e}", index.display()))?;
            for shard in hymba_engine::loader::shard_names(&text, &index.display().to_string())
                .map_err(err)?
            {
                get(&shard)?;
            }
        }
    }
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let _ = get(optional);
    }
    Ok(snapshot)
}

/// Opens the GPU named by the flags.
pub fn open_gpu(args: &ModelArgs) -> CliResult<Arc<Gpu>> {
    let backends =
        parse_backends(&args.backend).ok_or_else(|| format!("unknown backend {}", args.backend))?;
    let opts = GpuOptions {
        backends,
        adapter_index: args.adapter,
        ..GpuOptions::default()
    };
    Ok(Arc::new(pollster::block_on(Gpu::new(&opts)).map_err(err)?))
}

/// Everything a command needs: checkpoint, GPU, kernels, weights uploaded.
pub fn load_model(args: &ModelArgs, show_progress: bool) -> CliResult<LoadedModel> {
    let src = open_source(args.model.as_deref(), show_progress)?;
    upload(src, args, show_progress)
}

/// Opens the GPU named by `args` and uploads an opened checkpoint.
pub fn upload(src: Source, args: &ModelArgs, show_progress: bool) -> CliResult<LoadedModel> {
    let gpu = open_gpu(args)?;
    let kernels = Arc::new(Kernels::new(&gpu).map_err(err)?);
    let opts = ModelOptions {
        dtype: args.dtype_choice(),
        chunk: args.prefill_chunk.map(|c| c as usize),
        ..ModelOptions::default()
    };
    let total = src.checkpoint.stored_bytes();
    let bar = if show_progress && std::io::stderr().is_terminal() && total > 0 {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("uploading weights {bar:40} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let model = pollster::block_on(Model::load(
        gpu,
        kernels,
        &src.checkpoint,
        &opts,
        |done, total| {
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            }
        },
    ))
    .map_err(err)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(LoadedModel {
        name: src.name,
        model,
        tokenizer: src.tokenizer,
        tokenizer_missing: src.tokenizer_missing,
    })
}
