// Attention for one decode step, split over the keys (flash-decoding), with RoPE on q and the
// KV store fused in.
//
// Default entry (split): one workgroup of 256 threads per (query head, block of 64 visible keys). The visible
// keys are the meta slots plus the text positions [lo, q] (lo from the sliding window; the
// reference decode window is W - 1). In a KV-owning layer (self_kv = 1) the current position's
// key and value come straight from the in_proj output (key rotated here) and the first query
// head of each KV group writes them to the cache slot of q, which no other workgroup reads (the
// ring is longer than the window). Each workgroup writes a partial result for its block:
// part[h, s] = (block max m, sum l of exp(score - m), sum of exp(score - m) * v).
// Grid: (n_heads, n_splits, 1); splits past the last visible key write nothing.
// Define CPU_SPLIT: the split entry for CPU adapters (64 threads, one key per thread).
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
// kc: [n_kv_heads, cap, d_qk / 4] vec4<f32> keys (post-RoPE); d_qk % 4 == 0.
@group(0) @binding(4) var<storage, read_write> kc: array<vec4<f32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec4<f32> values; d_v % 4 == 0.
@group(0) @binding(5) var<storage, read_write> vc: array<vec4<f32>>;
#endif

const WG: u32 = 64u;  // threads of the combine and CPU_SPLIT entries
const KB: u32 = 64u;  // keys per split block
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
var<workgroup> wsplit: array<f32, 256>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let vis = visible(p.pos);
    let used = min((vis.z + KB - 1u) / KB, 256u);
    let stride = 2u + p.d_v;
    let base = h * p.n_splits * stride;
    var m = NEG;
    for (var s = li; s < used; s += WG) { m = max(m, part[base + s * stride]); }
    red[li] = m;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = max(red[li], red[li + st]); }
        workgroupBarrier();
    }
    let gm = red[0];
    workgroupBarrier();
    var l = 0.0;
    for (var s = li; s < used; s += WG) {
        let w = exp(part[base + s * stride] - gm);
        wsplit[s] = w;
        l += w * part[base + s * stride + 1u];
    }
    red[li] = l;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (li < st) { red[li] = red[li] + red[li + st]; }
        workgroupBarrier();
    }
    let gl = red[0];
    for (var e = li; e < p.d_v; e += WG) {
        var a0 = 0.0;
        var a1 = 0.0;
        var a2 = 0.0;
        var a3 = 0.0;
        var s = 0u;
        for (; s + 3u < used; s += 4u) {
            a0 += wsplit[s] * part[base + s * stride + 2u + e];
            a1 += wsplit[s + 1u] * part[base + (s + 1u) * stride + 2u + e];
            a2 += wsplit[s + 2u] * part[base + (s + 2u) * stride + 2u + e];
            a3 += wsplit[s + 3u] * part[base + (s + 3u) * stride + 2u + e];
        }
        for (; s < used; s++) { a0 += wsplit[s] * part[base + s * stride + 2u + e]; }
        out[h * p.d_v + e] = ((a0 + a1) + (a2 + a3)) / gl;
    }
}
#else
// Shared by both split entries: q of head h (and, in a KV-owning layer, this step's key)
// rotated into workgroup memory; the first query head of a KV group writes this step's key and
// value to the cache slot of q (once, split 0). `threads` is the workgroup size. Contains a
// barrier: call from uniform control flow.
var<workgroup> qs: array<f32, 256>;
var<workgroup> ks: array<f32, 256>;

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

fn rope_and_store_kv(h: u32, split: u32, li: u32, threads: u32) {
    let q = p.pos;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let half = p.d_qk / 2u;
    let self_slot = slot(q);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    for (var e = li; e < half; e += threads) {
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
    // The first query head of a KV group stores this step's key and value (once, split 0).
    if (p.self_kv != 0u && split == 0u && h % (p.n_heads / p.n_kv_heads) == 0u) {
        for (var e4 = li; e4 < dq4; e4 += threads) {
            kc[(kvh * p.cap + self_slot) * dq4 + e4] = vec4<f32>(ks[4u * e4], ks[4u * e4 + 1u], ks[4u * e4 + 2u], ks[4u * e4 + 3u]);
        }
        for (var e4 = li; e4 < dv4; e4 += threads) {
            let vb = p.v_col + kvh * p.d_v + 4u * e4;
            vc[(kvh * p.cap + self_slot) * dv4 + e4] = vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]);
        }
    }
}

#ifdef CPU_SPLIT
// Split entry for CPU adapters (lavapipe, SwiftShader), which run each workgroup barrier as a
// context switch per invocation: 64 threads, one key each, tree reductions. Same partials.
var<workgroup> pr: array<f32, 64>;
var<workgroup> sl: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * KB;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    if (kb >= vis.z) { return; }
    rope_and_store_kv(h, split, li, WG);
    let j = kb + li;
    var s = NEG;
    var sidx = 0u;
    if (j < vis.z) {
        var pos = j;
        if (j >= vis.x) { pos = vis.y + (j - vis.x); }
        var d = vec4<f32>(0.0);
        if (p.self_kv != 0u && pos == q) {
            sidx = 0xffffffffu;
            for (var e = 0u; e < p.d_qk; e += 4u) {
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * vec4<f32>(ks[e], ks[e + 1u], ks[e + 2u], ks[e + 3u]);
            }
        } else {
            sidx = slot(pos);
            let b = (kvh * p.cap + sidx) * dq4;
            var e4 = 0u;
            for (; e4 + 1u < dq4; e4 += 2u) {
                let k0 = kc[b + e4];
                let k1 = kc[b + e4 + 1u];
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * k0;
                d += vec4<f32>(qs[e + 4u], qs[e + 5u], qs[e + 6u], qs[e + 7u]) * k1;
            }
            if (e4 < dq4) {
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * kc[b + e4];
            }
        }
        s = ((d.x + d.y) + (d.z + d.w)) * p.scale;
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
    // P·V: thread li owns dims 4*(li % dv4).. of keys with index ≡ li / dv4 (mod groups);
    // the groups' partial sums meet in workgroup memory.
    let groups = max(WG / max(dv4, 1u), 1u);
    let g = li / max(dv4, 1u);
    let e4 = li % max(dv4, 1u);
    var acc = vec4<f32>(0.0);
    if (g < groups && e4 < dv4) {
        for (var jj = g; jj < nk; jj += groups) {
            var v: vec4<f32>;
            if (sl[jj] == 0xffffffffu) {
                let vb = p.v_col + kvh * p.d_v + 4u * e4;
                v = vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]);
            } else {
                v = vc[(kvh * p.cap + sl[jj]) * dv4 + e4];
            }
            acc += pr[jj] * v;
        }
    }
    workgroupBarrier();
    // Sum the groups: reuse qs/ks (256 + 256 floats) as scratch for [groups][d_v].
    if (g < groups && e4 < dv4 && g * p.d_v + 4u * e4 + 3u < 256u) {
        qs[g * p.d_v + 4u * e4] = acc.x;
        qs[g * p.d_v + 4u * e4 + 1u] = acc.y;
        qs[g * p.d_v + 4u * e4 + 2u] = acc.z;
        qs[g * p.d_v + 4u * e4 + 3u] = acc.w;
    }
    workgroupBarrier();
    for (var e = li; e < p.d_v; e += WG) {
        var a = 0.0;
        for (var gg = 0u; gg < groups && gg * p.d_v + e < 256u; gg++) { a += qs[gg * p.d_v + e]; }
        part[ob + 2u + e] = a;
    }
}
#else
// Split entry: 256 threads per block of KB keys. Scores: 4 threads per key, each a strided
// quarter of the q.k dot product. P.V: 256 / (d_v / 4) groups of lanes, each lane one vec4 of
// the value, each group a share of the block's keys with its loads issued together; the groups
// meet in workgroup memory. d_qk <= 256, d_v <= 1024.
const SWG: u32 = 256u;
var<workgroup> sq: array<f32, 256>;         // [KB keys][4] partial scores
var<workgroup> pr: array<f32, 64>;          // [KB] exp(score - block max)
var<workgroup> sl: array<u32, 64>;          // [KB] cache slot of each key (0xffffffff = this step's key)
var<workgroup> pv: array<vec4<f32>, 256>;   // [groups][d_v / 4] partial P.V

fn value4(kvh: u32, jj: u32, e4: u32, dv4: u32) -> vec4<f32> {
    if (sl[jj] == 0xffffffffu) {
        let vb = p.v_col + kvh * p.d_v + 4u * e4;
        return vec4<f32>(pbuf[vb], pbuf[vb + 1u], pbuf[vb + 2u], pbuf[vb + 3u]);
    }
    return vc[(kvh * p.cap + sl[jj]) * dv4 + e4];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let split = wid.y;
    let q = p.pos;
    let vis = visible(q);
    let kb = split * KB;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    if (kb >= vis.z) { return; }
    rope_and_store_kv(h, split, li, SWG);
    // Scores: key jl of the block, quarter qd of its dimensions (vec4s qd, qd + 4, ...).
    let jl = li / 4u;
    let qd = li % 4u;
    let j = kb + jl;
    var d = vec4<f32>(0.0);
    var sidx = 0u;
    if (j < vis.z) {
        var pos = j;
        if (j >= vis.x) { pos = vis.y + (j - vis.x); }
        if (p.self_kv != 0u && pos == q) {
            sidx = 0xffffffffu;
            for (var e4 = qd; e4 < dq4; e4 += 4u) {
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * vec4<f32>(ks[e], ks[e + 1u], ks[e + 2u], ks[e + 3u]);
            }
        } else {
            sidx = slot(pos);
            let b = (kvh * p.cap + sidx) * dq4;
            var e4 = qd;
            for (; e4 + 4u < dq4; e4 += 8u) {
                let k0 = kc[b + e4];
                let k1 = kc[b + e4 + 4u];
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * k0;
                d += vec4<f32>(qs[e + 16u], qs[e + 17u], qs[e + 18u], qs[e + 19u]) * k1;
            }
            if (e4 < dq4) {
                let e = 4u * e4;
                d += vec4<f32>(qs[e], qs[e + 1u], qs[e + 2u], qs[e + 3u]) * kc[b + e4];
            }
        }
    }
    sq[li] = (d.x + d.y) + (d.z + d.w);
    if (qd == 0u) { sl[jl] = sidx; }
    workgroupBarrier();
    let nk = min(KB, vis.z - kb);
    // Every thread reads the block's scores (broadcast reads, no reduction barriers).
    var m = NEG;
    for (var jj = 0u; jj < nk; jj++) {
        m = max(m, ((sq[4u * jj] + sq[4u * jj + 1u]) + (sq[4u * jj + 2u] + sq[4u * jj + 3u])) * p.scale);
    }
    if (li < KB) {
        var pj = 0.0;
        if (li < nk) {
            pj = exp(((sq[4u * li] + sq[4u * li + 1u]) + (sq[4u * li + 2u] + sq[4u * li + 3u])) * p.scale - m);
        }
        pr[li] = pj;
    }
    workgroupBarrier();
    let stride = 2u + p.d_v;
    let ob = (h * p.n_splits + split) * stride;
    if (li == 0u) {
        var l = 0.0;
        for (var jj = 0u; jj < nk; jj++) { l += pr[jj]; }
        part[ob] = m;
        part[ob + 1u] = l;
    }
    // P.V: lane e4 of group g takes keys g, g + groups, ... four at a time.
    let groups = max(SWG / max(dv4, 1u), 1u);
    let g = li / max(dv4, 1u);
    let e4 = li % max(dv4, 1u);
    var acc = vec4<f32>(0.0);
    if (g < groups && e4 < dv4) {
        var jj = g;
        for (; jj + 3u * groups < nk; jj += 4u * groups) {
            let v0 = value4(kvh, jj, e4, dv4);
            let v1 = value4(kvh, jj + groups, e4, dv4);
            let v2 = value4(kvh, jj + 2u * groups, e4, dv4);
            let v3 = value4(kvh, jj + 3u * groups, e4, dv4);
            acc += (pr[jj] * v0 + pr[jj + groups] * v1) + (pr[jj + 2u * groups] * v2 + pr[jj + 3u * groups] * v3);
        }
        for (; jj < nk; jj += groups) { acc += pr[jj] * value4(kvh, jj, e4, dv4); }
        pv[g * dv4 + e4] = acc;
    }
    workgroupBarrier();
    for (var f = li; f < dv4; f += SWG) {
        var a = vec4<f32>(0.0);
        for (var gg = 0u; gg < groups; gg++) { a += pv[gg * dv4 + f]; }
        part[ob + 2u + 4u * f] = a.x;
        part[ob + 3u + 4u * f] = a.y;
        part[ob + 4u + 4u * f] = a.z;
        part[ob + 5u + 4u * f] = a.w;
    }
}
#endif
#endif
