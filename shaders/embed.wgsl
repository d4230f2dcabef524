// Embedding gather with meta-token prepend:
//   out[r, :] = meta[r, :]                     for r < n_meta      (learned meta tokens)
//   out[r, :] = table[ids[ids_off + r - n_meta], :]  otherwise      (token embeddings)
// Grid: (ceil(d / 64), rows, 1). Token ids are validated on the CPU or produced by the sampler.
// A table split by rows into several buffers (too large for one binding) is gathered with one
// dispatch per part: `table` then holds rows row0..row0 + part_rows, a row is written only by the
// part holding its id, and the meta rows only by the first part.

struct Params {
    rows: u32,
    n_meta: u32,   // leading rows taken from the meta tokens
    d: u32,        // hidden size
    kp4: u32,      // row stride of the table in vec4 units
    ids_off: u32,  // offset into ids of the first token
    vocab: u32,    // rows of the whole table
    row0: u32,     // first table row in this binding
    part_rows: u32, // table rows in this binding
}

@group(0) @binding(0) var<uniform> p: Params;
// ids: [*] u32 token ids.
@group(0) @binding(1) var<storage, read> ids: array<u32>;
#ifdef W_F32
// table: [part_rows, kp4] vec4<f32> (embed_tokens rows row0.., row-major).
@group(0) @binding(2) var<storage, read> table: array<vec4<f32>>;
fn w4(i: u32) -> vec4<f32> { return table[i]; }
#else
#ifdef W_Q8
// table: block-quantized int8, the layout of shaders/matmul.wgsl (W_Q8) with m = part_rows.
@group(0) @binding(2) var<storage, read> table: array<u32>;
fn wscale(b: u32) -> f32 {
    let v = unpack2x16float(table[p.part_rows * p.kp4 + b / 2u]);
    return select(v.x, v.y, (b & 1u) == 1u);
}
fn w4(i: u32) -> vec4<f32> {
    let v = table[i];
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u)) * wscale(i / 8u);
}
#else
#ifdef W_Q4
// table: block-quantized 4-bit, the layout of shaders/matmul.wgsl (W_Q4) with m = part_rows.
@group(0) @binding(2) var<storage, read> table: array<u32>;
fn wscale(b: u32) -> f32 {
    let v = unpack2x16float(table[p.part_rows * (p.kp4 / 2u) + b / 2u]);
    return select(v.x, v.y, (b & 1u) == 1u);
}
fn w4(i: u32) -> vec4<f32> {
    let v = table[i / 2u] >> (16u * (i & 1u));
    return (vec4<f32>(vec4<u32>(v, v >> 4u, v >> 8u, v >> 12u) & vec4<u32>(15u)) - vec4<f32>(8.0)) * wscale(i / 8u);
}
#else
#ifdef SHADER_F16
@group(0) @binding(2) var<storage, read> table: array<vec4<f16>>;
fn w4(i: u32) -> vec4<f32> { return vec4<f32>(table[i]); }
#else
@group(0) @binding(2) var<storage, read> table: array<vec2<u32>>;
fn w4(i: u32) -> vec4<f32> { let v = table[i]; return vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)); }
#endif
#endif
#endif
#endif
// meta_tokens: [n_meta_total, d] f32 meta tokens, row-major.
@group(0) @binding(3) var<storage, read> meta_tokens: array<f32>;
// out: [rows, d] f32 hidden states.
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    let r = gid.y;
    if (e >= p.d || r >= p.rows) { return; }
    var v: f32;
    if (r < p.n_meta) {
        if (p.row0 != 0u) { return; }
        v = meta_tokens[r * p.d + e];
    } else {
        let id = min(ids[p.ids_off + r - p.n_meta], p.vocab - 1u);
        if (id < p.row0 || id - p.row0 >= p.part_rows) { return; }
        v = w4((id - p.row0) * p.kp4 + e / 4u)[e % 4u];
    }
    out[r * p.d + e] = v;
}
