//! `hymba info`: GPU adapters, or a model's layout and memory needs.

use crate::load::{open_source, upload};
use crate::{err, CliResult, InfoArgs, ModelArgs};
use hymba_engine::config::{AttentionKind, HymbaConfig, KvRole};
use hymba_engine::gpu::{describe_adapter, parse_backends, Gpu};
use hymba_engine::kernels::{Matrix, WeightDtype};
use hymba_engine::model::{group_weight_report, TensorStorage};

pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", f / (1024.0 * 1024.0 * 1024.0))
    } else if f >= 1024.0 * 1024.0 {
        format!("{:.2} MiB", f / (1024.0 * 1024.0))
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{b} B")
    }
}

pub fn info(a: InfoArgs) -> CliResult<()> {
    match &a.model {
        Some(_) => model_info(&a),
        None => adapters_info(&a.backend),
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn adapters_info(backend: &str) -> CliResult<()> {
    let backends = parse_backends(backend).ok_or_else(|| format!("unknown backend {backend}"))?;
    let adapters = Gpu::adapters(backends);
    if adapters.is_empty() {
        return Err(format!(
            "no GPU adapter found for backends {backends:?}. Install a Vulkan driver; for a software one on Debian/Ubuntu: apt-get install mesa-vulkan-drivers"
        ));
    }
    println!(
        "{} adapter(s) for backends {:?} (use --adapter N to pick one):",
        adapters.len(),
        backends
    );
    for (i, ad) in adapters.iter().enumerate() {
        let info = ad.get_info();
        let f = ad.features();
        let l = ad.limits();
        println!("[{i}] {}", describe_adapter(&info));
        println!(
            "    features: shader-f16 {}, subgroup {} (sizes {}..{}), timestamp-query {}",
            yes(f.contains(wgpu::Features::SHADER_F16)),
            yes(f.contains(wgpu::Features::SUBGROUP)),
            info.subgroup_min_size,
            info.subgroup_max_size,
            yes(f.contains(wgpu::Features::TIMESTAMP_QUERY))
        );
        println!(
            "    limits: max_buffer_size {}, max_storage_buffer_binding_size {}, max_storage_buffers_per_shader_stage {}",
            human_bytes(l.max_buffer_size),
            human_bytes(l.max_storage_buffer_binding_size),
            l.max_storage_buffers_per_shader_stage
        );
        println!(
            "            max_compute_workgroup_storage_size {}, max_compute_invocations_per_workgroup {}, max_compute_workgroups_per_dimension {}",
            human_bytes(l.max_compute_workgroup_storage_size as u64),
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension
        );
    }
    Ok(())
}

/// Bytes of weights on the GPU estimated from the config (matrices and f32 vectors, without
/// buffer padding and the second copy of the inner norms); `hymba info --model` also measures them.
pub fn gpu_weight_bytes(c: &HymbaConfig, dt: WeightDtype) -> u64 {
    let mat = Matrix::bytes_for;
    let f32 = WeightDtype::F32;
    let d = c.hidden;
    let di = c.d_inner;
    let mut total = mat(c.vocab_size, d, dt);
    if !c.raw.tie_word_embeddings {
        total += mat(c.vocab_size, d, dt);
    }
    total += ((c.n_meta + 1) * d * 4) as u64;
    for i in 0..c.n_layers {
        total += mat(c.in_proj_rows(i), d, dt)
            + mat(c.x_proj_rows(), di, f32)
            + mat(di, c.dt_rank, f32)
            + mat(d, di, dt)
            + mat(2 * c.intermediate, d, dt)
            + mat(d, c.intermediate, dt);
        let small =
            (di * c.d_conv + di) + (di * c.d_state + 2 * di) + 2 * di + 2 * d + c.x_proj_rows();
        total += (small * 4) as u64;
    }
    total
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// "0-5,7,9-11" for sorted layer numbers.
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j > i {
            format!("{}-{}", v[i], v[j])
        } else {
            v[i].to_string()
        });
        i = j + 1;
    }
    out.join(",")
}

/// The weight storage table of `hymba info`: per tensor, or grouped by role across layers.
pub fn storage_table(report: &[TensorStorage], per_tensor: bool) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "tensor".into(),
        "layers".into(),
        "stored".into(),
        "shape".into(),
        "GPU bytes".into(),
    ]];
    if per_tensor {
        for t in report {
            rows.push([
                t.name.clone(),
                String::new(),
                t.dtype.name().into(),
                shape_str(&t.shape),
                t.bytes.to_string(),
            ]);
        }
    } else {
        for g in group_weight_report(report) {
            rows.push([
                g.pattern,
                ranges(&g.layers),
                g.dtype.name().into(),
                shape_str(&g.shape),
                g.bytes.to_string(),
            ]);
        }
    }
    let w: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for r in rows {
        s.push_str(&format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {:>w4$}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        ));
    }
    s
}

fn model_info(a: &InfoArgs) -> CliResult<()> {
    let spec = a.model.as_deref().unwrap_or("builtin");
    let src = open_source(Some(spec), true)?;
    let c = &src.checkpoint.config;
    let max_positions = c.n_meta + c.max_position_embeddings;
    println!("model: {}", src.name);
    println!(
        "parameters: {} ({:.2} M); stored weights {}",
        c.parameter_count(),
        c.parameter_count() as f64 / 1e6,
        human_bytes(src.checkpoint.stored_bytes())
    );
    let auto_f32 = (c.parameter_count() as u64) * 4 <= 1 << 30;
    let b = |dt| human_bytes(gpu_weight_bytes(c, dt));
    match src.checkpoint.quantization() {
        Some(q) => println!(
            "stored pre-quantized to {} (hymba quantize); it loads as {} only",
            q.name(),
            q.name()
        ),
        None => println!(
            "GPU weights (estimated): {} as f32, {} as f16, {} as q8, {} as q4 (--dtype auto picks {})",
            b(WeightDtype::F32),
            b(WeightDtype::F16),
            b(WeightDtype::Q8),
            b(WeightDtype::Q4),
            if auto_f32 { "f32" } else { "f16" }
        ),
    }
    println!(
        "hidden {}, {} layers, {} query heads / {} KV heads (q/k dim {}, v dim {}), SSM inner {} (d_state {}, d_conv {}, dt_rank {}), MLP {}, vocabulary {}",
        c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.d_qk, c.d_v, c.d_inner, c.d_state, c.d_conv, c.dt_rank, c.intermediate, c.vocab_size
    );
    println!(
        "meta tokens: {} (prepended to every sequence); max positions {} ({} text tokens + meta tokens)",
        c.n_meta, max_positions, c.max_position_embeddings
    );
    println!("bos {}, eos {:?}", c.bos_token_id, c.eos_token_ids);
    println!("layers:");
    for (i, role) in c.layers.iter().enumerate() {
        let att = match role.attention {
            AttentionKind::Global => "global".to_string(),
            AttentionKind::SlidingWindow { window } => format!("sliding window {window}"),
        };
        let kv = match &role.kv {
            KvRole::Standalone => "own KV".to_string(),
            KvRole::Producer { consumers } => format!(
                "KV producer for layers {}",
                consumers
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            KvRole::Consumer { producer } => format!("KV consumer of layer {producer}"),
        };
        println!("  {i:>2}: {att}, {kv}");
    }
    // Upload the weights and report what each buffer holds.
    let args = ModelArgs {
        model: a.model.clone(),
        backend: a.backend.clone(),
        adapter: a.adapter,
        dtype: a.dtype.clone(),
        prefill_chunk: a.prefill_chunk,
    };
    let lm = upload(src, &args, true)?;
    let c = &lm.model.cfg;
    let kv = lm.model.kv_dtype;
    let kv_owner_global = c
        .layers
        .iter()
        .filter(|l| l.owns_kv() && l.attention == AttentionKind::Global)
        .count();
    let per_token = kv_owner_global * c.n_kv_heads * (c.d_qk + c.d_v) * kv.bytes();
    println!(
        "cache (KV {}, conv and SSM states f32): grows by {} per token ({} KV-owning global layer(s)); sliding-window KV, conv and SSM states are fixed-size (full KV of all {} KV-owning layers would be {} per token)",
        kv.name(),
        human_bytes(per_token as u64),
        kv_owner_global,
        c.layers.iter().filter(|l| l.owns_kv()).count(),
        human_bytes(c.kv_bytes_per_position(kv.bytes()) as u64)
    );
    let fixed = lm.model.new_sequence().map_err(err)?.cache_bytes();
    println!(
        "cache for one sequence (KV {} because the weights are {}; prefill chunk {}):",
        kv.name(),
        lm.model.dtype.name(),
        lm.model.chunk
    );
    println!(
        "  new sequence: {} (measured from its buffers; its sliding-window rings hold a prefill chunk more than the window until the first decode step)",
        human_bytes(fixed)
    );
    // Each row is measured too: a sequence's buffers grown to hold that many tokens.
    for n in [1usize, 1024, 4096, 8192] {
        let note = if n + c.n_meta > max_positions {
            " (beyond this model's limit)"
        } else {
            ""
        };
        println!(
            "  {:>6} tokens: {} (measured: a sequence grown to hold them, as decoding holds it){}",
            n,
            human_bytes(lm.model.cache_bytes_for(n).map_err(err)?),
            note
        );
    }
    let report = lm.model.weight_report();
    println!(
        "weight storage on the GPU ({}, measured from the uploaded buffers{}):",
        lm.model.dtype.name(),
        if a.tensors {
            ""
        } else {
            "; tensors of the same role grouped across layers, --tensors lists each"
        }
    );
    print!("{}", storage_table(report, a.tensors));
    println!(
        "total weight bytes on the GPU: {} ({}) in {} buffers",
        lm.model.weight_bytes(),
        human_bytes(lm.model.weight_bytes()),
        report.len()
    );
    Ok(())
}
