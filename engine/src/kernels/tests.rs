//! Each kernel against a plain CPU computation on random data, with sizes that
//! are not multiples of the workgroup sizes. Outputs are poisoned with NaN first
//! so that elements a kernel fails to write show up.

use super::*;
use crate::gpu::{Gpu, GpuOptions, Recorder};
use crate::sampling::{sample_cpu, SamplingParams};
use std::sync::OnceLock;

pub(crate) struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u32() as f32 / 4294967296.0) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn env() -> &'static (Gpu, Kernels) {
    static ENV: OnceLock<(Gpu, Kernels)> = OnceLock::new();
    ENV.get_or_init(|| {
        let gpu = pollster::block_on(Gpu::new(&GpuOptions::default())).unwrap_or_else(|e| panic!("kernel tests need a GPU adapter (install mesa-vulkan-drivers for a software one): {e}"));
        let k = Kernels::new(&gpu).expect("kernels compile");
        (gpu, k)
    })
}

fn run(gpu: &Gpu, f: impl FnOnce(&mut Recorder)) {
    let mut rec = Recorder::new(gpu);
    f(&mut rec);
    rec.finish().run(gpu);
}

fn read(gpu: &Gpu, b: &wgpu::Buffer, n: usize) -> Vec<f32> {
    pollster::block_on(gpu.read_f32(b, 0, n as u64)).unwrap()
}

#[track_caller]
fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            g.is_finite(),
            "{name}: element {i} is {g} (unwritten or overflow), want {w}"
        );
        if err > atol + rtol * w.abs() {
            panic!("{name}: element {i}: got {g}, want {w} (|err| {err})");
        }
        if err > worst.1 {
            worst = (i, err);
        }
    }
}

const NAN: f32 = f32::NAN;

/// The weights the kernels compute with: f16-rounded, or quantized and dequantized on the CPU.
fn weights_as_stored(w: &[f32], m: usize, k: usize, dtype: WeightDtype) -> Vec<f32> {
    match dtype {
        WeightDtype::F32 => w.to_vec(),
        WeightDtype::F16 => w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
        WeightDtype::Q8 | WeightDtype::Q4 => dequantize(&quantize(w, m, k, dtype), m, k, dtype),
    }
}

fn matmul_case(
    dtype: WeightDtype,
    rows: usize,
    m: usize,
    k: usize,
    bias: bool,
    accumulate: bool,
    seed: u64,
) {
    matmul_case_via(dtype, rows, m, k, bias, accumulate, seed, false)
}

/// `matmul_case`, or with `prompt` the same product through `Kernels::matmul_prompt` with its
/// scratch (Y's offset and row stride then multiples of 4, as gemm_coop2's direct stores need).
#[allow(clippy::too_many_arguments)]
fn matmul_case_via(
    dtype: WeightDtype,
    rows: usize,
    m: usize,
    k: usize,
    bias: bool,
    accumulate: bool,
    seed: u64,
    prompt: bool,
) {
    matmul_case_on(
        &env().1,
        dtype,
        rows,
        m,
        k,
        bias,
        accumulate,
        seed,
        prompt,
        8,
        prompt,
    );
}

/// `matmul_case_via` with the kernels `ks`, room for `slices` K-split partial results in the
/// scratch, and X's offset and row stride multiples of 4 (`x_aligned`, what `gemm_coop2`
/// needs) or not; returns whether the product wrote into the NaN-poisoned scratch (it took a
/// split path).
#[allow(clippy::too_many_arguments)]
fn matmul_case_on(
    ks: &Kernels,
    dtype: WeightDtype,
    rows: usize,
    m: usize,
    k: usize,
    bias: bool,
    accumulate: bool,
    seed: u64,
    prompt: bool,
    slices: usize,
    x_aligned: bool,
) -> bool {
    let (gpu, _) = env();
    let mut r = Rng::new(seed);
    // matmul_prompt's tensor-core GEMMs read X rows as vec4: offset and stride multiples of 4
    // there (elsewhere they fall back to `matmul`, tested without).
    let (x_stride, x_off) = if x_aligned {
        (k.div_ceil(4) * 4 + 4, 4)
    } else {
        (k + 3, 5)
    };
    let (y_stride, y_off) = if prompt { (m + 4, 8) } else { (m + 2, 7) };
    let x = r.vec(x_off + rows * x_stride, 1.0);
    let w = r.vec(m * k, 0.5);
    let b = r.vec(m, 0.5);
    let y0: Vec<f32> = if accumulate {
        r.vec(y_off + rows * y_stride, 1.0)
    } else {
        vec![NAN; y_off + rows * y_stride]
    };
    let mat = Matrix::upload(gpu, "w", &w, m, k, dtype).unwrap();
    let xb = gpu.upload("x", &x).unwrap();
    let bb = gpu.upload("b", &b).unwrap();
    let yb = gpu.upload("y", &y0).unwrap();
    // matmul_prompt's scratch for K-split partial results, poisoned so that what it should
    // have written shows.
    let parts = gpu
        .upload("parts", &vec![NAN; slices * rows * m.div_ceil(4) * 4])
        .unwrap();
    run(gpu, |rec| {
        if prompt {
            assert!(!bias, "matmul_prompt has no bias");
            ks.matmul_prompt(
                rec,
                Some(&parts),
                &xb,
                x_off,
                x_stride,
                &mat,
                &yb,
                y_off,
                y_stride,
                rows,
                accumulate,
            )
        } else {
            ks.matmul(
                rec,
                &xb,
                x_off,
                x_stride,
                &mat,
                bias.then_some(&bb),
                &yb,
                y_off,
                y_stride,
                rows,
                accumulate,
            )
        }
        .unwrap()
    });
    let got = read(gpu, &yb, y0.len());
    // The tensor-core GEMMs round X and the dequantized weights to f16: so does the reference
    // then.
    let coop = ks.uses_coop(&mat, rows);
    let mut wq = weights_as_stored(&w, m, k, dtype);
    if coop {
        wq.iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
    }
    let xr = |v: f32| {
        if coop {
            half::f16::from_f32(v).to_f32()
        } else {
            v
        }
    };
    let tol = if coop { 1e-3 } else { 1e-4 };
    for t in 0..rows {
        for j in 0..m {
            let mut acc = 0f64;
            for kk in 0..k {
                acc += xr(x[x_off + t * x_stride + kk]) as f64 * wq[j * k + kk] as f64;
            }
            if bias {
                acc += b[j] as f64;
            }
            if accumulate {
                acc += y0[y_off + t * y_stride + j] as f64;
            }
            let g = got[y_off + t * y_stride + j];
            let want = acc as f32;
            assert!(
                (g - want).abs() <= tol + tol * want.abs(),
                "matmul {dtype:?} rows {rows} m {m} k {k} (tensor cores: {coop}): y[{t},{j}] = {g}, want {want}"
            );
        }
        // padding between rows must stay untouched
        for j in m..y_stride {
            let i = y_off + t * y_stride + j;
            if i < got.len() && !accumulate {
                assert!(got[i].is_nan(), "matmul wrote outside its output at {i}");
            }
        }
    }
    let n_parts = slices * rows * m.div_ceil(4) * 4;
    read(gpu, &parts, n_parts).iter().any(|v| !v.is_nan())
}

#[test]
fn matmul_gemv_f32() {
    matmul_case(WeightDtype::F32, 1, 37, 45, false, false, 1);
    matmul_case(WeightDtype::F32, 3, 133, 100, true, true, 2);
    // K larger than the workgroup staging buffer (unstaged path), and enough rows for 4 passes.
    matmul_case(WeightDtype::F32, 1, 21, 9000, false, false, 9);
    matmul_case(WeightDtype::F32, 1, 8500, 24, true, false, 10);
    // Narrow outputs over prompt rows through `matmul` (a row of GEMV workgroups per X row;
    // `matmul_prompt` splits them over K on GPU kernel families, see
    // matmul_prompt_narrow_split).
    matmul_case(WeightDtype::F32, 37, 133, 300, true, true, 11);
    matmul_case(WeightDtype::F32, 9, 20, 3000, false, false, 12);
}

#[test]
fn matmul_gemv_f16() {
    matmul_case(WeightDtype::F16, 1, 37, 45, true, false, 3);
    matmul_case(WeightDtype::F16, 2, 260, 6, false, true, 4);
    matmul_case(WeightDtype::F16, 12, 132, 200, false, true, 5);
}

#[test]
fn matmul_gemv_quantized() {
    for (i, dt) in [WeightDtype::Q8, WeightDtype::Q4].into_iter().enumerate() {
        let s = 100 + 10 * i as u64;
        matmul_case(dt, 1, 37, 45, true, false, s);
        matmul_case(dt, 3, 133, 100, false, true, s + 1);
        matmul_case(dt, 2, 260, 6, true, true, s + 2);
        // unstaged path (K > staging) and 4 passes
        matmul_case(dt, 1, 21, 9000, false, false, s + 3);
        matmul_case(dt, 1, 8500, 24, true, false, s + 4);
    }
}

#[test]
fn matmul_gemm_quantized() {
    for (i, dt) in [WeightDtype::Q8, WeightDtype::Q4].into_iter().enumerate() {
        let s = 200 + 10 * i as u64;
        matmul_case(dt, 70, 37, 45, true, false, s);
        matmul_case(dt, 129, 300, 33, false, true, s + 1);
        matmul_case(dt, 65, 65, 100, false, true, s + 2);
    }
}

#[test]
fn matmul_prompt_shapes() {
    // The prompt GEMMs where the adapter has cooperative matrices: gemm_coop2 (128 x 128 tiles)
    // for wide outputs, and split over K for narrow ones with long K; elsewhere
    // `matmul_prompt` falls back to `matmul`. Rows and W rows past the 128 x 128 tiles, K past
    // the 32-deep steps, residual adds and plain stores, every weight storage.
    let (gpu, ks) = env();
    let w = |m: usize, k: usize| {
        Matrix::upload(gpu, "w", &vec![0.5; m * k], m, k, WeightDtype::F16).unwrap()
    };
    let taken = |yes: bool| if yes { "yes" } else { "no, falls back" };
    println!(
        "gemm_coop2 (128 x 128 tensor-core tiles): {}",
        taken(ks.coop2_kernel(&w(4112, 80), 300, 8, 84, 8, 4116).is_some())
    );
    matmul_case_via(WeightDtype::F16, 300, 4112, 80, false, false, 501, true);
    matmul_case_via(WeightDtype::F16, 129, 4160, 160, false, true, 502, true);
    matmul_case_via(WeightDtype::F16, 256, 4224, 48, false, true, 503, true);
    matmul_case_via(WeightDtype::F16, 40, 4128, 30, false, false, 504, true);
    matmul_case_via(WeightDtype::F16, 70, 4097, 33, false, true, 505, true);
    matmul_case_via(WeightDtype::Q4, 200, 4128, 96, false, true, 512, true);
    matmul_case_via(WeightDtype::Q8, 130, 4100, 72, false, false, 513, true);
    // narrow, short K: plain gemm_coop / FMA GEMM
    matmul_case_via(WeightDtype::F16, 70, 336, 64, false, true, 508, true);
    matmul_case_via(WeightDtype::Q8, 70, 320, 64, false, true, 507, true);
    // K-split staged GEMM: narrow outputs with long K (here 4 slices, the last shorter; then as
    // many as a smaller scratch holds: 2 of 4, 3 of 5)
    let n = ks.coop_splits(&w(336, 2112), 130, 8, 2116, u64::MAX);
    println!("K-split tensor-core GEMM: {n} slices");
    if ks.coop2_kernel(&w(4112, 80), 300, 8, 84, 8, 4116).is_some() {
        // 3 x 2 tiles: 4 slices (K / 512), as many as a 2-slot scratch holds, none for X rows
        // that are not 16-byte aligned.
        assert_eq!(n, 4);
        let part = (130 * 336 * 4) as u64;
        assert_eq!(ks.coop_splits(&w(336, 2112), 130, 8, 2116, 2 * part), 2);
        assert_eq!(ks.coop_splits(&w(336, 2112), 130, 5, 2115, u64::MAX), 1);
        assert!(ks.coop2_kernel(&w(4112, 80), 300, 5, 83, 8, 4116).is_none());
    }
    matmul_case_via(WeightDtype::F16, 130, 336, 2112, false, true, 509, true);
    matmul_case_on(
        &env().1,
        WeightDtype::F16,
        130,
        336,
        2112,
        false,
        true,
        515,
        true,
        2,
        true,
    );
    matmul_case_on(
        &env().1,
        WeightDtype::F16,
        100,
        600,
        3000,
        false,
        false,
        516,
        true,
        3,
        true,
    );
    // X rows not 16-byte aligned: no gemm_coop2 (it reads X as vec4), whole or split; the
    // product falls back to the other GEMMs
    matmul_case_on(
        &env().1,
        WeightDtype::F16,
        150,
        4112,
        72,
        false,
        true,
        517,
        true,
        8,
        false,
    );
    matmul_case_on(
        &env().1,
        WeightDtype::Q8,
        130,
        336,
        2112,
        false,
        false,
        518,
        true,
        8,
        false,
    );
    // m not a multiple of 4 with full 128 x 128 tiles (padded partial rows), K not a multiple
    // of 4
    matmul_case_via(WeightDtype::F16, 160, 290, 2049, false, false, 510, true);
    matmul_case_via(WeightDtype::Q4, 130, 330, 2100, false, true, 511, true);
    matmul_case_via(WeightDtype::Q8, 129, 258, 2080, false, true, 514, true);
}

#[test]
fn matmul_prompt_narrow_split() {
    // Narrow prompt products (x_proj: dt_rank + 2 d_state outputs) on the GPU kernel family: the
    // FMA GEMM split over K into as many slices as the scratch holds, summed by gemm_reduce;
    // K tails within a 16-deep step, rows and outputs past the 64 x 64 tiles, plain stores and
    // residual adds, f32 (what x_proj keeps) and the other storages.
    let (gpu, _) = env();
    let ks = Kernels::new_with(gpu, false).unwrap();
    let w = |m: usize, k: usize| {
        Matrix::upload(gpu, "w", &vec![0.5; m * k], m, k, WeightDtype::F32).unwrap()
    };
    // 2 x 3 tiles: K / 64 = 10 slices; as many as a 5-slot scratch holds; none for decode rows,
    // for wide outputs or for CPU adapters' kernels.
    assert_eq!(ks.narrow_splits(&w(70, 700), 130, u64::MAX), 10);
    let part = (130 * 72 * 4) as u64;
    assert_eq!(ks.narrow_splits(&w(70, 700), 130, 5 * part), 5);
    assert_eq!(ks.narrow_splits(&w(70, 700), 4, u64::MAX), 1);
    assert_eq!(ks.narrow_splits(&w(300, 700), 130, u64::MAX), 1);
    assert_eq!(
        Kernels::new_with(gpu, true)
            .unwrap()
            .narrow_splits(&w(70, 700), 130, u64::MAX),
        1
    );
    // Each case must have gone through the split (written into its poisoned scratch).
    for (dtype, rows, m, k, acc, seed, slots, aligned) in [
        (WeightDtype::F32, 130, 70, 700, false, 601, 16, false),
        (WeightDtype::F32, 130, 70, 700, true, 602, 5, true),
        (WeightDtype::F32, 37, 132, 3201, false, 603, 64, false),
        (WeightDtype::F16, 65, 33, 250, true, 604, 3, false),
        (WeightDtype::Q8, 70, 100, 520, false, 605, 4, false),
        (WeightDtype::Q4, 70, 100, 520, true, 606, 9, false),
    ] {
        let split = matmul_case_on(
            &ks, dtype, rows, m, k, false, acc, seed, true, slots, aligned,
        );
        assert!(split, "{dtype:?} rows {rows} m {m} k {k}: no K split taken");
    }
}

/// Plain max-abs q4 (`s = max|w| / 7`, q in [-7, 7]), the scheme the q4 search must never lose to.
fn q4_maxabs_sq_err(block: &[f32]) -> f64 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = half::f16::from_f32(amax / 7.0).to_f32();
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    block
        .iter()
        .map(|&v| ((v - (v * inv).round().clamp(-7.0, 7.0) * s) as f64).powi(2))
        .sum()
}

#[test]
fn matmul_gemm_prompt_shapes_all_dtypes() {
    // Output widths above 256 take the tiled GEMM: the tensor-core one (f16 / q8 / q4) where
    // the adapter has cooperative matrices, the f32-FMA one elsewhere. Odd sizes cover partial
    // tiles in every dimension and K not a multiple of the 32-deep k step.
    let (gpu, ks) = env();
    println!(
        "cooperative matrices (tensor-core GEMM): {}",
        if gpu.coop_f16 { "yes" } else { "no, FMA GEMM" }
    );
    for (i, dt) in [
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
        WeightDtype::F32,
    ]
    .into_iter()
    .enumerate()
    {
        let s = 500 + 10 * i as u64;
        matmul_case(dt, 129, 300, 45, true, false, s);
        matmul_case(dt, 70, 321, 100, false, true, s + 1);
        matmul_case(dt, 5, 257, 70, false, false, s + 2);
        matmul_case(dt, 64, 320, 96, false, false, s + 3);
    }
    let _ = ks;
}

#[test]
fn quantize_round_trip() {
    let mut r = Rng::new(300);
    let (mut sse_q4, mut sse_maxabs) = (0f64, 0f64);
    for dt in [WeightDtype::Q8, WeightDtype::Q4] {
        for &(rows, cols) in &[
            (1usize, 1usize),
            (3, 31),
            (5, 32),
            (7, 33),
            (4, 100),
            (2, 257),
            (16, 512),
            (300, 45), // enough rows to be split over threads
        ] {
            let mut w = r.vec(rows * cols, 0.3);
            // an all-zero block and one large outlier
            if cols >= 64 {
                w[..32].fill(0.0);
                w[40] = 5.0;
            }
            let words = quantize(&w, rows, cols, dt);
            assert_eq!(
                (words.len() * 4) as u64,
                Matrix::bytes_for(rows, cols, dt),
                "{dt:?} {rows}x{cols}: size"
            );
            let back = dequantize(&words, rows, cols, dt);
            let kp = Matrix::padded_cols_for(cols, dt);
            assert_eq!(kp % QBLOCK, 0);
            for rr in 0..rows {
                for b in 0..cols.div_ceil(QBLOCK) {
                    let (c0, c1) = (b * QBLOCK, ((b + 1) * QBLOCK).min(cols));
                    let blk = &w[rr * cols + c0..rr * cols + c1];
                    let got = &back[rr * cols + c0..rr * cols + c1];
                    let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if amax == 0.0 {
                        assert!(got.iter().all(|&g| g == 0.0), "{dt:?}: zero block");
                    }
                    if dt == WeightDtype::Q8 {
                        // half a quantization step, plus the f16 rounding of the scale
                        let step = amax / 127.0;
                        for (c, (&a, &g)) in blk.iter().zip(got).enumerate() {
                            assert!(
                                (a - g).abs() <= 0.5 * step * 1.002 + amax * 1e-3 + 1e-7,
                                "{dt:?} {rows}x{cols} [{rr},{}]: {a} -> {g} (step {step})",
                                c0 + c
                            );
                        }
                    } else {
                        // q4 guarantee: the block's squared error is at most that of max-abs
                        // scaling (one of the search's candidates), so no weight is off by more
                        // than the square root of that.
                        let sse: f64 = blk
                            .iter()
                            .zip(got)
                            .map(|(&a, &g)| ((a - g) as f64).powi(2))
                            .sum();
                        let base = q4_maxabs_sq_err(blk);
                        assert!(
                            sse <= base * (1.0 + 1e-9) + 1e-18,
                            "{rows}x{cols} row {rr} block {b}: squared error {sse} > max-abs {base}"
                        );
                        for (&a, &g) in blk.iter().zip(got) {
                            assert!((a - g).abs() as f64 <= base.sqrt() + 1e-9, "{a} -> {g}");
                        }
                        sse_q4 += sse;
                        sse_maxabs += base;
                    }
                }
            }
            // the dequantized values are on the grid: quantizing them again gives them back
            assert_eq!(
                dequantize(&quantize(&back, rows, cols, dt), rows, cols, dt),
                back,
                "{dt:?} {rows}x{cols}: idempotent"
            );
        }
    }
    // the search pays off even on uniform random data (0.92x the squared error of max-abs
    // scaling here; 0.70x on the matrices of the trained tiny-shakespeare model)
    assert!(
        sse_q4 < 0.95 * sse_maxabs,
        "q4 squared error {sse_q4} vs max-abs {sse_maxabs}"
    );
    // exact values survive: multiples of a power-of-two scale
    let w: Vec<f32> = (0..64).map(|i| ((i % 15) as f32 - 7.0) * 0.25).collect();
    assert_eq!(
        dequantize(
            &quantize(&w, 2, 32, WeightDtype::Q4),
            2,
            32,
            WeightDtype::Q4
        ),
        w
    );
    let w: Vec<f32> = (0..40)
        .map(|i| ((i * 37 % 255) as f32 - 127.0) / 64.0)
        .collect();
    let q = quantize(&w, 1, 40, WeightDtype::Q8);
    let back = dequantize(&q, 1, 40, WeightDtype::Q8);
    for (a, b) in w.iter().zip(&back) {
        assert!((a - b).abs() <= 1.985 / 127.0 * 0.5 + 1e-6, "{a} {b}");
    }
}

/// Stacking pre-quantized matrices by rows gives the layout of quantizing the stacked matrix,
/// also when a part has an odd number of scales (its last scale word is half used).
#[test]
fn stack_quantized_matches_quantizing_the_stack() {
    let mut r = Rng::new(301);
    for dt in [WeightDtype::Q8, WeightDtype::Q4] {
        for &(cols, rows) in &[
            (32usize, [3usize, 5, 1]),
            (45, [2, 3, 4]),
            (100, [1, 1, 2]),
            (33, [150, 1, 257]),
        ] {
            let parts: Vec<Vec<f32>> = rows.iter().map(|&n| r.vec(n * cols, 0.5)).collect();
            let words: Vec<Vec<u32>> = parts
                .iter()
                .zip(rows)
                .map(|(p, n)| quantize(p, n, cols, dt))
                .collect();
            let bytes: Vec<(&[u8], usize)> = words
                .iter()
                .zip(rows)
                .map(|(w, n)| (bytemuck::cast_slice::<u32, u8>(w), n))
                .collect();
            let all: Vec<f32> = parts.concat();
            let total: usize = rows.iter().sum();
            let want = quantize(&all, total, cols, dt);
            assert_eq!(
                stack_quantized(&bytes, cols, dt),
                bytemuck::cast_slice::<u32, u8>(&want),
                "{dt:?} cols {cols} rows {rows:?}"
            );
        }
    }
}

#[test]
fn matmul_gemm_f32() {
    matmul_case(WeightDtype::F32, 70, 37, 45, true, false, 5);
    matmul_case(WeightDtype::F32, 129, 130, 33, false, true, 6);
}

#[test]
fn matmul_gemm_f16() {
    matmul_case(WeightDtype::F16, 70, 37, 45, true, false, 7);
    matmul_case(WeightDtype::F16, 5, 65, 100, false, true, 8);
}

fn rms_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &w)| (w as f64 * v as f64 * r) as f32)
        .collect()
}

#[test]
fn rmsnorm_rows_and_in_place_slices() {
    let (gpu, ks) = env();
    let mut r = Rng::new(11);
    let (rows, width) = (5, 300);
    let x = r.vec(3 + rows * (width + 1), 2.0);
    let w = r.vec(width, 1.0);
    let wb = gpu.upload("w", &w).unwrap();
    let xb = gpu.upload("x", &x).unwrap();
    let yb = gpu.upload("y", &vec![NAN; rows * width]).unwrap();
    run(gpu, |rec| {
        ks.rmsnorm(
            rec,
            Some((&xb, 3, width + 1)),
            &wb,
            &yb,
            0,
            width,
            rows,
            width,
            1e-6,
        )
        .unwrap()
    });
    let got = read(gpu, &yb, rows * width);
    let mut want = Vec::new();
    for t in 0..rows {
        want.extend(rms_ref(
            &x[3 + t * (width + 1)..3 + t * (width + 1) + width],
            &w,
            1e-6,
        ));
    }
    assert_close("rmsnorm", &got, &want, 1e-5, 1e-5);

    // In place on a column slice [2, 2+7) of rows of width 20 (like the dt/B/C norms).
    let (rows, stride, off, width) = (9, 20, 2, 7);
    let x = r.vec(rows * stride, 3.0);
    let w = r.vec(width, 1.0);
    let wb = gpu.upload("w", &w).unwrap();
    let yb = gpu.upload("y", &x).unwrap();
    run(gpu, |rec| {
        ks.rmsnorm(rec, None, &wb, &yb, off, stride, rows, width, 1e-6)
            .unwrap()
    });
    let got = read(gpu, &yb, rows * stride);
    let mut want = x.clone();
    for t in 0..rows {
        let n = rms_ref(&x[t * stride + off..t * stride + off + width], &w, 1e-6);
        want[t * stride + off..t * stride + off + width].copy_from_slice(&n);
    }
    assert_close("rmsnorm in place", &got, &want, 1e-5, 1e-5);
}

#[test]
fn split_product_sum_fused_into_the_norm() {
    // A K-split narrow prompt product's partial results summed by the norm that follows it
    // (rmsnorm.wgsl PARTS), on the GPU kernel family (which splits): in place with three
    // segments (x_proj, then its dt / B / C norms), and into a separate output after adding to
    // the residual (out_proj, then the pre-MLP norm). Against the CPU product and norms; the
    // outputs start poisoned, and the scratch must have been written.
    let (gpu, _) = env();
    let ks = Kernels::new_with(gpu, false).unwrap();
    let mut r = Rng::new(77);
    for (rows, m, k, segs, residual) in [
        (37, 132, 700, (100, 116), false),
        (70, 45, 330, (20, 31), false),
        (33, 150, 520, (150, 150), true),
    ] {
        let x = r.vec(rows * k, 1.0);
        let wv = r.vec(m * k, 0.5);
        let g = r.vec(m, 1.0);
        let y0 = r.vec(rows * m, 2.0);
        let wm = Matrix::upload(gpu, "w", &wv, m, k, WeightDtype::F32).unwrap();
        let xb = gpu.upload("x", &x).unwrap();
        let gb = gpu.upload("g", &g).unwrap();
        let yb = gpu
            .upload(
                "y",
                &if residual {
                    y0.clone()
                } else {
                    vec![NAN; rows * m]
                },
            )
            .unwrap();
        let ub = gpu.upload("u", &vec![NAN; rows * m]).unwrap();
        let scratch = gpu
            .upload("parts", &vec![NAN; 16 * rows * (m + 8)])
            .unwrap();
        run(gpu, |rec| {
            let pp = ks
                .matmul_prompt_partial(
                    rec,
                    Some(&scratch),
                    &xb,
                    0,
                    k,
                    &wm,
                    &yb,
                    0,
                    m,
                    rows,
                    residual,
                )
                .unwrap()
                .expect("a narrow product with long K splits on the GPU kernel family");
            assert_eq!(pp.width(), m);
            let out = residual.then_some((&ub, 0, m));
            ks.rmsnorm_partials(rec, &scratch, pp, &gb, &yb, out, segs, 1e-6)
                .unwrap();
        });
        // Slice 0 of the scratch ([rows][ms]) holds finite partial sums.
        let ms = Kernels::parts_stride(m);
        let sc = read(gpu, &scratch, rows * ms);
        assert!((0..rows).all(|t| sc[t * ms..t * ms + m].iter().all(|v| v.is_finite())));
        // CPU: the product (plus the residual), then the norms.
        let mut sum = vec![0f32; rows * m];
        for t in 0..rows {
            for j in 0..m {
                let d: f64 = (0..k)
                    .map(|i| x[t * k + i] as f64 * wv[j * k + i] as f64)
                    .sum();
                sum[t * m + j] = d as f32 + if residual { y0[t * m + j] } else { 0.0 };
            }
        }
        let mut normed = vec![0f32; rows * m];
        for t in 0..rows {
            for (a, b) in [(0, segs.0), (segs.0, segs.1), (segs.1, m)] {
                if a < b {
                    let n = rms_ref(&sum[t * m + a..t * m + b], &g[a..b], 1e-6);
                    normed[t * m + a..t * m + b].copy_from_slice(&n);
                }
            }
        }
        if residual {
            assert_close(
                "split sum into the residual",
                &read(gpu, &yb, rows * m),
                &sum,
                1e-4,
                1e-4,
            );
            assert_close(
                "norm of the residual",
                &read(gpu, &ub, rows * m),
                &normed,
                1e-4,
                1e-4,
            );
        } else {
            assert_close(
                "split sum normed in place",
                &read(gpu, &yb, rows * m),
                &normed,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn embed_with_meta_tokens() {
    let (gpu, ks) = env();
    let mut r = Rng::new(12);
    for dtype in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
    ] {
        let (vocab, d, n_meta, n_tok) = (53, 70, 3, 6);
        let table = r.vec(vocab * d, 1.0);
        let meta = r.vec(n_meta * d, 1.0);
        let ids: Vec<u32> = vec![9, 9, 0, 52, 17, 1, 4];
        let tm = Matrix::upload(gpu, "e", &table, vocab, d, dtype).unwrap();
        let mb = gpu.upload("m", &meta).unwrap();
        let ib = gpu.upload("ids", &ids).unwrap();
        let rows = n_meta + n_tok;
        let ob = gpu.upload("o", &vec![NAN; rows * d]).unwrap();
        run(gpu, |rec| {
            ks.embed(rec, &ib, 1, &tm, &mb, n_meta, &ob, rows).unwrap()
        });
        let got = read(gpu, &ob, rows * d);
        let stored = weights_as_stored(&table, vocab, d, dtype);
        let mut want = meta.clone();
        for &id in &ids[1..1 + n_tok] {
            want.extend_from_slice(&stored[id as usize * d..(id as usize + 1) * d]);
        }
        assert_close("embed", &got, &want, 0.0, 0.0);
    }
}

fn rope_table(n_pos: usize, half: usize, base: f64) -> Vec<f32> {
    let mut cs = Vec::new();
    for p in 0..n_pos {
        for j in 0..half {
            let inv = 1.0f32 / (base.powf((2 * j) as f64 / (2 * half) as f64)) as f32;
            let a = p as f32 * inv;
            cs.push((a as f64).cos() as f32);
            cs.push((a as f64).sin() as f32);
        }
    }
    cs
}

fn rotate(v: &[f32], cs: &[f32], pos: usize) -> Vec<f32> {
    let half = v.len() / 2;
    let mut o = v.to_vec();
    for j in 0..half {
        let (c, s) = (cs[(pos * half + j) * 2], cs[(pos * half + j) * 2 + 1]);
        o[j] = v[j] * c - v[j + half] * s;
        o[j + half] = v[j + half] * c + v[j] * s;
    }
    o
}

const KV_DTYPES: [KvDtype; 2] = [KvDtype::F32, KvDtype::F16];

/// Absolute tolerance of a decode step's attention output against another computation of it
/// (store_kv + rope + the prompt attention, or the CPU), for outputs of ~0.01-0.1. With an f16
/// cache each rounds the step's rotated key to f16 from its own `a * c - b * s`, which a GPU
/// compiler may contract into an FMA in one shader (or not, on the CPU): one f32 ulp apart can
/// round to f16 values one f16 ulp apart. On an H200 that moved outputs by 1.4e-5 to 2.2e-5.
/// An error of the kernels themselves is far larger.
fn self_key_tol(dtype: KvDtype) -> f32 {
    match dtype {
        KvDtype::F32 => 1e-5,
        KvDtype::F16 => 1e-4,
    }
}

/// `x` as an f16 KV cache holds it (round to nearest even; NaN stays NaN); f32: unchanged.
fn kv_round(x: &[f32], dtype: KvDtype) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => x.to_vec(),
        KvDtype::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
    }
}

/// A KV-cache buffer holding `x` (logical f32 elements) in `dtype`'s layout: f16 as u32 words
/// of two, element 2i in the low half.
fn kv_upload(gpu: &Gpu, x: &[f32], dtype: KvDtype) -> wgpu::Buffer {
    match dtype {
        KvDtype::F32 => gpu.upload("kv", x).unwrap(),
        KvDtype::F16 => {
            assert_eq!(x.len() % 2, 0);
            let words: Vec<u32> = x
                .chunks_exact(2)
                .map(|p| {
                    half::f16::from_f32(p[0]).to_bits() as u32
                        | (half::f16::from_f32(p[1]).to_bits() as u32) << 16
                })
                .collect();
            gpu.upload("kv", &words).unwrap()
        }
    }
}

/// Reads `n` logical elements of a KV-cache buffer back as f32.
fn kv_read(gpu: &Gpu, b: &wgpu::Buffer, n: usize, dtype: KvDtype) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => read(gpu, b, n),
        KvDtype::F16 => pollster::block_on(gpu.read_u32(b, 0, (n / 2) as u64))
            .unwrap()
            .iter()
            .flat_map(|&w| {
                [
                    half::f16::from_bits(w as u16).to_f32(),
                    half::f16::from_bits((w >> 16) as u16).to_f32(),
                ]
            })
            .collect(),
    }
}

fn kv<'a>(k: &'a wgpu::Buffer, v: &'a wgpu::Buffer, dtype: KvDtype) -> KvBuffers<'a> {
    KvBuffers { k, v, dtype }
}

/// Cached keys: `got` must be `want` (computed in f32 on the CPU) as the cache stores it. f32:
/// within 1e-6 (the GPU may fuse the RoPE multiply-adds). f16: rounded to nearest, so within
/// half an f16 ulp of `want` (round-toward-zero would be off by up to a whole ulp). NaN in
/// `want` marks a slot that must not be written.
#[track_caller]
/// A KV cache's keys and values (buffers `kb`, `vb` in `dtype`'s layout) against the CPU's
/// `want_k`, `want_v` (f32): keys as [`assert_cached_keys`], values exactly as stored.
fn assert_cache_holds(
    name: &str,
    kb: &wgpu::Buffer,
    vb: &wgpu::Buffer,
    want_k: &[f32],
    want_v: &[f32],
    dtype: KvDtype,
) {
    let (gpu, _) = env();
    assert_cached_keys(
        &format!("{name} keys"),
        &kv_read(gpu, kb, want_k.len(), dtype),
        want_k,
        dtype,
    );
    assert_close(
        &format!("{name} values"),
        &kv_read(gpu, vb, want_v.len(), dtype),
        &kv_round(want_v, dtype),
        0.0,
        0.0,
    );
}

fn assert_cached_keys(name: &str, got: &[f32], want: &[f32], dtype: KvDtype) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{name}: element {i} written unexpectedly ({g})");
            continue;
        }
        let tol = match dtype {
            KvDtype::F32 => 1e-6,
            // Half an ulp of the f16 binade of w (2^-11 relative; subnormals 2^-25), plus the
            // f32 rounding of a fused RoPE.
            KvDtype::F16 => w.abs().max(6.1e-5) * (0.5 / 1024.0) * 1.0001 + 1e-7,
        };
        assert!(
            (g - w).abs() <= tol,
            "{name}: element {i}: got {g}, want {w} (|err| {}, allowed {tol})",
            (g - w).abs()
        );
    }
}

#[test]
fn rope_queries_and_kv_store_into_ring() {
    for dtype in KV_DTYPES {
        rope_queries_and_kv_store_into_ring_with(dtype);
    }
}

fn rope_queries_and_kv_store_into_ring_with(dtype: KvDtype) {
    let (gpu, ks) = env();
    let mut r = Rng::new(13);
    let (rows, hq, hkv, dqk, dv) = (7, 3, 2, 12, 20);
    // Positions 4..10 wrap the 8-slot ring (text index 8 lands in slot 0 of the ring). A chunk
    // never holds more rows than the ring (the engine's ring is window + chunk), so no two rows
    // of one dispatch share a slot.
    let (n_meta, ring) = (2, 8);
    let cap = n_meta + ring;
    let pos0 = 4;
    let width = hq * dqk + hkv * dqk + hkv * dv + 3;
    let p_off = 2;
    let pdata = r.vec(p_off + rows * width, 1.0);
    let cs = rope_table(32, dqk / 2, 1234.5);
    let csb = gpu.upload("cs", &cs).unwrap();
    let pb = gpu.upload("p", &pdata).unwrap();
    let kb = kv_upload(gpu, &vec![NAN; hkv * cap * dqk], dtype);
    let vb = kv_upload(gpu, &vec![NAN; hkv * cap * dv], dtype);
    let base = RopeParams {
        rows: rows as u32,
        n_heads: hq as u32,
        d_qk: dqk as u32,
        d_v: dv as u32,
        p_off: p_off as u32,
        p_stride: width as u32,
        q_col: 0,
        v_col: (hq * dqk + hkv * dqk) as u32,
        pos0: pos0 as u32,
        n_meta: n_meta as u32,
        ring: ring as u32,
        cap: cap as u32,
    };
    run(gpu, |rec| {
        ks.store_kv(
            rec,
            &csb,
            &pb,
            kv(&kb, &vb, dtype),
            RopeParams {
                n_heads: hkv as u32,
                q_col: (hq * dqk) as u32,
                ..base
            },
        )
        .unwrap();
        ks.rope_q(rec, &csb, &pb, base).unwrap();
    });
    let got_p = read(gpu, &pb, pdata.len());
    let got_k = kv_read(gpu, &kb, hkv * cap * dqk, dtype);
    let got_v = kv_read(gpu, &vb, hkv * cap * dv, dtype);
    let mut want_p = pdata.clone();
    let mut want_k = vec![NAN; hkv * cap * dqk];
    let mut want_v = vec![NAN; hkv * cap * dv];
    for t in 0..rows {
        let row = p_off + t * width;
        let pos = pos0 + t;
        for h in 0..hq {
            let q = &pdata[row + h * dqk..row + (h + 1) * dqk];
            want_p[row + h * dqk..row + (h + 1) * dqk].copy_from_slice(&rotate(q, &cs, pos));
        }
        let slot = if pos < n_meta {
            pos
        } else {
            n_meta + (pos - n_meta) % ring
        };
        for h in 0..hkv {
            let k = &pdata[row + hq * dqk + h * dqk..row + hq * dqk + (h + 1) * dqk];
            want_k[(h * cap + slot) * dqk..(h * cap + slot + 1) * dqk]
                .copy_from_slice(&rotate(k, &cs, pos));
            let v0 = row + hq * dqk + hkv * dqk + h * dv;
            want_v[(h * cap + slot) * dv..(h * cap + slot + 1) * dv]
                .copy_from_slice(&pdata[v0..v0 + dv]);
        }
    }
    assert_close("rope q", &got_p, &want_p, 1e-6, 1e-6);
    // Meta slots were never written (positions start at 4): they stay NaN. Keys within the
    // storage's rounding of the f32 rotation; values exactly as the storage rounds them.
    assert_cached_keys(&format!("{dtype:?} k cache"), &got_k, &want_k, dtype);
    let want_v = kv_round(&want_v, dtype);
    for (i, (g, w)) in got_v.iter().zip(&want_v).enumerate() {
        if w.is_nan() {
            assert!(
                g.is_nan(),
                "{dtype:?} v cache: element {i} written unexpectedly"
            );
        } else {
            assert_eq!(g, w, "{dtype:?} v cache: element {i}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    hq: usize,
    hkv: usize,
    dqk: usize,
    dv: usize,
    qpos: usize,
    keys: &[usize],
) -> Vec<f32> {
    // k, v indexed by absolute position: [pos][hkv][d]
    let mut out = vec![0f32; hq * dv];
    for h in 0..hq {
        let kh = h / (hq / hkv);
        let s: Vec<f64> = keys
            .iter()
            .map(|&p| {
                (0..dqk)
                    .map(|e| q[h * dqk + e] as f64 * k[(p * hkv + kh) * dqk + e] as f64)
                    .sum::<f64>()
                    / (dqk as f64).sqrt()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for e in 0..dv {
            out[h * dv + e] = (keys
                .iter()
                .zip(&s)
                .map(|(&p, &x)| (x - m).exp() / z * v[(p * hkv + kh) * dv + e] as f64)
                .sum::<f64>()) as f32;
        }
        let _ = qpos;
    }
    out
}

fn attention_case(window: Option<usize>, seed: u64) {
    // Small heads; Hymba-1.5B's (d_qk 64, d_v 128: the prompt kernel's eight-wide key loads);
    // d_qk 40 (eight-wide loads plus a remainder).
    // Both KV storages: the f16 one against the same CPU attention over f16-rounded K/V.
    // The last 70 of 150 positions, and all 150 (the first chunk: meta-token queries).
    for dtype in KV_DTYPES {
        for dims in [(6, 2, 16, 40), (10, 2, 64, 128), (4, 1, 40, 24)] {
            for rows in [70, 150] {
                attention_case_dims(window, seed, dims, dtype, rows);
            }
        }
    }
}

fn attention_case_dims(
    window: Option<usize>,
    seed: u64,
    (hq, hkv, dqk, dv): (usize, usize, usize, usize),
    dtype: KvDtype,
    rows: usize,
) {
    let (gpu, ks) = env();
    let mut r = Rng::new(seed);
    let n_meta = 3;
    let total = 150; // positions 0..150; the queries are the last `rows` of them
    let pos0 = total - rows;
    let ring = match window {
        Some(w) => w + rows, // the chunk's keys plus the window before it
        None => total - n_meta,
    };
    let cap = n_meta + ring;
    // K/V as the cache holds them (the CPU reference uses these too).
    let kall = kv_round(&r.vec(total * hkv * dqk, 1.0), dtype);
    let vall = kv_round(&r.vec(total * hkv * dv, 1.0), dtype);
    // Fill the cache: meta slots, and ring slots for the positions still held.
    let mut kc = vec![NAN; hkv * cap * dqk];
    let mut vc = vec![NAN; hkv * cap * dv];
    for p in 0..total {
        if p >= n_meta && p + ring < total {
            continue; // overwritten in the ring
        }
        let s = if p < n_meta {
            p
        } else {
            n_meta + (p - n_meta) % ring
        };
        for h in 0..hkv {
            kc[(h * cap + s) * dqk..(h * cap + s + 1) * dqk]
                .copy_from_slice(&kall[(p * hkv + h) * dqk..(p * hkv + h + 1) * dqk]);
            vc[(h * cap + s) * dv..(h * cap + s + 1) * dv]
                .copy_from_slice(&vall[(p * hkv + h) * dv..(p * hkv + h + 1) * dv]);
        }
    }
    let q_stride = hq * dqk + 5;
    let q = r.vec(rows * q_stride, 1.0);
    let out_stride = hq * dv;
    let kb = kv_upload(gpu, &kc, dtype);
    let vb = kv_upload(gpu, &vc, dtype);
    let qb = gpu.upload("q", &q).unwrap();
    let p = AttentionParams {
        rows: rows as u32,
        n_heads: hq as u32,
        n_kv_heads: hkv as u32,
        d_qk: dqk as u32,
        d_v: dv as u32,
        q_off: 0,
        q_stride: q_stride as u32,
        out_off: 0,
        out_stride: out_stride as u32,
        pos0: pos0 as u32,
        n_meta: n_meta as u32,
        ring: ring as u32,
        cap: cap as u32,
        window: window.map(|w| w as u32).unwrap_or(NO_WINDOW),
        scale: 1.0 / (dqk as f32).sqrt(),
        k_col: 0,
        v_col: 0,
        self_kv: 0,
    };
    // The FMA form everywhere; the tensor-core form too where the adapter has it (f16 cache,
    // d_qk <= 64), against the reference over f16-rounded scaled queries, with a tolerance for
    // the probabilities' f16 rounding.
    let coop_too = ks.coop_attention() && dtype == KvDtype::F16 && dqk <= 64;
    for coop in [false, true] {
        if coop && !coop_too {
            continue;
        }
        let ob = gpu.upload("o", &vec![NAN; rows * out_stride]).unwrap();
        run(gpu, |rec| {
            ks.attention_with(rec, &qb, kv(&kb, &vb, dtype), &ob, p, coop)
                .unwrap()
        });
        let got = read(gpu, &ob, rows * out_stride);
        let scale = p.scale;
        let qr: Vec<f32> = if coop {
            q.iter()
                .map(|&v| half::f16::from_f32(v * scale).to_f32() / scale)
                .collect()
        } else {
            q.clone()
        };
        let mut want = Vec::new();
        for t in 0..rows {
            let qp = pos0 + t;
            let keys: Vec<usize> = (0..=qp)
                .filter(|&kp| kp < n_meta || window.is_none_or(|w| qp - kp <= w))
                .collect();
            want.extend(attention_ref(
                &qr[t * q_stride..t * q_stride + hq * dqk],
                &kall,
                &vall,
                hq,
                hkv,
                dqk,
                dv,
                qp,
                &keys,
            ));
        }
        let (atol, rtol) = if coop { (2e-3, 5e-3) } else { (2e-5, 1e-4) };
        assert_close(
            &format!("{dtype:?} attention (coop {coop})"),
            &got,
            &want,
            atol,
            rtol,
        );
    }
}

#[test]
fn attention_global_gqa() {
    attention_case(None, 21);
}

#[test]
fn attention_sliding_window_ring_with_meta() {
    attention_case(Some(17), 22);
}

#[test]
fn conv1d_with_state() {
    let (gpu, ks) = env();
    let mut r = Rng::new(31);
    let (rows, d, k) = (11, 70, 4);
    let stride = d + 9;
    let x_off = 4;
    let p = r.vec(x_off + rows * stride, 1.0);
    let w = r.vec(d * k, 0.7);
    let b = r.vec(d, 0.3);
    let st = r.vec(d * k, 1.0);
    let mut wbv = w.clone();
    wbv.extend(&b);
    let pb = gpu.upload("p", &p).unwrap();
    let wb = gpu.upload("wb", &wbv).unwrap();
    let sb = gpu.upload("s", &st).unwrap();
    let xb = gpu.upload("xc", &vec![NAN; rows * d]).unwrap();
    let params = ConvParams {
        rows: rows as u32,
        d: d as u32,
        k: k as u32,
        x_off: x_off as u32,
        x_stride: stride as u32,
        has_bias: 1,
    };
    run(gpu, |rec| ks.conv(rec, &pb, &wb, &sb, &xb, params).unwrap());
    let got = read(gpu, &xb, rows * d);
    let got_s = read(gpu, &sb, d * k);
    let mut want = vec![0f32; rows * d];
    let mut want_s = vec![0f32; d * k];
    for c in 0..d {
        let mut seq: Vec<f32> = (0..k).map(|j| st[c * k + j]).collect();
        seq.extend((0..rows).map(|t| p[x_off + t * stride + c]));
        for t in 0..rows {
            let mut acc = b[c] as f64;
            for j in 0..k {
                acc += w[c * k + j] as f64 * seq[t + j + 1] as f64;
            }
            let a = acc as f32;
            want[t * d + c] = a / (1.0 + (-a).exp());
        }
        for j in 0..k {
            want_s[c * k + j] = seq[seq.len() - k + j];
        }
    }
    assert_close("conv", &got, &want, 1e-5, 1e-5);
    assert_close("conv state", &got_s, &want_s, 0.0, 0.0);
}

#[test]
fn selective_scan_chunk_and_step() {
    // n = 5 takes the one-lane-per-channel scan everywhere; n = 8 and 16 take the
    // one-lane-per-(channel, state) scan where subgroups are 32 wide (GPUs), over more rows
    // than one of its blocks.
    let (gpu, ks) = env();
    let mut r = Rng::new(41);
    // The last two cases are long enough for the scan over row groups where it runs (GPUs):
    // 200 rows in 6 groups of 34 (the last 30), 97 rows in 3 of 33 (the last 31).
    for (rows, n) in [
        (13usize, 5usize),
        (1, 5),
        (70, 16),
        (37, 8),
        (1, 16),
        (200, 16),
        (97, 8),
    ] {
        let (d, rank) = (70, 3);
        let xs = rank + 2 * n;
        let zw = 2 * d + 3;
        let z_off = d + 1;
        let xc = r.vec(rows * d, 1.0);
        let dtr: Vec<f32> = (0..rows * d)
            .map(|i| if i == 3 { 25.0 } else { r.f() * 3.0 - 2.0 })
            .collect();
        let xp = r.vec(rows * xs, 1.0);
        let pz = r.vec(rows * zw, 2.0);
        let a_log: Vec<f32> = (0..d * n).map(|_| r.f() * 1.5).collect();
        let dtb = r.vec(d, 0.5);
        let dd = r.vec(d, 1.0);
        let st = r.vec(d * n, 1.0);
        let mut consts: Vec<f32> = a_log.iter().map(|&a| -a.exp()).collect();
        consts.extend(&dtb);
        consts.extend(&dd);
        let bx = gpu.upload("xc", &xc).unwrap();
        let bd = gpu.upload("dt", &dtr).unwrap();
        let bp = gpu.upload("xp", &xp).unwrap();
        let bz = gpu.upload("z", &pz).unwrap();
        let bc = gpu.upload("c", &consts).unwrap();
        // Each case twice: without and with room for the row groups' hand-over (poisoned).
        for grouped in [false, true] {
            let bs = gpu.upload("s", &st).unwrap();
            let by = gpu.upload("y", &vec![NAN; rows * d]).unwrap();
            let carry = gpu.upload("carry", &vec![NAN; 9 * d * n + 8 * d]).unwrap();
            let params = ScanParams {
                rows: rows as u32,
                d: d as u32,
                n: n as u32,
                xp_stride: xs as u32,
                b_col: rank as u32,
                c_col: (rank + n) as u32,
                z_off: z_off as u32,
                z_stride: zw as u32,
                rank: rank as u32,
                wdt_stride: 0,
                eps: 1e-6,
                inner_norms: 0,
                x_off: 0,
                conv_k: 0,
                xp_parts: 1,
                ..Default::default()
            };
            run(gpu, |rec| {
                ks.scan(
                    rec,
                    &bx,
                    &bd,
                    &bp,
                    &bz,
                    &bc,
                    &bs,
                    &by,
                    grouped.then_some(&carry),
                    params,
                )
                .unwrap()
            });
            let got = read(gpu, &by, rows * d);
            let got_s = read(gpu, &bs, d * n);
            let mut want = vec![0f32; rows * d];
            let mut h: Vec<f64> = st.iter().map(|&v| v as f64).collect();
            for t in 0..rows {
                for c in 0..d {
                    let mut dt = (dtr[t * d + c] + dtb[c]) as f64;
                    if dt <= 20.0 {
                        dt = dt.exp().ln_1p();
                    }
                    let x = xc[t * d + c] as f64;
                    let mut y = 0f64;
                    for i in 0..n {
                        let a = -(a_log[c * n + i] as f64).exp();
                        h[c * n + i] =
                            (dt * a).exp() * h[c * n + i] + dt * xp[t * xs + rank + i] as f64 * x;
                        y += xp[t * xs + rank + n + i] as f64 * h[c * n + i];
                    }
                    y += dd[c] as f64 * x;
                    let z = pz[z_off + t * zw + c] as f64;
                    want[t * d + c] = (y * z / (1.0 + (-z).exp())) as f32;
                }
            }
            let want_s: Vec<f32> = h.iter().map(|&v| v as f32).collect();
            let what = format!("scan, {rows} rows, n {n}, grouped {grouped}");
            assert_close(&what, &got, &want, 1e-4, 1e-4);
            assert_close(&format!("{what}: state"), &got_s, &want_s, 1e-4, 1e-4);
        }
    }
}

#[test]
fn merge_two_norms() {
    let (gpu, ks) = env();
    let mut r = Rng::new(51);
    let (rows, width) = (3, 333);
    let a = r.vec(rows * width, 2.0);
    let s = r.vec(rows * width, 0.5);
    let w = r.vec(2 * width, 1.0);
    let (ba, bs, bw) = (
        gpu.upload("a", &a).unwrap(),
        gpu.upload("s", &s).unwrap(),
        gpu.upload("w", &w).unwrap(),
    );
    let bo = gpu.upload("o", &vec![NAN; rows * width]).unwrap();
    run(gpu, |rec| {
        ks.merge(rec, &ba, &bs, &bw, &bo, rows, width, 1e-6)
            .unwrap()
    });
    let got = read(gpu, &bo, rows * width);
    let mut want = Vec::new();
    for t in 0..rows {
        let na = rms_ref(&a[t * width..(t + 1) * width], &w[..width], 1e-6);
        let ns = rms_ref(&s[t * width..(t + 1) * width], &w[width..], 1e-6);
        want.extend(na.iter().zip(&ns).map(|(x, y)| (x + y) / 2.0));
    }
    assert_close("merge", &got, &want, 1e-5, 1e-5);
}

#[test]
fn swiglu_on_concatenated_gate_up() {
    let (gpu, ks) = env();
    let mut r = Rng::new(61);
    let (rows, width) = (7, 149);
    let gu = r.vec(rows * 2 * width, 4.0);
    let b = gpu.upload("gu", &gu).unwrap();
    run(gpu, |rec| ks.swiglu(rec, &b, rows, width).unwrap());
    let got = read(gpu, &b, gu.len());
    let mut want = gu.clone();
    for t in 0..rows {
        for j in 0..width {
            let g = gu[t * 2 * width + j];
            want[t * 2 * width + j] = g / (1.0 + (-g).exp()) * gu[t * 2 * width + width + j];
        }
    }
    assert_close("swiglu", &got, &want, 1e-6, 1e-5);
}

#[test]
fn state_copy_copies_both_pairs_exactly() {
    // Sizes: a small conv-like state and one larger than the 1024-workgroup grid covers at once
    // (grid-stride); destinations one vec4 longer than the sources and poisoned, so a missed or
    // stray write shows.
    let (gpu, ks) = env();
    let mut r = Rng::new(67);
    for (an, bn) in [(3 * 4usize, 5 * 4usize), (50 * 4, 270_001 * 4)] {
        let a = r.vec(an, 3.0);
        let b = r.vec(bn, 3.0);
        let (sa, sb) = (gpu.upload("a", &a).unwrap(), gpu.upload("b", &b).unwrap());
        let da = gpu.upload("da", &vec![f32::NAN; an + 4]).unwrap();
        let db = gpu.upload("db", &vec![f32::NAN; bn + 4]).unwrap();
        run(gpu, |rec| ks.state_copy(rec, &sa, &da, &sb, &db).unwrap());
        let (ga, gb) = (read(gpu, &da, an + 4), read(gpu, &db, bn + 4));
        assert_eq!(ga[..an], a[..], "conv-state copy ({an} floats)");
        assert_eq!(gb[..bn], b[..], "SSM-state copy ({bn} floats)");
        assert!(
            ga[an..].iter().chain(&gb[bn..]).all(|v| v.is_nan()),
            "write past the source size"
        );
    }
}

fn gemv_pro_case(dtype: WeightDtype, which: usize, rows: usize, m: usize, k: usize, seed: u64) {
    // This adapter's kernels and the other family (GPUs' workgroup GEMVs on a CPU adapter, the
    // row-per-thread ones on a GPU).
    let (gpu, ks) = env();
    static OTHER: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    // The workgroup family takes gemv_wide here even without 32-wide subgroups (lavapipe), so
    // that its workgroup-memory reductions are tested too.
    let other = OTHER.get_or_init(|| {
        Kernels::new_with(gpu, !ks.cpu_adapter())
            .unwrap()
            .with_wide_gemv(true)
    });
    for kern in [ks, other] {
        gemv_pro_case_with(kern, dtype, which, rows, m, k, seed);
    }
}

fn gemv_pro_case_with(
    ks: &Kernels,
    dtype: WeightDtype,
    which: usize,
    rows: usize,
    m: usize,
    k: usize,
    seed: u64,
) {
    let (gpu, _) = env();
    let mut r = Rng::new(seed);
    let xw = if which == 2 { 2 * k } else { k };
    let x_stride = xw + 3;
    let x = r.vec(rows * x_stride, 2.0);
    let x2 = r.vec(rows * x_stride, 0.7);
    let nw = r.vec(2 * k, 1.0);
    let w = r.vec(m * k, 0.5);
    let acc = which == 1;
    let y0: Vec<f32> = if acc {
        r.vec(rows * m, 1.0)
    } else {
        vec![NAN; rows * m]
    };
    let mat = Matrix::upload(gpu, "w", &w, m, k, dtype).unwrap();
    let (xb, x2b, nb, yb) = (
        gpu.upload("x", &x).unwrap(),
        gpu.upload("x2", &x2).unwrap(),
        gpu.upload("n", &nw).unwrap(),
        gpu.upload("y", &y0).unwrap(),
    );
    let pro = match which {
        0 => Prologue::Norm(&nb, 1e-6),
        1 => Prologue::Merge {
            w: &nb,
            x2: &x2b,
            eps: 1e-6,
        },
        _ => Prologue::Swiglu,
    };
    run(gpu, |rec| {
        ks.gemv_pro(rec, &xb, 0, x_stride, &mat, pro, &yb, 0, m, rows, acc)
            .unwrap()
    });
    let got = read(gpu, &yb, rows * m);
    let wq = weights_as_stored(&w, m, k, dtype);
    let mut want = vec![0f32; rows * m];
    for t in 0..rows {
        let row = &x[t * x_stride..t * x_stride + xw];
        let xin: Vec<f32> = match which {
            0 => rms_ref(&row[..k], &nw[..k], 1e-6),
            1 => {
                let a = rms_ref(&row[..k], &nw[..k], 1e-6);
                let b = rms_ref(&x2[t * x_stride..t * x_stride + k], &nw[k..], 1e-6);
                a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect()
            }
            _ => (0..k)
                .map(|j| row[j] / (1.0 + (-row[j]).exp()) * row[k + j])
                .collect(),
        };
        for j in 0..m {
            let mut s = 0f64;
            for kk in 0..k {
                s += xin[kk] as f64 * wq[j * k + kk] as f64;
            }
            if acc {
                s += y0[t * m + j] as f64;
            }
            want[t * m + j] = s as f32;
        }
    }
    assert_close(
        &format!("gemv prologue {which} {dtype:?}"),
        &got,
        &want,
        1e-4,
        1e-4,
    );
}

#[test]
fn gemv_with_fused_prologues() {
    for (i, dtype) in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
    ]
    .into_iter()
    .enumerate()
    {
        gemv_pro_case(dtype, 0, 1, 37, 300, 81 + i as u64);
        gemv_pro_case(dtype, 1, 2, 45, 333, 83 + i as u64);
        gemv_pro_case(dtype, 2, 1, 29, 70, 85 + i as u64);
        gemv_pro_case(dtype, 2, 1, 19, 8400, 87 + i as u64);
        gemv_pro_case(dtype, 0, 1, 4300, 40, 89 + i as u64);
        // odd and even numbers of 8-row passes per workgroup, the RMS-norm
        // prologue staged and unstaged, SwiGLU with several passes
        gemv_pro_case(dtype, 0, 1, 6500, 64, 91 + i as u64);
        gemv_pro_case(dtype, 0, 1, 23, 7000, 93 + i as u64);
        gemv_pro_case(dtype, 2, 1, 4500, 50, 95 + i as u64);
        gemv_pro_case(dtype, 1, 1, 9000, 40, 97 + i as u64);
        // the merge's one-pass prologue at out_proj's K (3200; K over 4096 takes two passes,
        // the K = 5000 case below)
        gemv_pro_case(dtype, 1, 2, 41, 3200, 115 + i as u64);
        // K over one register block of weights (2048) but staged; tall enough for 2 passes
        gemv_pro_case(dtype, 0, 1, 50, 3000, 99 + i as u64);
        gemv_pro_case(dtype, 2, 1, 40, 2500, 101 + i as u64);
        gemv_pro_case(dtype, 0, 1, 17000, 24, 103 + i as u64);
        // merge and SwiGLU prologues over K of thousands (unrolled staging), two X rows
        gemv_pro_case(dtype, 1, 1, 37, 5000, 105 + i as u64);
        gemv_pro_case(dtype, 2, 2, 23, 4200, 107 + i as u64);
        // gemv_wide's limits (16-bit and quantized weights): K of exactly 2048 (every thread
        // has a chunk), three X rows, and just past it (gemv again)
        gemv_pro_case(dtype, 0, 3, 1234, 2048, 109 + i as u64);
        gemv_pro_case(dtype, 2, 2, 130, 2048, 111 + i as u64);
        gemv_pro_case(dtype, 0, 1, 70, 2056, 113 + i as u64);
    }
}

/// CPU reference for one decode step of attention at position q: keys are the meta slots and the
/// text positions [max(n_meta, q - window), q]; in a KV-owning layer the key (rotated here) and
/// value of q come from the in_proj row, rounded as `dtype` stores them, every other position
/// from its cache slot (`kc` / `vc` as the cache holds them).
#[allow(clippy::too_many_arguments)]
fn decode_attention_cpu(
    dtype: KvDtype,
    prow: &[f32],
    kc: &[f32],
    vc: &[f32],
    cs: &[f32],
    hq: usize,
    hkv: usize,
    dqk: usize,
    dv: usize,
    n_meta: usize,
    ring: usize,
    q: usize,
    window: Option<usize>,
    self_kv: bool,
    scale: f32,
) -> Vec<f32> {
    let cap = n_meta + ring;
    let k_col = hq * dqk;
    let v_col = hq * dqk + hkv * dqk;
    let lo = match window {
        Some(w) if q > w => (q - w).max(n_meta),
        _ => n_meta,
    };
    let keys: Vec<usize> = (0..n_meta.min(q + 1)).chain(lo..=q).collect();
    let mut out = vec![0f32; hq * dv];
    for h in 0..hq {
        let kvh = h / (hq / hkv);
        let qr = rotate(&prow[h * dqk..(h + 1) * dqk], cs, q);
        let kv = |pos: usize| -> (Vec<f32>, Vec<f32>) {
            if self_kv && pos == q {
                (
                    kv_round(
                        &rotate(&prow[k_col + kvh * dqk..k_col + (kvh + 1) * dqk], cs, q),
                        dtype,
                    ),
                    kv_round(&prow[v_col + kvh * dv..v_col + (kvh + 1) * dv], dtype),
                )
            } else {
                let sl = if pos < n_meta {
                    pos
                } else {
                    n_meta + (pos - n_meta) % ring
                };
                (
                    kc[(kvh * cap + sl) * dqk..(kvh * cap + sl + 1) * dqk].to_vec(),
                    vc[(kvh * cap + sl) * dv..(kvh * cap + sl + 1) * dv].to_vec(),
                )
            }
        };
        let kvs: Vec<(Vec<f32>, Vec<f32>)> = keys.iter().map(|&p| kv(p)).collect();
        let sc: Vec<f64> = kvs
            .iter()
            .map(|(k, _)| (0..dqk).map(|e| qr[e] as f64 * k[e] as f64).sum::<f64>() * scale as f64)
            .collect();
        let m = sc.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        for e in 0..dv {
            out[h * dv + e] = (kvs
                .iter()
                .zip(&sc)
                .map(|((_, v), x)| (x - m).exp() / z * v[e] as f64)
                .sum::<f64>()) as f32;
        }
    }
    out
}

/// The cache after a decode step at position q stores this step's key (rotated) and value in
/// q's slot of every KV head: `kc` / `vc` with that slot replaced, in f32 (the caller compares
/// with the storage's rounding).
#[allow(clippy::too_many_arguments)]
fn cache_after_store(
    kc: &[f32],
    vc: &[f32],
    prow: &[f32],
    cs: &[f32],
    (hq, hkv, dqk, dv): (usize, usize, usize, usize),
    n_meta: usize,
    ring: usize,
    q: usize,
) -> (Vec<f32>, Vec<f32>) {
    let cap = n_meta + ring;
    let (k_col, v_col) = (hq * dqk, hq * dqk + hkv * dqk);
    let sl = if q < n_meta {
        q
    } else {
        n_meta + (q - n_meta) % ring
    };
    let (mut k, mut v) = (kc.to_vec(), vc.to_vec());
    for h in 0..hkv {
        k[(h * cap + sl) * dqk..(h * cap + sl + 1) * dqk].copy_from_slice(&rotate(
            &prow[k_col + h * dqk..k_col + (h + 1) * dqk],
            cs,
            q,
        ));
        v[(h * cap + sl) * dv..(h * cap + sl + 1) * dv]
            .copy_from_slice(&prow[v_col + h * dv..v_col + (h + 1) * dv]);
    }
    (k, v)
}

#[test]
fn attention_decode_split_matches_unfused() {
    // Decode step at position q: the split kernel (RoPE on q, key/value of q from the in_proj
    // row, cache write, combine) must equal store_kv + rope_q + attention with the decode window,
    // in a KV-owning layer (self_kv = 1) and in a consumer (0).
    // Both split kernels: the GPU one (256 threads) and the CPU-adapter one (64 threads).
    let (gpu, ks) = env();
    // Both KV storages.
    let other = Kernels::new_with(gpu, !ks.cpu_adapter()).unwrap();
    for dtype in KV_DTYPES {
        attention_decode_split_matches_unfused_with(ks, dtype);
        attention_decode_split_matches_unfused_with(&other, dtype);
    }
}

fn attention_decode_split_matches_unfused_with(ks: &Kernels, dtype: KvDtype) {
    let (gpu, _) = env();
    let mut r = Rng::new(91);
    let (hq, hkv, dqk, dv) = (6, 2, 16, 40);
    let (n_meta, w) = (3usize, 9usize);
    let ring = w + 4;
    let cap = n_meta + ring;
    let q = 40usize;
    let cs = rope_table(64, dqk / 2, 777.0);
    let csb = gpu.upload("cs", &cs).unwrap();
    // The cache's contents as it stores them.
    let kc = kv_round(&r.vec(hkv * cap * dqk, 1.0), dtype);
    let vc = kv_round(&r.vec(hkv * cap * dv, 1.0), dtype);
    let width = hq * dqk + hkv * dqk + hkv * dv + 2;
    let prow = r.vec(width, 1.0);
    for self_kv in [1u32, 0] {
        let mk = |p: &Vec<f32>| gpu.upload("b", p).unwrap();
        let mkc = |p: &Vec<f32>| kv_upload(gpu, p, dtype);
        let (k1, v1, p1) = (mkc(&kc), mkc(&vc), mk(&prow));
        let o1 = gpu.upload("o1", &vec![NAN; hq * dv]).unwrap();
        let ap = AttentionParams {
            rows: 1,
            n_heads: hq as u32,
            n_kv_heads: hkv as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            q_off: 0,
            q_stride: width as u32,
            out_off: 0,
            out_stride: (hq * dv) as u32,
            pos0: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
            window: (w - 1) as u32,
            scale: 0.25,
            k_col: (hq * dqk) as u32,
            v_col: (hq * dqk + hkv * dqk) as u32,
            self_kv,
        };
        let rp = RopeParams {
            rows: 1,
            n_heads: hq as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            p_off: 0,
            p_stride: width as u32,
            q_col: 0,
            v_col: (hq * dqk + hkv * dqk) as u32,
            pos0: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
        };
        run(gpu, |rec| {
            if self_kv == 1 {
                ks.store_kv(
                    rec,
                    &csb,
                    &p1,
                    kv(&k1, &v1, dtype),
                    RopeParams {
                        n_heads: hkv as u32,
                        q_col: (hq * dqk) as u32,
                        ..rp
                    },
                )
                .unwrap();
            }
            ks.rope_q(rec, &csb, &p1, rp).unwrap();
            // The f32 prompt kernel (not the tensor-core one, which rounds Q and P to f16).
            ks.attention_with(
                rec,
                &p1,
                kv(&k1, &v1, dtype),
                &o1,
                AttentionParams { self_kv: 0, ..ap },
                false,
            )
            .unwrap();
        });
        // The split (flash-decoding) kernel on a third copy, with more splits than keys need.
        let (k3, v3, p3) = (mkc(&kc), mkc(&vc), mk(&prow));
        let o3 = gpu.upload("o3", &vec![NAN; hq * dv]).unwrap();
        let n_splits = 3u32;
        let part = gpu
            .upload("part", &vec![NAN; hq * n_splits as usize * (2 + dv)])
            .unwrap();
        let dp = AttentionDecodeParams {
            n_heads: hq as u32,
            n_kv_heads: hkv as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            q_stride: width as u32,
            k_col: (hq * dqk) as u32,
            v_col: (hq * dqk + hkv * dqk) as u32,
            self_kv,
            pos: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
            window: (w - 1) as u32,
            scale: 0.25,
            n_splits,
        };
        run(gpu, |rec| {
            ks.attention_split(rec, &p3, &csb, kv(&k3, &v3, dtype), &part, &o3, dp)
                .unwrap()
        });
        assert_close(
            &format!("{dtype:?} split decode attention"),
            &read(gpu, &o3, hq * dv),
            &read(gpu, &o1, hq * dv),
            self_key_tol(dtype),
            1e-5,
        );
        let want = decode_attention_cpu(
            dtype,
            &prow,
            &kc,
            &vc,
            &cs,
            hq,
            hkv,
            dqk,
            dv,
            n_meta,
            ring,
            q,
            Some(w - 1),
            self_kv == 1,
            0.25,
        );
        assert_close(
            &format!("{dtype:?} split decode attention vs CPU"),
            &read(gpu, &o3, hq * dv),
            &want,
            self_key_tol(dtype).max(2e-5),
            1e-4,
        );
        // The cache: in a KV-owning layer this step's key and value in q's slot, the rest as
        // it was; a consumer writes nothing.
        let (want_k, want_v) = if self_kv == 1 {
            cache_after_store(&kc, &vc, &prow, &cs, (hq, hkv, dqk, dv), n_meta, ring, q)
        } else {
            (kc.clone(), vc.clone())
        };
        for (name, kb, vb) in [("split", &k3, &v3), ("unfused", &k1, &v1)] {
            assert_cache_holds(
                &format!("{dtype:?} {name} decode"),
                kb,
                vb,
                &want_k,
                &want_v,
                dtype,
            );
        }
    }
}

#[test]
fn attention_split_over_many_key_blocks() {
    // A global layer at position 150 (151 visible keys, 3 splits of 64 plus 2 empty ones) and a
    // sliding window wrapping its ring: split + combine must equal the one-workgroup kernel.
    // Both split kernels: the GPU one (256 threads) and the CPU-adapter one (64 threads).
    let (gpu, ks) = env();
    // Head sizes: small ones; Hymba's (64 / 128: every prefetch slot of the GPU kernel used);
    // a larger d_qk (128: its loop past the prefetched key dimensions). GPUs serve a KV group of
    // up to 8 query heads per workgroup; 10 heads on one KV head take the per-head kernel.
    let other = Kernels::new_with(gpu, !ks.cpu_adapter()).unwrap();
    // The GPU kernels once more with the GQA P.V reduced two heads per round (5 heads: rounds of
    // 2, 2 and 1), where the device allows all of them in one.
    let rounds = Kernels::new_with_gqa_heads(gpu, false, 2).unwrap();
    // Both KV storages.
    for dtype in KV_DTYPES {
        for dims in [
            (4, 2, 8, 24),
            (10, 2, 64, 128),
            (4, 2, 128, 128),
            (10, 1, 16, 24),
        ] {
            attention_split_over_many_key_blocks_with(ks, dims, dtype);
            attention_split_over_many_key_blocks_with(&other, dims, dtype);
            attention_split_over_many_key_blocks_with(&rounds, dims, dtype);
        }
    }
}

fn attention_split_over_many_key_blocks_with(
    ks: &Kernels,
    (hq, hkv, dqk, dv): (usize, usize, usize, usize),
    dtype: KvDtype,
) {
    let (gpu, _) = env();
    let mut r = Rng::new(93 + dv as u64);
    for (n_meta, window, ring, q) in [
        (3usize, None, 200usize, 150usize),
        (5, Some(70usize), 90, 300),
    ] {
        let cap = n_meta + ring;
        let cs = rope_table(400, dqk / 2, 555.0);
        let csb = gpu.upload("cs", &cs).unwrap();
        // The cache's contents as it stores them.
        let kc = kv_round(&r.vec(hkv * cap * dqk, 1.0), dtype);
        let vc = kv_round(&r.vec(hkv * cap * dv, 1.0), dtype);
        let width = hq * dqk + hkv * dqk + hkv * dv;
        let prow = r.vec(width, 1.0);
        let mk = |p: &Vec<f32>| gpu.upload("b", p).unwrap();
        let mkc = |p: &Vec<f32>| kv_upload(gpu, p, dtype);
        let (k1, v1, p1) = (mkc(&kc), mkc(&vc), mk(&prow));
        let (k2, v2, p2) = (mkc(&kc), mkc(&vc), mk(&prow));
        let o1 = gpu.upload("o1", &vec![NAN; hq * dv]).unwrap();
        let o2 = gpu.upload("o2", &vec![NAN; hq * dv]).unwrap();
        let win = window.map(|w| (w - 1) as u32).unwrap_or(NO_WINDOW);
        let rp = RopeParams {
            rows: 1,
            n_heads: hq as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            p_off: 0,
            p_stride: width as u32,
            q_col: 0,
            v_col: (hq * dqk + hkv * dqk) as u32,
            pos0: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
        };
        let ap = AttentionParams {
            rows: 1,
            n_heads: hq as u32,
            n_kv_heads: hkv as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            q_off: 0,
            q_stride: width as u32,
            out_off: 0,
            out_stride: (hq * dv) as u32,
            pos0: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
            window: win,
            scale: 0.3,
            k_col: 0,
            v_col: 0,
            self_kv: 0,
        };
        let n_splits = (cap.div_ceil(64) + 1) as u32;
        let part = gpu
            .upload("part", &vec![NAN; hq * n_splits as usize * (2 + dv)])
            .unwrap();
        let dp = AttentionDecodeParams {
            n_heads: hq as u32,
            n_kv_heads: hkv as u32,
            d_qk: dqk as u32,
            d_v: dv as u32,
            q_stride: width as u32,
            k_col: (hq * dqk) as u32,
            v_col: (hq * dqk + hkv * dqk) as u32,
            self_kv: 1,
            pos: q as u32,
            n_meta: n_meta as u32,
            ring: ring as u32,
            cap: cap as u32,
            window: win,
            scale: 0.3,
            n_splits,
        };
        run(gpu, |rec| {
            ks.store_kv(
                rec,
                &csb,
                &p1,
                kv(&k1, &v1, dtype),
                RopeParams {
                    n_heads: hkv as u32,
                    q_col: (hq * dqk) as u32,
                    ..rp
                },
            )
            .unwrap();
            ks.rope_q(rec, &csb, &p1, rp).unwrap();
            // The f32 prompt kernel (the tensor-core one rounds Q and P to f16).
            ks.attention_with(rec, &p1, kv(&k1, &v1, dtype), &o1, ap, false)
                .unwrap();
            ks.attention_split(rec, &p2, &csb, kv(&k2, &v2, dtype), &part, &o2, dp)
                .unwrap();
        });
        assert_close(
            &format!("{dtype:?} split attention, many blocks"),
            &read(gpu, &o2, hq * dv),
            &read(gpu, &o1, hq * dv),
            self_key_tol(dtype),
            1e-5,
        );
        let want = decode_attention_cpu(
            dtype,
            &prow,
            &kc,
            &vc,
            &cs,
            hq,
            hkv,
            dqk,
            dv,
            n_meta,
            ring,
            q,
            window.map(|w| w - 1),
            true,
            0.3,
        );
        assert_close(
            &format!("{dtype:?} split attention, many blocks, vs CPU"),
            &read(gpu, &o2, hq * dv),
            &want,
            self_key_tol(dtype).max(2e-5),
            1e-4,
        );
        let (want_k, want_v) =
            cache_after_store(&kc, &vc, &prow, &cs, (hq, hkv, dqk, dv), n_meta, ring, q);
        for (name, kb, vb) in [("split", &k2, &v2), ("store_kv", &k1, &v1)] {
            let name = format!("{dtype:?} {name}, many blocks");
            assert_cache_holds(&name, kb, vb, &want_k, &want_v, dtype);
        }
    }
}

#[test]
fn conv_step_matches_chunk_conv() {
    let (gpu, ks) = env();
    let mut r = Rng::new(95);
    let (d, k) = (70, 4);
    let stride = d + 5;
    let p = r.vec(2 + stride, 1.0);
    let mut wbv = r.vec(d * k, 0.7);
    wbv.extend(r.vec(d, 0.3));
    let st = r.vec(d * k, 1.0);
    let params = ConvParams {
        rows: 1,
        d: d as u32,
        k: k as u32,
        x_off: 2,
        x_stride: stride as u32,
        has_bias: 1,
    };
    let pb = gpu.upload("p", &p).unwrap();
    let wb = gpu.upload("wb", &wbv).unwrap();
    let (s1, s2) = (
        gpu.upload("s1", &st).unwrap(),
        gpu.upload("s2", &st).unwrap(),
    );
    let (x1, x2) = (
        gpu.upload("x1", &vec![NAN; d]).unwrap(),
        gpu.upload("x2", &vec![NAN; d]).unwrap(),
    );
    run(gpu, |rec| {
        ks.conv(rec, &pb, &wb, &s1, &x1, params).unwrap();
        ks.conv_step(rec, &pb, &wb, &s2, &x2, params).unwrap();
    });
    assert_close(
        "conv step out",
        &read(gpu, &x2, d),
        &read(gpu, &x1, d),
        1e-6,
        1e-6,
    );
    assert_close(
        "conv step state",
        &read(gpu, &s2, d * k),
        &read(gpu, &s1, d * k),
        0.0,
        0.0,
    );
    // And against the plain formula: window = state[1..] ++ new input.
    let mut want = vec![0f32; d];
    let mut want_s = vec![0f32; d * k];
    for c in 0..d {
        let mut win: Vec<f32> = (1..k).map(|j| st[c * k + j]).collect();
        win.push(p[2 + c]);
        let a = (wbv[d * k + c] as f64
            + (0..k)
                .map(|j| wbv[c * k + j] as f64 * win[j] as f64)
                .sum::<f64>()) as f32;
        want[c] = a / (1.0 + (-a).exp());
        want_s[c * k..(c + 1) * k].copy_from_slice(&win);
    }
    assert_close("conv step vs CPU", &read(gpu, &x2, d), &want, 1e-5, 1e-5);
    assert_close(
        "conv step state vs CPU",
        &read(gpu, &s2, d * k),
        &want_s,
        0.0,
        0.0,
    );
}

#[test]
fn conv_fused_into_x_proj_and_scan() {
    // Decode's SSM branch as two dispatches (x_proj GEMV with the conv prologue, scan with the
    // conv and state shift inside) against conv_step + x_proj + scan_fused; with the kernels
    // this adapter gets and with the workgroup kernels GPUs get (x_proj split over K: 600
    // channels = 3 slices).
    let (gpu, ks) = env();
    let wg = Kernels::new_with(gpu, false).unwrap();
    for (i, kern) in [ks, &wg].into_iter().enumerate() {
        conv_fused_case(kern, 70, 4, 131 + i as u64);
        conv_fused_case(kern, 600, 4, 133 + i as u64);
        // other conv widths: fewer taps, and more than the four the GPU scan prefetches
        conv_fused_case(kern, 70, 2, 135 + i as u64);
        conv_fused_case(kern, 37, 6, 137 + i as u64);
    }
}

fn conv_fused_case(ks: &Kernels, d: usize, kw: usize, seed: u64) {
    let (gpu, _) = env();
    let mut r = Rng::new(seed);
    let (n, rank) = (16, 6);
    let xs = rank + 2 * n;
    let (x_off, z_off) = (3, 3 + d);
    let pw = z_off + d + 2;
    let pbv = r.vec(pw, 1.5);
    let mut cw = r.vec(d * kw, 0.7);
    cw.extend(r.vec(d, 0.3));
    let cst = r.vec(d * kw, 1.0);
    let wx = r.vec(xs * d, 0.4);
    let wdt = r.vec(d * rank, 0.5);
    let nw = r.vec(rank + 2 * n, 1.0);
    let mut consts: Vec<f32> = (0..d * n).map(|_| -(r.f() * 1.5).exp()).collect();
    consts.extend(r.vec(d, 0.5));
    consts.extend(r.vec(d, 1.0));
    let sst = r.vec(d * n, 1.0);
    let up = |v: &Vec<f32>| gpu.upload("b", v).unwrap();
    let (pb, cwb, bc, bnw) = (up(&pbv), up(&cw), up(&consts), up(&nw));
    let (cs1, cs2, ss1, ss2) = (up(&cst), up(&cst), up(&sst), up(&sst));
    let xproj = Matrix::upload(gpu, "x_proj", &wx, xs, d, WeightDtype::F32).unwrap();
    let dtp = Matrix::upload(gpu, "dt_proj", &wdt, d, rank, WeightDtype::F32).unwrap();
    let poison = |len: usize| gpu.upload("o", &vec![NAN; len]).unwrap();
    let (xc, xp1, y1, y2) = (poison(d), poison(xs), poison(d), poison(d));
    let xp2 = poison(xs * X_PROJ_SLICES);
    let sp = ScanParams {
        rows: 1,
        d: d as u32,
        n: n as u32,
        xp_stride: xs as u32,
        b_col: rank as u32,
        c_col: (rank + n) as u32,
        z_off: z_off as u32,
        z_stride: pw as u32,
        rank: rank as u32,
        wdt_stride: dtp.kp4() * 4,
        eps: 1e-6,
        inner_norms: 1,
        x_off: x_off as u32,
        conv_k: kw as u32,
        xp_parts: 1,
        ..Default::default()
    };
    let cp = ConvParams {
        rows: 1,
        d: d as u32,
        k: kw as u32,
        x_off: x_off as u32,
        x_stride: pw as u32,
        has_bias: 1,
    };
    let mut parts = 0;
    run(gpu, |rec| {
        ks.conv_step(rec, &pb, &cwb, &cs1, &xc, cp).unwrap();
        ks.matmul(rec, &xc, 0, d, &xproj, None, &xp1, 0, xs, 1, false)
            .unwrap();
        ks.scan_fused(
            rec,
            ScanInput::Conv(&xc),
            &dtp,
            &xp1,
            &pb,
            &bc,
            &ss1,
            &y1,
            Some(&bnw),
            sp,
        )
        .unwrap();
        parts = ks
            .x_proj_conv(rec, &pb, x_off, &xproj, &cwb, &cs2, kw, &xp2)
            .unwrap();
        let sp2 = ScanParams {
            xp_parts: parts,
            ..sp
        };
        ks.scan_fused(
            rec,
            ScanInput::ConvStep {
                w: &cwb,
                state: &cs2,
                readable: &bnw,
            },
            &dtp,
            &xp2,
            &pb,
            &bc,
            &ss2,
            &y2,
            Some(&bnw),
            sp2,
        )
        .unwrap();
    });
    // xp is normalized in place by neither kernel (the norms run in workgroup memory); a split
    // x_proj leaves partial rows that sum to the whole product.
    let tol = 1e-5;
    let parts = parts as usize;
    assert!(parts == 1 || ks.gemv_conv_row.is_none());
    if ks.gemv_conv_row.is_none() {
        assert_eq!(
            parts,
            d.div_ceil(256).clamp(1, X_PROJ_SLICES),
            "x_proj slices"
        );
    }
    let raw = read(gpu, &xp2, xs * parts);
    let summed: Vec<f32> = (0..xs)
        .map(|i| (0..parts).map(|s| raw[s * xs + i]).sum())
        .collect();
    assert_close(
        "x_proj with conv prologue",
        &summed,
        &read(gpu, &xp1, xs),
        tol,
        tol,
    );
    assert_close(
        "scan y with conv inside",
        &read(gpu, &y2, d),
        &read(gpu, &y1, d),
        tol,
        tol,
    );
    assert_close(
        "ssm state",
        &read(gpu, &ss2, d * n),
        &read(gpu, &ss1, d * n),
        tol,
        tol,
    );
    assert_close(
        "conv state shifted",
        &read(gpu, &cs2, d * kw),
        &read(gpu, &cs1, d * kw),
        0.0,
        0.0,
    );
}

#[test]
fn scan_fused_matches_norms_dtproj_and_scan() {
    // the fused kernel needs d_state % 4 == 0; a dt_rank of 100 (Hymba-1.5B) takes the
    // unrolled dt_proj loop, 6 only its remainder; d_state 16 the lane-per-state prompt scan.
    // Both the kernels this adapter gets and the other family (four lanes per channel on
    // GPUs: d_state 8 leaves lanes idle, 32 and a dt_rank of 130 take its remainder loops).
    let (gpu, ks) = env();
    let other = Kernels::new_with(gpu, !ks.cpu_adapter()).unwrap();
    for (i, kern) in [ks, &other].into_iter().enumerate() {
        let s = 10 * i as u64;
        scan_fused_case(kern, 70, 8, 6, 97 + s);
        scan_fused_case(kern, 70, 16, 100, 98 + s);
        scan_fused_case(kern, 45, 32, 130, 99 + s);
    }
}

fn scan_fused_case(ks: &Kernels, d: usize, n: usize, rank: usize, seed: u64) {
    let (gpu, _) = env();
    let mut r = Rng::new(seed);
    let xs = rank + 2 * n;
    let zw = d + 3;
    let xc = r.vec(d, 1.0);
    let xp = r.vec(xs, 2.0);
    let pz = r.vec(zw, 2.0);
    let wdt = r.vec(d * rank, 0.5);
    let nw = r.vec(rank + 2 * n, 1.0);
    let mut consts: Vec<f32> = (0..d * n).map(|_| -(r.f() * 1.5).exp()).collect();
    consts.extend(r.vec(d, 0.5));
    consts.extend(r.vec(d, 1.0));
    let st = r.vec(d * n, 1.0);
    let mat = Matrix::upload(gpu, "wdt", &wdt, d, rank, WeightDtype::F32).unwrap();
    let up = |v: &Vec<f32>| gpu.upload("b", v).unwrap();
    let (bxc, bz, bc, bnw) = (up(&xc), up(&pz), up(&consts), up(&nw));
    let (xp1, xp2) = (up(&xp), up(&xp));
    let (s1, s2) = (up(&st), up(&st));
    let dtb = gpu.upload("dt", &vec![NAN; d]).unwrap();
    let (y1, y2) = (
        gpu.upload("y1", &vec![NAN; d]).unwrap(),
        gpu.upload("y2", &vec![NAN; d]).unwrap(),
    );
    let (n0, n1, n2) = (
        up(&nw[..rank].to_vec()),
        up(&nw[rank..rank + n].to_vec()),
        up(&nw[rank + n..].to_vec()),
    );
    let sp = ScanParams {
        rows: 1,
        d: d as u32,
        n: n as u32,
        xp_stride: xs as u32,
        b_col: rank as u32,
        c_col: (rank + n) as u32,
        z_off: 1,
        z_stride: zw as u32,
        rank: rank as u32,
        wdt_stride: mat.kp4() * 4,
        eps: 1e-6,
        inner_norms: 1,
        x_off: 0,
        conv_k: 0,
        xp_parts: 1,
        ..Default::default()
    };
    run(gpu, |rec| {
        ks.rmsnorm(rec, None, &n0, &xp1, 0, xs, 1, rank, 1e-6)
            .unwrap();
        ks.rmsnorm(rec, None, &n1, &xp1, rank, xs, 1, n, 1e-6)
            .unwrap();
        ks.rmsnorm(rec, None, &n2, &xp1, rank + n, xs, 1, n, 1e-6)
            .unwrap();
        ks.matmul(rec, &xp1, 0, xs, &mat, None, &dtb, 0, d, 1, false)
            .unwrap();
        ks.scan(rec, &bxc, &dtb, &xp1, &bz, &bc, &s1, &y1, None, sp)
            .unwrap();
        ks.scan_fused(
            rec,
            ScanInput::Conv(&bxc),
            &mat,
            &xp2,
            &bz,
            &bc,
            &s2,
            &y2,
            Some(&bnw),
            sp,
        )
        .unwrap();
    });
    assert_close(
        "fused scan y",
        &read(gpu, &y2, d),
        &read(gpu, &y1, d),
        1e-5,
        1e-5,
    );
    assert_close(
        "fused scan state",
        &read(gpu, &s2, d * n),
        &read(gpu, &s1, d * n),
        1e-5,
        1e-5,
    );
    // And against the plain formulas: dt/B/C norms, dt = bias + W_dt·dt_n, softplus, one step.
    let dtn = rms_ref(&xp[..rank], &nw[..rank], 1e-6);
    let bn = rms_ref(&xp[rank..rank + n], &nw[rank..rank + n], 1e-6);
    let cn = rms_ref(&xp[rank + n..], &nw[rank + n..], 1e-6);
    let mut want = vec![0f32; d];
    let mut want_s = vec![0f32; d * n];
    for c in 0..d {
        let mut dt = consts[d * n + c] as f64
            + (0..rank)
                .map(|j| wdt[c * rank + j] as f64 * dtn[j] as f64)
                .sum::<f64>();
        if dt <= 20.0 {
            dt = dt.exp().ln_1p();
        }
        let x = xc[c] as f64;
        let mut y = 0f64;
        for i in 0..n {
            let h = (dt * consts[c * n + i] as f64).exp() * st[c * n + i] as f64
                + dt * bn[i] as f64 * x;
            want_s[c * n + i] = h as f32;
            y += cn[i] as f64 * h;
        }
        y += consts[d * n + d + c] as f64 * x;
        let z = pz[1 + c] as f64;
        want[c] = (y * z / (1.0 + (-z).exp())) as f32;
    }
    assert_close("fused scan vs CPU", &read(gpu, &y2, d), &want, 1e-4, 1e-4);
    assert_close(
        "fused scan state vs CPU",
        &read(gpu, &s2, d * n),
        &want_s,
        1e-4,
        1e-4,
    );
}

#[test]
fn sampler_matches_cpu_mirror() {
    // A small vocabulary, and one past the sampler's unrolled rounds (8 x 256 logits per pass,
    // 36 logits per thread in the draw).
    for vocab in [1000 + 3, 9001] {
        sampler_case(vocab);
    }
}

fn sampler_case(vocab: usize) {
    let (gpu, ks) = env();
    let mut r = Rng::new(71 + vocab as u64);
    let cases = [
        SamplingParams::greedy(),
        SamplingParams {
            repetition_penalty: 1.3,
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 0.8,
            seed: 7,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 40,
            seed: 9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: 11,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.2,
            top_k: 50,
            top_p: 0.8,
            repetition_penalty: 1.2,
            seed: 13,
        },
    ];
    for (ci, sp) in cases.iter().enumerate() {
        for trial in 0..4u32 {
            let logits = r.vec(vocab, 6.0);
            let mut seen_v = vec![0u32; vocab];
            // make the argmax a seen token sometimes so the penalty matters
            let amax = (0..vocab)
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            seen_v[amax] = trial % 2;
            for _ in 0..20 {
                seen_v[(r.next_u32() as usize) % vocab] = 1;
            }
            let step = trial * 3 + 1;
            let lb = gpu.upload("l", &logits).unwrap();
            let sb = gpu.upload("seen", &seen_v).unwrap();
            let stb = gpu.upload("st", &[0xdead_beefu32, step]).unwrap();
            let p = SampleParams {
                vocab: vocab as u32,
                mode: (!sp.is_greedy()) as u32,
                top_k: sp.top_k,
                seed: sp.seed32(),
                temperature: sp.temperature.max(1e-6),
                top_p: sp.top_p,
                penalty: sp.repetition_penalty,
                logits_off: 0,
            };
            run(gpu, |rec| ks.sample(rec, &lb, &sb, &stb, p).unwrap());
            let st = pollster::block_on(gpu.read_u32(&stb, 0, 2)).unwrap();
            let seen_b: Vec<bool> = seen_v.iter().map(|&s| s != 0).collect();
            let want = sample_cpu(&logits, &seen_b, sp, step);
            assert_eq!(
                st[0], want,
                "vocab {vocab} case {ci} trial {trial}: GPU picked {}, CPU {}",
                st[0], want
            );
            assert_eq!(st[1], step + 1);
            let seen_after = pollster::block_on(gpu.read_u32(&sb, want as u64, 1)).unwrap();
            assert_eq!(seen_after[0], 1);
        }
    }
}

#[test]
fn sampler_greedy_argmax_large_vocab_with_ties() {
    // Greedy over a vocabulary larger than the sampler's unrolled rounds (8 x 256 logits), with
    // the maximum repeated: the lowest index wins, wherever the copies fall (same thread, other
    // threads, the unrolled part or the remainder).
    let (gpu, ks) = env();
    let mut r = Rng::new(73);
    let vocab = 32001;
    for (trial, places) in [
        vec![31000usize, 5],
        vec![2048 + 3, 3, 2048 + 3 + 256],
        vec![777, 777 + 256 * 8, 777 + 256],
        vec![31999, 32000],
        vec![12345],
    ]
    .into_iter()
    .enumerate()
    {
        let mut logits = r.vec(vocab, 6.0);
        for &i in &places {
            logits[i] = 9.5;
        }
        let lb = gpu.upload("l", &logits).unwrap();
        let sb = gpu.upload("seen", &vec![0u32; vocab]).unwrap();
        let stb = gpu.upload("st", &[0xdead_beefu32, 1]).unwrap();
        let sp = SamplingParams::greedy();
        let p = SampleParams {
            vocab: vocab as u32,
            mode: 0,
            top_k: sp.top_k,
            seed: sp.seed32(),
            temperature: 1.0,
            top_p: sp.top_p,
            penalty: 1.0,
            logits_off: 0,
        };
        run(gpu, |rec| ks.sample(rec, &lb, &sb, &stb, p).unwrap());
        let st = pollster::block_on(gpu.read_u32(&stb, 0, 1)).unwrap();
        let want = *places.iter().min().unwrap() as u32;
        assert_eq!(st[0], want, "trial {trial}: maxima at {places:?}");
    }
}

#[test]
fn workgroup_gemvs_compile_on_first_use() {
    // GPUs compile only the GEMV variants a model uses (one weight dtype): none at start-up,
    // one per (dtype, prologue, K class) when first recorded, reused after. K up to 2048 with
    // 16-bit weights takes `gemv_wide`; f32 weights and longer K take `gemv`.
    let (gpu, _) = env();
    let ks = Kernels::new_with(gpu, false).unwrap().with_wide_gemv(true);
    assert_eq!(ks.gemv_variants_compiled(), 0);
    let mut r = Rng::new(75);
    let m = 40;
    for (dtype, k, want) in [
        (WeightDtype::F16, 64, (0, 1)),
        (WeightDtype::F16, 2048, (0, 1)),
        (WeightDtype::F32, 64, (1, 1)),
        (WeightDtype::F16, 2056, (2, 1)),
    ] {
        let w = Matrix::upload(gpu, "w", &r.vec(m * k, 0.5), m, k, dtype).unwrap();
        let x = gpu.upload("x", &r.vec(k, 1.0)).unwrap();
        let nw = gpu.upload("n", &r.vec(k, 1.0)).unwrap();
        let y = gpu.upload("y", &vec![NAN; m]).unwrap();
        for round in 0..2 {
            run(gpu, |rec| {
                ks.gemv_pro(
                    rec,
                    &x,
                    0,
                    k,
                    &w,
                    Prologue::Norm(&nw, 1e-6),
                    &y,
                    0,
                    m,
                    1,
                    false,
                )
                .unwrap()
            });
            assert_eq!(
                ks.gemv_variants_compiled_by_entry(),
                want,
                "{dtype:?} k {k} round {round}"
            );
        }
        assert!(read(gpu, &y, m).iter().all(|v| v.is_finite()));
    }
}

/// `src` with `defs` as the native shader-f16 text (and the cooperative-matrix extension with
/// COOP), parsed and validated by naga; panics naming `what` and the error.
fn naga_validated(what: &str, src: &str, defs: &[&str]) -> (naga::Module, naga::valid::ModuleInfo) {
    let coop = if defs.contains(&"COOP") {
        "enable wgpu_cooperative_matrix;\n"
    } else {
        ""
    };
    let code = format!("enable f16;\n{coop}{}", crate::gpu::preprocess(src, defs));
    let module = naga::front::wgsl::parse_str(&code)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&code)));
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    (module, info)
}

#[test]
fn every_kernel_variant_compiles_with_native_f16_too() {
    // The shared device may lack shader-f16; validate the native-f16 text with naga directly.
    let all: Vec<(&str, &str, Vec<&str>)> = vec![
        ("matmul", SRC_MATMUL, vec!["SHADER_F16"]),
        ("matmul", SRC_MATMUL, vec![]),
        ("matmul", SRC_MATMUL, vec!["W_F32"]),
        ("embed", SRC_EMBED, vec!["SHADER_F16"]),
        ("embed", SRC_EMBED, vec![]),
        ("embed", SRC_EMBED, vec!["W_F32"]),
        ("rmsnorm", SRC_RMSNORM, vec![]),
        ("rmsnorm", SRC_RMSNORM, vec!["INPLACE"]),
        ("rmsnorm", SRC_RMSNORM, vec!["PARTS"]),
        ("rmsnorm", SRC_RMSNORM, vec!["PARTS", "INPLACE"]),
        ("rope", SRC_ROPE, vec![]),
        ("rope", SRC_ROPE, vec!["STORE_KV"]),
        ("rope", SRC_ROPE, vec!["STORE_KV", "KV_F16"]),
        ("attention", SRC_ATTENTION, vec![]),
        ("attention", SRC_ATTENTION, vec!["KV_F16"]),
        // every split entry with the f16 KV cache
        ("attention_decode", SRC_ATTENTION_DECODE, vec!["KV_F16"]),
        (
            "attention_decode",
            SRC_ATTENTION_DECODE,
            vec!["CPU_SPLIT", "KV_F16"],
        ),
        (
            "attention_decode",
            SRC_ATTENTION_DECODE,
            vec!["SUBGROUP32", "KV_F16"],
        ),
        (
            "attention_decode",
            SRC_ATTENTION_DECODE,
            vec!["GQA", "KV_F16"],
        ),
        (
            "attention_decode",
            SRC_ATTENTION_DECODE,
            vec!["GQA", "SUBGROUP32", "KV_F16"],
        ),
        ("attention_decode", SRC_ATTENTION_DECODE, vec![]),
        ("attention_decode", SRC_ATTENTION_DECODE, vec!["COMBINE"]),
        ("attention_decode", SRC_ATTENTION_DECODE, vec!["CPU_SPLIT"]),
        // the GPU-only subgroup variants (a CPU test adapter never compiles them)
        ("attention_decode", SRC_ATTENTION_DECODE, vec!["SUBGROUP32"]),
        ("attention_decode", SRC_ATTENTION_DECODE, vec!["GQA"]),
        (
            "attention_decode",
            SRC_ATTENTION_DECODE,
            vec!["GQA", "SUBGROUP32"],
        ),
        ("attention", SRC_ATTENTION, vec!["SUBGROUP32"]),
        ("attention", SRC_ATTENTION, vec!["SUBGROUP32", "KV_F16"]),
        ("matmul", SRC_MATMUL, vec!["WIDE", "PRO_NORM", "SUBGROUP32"]),
        ("matmul", SRC_MATMUL, vec!["WIDE", "W_Q4", "PRO_SWIGLU"]),
        ("matmul", SRC_MATMUL, vec!["WIDE", "W_Q8", "SUBGROUP32"]),
        ("scan", SRC_SCAN, vec!["FUSED_DT", "LANES4"]),
        (
            "scan",
            SRC_SCAN,
            vec!["FUSED_DT", "CONV_IN", "LANES4", "SUBGROUP32"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["PRO_MERGE", "SUBGROUP32", "XSH=5632"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["W_Q4", "PRO_SWIGLU", "SUBGROUP32", "XSH=5632"],
        ),
        ("matmul", SRC_MATMUL, vec!["PRO_NORM"]),
        (
            "matmul",
            SRC_MATMUL,
            vec!["PRO_NORM", "SUBGROUP32", "XSH=5632"],
        ),
        ("matmul", SRC_MATMUL, vec!["W_F32", "PRO_MERGE"]),
        ("matmul", SRC_MATMUL, vec!["SHADER_F16", "PRO_SWIGLU"]),
        ("conv1d", SRC_CONV1D, vec!["STEP"]),
        ("scan", SRC_SCAN, vec!["FUSED_DT"]),
        ("scan", SRC_SCAN, vec!["FUSED_DT", "SUBGROUP32"]),
        ("scan", SRC_SCAN, vec!["PAR_STATES"]),
        ("scan", SRC_SCAN, vec!["PAR_STATES", "GROUPS"]),
        ("scan", SRC_SCAN, vec!["FUSED_DT", "CONV_IN", "SUBGROUP32"]),
        (
            "matmul",
            SRC_MATMUL,
            vec!["W_F32", "PRO_CONV", "SUBGROUP32"],
        ),
        ("conv1d", SRC_CONV1D, vec![]),
        ("conv1d", SRC_CONV1D, vec!["STATE"]),
        ("scan", SRC_SCAN, vec![]),
        ("merge", SRC_MERGE, vec![]),
        ("swiglu", SRC_SWIGLU, vec![]),
        ("sample", SRC_SAMPLE, vec![]),
        ("state_copy", SRC_STATE_COPY, vec![]),
        // cooperative-matrix GEMM (the test adapter may not have it)
        ("matmul", SRC_MATMUL, vec!["SHADER_F16", "COOP"]),
        ("matmul", SRC_MATMUL, vec!["SHADER_F16", "COOP", "W_Q8"]),
        ("matmul", SRC_MATMUL, vec!["SHADER_F16", "COOP", "W_Q4"]),
        ("matmul", SRC_MATMUL, vec!["SHADER_F16", "REDUCE"]),
        (
            "matmul",
            SRC_MATMUL,
            vec!["SHADER_F16", "COOP", "COOP2", "XV4"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["SHADER_F16", "COOP", "COOP2", "XV4", "W_Q4"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["SHADER_F16", "COOP", "COOP2", "COOP2_SG16", "XV4"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["SHADER_F16", "COOP", "COOP2", "COOP2_SG16", "XV4", "W_Q4"],
        ),
        (
            "matmul",
            SRC_MATMUL,
            vec!["SHADER_F16", "COOP", "COOP2", "COOP2_SG16", "XV4", "W_Q8"],
        ),
        // prompt attention on cooperative matrices
        (
            "attention",
            SRC_ATTENTION,
            vec!["SHADER_F16", "KV_F16", "COOP"],
        ),
        // hymba-bench's tensor-core throughput probe
        (
            "bench_mma",
            include_str!("../../../shaders/bench_mma.wgsl"),
            vec!["COOP"],
        ),
        (
            "bench_mma",
            include_str!("../../../shaders/bench_mma.wgsl"),
            vec!["COOP", "RELOAD", "OPS=sh"],
        ),
        (
            "bench_mma",
            include_str!("../../../shaders/bench_mma.wgsl"),
            vec!["COOP", "RELOAD", "OPS=src"],
        ),
    ];
    for (file, src, defs) in all {
        let (module, info) = naga_validated(file, src, &defs);
        // The Vulkan backend's translation (a native GPU run would otherwise be the first to
        // meet a naga SPIR-V writer failure).
        naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{file} {defs:?} to SPIR-V: {e:?}"));
    }
}

#[test]
fn gemv_workgroup_and_rowwise_variants_agree() {
    // CPU adapters run the barrier-free GEMV; GPUs the workgroup one. Check each against the
    // other on every prologue and every storage type, whichever adapter runs the tests.
    let (gpu, _) = env();
    let wg = Kernels::new_with(gpu, false).unwrap().with_wide_gemv(true);
    let rw = Kernels::new_with(gpu, true).unwrap();
    let mut r = Rng::new(401);
    for dtype in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
    ] {
        for which in 0..4 {
            let (m, k) = (4300 + which, 37 + 64 * which);
            let xw = if which == 3 { 2 * k } else { k };
            let x = r.vec(xw + 5, 2.0);
            let x2 = r.vec(xw + 5, 1.0);
            let nw = r.vec(2 * k, 1.0);
            let w = r.vec(m * k, 0.5);
            let mat = Matrix::upload(gpu, "w", &w, m, k, dtype).unwrap();
            let (xb, x2b, nb) = (
                gpu.upload("x", &x).unwrap(),
                gpu.upload("x2", &x2).unwrap(),
                gpu.upload("n", &nw).unwrap(),
            );
            let mut outs = Vec::new();
            for ks in [&wg, &rw] {
                let yb = gpu.upload("y", &vec![NAN; m]).unwrap();
                let pro = match which {
                    0 => Prologue::None,
                    1 => Prologue::Norm(&nb, 1e-6),
                    2 => Prologue::Merge {
                        w: &nb,
                        x2: &x2b,
                        eps: 1e-6,
                    },
                    _ => Prologue::Swiglu,
                };
                run(gpu, |rec| {
                    ks.gemv_pro(rec, &xb, 0, xw, &mat, pro, &yb, 0, m, 1, false)
                        .unwrap()
                });
                outs.push(read(gpu, &yb, m));
            }
            assert_close(
                &format!("gemv variants, prologue {which}, {dtype:?}"),
                &outs[1],
                &outs[0],
                1e-4,
                1e-4,
            );
            // Both against the CPU: prologue, then a product with the stored (f16-rounded or
            // dequantized) weights.
            let xin: Vec<f32> = match which {
                0 => x[..k].to_vec(),
                1 => rms_ref(&x[..k], &nw[..k], 1e-6),
                2 => {
                    let a = rms_ref(&x[..k], &nw[..k], 1e-6);
                    let b = rms_ref(&x2[..k], &nw[k..], 1e-6);
                    a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect()
                }
                _ => (0..k)
                    .map(|j| x[j] / (1.0 + (-x[j]).exp()) * x[k + j])
                    .collect(),
            };
            let wq = weights_as_stored(&w, m, k, dtype);
            let want: Vec<f32> = (0..m)
                .map(|j| {
                    (0..k)
                        .map(|kk| xin[kk] as f64 * wq[j * k + kk] as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            assert_close(
                &format!("workgroup gemv vs CPU, prologue {which}, {dtype:?}"),
                &outs[0],
                &want,
                1e-4,
                1e-4,
            );
            assert_close(
                &format!("row gemv vs CPU, prologue {which}, {dtype:?}"),
                &outs[1],
                &want,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn part_rows_fit_the_limit_and_cover_the_matrix() {
    for dtype in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
    ] {
        for (rows, cols, limit) in [(300, 70, 4096u64), (32001, 1600, 128 << 20), (7, 9, 64)] {
            let parts = Matrix::part_rows(rows, cols, dtype, limit).unwrap();
            assert_eq!(parts.iter().sum::<usize>(), rows, "{dtype:?}");
            for &n in &parts {
                assert!(Matrix::bytes_for(n, cols, dtype).div_ceil(16) * 16 <= limit);
            }
            // As few parts as the limit allows, of about equal size.
            let max_rows = (1..=rows)
                .take_while(|&r| Matrix::bytes_for(r, cols, dtype).div_ceil(16) * 16 <= limit)
                .last()
                .unwrap();
            assert_eq!(
                parts.len(),
                rows.div_ceil(max_rows),
                "{dtype:?} {rows}x{cols}"
            );
            assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= parts.len());
        }
        assert!(Matrix::part_rows(4, 1600, dtype, 256).is_none());
    }
    // The f32 embedding / LM head of Hymba-1.5B (205 MB) takes two 128 MiB bindings.
    assert_eq!(
        Matrix::part_rows(32001, 1600, WeightDtype::F32, 128 << 20)
            .unwrap()
            .len(),
        2
    );
}

/// A matrix split by rows into several buffers gives the same result as the whole matrix (the
/// same per-row arithmetic; the whole one is checked against the CPU by the tests above), in
/// every kernel that reads weight matrices: GEMV, GEMM, the GEMV prologues and the embedding.
#[test]
fn split_matrices_match_whole_ones() {
    let (gpu, ks) = env();
    let mut r = Rng::new(404);
    for dtype in [
        WeightDtype::F32,
        WeightDtype::F16,
        WeightDtype::Q8,
        WeightDtype::Q4,
    ] {
        let (m, k) = (300, 70);
        let w = r.vec(m * k, 0.5);
        let whole = Matrix::upload_parts(gpu, "w", &w, m, k, dtype, u64::MAX).unwrap();
        let limit = Matrix::bytes_for(70, k, dtype).div_ceil(16) * 16;
        let split = Matrix::upload_parts(gpu, "w", &w, m, k, dtype, limit).unwrap();
        assert_eq!(whole.parts.len(), 1);
        assert_eq!(split.parts.len(), 5, "{dtype:?}");
        let mut next = 0;
        for p in &split.parts {
            assert_eq!(p.row0, next);
            next += p.rows;
        }
        assert_eq!(next, m);
        // GEMV (1 and 3 rows) and GEMM (9 rows), into a strided output at an offset, accumulating.
        for (rows, accumulate) in [(1, false), (3, true), (9, true)] {
            let (xs, ys, yo) = (k + 3, m + 5, 7);
            let x = r.vec(2 + rows * xs, 1.0);
            let y0 = if accumulate {
                r.vec(yo + rows * ys, 1.0)
            } else {
                vec![NAN; yo + rows * ys]
            };
            let xb = gpu.upload("x", &x).unwrap();
            let mut outs = Vec::new();
            for mat in [&whole, &split] {
                let yb = gpu.upload("y", &y0).unwrap();
                run(gpu, |rec| {
                    ks.matmul(rec, &xb, 2, xs, mat, None, &yb, yo, ys, rows, accumulate)
                        .unwrap()
                });
                outs.push(read(gpu, &yb, y0.len()));
            }
            assert_eq!(
                outs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                outs[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "matmul {dtype:?} rows {rows}"
            );
            for t in 0..rows {
                for j in 0..m {
                    assert!(
                        outs[1][yo + t * ys + j].is_finite(),
                        "row {t} col {j} unwritten"
                    );
                }
            }
        }
        // The decode GEMV prologues: norm, merge, SwiGLU (X rows are [gate | up], 2k wide).
        let nw = gpu.upload("nw", &r.vec(2 * k, 1.0)).unwrap();
        let x = r.vec(2 * k, 1.0);
        let x2 = gpu.upload("x2", &r.vec(k, 1.0)).unwrap();
        let xb = gpu.upload("x", &x).unwrap();
        for (name, pro) in [
            ("norm", Prologue::Norm(&nw, 1e-5)),
            (
                "merge",
                Prologue::Merge {
                    w: &nw,
                    x2: &x2,
                    eps: 1e-5,
                },
            ),
        ] {
            let mut outs = Vec::new();
            for mat in [&whole, &split] {
                let yb = gpu.upload("y", &vec![NAN; m]).unwrap();
                run(gpu, |rec| {
                    ks.gemv_pro(rec, &xb, 0, k, mat, pro, &yb, 0, m, 1, false)
                        .unwrap()
                });
                outs.push(read(gpu, &yb, m));
            }
            assert!(outs[1].iter().all(|v| v.is_finite()), "{name}");
            assert_eq!(outs[0], outs[1], "gemv {name} {dtype:?}");
        }
        let wk = r.vec(m * (k / 2), 0.5);
        let whole_h = Matrix::upload_parts(gpu, "w", &wk, m, k / 2, dtype, u64::MAX).unwrap();
        let split_h = Matrix::upload_parts(
            gpu,
            "w",
            &wk,
            m,
            k / 2,
            dtype,
            Matrix::bytes_for(100, k / 2, dtype).div_ceil(16) * 16,
        )
        .unwrap();
        assert_eq!(split_h.parts.len(), 3);
        let mut outs = Vec::new();
        for mat in [&whole_h, &split_h] {
            let yb = gpu.upload("y", &vec![NAN; m]).unwrap();
            run(gpu, |rec| {
                ks.gemv_pro(rec, &xb, 0, k, mat, Prologue::Swiglu, &yb, 0, m, 1, false)
                    .unwrap()
            });
            outs.push(read(gpu, &yb, m));
        }
        assert!(outs[1].iter().all(|v| v.is_finite()));
        assert_eq!(outs[0], outs[1], "gemv swiglu {dtype:?}");
        // Embedding gather with meta rows, ids in every part (and the last row).
        let (vocab, d, n_meta) = (53, 70, 3);
        let table = r.vec(vocab * d, 1.0);
        let tw = Matrix::upload_parts(gpu, "e", &table, vocab, d, dtype, u64::MAX).unwrap();
        let ts = Matrix::upload_parts(
            gpu,
            "e",
            &table,
            vocab,
            d,
            dtype,
            Matrix::bytes_for(10, d, dtype).div_ceil(16) * 16,
        )
        .unwrap();
        assert_eq!(ts.parts.len(), 6);
        let ids: Vec<u32> = vec![0, 52, 9, 10, 11, 31, 40, 1];
        let ib = gpu.upload("ids", &ids).unwrap();
        let mb = gpu.upload("m", &r.vec(n_meta * d, 1.0)).unwrap();
        let rows = n_meta + ids.len();
        let mut outs = Vec::new();
        for t in [&tw, &ts] {
            let ob = gpu.upload("o", &vec![NAN; rows * d]).unwrap();
            run(gpu, |rec| {
                ks.embed(rec, &ib, 0, t, &mb, n_meta, &ob, rows).unwrap()
            });
            outs.push(read(gpu, &ob, rows * d));
        }
        assert!(outs[1].iter().all(|v| v.is_finite()));
        assert_eq!(outs[0], outs[1], "embed {dtype:?}");
    }
}

#[test]
fn a_row_larger_than_the_limit_is_a_clear_error() {
    let (gpu, _) = env();
    let w = vec![0.5f32; 4 * 1600];
    let e = Matrix::upload_parts(
        gpu,
        "model.embed_tokens.weight",
        &w,
        4,
        1600,
        WeightDtype::F32,
        4096,
    )
    .err()
    .expect("a 6400-byte row cannot fit 4096-byte parts")
    .to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("6400") && e.contains("4096"),
        "{e}"
    );
}

#[test]
fn kv_kernels_compile_only_the_storage_a_model_uses() {
    // Kernels that read or write the KV cache compile their f32 and f16 forms on first use: an
    // f16 model (the browser's default) never compiles the f32 ones, and the reverse.
    let (gpu, _) = env();
    let ks = Kernels::new_with(gpu, false).unwrap();
    let mut all = vec![&ks.attention, &ks.store_kv, &ks.attention_split];
    all.extend(ks.attention_gqa.as_ref());
    for k in &all {
        assert!(!k.compiled(KvDtype::F32) && !k.compiled(KvDtype::F16));
    }
    for k in &all {
        k.get(gpu, KvDtype::F16).unwrap();
        assert!(k.compiled(KvDtype::F16) && !k.compiled(KvDtype::F32));
    }
}

#[test]
fn decode_step_sees_its_own_key_and_value_as_the_f16_cache_holds_them() {
    // An f16 cache: a decode step in a KV-owning layer takes its own key and value from the
    // in_proj row, and must use them rounded to f16 (as later steps and the prompt attention
    // read them from the cache), not the f32 row. Two keys, the meta token's and the step's,
    // with scores 64 apart by less than one f16 step of the key, so that rounding the step's
    // key moves the softmax weights by ~6e-3, and a value between f16 neighbours. One query
    // head per KV head (per-head split) and two (GQA), both kernel families.
    let (gpu, _) = env();
    let dtype = KvDtype::F16;
    let (dqk, dv, n_meta, ring) = (4usize, 4usize, 1usize, 4usize);
    let cap = n_meta + ring;
    let q = 1usize; // the step's position: one text position after the meta token
    let x = 1.0 + 2f32.powi(-11) + 2f32.powi(-13); // between the f16 values 1 and 1 + 2^-10
    let k_self = [x, 0.25, -0.5, 0.75];
    let v_self = [x, -2.0 * x, 0.5, 3.0 * x];
    let k_meta = [1.0f32, 0.25, -0.5, 0.75];
    let v_meta = [0.25f32, 0.5, -0.75, 1.0];
    // RoPE as the identity (cos 1, sin 0) keeps the step's key exactly as given.
    let cs: Vec<f32> = (0..8 * dqk / 2).flat_map(|_| [1.0f32, 0.0]).collect();
    let csb = gpu.upload("cs", &cs).unwrap();
    let round = |v: &[f32]| kv_round(v, dtype);
    for hq in [1usize, 2] {
        let hkv = 1;
        // The in_proj row: q of every head, then k, then v.
        let qv = [64.0f32, 0.0, 0.0, 0.0];
        let mut prow: Vec<f32> = (0..hq).flat_map(|_| qv).collect();
        prow.extend(k_self);
        prow.extend(v_self);
        // CPU: softmax over (meta, self) with the step's key and value rounded, or not.
        let attend = |k: &[f32], v: &[f32]| -> Vec<f32> {
            let dot = |a: &[f32]| a.iter().zip(&qv).map(|(a, b)| (a * b) as f64).sum::<f64>();
            let (s0, s1) = (dot(&k_meta), dot(k));
            let mx = s0.max(s1);
            let (e0, e1) = ((s0 - mx).exp(), (s1 - mx).exp());
            (0..dv)
                .map(|i| ((e0 * v_meta[i] as f64 + e1 * v[i] as f64) / (e0 + e1)) as f32)
                .collect()
        };
        let want = attend(&round(&k_self), &round(&v_self));
        let unrounded = attend(&k_self, &v_self);
        let gap = want
            .iter()
            .zip(&unrounded)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(gap > 1e-3, "the case must tell the two apart (gap {gap})");
        for rowwise in [false, true] {
            let ks = Kernels::new_with(gpu, rowwise).unwrap();
            let mut kc = vec![NAN; cap * dqk];
            let mut vc = vec![NAN; cap * dv];
            kc[..dqk].copy_from_slice(&k_meta);
            vc[..dv].copy_from_slice(&v_meta);
            let (kb, vb) = (kv_upload(gpu, &kc, dtype), kv_upload(gpu, &vc, dtype));
            let pb = gpu.upload("prow", &prow).unwrap();
            let out = gpu.upload("out", &vec![NAN; hq * dv]).unwrap();
            let part = gpu.upload("part", &vec![NAN; hq * (2 + dv)]).unwrap();
            let dp = AttentionDecodeParams {
                n_heads: hq as u32,
                n_kv_heads: hkv as u32,
                d_qk: dqk as u32,
                d_v: dv as u32,
                q_stride: prow.len() as u32,
                k_col: (hq * dqk) as u32,
                v_col: (hq * dqk + dqk) as u32,
                self_kv: 1,
                pos: q as u32,
                n_meta: n_meta as u32,
                ring: ring as u32,
                cap: cap as u32,
                window: NO_WINDOW,
                scale: 1.0,
                n_splits: 1,
            };
            run(gpu, |rec| {
                ks.attention_split(rec, &pb, &csb, kv(&kb, &vb, dtype), &part, &out, dp)
                    .unwrap()
            });
            let got = read(gpu, &out, hq * dv);
            let want_all: Vec<f32> = (0..hq).flat_map(|_| want.clone()).collect();
            assert_close(
                &format!("{hq} query heads, rowwise {rowwise}: own key and value"),
                &got,
                &want_all,
                1e-5,
                1e-5,
            );
            // And the step stored them rounded in its slot (n_meta + (q - n_meta) % ring).
            let s = n_meta + (q - n_meta) % ring;
            let (gk, gv) = (
                kv_read(gpu, &kb, cap * dqk, dtype),
                kv_read(gpu, &vb, cap * dv, dtype),
            );
            assert_eq!(&gk[s * dqk..(s + 1) * dqk], &round(&k_self)[..]);
            assert_eq!(&gv[s * dv..(s + 1) * dv], &round(&v_self)[..]);
        }
    }
}

/// Bytes of workgroup memory entry point `entry` of `src` (with `defs`) uses, from naga's
/// module: the sizes of the workgroup variables its code reaches.
fn workgroup_bytes_of(src: &str, defs: &[&str], entry: &str) -> u32 {
    let (module, info) = naga_validated(entry, src, defs);
    let ep = module
        .entry_points
        .iter()
        .position(|e| e.name == entry)
        .unwrap_or_else(|| panic!("no entry point {entry}"));
    let uses = info.get_entry_point(ep);
    module
        .global_variables
        .iter()
        .filter(|(h, v)| v.space == naga::AddressSpace::WorkGroup && !uses[*h].is_empty())
        .map(|(_, v)| module.types[v.ty].inner.size(module.to_ctx()))
        .sum()
}

#[test]
fn tensor_core_kernels_fit_the_workgroup_memory_they_are_gated_on() {
    // The host picks the 16-subgroup gemm_coop2 and the prompt attention on tensor cores only
    // where the device's workgroup memory holds what these constants say; a shader edit that
    // grows them must move the constants too.
    for dt in [&[][..], &["W_Q8"], &["W_Q4"]] {
        let mut defs = vec!["SHADER_F16", "COOP", "COOP2", "COOP2_SG16", "XV4"];
        defs.extend_from_slice(dt);
        let used = workgroup_bytes_of(SRC_MATMUL, &defs, "gemm_coop2");
        assert_eq!(used, COOP2_SG16_WORKGROUP_BYTES, "gemm_coop2 {defs:?}");
    }
    let used = workgroup_bytes_of(SRC_ATTENTION, &["KV_F16", "COOP"], "main_coop");
    assert!(
        used <= ATTENTION_COOP_WORKGROUP_BYTES,
        "attention main_coop uses {used} bytes of workgroup memory, more than the {} it is gated on",
        ATTENTION_COOP_WORKGROUP_BYTES
    );
}
