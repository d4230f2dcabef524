//! llama-bench-style measurements of the engine: prompt processing (pp) and
//! token generation (tg) at several context lengths, on a real checkpoint or
//! on seeded random weights built from a config.json (full size, no file).

use clap::Parser;
use hymba_engine::generate::GenerateOptions;
use hymba_engine::gpu::{describe_adapter, parse_backends, Gpu, GpuOptions};
use hymba_engine::kernels::Kernels;
use hymba_engine::loader::Checkpoint;
use hymba_engine::model::{DecodeStage, DtypeChoice, Logits, Model, ModelOptions};
use hymba_engine::sampling::SamplingParams;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Benchmark Hymba prefill and decode (pp/tg rows like llama-bench)")]
struct Args {
    /// Model directory; without it, random weights from --config.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// config.json for random weights.
    #[arg(long, default_value = "tests/configs/hymba-1.5b-config.json")]
    config: std::path::PathBuf,
    /// Weight storage: f32, f16, q8, q4 or auto, or a comma list of them (one set of rows each).
    #[arg(long, default_value = "f16")]
    dtype: String,
    #[arg(long, default_value = "vulkan")]
    backend: String,
    /// Prompt length for pp.
    #[arg(long, default_value_t = 512)]
    pp: usize,
    /// Timed prompts for the pp row: it gives the best, with the median and the slowest of
    /// them beside it (single rows of one binary vary by a few percent; A/B with more).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pp_reps: u64,
    /// Generated tokens for tg.
    #[arg(long, default_value_t = 128)]
    tg: usize,
    /// Context lengths (tokens) for extra tg rows.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,8000")]
    ctx: Vec<usize>,
    /// Tokens generated for each context row.
    #[arg(long, default_value_t = 64)]
    ctx_tg: usize,
    /// Seconds of warm-up decode before timing.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Prefill chunk size [default: 512 where the prompt GEMMs run on tensor cores, else 256]
    #[arg(long)]
    chunk: Option<usize>,
    /// Print GPU time per kernel (timestamp queries) for a decode step and a prefill chunk.
    #[arg(long)]
    profile: bool,
    /// Sampling temperature for the tg rows (0 = greedy, the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// top-k for the tg rows when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// top-p for the tg rows when sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Measure each fused decode stage's marginal cost at a --pp-token context: the step is
    /// timed (queued) with the stage recorded 0, 1 and 3 times per layer (outputs are wrong
    /// while a stage is repeated or left out; nothing else is measured in this mode).
    #[arg(long)]
    stages: bool,
    /// Save the random model as a Hugging Face folder here and exit.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Measure a chain of Hymba-1.5B's four decode GEMVs per layer (f16 weights, --grid-layers) as
    /// one dispatch per GEMV against one persistent dispatch per token whose workgroups meet at
    /// a grid barrier between GEMVs (`shaders/bench_grid.wgsl`), for each workgroup count
    /// given (all of them must be resident at once, or the probe hangs), and exit. On CPU
    /// adapters only 1 workgroup is run.
    #[arg(long, value_delimiter = ',')]
    grid_probe: Vec<u32>,
    /// Layers in the grid probe's chain (1 to 16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=16))]
    grid_layers: u32,
}

fn main() {
    let a = Args::parse();
    let backends = parse_backends(&a.backend).unwrap_or_else(|| die("unknown backend"));
    let new_gpu = || {
        Arc::new(
            pollster::block_on(Gpu::new(&GpuOptions {
                backends,
                ..Default::default()
            }))
            .unwrap_or_else(|e| die(e)),
        )
    };
    if !a.grid_probe.is_empty() {
        let gpu = new_gpu();
        println!("adapter: {}", describe_adapter(&gpu.info));
        grid_probe(&gpu, &a.grid_probe, a.grid_layers, a.warmup);
        return;
    }
    let ck = match &a.model {
        Some(d) => Checkpoint::open_dir(d).unwrap_or_else(|e| die(e)),
        None => {
            let t = Instant::now();
            let cfg = std::fs::read_to_string(&a.config)
                .unwrap_or_else(|e| die(format!("{}: {e}", a.config.display())));
            let ck = Checkpoint::random(&cfg, 1234).unwrap_or_else(|e| die(e));
            eprintln!(
                "random weights from {} in {:.1} s",
                a.config.display(),
                t.elapsed().as_secs_f64()
            );
            ck
        }
    };
    if let Some(dir) = &a.save {
        ck.save_hf(dir).unwrap_or_else(|e| die(e));
        eprintln!("saved to {}", dir.display());
        return;
    }
    let gpu = new_gpu();
    let kernels = Arc::new(Kernels::new(&gpu).unwrap_or_else(|e| die(e)));
    let adapter = describe_adapter(&gpu.info);
    println!("adapter: {adapter}");
    println!(
        "shader-f16: {}, date: {}",
        gpu.shader_f16,
        chrono_like_date()
    );
    if a.temperature > 0.0 {
        println!(
            "tg rows sample on the GPU: temperature {}, top-k {}, top-p {}",
            a.temperature, a.top_k, a.top_p
        );
    } else {
        println!("tg rows decode greedily (argmax on the GPU)");
    }
    let copy_gbs = copy_bandwidth(&gpu, a.warmup);
    if gpu.coop_f16 {
        mma_throughput(&gpu);
    }
    println!("| model | dtype | test | tok/s | ms/token | weights GB/s | notes |");
    println!("|---|---|---|---|---|---|---|");
    for dt in a.dtype.split(',') {
        let choice: DtypeChoice = dt.parse().unwrap_or_else(|e: String| die(e));
        let t = Instant::now();
        let model = pollster::block_on(Model::load(
            gpu.clone(),
            kernels.clone(),
            &ck,
            &ModelOptions {
                dtype: choice,
                chunk: a.chunk,
                ..Default::default()
            },
            |_, _| {},
        ))
        .unwrap_or_else(|e| die(e));
        let load_s = t.elapsed().as_secs_f64();
        // "(x% of copy)" after a GB/s figure, against the measured copy bandwidth.
        let pct = |gbs: f64| match copy_gbs {
            Some(c) => format!(" ({:.0}% of copy)", 100.0 * gbs / c),
            None => String::new(),
        };
        let wb = model.weight_bytes();
        let name = a
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| {
                format!(
                    "random({})",
                    a.config.file_name().unwrap().to_string_lossy()
                )
            });
        // One tg row: rate, time and weight bandwidth of `secs` per token, then `note`.
        let tg_row = |n: usize, ctx: usize, mode: &str, secs: f64, note: String| {
            println!(
                "| {name} | {dt} | tg{n} @ {ctx} ({mode}) | {:.1} | {:.3} | {:.0}{} | {note} |",
                1.0 / secs,
                secs * 1e3,
                wb as f64 / secs / 1e9,
                pct(wb as f64 / secs / 1e9),
            )
        };
        eprintln!(
            "{dt}: loaded in {load_s:.1} s, weights {:.3} GB",
            wb as f64 / 1e9
        );
        let vocab = model.cfg.vocab_size as u32;
        let ids = |n: usize, s: u32| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(s) >> 7) % (vocab - 3) + 3)
                .collect()
        };
        let sp = SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: 1,
            ..SamplingParams::greedy()
        };
        // Warm-up: keep the GPU busy so its clock is up.
        let t = Instant::now();
        let mut seq = model.new_sequence().unwrap();
        pollster::block_on(model.forward(&mut seq, &ids(64, 1), Logits::Last, None)).unwrap();
        while t.elapsed().as_secs_f64() < a.warmup {
            for _ in 0..16 {
                model.submit_decode(&mut seq, &sp, true).unwrap();
            }
            pollster::block_on(model.gpu.finish()).unwrap();
            if seq.position() + 64 > model.max_positions {
                seq = model.new_sequence().unwrap();
                pollster::block_on(model.forward(&mut seq, &ids(64, 1), Logits::Last, None))
                    .unwrap();
            }
        }
        // Only each row's own sequence is alive from here (the GPU memory lines count on it).
        drop(seq);
        if a.stages {
            stage_study(&model, a.pp, a.tg, &ids(a.pp, 3));
            continue;
        }
        // pp: prompt processing, best of --pp-reps (median and slowest noted).
        let mut times = Vec::new();
        for r in 0..a.pp_reps as u32 {
            let mut s = model.new_sequence().unwrap();
            pollster::block_on(model.gpu.finish()).unwrap();
            let t = Instant::now();
            pollster::block_on(model.forward(&mut s, &ids(a.pp, 7 + r), Logits::Last, None))
                .unwrap();
            pollster::block_on(model.gpu.finish()).unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let best = times[0];
        let median = times[times.len() / 2];
        let slowest = times[times.len() - 1];
        if a.profile {
            let mut s = model.new_sequence().unwrap();
            pollster::block_on(model.forward(&mut s, &ids(model.chunk, 5), Logits::None, None))
                .unwrap();
            if let Some(p) =
                pollster::block_on(model.profile_prefill(&mut s, &ids(model.chunk, 9))).unwrap()
            {
                let total: f64 = p.iter().map(|e| e.1).sum();
                println!(
                    "profile prefill chunk of {} after {}: {:.1} ms GPU",
                    model.chunk,
                    model.chunk,
                    total / 1e6
                );
                for (k, t, c) in &p {
                    println!(
                        "    {:>9.1} us {:>5.1}%  x{c:<4} {k}",
                        t / 1e3,
                        100.0 * t / total
                    );
                }
            }
        }
        println!(
            "| {name} | {dt} | pp{} | {:.0} | {:.3} | | chunk {}; best of {}, median {:.0}, slowest {:.0} |",
            a.pp,
            a.pp as f64 / best,
            best * 1e3 / a.pp as f64,
            model.chunk,
            times.len(),
            a.pp as f64 / median,
            a.pp as f64 / slowest
        );
        // tg after a pp-length prompt, two ways.
        let mut rows = vec![(a.pp, a.tg)];
        rows.extend(a.ctx.iter().map(|&c| (c, a.ctx_tg)));
        for (ctx, n) in rows {
            if model.cfg.n_meta + ctx + 2 * n + 2 > model.max_positions {
                println!(
                    "| {name} | {dt} | tg{n} @ {ctx} | — | | | exceeds max positions {} |",
                    model.max_positions
                );
                continue;
            }
            let mut s = model.new_sequence().unwrap();
            pollster::block_on(model.forward(&mut s, &ids(ctx - 1, 3), Logits::Last, None))
                .unwrap();
            // GPU memory right after the prompt, before the first decode step gives back the
            // prompt workspace and the rings' chunk slack: the peak of this context.
            let after_prompt = memory_line(&model, &s);
            // streamed: Model::generate itself (its last prompt token, then n decode steps,
            // each token read back; the step feeding a token is submitted before it is read).
            let g = pollster::block_on(model.generate(
                &mut s,
                &[5],
                &GenerateOptions {
                    max_new_tokens: n + 1,
                    sampling: sp.clone(),
                    stop_strings: Vec::new(),
                    stop_at_eos: false,
                },
                None,
                |_| true,
            ))
            .unwrap();
            assert_eq!(g.ids.len(), n + 1, "generate stopped early: {:?}", g.stop);
            let streamed = 1.0 / g.decode_tok_s();
            // generate's steps also back up the recurrent state (one copy dispatch per layer).
            let disp = s.decode_dispatches();
            // queued: submit all steps, wait once (GPU-bound rate); CPU encode = the time spent
            // preparing them (parameters and command encoding, not the submit).
            model.set_next_token(&mut s, 5).unwrap();
            let t = Instant::now();
            let mut enc = 0.0;
            for _ in 0..n {
                let te = Instant::now();
                let step = model.prepare_decode(&mut s, &sp, true).unwrap();
                enc += te.elapsed().as_secs_f64();
                model.submit_prepared(&mut s, step);
            }
            pollster::block_on(model.gpu.finish()).unwrap();
            let queued = t.elapsed().as_secs_f64() / n as f64;
            tg_row(
                n,
                ctx,
                "streamed",
                streamed,
                format!(
                    "{disp} dispatches and 1 submit per token, CPU encode {:.3} ms/token",
                    enc * 1e3 / n as f64
                ),
            );
            if a.profile {
                if let Some(p) = pollster::block_on(model.profile_decode(&s, &sp)).unwrap() {
                    let total: f64 = p.iter().map(|e| e.1).sum();
                    println!(
                        "profile decode @ {ctx}: {:.1} us GPU per token ({} dispatches)",
                        total / 1e3,
                        p.iter().map(|e| e.2).sum::<usize>()
                    );
                    for (k, t, c) in &p {
                        println!(
                            "    {:>8.1} us {:>5.1}%  x{c:<4} {k}",
                            t / 1e3,
                            100.0 * t / total
                        );
                    }
                }
            }
            tg_row(
                n,
                ctx,
                "queued",
                queued,
                format!(
                    "cache {:.1} MiB (KV {})",
                    s.cache_bytes() as f64 / 1048576.0,
                    model.kv_dtype.name()
                ),
            );
            // GPU memory while this context's sequence is alive and decoding: the allocator's
            // total, and what the engine's own accounting says it is made of.
            if let Some(peak) = after_prompt {
                println!("gpu memory @ {ctx} after the prompt: {peak}");
            }
            if let Some(now) = memory_line(&model, &s) {
                println!("gpu memory @ {ctx} decoding: {now}");
            }
        }
        if let Some(r) = model.gpu.device.generate_allocator_report() {
            println!(
                "gpu allocator: {:.1} MiB allocated, {:.1} MiB reserved",
                r.total_allocated_bytes as f64 / 1048576.0,
                r.total_reserved_bytes as f64 / 1048576.0
            );
        }
    }
}

/// The GPU allocator's total while `s` is the only sequence alive, against the engine's own
/// accounting of weights, workspaces and this sequence's cache (None without an allocator report).
fn memory_line(model: &Model, s: &hymba_engine::cache::Sequence) -> Option<String> {
    let r = model.gpu.device.generate_allocator_report()?;
    let mib = |b: u64| b as f64 / 1048576.0;
    let (w, act, cache) = (
        model.weight_bytes(),
        model.activation_bytes(),
        s.cache_bytes(),
    );
    let total = r.total_allocated_bytes;
    Some(format!(
        "allocator {:.1} MiB = weights {:.1} + {:.1} MiB (workspaces {:.1}, this sequence's cache {:.1}, unaccounted {:.1}; allocator blocks {:.1} MiB)",
        mib(total),
        mib(w),
        mib(total.saturating_sub(w)),
        mib(act),
        mib(cache),
        (total as f64 - (w + act + cache) as f64) / 1048576.0,
        mib(r.total_reserved_bytes)
    ))
}

/// Queued decode time per token (seconds, best of 3 runs of `n` tokens) after `prompt`.
fn queued_step(model: &Model, prompt: &[u32], n: usize) -> f64 {
    let sp = SamplingParams::greedy();
    let mut s = model.new_sequence().unwrap();
    pollster::block_on(model.forward(&mut s, prompt, Logits::Last, None)).unwrap();
    model.set_next_token(&mut s, 5).unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        pollster::block_on(model.gpu.finish()).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            model.submit_decode(&mut s, &sp, true).unwrap();
        }
        pollster::block_on(model.gpu.finish()).unwrap();
        best = best.min(t.elapsed().as_secs_f64() / n as f64);
    }
    best
}

/// `--stages`: each decode stage's marginal cost in the dependent chain of dispatches.
fn stage_study(model: &Model, ctx: usize, n: usize, prompt: &[u32]) {
    let layers = model.cfg.n_layers as f64;
    let base = queued_step(model, prompt, n);
    println!(
        "decode stage study @ {ctx} ({n} queued tokens, best of 3): {:.1} us/token",
        base * 1e6
    );
    println!(
        "| stage | left out: us/token (saves per layer) | x3: us/token (each extra, per layer) |"
    );
    println!("|---|---|---|");
    for st in DecodeStage::ALL {
        model.set_stage_repeat(st, 0);
        let t0 = queued_step(model, prompt, n);
        model.set_stage_repeat(st, 3);
        let t3 = queued_step(model, prompt, n);
        model.set_stage_repeat(st, 1);
        println!(
            "| {} | {:.1} ({:.2}) | {:.1} ({:.2}) |",
            st.name(),
            t0 * 1e6,
            (base - t0) * 1e6 / layers,
            t3 * 1e6,
            (t3 - base) * 1e6 / layers / 2.0
        );
    }
}

/// Measured tensor-core throughput through WGSL cooperative matrices (`bench_mma.wgsl`): 16x16x16
/// f16 multiply-adds into f32, 8 independent accumulators per subgroup, with the operand
/// fragments in registers, reloaded from workgroup memory, or reloaded from a (cached) storage
/// buffer every round. Best of 3 dispatches each, after one untimed.
fn mma_throughput(gpu: &Gpu) {
    use hymba_engine::gpu::{BindKind, Kernel, Recorder};
    let groups: u32 = 1056;
    let iters: u32 = 256;
    let src: Vec<half::f16> = (0..4096)
        .map(|i| half::f16::from_f32(((i % 13) as f32 - 6.0) * 0.01))
        .collect();
    let Ok(src) = gpu.upload("mma src", &src) else {
        return;
    };
    let Ok(dst) = gpu.buffer("mma dst", groups as u64 * 4 * 2048 * 4) else {
        return;
    };
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        iters: u32,
    }
    for (what, defs) in [
        ("fragments in registers", &["COOP"][..]),
        (
            "fragments reloaded from workgroup memory",
            &["COOP", "RELOAD", "OPS=sh"],
        ),
        (
            "fragments reloaded from a storage buffer",
            &["COOP", "RELOAD", "OPS=src"],
        ),
    ] {
        let kernel = match Kernel::new(
            gpu,
            "bench_mma.wgsl",
            include_str!("../../shaders/bench_mma.wgsl"),
            "main",
            defs,
            &[BindKind::Uniform, BindKind::Read, BindKind::ReadWrite],
        ) {
            Ok(k) => std::sync::Arc::new(k),
            Err(e) => {
                println!("tensor-core throughput ({what}): not measured: {e}");
                continue;
            }
        };
        let mut rec = Recorder::new(gpu);
        if rec
            .dispatch(&kernel, &P { iters }, &[&src, &dst], [groups, 1, 1])
            .is_err()
        {
            continue;
        }
        let prog = rec.finish();
        let mut best = f64::MAX;
        for r in 0..4 {
            pollster::block_on(gpu.finish()).ok();
            let t = Instant::now();
            prog.run(gpu);
            pollster::block_on(gpu.finish()).ok();
            if r > 0 {
                best = best.min(t.elapsed().as_secs_f64());
            }
        }
        let flops = groups as f64 * 4.0 * iters as f64 * 8.0 * 2.0 * 4096.0;
        println!(
            "tensor-core throughput ({what}): {:.1} TFLOP/s (WGSL cooperative matrices 16x16x16 f16 -> f32, {groups} x 4 subgroups x {iters} rounds of 8)",
            flops / best / 1e12
        );
    }
}

/// See `Args::grid_probe`. Prints, per form, the time per token of the chain of `layers` layers
/// (best of 3 runs of 20 tokens, after `warmup` seconds of the dispatch-per-GEMV form) and
/// whether the persistent form's output equals the dispatch-per-GEMV form's bit for bit.
fn grid_probe(gpu: &Gpu, groups: &[u32], layers: u32, warmup: f64) {
    use hymba_engine::gpu::{BindKind, Kernel, Recorder};
    use std::sync::Arc;
    const LAYER_W: u64 = 5_734_400; // vec4<u32> per layer (bench_grid.wgsl)
    const ACT: u64 = 12_928 + 11_008;
    const TOKENS: usize = 20;
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        layers: u32,
        phase: u32,
        groups: u32,
        base: u32,
    }
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let src = include_str!("../../shaders/bench_grid.wgsl");
    let rw = BindKind::ReadWrite;
    let kernel = |defs: &[&str], entry: &str, n_buf: usize| -> Arc<Kernel> {
        let mut binds = vec![BindKind::Uniform];
        binds.extend(std::iter::repeat_n(rw, n_buf));
        Arc::new(
            Kernel::new(gpu, "bench_grid.wgsl", src, entry, defs, &binds)
                .unwrap_or_else(|e| die(e)),
        )
    };
    let buffer = |name: &str, bytes: u64| gpu.buffer(name, bytes).unwrap_or_else(|e| die(e));
    let w = buffer("grid probe weights", layers as u64 * LAYER_W * 16);
    let act0 = buffer("grid probe h", ACT * 4);
    let act = buffer("grid probe activations", ACT * 4);
    let sync = buffer("grid probe barrier", 16);
    let p0 = P {
        layers,
        phase: 0,
        groups: 0,
        base: 0,
    };
    let n_fill = (layers as u64 * LAYER_W).div_ceil(256) as u32;
    let mut rec = Recorder::new(gpu);
    rec.dispatch(
        &kernel(&[], "fill", 2),
        &p0,
        &[&w, &act0],
        [32768, n_fill.div_ceil(32768), 1],
    )
    .unwrap_or_else(|e| die(e));
    rec.finish().run(gpu);
    // One dispatch per GEMV: ceil(m / 16) workgroups of 8 subgroups, two rows each (with
    // subgroups of 32; more rows per subgroup where they are narrower).
    let chain = kernel(&[], "main", 2);
    let ms = [8960u32, 1600, 11008, 1600];
    let chain_prog = |tokens: usize| {
        let mut rec = Recorder::new(gpu);
        for _ in 0..tokens {
            for g in 0..4 * layers {
                let gx = ms[g as usize % 4].div_ceil(16);
                let p = P {
                    phase: g,
                    groups: gx,
                    ..p0
                };
                rec.dispatch(&chain, &p, &[&w, &act], [gx, 1, 1])
                    .unwrap_or_else(|e| die(e));
            }
        }
        rec.finish()
    };
    let reset = || {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&act0, 0, &act, 0, ACT * 4);
        enc.clear_buffer(&sync, 0, None);
        gpu.queue.submit([enc.finish()]);
    };
    let read_h = || pollster::block_on(gpu.read_f32(&act, 0, 1600)).unwrap_or_else(|e| die(e));
    let time = |run: &dyn Fn()| -> f64 {
        let mut best = f64::MAX;
        for _ in 0..3 {
            pollster::block_on(gpu.finish()).ok();
            let t = Instant::now();
            run();
            pollster::block_on(gpu.finish()).ok();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best / TOKENS as f64
    };
    let bytes = layers as f64 * LAYER_W as f64 * 16.0;
    let report = |what: &str, secs: f64, note: &str| {
        println!(
            "grid probe, {layers} layers x 4 GEMVs (f16, {:.2} GB): {what}: {:.1} us per token, {:.2} us per GEMV, {:.0} GB/s{note}",
            bytes / 1e9,
            secs * 1e6,
            secs * 1e6 / (4 * layers) as f64,
            bytes / secs / 1e9
        );
    };
    // Warm-up, then the reference output of one token, then the chain's time.
    let (one, many) = (chain_prog(1), chain_prog(TOKENS));
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < warmup {
        many.run(gpu);
        pollster::block_on(gpu.finish()).ok();
    }
    reset();
    one.run(gpu);
    let want = read_h();
    let rms = (want.iter().map(|x| x * x).sum::<f32>() / want.len() as f32).sqrt();
    // With one layer, each GEMV against the CPU, from the input the GPU gave it (worst
    // relative error per GEMV).
    let cpu_check = |all: &[f32]| -> Option<[f32; 4]> {
        if layers != 1 {
            return None;
        }
        let h0 = pollster::block_on(gpu.read_f32(&act0, 0, 1600)).unwrap_or_else(|e| die(e));
        let words = pollster::block_on(gpu.read_u32(&w, 0, LAYER_W * 4)).unwrap_or_else(|e| die(e));
        let wt = |i: usize| -> f32 {
            let v = words[i / 2];
            half::f16::from_bits(if i.is_multiple_of(2) {
                v as u16
            } else {
                (v >> 16) as u16
            })
            .to_f32()
        };
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let (pa, oa, ga) = (2048usize, 11264usize, 12928usize);
        let swi: Vec<f32> = (0..5504)
            .map(|c| silu(all[ga + c]) * all[ga + 5504 + c])
            .collect();
        let o_in = 8960 * 1600;
        let gu_in = o_in + 1600 * 3200;
        let dn_in = gu_in + 11008 * 1600;
        // (m, k, weight offset in halves, input, output)
        type Stage<'a> = (usize, usize, usize, &'a [f32], &'a [f32]);
        let stages: [Stage; 4] = [
            (8960, 1600, 0, &h0, &all[pa..pa + 8960]),
            (1600, 3200, o_in, &all[pa..pa + 3200], &all[oa..oa + 1600]),
            (
                11008,
                1600,
                gu_in,
                &all[oa..oa + 1600],
                &all[ga..ga + 11008],
            ),
            (1600, 5504, dn_in, &swi, &all[..1600]),
        ];
        let mut worst = [0f32; 4];
        for (i, (m, k, at, x, y)) in stages.into_iter().enumerate() {
            let sc = 1.0 / ((x.iter().map(|v| v * v).sum::<f32>() / k as f32) + 1e-6).sqrt();
            for (r, &got) in y.iter().enumerate().take(m) {
                let dot: f32 = (0..k).map(|c| wt(at + r * k + c) * x[c] * sc).sum();
                let e = (dot - got).abs() / (1.0 + dot.abs());
                if e > 1e-3 && std::env::var("GRID_DEBUG").is_ok() {
                    println!("GEMV {i} row {r}: cpu {dot} gpu {got}");
                }
                worst[i] = worst[i].max(e);
            }
        }
        Some(worst)
    };
    let read_all = || pollster::block_on(gpu.read_f32(&act, 0, ACT)).unwrap_or_else(|e| die(e));
    if let Some(e) = cpu_check(&read_all()) {
        println!("grid probe: one dispatch per GEMV against the CPU: worst relative error per GEMV {e:?}");
        if !e.iter().all(|&x| x < 1e-4) {
            die("grid probe: the chain's GEMVs are wrong");
        }
    }
    report(
        "one dispatch per GEMV",
        time(&|| {
            reset();
            many.run(gpu);
        }),
        &format!("; output h rms {rms:.3} (h[0] {})", want[0]),
    );
    for &g in groups {
        for (name, defs) in [
            ("grid barrier", &["GRID"][..]),
            (
                "grid barrier, plain activation loads",
                &["GRID", "PLAIN"][..],
            ),
            ("grid barriers alone, no GEMVs", &["GRID", "EMPTY"][..]),
        ] {
            let plain = defs.contains(&"PLAIN");
            let kern = kernel(defs, "main", if plain { 4 } else { 3 });
            if cpu && g > 1 {
                println!("grid probe: {name}: compiled, not run with {g} workgroups on a CPU adapter (they do not all run at once)");
                continue;
            }
            let prog = |tokens: usize| {
                let mut rec = Recorder::new(gpu);
                for t in 0..tokens {
                    let p = P {
                        groups: g,
                        base: t as u32 * (4 * layers - 1) * g,
                        ..p0
                    };
                    let binds: &[&wgpu::Buffer] = if plain {
                        &[&w, &act, &sync, &act]
                    } else {
                        &[&w, &act, &sync]
                    };
                    rec.dispatch(&kern, &p, binds, [g, 1, 1])
                        .unwrap_or_else(|e| die(e));
                }
                rec.finish()
            };
            let (one, many) = (prog(1), prog(TOKENS));
            reset();
            one.run(gpu);
            let got = read_h();
            if !defs.contains(&"EMPTY") {
                if let Some(e) = cpu_check(&read_all()) {
                    println!(
                        "grid probe: {name} against the CPU: worst relative error per GEMV {e:?}"
                    );
                }
            }
            let same = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            let secs = time(&|| {
                reset();
                many.run(gpu);
            });
            let note = if defs.contains(&"EMPTY") {
                format!(
                    "; {:.2} us per barrier",
                    secs * 1e6 / (4 * layers - 1) as f64
                )
            } else {
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                format!("; output {same}/1600 equal to the chain's bit for bit (max difference {diff:.2e})")
            };
            report(&format!("{name}, {g} workgroups"), secs, &note);
        }
    }
}

/// Measured copy bandwidth (GB/s, bytes read + written) of a WGSL copy kernel over two buffers
/// of up to 512 MiB: the ceiling the "% of copy" figures refer to. Copies run for `warmup`
/// seconds first (an idle GPU's clock sags), then the best of 5 batches of 10 dependent copies
/// in one pass.
fn copy_bandwidth(gpu: &Gpu, warmup: f64) -> Option<f64> {
    use hymba_engine::gpu::{BindKind, Kernel, Recorder};
    let limit = gpu
        .limits
        .max_storage_buffer_binding_size
        .min(gpu.limits.max_buffer_size);
    let bytes = (512u64 << 20).min(limit) / 16 * 16;
    let n = (bytes / 16) as u32;
    let kernel = std::sync::Arc::new(
        Kernel::new(
            gpu,
            "bench_copy.wgsl",
            include_str!("../../shaders/bench_copy.wgsl"),
            "main",
            &[],
            &[BindKind::Uniform, BindKind::Read, BindKind::ReadWrite],
        )
        .ok()?,
    );
    let src = gpu.buffer("copy src", bytes).ok()?;
    let dst = gpu.buffer("copy dst", bytes).ok()?;
    // Non-zero data, 16 MiB at a time.
    let chunk: Vec<f32> = (0..(4u32 << 20))
        .map(|i| (i % 9973) as f32 * 0.001 + 0.5)
        .collect();
    let mut off = 0u64;
    while off < bytes {
        let len = (bytes - off).min(16 << 20);
        gpu.queue.write_buffer(
            &src,
            off,
            bytemuck::cast_slice(&chunk[..(len / 4) as usize]),
        );
        off += len;
    }
    let row = 32768u32;
    let groups = [row.min(n.div_ceil(256)), n.div_ceil(256 * row), 1];
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    struct P {
        n: u32,
        row: u32,
    }
    let batch = |count: usize| -> Option<f64> {
        let mut rec = Recorder::new(gpu);
        for _ in 0..count {
            rec.dispatch(&kernel, &P { n, row }, &[&src, &dst], groups)
                .ok()?;
        }
        let prog = rec.finish();
        pollster::block_on(gpu.finish()).ok()?;
        let t = Instant::now();
        prog.run(gpu);
        pollster::block_on(gpu.finish()).ok()?;
        Some(t.elapsed().as_secs_f64())
    };
    let t = Instant::now();
    batch(3)?;
    while t.elapsed().as_secs_f64() < warmup {
        batch(10)?;
    }
    let best = (0..5).filter_map(|_| batch(10)).fold(f64::MAX, f64::min);
    let gbs = 2.0 * bytes as f64 * 10.0 / best / 1e9;
    println!(
        "copy bandwidth: {gbs:.0} GB/s (WGSL copy kernel, 2 x {} MiB, best of 5 x 10 copies after {warmup} s of copies)",
        bytes >> 20
    );
    Some(gbs)
}

fn chrono_like_date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn die(e: impl std::fmt::Display) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}
