// Hybrid-head merge: m = (w1 * rmsnorm(attn) + w2 * rmsnorm(ssm)) / 2, row by row
// (pre_avg_layernorm1 on the attention heads, pre_avg_layernorm2 on the SSM heads).
// One workgroup per row. Grid: (rows, 1, 1).

struct Params {
    rows: u32,
    width: u32,   // d_inner (= n_heads * d_v)
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// att: [rows, width] f32 attention output.
@group(0) @binding(1) var<storage, read> att: array<f32>;
// ssm: [rows, width] f32 SSM output.
@group(0) @binding(2) var<storage, read> ssm: array<f32>;
// w: [2, width] f32: pre_avg_layernorm1 weight, then pre_avg_layernorm2 weight.
@group(0) @binding(3) var<storage, read> w: array<f32>;
// out: [rows, width] f32 merged.
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
var<workgroup> ra: array<f32, 256>;
var<workgroup> rs: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let b = wid.x * p.width;
    var sa = 0.0;
    var ss = 0.0;
    for (var i = li; i < p.width; i += WG) {
        let a = att[b + i];
        let s = ssm[b + i];
        sa += a * a;
        ss += s * s;
    }
    ra[li] = sa;
    rs[li] = ss;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (li < k) {
            ra[li] += ra[li + k];
            rs[li] += rs[li + k];
        }
        workgroupBarrier();
    }
    let na = inverseSqrt(ra[0] / f32(p.width) + p.eps);
    let ns = inverseSqrt(rs[0] / f32(p.width) + p.eps);
    for (var i = li; i < p.width; i += WG) {
        out[b + i] = (w[i] * (att[b + i] * na) + w[p.width + i] * (ssm[b + i] * ns)) / 2.0;
    }
}
