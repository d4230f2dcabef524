//! End-to-end tests of the `hymba` binary (GPU: any wgpu adapter, e.g. lavapipe).

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hymba"));
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        c.env("XDG_RUNTIME_DIR", "/tmp");
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hymba")
}

fn run_stdin(args: &[&str], input: &str) -> Output {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hymba");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "hymba failed: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// A failure reported as one `error:` line, without a panic.
fn failed(o: &Output) -> String {
    let e = text(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure, got success\nstdout: {}\nstderr: {e}",
        text(&o.stdout)
    );
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "panic: {e}"
    );
    e
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hymba-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn builtin_model_reproduces_golden_greedy_generations() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("models/tiny-shakespeare/golden.json")).unwrap(),
    )
    .unwrap();
    for p in golden["prompts"].as_array().unwrap() {
        let prompt = p["prompt_text"].as_str().unwrap();
        let o = run(&[
            "generate",
            "--temperature",
            "0",
            "--max-tokens",
            "64",
            "--json",
            prompt,
        ]);
        let v: Value = serde_json::from_str(ok(&o).trim()).expect("one JSON object");
        assert_eq!(
            ids(&v["prompt_ids"]),
            ids(&p["prompt_ids"]),
            "prompt ids of {prompt:?}"
        );
        let want = ids(&p["generated_ids"]);
        let got = ids(&v["ids"]);
        assert_eq!(got.len(), 64, "{prompt:?}");
        let margins: Vec<f64> = p["top2_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let upto = margins
            .iter()
            .take(64)
            .position(|&m| m < 1e-3)
            .unwrap_or(64);
        assert_eq!(
            got[..upto],
            want[..upto],
            "generated ids of {prompt:?} (compared up to step {upto})"
        );
        assert_eq!(v["generated_tokens"].as_u64(), Some(64));
        assert_eq!(
            v["prompt_tokens"].as_u64(),
            Some(want.len().min(p["prompt_ids"].as_array().unwrap().len()) as u64)
        );
        assert!(
            v["prefill_tok_s"].as_f64().unwrap() > 0.0 && v["decode_tok_s"].as_f64().unwrap() > 0.0
        );
        assert!(v["cache_bytes"].as_u64().unwrap() > 0);
        if upto == 64 {
            assert_eq!(
                v["text"].as_str().unwrap(),
                p["generated_text"].as_str().unwrap()
            );
        }
    }
}

#[test]
fn generate_streams_text_and_prints_stats() {
    let o = run(&["generate", "--max-tokens", "8", "ROMEO:"]);
    let out = ok(&o);
    assert!(!out.trim().is_empty());
    let e = text(&o.stderr);
    assert!(
        e.contains("prompt tokens: 5") && e.contains("generated tokens: 8") && e.contains("tok/s"),
        "{e}"
    );
    // Same ids by --ids, and a prompt from stdin.
    let a = ok(&run(&[
        "generate",
        "--max-tokens",
        "8",
        "--json",
        "--ids",
        "1,480,635,669,267",
    ]));
    let b = ok(&run_stdin(
        &["generate", "--max-tokens", "8", "--json"],
        "ROMEO:",
    ));
    let (a, b): (Value, Value) = (
        serde_json::from_str(&a).unwrap(),
        serde_json::from_str(&b).unwrap(),
    );
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["text"].as_str().unwrap(), out.trim_end_matches('\n'));
}

/// Perplexity computed here, independently of `hymba score`: the engine's teacher-forced
/// decode path (one token at a time) and a log-softmax of our own.
fn reference_nll(ids: &[u32]) -> f64 {
    use hymba_engine::gpu::{Gpu, GpuOptions};
    use hymba_engine::kernels::Kernels;
    use hymba_engine::loader::Checkpoint;
    use hymba_engine::model::{Model, ModelOptions};
    use std::sync::Arc;
    let dir = root().join("models/tiny-shakespeare");
    let ck = Checkpoint::open_dir(&dir).unwrap();
    let gpu = Arc::new(pollster::block_on(Gpu::new(&GpuOptions::default())).unwrap());
    let kernels = Arc::new(Kernels::new(&gpu).unwrap());
    let model = pollster::block_on(Model::load(
        gpu,
        kernels,
        &ck,
        &ModelOptions::default(),
        |_, _| {},
    ))
    .unwrap();
    let mut seq = model.new_sequence().unwrap();
    let mut total = 0.0f64;
    for w in ids.windows(2) {
        let logits = pollster::block_on(model.decode_logits(&mut seq, w[0])).unwrap();
        let mut sum = 0.0f64;
        for &l in &logits {
            sum += (l as f64).exp();
        }
        total += sum.ln() - logits[w[1] as usize] as f64;
    }
    total / (ids.len() - 1) as f64
}

#[test]
fn score_matches_an_independent_perplexity() {
    let sample = "ROMEO:\nI know not what, my lord,\nI'll have you woo'd, and to be so.\n";
    let dir = temp_dir("score");
    let f = dir.join("sample.txt");
    std::fs::write(&f, sample).unwrap();
    let o = run(&["score", "--json", f.to_str().unwrap()]);
    let v: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    let tok = hymba_engine::tokenizer::Tokenizer::from_file(
        &root().join("models/tiny-shakespeare/tokenizer.json"),
    )
    .unwrap();
    let ids = tok.encode(sample, true).unwrap();
    assert!(
        ids.len() < 64,
        "short text: stays inside the sliding window, where decode and prefill agree"
    );
    assert_eq!(v["tokens"].as_u64(), Some(ids.len() as u64));
    assert_eq!(v["scored_tokens"].as_u64(), Some(ids.len() as u64 - 1));
    let nll = reference_nll(&ids);
    let got = v["nll"].as_f64().unwrap();
    assert!(
        (got - nll).abs() < 1e-3,
        "score nll {got} vs reference {nll}"
    );
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - nll.exp()).abs() / nll.exp() < 1e-3,
        "perplexity {ppl} vs {}",
        nll.exp()
    );
    // A small window scores the same tokens in several windows.
    let o = run(&["score", "--json", "--window", "16", f.to_str().unwrap()]);
    let w: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(w["scored_tokens"], v["scored_tokens"]);
    assert!(w["windows"].as_u64().unwrap() > 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn errors_are_one_clear_line() {
    // A folder that is not a model.
    let dir = temp_dir("bad-model");
    let o = run(&["generate", "--model", dir.to_str().unwrap(), "hi"]);
    let e = failed(&o);
    assert!(
        e.starts_with("error: ") && e.contains(dir.to_str().unwrap()) && e.contains("config.json"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    // A missing folder.
    let o = run(&["generate", "--model", "/no/such/model/dir", "hi"]);
    let e = failed(&o);
    assert!(
        e.starts_with("error: ") && e.contains("/no/such/model/dir"),
        "{e}"
    );
    // A prompt longer than the model allows (1,024 text positions).
    let long = "To be, or not to be, that is the question. ".repeat(200);
    let o = run(&["generate", "--max-tokens", "4", &long]);
    let e = failed(&o);
    assert!(
        e.starts_with("error: ") && e.contains("more than this model allows"),
        "{e}"
    );
    let many = vec!["1"; 1100].join(",");
    let e = failed(&run(&["generate", "--ids", &many]));
    assert!(e.contains("more than this model allows"), "{e}");
    // Unknown flag: clap's message.
    let e = failed(&run(&["generate", "--no-such-flag", "hi"]));
    assert!(e.contains("--no-such-flag"), "{e}");
    // Bad token id.
    let e = failed(&run(&["generate", "--ids", "1,99999"]));
    assert!(e.starts_with("error: ") && e.contains("99999"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn info_describes_the_builtin_model() {
    let out = ok(&run(&["info", "--model", "builtin"]));
    assert!(out.contains("parameters: 7700048"), "{out}");
    assert!(out.contains("meta tokens: 16"), "{out}");
    assert!(out.contains("0: global, own KV"), "{out}");
    assert!(
        out.contains("1: sliding window 64, KV producer for layers 2"),
        "{out}"
    );
    assert!(
        out.contains("5: sliding window 64, KV consumer of layer 3"),
        "{out}"
    );
    assert!(out.contains("1024 tokens"), "{out}");
    // f32 weights keep the f32 KV cache; the measured cache rows (see assert_cache_rows_agree).
    assert!(out.contains("cache (KV f32"), "{out}");
    let f32_kv = assert_cache_rows_agree(&out);
    // Weight storage measured from the uploaded buffers: grouped by role, the groups add up.
    assert!(out.contains("weight storage on the GPU (f32"), "{out}");
    assert!(
        out.contains("model.layers.*.mamba.in_proj.weight") && out.contains("[1472, 256]"),
        "{out}"
    );
    assert_storage_totals(&out);
    let out = ok(&run(&[
        "info",
        "--model",
        "builtin",
        "--dtype",
        "q8",
        "--tensors",
    ]));
    assert!(out.contains("weight storage on the GPU (q8"), "{out}");
    // q8 weights: the f16 KV cache, half the f32 one's bytes per token.
    assert!(
        out.contains("cache (KV f16") && out.contains("KV f16 because the weights are q8"),
        "{out}"
    );
    assert_cache_rows_agree(&out);
    assert!(out.contains("grows by 768 B per token") && f32_kv.contains("1.5 KiB per token"));
    for i in 0..7 {
        let line = out
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "model.layers.{i}.moe.experts.0.gate_proj+up_proj.weight"
                ))
            })
            .unwrap_or_else(|| panic!("layer {i} gate|up missing: {out}"));
        assert!(
            line.contains(" q8 ") && line.contains("[1280, 256]"),
            "{line}"
        );
    }
    assert_storage_totals(&out);
    let out = ok(&run(&["info"]));
    assert!(
        out.contains("shader-f16") && out.contains("max_buffer_size"),
        "{out}"
    );
}

/// `hymba info`'s cache rows, each measured from a sequence's buffers: a new sequence (its
/// sliding-window rings with a prefill chunk's slack) holds more than one decoding 1 token
/// (rings of window + 1), and at 1024 tokens the global layers' KV has grown (the builtin model
/// has a global layer and starts it at 512 text slots). Returns the "cache (...)" line.
fn assert_cache_rows_agree(out: &str) -> String {
    // "1.54 MiB" -> bytes
    let bytes = |v: &str| -> f64 {
        let (n, unit) = v.split_once(' ').unwrap_or_else(|| panic!("a size: {v:?}"));
        let scale = match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            "GiB" => 1073741824.0,
            _ => panic!("unit of {v:?}"),
        };
        n.parse::<f64>().unwrap_or_else(|_| panic!("a size: {v:?}")) * scale
    };
    let value = |prefix: &str| -> String {
        let l = out
            .lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}: {out}"));
        l.trim_start()[prefix.len()..]
            .split(" (")
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(
        bytes(&value("new sequence:")) > bytes(&value("1 tokens:")),
        "{out}"
    );
    assert_ne!(value("1 tokens:"), value("1024 tokens:"), "{out}");
    out.lines()
        .find(|l| l.starts_with("cache ("))
        .unwrap_or_else(|| panic!("no cache line: {out}"))
        .to_string()
}

/// The bytes column of `hymba info`'s storage table adds up to its total line; returns the total.
fn assert_storage_totals(out: &str) -> u64 {
    let start = out
        .lines()
        .position(|l| l.starts_with("weight storage on the GPU"))
        .unwrap_or_else(|| panic!("no storage table: {out}"));
    let mut sum = 0u64;
    let mut total = None;
    for l in out.lines().skip(start + 2) {
        if let Some(rest) = l.strip_prefix("total weight bytes on the GPU: ") {
            total = rest.split(' ').next().and_then(|n| n.parse::<u64>().ok());
            break;
        }
        sum += l
            .split_whitespace()
            .last()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("bad row {l:?}"));
    }
    assert_eq!(Some(sum), total, "{out}");
    sum
}

#[test]
fn quantize_writes_a_model_that_runs_like_quantizing_at_load() {
    let dir = temp_dir("quantize");
    let out_dir = dir.join("tiny-q4");
    let o = out_dir.to_str().unwrap();
    let msg = ok(&run(&["quantize", "--dtype", "q4", "--out", o]));
    assert!(msg.contains("quantized to q4"), "{msg}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out_dir.join(f).is_file(), "{f} missing: {msg}");
    }
    assert_eq!(
        std::fs::read(out_dir.join("config.json")).unwrap(),
        std::fs::read(root().join("models/tiny-shakespeare/config.json")).unwrap()
    );
    let size = std::fs::metadata(out_dir.join("model.safetensors"))
        .unwrap()
        .len();
    let full = std::fs::metadata(root().join("models/tiny-shakespeare/model.safetensors"))
        .unwrap()
        .len();
    assert!(size < full / 2, "{size} vs {full}");
    // Same greedy tokens as quantizing the built-in model at load.
    let args = ["generate", "--json", "--max-tokens", "12", "ROMEO:"];
    let pre: Value =
        serde_json::from_str(&ok(&run(&[&args[..], &["--model", o]].concat()))).unwrap();
    let at_load: Value =
        serde_json::from_str(&ok(&run(&[&args[..], &["--dtype", "q4"]].concat()))).unwrap();
    assert_eq!(ids(&pre["ids"]), ids(&at_load["ids"]));
    // It loads as q4 only.
    let e = failed(&run(
        &[&args[..], &["--model", o, "--dtype", "f16"]].concat()
    ));
    assert!(
        e.contains("pre-quantized to q4") && e.contains("--dtype q4"),
        "{e}"
    );
    // info reports the stored dtype and the same GPU bytes as quantizing at load.
    let info = ok(&run(&["info", "--model", o]));
    assert!(info.contains("stored pre-quantized to q4"), "{info}");
    assert!(info.contains("weight storage on the GPU (q4"), "{info}");
    let at_load = ok(&run(&["info", "--model", "builtin", "--dtype", "q4"]));
    assert_eq!(
        assert_storage_totals(&info),
        assert_storage_totals(&at_load)
    );
    // No silent overwrite; a folder of its own, not the source.
    let e = failed(&run(&["quantize", "--dtype", "q8", "--out", o]));
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    let e = failed(&run(&[
        "quantize", "--model", o, "--dtype", "q4", "--out", o, "--force",
    ]));
    assert!(e.contains("source model folder"), "{e}");
    // Re-quantizing a q4 folder to q8 is refused (it would only lose accuracy).
    let e = failed(&run(&[
        "quantize",
        "--model",
        o,
        "--dtype",
        "q8",
        "--out",
        dir.join("again").to_str().unwrap(),
    ]));
    assert!(e.contains("pre-quantized to q4"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

/// The c5 fixture with the real Hymba tokenizer in a temporary model folder, or None (printed why).
fn c5_model_dir() -> Option<(PathBuf, Value)> {
    let fx = root().join("tests/fixtures/c5_real_vocab_text");
    let tok = std::env::var_os("HYMBA_TOKENIZER_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/fixtures/c5_real_vocab_text/tokenizer.json"));
    if !tok.is_file() || !fx.join("model.safetensors").is_file() {
        println!(
            "skipped: the real Hymba tokenizer ({}) or the c5 fixture is absent",
            tok.display()
        );
        return None;
    }
    let dir = temp_dir("c5");
    std::fs::copy(&tok, dir.join("tokenizer.json")).unwrap();
    std::fs::copy(fx.join("config.json"), dir.join("config.json")).unwrap();
    std::fs::copy(fx.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let case: Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("case.json")).unwrap()).unwrap();
    Some((dir, case))
}

#[test]
fn score_matches_the_reference_logits_of_the_real_vocab_fixture() {
    // Perplexity of the c5 prompt text from the official implementation's own prompt logits
    // (expected.safetensors: nocache.logits [L, V]) against `hymba score`.
    let Some((dir, case)) = c5_model_dir() else {
        return;
    };
    let fx = root().join("tests/fixtures/c5_real_vocab_text");
    let bytes = std::fs::read(fx.join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("nocache.logits").unwrap();
    let (l, v) = (view.shape()[0], view.shape()[1]);
    let logits: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let prompt = ids(&case["prompt_ids"]);
    assert_eq!(prompt.len(), l);
    let mut total = 0f64;
    for j in 0..l - 1 {
        let row = &logits[j * v..(j + 1) * v];
        let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[prompt[j + 1] as usize] as f64;
    }
    let want = total / (l - 1) as f64;
    let f = dir.join("prompt.txt");
    std::fs::write(&f, case["prompt_text"].as_str().unwrap()).unwrap();
    let o = run(&[
        "score",
        "--json",
        "--model",
        dir.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    let got: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(got["tokens"].as_u64(), Some(l as u64));
    let nll = got["nll"].as_f64().unwrap();
    assert!(
        (nll - want).abs() < 1e-4,
        "hymba score nll {nll}, reference logits give {want}"
    );
    let ppl = got["perplexity"].as_f64().unwrap();
    assert!(
        (ppl / want.exp() - 1.0).abs() < 1e-4,
        "perplexity {ppl} vs {}",
        want.exp()
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn real_vocab_fixture_generates_the_reference_ids() {
    let Some((dir, case)) = c5_model_dir() else {
        return;
    };
    let want = ids(&case["generated_ids"]);
    let n = want.len().to_string();
    let o = run(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--temperature",
        "0",
        "--json",
        "--max-tokens",
        &n,
        case["prompt_text"].as_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), ids(&case["prompt_ids"]));
    assert_eq!(ids(&v["ids"]), want);
    std::fs::remove_dir_all(dir).ok();
}

fn prefill_lines(stderr: &str) -> Vec<Vec<u32>> {
    stderr
        .lines()
        .filter(|l| l.starts_with("prefill "))
        .map(|l| {
            let list = &l[l.find('[').unwrap() + 1..l.rfind(']').unwrap()];
            list.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect()
        })
        .collect()
}

fn reply_lines(stderr: &str) -> Vec<(Vec<u32>, String)> {
    stderr
        .lines()
        .filter(|l| l.starts_with("reply "))
        .map(|l| {
            let list = &l[l.find('[').unwrap() + 1..l.rfind(']').unwrap()];
            let stop = l[l.find("stop: ").unwrap() + 6..l.find(": [").unwrap()].to_string();
            (
                list.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse().unwrap())
                    .collect(),
                stop,
            )
        })
        .collect()
}

#[test]
fn chat_template_reproduces_the_spec_vector() {
    let Some((dir, _)) = c5_model_dir() else {
        return;
    };
    let o = run_stdin(
        &[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--verbose",
            "--max-tokens",
            "1",
            "--system",
            "You are a helpful assistant.",
        ],
        "What is 2+2?\n",
    );
    ok(&o);
    let p = prefill_lines(&text(&o.stderr));
    let want: Vec<u32> = vec![
        529, 17833, 29918, 333, 29918, 29900, 29958, 3924, 13, 3492, 526, 263, 8444, 20255, 29889,
        13, 13, 29966, 17833, 29918, 333, 29918, 29896, 29958, 2659, 13, 5618, 338, 29871, 29906,
        29974, 29906, 29973, 13, 29966, 17833, 29918, 333, 29918, 29896, 29958, 7900, 22137, 13,
    ];
    assert_eq!(p[0], want);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn chat_keeps_the_cache_and_prefills_only_new_tokens() {
    let o = run_stdin(
        &[
            "chat",
            "--verbose",
            "--max-tokens",
            "6",
            "--system",
            "Be brief.",
        ],
        "Good morrow.\nWhat news?\n/stats\n",
    );
    let out = ok(&o);
    let e = text(&o.stderr);
    let p = prefill_lines(&e);
    let r = reply_lines(&e);
    assert_eq!(p.len(), 2, "{e}");
    assert_eq!(r.len(), 2, "{e}");
    assert!(
        out.lines().filter(|l| !l.trim().is_empty()).count() >= 1,
        "{out}"
    );
    let tok = hymba_engine::tokenizer::Tokenizer::from_file(
        &root().join("models/tiny-shakespeare/tokenizer.json"),
    )
    .unwrap();
    let first =
        "<extra_id_0>System\nBe brief.\n\n<extra_id_1>User\nGood morrow.\n<extra_id_1>Assistant\n";
    assert_eq!(p[0], tok.encode(first, false).unwrap());
    // The cache after the second prefill: first prompt, the reply (its last token, or EOS,
    // not yet fed), then the second prefill, which holds only the new tokens.
    let (reply, stop) = &r[0];
    let mut cached = p[0].clone();
    let _ = stop; // EOS: not fed, not in the next prefill; otherwise the next prefill starts with it
    let fed = reply.len() - 1;
    cached.extend_from_slice(&reply[..fed]);
    cached.extend_from_slice(&p[1]);
    let decoded = tok.decode(&cached, true).unwrap();
    assert!(decoded.starts_with(first), "{decoded:?}");
    assert!(
        decoded.ends_with("\n<extra_id_1>User\nWhat news?\n<extra_id_1>Assistant\n"),
        "{decoded:?}"
    );
    let second_turn = tok
        .encode(
            "\n<extra_id_1>User\nWhat news?\n<extra_id_1>Assistant\n",
            false,
        )
        .unwrap();
    assert!(
        p[1].len() <= second_turn.len() + 1,
        "second prefill {} tokens: {:?}",
        p[1].len(),
        p[1]
    );
    assert!(
        e.contains(&format!("last turn: prefill {} tokens", p[1].len())),
        "{e}"
    );
    // /stats reports the positions in use: meta tokens + everything fed.
    assert!(
        e.contains(&format!(
            "cache: {} of 1040 positions used",
            16 + cached.len() + r[1].0.len() - 1
        )),
        "{e}"
    );
}

#[test]
fn stop_strings_cut_the_output() {
    let o = run(&["generate", "--max-tokens", "32", "--stop", "lord", "ROMEO:"]);
    let out = ok(&o);
    assert_eq!(out, "\nI know not what, my \n");
    assert!(text(&o.stderr).contains("stop: stop string"));
    let v: Value = serde_json::from_str(
        ok(&run(&[
            "generate",
            "--max-tokens",
            "32",
            "--stop",
            "lord",
            "--json",
            "ROMEO:",
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(v["text"].as_str().unwrap(), "\nI know not what, my ");
    assert_eq!(v["stop"].as_str().unwrap(), "stop string");
}

#[test]
fn repo_ids_resolve_from_the_hugging_face_cache_offline() {
    // A cache laid out as hf-hub writes it, holding the built-in model's files.
    let home = temp_dir("hf-home");
    let repo = home.join("hub/models--someone--tiny-hymba");
    let snap = repo.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(
        repo.join("refs/main"),
        "0123456789abcdef0123456789abcdef01234567",
    )
    .unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(root().join("models/tiny-shakespeare").join(f), snap.join(f)).unwrap();
    }
    let o = bin()
        .args([
            "generate",
            "--model",
            "someone/tiny-hymba",
            "--max-tokens",
            "8",
            "--json",
            "ROMEO:",
        ])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), vec![1, 480, 635, 669, 267]);
    // Not cached and no network: a clear error naming the repo and the cache.
    let o = bin()
        .args(["generate", "--model", "someone/not-cached", "hi"])
        .env("HF_HOME", &home)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = failed(&o);
    assert!(
        e.starts_with("error: ") && e.contains("someone/not-cached") && e.contains("cache"),
        "{e}"
    );
    std::fs::remove_dir_all(home).ok();
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_generation_cleanly() {
    use std::io::Read;
    let mut child = bin()
        .args(["generate", "--max-tokens", "1000", "ROMEO:"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until text streams (the generation is running), then interrupt.
    let mut first = [0u8; 8];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    ok(&o);
    let err = text(&o.stderr);
    assert!(
        err.contains("stop: cancelled") && err.contains("generated tokens:"),
        "{err}"
    );
}

#[test]
fn prefill_chunk_size_does_not_change_the_output() {
    // A prompt of three 16-position chunks gives the same greedy tokens as one chunk.
    let prompt = "To be, or not to be, that is the question: whether 'tis nobler in the mind to \
                  suffer the slings and arrows of outrageous fortune";
    let gen = |extra: &[&str]| -> Value {
        let mut args = vec!["generate", "--max-tokens", "12", "--json"];
        args.extend_from_slice(extra);
        args.push(prompt);
        serde_json::from_str(ok(&run(&args)).trim()).expect("one JSON object")
    };
    let whole = gen(&[]);
    let chunked = gen(&["--prefill-chunk", "16"]);
    assert!(whole["prompt_tokens"].as_u64().unwrap() > 2 * 16);
    assert_eq!(whole["ids"], chunked["ids"]);
    assert_eq!(whole["text"], chunked["text"]);
    let e = failed(&run(&["generate", "--prefill-chunk", "0", "hi"]));
    assert!(e.contains("--prefill-chunk"), "{e}");
}
