// Attention for one decode step, split over the keys (flash-decoding), with RoPE on q and the
// KV store fused in.
//
// Default entry (split): one workgroup per (query head, block of 64 visible keys). The visible
// keys are the meta slots plus the text positions [lo, q] (lo from the sliding window; the
// reference decode window is W - 1). In a KV-owning layer (self_kv = 1) the current position's
// key and value come straight from the in_proj output (key rotated here) and the first query
// head of each KV group writes them to the cache slot of q, which no other workgroup reads (the
// ring is longer than the window). Each workgroup writes a partial result for its block:
// part[h, s] = (block max m, sum l of exp(score - m), sum of exp(score - m) * v).
// Grid: (n_heads, n_splits, 1); splits past the last visible key write nothing.
// Define COMBINE: merges the partials of each head into the attention output.
// Grid: (n_heads, 1, 1).

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    d_qk: u32,
    d_v: u32,
    q_stride: u32,   // in_proj output row width (q at column 0)
    k_col: u32,      // column of k in the in_proj row
    v_col: u32,      // column of v
    self_kv: u32,    // 1 when this layer owns its KV
    pos: u32,        // absolute position of the query
    n_meta: u32,
    ring: u32,
    cap: u32,        // slots per KV head
    window: u32,     // max q - k for text keys; 0xffffffff = global
    scale: f32,
    n_splits: u32,   // splits in the grid (partials stride)
}

@group(0) @binding(0) var<uniform> p: Params;
// part: [n_heads, n_splits, 2 + d_v] f32 partial results.
#ifdef COMBINE
@group(0) @binding(1) var<storage, read> part: array<f32>;
// out: [n_heads * d_v] f32 attention output, heads concatenated.
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
#else
@group(0) @binding(1) var<storage, read_write> part: array<f32>;
// pbuf: [1, q_stride] f32 in_proj output row of this step.
@group(0) @binding(2) var<storage, read> pbuf: array<f32>;
// cs: [positions, d_qk / 2, 2] f32 RoPE (cos, sin).
@group(0) @binding(3) var<storage, read> cs: array<f32>;
// kc: [n_kv_heads, cap, d_qk] f32 keys (post-RoPE).
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
// vc: [n_kv_heads, cap, d_v] f32 values.
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;
#endif

const WG: u32 = 64u;
const NEG: f32 = -3.0e38;
var<workgroup> red: array<f32, 64>;

fn visible(q: u32) -> vec3<u32> {
    // (meta keys visible, first text position, number of keys)
    let n_meta_vis = min(p.n_meta, q + 1u);
    var lo = p.n_meta;
    if (p.window != 0xffffffffu && q > p.window) { lo = max(p.n_meta, q - p.window); }
    var n_text = 0u;
    if (q >= lo) { n_text = q + 1u - lo; }
    return vec3<u32>(n_meta_vis, lo, n_meta_vis + n_text);
}

#ifdef COMBINE
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let vis = visible(p.pos);
    let used = (vis.z + WG - 1u) / WG;
    let stride = 2u + p.d_v;
    let base = h * p.n_splits * stride;
    var m = NEG;
    for (var s = 0u; s < used; s++) { m = max(m, part[base + s * stride]); }
    var l = 0.0;
    for (var s = 0u; s < used; s++) { l += exp(part[base + s * stride] - m) * part[base + s * stride + 1u]; }
    for (var e = li; e < p.d_v; e += WG) {
        var a = 0.0;
        for (var s = 0u; s < used; s++) { a += exp(part[base + s * stride] - m) * part[base + s * stride + 2u + e]; }
        out[h * p.d_v + e] = a / l;
    }
}
#else
var<workgroup> qs: array<f32, 256>;
var<workgroup> ks: array<f32, 256>;
var<workgroup> pr: array<f32, 64>;
var<workgroup> sl: array<u32, 64>;

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * WG;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let half = p.d_qk / 2u;
    let self_slot = slot(q);
    // The first query head of a KV group stores this step's key and value (once, split 0).
    if (p.self_kv != 0u && split == 0u && h % (p.n_heads / p.n_kv_heads) == 0u) {
        for (var e = li; e < half; e += WG) {
            let c = cs[(q * half + e) * 2u];
            let sn = cs[(q * half + e) * 2u + 1u];
            let a = pbuf[p.k_col + kvh * p.d_qk + e];
            let b = pbuf[p.k_col + kvh * p.d_qk + e + half];
            kc[(kvh * p.cap + self_slot) * p.d_qk + e] = a * c - b * sn;
            kc[(kvh * p.cap + self_slot) * p.d_qk + e + half] = b * c + a * sn;
        }
        for (var e = li; e < p.d_v; e += WG) { vc[(kvh * p.cap + self_slot) * p.d_v + e] = pbuf[p.v_col + kvh * p.d_v + e]; }
    }
    if (kb >= vis.z) { return; }
    for (var e = li; e < half; e += WG) {
        let c = cs[(q * half + e) * 2u];
        let sn = cs[(q * half + e) * 2u + 1u];
        let a = pbuf[h * p.d_qk + e];
        let b = pbuf[h * p.d_qk + e + half];
        qs[e] = a * c - b * sn;
        qs[e + half] = b * c + a * sn;
        if (p.self_kv != 0u) {
            let ka = pbuf[p.k_col + kvh * p.d_qk + e];
            let kb2 = pbuf[p.k_col + kvh * p.d_qk + e + half];
            ks[e] = ka * c - kb2 * sn;
            ks[e + half] = kb2 * c + ka * sn;
        }
    }
    workgroupBarrier();
    let j = kb + li;
    var s = NEG;
    var sidx = 0u;
    if (j < vis.z) {
        var pos = j;
        if (j >= vis.x) { pos = vis.y + (j - vis.x); }
        var d0 = 0.0;
        var d1 = 0.0;
        var d2 = 0.0;
        var d3 = 0.0;
        if (p.self_kv != 0u && pos == q) {
            sidx = 0xffffffffu;
            for (var e = 0u; e < p.d_qk; e += 4u) {
                d0 += qs[e] * ks[e];
                d1 += qs[e + 1u] * ks[e + 1u];
                d2 += qs[e + 2u] * ks[e + 2u];
                d3 += qs[e + 3u] * ks[e + 3u];
            }
        } else {
            sidx = slot(pos);
            let b = (kvh * p.cap + sidx) * p.d_qk;
            for (var e = 0u; e < p.d_qk; e += 4u) {
                let k0 = kc[b + e];
                let k1 = kc[b + e + 1u];
                let k2 = kc[b + e + 2u];
                let k3 = kc[b + e + 3u];
                d0 += qs[e] * k0;
                d1 += qs[e + 1u] * k1;
                d2 += qs[e + 2u] * k2;
                d3 += qs[e + 3u] * k3;
            }
        }
        s = ((d0 + d1) + (d2 + d3)) * p.scale;
    }
    sl[li] = sidx;
    red[li] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = max(red[li], red[li + st]); }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    var pj = 0.0;
    if (j < vis.z) { pj = exp(s - m); }
    pr[li] = pj;
    red[li] = pj;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = red[li] + red[li + st]; }
        workgroupBarrier();
    }
    let l = red[0];
    let nk = min(WG, vis.z - kb);
    let stride = 2u + p.d_v;
    let ob = (h * p.n_splits + split) * stride;
    if (li == 0u) {
        part[ob] = m;
        part[ob + 1u] = l;
    }
    for (var e = li; e < p.d_v; e += WG) {
        var a0 = 0.0;
        var a1 = 0.0;
        var jj = 0u;
        for (; jj + 1u < nk; jj += 2u) {
            var v0: f32;
            var v1: f32;
            if (sl[jj] == 0xffffffffu) { v0 = pbuf[p.v_col + kvh * p.d_v + e]; } else { v0 = vc[(kvh * p.cap + sl[jj]) * p.d_v + e]; }
            if (sl[jj + 1u] == 0xffffffffu) { v1 = pbuf[p.v_col + kvh * p.d_v + e]; } else { v1 = vc[(kvh * p.cap + sl[jj + 1u]) * p.d_v + e]; }
            a0 += pr[jj] * v0;
            a1 += pr[jj + 1u] * v1;
        }
        if (jj < nk) {
            var v0: f32;
            if (sl[jj] == 0xffffffffu) { v0 = pbuf[p.v_col + kvh * p.d_v + e]; } else { v0 = vc[(kvh * p.cap + sl[jj]) * p.d_v + e]; }
            a0 += pr[jj] * v0;
        }
        part[ob + 2u + e] = a0 + a1;
    }
}
#endif
