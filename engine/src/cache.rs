//! Per-sequence state: the Hymba cache (spec §5) plus what the GPU sampler keeps.
//!
//! - every layer: the conv state [d_inner, d_conv] (last pre-conv inputs) and
//!   the SSM state [d_inner, d_state], both f32;
//! - KV owners only (standalone and producer layers): keys (post-RoPE)
//!   [n_kv_heads, cap, d_qk] and values [n_kv_heads, cap, d_v], stored as the
//!   model's [`KvDtype`]: f32 for f32-weight models, f16 (two per u32 word)
//!   otherwise. Global layers have a growing buffer; sliding-window layers a ring
//!   of text slots after the meta-token slots: `window + prefill chunk` while a
//!   prompt is processed, `window + 1` once decoding starts (the prompt chunk's
//!   slack is given back; see [`Sequence::compact_rings`]). KV consumers have no
//!   cache of their own and read their producer's.
//!
//! Slots: position p < n_meta lives in slot p; text position p in slot
//! `n_meta + (p - n_meta) % ring`.

use crate::config::{AttentionKind, HymbaConfig};
use crate::error::Result;
use crate::gpu::{Gpu, Program};
use crate::kernels::{KvBuffers, KvDtype};

pub struct KvCache {
    /// Keys (post-RoPE) [n_kv_heads, cap, d_qk] as `dtype` (f16: [n_kv_heads, cap, d_qk / 2] u32).
    pub k: wgpu::Buffer,
    /// Values [n_kv_heads, cap, d_v] as `dtype` (f16: [n_kv_heads, cap, d_v / 2] u32).
    pub v: wgpu::Buffer,
    /// Text slots (ring length for sliding-window layers, capacity for global ones).
    pub ring: usize,
    pub global: bool,
    /// Sliding-window layers: the window (positions); 0 for global layers.
    pub window: usize,
    pub dtype: KvDtype,
}

impl KvCache {
    pub fn cap(&self, n_meta: usize) -> usize {
        n_meta + self.ring
    }

    /// The buffers as the attention kernels bind them.
    pub fn buffers(&self) -> KvBuffers<'_> {
        KvBuffers {
            k: &self.k,
            v: &self.v,
            dtype: self.dtype,
        }
    }
}

pub struct LayerState {
    pub conv: wgpu::Buffer,
    pub ssm: wgpu::Buffer,
    pub kv: Option<KvCache>,
}

/// One conversation or prompt: everything that persists between steps.
pub struct Sequence {
    pub(crate) layers: Vec<LayerState>,
    /// Positions filled so far, meta tokens included.
    pub(crate) pos: usize,
    /// User tokens in the cache (prompt and generated), in order.
    pub(crate) tokens: Vec<u32>,
    /// [vocab] u32 flags: tokens under the repetition penalty.
    pub(crate) seen: wgpu::Buffer,
    /// [0] last chosen / fed token id, [1] tokens sampled so far, [2] the last chosen token's
    /// `seen` flag before it was chosen.
    pub(crate) tok_state: wgpu::Buffer,
    /// Per layer, copies of (conv state, SSM state) taken at the start of the last decode step
    /// prepared with a backup (created on first use; `Model::undo_decode` restores them).
    pub(crate) backup: Option<Vec<(wgpu::Buffer, wgpu::Buffer)>>,
    /// Set while the last submitted step can be undone: whether it sampled.
    pub(crate) undoable: Option<bool>,
    /// Prompt ids of the chunk being prefilled.
    pub(crate) ids: wgpu::Buffer,
    /// The cached decode-step program and the KV layout generation it was built for.
    pub(crate) decode: Option<(Program, u64)>,
    pub(crate) layout_gen: u64,
    pub(crate) sampled: u32,
}

impl Sequence {
    pub(crate) fn new(
        gpu: &Gpu,
        cfg: &HymbaConfig,
        chunk: usize,
        global_cap: usize,
        kv_dtype: KvDtype,
    ) -> Result<Sequence> {
        let di = cfg.d_inner;
        let eb = kv_dtype.bytes();
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for (i, role) in cfg.layers.iter().enumerate() {
            let kv = if role.owns_kv() {
                let (ring, global, window) = match role.attention {
                    AttentionKind::Global => (global_cap, true, 0),
                    AttentionKind::SlidingWindow { window } => (window + chunk, false, window),
                };
                let cap = cfg.n_meta + ring;
                Some(KvCache {
                    k: gpu.buffer(
                        &format!("layer {i} keys"),
                        (cfg.n_kv_heads * cap * cfg.d_qk * eb) as u64,
                    )?,
                    v: gpu.buffer(
                        &format!("layer {i} values"),
                        (cfg.n_kv_heads * cap * cfg.d_v * eb) as u64,
                    )?,
                    ring,
                    global,
                    window,
                    dtype: kv_dtype,
                })
            } else {
                None
            };
            layers.push(LayerState {
                conv: gpu.buffer(
                    &format!("layer {i} conv state"),
                    (di * cfg.d_conv * 4) as u64,
                )?,
                ssm: gpu.buffer(
                    &format!("layer {i} ssm state"),
                    (di * cfg.d_state * 4) as u64,
                )?,
                kv,
            });
        }
        Ok(Sequence {
            layers,
            pos: 0,
            tokens: Vec::new(),
            seen: gpu.buffer("seen tokens", (cfg.vocab_size * 4) as u64)?,
            tok_state: gpu.buffer("token state", 16)?,
            ids: gpu.buffer("prompt ids", (chunk.max(1) * 4) as u64)?,
            decode: None,
            layout_gen: 0,
            sampled: 0,
            backup: None,
            undoable: None,
        })
    }

    /// Positions filled, meta tokens included.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Dispatches in the cached decode-step program (0 before the first decode step).
    pub fn decode_dispatches(&self) -> usize {
        self.decode
            .as_ref()
            .map(|d| d.0.dispatch_count())
            .unwrap_or(0)
    }

    /// User tokens in the cache (prompt and generated).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes of GPU memory this sequence's cache occupies (allocated buffer sizes, the state
    /// backups of `generate`'s overlapped steps included once they exist).
    pub fn cache_bytes(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                l.conv.size()
                    + l.ssm.size()
                    + l.kv
                        .as_ref()
                        .map(|kv| kv.k.size() + kv.v.size())
                        .unwrap_or(0)
            })
            .sum();
        let backup: u64 = self
            .backup
            .iter()
            .flatten()
            .map(|(c, s)| c.size() + s.size())
            .sum();
        layers + backup
    }

    /// Bytes of GPU memory of the KV-cache buffers alone (part of [`Sequence::cache_bytes`]).
    pub fn kv_bytes(&self) -> u64 {
        self.layers
            .iter()
            .filter_map(|l| l.kv.as_ref())
            .map(|kv| kv.k.size() + kv.v.size())
            .sum()
    }

    /// How the KV cache stores keys and values (None for a model without KV-owning layers).
    pub fn kv_dtype(&self) -> Option<KvDtype> {
        self.layers
            .iter()
            .find_map(|l| l.kv.as_ref().map(|kv| kv.dtype))
    }

    /// Creates the state backups (same sizes as the states) if they do not exist yet.
    pub(crate) fn ensure_backup(&mut self, gpu: &Gpu) -> Result<()> {
        if self.backup.is_none() {
            let mut v = Vec::with_capacity(self.layers.len());
            for (i, l) in self.layers.iter().enumerate() {
                v.push((
                    gpu.buffer(&format!("layer {i} conv state backup"), l.conv.size())?,
                    gpu.buffer(&format!("layer {i} ssm state backup"), l.ssm.size())?,
                ));
            }
            self.backup = Some(v);
        }
        Ok(())
    }

    /// Makes room for a forward of `rows` positions per chunk up to `positions` positions in
    /// all: global layers grow (doubling) until they hold `positions`, sliding-window rings
    /// until they hold the window plus one chunk (the chunk's keys are written before its
    /// queries read the window behind them). Buffers are replaced and their contents moved.
    pub(crate) fn ensure_capacity(
        &mut self,
        gpu: &Gpu,
        cfg: &HymbaConfig,
        positions: usize,
        rows: usize,
        max_text: usize,
    ) -> Result<()> {
        let need_text = positions.saturating_sub(cfg.n_meta);
        let text = self.pos.saturating_sub(cfg.n_meta);
        let mut moved = false;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let Some(kv) = l.kv.as_mut() else { continue };
            let new_ring = match (kv.global, kv.window) {
                (true, _) if kv.ring < need_text => {
                    (kv.ring * 2).max(need_text).min(max_text.max(need_text))
                }
                (false, w) if kv.ring < w + rows => w + rows,
                _ => continue,
            };
            relayout(gpu, cfg, i, kv, new_ring, text)?;
            moved = true;
        }
        if moved {
            self.layout_gen += 1;
            self.decode = None;
        }
        Ok(())
    }

    /// Shrinks every sliding-window ring that still has a prompt chunk's slack to the window
    /// plus the one position a decode step writes (what `Model` does before a decode step):
    /// for Hymba-1.5B with 512-position chunks, 14 rings of 1024 + 512 text slots become
    /// 1024 + 1, 12.3 MiB less of f16 keys and values. A later prompt grows them again.
    pub(crate) fn compact_rings(&mut self, gpu: &Gpu, cfg: &HymbaConfig) -> Result<()> {
        let text = self.pos.saturating_sub(cfg.n_meta);
        let mut moved = false;
        for (i, l) in self.layers.iter_mut().enumerate() {
            let Some(kv) = l.kv.as_mut() else { continue };
            if !kv.global && kv.ring > kv.window + 1 {
                relayout(gpu, cfg, i, kv, kv.window + 1, text)?;
                moved = true;
            }
        }
        if moved {
            self.layout_gen += 1;
            self.decode = None;
        }
        Ok(())
    }
}

/// Moves layer `i`'s keys and values into new buffers of `new_ring` text slots: the meta-token
/// slots, and the newest `text` positions that both rings hold, each from its slot in the old
/// ring to its slot in the new one (runs of consecutive slots, one copy per run and head).
fn relayout(
    gpu: &Gpu,
    cfg: &HymbaConfig,
    i: usize,
    kv: &mut KvCache,
    new_ring: usize,
    text: usize,
) -> Result<()> {
    let nm = cfg.n_meta;
    let (old_cap, new_cap) = (nm + kv.ring, nm + new_ring);
    // Bytes of one key / value row in the cache's storage (copies move whole rows, so the f16
    // form's u32 words are never split: d_qk and d_v are multiples of 4).
    let (kr, vr) = kv_rows(cfg, kv);
    let nk = gpu.buffer(
        &format!("layer {i} keys"),
        (cfg.n_kv_heads * new_cap * kr) as u64,
    )?;
    let nv = gpu.buffer(
        &format!("layer {i} values"),
        (cfg.n_kv_heads * new_cap * vr) as u64,
    )?;
    // (old slot, new slot, slots)
    let mut runs = vec![(0, 0, nm)];
    let keep = text.min(kv.ring).min(new_ring);
    let mut t = text - keep;
    while t < text {
        let (os, ns) = (t % kv.ring, t % new_ring);
        let n = (text - t).min(kv.ring - os).min(new_ring - ns);
        runs.push((nm + os, nm + ns, n));
        t += n;
    }
    let mut enc = gpu.device.create_command_encoder(&Default::default());
    for h in 0..cfg.n_kv_heads {
        for &(os, ns, n) in runs.iter().filter(|r| r.2 > 0) {
            for (src, dst, row) in [(&kv.k, &nk, kr), (&kv.v, &nv, vr)] {
                enc.copy_buffer_to_buffer(
                    src,
                    ((h * old_cap + os) * row) as u64,
                    dst,
                    ((h * new_cap + ns) * row) as u64,
                    (n * row) as u64,
                );
            }
        }
    }
    gpu.queue.submit([enc.finish()]);
    kv.k = nk;
    kv.v = nv;
    kv.ring = new_ring;
    Ok(())
}

/// The meta-token prefix: the conv / SSM states and the meta-token key / value slots that every
/// sequence starts from (a constant of the checkpoint). Held in host memory and written into
/// each new sequence: kept on the GPU as an idle sequence it cost a whole cache (47 MiB for
/// Hymba-1.5B: every sliding-window ring at full size), for about 12 MB of content.
pub(crate) struct Prefix {
    pos: usize,
    layers: Vec<PrefixLayer>,
}

/// One layer of the [`Prefix`], as bytes: conv state, SSM state, and for KV owners the meta
/// slots of keys and values ([n_kv_heads, n_meta, d] in the cache's storage).
struct PrefixLayer {
    conv: Vec<u8>,
    ssm: Vec<u8>,
    kv: Option<(Vec<u8>, Vec<u8>)>,
}

/// Row bytes of the keys and values of `kv`.
fn kv_rows(cfg: &HymbaConfig, kv: &KvCache) -> (usize, usize) {
    (cfg.d_qk * kv.dtype.bytes(), cfg.d_v * kv.dtype.bytes())
}

impl Prefix {
    /// Reads the prefix out of `seq`, which holds the meta tokens and nothing else (one
    /// readback for all of it).
    pub(crate) async fn read(gpu: &Gpu, cfg: &HymbaConfig, seq: &Sequence) -> Result<Prefix> {
        let nm = cfg.n_meta;
        // (source buffer, offset, bytes) in readback order
        let mut parts: Vec<(&wgpu::Buffer, u64, u64)> = Vec::new();
        for l in &seq.layers {
            parts.push((&l.conv, 0, l.conv.size()));
            parts.push((&l.ssm, 0, l.ssm.size()));
            if let Some(kv) = &l.kv {
                let cap = kv.cap(nm);
                let (kr, vr) = kv_rows(cfg, kv);
                for (buf, row) in [(&kv.k, kr), (&kv.v, vr)] {
                    for h in 0..cfg.n_kv_heads {
                        parts.push((buf, (h * cap * row) as u64, (nm * row) as u64));
                    }
                }
            }
        }
        let total: u64 = parts.iter().map(|p| p.2).sum();
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("meta-token prefix readback"),
            size: total.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        let mut at = 0;
        for &(buf, off, len) in &parts {
            if len > 0 {
                enc.copy_buffer_to_buffer(buf, off, &staging, at, len);
            }
            at += len;
        }
        gpu.queue.submit([enc.finish()]);
        let data = gpu.map_read(&staging, total.max(4)).await?;
        let mut next = {
            let mut at = 0usize;
            move |len: u64| {
                let v = data[at..at + len as usize].to_vec();
                at += len as usize;
                v
            }
        };
        let mut layers = Vec::with_capacity(seq.layers.len());
        for l in &seq.layers {
            let conv = next(l.conv.size());
            let ssm = next(l.ssm.size());
            let kv = l.kv.as_ref().map(|kv| {
                let (kr, vr) = kv_rows(cfg, kv);
                let k: Vec<u8> = (0..cfg.n_kv_heads)
                    .flat_map(|_| next((nm * kr) as u64))
                    .collect();
                let v: Vec<u8> = (0..cfg.n_kv_heads)
                    .flat_map(|_| next((nm * vr) as u64))
                    .collect();
                (k, v)
            });
            layers.push(PrefixLayer { conv, ssm, kv });
        }
        Ok(Prefix {
            pos: seq.pos,
            layers,
        })
    }

    /// Host bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                let kv = l.kv.as_ref().map(|(k, v)| k.len() + v.len());
                l.conv.len() + l.ssm.len() + kv.unwrap_or(0)
            })
            .sum()
    }

    /// Writes the prefix into `seq`, a sequence of the same model that has not been used (its
    /// other slots are still zero), and sets its position to the prefix's.
    pub(crate) fn write_into(&self, gpu: &Gpu, cfg: &HymbaConfig, seq: &mut Sequence) {
        let nm = cfg.n_meta;
        for (l, p) in seq.layers.iter().zip(&self.layers) {
            gpu.queue.write_buffer(&l.conv, 0, &p.conv);
            gpu.queue.write_buffer(&l.ssm, 0, &p.ssm);
            if let (Some(dst), Some((k, v))) = (&l.kv, &p.kv) {
                let cap = dst.cap(nm);
                let (kr, vr) = kv_rows(cfg, dst);
                for (buf, row, src) in [(&dst.k, kr, k), (&dst.v, vr, v)] {
                    let n = nm * row;
                    for h in 0..cfg.n_kv_heads {
                        if n > 0 {
                            gpu.queue.write_buffer(
                                buf,
                                (h * cap * row) as u64,
                                &src[h * n..(h + 1) * n],
                            );
                        }
                    }
                }
            }
        }
        seq.pos = self.pos;
        seq.tokens.clear();
        seq.undoable = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuOptions;

    /// Hymba-1.5B's real config and the test GPU.
    fn hymba_15b() -> (HymbaConfig, Gpu) {
        let cfg = HymbaConfig::from_json_str(
            include_str!("../../tests/configs/hymba-1.5b-config.json"),
            "hymba-1.5b-config.json",
        )
        .unwrap();
        (
            cfg,
            pollster::block_on(Gpu::new(&GpuOptions::default())).unwrap(),
        )
    }

    /// Hymba-1.5B's real layout (3 global and 14 sliding-window KV-owning layers, 5 KV heads,
    /// d_qk 64, d_v 128, 128 meta tokens) at 8000 tokens of context, as the engine allocates it
    /// (prefill chunk 256): the f16 KV buffers are exactly half the f32 ones, measured from the
    /// buffers after the global layers grew.
    #[test]
    fn hymba_15b_kv_cache_at_8k_context_halves_in_f16() {
        let (cfg, gpu) = hymba_15b();
        let chunk: usize = 256;
        let max_text = cfg.max_position_embeddings;
        // As Model::assemble sizes a global layer's first buffer.
        let global_cap0 = (2 * chunk).div_ceil(256) * 256;
        let mut sizes = Vec::new();
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut s = Sequence::new(&gpu, &cfg, chunk, global_cap0, dtype).unwrap();
            s.ensure_capacity(&gpu, &cfg, cfg.n_meta + 8000, chunk, max_text)
                .unwrap();
            let (kv, all) = (s.kv_bytes(), s.cache_bytes());
            eprintln!(
                "Hymba-1.5B, 8000 tokens, KV {}: KV buffers {kv} B ({:.1} MiB), cache {all} B ({:.1} MiB)",
                dtype.name(),
                kv as f64 / 1048576.0,
                all as f64 / 1048576.0
            );
            sizes.push((kv, all));
        }
        let ((kv32, all32), (kv16, all16)) = (sizes[0], sizes[1]);
        assert_eq!(kv16 * 2, kv32);
        assert_eq!(all32 - all16, kv16);
        // 17 KV-owning layers x 5 heads x (64 + 128) x 4 bytes per slot: the global layers grew
        // from 512 text slots to the 8000 asked for at once, the sliding-window ones hold
        // 1024 + 256; plus 128 meta slots each.
        let per_slot = 5 * (64 + 128) * 4;
        let want32 = (3 * (128 + 8000) + 14 * (128 + 1024 + 256)) * per_slot;
        assert_eq!(kv32, want32 as u64);
        // Once decoding, the rings give the chunk's slack back: 1024 + 1 text slots.
        let mut s = Sequence::new(&gpu, &cfg, chunk, global_cap0, KvDtype::F32).unwrap();
        s.ensure_capacity(&gpu, &cfg, cfg.n_meta + 8000, chunk, max_text)
            .unwrap();
        s.compact_rings(&gpu, &cfg).unwrap();
        let want = (3 * (128 + 8000) + 14 * (128 + 1024 + 1)) * per_slot;
        assert_eq!(s.kv_bytes(), want as u64);
    }

    /// Moving a ring keeps every position both rings hold in its slot (meta slots included),
    /// whether it grows or shrinks and wherever the ring has wrapped: contents are written per
    /// slot, moved, and read back.
    #[test]
    fn ring_moves_keep_the_newest_positions_in_their_slots() {
        let (cfg, gpu) = hymba_15b();
        let (nm, w, heads) = (cfg.n_meta, 1024, cfg.n_kv_heads);
        // (text positions filled, ring before, ring after)
        for (text, from, to) in [
            (5000, w + 300, w + 1),
            (1100, w + 300, w + 1),
            (700, w + 1, w + 300),
            (5000, w + 1, w + 512),
            (0, w + 64, w + 1),
        ] {
            let mut s = Sequence::new(&gpu, &cfg, from - w, 512, KvDtype::F32).unwrap();
            s.pos = nm + text;
            let i = cfg
                .layers
                .iter()
                .position(|l| l.owns_kv() && !matches!(l.attention, AttentionKind::Global))
                .unwrap();
            let kv = s.layers[i].kv.as_mut().unwrap();
            assert_eq!(kv.ring, from);
            // Key word (h, slot, 0) of the position in that slot, or a marker for slots not
            // holding one of the ring's newest positions.
            let value = |h: usize, pos: usize| (h * 100_000 + pos) as f32;
            let fill = |ring: usize| {
                let cap = nm + ring;
                let mut k = vec![-1.0f32; heads * cap * cfg.d_qk];
                for h in 0..heads {
                    for p in 0..nm {
                        k[(h * cap + p) * cfg.d_qk] = value(h, p);
                    }
                    for t in text.saturating_sub(ring)..text {
                        k[(h * cap + nm + t % ring) * cfg.d_qk] = value(h, nm + t);
                    }
                }
                k
            };
            gpu.queue
                .write_buffer(&kv.k, 0, bytemuck::cast_slice(&fill(from)));
            relayout(&gpu, &cfg, i, kv, to, text).unwrap();
            let got =
                pollster::block_on(gpu.read_f32(&kv.k, 0, (heads * (nm + to) * cfg.d_qk) as u64))
                    .unwrap();
            let keep = text.min(from).min(to);
            let cap = nm + to;
            for h in 0..heads {
                for p in 0..nm {
                    assert_eq!(got[(h * cap + p) * cfg.d_qk], value(h, p), "meta slot {p}");
                }
                for t in text - keep..text {
                    assert_eq!(
                        got[(h * cap + nm + t % to) * cfg.d_qk],
                        value(h, nm + t),
                        "text {text}, ring {from} -> {to}: head {h}, position {t}"
                    );
                }
            }
        }
    }
}
