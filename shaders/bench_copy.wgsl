// Copy-bandwidth probe for hymba-bench (the denominator of its "% of copy" column): one vec4<f32>
// per invocation, dst[i] = src[i]. Grid: (row, ceil(n / (256 * row)), 1).

struct Params {
    n: u32,    // vec4s to copy
    row: u32,  // workgroups per grid row
}

@group(0) @binding(0) var<uniform> p: Params;
// src: [n] vec4<f32>.
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
// dst: [n] vec4<f32>.
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = (wid.y * p.row + wid.x) * 256u + li;
    if (i < p.n) { dst[i] = src[i]; }
}
