//! One Rust constructor and one recording function per WGSL kernel family.
//! Each wrapper owns its pipelines (through [`Kernel`]) and knows its dispatch
//! size; parameter structs mirror the WGSL `Params` structs field by field,
//! with explicit offsets and strides so views need no copies.

use crate::error::{Error, Result};
use crate::gpu::{BindKind, Gpu, Kernel, Recorder};
use bytemuck::{Pod, Zeroable};
use std::sync::Arc;

#[cfg(test)]
mod tests;

pub const SRC_MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
pub const SRC_RMSNORM: &str = include_str!("../../../shaders/rmsnorm.wgsl");
pub const SRC_EMBED: &str = include_str!("../../../shaders/embed.wgsl");
pub const SRC_ROPE: &str = include_str!("../../../shaders/rope.wgsl");
pub const SRC_ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
pub const SRC_ATTENTION_DECODE: &str = include_str!("../../../shaders/attention_decode.wgsl");
pub const SRC_CONV1D: &str = include_str!("../../../shaders/conv1d.wgsl");
pub const SRC_SCAN: &str = include_str!("../../../shaders/scan.wgsl");
pub const SRC_MERGE: &str = include_str!("../../../shaders/merge.wgsl");
pub const SRC_SWIGLU: &str = include_str!("../../../shaders/swiglu.wgsl");
pub const SRC_SAMPLE: &str = include_str!("../../../shaders/sample.wgsl");
pub const SRC_STATE_COPY: &str = include_str!("../../../shaders/state_copy.wgsl");

/// Storage type of a weight matrix on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    F16,
    /// Block-quantized 8-bit: blocks of [`QBLOCK`] weights along K, one f16 scale each (see [`quantize`]).
    Q8,
    /// Block-quantized 4-bit: blocks of [`QBLOCK`] weights along K, one f16 scale each (see [`quantize`]).
    Q4,
}

impl WeightDtype {
    /// Bytes per element for f32 / f16 (quantized formats: see [`Matrix::bytes_for`]).
    pub fn bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 => 2,
            WeightDtype::Q8 => 1,
            WeightDtype::Q4 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Q8 => "q8",
            WeightDtype::Q4 => "q4",
        }
    }
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightDtype::Q8 | WeightDtype::Q4)
    }
    /// The dtype named `name` ("f32", "f16", "q8", "q4").
    pub fn from_name(name: &str) -> Option<WeightDtype> {
        [
            WeightDtype::F32,
            WeightDtype::F16,
            WeightDtype::Q8,
            WeightDtype::Q4,
        ]
        .into_iter()
        .find(|d| d.name() == name)
    }
}

/// Weights per quantization block (along K, the input dimension).
pub const QBLOCK: usize = 32;

/// Block quantization of a row-major [rows, cols] f32 matrix into the GPU layout of
/// [`WeightDtype::Q8`] / [`WeightDtype::Q4`], as u32 words:
///
/// * Rows are padded with zeros to `kp = ceil(cols / 32) * 32` columns, so a block never
///   crosses a row and block `b` of row `r` is block `r * kp / 32 + b` of the flattened matrix.
/// * Each block of 32 weights has one f16 scale `s` and integer quants `q`; a weight is read back
///   as `q * s`. Symmetric, no zero point. The scale may be negative.
///   - q8: `s = max|w| / 127` (rounded to f16), `q = clamp(round(w / s), -127, 127)`.
///   - q4: the scale is searched per block ([`q4_block`]): candidates that put the largest-magnitude
///     weight at -8 (the full signed range of the nibble) or at 7 and around, each with its
///     least-squares refit, keeping the one with the least squared error after the f16 rounding of
///     the scale; `q = clamp(round(w / s), -8, 7)`. The candidates include `s = max|w| / 7`, so a
///     block's squared error is never above that of plain max-abs scaling.
///   - a block of zeros gets `s = 0`, `q = 0`.
/// * Quants first, row-major: q8 packs 4 weights per u32 (element `4i + j` in byte `j`, little-endian,
///   two's complement int8), q4 packs 8 weights per u32 (element `8i + j` in bits `4j..4j+3` as
///   `q + 8`, offset binary in [0, 15]). That is `rows * kp / 4` (q8) or `rows * kp / 8` (q4) words.
/// * Then the scales: `rows * kp / 32` f16 values, two per u32 (block `2i` in the low half), padded
///   to a whole word. The kernels find them at word `rows * kp / 4` (q8) / `rows * kp / 8` (q4).
pub fn quantize(data: &[f32], rows: usize, cols: usize, dtype: WeightDtype) -> Vec<u32> {
    assert!(dtype.is_quantized());
    assert_eq!(data.len(), rows * cols);
    let kp = Matrix::padded_cols_for(cols, dtype);
    let nb = kp / QBLOCK;
    let qwords = Matrix::quant_words(rows, cols, dtype);
    let row_words = qwords.checked_div(rows).unwrap_or(0);
    let mut out = vec![0u32; qwords + (rows * nb).div_ceil(2)];
    let mut scales = vec![0u16; rows * nb];
    // Rows are independent: natively, spread them over the CPU's threads (the q4 search is
    // the costly part of loading a large model as q4).
    #[cfg(not(target_arch = "wasm32"))]
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(rows.div_ceil(64).max(1));
    #[cfg(target_arch = "wasm32")]
    let threads = 1usize;
    let work = |r0: usize, words: &mut [u32], sc: &mut [u16]| {
        let mut block = [0f32; QBLOCK];
        for (i, (w, s)) in words
            .chunks_mut(row_words.max(1))
            .zip(sc.chunks_mut(nb))
            .enumerate()
        {
            quantize_row(
                &data[(r0 + i) * cols..(r0 + i + 1) * cols],
                dtype,
                &mut block,
                w,
                s,
            );
        }
    };
    let (qpart, _) = out.split_at_mut(qwords);
    if threads <= 1 || row_words == 0 {
        work(0, qpart, &mut scales);
    } else {
        #[cfg(not(target_arch = "wasm32"))]
        std::thread::scope(|sc| {
            let per = rows.div_ceil(threads);
            for (i, (w, s)) in qpart
                .chunks_mut(per * row_words)
                .zip(scales.chunks_mut(per * nb))
                .enumerate()
            {
                let work = &work;
                sc.spawn(move || work(i * per, w, s));
            }
        });
    }
    for (bi, s) in scales.iter().enumerate() {
        out[qwords + bi / 2] |= (*s as u32) << (16 * (bi % 2));
    }
    out
}

/// Quantizes one row (`cols` weights) into its quant words and block scales (f16 bits).
fn quantize_row(
    row: &[f32],
    dtype: WeightDtype,
    block: &mut [f32; QBLOCK],
    words: &mut [u32],
    scales: &mut [u16],
) {
    for (b, sc) in scales.iter_mut().enumerate() {
        block.fill(0.0);
        let c0 = b * QBLOCK;
        let c1 = (c0 + QBLOCK).min(row.len());
        block[..c1 - c0].copy_from_slice(&row[c0..c1]);
        let (s, q) = match dtype {
            WeightDtype::Q8 => q8_block(block),
            _ => q4_block(block),
        };
        *sc = s.to_bits();
        for (j, &q) in q.iter().enumerate() {
            let e = c0 + j; // element index within the padded row
            match dtype {
                WeightDtype::Q8 => words[e / 4] |= ((q as u8) as u32) << (8 * (e % 4)),
                _ => words[e / 8] |= ((q + 8) as u32) << (4 * (e % 8)),
            }
        }
    }
}

/// Quants of `block` with the f16 scale `s` (0 where `s` is 0), clamped to [lo, hi].
fn quants_for(block: &[f32; QBLOCK], s: half::f16, lo: f32, hi: f32) -> [i8; QBLOCK] {
    let sf = s.to_f32();
    let inv = if sf != 0.0 { 1.0 / sf } else { 0.0 };
    let mut q = [0i8; QBLOCK];
    for (q, &v) in q.iter_mut().zip(block) {
        *q = (v * inv).round().clamp(lo, hi) as i8;
    }
    q
}

/// Squared error of reading `block` back as `q * s`.
fn block_sq_err(block: &[f32; QBLOCK], s: half::f16, q: &[i8; QBLOCK]) -> f64 {
    let sf = s.to_f32();
    block
        .iter()
        .zip(q)
        .map(|(&w, &q)| {
            let e = (w - q as f32 * sf) as f64;
            e * e
        })
        .sum()
}

/// q8 block: `s = max|w| / 127`, `q = round(w / s)`.
fn q8_block(block: &[f32; QBLOCK]) -> (half::f16, [i8; QBLOCK]) {
    let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let s = half::f16::from_f32(amax / 127.0);
    (s, quants_for(block, s, -127.0, 127.0))
}

/// q4 block: the f16 scale with the least squared error among candidates `wmax / t` (wmax = the
/// weight of largest magnitude, t from -8.5 to -6.5 and 6.5 to 7.5 in steps of 0.25 — -8 uses the
/// nibble's full signed range, 7 is plain max-abs scaling — each also refitted by least squares
/// for its quants, and t = ±1..±6).
fn q4_block(block: &[f32; QBLOCK]) -> (half::f16, [i8; QBLOCK]) {
    let wmax = block
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if wmax == 0.0 {
        return (half::f16::ZERO, [0; QBLOCK]);
    }
    // Plain max-abs scaling first: ties keep it.
    let s0 = half::f16::from_f32(wmax.abs() / 7.0);
    let q0 = quants_for(block, s0, -8.0, 7.0);
    let mut best = (block_sq_err(block, s0, &q0), s0, q0);
    // Integer t: a block already on a q4 grid (max-magnitude quant 1..8) is found exactly, so
    // quantizing dequantized weights gives them back.
    for t in 1..=6 {
        for s in [wmax / t as f32, -wmax / t as f32] {
            let s = half::f16::from_f32(s);
            let q = quants_for(block, s, -8.0, 7.0);
            let e = block_sq_err(block, s, &q);
            if e < best.0 {
                best = (e, s, q);
            }
        }
    }
    let mut consider = |s: half::f16| {
        if !s.to_f32().is_finite() || s.to_f32() == 0.0 {
            return;
        }
        let q = quants_for(block, s, -8.0, 7.0);
        let e = block_sq_err(block, s, &q);
        if e < best.0 {
            best = (e, s, q);
        }
        // Least-squares scale for these quants: sum(w q) / sum(q^2).
        let (mut wq, mut qq) = (0f64, 0f64);
        for (&w, &q) in block.iter().zip(&q) {
            wq += w as f64 * q as f64;
            qq += (q as f64) * (q as f64);
        }
        if qq > 0.0 {
            let s2 = half::f16::from_f32((wq / qq) as f32);
            let e2 = block_sq_err(block, s2, &q);
            if e2 < best.0 {
                best = (e2, s2, q);
            }
        }
    };
    for i in 0..=Q4_STEPS {
        let t = 6.5 + 2.0 * i as f32 / Q4_STEPS as f32; // 6.5 ..= 8.5
        consider(half::f16::from_f32(-wmax / t));
        if t <= 7.5 {
            consider(half::f16::from_f32(wmax / t));
        }
    }
    (best.1, best.2)
}

/// Steps of the q4 scale search between t = 6.5 and 8.5.
const Q4_STEPS: usize = 8;

/// The inverse of [`quantize`]: the [rows, cols] f32 matrix the kernels compute with.
pub fn dequantize(words: &[u32], rows: usize, cols: usize, dtype: WeightDtype) -> Vec<f32> {
    assert!(dtype.is_quantized());
    let kp = Matrix::padded_cols_for(cols, dtype);
    let nb = kp / QBLOCK;
    let qwords = Matrix::quant_words(rows, cols, dtype);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let bi = r * nb + c / QBLOCK;
            let s =
                half::f16::from_bits((words[qwords + bi / 2] >> (16 * (bi % 2))) as u16).to_f32();
            let e = r * kp + c;
            let q = match dtype {
                WeightDtype::Q8 => (words[e / 4] >> (8 * (e % 4))) as u8 as i8 as i32,
                _ => ((words[e / 8] >> (4 * (e % 8))) & 15) as i32 - 8,
            };
            out.push(q as f32 * s);
        }
    }
    out
}

/// A weight matrix [rows, cols] on the GPU: f32 / f16 rows padded to a multiple of 8 elements
/// with zeros; q8 / q4 in the block layout of [`quantize`] (rows padded to 32).
///
/// A matrix larger than one storage binding may hold ([`Gpu::weight_binding_limit`]: the
/// device's `max_storage_buffer_binding_size` and `max_buffer_size`) is split by rows into
/// parts of about equal size, each its own buffer in the same layout as a whole matrix of its
/// rows (a quantized part has its own scales after its quants). Output rows are independent,
/// so the kernel wrappers dispatch once per part with the part's row count as `m` and its
/// first row added to the output offset; the embedding gather skips ids outside the part.
pub struct Matrix {
    /// Row blocks in order, covering rows 0..rows.
    pub parts: Vec<MatrixPart>,
    pub rows: usize,
    pub cols: usize,
    pub dtype: WeightDtype,
    /// The tensor's name, for messages.
    pub label: String,
}

/// Rows `row0..row0 + rows` of a [`Matrix`], in a buffer of their own.
pub struct MatrixPart {
    pub buf: wgpu::Buffer,
    pub row0: usize,
    pub rows: usize,
}

impl Matrix {
    /// Padded row length of f32 / f16 matrices.
    pub fn padded_cols(cols: usize) -> usize {
        cols.div_ceil(8) * 8
    }
    /// Padded row length for `dtype` (a whole number of quantization blocks for q8 / q4).
    pub fn padded_cols_for(cols: usize, dtype: WeightDtype) -> usize {
        if dtype.is_quantized() {
            cols.div_ceil(QBLOCK) * QBLOCK
        } else {
            Self::padded_cols(cols)
        }
    }
    /// Padded row length in units of 4 elements (the kernels' `kp4`).
    pub fn kp4(&self) -> u32 {
        (Self::padded_cols_for(self.cols, self.dtype) / 4) as u32
    }
    /// Bytes on the GPU of a [rows, cols] matrix stored as `dtype` (one part).
    pub fn bytes_for(rows: usize, cols: usize, dtype: WeightDtype) -> u64 {
        let kp = Self::padded_cols_for(cols, dtype);
        match dtype {
            WeightDtype::F32 | WeightDtype::F16 => (rows * kp * dtype.bytes()) as u64,
            WeightDtype::Q8 => (rows * kp + (rows * kp / QBLOCK).div_ceil(2) * 4) as u64,
            WeightDtype::Q4 => (rows * kp / 2 + (rows * kp / QBLOCK).div_ceil(2) * 4) as u64,
        }
    }
    /// Bytes on the GPU (all parts).
    pub fn bytes(&self) -> u64 {
        self.parts
            .iter()
            .map(|p| Self::bytes_for(p.rows, self.cols, self.dtype))
            .sum()
    }
    /// Words of quants (before the scales) of a [rows, cols] q8 / q4 matrix.
    pub fn quant_words(rows: usize, cols: usize, dtype: WeightDtype) -> usize {
        let kp = Self::padded_cols_for(cols, dtype);
        match dtype {
            WeightDtype::Q8 => rows * kp / 4,
            _ => rows * kp / 8,
        }
    }
    /// The buffer of an unsplit matrix (kernels that bind the whole matrix, e.g. the fused
    /// scan's dt_proj); an error naming the matrix when it was split.
    pub fn whole(&self) -> Result<&wgpu::Buffer> {
        match self.parts.as_slice() {
            [p] => Ok(&p.buf),
            parts => Err(Error::Unsupported(format!(
                "{} is split into {} parts and this kernel binds it whole",
                self.label,
                parts.len()
            ))),
        }
    }
    /// Row counts of the parts of a [rows, cols] `dtype` matrix whose parts may use at most
    /// `max_bytes` each (buffers are rounded up to 16 bytes); None when one row does not fit.
    pub fn part_rows(
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        max_bytes: u64,
    ) -> Option<Vec<usize>> {
        let fits =
            |r: usize| Self::bytes_for(r, cols, dtype).max(16).div_ceil(16) * 16 <= max_bytes;
        if rows == 0 || fits(rows) {
            return Some(vec![rows]);
        }
        if !fits(1) {
            return None;
        }
        // Largest row count that fits (bytes grow with rows), then parts of equal size.
        let (mut lo, mut hi) = (1, rows);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let n = rows.div_ceil(lo);
        let per = rows.div_ceil(n);
        Some((0..n).map(|i| per.min(rows - i * per)).collect())
    }
    /// Uploads a row-major [rows, cols] f32 matrix, converting to `dtype`, split into parts
    /// that fit [`Gpu::weight_binding_limit`].
    pub fn upload(
        gpu: &Gpu,
        label: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
    ) -> Result<Matrix> {
        Self::upload_parts(
            gpu,
            label,
            data,
            rows,
            cols,
            dtype,
            gpu.weight_binding_limit,
        )
    }
    /// [`Matrix::upload`] with parts of at most `max_part_bytes` (u64::MAX: one buffer, checked
    /// against the device limits).
    pub fn upload_parts(
        gpu: &Gpu,
        label: &str,
        data: &[f32],
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
        max_part_bytes: u64,
    ) -> Result<Matrix> {
        assert_eq!(data.len(), rows * cols);
        let limit = max_part_bytes.min(gpu.weight_binding_limit);
        let sizes = if max_part_bytes == u64::MAX {
            vec![rows]
        } else {
            Self::part_rows(rows, cols, dtype, limit).ok_or_else(|| Error::GpuLimit {
                what: format!(
                    "one row of {label} ([{rows}, {cols}] stored as {}; larger tensors are split by rows, a row cannot be)",
                    dtype.name()
                ),
                needed: Self::bytes_for(1, cols, dtype).max(16).div_ceil(16) * 16,
                limit,
                limit_name: gpu.weight_limit_name(),
            })?
        };
        let kp = Self::padded_cols_for(cols, dtype);
        let mut parts = Vec::with_capacity(sizes.len());
        let mut row0 = 0;
        for n in sizes {
            let d = &data[row0 * cols..(row0 + n) * cols];
            let name = if row0 == 0 && n == rows {
                label.to_string()
            } else {
                format!("{label} rows {row0}..{}", row0 + n)
            };
            let buf = match dtype {
                // Rows already a multiple of 8 long: upload the caller's slice, no copy.
                WeightDtype::F32 if kp == cols => gpu.upload(&name, d)?,
                WeightDtype::F32 => {
                    let mut v = vec![0f32; n * kp];
                    for r in 0..n {
                        v[r * kp..r * kp + cols].copy_from_slice(&d[r * cols..(r + 1) * cols]);
                    }
                    gpu.upload(&name, &v)?
                }
                WeightDtype::F16 => {
                    let mut v = vec![half::f16::ZERO; n * kp];
                    for r in 0..n {
                        for c in 0..cols {
                            v[r * kp + c] = half::f16::from_f32(d[r * cols + c]);
                        }
                    }
                    gpu.upload(&name, &v)?
                }
                WeightDtype::Q8 | WeightDtype::Q4 => {
                    gpu.upload(&name, &quantize(d, n, cols, dtype))?
                }
            };
            parts.push(MatrixPart { buf, row0, rows: n });
            row0 += n;
        }
        Ok(Matrix {
            parts,
            rows,
            cols,
            dtype,
            label: label.to_string(),
        })
    }
    /// Uploads words already in the layout of [`quantize`] (a pre-quantized checkpoint), as
    /// one buffer.
    pub fn upload_quantized(
        gpu: &Gpu,
        label: &str,
        words: &[u32],
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
    ) -> Result<Matrix> {
        Self::upload_quantized_bytes(gpu, label, bytemuck::cast_slice(words), rows, cols, dtype)
    }
    /// Uploads the little-endian bytes of words in the layout of [`quantize`] as they are
    /// (no conversion); `bytes` must be exactly [`Matrix::bytes_for`] long.
    pub fn upload_quantized_bytes(
        gpu: &Gpu,
        label: &str,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        dtype: WeightDtype,
    ) -> Result<Matrix> {
        let want = Self::bytes_for(rows, cols, dtype);
        if !dtype.is_quantized() || bytes.len() as u64 != want {
            return Err(Error::Invalid(format!(
                "{label}: {} bytes of {} weights for a [{rows}, {cols}] matrix; the {} block layout needs {want}",
                bytes.len(),
                dtype.name(),
                dtype.name()
            )));
        }
        if want.div_ceil(16) * 16 > gpu.weight_binding_limit {
            // Larger than one binding: split by rows. Re-quantizing the dequantized values
            // gives back the same values (quantize_round_trip), so the numbers do not change.
            let words: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let data = dequantize(&words, rows, cols, dtype);
            return Self::upload(gpu, label, &data, rows, cols, dtype);
        }
        Ok(Matrix {
            parts: vec![MatrixPart {
                buf: gpu.upload(label, bytes)?,
                row0: 0,
                rows,
            }],
            rows,
            cols,
            dtype,
            label: label.to_string(),
        })
    }
}

/// Stacks q8 / q4 matrices with the same columns by rows, each given as the bytes of its
/// [`quantize`] layout with its row count: the result is the layout of the stacked matrix
/// (quants of every part, then the scales of every part; no requantization).
pub fn stack_quantized(parts: &[(&[u8], usize)], cols: usize, dtype: WeightDtype) -> Vec<u8> {
    let nb = Matrix::padded_cols_for(cols, dtype) / QBLOCK;
    let rows: usize = parts.iter().map(|p| p.1).sum();
    let mut out = Vec::with_capacity(Matrix::bytes_for(rows, cols, dtype) as usize);
    for &(b, r) in parts {
        out.extend_from_slice(&b[..Matrix::quant_words(r, cols, dtype) * 4]);
    }
    // The scales are f16 pairs per word: concatenate them as f16 values (a part's count may be odd).
    for &(b, r) in parts {
        let s0 = Matrix::quant_words(r, cols, dtype) * 4;
        out.extend_from_slice(&b[s0..s0 + r * nb * 2]);
    }
    out.resize(Matrix::bytes_for(rows, cols, dtype) as usize, 0);
    out
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct MatmulParams {
    pub rows: u32,
    pub m: u32,
    pub k: u32,
    pub kp4: u32,
    pub x_off: u32,
    pub x_stride: u32,
    pub y_off: u32,
    pub y_stride: u32,
    pub accumulate: u32,
    pub has_bias: u32,
    pub eps: f32,
    pub passes: u32,
    pub aux_n: u32,
    /// K columns per slice of a GEMV, `gemm` or `gemm_coop2` split over K (grid z), and the Y offset
    /// between the slices' partial results; `k` and 0 without a split.
    pub kslice: u32,
    pub ypart: u32,
}

impl MatmulParams {
    /// Parameters for `rows` rows of X times `w`, without bias or prologue.
    pub fn new(
        w: &Matrix,
        x_off: usize,
        x_stride: usize,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Self {
        MatmulParams {
            rows: rows as u32,
            m: w.rows as u32,
            k: w.cols as u32,
            kp4: w.kp4(),
            x_off: x_off as u32,
            x_stride: x_stride as u32,
            y_off: y_off as u32,
            y_stride: y_stride as u32,
            accumulate: accumulate as u32,
            has_bias: 0,
            eps: 0.0,
            passes: gemv_passes(w.rows),
            aux_n: 0,
            kslice: w.cols as u32,
            ypart: 0,
        }
    }

    /// The same product restricted to one row block of a split matrix: `m` is the part's
    /// rows and its output columns start `part.row0` further along Y.
    pub fn for_part(self, part: &MatrixPart) -> Self {
        MatmulParams {
            m: part.rows as u32,
            y_off: self.y_off + part.row0 as u32,
            passes: gemv_passes(part.rows),
            ..self
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct RmsNormParams {
    pub rows: u32,
    pub width: u32,
    pub x_off: u32,
    pub x_stride: u32,
    pub y_off: u32,
    pub y_stride: u32,
    pub eps: f32,
    /// The PARTS variants (partial results summed in front of the norm): segment bounds.
    pub seg1: u32,
    pub seg2: u32,
    /// Partial results, elements between them, and whether the sum adds to Y.
    pub slices: u32,
    pub ypart: u32,
    pub accumulate: u32,
    /// Row 0 and row stride of the normalized output (PARTS without INPLACE).
    pub u_off: u32,
    pub u_stride: u32,
}

/// The partial results a K-split prompt product left in its scratch buffer
/// ([`Kernels::matmul_prompt_partial`]): [slices][rows][ms] f32 from element 0, to be summed
/// into Y by [`Kernels::reduce_partials`] or by a norm that follows it
/// ([`Kernels::rmsnorm_partials`]).
#[derive(Clone, Copy)]
pub struct Partials {
    /// gemm_reduce's parameters (Y's offset, stride, width and `accumulate` included).
    sum: MatmulParams,
}

impl Partials {
    /// Outputs per row (the product's width).
    pub fn width(&self) -> usize {
        self.sum.m as usize
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct EmbedParams {
    pub rows: u32,
    pub n_meta: u32,
    pub d: u32,
    pub kp4: u32,
    pub ids_off: u32,
    pub vocab: u32,
    pub row0: u32,
    pub part_rows: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct RopeParams {
    pub rows: u32,
    pub n_heads: u32,
    pub d_qk: u32,
    pub d_v: u32,
    pub p_off: u32,
    pub p_stride: u32,
    pub q_col: u32,
    pub v_col: u32,
    pub pos0: u32,
    pub n_meta: u32,
    pub ring: u32,
    pub cap: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct AttentionParams {
    pub rows: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub d_qk: u32,
    pub d_v: u32,
    pub q_off: u32,
    pub q_stride: u32,
    pub out_off: u32,
    pub out_stride: u32,
    pub pos0: u32,
    pub n_meta: u32,
    pub ring: u32,
    pub cap: u32,
    pub window: u32,
    pub scale: f32,
    pub k_col: u32,
    pub v_col: u32,
    pub self_kv: u32,
}

pub const NO_WINDOW: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct AttentionDecodeParams {
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub d_qk: u32,
    pub d_v: u32,
    pub q_stride: u32,
    pub k_col: u32,
    pub v_col: u32,
    pub self_kv: u32,
    pub pos: u32,
    pub n_meta: u32,
    pub ring: u32,
    pub cap: u32,
    pub window: u32,
    pub scale: f32,
    pub n_splits: u32,
}

/// Keys per split of the decode attention.
pub const DECODE_KEYS_PER_SPLIT: usize = 64;

/// Element storage of the attention KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// f32: keys [n_kv_heads, cap, d_qk] and values [n_kv_heads, cap, d_v] f32. The exact path,
    /// for models with f32 weights.
    F32,
    /// f16 packed in u32 words (`pack2x16float` after clamping to ±65504, to nearest on every
    /// driver tested; element 2i in the low half):
    /// keys [n_kv_heads, cap, d_qk / 2] and values [n_kv_heads, cap, d_v / 2] u32. Half the bytes;
    /// needs no `shader-f16`. The kernels widen to f32 on load and accumulate in f32, except the
    /// tensor-core prompt attention (attention.wgsl `main_coop`), which multiplies f16 fragments
    /// (queries and probabilities rounded to f16) with f32 accumulation.
    F16,
}

impl KvDtype {
    /// Bytes per cached key or value element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
    /// The KV storage for a model whose weights are stored as `w`: f32 only for f32 weights
    /// (the exactness reference), f16 for f16 / q8 / q4.
    pub fn for_weights(w: WeightDtype) -> KvDtype {
        match w {
            WeightDtype::F32 => KvDtype::F32,
            WeightDtype::F16 | WeightDtype::Q8 | WeightDtype::Q4 => KvDtype::F16,
        }
    }
    /// Checks that heads of `d_qk` / `d_v` elements fit this storage: the attention kernels
    /// load heads as vec4 (f32) or vec2<u32> (f16), so both must be multiples of 4.
    pub fn check_dims(self, d_qk: usize, d_v: usize) -> Result<()> {
        if !d_qk.is_multiple_of(4) || !d_v.is_multiple_of(4) {
            return Err(Error::Unsupported(format!(
                "a {} KV cache with head dims q/k {d_qk}, v {d_v}: both must be multiples of 4",
                self.name()
            )));
        }
        Ok(())
    }
}

/// One layer's K/V cache buffers as the attention kernels bind them.
#[derive(Clone, Copy)]
pub struct KvBuffers<'a> {
    /// Keys (post-RoPE) [n_kv_heads, cap, d_qk], stored as `dtype`.
    pub k: &'a wgpu::Buffer,
    /// Values [n_kv_heads, cap, d_v], stored as `dtype`.
    pub v: &'a wgpu::Buffer,
    pub dtype: KvDtype,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct ConvParams {
    pub rows: u32,
    pub d: u32,
    pub k: u32,
    pub x_off: u32,
    pub x_stride: u32,
    pub has_bias: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
pub struct ScanParams {
    pub rows: u32,
    pub d: u32,
    pub n: u32,
    pub xp_stride: u32,
    pub b_col: u32,
    pub c_col: u32,
    pub z_off: u32,
    pub z_stride: u32,
    pub rank: u32,
    pub wdt_stride: u32,
    pub eps: f32,
    pub inner_norms: u32,
    /// `ScanInput::ConvStep`: column of the conv input in the in_proj output row, kernel width.
    pub x_off: u32,
    pub conv_k: u32,
    /// FUSED_DT: partial x_proj rows to sum (from `Kernels::x_proj_conv`; 1 = one whole row).
    pub xp_parts: u32,
    /// Set by [`Kernels::scan`] (callers leave them at their defaults): row groups scanned in
    /// parallel, and rows per group (1 and 0 without groups).
    pub groups: u32,
    pub group_rows: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct MergeParams {
    pub rows: u32,
    pub width: u32,
    pub eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct StateCopyParams {
    pub a_n4: u32,
    pub b_n4: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct SwigluParams {
    pub count: u32,
    pub width: u32,
    pub groups_x: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct SampleParams {
    pub vocab: u32,
    pub mode: u32,
    pub top_k: u32,
    pub seed: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub penalty: f32,
    pub logits_off: u32,
}

/// K slices of the decode x_proj GEMV (its output has only dt_rank + 2 d_state rows, so
/// without a split it would occupy a few workgroups).
pub const X_PROJ_SLICES: usize = 8;

/// Longest K the K-across-the-workgroup GEMV takes: 256 threads x 8 columns.
pub const WIDE_MAX_K: usize = 256 * 8;

/// Groups of 4 rows per `gemv_wide` workgroup: an even number (it takes two per iteration),
/// at most 8 (its workgroup-memory slots), and enough workgroups (~264, two per SM on a 132-SM
/// GPU) for large outputs.
fn wide_passes(m: usize) -> u32 {
    (((m / (4 * 264)).clamp(2, 8) + 1) & !1) as u32
}

/// Rows at or below this use the GEMV kernel, above it the tiled GEMM.
pub const GEMV_MAX_ROWS: usize = 4;

/// Narrowest output (rows of W) that [`Kernels::matmul_prompt`] runs on `gemm_coop2` over the
/// whole of K (128 x 128 tiles of 8 subgroups, twice the multiplies per staged element of
/// `gemm_coop`'s 64 x 64). On an H200, for 256-row chunks of Hymba-1.5B: gate|up 367 -> 237 us,
/// in_proj 298 / 241 -> 227 / 130 us; pp512 f16 5363 -> 5547-5759 (against the gemm_f16
/// experiment of the same run), q4 3496 -> 4857, q8 3353 -> 4490. Narrower outputs with long K
/// run on it split over K ([`Kernels::coop_splits`]); the rest on `gemm_coop`.
pub const COOP_WIDE_MIN_M: usize = 4096;

/// Workgroup memory of attention.wgsl `main_coop`: staged keys [64][72] and values [64][136] f16,
/// probabilities [32][72] f16, scores [32][64] f32, 64 key positions and 256 zeros.
pub const ATTENTION_COOP_WORKGROUP_BYTES: u32 =
    64 * 72 * 2 + 64 * 136 * 2 + 32 * 72 * 2 + 32 * 64 * 4 + 64 * 4 + 256 * 4;

/// Rows per group at least, and groups at most, of the prompt scan over row groups
/// ([`Kernels::scan`]; scan.wgsl GROUPS).
pub const SCAN_GROUP_MIN_ROWS: u32 = 32;
pub const SCAN_GROUPS_MAX: u32 = 8;

/// Workgroup memory of the 16-subgroup `gemm_coop2` (matmul.wgsl): the staged X and W tiles,
/// 128 rows of 64 + 8 f16 each, and `cs2`.
pub const COOP2_SG16_WORKGROUP_BYTES: u32 = 2 * 128 * 72 * 2 + 2304 * 4;

/// Workgroups a narrow `gemm_coop2` product is split over K to reach (see
/// [`Kernels::coop_splits`]): one per SM of an H100 / H200 (132). `gemm_coop2` runs one
/// workgroup per SM there, so a product runs in waves of 132: on an H200 the producer layers'
/// in_proj (140 workgroups, two waves) took 216 us per 256-row chunk against 122 us for the
/// consumer layers' (126 workgroups, one wave) with 0.89 times the work. With 132 (and room in
/// the scratch for down's 5 slices) a 256-row chunk took 32.3 ms against 35.9 with 128 (2 slices).
pub const COOP_SPLIT_WORKGROUPS: usize = 132;

/// The shallowest full K slice of a split `gemm_coop2` product (8 steps of 64); the last slice
/// takes what is left of K and can be shallower.
pub const COOP_SPLIT_MIN_K: usize = 512;

/// Workgroups a narrow prompt product (at most [`NARROW_MAX_M`] outputs: Hymba's x_proj) is
/// split over K to reach on the FMA `gemm` (see [`Kernels::narrow_splits`]): about two per SM
/// of an H100 / H200.
pub const NARROW_SPLIT_WORKGROUPS: usize = 256;

/// The shallowest full K slice of a split FMA `gemm` product (4 steps of 16).
pub const NARROW_SPLIT_MIN_K: usize = 64;

/// Widest output (rows of W) that prompt chunks multiply as a narrow product: the GEMV over the
/// chunk's rows in [`Kernels::matmul`], or the FMA `gemm` split over K in
/// [`Kernels::matmul_prompt`]; 64 x 64 tiles over all of K would leave most of a GPU idle.
pub const NARROW_MAX_M: usize = 256;

/// Groups of 8 rows per GEMV workgroup: more rows amortize staging the input, but keep at
/// least ~264 workgroups (two per SM on a 132-SM GPU) for large outputs. (One row per 32 lanes
/// with all of a row's loads issued at once from a register array was measured 2.8x slower on
/// an H200: the array lives in local memory.)
fn gemv_passes(m: usize) -> u32 {
    (m / (8 * 264)).clamp(1, 4) as u32
}

/// Query heads whose P.V partial sums the GQA decode attention reduces in one round: 4 KiB of
/// workgroup memory each, beside ~9 KiB of its other arrays (so 5 under a browser's 32 KiB,
/// the 8 the kernel allows on a 48 KiB GPU, 1 at WebGPU's 16 KiB default).
pub fn gqa_reduce_heads(limits: &wgpu::Limits) -> u32 {
    ((limits
        .max_compute_workgroup_storage_size
        .saturating_sub(10 * 1024))
        / 4096)
        .clamp(1, 8)
}

/// The per-channel input of the fused decode scan.
pub enum ScanInput<'a> {
    /// The step's conv output [d] (a separate conv dispatch wrote it).
    Conv(&'a wgpu::Buffer),
    /// The step's Mamba conv1d computed inside the scan from the in_proj output (column
    /// `ScanParams::x_off`): conv weights [d, conv_k] then bias [d], and the conv state [d, conv_k],
    /// shifted in place.
    ///
    /// `readable` is bound too but unused by the shader: wgpu moves it to a read state in the
    /// barrier it places before the scan anyway (the decode step passes the attention
    /// partials, so the combine after the scan needs no barrier of its own and runs beside it).
    ConvStep {
        w: &'a wgpu::Buffer,
        state: &'a wgpu::Buffer,
        readable: &'a wgpu::Buffer,
    },
}

/// An elementwise step fused into the input side of a GEMV.
#[derive(Clone, Copy)]
pub enum Prologue<'a> {
    None,
    /// RMSNorm of each X row with this weight.
    Norm(&'a wgpu::Buffer, f32),
    /// Hybrid-head merge: X = attention output, `x2` = SSM output, weights [2, k].
    Merge {
        w: &'a wgpu::Buffer,
        x2: &'a wgpu::Buffer,
        eps: f32,
    },
    /// SwiGLU: X rows are [gate | up], each k wide.
    Swiglu,
}

/// Every pipeline the engine uses, compiled once per device.
pub struct Kernels {
    /// [dtype f32, f16, q8, q4]
    gemm: Vec<Arc<Kernel>>,
    /// Cooperative-matrix GEMM [dtype f32 (unused), f16, q8, q4], where the adapter has it.
    gemm_coop: Option<Vec<Option<Arc<Kernel>>>>,
    /// The sum of a K-split `gemm`'s or `gemm_coop2`'s partial results (matmul.wgsl
    /// `gemm_reduce`), where either split can happen.
    gemm_reduce: Option<Arc<Kernel>>,
    /// 128 x 128-tile tensor-core GEMM for wide outputs [dtype f32 (unused), f16, q8, q4].
    gemm_coop2: Option<Vec<Option<Arc<Kernel>>>>,
    /// [dtype f32, f16, q8, q4][prologue none, norm, merge, swiglu][staging small, large];
    /// empty on CPU adapters, which use `gemv_row` (not compiled there: a browser on a software
    /// adapter compiles every pipeline slowly).
    gemv: Vec<Vec<[LazyKernel; 2]>>,
    /// The K-across-the-workgroup GEMV (`gemv_wide`) [dtype][prologue; none for merge], for K
    /// up to [`WIDE_MAX_K`] and 16-bit or quantized weights; empty on CPU adapters.
    gemv_wide: Vec<Vec<Option<LazyKernel>>>,
    /// Floats of X staged in workgroup memory by the small / large GEMV variants.
    xsh: [usize; 2],
    /// Barrier-free one-row-per-thread GEMVs [dtype f32, f16, q8, q4][prologue], used on CPU adapters.
    gemv_row: Option<Vec<Vec<Arc<Kernel>>>>,
    /// f32 GEMV with the conv prologue (x_proj of a decode step) [staging small, large], and
    /// its barrier-free version on CPU adapters.
    gemv_conv: Option<[Arc<Kernel>; 2]>,
    gemv_conv_row: Option<Arc<Kernel>>,
    attention_split: KvKernel,
    /// The split entry serving a whole KV group per workgroup (GPUs; `GQA`).
    attention_gqa: Option<KvKernel>,
    attention_combine: Arc<Kernel>,
    conv_step: Arc<Kernel>,
    scan_fused: Arc<Kernel>,
    scan_fused_conv: Arc<Kernel>,
    /// The fused scans run four lanes per channel (16 channels per workgroup).
    scan_lanes: bool,
    /// Whether decode GEMVs may take `gemv_wide`: where subgroups are 32 wide (it was measured
    /// only there; without subgroups each of its reductions is two workgroup-memory trees). Tests turn
    /// it on elsewhere with [`Kernels::with_wide_gemv`].
    wide: bool,
    /// [dtype f32, f16, q8, q4]
    embed: Vec<Arc<Kernel>>,
    rmsnorm: Arc<Kernel>,
    rmsnorm_inplace: Arc<Kernel>,
    /// RMSNorms with the sum of K-split partial results in front (rmsnorm.wgsl PARTS):
    /// [into a separate output, in place (segments)]; where `gemm_reduce` exists.
    rmsnorm_parts: Option<[Arc<Kernel>; 2]>,
    rope_q: Arc<Kernel>,
    store_kv: KvKernel,
    attention: KvKernel,
    /// Prompt attention on cooperative matrices (attention.wgsl `main_coop`) for the f16 KV
    /// cache, where the adapter has them (see [`Kernels::attention`]).
    /// Compiled on first use (f32 models never run it), and only offered where the device
    /// allows its workgroup memory ([`ATTENTION_COOP_WORKGROUP_BYTES`]).
    attention_coop: Option<std::sync::OnceLock<Arc<Kernel>>>,
    conv: Arc<Kernel>,
    conv_state: Arc<Kernel>,
    scan: Arc<Kernel>,
    /// The prompt scan with one lane per (channel, state), where subgroups are 32 wide.
    scan_states: Option<Arc<Kernel>>,
    /// The same over row groups in parallel: `local_pass`, then `main` (scan.wgsl GROUPS).
    scan_groups: Option<[Arc<Kernel>; 2]>,
    merge: Arc<Kernel>,
    swiglu: Arc<Kernel>,
    state_copy: Arc<Kernel>,
    sample: Arc<Kernel>,
    /// A small buffer bound where a kernel's optional input is absent.
    dummy: wgpu::Buffer,
}

/// A `matmul.wgsl` entry compiled on first use (then kept).
struct LazyKernel {
    cell: std::sync::OnceLock<Arc<Kernel>>,
    entry: &'static str,
    defines: Vec<String>,
    binds: Vec<BindKind>,
}

impl LazyKernel {
    fn new(entry: &'static str, defines: Vec<String>, binds: &[BindKind]) -> Self {
        LazyKernel {
            cell: std::sync::OnceLock::new(),
            entry,
            defines,
            binds: binds.to_vec(),
        }
    }

    fn get(&self, gpu: &Gpu) -> Result<Arc<Kernel>> {
        if let Some(k) = self.cell.get() {
            return Ok(k.clone());
        }
        let d: Vec<&str> = self.defines.iter().map(|s| s.as_str()).collect();
        let k = Arc::new(Kernel::new(
            gpu,
            "matmul.wgsl",
            SRC_MATMUL,
            self.entry,
            &d,
            &self.binds,
        )?);
        Ok(self.cell.get_or_init(|| k).clone())
    }

    /// Whether it has been compiled.
    pub(crate) fn compiled(&self) -> bool {
        self.cell.get().is_some()
    }
}

/// A kernel that reads or writes the KV cache, in its f32-cache and f16-cache (`KV_F16`) forms,
/// each compiled on first use: a model uses one KV storage, and a browser compiles each pipeline
/// slowly.
struct KvKernel {
    forms: [std::sync::OnceLock<Arc<Kernel>>; 2],
    file: &'static str,
    src: &'static str,
    defines: Vec<String>,
    binds: Vec<BindKind>,
}

impl KvKernel {
    /// Entry `main` of `src` with `defines` (nothing compiled yet).
    fn new(
        _gpu: &Gpu,
        file: &'static str,
        src: &'static str,
        defines: &[&str],
        binds: &[BindKind],
    ) -> Result<KvKernel> {
        Ok(KvKernel {
            forms: Default::default(),
            file,
            src,
            defines: defines.iter().map(|d| d.to_string()).collect(),
            binds: binds.to_vec(),
        })
    }

    fn get(&self, gpu: &Gpu, dtype: KvDtype) -> Result<Arc<Kernel>> {
        let i = (dtype == KvDtype::F16) as usize;
        if let Some(k) = self.forms[i].get() {
            return Ok(k.clone());
        }
        let mut d: Vec<&str> = self.defines.iter().map(|s| s.as_str()).collect();
        if dtype == KvDtype::F16 {
            d.push("KV_F16");
        }
        let k = Arc::new(Kernel::new(
            gpu,
            self.file,
            self.src,
            "main",
            &d,
            &self.binds,
        )?);
        Ok(self.forms[i].get_or_init(|| k).clone())
    }

    /// Whether the form for `dtype` has been compiled.
    #[cfg(test)]
    fn compiled(&self, dtype: KvDtype) -> bool {
        self.forms[(dtype == KvDtype::F16) as usize].get().is_some()
    }
}

use BindKind::{Read as R, ReadWrite as RW, Uniform as U};

/// Index of a weight dtype in the per-dtype kernel tables.
fn dtype_index(d: WeightDtype) -> usize {
    match d {
        WeightDtype::F32 => 0,
        WeightDtype::F16 => 1,
        WeightDtype::Q8 => 2,
        WeightDtype::Q4 => 3,
    }
}

impl Kernels {
    pub fn new(gpu: &Gpu) -> Result<Kernels> {
        Self::new_with(gpu, gpu.is_cpu())
    }

    /// `rowwise`: use the barrier-free one-row-per-thread GEMV (what CPU adapters get).
    pub fn new_with(gpu: &Gpu, rowwise: bool) -> Result<Kernels> {
        Self::new_with_gqa_heads(gpu, rowwise, gqa_reduce_heads(&gpu.limits))
    }

    /// As `new_with`, with the GQA decode attention reducing `gqa_heads` heads per round
    /// (tests of the several-round path on devices that allow one round).
    pub(crate) fn new_with_gqa_heads(gpu: &Gpu, rowwise: bool, gqa_heads: u32) -> Result<Kernels> {
        // GEMV staging sizes: 2048 floats for K up to 2048 (small footprint, high occupancy),
        // and what the device allows (up to 5632, enough for K = 5504) for larger K.
        let limit = (gpu.limits.max_compute_workgroup_storage_size as usize)
            .saturating_sub(2048 + 64)
            / 4
            / 8
            * 8;
        let xsh = [2048usize.min(limit).max(8), 5632usize.min(limit).max(8)];
        let sg32 = gpu.features.contains(wgpu::Features::SUBGROUP)
            && gpu.info.subgroup_min_size == 32
            && gpu.info.subgroup_max_size == 32;
        let k = |file: &str,
                 src: &str,
                 defs: &[&str],
                 entry: &str,
                 b: &[BindKind]|
         -> Result<Arc<Kernel>> {
            Ok(Arc::new(Kernel::new(gpu, file, src, entry, defs, b)?))
        };
        let mut gemv = Vec::new();
        let mut gemv_wide = Vec::new();
        for dt in ["W_F32", "PACKED_F16", "W_Q8", "W_Q4"] {
            if rowwise {
                break;
            }
            let mut per_pro = Vec::new();
            let mut per_pro_wide = Vec::new();
            for (pro, binds) in [
                ("", &[U, R, R, R, RW][..]),
                ("PRO_NORM", &[U, R, R, R, RW, R][..]),
                ("PRO_MERGE", &[U, R, R, R, RW, R, R][..]),
                ("PRO_SWIGLU", &[U, R, R, R, RW][..]),
            ] {
                // Compiled on first use: a model uses one weight dtype, so most of the 32
                // variants are never needed (a browser compiles each pipeline slowly).
                let mk = |n: usize| {
                    let mut d = vec![dt.to_string(), format!("XSH={n}")];
                    if !pro.is_empty() {
                        d.push(pro.to_string());
                    }
                    if sg32 {
                        d.push("SUBGROUP32".into());
                    }
                    LazyKernel::new("gemv", d, binds)
                };
                per_pro.push([mk(xsh[0]), mk(xsh[1])]);
                let mut d = vec![dt.to_string(), "WIDE".into()];
                if !pro.is_empty() {
                    d.push(pro.to_string());
                }
                if sg32 {
                    d.push("SUBGROUP32".into());
                }
                // f32 weights and the merge prologue never take gemv_wide (see gemv_choice).
                per_pro_wide.push(
                    (pro != "PRO_MERGE" && dt != "W_F32")
                        .then(|| LazyKernel::new("gemv_wide", d, binds)),
                );
            }
            gemv.push(per_pro);
            gemv_wide.push(per_pro_wide);
        }
        // CPU adapters (lavapipe, SwiftShader) run workgroup barriers as context switches:
        // give them the barrier-free GEMV.
        let gemv_row = if rowwise {
            let mut v = Vec::new();
            for dt in ["W_F32", "PACKED_F16", "W_Q8", "W_Q4"] {
                let mut per = Vec::new();
                for (pro, binds) in [
                    ("", &[U, R, R, R, RW][..]),
                    ("PRO_NORM", &[U, R, R, R, RW, R][..]),
                    ("PRO_MERGE", &[U, R, R, R, RW, R, R][..]),
                    ("PRO_SWIGLU", &[U, R, R, R, RW][..]),
                ] {
                    let mut d = vec![dt];
                    if !pro.is_empty() {
                        d.push(pro);
                    }
                    per.push(k("matmul.wgsl", SRC_MATMUL, &d, "gemv_row", binds)?);
                }
                v.push(per);
            }
            Some(v)
        } else {
            None
        };
        let conv_binds = &[U, R, R, R, RW, R, R][..];
        let conv_defs = |n: usize| {
            let mut d = vec!["W_F32".to_string(), "PRO_CONV".into(), format!("XSH={n}")];
            if sg32 {
                d.push("SUBGROUP32".into());
            }
            d
        };
        let mk_conv = |n: usize| -> Result<Arc<Kernel>> {
            let d = conv_defs(n);
            let d: Vec<&str> = d.iter().map(|s| s.as_str()).collect();
            k("matmul.wgsl", SRC_MATMUL, &d, "gemv", conv_binds)
        };
        let gemv_conv = if rowwise {
            None
        } else {
            Some([mk_conv(xsh[0])?, mk_conv(xsh[1])?])
        };
        let gemv_conv_row = if rowwise {
            Some(k(
                "matmul.wgsl",
                SRC_MATMUL,
                &["W_F32", "PRO_CONV"],
                "gemv_row",
                conv_binds,
            )?)
        } else {
            None
        };
        // The fused decode scan: four lanes per channel on GPUs (LANES4), one thread per
        // channel on CPU adapters (fewer barriers).
        let scan_defs = |extra: &[&'static str]| {
            let mut d = vec!["FUSED_DT"];
            d.extend_from_slice(extra);
            if !rowwise {
                d.push("LANES4");
            }
            if sg32 {
                d.push("SUBGROUP32");
            }
            d
        };
        // Tensor-core GEMMs for prompt chunks, per storage [f32 (none: f32 weights keep the
        // exact f32 GEMM), f16, q8, q4].
        let coop_family =
            |entry: &str, defs: &[&'static str]| -> Result<Vec<Option<Arc<Kernel>>>> {
                let mut v = vec![None];
                for dt in [&[][..], &["W_Q8"], &["W_Q4"]] {
                    let mut d = dt.to_vec();
                    d.extend_from_slice(defs);
                    v.push(Some(k(
                        "matmul.wgsl",
                        SRC_MATMUL,
                        &d,
                        entry,
                        &[U, R, R, R, RW],
                    )?));
                }
                Ok(v)
            };
        let (gemm_coop, gemm_coop2) = if gpu.coop_f16 {
            (
                Some(coop_family("gemm_coop", &["COOP"])?),
                Some(coop_family(
                    "gemm_coop2",
                    // 16 subgroups (512 threads) per tile where the device allows it: on an
                    // H200 the 8-subgroup form runs one workgroup per SM, and this one (first
                    // with 32-deep K steps as the 8-subgroup form) took the prompt chunk from
                    // 32.3 to 30.9 ms, then 31.6 -> 28.6 ms with 64-deep steps.
                    // HYMBA_COOP2_SG8=1 keeps the 8-subgroup form (for A/B measurements).
                    if std::env::var_os("HYMBA_COOP2_SG8").is_none()
                        && gpu.device.limits().max_compute_invocations_per_workgroup >= 512
                        && gpu.device.limits().max_compute_workgroup_size_x >= 512
                        && gpu.device.limits().max_compute_workgroup_storage_size
                            >= COOP2_SG16_WORKGROUP_BYTES
                    {
                        &["COOP", "COOP2", "COOP2_SG16", "XV4"]
                    } else {
                        &["COOP", "COOP2", "XV4"]
                    },
                )?),
            )
        } else {
            (None, None)
        };
        // The sum of K-split partial results: GPU kernel families split narrow products
        // (`narrow_splits`), tensor-core adapters the 1600-wide ones (`coop_splits`).
        let gemm_reduce = if !rowwise || gpu.coop_f16 {
            Some(k(
                "matmul.wgsl",
                SRC_MATMUL,
                &["REDUCE"],
                "gemm_reduce",
                &[U, R, R, R, RW],
            )?)
        } else {
            None
        };
        let has_reduce = gemm_reduce.is_some();
        Ok(Kernels {
            gemv_row,
            gemv_conv,
            gemv_conv_row,
            gemm_coop,
            gemm_reduce,
            gemm_coop2,
            gemm: [&["W_F32"][..], &[], &["W_Q8"], &["W_Q4"]]
                .iter()
                .map(|d| k("matmul.wgsl", SRC_MATMUL, d, "gemm", &[U, R, R, R, RW]))
                .collect::<Result<_>>()?,
            gemv,
            gemv_wide,
            xsh,
            // CPU adapters get the 64-thread split (fewer invocations per barrier).
            attention_split: KvKernel::new(
                gpu,
                "attention_decode.wgsl",
                SRC_ATTENTION_DECODE,
                if rowwise { &["CPU_SPLIT"] } else { &[] },
                &[U, RW, R, R, RW, RW],
            )?,
            attention_gqa: if rowwise {
                None
            } else {
                let heads = format!("GPV_HEADS={}", gqa_heads.clamp(1, 8));
                let mut d = vec!["GQA", heads.as_str()];
                if sg32 {
                    d.push("SUBGROUP32");
                }
                Some(KvKernel::new(
                    gpu,
                    "attention_decode.wgsl",
                    SRC_ATTENTION_DECODE,
                    &d,
                    &[U, RW, R, R, RW, RW],
                )?)
            },
            attention_combine: k(
                "attention_decode.wgsl",
                SRC_ATTENTION_DECODE,
                &["COMBINE"],
                "main",
                &[U, R, RW],
            )?,
            conv_step: k(
                "conv1d.wgsl",
                SRC_CONV1D,
                &["STEP"],
                "main",
                &[U, R, R, RW, RW],
            )?,
            scan_fused: k(
                "scan.wgsl",
                SRC_SCAN,
                &scan_defs(&[]),
                "main",
                &[U, R, R, R, R, R, RW, RW, R],
            )?,
            scan_fused_conv: k(
                "scan.wgsl",
                SRC_SCAN,
                &scan_defs(&["CONV_IN"]),
                "main",
                &[U, R, R, R, R, R, RW, RW, R, RW, R],
            )?,
            scan_lanes: !rowwise,
            wide: sg32,
            embed: [&["W_F32"][..], &[], &["W_Q8"], &["W_Q4"]]
                .iter()
                .map(|d| k("embed.wgsl", SRC_EMBED, d, "main", &[U, R, R, R, RW]))
                .collect::<Result<_>>()?,
            rmsnorm: k("rmsnorm.wgsl", SRC_RMSNORM, &[], "main", &[U, R, R, RW])?,
            rmsnorm_inplace: k(
                "rmsnorm.wgsl",
                SRC_RMSNORM,
                &["INPLACE"],
                "main",
                &[U, R, RW],
            )?,
            rmsnorm_parts: if has_reduce {
                Some([
                    k(
                        "rmsnorm.wgsl",
                        SRC_RMSNORM,
                        &["PARTS"],
                        "main",
                        &[U, R, R, RW, RW],
                    )?,
                    k(
                        "rmsnorm.wgsl",
                        SRC_RMSNORM,
                        &["PARTS", "INPLACE"],
                        "main",
                        &[U, R, R, RW],
                    )?,
                ])
            } else {
                None
            },
            rope_q: k("rope.wgsl", SRC_ROPE, &[], "main", &[U, R, RW])?,
            store_kv: KvKernel::new(
                gpu,
                "rope.wgsl",
                SRC_ROPE,
                &["STORE_KV"],
                &[U, R, R, RW, RW],
            )?,
            attention: KvKernel::new(
                gpu,
                "attention.wgsl",
                SRC_ATTENTION,
                if sg32 { &["SUBGROUP32"] } else { &[] },
                &[U, R, R, R, RW],
            )?,
            // HYMBA_NO_COOP_ATTENTION=1 keeps the FMA form (A/B measurements).
            attention_coop: (gpu.coop_f16
                && gpu.device.limits().max_compute_workgroup_storage_size
                    >= ATTENTION_COOP_WORKGROUP_BYTES
                && std::env::var_os("HYMBA_NO_COOP_ATTENTION").is_none())
            .then(std::sync::OnceLock::new),
            conv: k("conv1d.wgsl", SRC_CONV1D, &[], "main", &[U, R, R, R, RW])?,
            conv_state: k("conv1d.wgsl", SRC_CONV1D, &["STATE"], "main", &[U, R, RW])?,
            scan: k(
                "scan.wgsl",
                SRC_SCAN,
                &[],
                "main",
                &[U, R, R, R, R, R, RW, RW],
            )?,
            scan_states: if sg32 {
                Some(k(
                    "scan.wgsl",
                    SRC_SCAN,
                    &["PAR_STATES"],
                    "main",
                    &[U, R, R, R, R, R, RW, RW],
                )?)
            } else {
                None
            },
            scan_groups: if sg32 {
                let g = |entry| {
                    k(
                        "scan.wgsl",
                        SRC_SCAN,
                        &["PAR_STATES", "GROUPS"],
                        entry,
                        &[U, R, R, R, R, R, RW, RW, RW],
                    )
                };
                Some([g("local_pass")?, g("main")?])
            } else {
                None
            },
            merge: k("merge.wgsl", SRC_MERGE, &[], "main", &[U, R, R, R, RW])?,
            swiglu: k("swiglu.wgsl", SRC_SWIGLU, &[], "main", &[U, RW])?,
            state_copy: k(
                "state_copy.wgsl",
                SRC_STATE_COPY,
                &[],
                "main",
                &[U, R, RW, R, RW],
            )?,
            sample: k("sample.wgsl", SRC_SAMPLE, &[], "main", &[U, R, RW, RW])?,
            dummy: gpu.buffer("dummy", 16)?,
        })
    }

    /// Y[rows, m] (+)= X[rows, k] W^T (+ bias). X at `x_off` with row stride `x_stride`, Y likewise.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        rec: &mut Recorder,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        bias: Option<&wgpu::Buffer>,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        if bias.is_some() && w.parts.len() > 1 {
            return Err(Error::Unsupported(format!(
                "a bias with {}, which is split into {} parts",
                w.label,
                w.parts.len()
            )));
        }
        let b = bias.unwrap_or(&self.dummy);
        for part in &w.parts {
            let p = MatmulParams {
                has_bias: bias.is_some() as u32,
                ..MatmulParams::new(w, x_off, x_stride, y_off, y_stride, rows, accumulate)
            }
            .for_part(part);
            // GEMV for decode-sized row counts, and for narrow outputs (x_proj) where GEMM tiles
            // would leave most of the GPU idle.
            if rows <= GEMV_MAX_ROWS || w.rows <= NARROW_MAX_M {
                let (k, passes, gx) = self.gemv_choice(rec.gpu(), w, 0, part.rows)?;
                let p = MatmulParams { passes, ..p };
                rec.dispatch(&k, &p, &[x, &part.buf, b, y], [gx, rows as u32, 1])?;
            } else {
                let k = match self.coop_kernel(w, rows) {
                    Some(k) => k,
                    None => &self.gemm[dtype_index(w.dtype)],
                };
                rec.dispatch(
                    k,
                    &p,
                    &[x, &part.buf, b, y],
                    [part.rows.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1],
                )?;
            }
        }
        Ok(())
    }

    /// The cooperative-matrix GEMM `matmul` uses for this weight and row count, if any
    /// (it rounds X to f16, so callers' references must too).
    fn coop_kernel(&self, w: &Matrix, rows: usize) -> Option<&Arc<Kernel>> {
        if rows <= GEMV_MAX_ROWS || w.rows <= NARROW_MAX_M {
            return None;
        }
        self.gemm_coop.as_ref()?[dtype_index(w.dtype)].as_ref()
    }

    /// `gemm_coop2` for this product whatever its width, if the adapter has it and the product
    /// suits it: a tensor-core product (see [`Kernels::coop_kernel`]), W in one buffer, X rows
    /// 16-byte aligned (it reads them as vec4).
    fn coop2_any(
        &self,
        w: &Matrix,
        rows: usize,
        x_off: usize,
        x_stride: usize,
    ) -> Option<&Arc<Kernel>> {
        if self.coop_kernel(w, rows).is_none()
            || w.parts.len() != 1
            || !x_off.is_multiple_of(4)
            || !x_stride.is_multiple_of(4)
        {
            return None;
        }
        self.gemm_coop2.as_ref()?[dtype_index(w.dtype)].as_ref()
    }

    /// The 128 x 128-tile tensor-core GEMM over the whole of K for this wide product (>=
    /// [`COOP_WIDE_MIN_M`] rows of W, one buffer, X and Y rows 16-byte aligned), if the adapter
    /// has it.
    pub fn coop2_kernel(
        &self,
        w: &Matrix,
        rows: usize,
        x_off: usize,
        x_stride: usize,
        y_off: usize,
        y_stride: usize,
    ) -> Option<&Arc<Kernel>> {
        if w.rows < COOP_WIDE_MIN_M || !y_off.is_multiple_of(4) || !y_stride.is_multiple_of(4) {
            return None;
        }
        self.coop2_any(w, rows, x_off, x_stride)
    }

    /// Into how many K slices [`Kernels::matmul_prompt`] splits this product on `gemm_coop2`,
    /// given `parts_bytes` of scratch for the partial results. Only narrow outputs (under
    /// [`COOP_WIDE_MIN_M`] rows of W) split: Hymba-1.5B's 1600-wide out_proj and down make 13 x 2
    /// tiles of 128 x 128 at 256 rows, a fifth of an H200's 132 SMs, each walking all of K. Slices
    /// are added until the product has about [`COOP_SPLIT_WORKGROUPS`] workgroups, at most
    /// K / [`COOP_SPLIT_MIN_K`] of them, as many as the scratch holds; 1 means no split. Slices
    /// are whole multiples of 64 deep except the last, which takes the rest of K.
    pub fn coop_splits(
        &self,
        w: &Matrix,
        rows: usize,
        x_off: usize,
        x_stride: usize,
        parts_bytes: u64,
    ) -> usize {
        let ok = self.coop2_any(w, rows, x_off, x_stride).is_some()
            && self.gemm_reduce.is_some()
            && w.rows < COOP_WIDE_MIN_M;
        if !ok {
            return 1;
        }
        Self::k_splits(
            w,
            rows,
            128,
            COOP_SPLIT_WORKGROUPS,
            COOP_SPLIT_MIN_K,
            parts_bytes,
        )
    }

    /// Into how many K slices [`Kernels::matmul_prompt`] splits this narrow product (at most
    /// [`NARROW_MAX_M`] outputs, more than [`GEMV_MAX_ROWS`] rows) on the FMA `gemm`, given
    /// `parts_bytes` of scratch; 1: no split (it then runs as a GEMV over the rows). Hymba-1.5B's
    /// x_proj (132 outputs, K 3200) makes 3 x 4 tiles of 64 x 64 at 256 rows: as a GEMV each
    /// workgroup re-read its rows of W for every row of X (256 x 1.7 MB from L2 per chunk).
    /// Slices are added until the product has about [`NARROW_SPLIT_WORKGROUPS`] workgroups, at
    /// most K / [`NARROW_SPLIT_MIN_K`], as many as the scratch holds. Not on CPU adapters (their
    /// barriers are slow; they keep the barrier-free GEMV).
    pub fn narrow_splits(&self, w: &Matrix, rows: usize, parts_bytes: u64) -> usize {
        if self.cpu_adapter()
            || self.gemm_reduce.is_none()
            || rows <= GEMV_MAX_ROWS
            || w.rows > NARROW_MAX_M
            || w.parts.len() != 1
        {
            return 1;
        }
        Self::k_splits(
            w,
            rows,
            64,
            NARROW_SPLIT_WORKGROUPS,
            NARROW_SPLIT_MIN_K,
            parts_bytes,
        )
    }

    /// K slices for a product of `rows` rows on square output tiles of `tile`: enough to bring
    /// it to about `workgroups` workgroups, at most K / `min_k`, as many as `parts_bytes` of
    /// scratch holds; at least 1 (no split).
    fn k_splits(
        w: &Matrix,
        rows: usize,
        tile: usize,
        workgroups: usize,
        min_k: usize,
        parts_bytes: u64,
    ) -> usize {
        let tiles = w.rows.div_ceil(tile) * rows.div_ceil(tile);
        let part = (rows * Self::parts_stride(w.rows) * 4) as u64;
        (workgroups / tiles)
            .min(w.cols / min_k)
            .min((parts_bytes / part) as usize)
            .max(1)
    }

    /// Row stride (floats) of the K-split partial results for `m` outputs: a multiple of 4, so
    /// that gemm_coop2's fragment stores stay 16-byte aligned.
    pub fn parts_stride(m: usize) -> usize {
        m.div_ceil(4) * 4
    }

    /// As [`Kernels::matmul`] without a bias, for prompt chunks: wide products (at least
    /// [`COOP_WIDE_MIN_M`] rows of W) run on `gemm_coop2` where [`Kernels::coop2_kernel`] allows;
    /// where [`Kernels::coop_splits`] gives n > 1, `gemm_coop2` runs over n slices of K at once
    /// into `parts` and `gemm_reduce` adds them into Y; narrow products where
    /// [`Kernels::narrow_splits`] gives n > 1 do the same on the FMA `gemm`; otherwise (or
    /// without `parts`) this is [`Kernels::matmul`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_prompt(
        &self,
        rec: &mut Recorder,
        parts: Option<&wgpu::Buffer>,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        let pending = self.matmul_prompt_partial(
            rec, parts, x, x_off, x_stride, w, y, y_off, y_stride, rows, accumulate,
        )?;
        match (pending, parts) {
            (Some(pp), Some(parts)) => self.reduce_partials(rec, parts, pp, y),
            _ => Ok(()),
        }
    }

    /// Sums the partial results `pp` left in `parts` into Y (`y`, as the product named it).
    pub fn reduce_partials(
        &self,
        rec: &mut Recorder,
        parts: &wgpu::Buffer,
        pp: Partials,
        y: &wgpu::Buffer,
    ) -> Result<()> {
        let reduce = self.gemm_reduce.as_ref().ok_or_else(|| {
            crate::error::Error::Invalid(
                "reduce_partials: no split products on this adapter".into(),
            )
        })?;
        let s = pp.sum;
        rec.dispatch(
            reduce,
            &s,
            &[parts, &self.dummy, &self.dummy, y],
            [s.m.div_ceil(256), s.rows, 1],
        )
    }

    /// [`Kernels::matmul_prompt`] without the final sum of a K-split product: returns the
    /// partial results it left in `parts` (Y not yet written), or None when the product wrote Y
    /// itself. The caller sums them with [`Kernels::reduce_partials`] or
    /// [`Kernels::rmsnorm_partials`].
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_prompt_partial(
        &self,
        rec: &mut Recorder,
        parts: Option<&wgpu::Buffer>,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<Option<Partials>> {
        let p = MatmulParams::new(w, x_off, x_stride, y_off, y_stride, rows, accumulate);
        // gemm_coop2 reads X through both of its X bindings (scalar and vec4).
        if let Some(k) = self.coop2_kernel(w, rows, x_off, x_stride, y_off, y_stride) {
            rec.dispatch(
                k,
                &p,
                &[x, &w.parts[0].buf, x, y],
                [w.rows.div_ceil(128) as u32, rows.div_ceil(128) as u32, 1],
            )?;
            return Ok(None);
        }
        if let Some(parts) = parts {
            debug_assert!(parts != x && parts != y, "split scratch aliases X or Y");
            let m = w.rows;
            let ms = Self::parts_stride(m);
            // Partial results [slices][rows][ms]; each kernel's slices are whole K steps (64
            // deep for gemm_coop2, 16 for gemm), the last one taking the rest of K.
            let coop = self.coop_splits(w, rows, x_off, x_stride, parts.size());
            let narrow = self.narrow_splits(w, rows, parts.size());
            let split = if coop > 1 {
                let k = self.coop2_any(w, rows, x_off, x_stride);
                k.map(|k| (k, coop, 64, [m.div_ceil(128), rows.div_ceil(128)], true))
            } else if narrow > 1 {
                let k = &self.gemm[dtype_index(w.dtype)];
                Some((k, narrow, 16, [m.div_ceil(64), rows.div_ceil(64)], false))
            } else {
                None
            };
            if let (Some((k, splits, step, [gx, gy], xv4)), Some(_)) = (split, &self.gemm_reduce) {
                let kslice = w.cols.div_ceil(splits).div_ceil(step) * step;
                let slices = w.cols.div_ceil(kslice);
                let sp = MatmulParams {
                    kslice: kslice as u32,
                    ypart: (rows * ms) as u32,
                    ..MatmulParams::new(w, x_off, x_stride, 0, ms, rows, false)
                };
                // gemm_coop2 reads X through both of its X bindings (scalar and vec4).
                let third = if xv4 { x } else { &self.dummy };
                rec.dispatch(
                    k,
                    &sp,
                    &[x, &w.parts[0].buf, third, parts],
                    [gx as u32, gy as u32, slices as u32],
                )?;
                let sum = MatmulParams {
                    x_off: 0,
                    x_stride: ms as u32,
                    ypart: (rows * ms) as u32,
                    passes: slices as u32,
                    ..p
                };
                return Ok(Some(Partials { sum }));
            }
        }
        self.matmul(
            rec, x, x_off, x_stride, w, None, y, y_off, y_stride, rows, accumulate,
        )?;
        Ok(None)
    }

    /// Lets decode GEMVs take `gemv_wide` (or not) whatever the adapter's subgroups: tests run
    /// its workgroup-memory reductions on adapters without 32-wide subgroups this way.
    #[cfg(test)]
    pub(crate) fn with_wide_gemv(mut self, on: bool) -> Self {
        self.wide = on;
        self
    }

    /// How many of the workgroup GEMV variants (compiled on first use) have been compiled.
    pub fn gemv_variants_compiled(&self) -> usize {
        let (staged, wide) = self.gemv_variants_compiled_by_entry();
        staged + wide
    }

    /// [`Kernels::gemv_variants_compiled`] per entry point: (`gemv`, `gemv_wide`).
    pub fn gemv_variants_compiled_by_entry(&self) -> (usize, usize) {
        let staged = self.gemv.iter().flatten().flatten();
        let wide = self.gemv_wide.iter().flatten().flatten();
        (
            staged.filter(|k| k.compiled()).count(),
            wide.filter(|k| k.compiled()).count(),
        )
    }

    /// Whether these are the kernels of a CPU adapter (barrier-free GEMVs, 64-thread decode
    /// attention); the model then also keeps the decode conv in its own dispatch.
    pub fn cpu_adapter(&self) -> bool {
        self.gemv_row.is_some()
    }

    /// Whether `matmul` runs this weight and row count on cooperative matrices (X rounded to f16).
    pub fn uses_coop(&self, w: &Matrix, rows: usize) -> bool {
        self.coop_kernel(w, rows).is_some()
    }

    fn gemv_kernel(&self, gpu: &Gpu, w: &Matrix, pro: usize) -> Result<Arc<Kernel>> {
        if let Some(rowwise) = &self.gemv_row {
            return Ok(rowwise[dtype_index(w.dtype)][pro].clone());
        }
        let big = (Matrix::padded_cols(w.cols) > self.xsh[0]) as usize;
        self.gemv[dtype_index(w.dtype)][pro][big].get(gpu)
    }

    /// The GEMV for `w` with prologue `pro`, its parameters' `passes` and its grid's x for
    /// `part_rows` rows of W: `gemv_wide` where K allows, else `gemv` (or `gemv_row`).
    fn gemv_choice(
        &self,
        gpu: &Gpu,
        w: &Matrix,
        pro: usize,
        part_rows: usize,
    ) -> Result<(Arc<Kernel>, u32, u32)> {
        // gemv_wide: K within one chunk per thread, 16-bit or quantized weights (f32 measured
        // faster on gemv; no kernel is built for it), no merge prologue (it has two branches to
        // reduce), subgroups of 32 (`wide`).
        let wide = self
            .gemv_wide
            .get(dtype_index(w.dtype))
            .and_then(|v| v[pro].as_ref())
            .filter(|_| self.wide && w.cols <= WIDE_MAX_K);
        if let Some(k) = wide {
            let passes = wide_passes(part_rows);
            let gx = part_rows.div_ceil(4 * passes as usize) as u32;
            return Ok((k.get(gpu)?, passes, gx));
        }
        let passes = gemv_passes(part_rows);
        Ok((
            self.gemv_kernel(gpu, w, pro)?,
            passes,
            part_rows.div_ceil(8 * passes as usize) as u32,
        ))
    }

    /// Decode GEMV (rows ≤ a few) with an elementwise prologue fused into the input side.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_pro(
        &self,
        rec: &mut Recorder,
        x: &wgpu::Buffer,
        x_off: usize,
        x_stride: usize,
        w: &Matrix,
        pro: Prologue,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        // A split matrix: one dispatch per part, each recomputing the prologue's row scales.
        for part in &w.parts {
            let mut p = MatmulParams::new(w, x_off, x_stride, y_off, y_stride, rows, accumulate)
                .for_part(part);
            let (idx, eps) = match pro {
                Prologue::None => {
                    return self.matmul(
                        rec, x, x_off, x_stride, w, None, y, y_off, y_stride, rows, accumulate,
                    )
                }
                Prologue::Norm(_, eps) => (1, eps),
                Prologue::Merge { eps, .. } => (2, eps),
                Prologue::Swiglu => (3, 0.0),
            };
            let (kern, passes, gx) = self.gemv_choice(rec.gpu(), w, idx, part.rows)?;
            p.eps = eps;
            p.passes = passes;
            let groups = [gx, rows as u32, 1];
            match pro {
                Prologue::None => unreachable!(),
                Prologue::Norm(nw, _) => {
                    rec.dispatch(&kern, &p, &[x, &part.buf, &self.dummy, y, nw], groups)?
                }
                Prologue::Merge { w: mw, x2, .. } => {
                    rec.dispatch(&kern, &p, &[x, &part.buf, &self.dummy, y, mw, x2], groups)?
                }
                Prologue::Swiglu => {
                    rec.dispatch(&kern, &p, &[x, &part.buf, &self.dummy, y], groups)?
                }
            }
        }
        Ok(())
    }

    /// One decode step of attention split over the keys (flash-decoding) plus the combine;
    /// `p.n_splits` must cover the cache capacity (the program is reused as the sequence grows).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_split(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        cs: &wgpu::Buffer,
        kv: KvBuffers,
        part: &wgpu::Buffer,
        out: &wgpu::Buffer,
        p: AttentionDecodeParams,
    ) -> Result<()> {
        self.attention_blocks(rec, pbuf, cs, kv, part, p)?;
        self.attention_combine(rec, part, out, p)
    }

    /// The first half of [`Kernels::attention_split`]: one partial result per key block (in a
    /// KV-owning layer, also this step's key and value stored as `kv.dtype`).
    pub fn attention_blocks(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        cs: &wgpu::Buffer,
        kv: KvBuffers,
        part: &wgpu::Buffer,
        p: AttentionDecodeParams,
    ) -> Result<()> {
        // Also for callers of the kernels without a config (which checks the same).
        kv.dtype.check_dims(p.d_qk as usize, p.d_v as usize)?;
        let hpg = p.n_heads / p.n_kv_heads;
        match &self.attention_gqa {
            Some(gqa) if hpg <= 8 && hpg * p.d_qk <= 512 => rec.dispatch(
                &gqa.get(rec.gpu(), kv.dtype)?,
                &p,
                &[part, pbuf, cs, kv.k, kv.v],
                [p.n_kv_heads, p.n_splits, 1],
            ),
            _ => rec.dispatch(
                &self.attention_split.get(rec.gpu(), kv.dtype)?,
                &p,
                &[part, pbuf, cs, kv.k, kv.v],
                [p.n_heads, p.n_splits, 1],
            ),
        }
    }

    /// The second half of [`Kernels::attention_split`]: merges each head's partials.
    pub fn attention_combine(
        &self,
        rec: &mut Recorder,
        part: &wgpu::Buffer,
        out: &wgpu::Buffer,
        p: AttentionDecodeParams,
    ) -> Result<()> {
        rec.dispatch(&self.attention_combine, &p, &[part, out], [p.n_heads, 1, 1])
    }

    /// One decode step of the causal conv (forward and state shift in one dispatch).
    pub fn conv_step(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        wb: &wgpu::Buffer,
        state: &wgpu::Buffer,
        xc: &wgpu::Buffer,
        p: ConvParams,
    ) -> Result<()> {
        rec.dispatch(
            &self.conv_step,
            &p,
            &[pbuf, wb, state, xc],
            [p.d.div_ceil(64), 1, 1],
        )
    }

    /// One decode step of the selective scan with the dt/B/C norms and dt_proj fused in; its
    /// per-channel input is the step's conv output, or the conv itself (see [`ScanInput`]).
    #[allow(clippy::too_many_arguments)]
    pub fn scan_fused(
        &self,
        rec: &mut Recorder,
        input: ScanInput,
        dt_proj: &Matrix,
        xp: &wgpu::Buffer,
        pbuf: &wgpu::Buffer,
        consts: &wgpu::Buffer,
        state: &wgpu::Buffer,
        y: &wgpu::Buffer,
        norms: Option<&wgpu::Buffer>,
        p: ScanParams,
    ) -> Result<()> {
        assert_eq!(dt_proj.dtype, WeightDtype::F32);
        let nb = norms.unwrap_or(&self.dummy);
        let per_group = if self.scan_lanes { 16 } else { 64 };
        let groups = [p.d.div_ceil(per_group), 1, 1];
        let dt = dt_proj.whole()?;
        match input {
            ScanInput::Conv(xc) => rec.dispatch(
                &self.scan_fused,
                &p,
                &[xc, dt, xp, pbuf, consts, state, y, nb],
                groups,
            ),
            ScanInput::ConvStep {
                w,
                state: cs,
                readable,
            } => rec.dispatch(
                &self.scan_fused_conv,
                &p,
                &[w, dt, xp, pbuf, consts, state, y, nb, cs, readable],
                groups,
            ),
        }
    }

    /// x_proj of one decode step with the Mamba conv1d in the GEMV's prologue: X = the step's
    /// conv inputs (`x` at `x_off`), `conv_w` = conv weights [k, width] then bias [k], `conv_state`
    /// = the state before the step [k, width] (not modified). On GPUs the product is split over
    /// K into slices (more workgroups, each convolving only its channels) whose partial rows go
    /// to `y` one after another: the return value is how many rows of `w.rows` to sum
    /// (`ScanParams::xp_parts`).
    #[allow(clippy::too_many_arguments)]
    pub fn x_proj_conv(
        &self,
        rec: &mut Recorder,
        x: &wgpu::Buffer,
        x_off: usize,
        w: &Matrix,
        conv_w: &wgpu::Buffer,
        conv_state: &wgpu::Buffer,
        width: usize,
        y: &wgpu::Buffer,
    ) -> Result<u32> {
        if w.dtype != WeightDtype::F32 {
            return Err(crate::error::Error::Invalid(format!(
                "the conv prologue needs f32 x_proj weights, got {}",
                w.dtype.name()
            )));
        }
        let mut p = MatmulParams::new(w, x_off, 0, 0, w.rows, 1, false);
        p.aux_n = width as u32;
        let groups = w.rows.div_ceil(8 * p.passes as usize) as u32;
        let binds = [x, w.whole()?, &self.dummy, y, conv_w, conv_state];
        let gemv_conv = match (&self.gemv_conv_row, &self.gemv_conv) {
            (Some(k), _) => {
                rec.dispatch(k, &p, &binds, [groups, 1, 1])?;
                return Ok(1);
            }
            (None, Some(kernels)) => kernels,
            (None, None) => {
                return Err(crate::error::Error::Gpu(
                    "no x_proj GEMV pipeline was compiled".into(),
                ))
            }
        };
        // Slices of at least 256 columns, a multiple of 8 (whole 8-weight chunks).
        let slices = w.cols.div_ceil(256).clamp(1, X_PROJ_SLICES);
        let kslice = w.cols.div_ceil(slices).div_ceil(8) * 8;
        let slices = w.cols.div_ceil(kslice);
        p.kslice = kslice as u32;
        p.ypart = w.rows as u32;
        let kern = &gemv_conv[(Matrix::padded_cols(kslice) > self.xsh[0]) as usize];
        rec.dispatch(kern, &p, &binds, [groups, 1, slices as u32])?;
        Ok(slices as u32)
    }

    /// Row-wise RMSNorm; `x == None` normalizes `y` in place (x_off/x_stride ignored).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        rec: &mut Recorder,
        x: Option<(&wgpu::Buffer, usize, usize)>,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        y_off: usize,
        y_stride: usize,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        let (x_off, x_stride) = x.map(|x| (x.1, x.2)).unwrap_or((y_off, y_stride));
        let p = RmsNormParams {
            rows: rows as u32,
            width: width as u32,
            x_off: x_off as u32,
            x_stride: x_stride as u32,
            y_off: y_off as u32,
            y_stride: y_stride as u32,
            eps,
            seg1: width as u32,
            seg2: width as u32,
            slices: 0,
            ypart: 0,
            accumulate: 0,
            u_off: 0,
            u_stride: 0,
        };
        match x {
            Some((xb, _, _)) => rec.dispatch(&self.rmsnorm, &p, &[w, xb, y], [rows as u32, 1, 1]),
            None => rec.dispatch(&self.rmsnorm_inplace, &p, &[w, y], [rows as u32, 1, 1]),
        }
    }

    /// The sum of a split product's partial results (left in `parts` by
    /// [`Kernels::matmul_prompt_partial`]) written into its Y (`y`, which the product named),
    /// then an RMSNorm of each row in one dispatch: into `out` (buffer, offset, row stride), or
    /// with `out` None in place in Y, columns [0, seg1), [seg1, seg2), [seg2, width) normalized
    /// separately with the concatenated weights `w` (the SSM's inner dt / B / C norms).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_partials(
        &self,
        rec: &mut Recorder,
        parts: &wgpu::Buffer,
        pp: Partials,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        out: Option<(&wgpu::Buffer, usize, usize)>,
        segs: (usize, usize),
        eps: f32,
    ) -> Result<()> {
        let k = self.rmsnorm_parts.as_ref().ok_or_else(|| {
            crate::error::Error::Invalid(
                "rmsnorm_partials: no split products on this adapter".into(),
            )
        })?;
        let s = pp.sum;
        let p = RmsNormParams {
            rows: s.rows,
            width: s.m,
            x_off: s.x_off,
            x_stride: s.x_stride,
            y_off: s.y_off,
            y_stride: s.y_stride,
            eps,
            seg1: segs.0 as u32,
            seg2: segs.1 as u32,
            slices: s.passes,
            ypart: s.ypart,
            accumulate: s.accumulate,
            u_off: out.map(|o| o.1 as u32).unwrap_or(0),
            u_stride: out.map(|o| o.2 as u32).unwrap_or(0),
        };
        match out {
            Some((u, _, _)) => rec.dispatch(&k[0], &p, &[w, parts, y, u], [s.rows, 1, 1]),
            None => rec.dispatch(&k[1], &p, &[w, parts, y], [s.rows, 1, 1]),
        }
    }

    /// out[rows, d] = meta rows then embeddings of `ids[ids_off..]`.
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        rec: &mut Recorder,
        ids: &wgpu::Buffer,
        ids_off: usize,
        table: &Matrix,
        meta: &wgpu::Buffer,
        n_meta: usize,
        out: &wgpu::Buffer,
        rows: usize,
    ) -> Result<()> {
        // A split table: one gather per part; each writes the rows whose id falls in it.
        for part in &table.parts {
            let p = EmbedParams {
                rows: rows as u32,
                n_meta: n_meta as u32,
                d: table.cols as u32,
                kp4: table.kp4(),
                ids_off: ids_off as u32,
                vocab: table.rows as u32,
                row0: part.row0 as u32,
                part_rows: part.rows as u32,
            };
            rec.dispatch(
                &self.embed[dtype_index(table.dtype)],
                &p,
                &[ids, &part.buf, meta, out],
                [table.cols.div_ceil(64) as u32, rows as u32, 1],
            )?;
        }
        Ok(())
    }

    /// Rotates the query block of the in_proj output in place.
    pub fn rope_q(
        &self,
        rec: &mut Recorder,
        cs: &wgpu::Buffer,
        pbuf: &wgpu::Buffer,
        p: RopeParams,
    ) -> Result<()> {
        let half = p.d_qk / 2;
        rec.dispatch(
            &self.rope_q,
            &p,
            &[cs, pbuf],
            [(p.n_heads * half).div_ceil(64), p.rows, 1],
        )
    }

    /// Rotates new keys and writes keys and values into the cache (stored as `kv.dtype`).
    pub fn store_kv(
        &self,
        rec: &mut Recorder,
        cs: &wgpu::Buffer,
        pbuf: &wgpu::Buffer,
        kv: KvBuffers,
        p: RopeParams,
    ) -> Result<()> {
        // Threads per row and head: one per key pair (rotate-half) and value; with f16 storage
        // one per pair of words (two keys in each half) and per value word.
        let w = match kv.dtype {
            KvDtype::F32 => (p.d_qk / 2).max(p.d_v),
            KvDtype::F16 => {
                kv.dtype.check_dims(p.d_qk as usize, p.d_v as usize)?;
                (p.d_qk / 4).max(p.d_v / 2)
            }
        };
        rec.dispatch(
            &self.store_kv.get(rec.gpu(), kv.dtype)?,
            &p,
            &[cs, pbuf, kv.k, kv.v],
            [w.div_ceil(64), p.rows, p.n_heads],
        )
    }

    /// Prompt attention of `p.rows` queries over the cache (stored as `kv.dtype`).
    pub fn attention(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        kv: KvBuffers,
        out: &wgpu::Buffer,
        p: AttentionParams,
    ) -> Result<()> {
        self.attention_with(rec, pbuf, kv, out, p, true)
    }

    /// [`Kernels::attention`], on the tensor cores only where `allow_coop` (tests run both
    /// forms): `main_coop` for an f16 KV cache with d_qk <= 64 and d_v <= 128 where the adapter
    /// has cooperative matrices (queries and probabilities rounded to f16 for the products),
    /// else `main` (all f32 arithmetic).
    pub(crate) fn attention_with(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        kv: KvBuffers,
        out: &wgpu::Buffer,
        p: AttentionParams,
        allow_coop: bool,
    ) -> Result<()> {
        if p.d_v > 128 || p.d_qk > 256 {
            return Err(crate::error::Error::Invalid(format!(
                "prompt attention supports d_v up to 128 and d_qk up to 256 (got d_qk {}, d_v {})",
                p.d_qk, p.d_v
            )));
        }
        // Also for callers of the kernels without a config (which checks the same).
        kv.dtype.check_dims(p.d_qk as usize, p.d_v as usize)?;
        if let Some(cell) = self
            .attention_coop
            .as_ref()
            .filter(|_| allow_coop && kv.dtype == KvDtype::F16 && p.d_qk <= 64)
        {
            let coop = match cell.get() {
                Some(k) => k.clone(),
                None => {
                    let k = Arc::new(Kernel::new(
                        rec.gpu(),
                        "attention.wgsl",
                        SRC_ATTENTION,
                        "main_coop",
                        &["KV_F16", "COOP"],
                        &[U, R, R, R, RW],
                    )?);
                    cell.get_or_init(|| k).clone()
                }
            };
            // Blocks of 32 query rows per workgroup (CQB in attention.wgsl).
            return rec.dispatch(
                &coop,
                &p,
                &[pbuf, kv.k, kv.v, out],
                [p.n_heads, p.rows.div_ceil(32), 1],
            );
        }
        // Blocks of 8 query rows per workgroup (QB in attention.wgsl).
        rec.dispatch(
            &self.attention.get(rec.gpu(), kv.dtype)?,
            &p,
            &[pbuf, kv.k, kv.v, out],
            [p.n_heads, p.rows.div_ceil(8), 1],
        )
    }

    /// Whether [`Kernels::attention`] runs an f16 cache's prompt attention on the tensor cores.
    pub fn coop_attention(&self) -> bool {
        self.attention_coop.is_some()
    }

    /// Causal depthwise conv + silu, then the conv-state update.
    pub fn conv(
        &self,
        rec: &mut Recorder,
        pbuf: &wgpu::Buffer,
        wb: &wgpu::Buffer,
        state: &wgpu::Buffer,
        xc: &wgpu::Buffer,
        p: ConvParams,
    ) -> Result<()> {
        rec.dispatch(
            &self.conv,
            &p,
            &[pbuf, wb, state, xc],
            [p.d.div_ceil(64), p.rows, 1],
        )?;
        rec.dispatch(
            &self.conv_state,
            &p,
            &[pbuf, state],
            [p.d.div_ceil(64), 1, 1],
        )
    }

    /// The selective scan over `p.rows` rows (a prompt chunk, or one step): y, and `state`
    /// updated in place. With `carry` (scratch of at least 2 states + 1 channel vector, f32;
    /// not read before it is written) long chunks run as up to [`SCAN_GROUPS_MAX`] row groups
    /// in parallel, as many as fit in it.
    #[allow(clippy::too_many_arguments)]
    pub fn scan(
        &self,
        rec: &mut Recorder,
        xc: &wgpu::Buffer,
        dtr: &wgpu::Buffer,
        xp: &wgpu::Buffer,
        pbuf: &wgpu::Buffer,
        consts: &wgpu::Buffer,
        state: &wgpu::Buffer,
        y: &wgpu::Buffer,
        carry: Option<&wgpu::Buffer>,
        p: ScanParams,
    ) -> Result<()> {
        // One lane per (channel, state) where subgroups of 32 can sum a channel's states.
        if let Some(k) = &self.scan_states {
            if p.n.is_power_of_two() && p.n <= 32 && p.n >= 2 {
                // Long chunks: row groups in parallel, their hand-over in `carry`.
                let (dn, d) = (p.d as u64 * p.n as u64, p.d as u64);
                let fit = carry.map_or(0, |b| (b.size() / 4).saturating_sub(dn) / (dn + d));
                let p = ScanParams {
                    groups: 1,
                    group_rows: 0,
                    ..p
                };
                let groups = (p.rows / SCAN_GROUP_MIN_ROWS)
                    .min(SCAN_GROUPS_MAX)
                    .min(fit.min(u32::MAX as u64) as u32);
                if let (Some([local, apply]), Some(carry), true) =
                    (&self.scan_groups, carry, groups > 1)
                {
                    let group_rows = p.rows.div_ceil(groups);
                    let p = ScanParams {
                        groups: p.rows.div_ceil(group_rows),
                        group_rows,
                        ..p
                    };
                    let grid = [(p.d * p.n).div_ceil(64), p.groups, 1];
                    let b = [xc, dtr, xp, pbuf, consts, state, y, carry];
                    rec.dispatch(local, &p, &b, grid)?;
                    return rec.dispatch(apply, &p, &b, grid);
                }
                return rec.dispatch(
                    k,
                    &p,
                    &[xc, dtr, xp, pbuf, consts, state, y],
                    [(p.d * p.n).div_ceil(64), 1, 1],
                );
            }
        }
        let p = ScanParams {
            groups: 1,
            group_rows: 0,
            ..p
        };
        rec.dispatch(
            &self.scan,
            &p,
            &[xc, dtr, xp, pbuf, consts, state, y],
            [p.d.div_ceil(64), 1, 1],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn merge(
        &self,
        rec: &mut Recorder,
        att: &wgpu::Buffer,
        ssm: &wgpu::Buffer,
        w: &wgpu::Buffer,
        out: &wgpu::Buffer,
        rows: usize,
        width: usize,
        eps: f32,
    ) -> Result<()> {
        let p = MergeParams {
            rows: rows as u32,
            width: width as u32,
            eps,
        };
        rec.dispatch(&self.merge, &p, &[att, ssm, w, out], [rows as u32, 1, 1])
    }

    /// SwiGLU in place over rows of [gate | up] (each `width` wide).
    pub fn swiglu(
        &self,
        rec: &mut Recorder,
        gu: &wgpu::Buffer,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let count = rows * width;
        let groups = count.div_ceil(256) as u32;
        let gx = groups.clamp(1, 32768);
        let gy = groups.div_ceil(gx).max(1);
        let p = SwigluParams {
            count: count as u32,
            width: width as u32,
            groups_x: gx,
        };
        rec.dispatch(&self.swiglu, &p, &[gu], [gx, gy, 1])
    }

    /// Copies a_src into a_dst and b_src into b_dst (f32 buffers whose sizes are multiples of
    /// 16 bytes; the destinations at least as large as the sources).
    pub fn state_copy(
        &self,
        rec: &mut Recorder,
        a_src: &wgpu::Buffer,
        a_dst: &wgpu::Buffer,
        b_src: &wgpu::Buffer,
        b_dst: &wgpu::Buffer,
    ) -> Result<()> {
        let (a_n4, b_n4) = ((a_src.size() / 16) as u32, (b_src.size() / 16) as u32);
        debug_assert!(a_dst.size() >= a_src.size() && b_dst.size() >= b_src.size());
        let p = StateCopyParams { a_n4, b_n4 };
        // Grid-stride: at most 1024 workgroups, whatever the state size.
        let groups = a_n4.max(b_n4).div_ceil(256).clamp(1, 1024);
        rec.dispatch(
            &self.state_copy,
            &p,
            &[a_src, a_dst, b_src, b_dst],
            [groups, 1, 1],
        )
    }

    pub fn sample(
        &self,
        rec: &mut Recorder,
        logits: &wgpu::Buffer,
        seen: &wgpu::Buffer,
        state: &wgpu::Buffer,
        p: SampleParams,
    ) -> Result<()> {
        rec.dispatch(&self.sample, &p, &[logits, seen, state], [1, 1, 1])
    }
}
