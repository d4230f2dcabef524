// Hybrid-head attention branch: causal GQA attention of each query over the KV cache,
// with the sliding-window mask and always-visible meta tokens:
//   key k visible to query q  iff  k <= q  and (k < n_meta  or  q - k <= window)
// (window = 0xffffffff for global layers). Prefill uses window = W, a reference decode step W - 1.
// Flash style over blocks of 64 keys: no [T, T] score matrix exists.
// KV consumers pass their producer's cache.
// Define KV_F16: the cache holds f16, two per u32 word (see the bindings). `main` widens keys and
// values to f32 as they are loaded and keeps all arithmetic f32 (online softmax); `main_coop`
// (define COOP, below) multiplies f16 fragments on the tensor cores, with f32 accumulation.
// Single-token decode steps use attention_decode.wgsl (split over the keys).

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    d_qk: u32,
    d_v: u32,
    q_off: u32,      // element offset of q of row 0 in the in_proj output
    q_stride: u32,   // in_proj output row width
    out_off: u32,
    out_stride: u32, // attention output row width (n_heads * d_v)
    pos0: u32,       // absolute position of row 0
    n_meta: u32,
    ring: u32,       // text slots of the cache (ring length)
    cap: u32,        // slots per KV head = n_meta + ring
    window: u32,     // max q - k for text keys; 0xffffffff = global
    scale: f32,      // 1 / sqrt(d_qk)
    k_col: u32,      // unused here (layout shared with the Rust AttentionParams)
    v_col: u32,      // unused
    self_kv: u32,    // unused
}

@group(0) @binding(0) var<uniform> p: Params;
// pbuf: [rows, q_stride] f32 in_proj output, RoPE already applied to q.
@group(0) @binding(1) var<storage, read> pbuf: array<f32>;
#ifdef KV_F16
// kc: [n_kv_heads, cap, d_qk / 4] vec2<u32> keys (d_qk % 4 == 0): [n_kv_heads, cap, d_qk / 2] u32,
// two f16 per word (element 2i in the low half).
@group(0) @binding(2) var<storage, read> kc: array<vec2<u32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec2<u32> values (d_v % 4 == 0), two f16 per word.
@group(0) @binding(3) var<storage, read> vc: array<vec2<u32>>;
fn kld(i: u32) -> vec4<f32> { let w = kc[i]; return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
fn vld(i: u32) -> vec4<f32> { let w = vc[i]; return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
#else
// kc: [n_kv_heads, cap, d_qk / 4] vec4<f32> keys (d_qk % 4 == 0).
@group(0) @binding(2) var<storage, read> kc: array<vec4<f32>>;
// vc: [n_kv_heads, cap, d_v / 4] vec4<f32> values (d_v % 4 == 0).
@group(0) @binding(3) var<storage, read> vc: array<vec4<f32>>;
fn kld(i: u32) -> vec4<f32> { return kc[i]; }
fn vld(i: u32) -> vec4<f32> { return vc[i]; }
#endif
// out: [rows, out_stride] f32, heads concatenated (head h at h * d_v).
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// One workgroup of 256 threads per (head, block of QB = 8 consecutive query rows), so each key
// and value loaded serves 8 queries (the rest of the reuse comes from L1). The block's queries
// walk one common key list: the meta slots visible to its last query, then text positions from
// the first query's window start to the last query; each (query, key) pair is masked with the
// query's own visibility. Per block of KB keys: 2 scores per thread (one key, queries i and
// i + 4, eight vec4 key loads in flight), an online softmax per query row (32 lanes per query;
// with SUBGROUP32 they are one subgroup, and the block's max and sum are subgroup reductions),
// then P.V with each lane owning one vec4 of the value (d_v <= 128), eight value rows in
// flight. d_qk <= 256.
// Grid: (n_heads, ceil(rows / QB), 1).
const WG: u32 = 256u;
const KB: u32 = 64u;
const QB: u32 = 8u;
const NEG: f32 = -3.0e38;
var<workgroup> qs: array<vec4<f32>, 512>;   // [QB][d_qk / 4] queries
var<workgroup> ps: array<f32, 512>;         // [QB][KB] scores, then probabilities
var<workgroup> kp: array<u32, 64>;          // [KB] position of each key of the block
var<workgroup> sl: array<u32, 64>;          // [KB] its cache slot

fn slot(pos: u32) -> u32 {
    if (pos < p.n_meta) { return pos; }
    return p.n_meta + (pos - p.n_meta) % p.ring;
}

// First visible text position of query position q.
fn text_lo(q: u32) -> u32 {
    if (p.window != 0xffffffffu && q > p.window) { return max(p.n_meta, q - p.window); }
    return p.n_meta;
}

fn visible(q: u32, pos: u32) -> bool {
    if (pos > q) { return false; }
    if (pos < p.n_meta) { return true; }
    return pos >= text_lo(q);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let t0 = wid.y * QB;
    let nq = min(QB, p.rows - t0);
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let dq4 = p.d_qk / 4u;
    let dv4 = p.d_v / 4u;
    for (var i = li; i < QB * dq4; i += WG) {
        let qi = min(i / dq4, nq - 1u);
        let e = 4u * (i % dq4);
        let qb = p.q_off + (t0 + qi) * p.q_stride + h * p.d_qk + e;
        qs[i] = vec4<f32>(pbuf[qb], pbuf[qb + 1u], pbuf[qb + 2u], pbuf[qb + 3u]);
    }
    let q_first = p.pos0 + t0;
    let q_last = q_first + nq - 1u;
    let n_meta_vis = min(p.n_meta, q_last + 1u);
    let lo = text_lo(q_first);
    var n_text = 0u;
    if (q_last >= lo) { n_text = q_last + 1u - lo; }
    let n_keys = n_meta_vis + n_text;

    // Softmax and P.V: query row qr of the block, lane ln of its 32.
    let qr = li / 32u;
    let ln = li % 32u;
    let q_mine = q_first + min(qr, nq - 1u);
    var m = NEG;
    var l = 0.0;
    var acc0 = vec4<f32>(0.0);
    for (var kb = 0u; kb < n_keys; kb += KB) {
        workgroupBarrier();
        if (li < KB) {
            let j = kb + li;
            var pos = 0xffffffffu;
            if (j < n_keys) {
                pos = j;
                if (j >= n_meta_vis) { pos = lo + (j - n_meta_vis); }
            }
            kp[li] = pos;
            sl[li] = slot(min(pos, q_last));
        }
        workgroupBarrier();
        // Scores: this thread's key jl = li % KB for queries li / KB and li / KB + 4 (QB = 8,
        // WG = 4 KB), so each key row is loaded once for both.
        {
            let jl = li % KB;
            let qa = li / KB;
            let qb2 = qa + 4u;
            let pos = kp[jl];
            var sa = NEG;
            var sb = NEG;
            let va = qa < nq && pos != 0xffffffffu && visible(q_first + qa, pos);
            let vb2 = qb2 < nq && pos != 0xffffffffu && visible(q_first + qb2, pos);
            if (va || vb2) {
                let b = (kvh * p.cap + sl[jl]) * dq4;
                var da = vec4<f32>(0.0);
                var db = vec4<f32>(0.0);
                var f = 0u;
                for (; f + 7u < dq4; f += 8u) {
                    let k0 = kld(b + f);
                    let k1 = kld(b + f + 1u);
                    let k2 = kld(b + f + 2u);
                    let k3 = kld(b + f + 3u);
                    let k4 = kld(b + f + 4u);
                    let k5 = kld(b + f + 5u);
                    let k6 = kld(b + f + 6u);
                    let k7 = kld(b + f + 7u);
                    let oa = qa * dq4 + f;
                    let ob = qb2 * dq4 + f;
                    da += ((qs[oa] * k0 + qs[oa + 1u] * k1) + (qs[oa + 2u] * k2 + qs[oa + 3u] * k3))
                        + ((qs[oa + 4u] * k4 + qs[oa + 5u] * k5) + (qs[oa + 6u] * k6 + qs[oa + 7u] * k7));
                    db += ((qs[ob] * k0 + qs[ob + 1u] * k1) + (qs[ob + 2u] * k2 + qs[ob + 3u] * k3))
                        + ((qs[ob + 4u] * k4 + qs[ob + 5u] * k5) + (qs[ob + 6u] * k6 + qs[ob + 7u] * k7));
                }
                for (; f < dq4; f++) {
                    let kv = kld(b + f);
                    da += qs[qa * dq4 + f] * kv;
                    db += qs[qb2 * dq4 + f] * kv;
                }
                if (va) { sa = ((da.x + da.y) + (da.z + da.w)) * p.scale; }
                if (vb2) { sb = ((db.x + db.y) + (db.z + db.w)) * p.scale; }
            }
            ps[li] = sa;
            ps[li + WG] = sb;
        }
        workgroupBarrier();
        let nk = min(KB, n_keys - kb);
#ifdef SUBGROUP32
        // The 32 lanes of query row qr are one subgroup: each holds two of the row's scores,
        // and the block's max and sum are subgroup reductions (no serial pass over the row).
        let s0 = ps[qr * KB + ln];
        let s1 = ps[qr * KB + ln + 32u];
        let bm = subgroupMax(max(select(NEG, s0, ln < nk), select(NEG, s1, ln + 32u < nk)));
        let nm = max(m, bm);
        let corr = exp(m - nm);
        // Probabilities of this row's keys (masked keys exactly 0).
        var p0 = 0.0;
        var p1 = 0.0;
        if (ln < nk && s0 > NEG) { p0 = exp(s0 - nm); }
        if (ln + 32u < nk && s1 > NEG) { p1 = exp(s1 - nm); }
        ps[qr * KB + ln] = p0;
        ps[qr * KB + ln + 32u] = p1;
        let bs = subgroupAdd(p0 + p1);
        workgroupBarrier();
#else
        var bm = NEG;
        for (var jj = 0u; jj < nk; jj++) { bm = max(bm, ps[qr * KB + jj]); }
        let nm = max(m, bm);
        let corr = exp(m - nm);
        workgroupBarrier();
        // Probabilities of this row's keys (masked keys exactly 0).
        for (var jj = ln; jj < KB; jj += 32u) {
            let sv = ps[qr * KB + jj];
            var pj = 0.0;
            if (jj < nk && sv > NEG) { pj = exp(sv - nm); }
            ps[qr * KB + jj] = pj;
        }
        workgroupBarrier();
        var bs = 0.0;
        for (var jj = 0u; jj < nk; jj++) { bs += ps[qr * KB + jj]; }
#endif
        l = l * corr + bs;
        m = nm;
        var a0 = acc0 * corr;
        let vb = kvh * p.cap;
        if (ln < dv4) {
            var jj = 0u;
            // Eight value rows in flight per round.
            for (; jj + 7u < nk; jj += 8u) {
                let o = qr * KB + jj;
                let v0 = vld((vb + sl[jj]) * dv4 + ln);
                let v1 = vld((vb + sl[jj + 1u]) * dv4 + ln);
                let v2 = vld((vb + sl[jj + 2u]) * dv4 + ln);
                let v3 = vld((vb + sl[jj + 3u]) * dv4 + ln);
                let v4 = vld((vb + sl[jj + 4u]) * dv4 + ln);
                let v5 = vld((vb + sl[jj + 5u]) * dv4 + ln);
                let v6 = vld((vb + sl[jj + 6u]) * dv4 + ln);
                let v7 = vld((vb + sl[jj + 7u]) * dv4 + ln);
                a0 += ((ps[o] * v0 + ps[o + 1u] * v1) + (ps[o + 2u] * v2 + ps[o + 3u] * v3))
                    + ((ps[o + 4u] * v4 + ps[o + 5u] * v5) + (ps[o + 6u] * v6 + ps[o + 7u] * v7));
            }
            for (; jj + 3u < nk; jj += 4u) {
                let v0 = vld((vb + sl[jj]) * dv4 + ln);
                let v1 = vld((vb + sl[jj + 1u]) * dv4 + ln);
                let v2 = vld((vb + sl[jj + 2u]) * dv4 + ln);
                let v3 = vld((vb + sl[jj + 3u]) * dv4 + ln);
                a0 += (ps[qr * KB + jj] * v0 + ps[qr * KB + jj + 1u] * v1) + (ps[qr * KB + jj + 2u] * v2 + ps[qr * KB + jj + 3u] * v3);
            }
            for (; jj < nk; jj++) { a0 += ps[qr * KB + jj] * vld((vb + sl[jj]) * dv4 + ln); }
        }
        acc0 = a0;
    }
    if (qr < nq) {
        let ob = p.out_off + (t0 + qr) * p.out_stride + h * p.d_v;
        if (ln < dv4) {
            let a = acc0 / l;
            out[ob + 4u * ln] = a.x;
            out[ob + 4u * ln + 1u] = a.y;
            out[ob + 4u * ln + 2u] = a.z;
            out[ob + 4u * ln + 3u] = a.w;
        }
    }
}

#ifdef COOP
// main_coop (define COOP with KV_F16): the same attention on cooperative matrices (tensor cores),
// where the adapter has 16x16x16 f16 fragments with f32 accumulators in subgroups of 32.
// Queries (pre-scaled by `scale`) and probabilities are rounded to f16 for the products; the
// keys and values are the f16 cache's own; scores, softmax statistics and P.V accumulate in f32.
// d_qk <= 64 and d_v <= 128 (multiples of 4; the fragments past them see zeros).
// One workgroup of 8 subgroups per (head, block of CQB = 32 query rows); keys in blocks of
// CKB = 64 staged in workgroup memory, over the same key list as `main`. Two passes over it:
//   1. S = Q.K^T per block (subgroup s computes the 16 x 16 fragment at query rows 16 (s / 4),
//      keys 16 (s % 4)), then each query row's running max and softmax denominator (8 threads
//      per row, 8 keys each, combined with subgroup shuffles);
//   2. S again, P = exp(S - max) / denominator (exactly 0 where masked) as f16, and O += P.V
//      (subgroup s owns the fragments at rows 16 (s / 4), value columns 32 (s % 4) .. + 32),
//      so the accumulators never need rescaling.
// Grid: (n_heads, ceil(rows / 32), 1).
const CQB: u32 = 32u;
const CKB: u32 = 64u;
const CDQ: u32 = 64u;
const CDV: u32 = 128u;
// Row strides in f16 of the staged tiles: 8 past the data, so that the 16 rows a fragment load
// reads start in different shared-memory banks.
const SQ: u32 = CDQ + 8u;
const SV: u32 = CDV + 8u;
const SP: u32 = CKB + 8u;
// kh: [CKB keys][SQ] f16 keys, row-major (= K^T column-major: fragment B of S = Q.K^T).
var<workgroup> kh: array<f16, CKB * SQ>;
// vh: [CKB keys][SV] f16 values, row-major (fragment B of O = P.V).
var<workgroup> vh: array<f16, CKB * SV>;
// ph: [CQB query rows][SP] f16: the queries (d_qk columns, zeros to CDQ) until their fragments
// are loaded, then each block's probabilities (fragment A of P.V).
var<workgroup> ph: array<f16, CQB * SP>;
// sf: [CQB][CKB] f32 scores of a block; at the end, half of the output tile at a time.
var<workgroup> sf: array<f32, CQB * CKB>;
// ckp: [CKB] position of each key of the block (0xffffffff past the key list).
var<workgroup> ckp: array<u32, 64>;
// cz: zeros, where the accumulators start from.
var<workgroup> cz: array<f32, 256>;

// `visible(q, pos) && pos != 0xffffffff` as one branch-free expression (the masks below are
// selects, not branches).
fn coop_visible(q: u32, pos: u32) -> bool {
    let lo = select(p.n_meta, max(p.n_meta, q - p.window), p.window != 0xffffffffu & q > p.window);
    return (pos != 0xffffffffu) & (pos <= q) & ((pos < p.n_meta) | (pos >= lo));
}

fn f16x4(w: vec2<u32>) -> vec4<f16> {
    return vec4<f16>(vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)));
}

// The workgroup's key list: n_keys entries, the first n_meta_vis of them meta slots, then text
// positions from lo; its KV head.
struct KeyList {
    n_keys: u32,
    n_meta_vis: u32,
    lo: u32,
    kvh: u32,
}

// Key-list entry j: its position (0xffffffff past the list).
fn coop_key_pos(j: u32, kl: KeyList) -> u32 {
    if (j >= kl.n_keys) { return 0xffffffffu; }
    if (j < kl.n_meta_vis) { return j; }
    return kl.lo + (j - kl.n_meta_vis);
}

// Item i of a key block starting at list entry kb: four f16 of key row i / 16, dimensions
// 4 (i % 16) .. (zeros past the list and past d_qk), as two u32 words.
fn coop_key_item(i: u32, kb: u32, kl: KeyList) -> vec2<u32> {
    let e4 = i % (CDQ / 4u);
    let pos = coop_key_pos(kb + i / (CDQ / 4u), kl);
    if (pos == 0xffffffffu || e4 >= p.d_qk / 4u) { return vec2<u32>(0u); }
    return kc[(kl.kvh * p.cap + slot(pos)) * (p.d_qk / 4u) + e4];
}

// The same for values: four f16 of value row i / 32, columns 4 (i % 32) ...
fn coop_value_item(i: u32, kb: u32, kl: KeyList) -> vec2<u32> {
    let e4 = i % (CDV / 4u);
    let pos = coop_key_pos(kb + i / (CDV / 4u), kl);
    if (pos == 0xffffffffu || e4 >= p.d_v / 4u) { return vec2<u32>(0u); }
    return vc[(kl.kvh * p.cap + slot(pos)) * (p.d_v / 4u) + e4];
}

fn coop_put_key(i: u32, w: vec2<u32>) {
    let v = f16x4(w);
    let o = (i / (CDQ / 4u)) * SQ + 4u * (i % (CDQ / 4u));
    kh[o] = v.x;
    kh[o + 1u] = v.y;
    kh[o + 2u] = v.z;
    kh[o + 3u] = v.w;
}

fn coop_put_value(i: u32, w: vec2<u32>) {
    let v = f16x4(w);
    let o = (i / (CDV / 4u)) * SV + 4u * (i % (CDV / 4u));
    vh[o] = v.x;
    vh[o + 1u] = v.y;
    vh[o + 2u] = v.z;
    vh[o + 3u] = v.w;
}

// A thread's share of a key block (items li + 256 u, u = 0..3), held in registers between its
// load and its staging (a struct, not an array: NVIDIA's compiler keeps indexed private
// arrays in local memory).
struct CoopKeys {
    a: vec2<u32>,
    b: vec2<u32>,
    c: vec2<u32>,
    d: vec2<u32>,
}

// A thread's share of a value block (items li + 256 u, u = 0..7).
struct CoopValues {
    a: vec2<u32>,
    b: vec2<u32>,
    c: vec2<u32>,
    d: vec2<u32>,
    e: vec2<u32>,
    f: vec2<u32>,
    g: vec2<u32>,
    h: vec2<u32>,
}

fn coop_load_keys(li: u32, kb: u32, kl: KeyList) -> CoopKeys {
    return CoopKeys(
        coop_key_item(li, kb, kl),
        coop_key_item(li + 256u, kb, kl),
        coop_key_item(li + 512u, kb, kl),
        coop_key_item(li + 768u, kb, kl),
    );
}

fn coop_load_values(li: u32, kb: u32, kl: KeyList) -> CoopValues {
    return CoopValues(
        coop_value_item(li, kb, kl),
        coop_value_item(li + 256u, kb, kl),
        coop_value_item(li + 512u, kb, kl),
        coop_value_item(li + 768u, kb, kl),
        coop_value_item(li + 1024u, kb, kl),
        coop_value_item(li + 1280u, kb, kl),
        coop_value_item(li + 1536u, kb, kl),
        coop_value_item(li + 1792u, kb, kl),
    );
}

// Stages key block kb: the positions into ckp, this thread's key items into kh. Call between
// barriers.
fn coop_put_keys(li: u32, kb: u32, kl: KeyList, k: CoopKeys) {
    if (li < CKB) { ckp[li] = coop_key_pos(kb + li, kl); }
    coop_put_key(li, k.a);
    coop_put_key(li + 256u, k.b);
    coop_put_key(li + 512u, k.c);
    coop_put_key(li + 768u, k.d);
}

fn coop_put_values(li: u32, v: CoopValues) {
    coop_put_value(li, v.a);
    coop_put_value(li + 256u, v.b);
    coop_put_value(li + 512u, v.c);
    coop_put_value(li + 768u, v.d);
    coop_put_value(li + 1024u, v.e);
    coop_put_value(li + 1280u, v.f);
    coop_put_value(li + 1536u, v.g);
    coop_put_value(li + 1792u, v.h);
}

// Writes the half c of the output tile staged in sf (see the end of main_coop) into `out`.
fn coop_store_out(li: u32, t0: u32, nq: u32, h: u32, c: u32) {
    for (var i = li; i < CQB * CKB; i += 256u) {
        let r = i / CKB;
        let col = ((i % CKB) / 16u) * 32u + 16u * c + i % 16u;
        if (r < nq && col < p.d_v) {
            out[p.out_off + (t0 + r) * p.out_stride + h * p.d_v + col] = sf[i];
        }
    }
}

@compute @workgroup_size(256)
fn main_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32, @builtin(subgroup_id) sg: u32) {
    let h = wid.x;
    let t0 = wid.y * CQB;
    let nq = min(CQB, p.rows - t0);
    let kvh = h / (p.n_heads / p.n_kv_heads);
    cz[li] = 0.0;
    // Queries times scale, as f16 (zero past nq and d_qk): CQB rows x CDQ / 4 items, 2 per thread.
    for (var i = li; i < CQB * (CDQ / 4u); i += 256u) {
        let r = i / (CDQ / 4u);
        let e = 4u * (i % (CDQ / 4u));
        var v = vec4<f32>(0.0);
        if (r < nq && e < p.d_qk) {
            let qb = p.q_off + (t0 + r) * p.q_stride + h * p.d_qk + e;
            v = vec4<f32>(pbuf[qb], pbuf[qb + 1u], pbuf[qb + 2u], pbuf[qb + 3u]) * p.scale;
        }
        let o = r * SP + e;
        let w = vec4<f16>(v);
        ph[o] = w.x;
        ph[o + 1u] = w.y;
        ph[o + 2u] = w.z;
        ph[o + 3u] = w.w;
    }
    let q_first = p.pos0 + t0;
    let q_last = q_first + nq - 1u;
    let n_meta_vis = min(p.n_meta, q_last + 1u);
    // (Branch-free, from uniform values only, so that naga sees the key loop below, which holds
    // the cooperative-matrix operations, as uniform control flow.)
    let lo = select(p.n_meta, max(p.n_meta, q_first - p.window), p.window != 0xffffffffu & q_first > p.window);
    let n_keys = n_meta_vis + select(0u, q_last + 1u - lo, q_last >= lo);
    workgroupBarrier();
    // This subgroup's query fragments (rows 16 (sg / 4) .., all of CDQ), kept for both passes.
    let fr = (sg / 4u) * 16u;
    let qa0 = coopLoadT<coop_mat16x16<f16, A>>(&ph[fr * SP], SP);
    let qa1 = coopLoadT<coop_mat16x16<f16, A>>(&ph[fr * SP + 16u], SP);
    let qa2 = coopLoadT<coop_mat16x16<f16, A>>(&ph[fr * SP + 32u], SP);
    let qa3 = coopLoadT<coop_mat16x16<f16, A>>(&ph[fr * SP + 48u], SP);
    let fk = (sg % 4u) * 16u;
    // Softmax statistics: thread li scans query row rr, keys 8 rj .. 8 rj + 8 of each block; the
    // row's 8 threads are consecutive lanes of one subgroup.
    let rr = li / 8u;
    let rj = (li % 8u) * 8u;
    let qpos = q_first + rr;
    let row_ok = rr < nq;
    var mrow = NEG;
    var lrow = 0.0;
    // (The two passes are two loops, not one loop over a pass index: naga would see a branch
    // on a loop variable as non-uniform control flow around the cooperative-matrix operations.)
    // Pass 1: the running max and denominator of each query row. Each thread stages items li +
    // 256 u of a key block (4 of keys, 8 of values); the next block's are loaded into registers
    // while the current one is multiplied.
    let kl = KeyList(n_keys, n_meta_vis, lo, kvh);
    var kn = coop_load_keys(li, 0u, kl);
    for (var kb = 0u; kb < n_keys; kb += CKB) {
        workgroupBarrier();
        coop_put_keys(li, kb, kl, kn);
        workgroupBarrier();
        // The next block (or pass 2's first) into registers.
        kn = coop_load_keys(li, select(kb + CKB, 0u, kb + CKB >= n_keys), kl);
        var s = coopLoadT<coop_mat16x16<f32, C>>(&cz[0], 16u);
        s = coopMultiplyAdd(qa0, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ], SQ), s);
        s = coopMultiplyAdd(qa1, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 16u], SQ), s);
        s = coopMultiplyAdd(qa2, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 32u], SQ), s);
        s = coopMultiplyAdd(qa3, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 48u], SQ), s);
        coopStoreT(s, &sf[fr * CKB + fk], CKB);
        workgroupBarrier();
        var bm = NEG;
        for (var u = 0u; u < 8u; u++) {
            let vis = row_ok & coop_visible(qpos, ckp[rj + u]);
            bm = max(bm, select(NEG, sf[rr * CKB + rj + u], vis));
        }
        bm = max(bm, subgroupShuffleXor(bm, 1u));
        bm = max(bm, subgroupShuffleXor(bm, 2u));
        bm = max(bm, subgroupShuffleXor(bm, 4u));
        let nm = max(mrow, bm);
        var bs = 0.0;
        for (var u = 0u; u < 8u; u++) {
            let vis = row_ok & coop_visible(qpos, ckp[rj + u]);
            bs += select(0.0, exp(sf[rr * CKB + rj + u] - nm), vis);
        }
        bs += subgroupShuffleXor(bs, 1u);
        bs += subgroupShuffleXor(bs, 2u);
        bs += subgroupShuffleXor(bs, 4u);
        lrow = lrow * exp(mrow - nm) + bs;
        mrow = nm;
    }
    // Pass 2: normalized probabilities and O = P.V.
    let inv = select(0.0, 1.0 / lrow, lrow > 0.0);
    let fv = (sg % 4u) * 32u;
    var o0 = coopLoadT<coop_mat16x16<f32, C>>(&cz[0], 16u);
    var o1 = o0;
    var vn = coop_load_values(li, 0u, kl);
    for (var kb = 0u; kb < n_keys; kb += CKB) {
        workgroupBarrier();
        coop_put_keys(li, kb, kl, kn);
        coop_put_values(li, vn);
        workgroupBarrier();
        if (kb + CKB < n_keys) {
            kn = coop_load_keys(li, kb + CKB, kl);
            vn = coop_load_values(li, kb + CKB, kl);
        }
        var s = coopLoadT<coop_mat16x16<f32, C>>(&cz[0], 16u);
        s = coopMultiplyAdd(qa0, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ], SQ), s);
        s = coopMultiplyAdd(qa1, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 16u], SQ), s);
        s = coopMultiplyAdd(qa2, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 32u], SQ), s);
        s = coopMultiplyAdd(qa3, coopLoad<coop_mat16x16<f16, B>>(&kh[fk * SQ + 48u], SQ), s);
        coopStoreT(s, &sf[fr * CKB + fk], CKB);
        workgroupBarrier();
        for (var u = 0u; u < 8u; u++) {
            let vis = row_ok & coop_visible(qpos, ckp[rj + u]);
            ph[rr * SP + rj + u] = f16(select(0.0, exp(sf[rr * CKB + rj + u] - mrow) * inv, vis));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < CKB; kk += 16u) {
            let a = coopLoadT<coop_mat16x16<f16, A>>(&ph[fr * SP + kk], SP);
            o0 = coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&vh[kk * SV + fv], SV), o0);
            o1 = coopMultiplyAdd(a, coopLoadT<coop_mat16x16<f16, B>>(&vh[kk * SV + fv + 16u], SV), o1);
        }
    }
    // The output tile, half at a time through sf: fragment o0 of every subgroup, then o1 (value
    // columns 32 (s % 4) + 16 c ..), each at sf rows 16 (s / 4), columns 16 (s % 4).
    workgroupBarrier();
    coopStoreT(o0, &sf[fr * CKB + fk], CKB);
    workgroupBarrier();
    coop_store_out(li, t0, nq, h, 0u);
    workgroupBarrier();
    coopStoreT(o1, &sf[fr * CKB + fk], CKB);
    workgroupBarrier();
    coop_store_out(li, t0, nq, h, 1u);
}
#endif
