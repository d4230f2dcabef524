// Rotary position embedding, NeoX / HF "rotate_half" style over the whole q/k head:
//   out[j]        = v[j] * cos - v[j + half] * sin
//   out[j + half] = v[j + half] * cos + v[j] * sin,   j < half = d_qk / 2
// with cos/sin from a table computed on the CPU from the static-NTK inverse frequencies.
//
// Default entry `main` (rope_q): rotates the query block of the in_proj output in place.
//   Grid: (ceil(n_heads * half / 64), rows, 1).
// Define STORE_KV, entry `main`: rotates the new keys and writes keys and values into the
//   layer's KV cache at their slots (ring buffer for sliding-window layers).
//   Grid: (ceil(max(half, d_v) / 64), rows, n_kv_heads).
//   With KV_F16 as well (f16 KV cache, two f16 per u32 word, element 2i in the low half, rounded
//   by pack2x16float, to nearest on every driver tested, after clamping to the f16 range, where
//   WGSL leaves the result of larger values undefined): each thread writes whole words, one pair of keys in each half
//   and one pair of values (d_qk % 4 == 0, d_v even).
//   Grid: (ceil(max(d_qk / 4, d_v / 2) / 64), rows, n_kv_heads).

struct Params {
    rows: u32,
    n_heads: u32,   // heads in this block (query heads, or KV heads for STORE_KV)
    d_qk: u32,
    d_v: u32,
    p_off: u32,     // element offset of row 0 of the in_proj output
    p_stride: u32,  // in_proj output row width
    q_col: u32,     // column of q (or k for STORE_KV) in a row
    v_col: u32,     // column of v in a row (STORE_KV)
    pos0: u32,      // absolute position of row 0 (meta tokens count)
    n_meta: u32,    // meta slots at the start of the cache
    ring: u32,      // text slots after them (ring buffer length)
    cap: u32,       // slots per KV head = n_meta + ring
}

@group(0) @binding(0) var<uniform> p: Params;
// cs: [positions, half, 2] f32: (cos, sin) per position and frequency.
@group(0) @binding(1) var<storage, read> cs: array<f32>;
#ifdef STORE_KV
// pbuf: [rows, p_stride] f32 in_proj output (k at q_col, v at v_col).
@group(0) @binding(2) var<storage, read> pbuf: array<f32>;
#ifdef KV_F16
// kc: [n_kv_heads, cap, d_qk / 2] u32 key cache (post-RoPE), two f16 per word.
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
// vc: [n_kv_heads, cap, d_v / 2] u32 value cache, two f16 per word.
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;
// Two values as one word of f16, clamped to the f16 range first (WGSL leaves pack2x16float of
// larger values undefined).
fn pack_f16(v: vec2<f32>) -> u32 { return pack2x16float(clamp(v, vec2<f32>(-65504.0), vec2<f32>(65504.0))); }
#else
// kc: [n_kv_heads, cap, d_qk] f32 key cache (post-RoPE).
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
// vc: [n_kv_heads, cap, d_v] f32 value cache.
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;
#endif

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    let t = gid.y;
    let h = gid.z;
    if (t >= p.rows) { return; }
    let half = p.d_qk / 2u;
    let pos = p.pos0 + t;
    let s = slot(pos);
    let row = p.p_off + t * p.p_stride;
#ifdef KV_F16
    // Thread e: keys 2e, 2e + 1 of the first half and their partners in the second.
    if (e < half / 2u) {
        let kb = row + p.q_col + h * p.d_qk + 2u * e;
        let a = vec2<f32>(pbuf[kb], pbuf[kb + 1u]);
        let b = vec2<f32>(pbuf[kb + half], pbuf[kb + half + 1u]);
        let ci = (pos * half + 2u * e) * 2u;
        let c = vec2<f32>(cs[ci], cs[ci + 2u]);
        let sn = vec2<f32>(cs[ci + 1u], cs[ci + 3u]);
        let ob = (h * p.cap + s) * (p.d_qk / 2u);
        kc[ob + e] = pack_f16(a * c - b * sn);
        kc[ob + half / 2u + e] = pack_f16(b * c + a * sn);
    }
    if (e < p.d_v / 2u) {
        let vb = row + p.v_col + h * p.d_v + 2u * e;
        vc[(h * p.cap + s) * (p.d_v / 2u) + e] = pack_f16(vec2<f32>(pbuf[vb], pbuf[vb + 1u]));
    }
#else
    if (e < half) {
        let kb = row + p.q_col + h * p.d_qk;
        let a = pbuf[kb + e];
        let b = pbuf[kb + e + half];
        let c = cs[(pos * half + e) * 2u];
        let sn = cs[(pos * half + e) * 2u + 1u];
        let ob = (h * p.cap + s) * p.d_qk;
        kc[ob + e] = a * c - b * sn;
        kc[ob + e + half] = b * c + a * sn;
    }
    if (e < p.d_v) {
        vc[(h * p.cap + s) * p.d_v + e] = pbuf[row + p.v_col + h * p.d_v + e];
    }
#endif
}
#else
// pbuf: [rows, p_stride] f32 in_proj output; the query block at q_col is rotated in place.
@group(0) @binding(2) var<storage, read_write> pbuf: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.d_qk / 2u;
    let h = gid.x / half;
    let e = gid.x % half;
    let t = gid.y;
    if (h >= p.n_heads || t >= p.rows) { return; }
    let pos = p.pos0 + t;
    let qb = p.p_off + t * p.p_stride + p.q_col + h * p.d_qk;
    let a = pbuf[qb + e];
    let b = pbuf[qb + e + half];
    let c = cs[(pos * half + e) * 2u];
    let sn = cs[(pos * half + e) * 2u + 1u];
    pbuf[qb + e] = a * c - b * sn;
    pbuf[qb + e + half] = b * c + a * sn;
}
#endif
