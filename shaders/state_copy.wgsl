// Copies a layer's recurrent state (conv state and SSM state) into a second pair of buffers:
// the decode step that `generate` submits before it knows whether the token it feeds ends the
// reply backs up the state it will overwrite, so stopping can undo the step.
// Grid: (groups, 1, 1), at most ceil(max(a_n4, b_n4) / 256); grid-stride over the vec4s.

struct Params {
    a_n4: u32,  // vec4s in the first pair (conv state)
    b_n4: u32,  // vec4s in the second pair (SSM state)
}

@group(0) @binding(0) var<uniform> p: Params;
// a_src, a_dst: [a_n4] vec4<f32> (the conv state [d_inner, d_conv] flattened).
@group(0) @binding(1) var<storage, read> a_src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> a_dst: array<vec4<f32>>;
// b_src, b_dst: [b_n4] vec4<f32> (the SSM state [d_inner, d_state] flattened).
@group(0) @binding(3) var<storage, read> b_src: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> b_dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) ng: vec3<u32>) {
    let n = max(p.a_n4, p.b_n4);
    for (var i = gid.x; i < n; i += ng.x * 256u) {
        if (i < p.a_n4) { a_dst[i] = a_src[i]; }
        if (i < p.b_n4) { b_dst[i] = b_src[i]; }
    }
}
