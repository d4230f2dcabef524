//! `hymba quantize`: writes a model folder whose large matrices are stored pre-quantized (q8 / q4)
//! in the engine's block layout, loadable without the full-precision weights.

use crate::load::{builtin, open_source};
use crate::output::human_bytes;
use crate::{err, CliResult, QuantizeArgs};
use hymba_engine::kernels::WeightDtype;
use std::path::Path;

/// Files copied next to the weights when the source folder has them.
const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

pub fn run(a: QuantizeArgs) -> CliResult<()> {
    let dtype = WeightDtype::from_name(&a.dtype)
        .filter(|d| d.is_quantized())
        .ok_or_else(|| format!("--dtype {}: expected q8 or q4", a.dtype))?;
    let out = &a.out;
    let weights = out.join("model.safetensors");
    if weights.exists() && !a.force {
        return Err(format!(
            "{} already exists; choose another --out folder or pass --force to overwrite it",
            weights.display()
        ));
    }
    let src = open_source(a.model.as_deref(), true)?;
    let src_dir = source_dir(a.model.as_deref());
    if let Some(d) = &src_dir {
        if same_dir(d, out) {
            return Err(format!(
                "--out {} is the source model folder; write the quantized copy elsewhere",
                out.display()
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let t = std::time::Instant::now();
    let written = src
        .checkpoint
        .save_quantized(&weights, dtype)
        .map_err(err)?;
    // config.json and the tokenizer files, copied byte for byte.
    let copy = |name: &str, bytes: Option<&[u8]>| -> CliResult<bool> {
        let to = out.join(name);
        match (&src_dir, bytes) {
            (Some(d), _) => {
                let from = d.join(name);
                if !from.is_file() {
                    return Ok(false);
                }
                std::fs::copy(&from, &to).map_err(|e| {
                    format!("cannot copy {} to {}: {e}", from.display(), to.display())
                })?;
            }
            (None, Some(b)) => {
                std::fs::write(&to, b).map_err(|e| format!("cannot write {}: {e}", to.display()))?
            }
            (None, None) => return Ok(false),
        }
        Ok(true)
    };
    copy("config.json", Some(builtin::CONFIG.as_bytes()))?;
    let builtin_side: [&[u8]; 4] = [
        builtin::TOKENIZER,
        builtin::TOKENIZER_CONFIG.as_bytes(),
        builtin::SPECIAL_TOKENS.as_bytes(),
        builtin::GENERATION_CONFIG.as_bytes(),
    ];
    let mut copied = vec!["config.json"];
    for (name, b) in SIDE_FILES.iter().zip(builtin_side) {
        if copy(name, Some(b))? {
            copied.push(name);
        }
    }
    let stored = src.checkpoint.stored_bytes();
    let n_quant = src
        .checkpoint
        .tensor_names()
        .iter()
        .filter(|n| hymba_engine::loader::is_weight_matrix(n))
        .count();
    println!(
        "{}: {} matrices quantized to {}, other tensors kept as stored; {} -> {} ({:.1}% of the original) in {:.1} s",
        weights.display(),
        n_quant,
        dtype.name(),
        human_bytes(stored),
        human_bytes(written),
        100.0 * written as f64 / stored.max(1) as f64,
        t.elapsed().as_secs_f64()
    );
    println!("copied: {}", copied.join(", "));
    println!(
        "run it with: hymba generate --model {} \"...\"",
        out.display()
    );
    Ok(())
}

/// The folder the model's files come from (None for the built-in model).
fn source_dir(spec: Option<&str>) -> Option<std::path::PathBuf> {
    match spec {
        None | Some("builtin") => None,
        Some(s) => {
            let p = Path::new(s);
            if p.is_dir() {
                Some(p.to_path_buf())
            } else {
                // A Hugging Face repo id: the snapshot folder in the cache (already downloaded).
                hf_hub::Cache::from_env()
                    .model(s.to_string())
                    .get("config.json")
                    .and_then(|c| c.parent().map(|p| p.to_path_buf()))
            }
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
