// Mamba branch, step 1: causal depthwise conv1d (kernel d_conv) with its state, then silu.
//   xc[t, c] = silu(b[c] + sum_j w[c, j] * x[t - (K - 1) + j]),  x[<0] taken from the state
// The state holds the last K pre-conv inputs of the sequence so far (oldest first), exactly
// the reference cache's conv_state [d_inner, d_conv].
//
// Default entry (forward): grid (ceil(d_inner / 64), rows, 1).
// Define STATE (state update, run after forward): the state becomes the last K inputs of
//   (old state ++ this chunk). Grid: (ceil(d_inner / 64), 1, 1).
// Define STEP (one decode step, rows = 1): forward and state update in one dispatch; each
//   thread owns one channel's state. Grid: (ceil(d_inner / 64), 1, 1).

struct Params {
    rows: u32,
    d: u32,         // channels (d_inner)
    k: u32,         // kernel width d_conv
    x_off: u32,     // element offset of x of row 0 in the in_proj output
    x_stride: u32,  // in_proj output row width
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// pbuf: [rows, x_stride] f32 in_proj output (x block at x_off).
@group(0) @binding(1) var<storage, read> pbuf: array<f32>;
#ifdef STEP
// wb: [d, k] f32 conv weights followed by [d] f32 bias.
@group(0) @binding(2) var<storage, read> wb: array<f32>;
// state: [d, k] f32 conv state, shifted in place.
@group(0) @binding(3) var<storage, read_write> state: array<f32>;
// xc: [1, d] f32 conv output after silu.
@group(0) @binding(4) var<storage, read_write> xc: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.d) { return; }
    let xnew = pbuf[p.x_off + c];
    var acc = 0.0;
    if (p.has_bias != 0u) { acc = wb[p.d * p.k + c]; }
    for (var j = 0u; j + 1u < p.k; j++) {
        let v = state[c * p.k + j + 1u];
        acc += wb[c * p.k + j] * v;
        state[c * p.k + j] = v;
    }
    acc += wb[c * p.k + p.k - 1u] * xnew;
    state[c * p.k + p.k - 1u] = xnew;
    xc[c] = acc / (1.0 + exp(-acc));
}
#else
#ifdef STATE
// state: [d, k] f32 conv state, updated in place.
@group(0) @binding(2) var<storage, read_write> state: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.d) { return; }
    var old: array<f32, 8>;
    for (var i = 0u; i < p.k; i++) { old[i] = state[c * p.k + i]; }
    for (var i = 0u; i < p.k; i++) {
        // input index rows - k + i, relative to the start of this chunk
        let rel = i32(p.rows) - i32(p.k) + i32(i);
        var v: f32;
        if (rel >= 0) { v = pbuf[p.x_off + u32(rel) * p.x_stride + c]; } else { v = old[i32(p.k) + rel]; }
        state[c * p.k + i] = v;
    }
}
#else
// wb: [d, k] f32 conv weights (conv1d.weight [d, 1, k]) followed by [d] f32 bias.
@group(0) @binding(2) var<storage, read> wb: array<f32>;
// state: [d, k] f32 conv state before this chunk.
@group(0) @binding(3) var<storage, read> state: array<f32>;
// xc: [rows, d] f32 conv output after silu.
@group(0) @binding(4) var<storage, read_write> xc: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let t = gid.y;
    if (c >= p.d || t >= p.rows) { return; }
    var acc = 0.0;
    if (p.has_bias != 0u) { acc = wb[p.d * p.k + c]; }
    for (var j = 0u; j < p.k; j++) {
        let rel = i32(t) + i32(j) - i32(p.k - 1u);
        var v: f32;
        if (rel >= 0) { v = pbuf[p.x_off + u32(rel) * p.x_stride + c]; } else { v = state[c * p.k + u32(i32(p.k) + rel)]; }
        acc += wb[c * p.k + j] * v;
    }
    xc[t * p.d + c] = acc / (1.0 + exp(-acc));
}
#endif
#endif
