//! `gram::Error`: every failure the library reports, each variant naming the file, tensor or value
//! at fault. `Error::kind()` is a stable label for HTTP statuses and metrics. Library code never
//! panics on bad input and never calls `exit()`.

use std::path::PathBuf;

/// Everything that can go wrong in gram, by boundary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or mapping a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing a field, has a wrong value, or names an unsupported model.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weight file (safetensors or GGUF) is malformed or truncated.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A tensor is missing, unexpected, or has the wrong shape or dtype for the config.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },
    /// An index or trie file is truncated, corrupt, or of another format version.
    #[error("index {path}: {msg}")]
    Index { path: PathBuf, msg: String },
    /// `tokenizer.json` could not be loaded, or text could not be encoded/decoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A caller passed an argument outside what the engine supports (empty prompt, too many
    /// tokens for the cache, unknown slot...).
    #[error("invalid input: {0}")]
    Input(String),
    /// The GPU backend could not start or run: no driver or device, a library missing, a kernel
    /// that failed to compile or launch, device memory exhausted.
    #[error("device: {0}")]
    Device(String),
    /// The model computed something that is not a number (NaN logits): its weights are corrupt
    /// or overflow. Never a silent empty answer.
    #[error("numeric: {0}")]
    Numeric(String),
    /// Something the engine itself guarantees did not hold: a bug in gram, not the caller's
    /// input (a 500 from the server, never a 4xx).
    #[error("internal error (a bug in gram): {0}")]
    Internal(String),
}

impl Error {
    /// The error as a client reads it beside its [`kind`](Self::kind): the caller's input
    /// without the `invalid input: ` the kind already says, every other error whole.
    pub fn client_message(&self) -> String {
        match self {
            Error::Input(message) => message.clone(),
            other => other.to_string(),
        }
    }

    /// Stable, low-cardinality label for this error (HTTP status mapping, metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Config { .. } => "config",
            Error::Checkpoint { .. } => "checkpoint",
            Error::Tensor { .. } => "tensor",
            Error::Index { .. } => "index",
            Error::Tokenizer(_) => "tokenizer",
            Error::Input(_) => "input",
            Error::Device(_) => "device",
            Error::Numeric(_) => "numeric",
            Error::Internal(_) => "internal",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
