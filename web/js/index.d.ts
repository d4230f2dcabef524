// Types of the hymba-web wrapper (index.js).

export declare const CACHE_NAME: string;

export interface Progress {
  phase: 'download' | 'read' | 'upload';
  /**
   * Bytes so far. 'download': fetched into the Cache API (all files); 'upload': bytes of the
   * weights files streamed into the engine, which uploads each tensor as soon as it is complete
   * (a picked File or an uncached download streams in this phase). 'read' is no longer used.
   */
  loaded: number;
  total: number;
  /** Per file: bytes loaded / total (download phase); `file`: the file being streamed (upload phase). */
  file?: string;
  files?: Record<string, { loaded: number; total: number }>;
  fromCache?: boolean;
}

export interface LoadOptions {
  onProgress?: (p: Progress) => void;
  /** Keep downloads in the Cache API and reuse them (default true). */
  cache?: boolean;
  /** Weight storage: 'auto' (f32 up to 1 GiB of f32 weights, f16 above), 'f32', 'f16', or block-quantized 'q8' / 'q4'. */
  dtype?: 'auto' | 'f32' | 'f16' | 'q8' | 'q4';
  maxPositions?: number;
  name?: string;
}

export interface GenerateOptions {
  max_tokens?: number;
  temperature?: number;
  top_k?: number;
  top_p?: number;
  repetition_penalty?: number;
  seed?: number;
  stop?: string | string[];
  ignore_eos?: boolean;
  /** generate(): append to the current sequence instead of starting over. */
  continue?: boolean;
  add_special_tokens?: boolean;
}

export interface Stats {
  prefill_tokens: number;
  prefill_secs: number;
  prefill_tok_s: number;
  generated_tokens: number;
  decode_secs: number;
  decode_tok_s: number;
  /** Bytes of the sequence's cache on the GPU, measured from its buffers. */
  cache_bytes: number;
  /** How the KV cache stores keys and values: f32 for f32 weights, f16 otherwise. */
  kv_dtype: 'f32' | 'f16';
  weight_bytes: number;
  /** The model's other GPU buffers (activation workspaces, RoPE table), measured from them.
   * (The meta-token prefix new conversations start from is kept in wasm memory.) */
  activation_bytes: number;
  /** weight_bytes + activation_bytes + cache_bytes. */
  gpu_bytes: number;
  position: number;
  max_positions: number;
  stop_reason: 'eos' | 'stop_string' | 'max_tokens' | 'cancelled' | 'context_full';
}

export interface GenerateResult {
  text: string;
  ids: number[];
  finish_reason: 'stop' | 'length' | 'cancelled';
  continued?: boolean;
  usage: { prompt_tokens: number; completion_tokens: number; cached_positions: number };
  stats: Stats;
}

export interface ChatMessage { role: 'system' | 'user' | 'assistant'; content: string }

export interface ChatCompletionRequest extends GenerateOptions {
  messages: ChatMessage[];
  stream?: boolean;
  model?: string;
}

export interface ChatCompletion {
  id: string; object: 'chat.completion'; created: number; model: string;
  choices: { index: number; message: { role: 'assistant'; content: string }; finish_reason: string }[];
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  hymba: { stats: Stats; continued: boolean };
}

export interface ChatCompletionChunk {
  id: string; object: 'chat.completion.chunk'; created: number; model: string;
  choices: { index: number; delta: { role?: 'assistant'; content?: string }; finish_reason: string | null }[];
  usage?: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
  hymba?: { stats: Stats; continued: boolean };
}

export interface ChatAPI {
  completions: {
    create(req: ChatCompletionRequest & { stream: true }): Promise<AsyncIterableIterator<ChatCompletionChunk>> & { controller: { abort(): void } };
    create(req: ChatCompletionRequest & { stream?: false }): Promise<ChatCompletion>;
  };
}

export interface ModelInfo {
  name: string; vocab_size: number; hidden_size: number; layers: number; meta_tokens: number; parameters: number;
  dtype: string; weight_bytes: number; max_positions: number; eos_token_ids: number[]; has_tokenizer: boolean; chat_template: boolean;
}

export interface EngineInfo {
  adapter: string; name: string; backend: string; deviceType: string; shaderF16: boolean;
  limits: Record<string, number>;
}

type MaybePromise<T> = T | Promise<T>;
export type TokenCallback = (piece: string, id: number) => boolean | void;

export interface HymbaModelAPI {
  readonly chat: ChatAPI;
  info(): MaybePromise<ModelInfo>;
  tokenize(text: string, addSpecial?: boolean): MaybePromise<number[]>;
  decode(ids: number[]): MaybePromise<string>;
  /** Raw completion of a string or token ids; onToken streams (return false to cancel). */
  generate(prompt: string | number[], options?: GenerateOptions, onToken?: TokenCallback): Promise<GenerateResult>;
  /** One reply to a message list; continues the cached conversation without re-prefilling when it extends it. */
  chatTurn(messages: ChatMessage[], options?: GenerateOptions, onToken?: TokenCallback): Promise<GenerateResult>;
  cancel(): void;
  reset(): MaybePromise<unknown>;
  stats(): MaybePromise<Stats | null>;
  dispose(): MaybePromise<unknown>;
}

export type ModelSource = string | URL | { files: ArrayLike<File> | { name: string; data: Uint8Array | ArrayBuffer }[] };

export declare class Model implements HymbaModelAPI {
  readonly chat: ChatAPI;
  info(): ModelInfo;
  tokenize(text: string, addSpecial?: boolean): number[];
  decode(ids: number[]): string;
  generate(prompt: string | number[], options?: GenerateOptions, onToken?: TokenCallback): Promise<GenerateResult>;
  chatTurn(messages: ChatMessage[], options?: GenerateOptions, onToken?: TokenCallback): Promise<GenerateResult>;
  cancel(): void;
  reset(): void;
  stats(): Stats | null;
  dispose(): void;
}

export declare class Engine {
  info(): EngineInfo;
  loadModel(source: ModelSource, options?: LoadOptions): Promise<Model>;
  dispose(): void;
}

export interface WorkerEngine {
  worker: Worker;
  info(): EngineInfo;
  loadModel(source: ModelSource, options?: LoadOptions): Promise<HymbaModelAPI>;
  listCachedModels(): Promise<CachedModel[]>;
  deleteCachedModel(base?: string): Promise<boolean>;
  dispose(): void;
}

export interface CachedModel { base: string; files: string[]; bytes: number; saved: string }

/** Loads the WebAssembly module (optional: a URL, Response, bytes or WebAssembly.Module). */
export declare function init(source?: unknown): Promise<void>;
/** Makes a Node WebGPU object (e.g. `create([])` from the `webgpu` package) the engine's navigator.gpu. */
export declare function useNodeWebGPU(gpu: unknown): void;
export declare function detectWebGPU(): Promise<{ ok: boolean; reason: string; adapter?: Record<string, unknown> }>;
/**
 * The device is requested with the adapter's limits; maxStorageBufferBindingSize / maxBufferSize
 * cap that request (e.g. WebGPU's defaults 134217728 / 268435456, to check a model on any adapter).
 * Weight tensors larger than a binding are split across several buffers.
 */
export interface EngineOptions { allowShaderF16?: boolean; maxStorageBufferBindingSize?: number; maxBufferSize?: number }
export declare function createEngine(options?: EngineOptions & { wasm?: unknown }): Promise<Engine>;
export declare function createWorkerEngine(options?: EngineOptions & { workerUrl?: string | URL }): Promise<WorkerEngine>;
/** Bytes of the engine's WebAssembly memory (it only grows, so this is the peak so far). */
export declare function wasmMemoryBytes(): number;
/** Downloads a model's files into memory (and the Cache API). loadModel does not use it: it streams. */
export declare function fetchModelFiles(base: string, options?: { cache?: boolean; onProgress?: (p: Omit<Progress, 'phase'>) => void; fetchOptions?: RequestInit }): Promise<{ base: string; files: Record<string, Uint8Array>; fromCache: boolean }>;
export declare function listCachedModels(): Promise<CachedModel[]>;
export declare function deleteCachedModel(base?: string): Promise<boolean>;
export declare function makeChat(target: Pick<HymbaModelAPI, 'chatTurn' | 'cancel'>): ChatAPI;
