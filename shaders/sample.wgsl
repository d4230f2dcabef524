// Picks the next token on the GPU, so a decode step reads back only a token id:
//   repetition penalty (tokens marked in `seen`: l > 0 ? l / penalty : l * penalty),
//   then greedy argmax (lowest id on ties), or sampling: temperature, top-k (ties kept),
//   top-p (smallest set of highest tokens with mass >= p), then an inverse-CDF draw in id
//   order with u = hash(seed, step). Thresholds live on order-preserving u32 keys of the
//   logits, so nothing is sorted: top-k's by a radix select (four byte-wide histogram passes),
//   top-p's by bitwise search.
// One workgroup of 256 threads. Grid: (1, 1, 1).

struct Params {
    vocab: u32,
    mode: u32,        // 0 greedy, 1 sample
    top_k: u32,       // 0 = off
    seed: u32,
    temperature: f32,
    top_p: f32,       // >= 1 = off
    penalty: f32,     // 1 = off
    logits_off: u32,  // element offset of the logits row
}

@group(0) @binding(0) var<uniform> p: Params;
// logits: [vocab] f32 at logits_off.
@group(0) @binding(1) var<storage, read> logits: array<f32>;
// seen: [vocab] u32, 1 where the token occurred (prompt and generated); the choice is marked.
@group(0) @binding(2) var<storage, read_write> seen: array<u32>;
// st: [0] chosen token id (read by the next step's embedding), [1] tokens sampled so far,
// [2] the chosen token's `seen` flag before this choice (so a step can be undone).
@group(0) @binding(3) var<storage, read_write> st: array<u32>;

const WG: u32 = 256u;
var<workgroup> rf: array<f32, 256>;
var<workgroup> ru: array<u32, 256>;
var<workgroup> hist: array<atomic<u32>, 256>;  // radix-select histogram (top-k)

fn adj(i: u32) -> f32 {
    var l = logits[p.logits_off + i];
    if (p.penalty != 1.0 && seen[i] != 0u) {
        if (l > 0.0) { l = l / p.penalty; } else { l = l * p.penalty; }
    }
    return l;
}

fn okey(f: f32) -> u32 {
    let b = bitcast<u32>(f);
    if ((b & 0x80000000u) != 0u) { return ~b; }
    return b | 0x80000000u;
}

fn pcg(v: u32) -> u32 {
    let s = v * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

fn sum_f(li: u32, v: f32) -> f32 {
    rf[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { rf[li] += rf[li + s]; }
        workgroupBarrier();
    }
    let r = rf[0];
    workgroupBarrier();
    return r;
}

fn sum_u(li: u32, v: u32) -> u32 {
    ru[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { ru[li] += ru[li + s]; }
        workgroupBarrier();
    }
    let r = ru[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    let V = p.vocab;
    // Greedy: argmax, lowest index among equal maxima.
    // Eight logits per thread per round, all loaded before they are compared (a chain of
    // 125 dependent loads per thread for a 32k vocabulary otherwise); in index order, so the
    // strict comparison keeps the lowest index.
    var best = -3.4e38;
    var bi = 0xffffffffu;
    var i = li;
    for (; i + 7u * WG < V; i += 8u * WG) {
        let l0 = adj(i);
        let l1 = adj(i + WG);
        let l2 = adj(i + 2u * WG);
        let l3 = adj(i + 3u * WG);
        let l4 = adj(i + 4u * WG);
        let l5 = adj(i + 5u * WG);
        let l6 = adj(i + 6u * WG);
        let l7 = adj(i + 7u * WG);
        if (bi == 0xffffffffu || l0 > best) { best = l0; bi = i; }
        if (l1 > best) { best = l1; bi = i + WG; }
        if (l2 > best) { best = l2; bi = i + 2u * WG; }
        if (l3 > best) { best = l3; bi = i + 3u * WG; }
        if (l4 > best) { best = l4; bi = i + 4u * WG; }
        if (l5 > best) { best = l5; bi = i + 5u * WG; }
        if (l6 > best) { best = l6; bi = i + 6u * WG; }
        if (l7 > best) { best = l7; bi = i + 7u * WG; }
    }
    for (; i < V; i += WG) {
        let l = adj(i);
        if (bi == 0xffffffffu || l > best) { best = l; bi = i; }
    }
    rf[li] = best;
    ru[li] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            let ob = ru[li + s];
            if (ob != 0xffffffffu && (ru[li] == 0xffffffffu || rf[li + s] > rf[li] || (rf[li + s] == rf[li] && ob < ru[li]))) {
                rf[li] = rf[li + s];
                ru[li] = ob;
            }
        }
        workgroupBarrier();
    }
    let lmax = rf[0];
    var chosen = ru[0];
    workgroupBarrier();

    if (p.mode == 1u) {
        let inv_t = 1.0 / p.temperature;
        // top-k: largest key threshold keeping at least k tokens.
        // The largest t with at least k keys >= t is the k-th largest key: a radix select,
        // eight bits per pass (four passes over the vocabulary instead of one per bit). Each
        // pass histograms the next byte of the keys that share the bytes chosen so far and
        // takes the bin where the count from the top reaches the rank still needed.
        var tk = 0u;
        if (p.top_k > 0u && p.top_k < V) {
            var need = p.top_k;
            var pmask = 0u;
            for (var rp = 0u; rp < 4u; rp++) {
                let shift = 24u - 8u * rp;
                atomicStore(&hist[li], 0u);
                workgroupBarrier();
                for (var i = li; i < V; i += WG) {
                    let key = okey(adj(i));
                    if ((key & pmask) == tk) { atomicAdd(&hist[(key >> shift) & 255u], 1u); }
                }
                workgroupBarrier();
                if (li == 0u) {
                    var cum = 0u;
                    var sel = 0u;
                    var rest = need;
                    for (var b = 0; b < 256; b++) {
                        let bin = u32(255 - b);
                        let c = atomicLoad(&hist[bin]);
                        if (cum + c >= need) {
                            sel = bin;
                            rest = need - cum;
                            break;
                        }
                        cum += c;
                    }
                    ru[0] = sel;
                    ru[1] = rest;
                }
                workgroupBarrier();
                tk = tk | (ru[0] << shift);
                need = ru[1];
                pmask = pmask | (255u << shift);
                workgroupBarrier();
            }
        }
        var thr = tk;
        if (p.top_p < 1.0) {
            var z = 0.0;
            for (var i = li; i < V; i += WG) {
                let l = adj(i);
                if (okey(l) >= tk) { z += exp((l - lmax) * inv_t); }
            }
            let total = sum_f(li, z);
            var tp = 0u;
            for (var b = 0u; b < 32u; b++) {
                let cand = tp | (1u << (31u - b));
                let th = max(cand, tk);
                var m = 0.0;
                for (var i = li; i < V; i += WG) {
                    let l = adj(i);
                    if (okey(l) >= th) { m += exp((l - lmax) * inv_t); }
                }
                if (sum_f(li, m) >= p.top_p * total) { tp = cand; }
            }
            thr = max(tk, tp);
        }
        // Inverse-CDF draw over kept tokens in id order; each thread owns a contiguous chunk.
        let per = (V + WG - 1u) / WG;
        let lo = li * per;
        let hi = min(V, lo + per);
        var cs = 0.0;
        for (var i = lo; i < hi; i++) {
            let l = adj(i);
            if (okey(l) >= thr) { cs += exp((l - lmax) * inv_t); }
        }
        rf[li] = cs;
        workgroupBarrier();
        if (li == 0u) {
            var total = 0.0;
            for (var j = 0u; j < WG; j++) { total += rf[j]; }
            let r = pcg(p.seed ^ pcg(st[1] + 0x9e3779b9u));
            let goal = (f32(r >> 8u) / 16777216.0) * total;
            var cum = 0.0;
            var pick = chosen;
            var found = false;
            for (var j = 0u; j < WG && !found; j++) {
                if (cum + rf[j] > goal) {
                    let a = j * per;
                    let e = min(V, a + per);
                    for (var i = a; i < e; i++) {
                        let l = adj(i);
                        if (okey(l) >= thr) {
                            pick = i;
                            cum += exp((l - lmax) * inv_t);
                            if (cum > goal) { found = true; break; }
                        }
                    }
                } else {
                    cum += rf[j];
                }
            }
            ru[0] = pick;
        }
        workgroupBarrier();
        chosen = ru[0];
    }
    if (li == 0u) {
        st[0] = chosen;
        st[1] = st[1] + 1u;
        st[2] = seen[chosen];
        seen[chosen] = 1u;
    }
}
