//! The chat template, turn bookkeeping and stop filter live in the engine
//! (`hymba_engine::chat`), shared with the CLI.

pub use hymba_engine::chat::*;
