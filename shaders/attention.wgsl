// Hybrid-head attention branch: causal GQA attention of each query over the KV cache,
// with the sliding-window mask and always-visible meta tokens:
//   key k visible to query q  iff  k <= q  and (k < n_meta  or  q - k <= window)
// (window = 0xffffffff for global layers). Prefill uses window = W, a reference decode step W - 1.
// Online softmax over blocks of 64 keys (flash style): no [T, T] score matrix exists.
// KV consumers pass their producer's cache.
// Define KV_F16: the cache holds f16, two per u32 word (see the bindings); keys and values are
// widened to f32 as they are loaded, and all arithmetic stays f32.
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
// ps: [QB][KB / 4] vec4: scores, then probabilities (key j of query row r at [r * KB / 4 + j / 4][j % 4]);
// read four keys at a time in P.V.
var<workgroup> ps: array<vec4<f32>, 128>;
var<workgroup> kp: array<u32, 64>;          // [KB] position of each key of the block
var<workgroup> sl: array<vec4<u32>, 16>;    // [KB / 4] its cache slot (key j at [j / 4][j % 4])

// Score / probability j of the flattened [QB][KB] block.
fn psr(j: u32) -> f32 { return ps[j / 4u][j % 4u]; }
fn psw(j: u32, v: f32) { ps[j / 4u][j % 4u] = v; }

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
            sl[li / 4u][li % 4u] = slot(min(pos, q_last));
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
                let b = (kvh * p.cap + sl[jl / 4u][jl % 4u]) * dq4;
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
            ps[li / 4u][li % 4u] = sa;
            ps[(li + WG) / 4u][li % 4u] = sb;
        }
        workgroupBarrier();
        let nk = min(KB, n_keys - kb);
#ifdef SUBGROUP32
        // The 32 lanes of query row qr are one subgroup: each holds two of the row's scores,
        // and the block's max and sum are subgroup reductions (no serial pass over the row).
        let s0 = psr(qr * KB + ln);
        let s1 = psr(qr * KB + ln + 32u);
        let bm = subgroupMax(max(select(NEG, s0, ln < nk), select(NEG, s1, ln + 32u < nk)));
        let nm = max(m, bm);
        let corr = exp(m - nm);
        // Probabilities of this row's keys (masked keys exactly 0).
        var p0 = 0.0;
        var p1 = 0.0;
        if (ln < nk && s0 > NEG) { p0 = exp(s0 - nm); }
        if (ln + 32u < nk && s1 > NEG) { p1 = exp(s1 - nm); }
        psw(qr * KB + ln, p0);
        psw(qr * KB + ln + 32u, p1);
        let bs = subgroupAdd(p0 + p1);
        workgroupBarrier();
#else
        var bm = NEG;
        for (var jj = 0u; jj < nk; jj++) { bm = max(bm, psr(qr * KB + jj)); }
        let nm = max(m, bm);
        let corr = exp(m - nm);
        workgroupBarrier();
        // Probabilities of this row's keys (masked keys exactly 0).
        for (var jj = ln; jj < KB; jj += 32u) {
            let sv = psr(qr * KB + jj);
            var pj = 0.0;
            if (jj < nk && sv > NEG) { pj = exp(sv - nm); }
            psw(qr * KB + jj, pj);
        }
        workgroupBarrier();
        var bs = 0.0;
        for (var jj = 0u; jj < nk; jj++) { bs += psr(qr * KB + jj); }
#endif
        l = l * corr + bs;
        m = nm;
        var a0 = acc0 * corr;
        let vb = kvh * p.cap;
        if (ln < dv4) {
            // Eight value rows in flight per round, their probabilities and slots read as two
            // vec4 each. Keys past nk (up to the next multiple of 8, within the block) have
            // probability 0 and a valid slot, so they add nothing.
            let n8 = (nk + 7u) / 8u;
            let pr = qr * (KB / 4u);
            for (var g = 0u; g < n8; g++) {
                let pa = ps[pr + 2u * g];
                let pb = ps[pr + 2u * g + 1u];
                let sa4 = sl[2u * g];
                let sb4 = sl[2u * g + 1u];
                let v0 = vld((vb + sa4.x) * dv4 + ln);
                let v1 = vld((vb + sa4.y) * dv4 + ln);
                let v2 = vld((vb + sa4.z) * dv4 + ln);
                let v3 = vld((vb + sa4.w) * dv4 + ln);
                let v4 = vld((vb + sb4.x) * dv4 + ln);
                let v5 = vld((vb + sb4.y) * dv4 + ln);
                let v6 = vld((vb + sb4.z) * dv4 + ln);
                let v7 = vld((vb + sb4.w) * dv4 + ln);
                a0 += ((pa.x * v0 + pa.y * v1) + (pa.z * v2 + pa.w * v3))
                    + ((pb.x * v4 + pb.y * v5) + (pb.z * v6 + pb.w * v7));
            }
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
