//! Errors of the model crate. Every error that comes from a file names the file (and the key).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with one file of the model directory (missing, unreadable, truncated, wrong key).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A missing, misshapen or unreadable weight; the message names the file and the key.
    #[error("{0}")]
    Weights(String),
    /// A configuration value that is missing, contradictory or not supported.
    #[error("config: {0}")]
    Config(String),
    /// Something the caller asked for that this model cannot do (e.g. video frames without
    /// frame embeddings).
    #[error("{0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image that cannot be decoded or is too large.
    #[error("image: {0}")]
    Image(String),
    /// A request that does not fit the model (wrong image count, bad sampling parameter, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), msg: msg.to_string() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<String> for Error {
    fn from(msg: String) -> Self {
        Error::Invalid(msg)
    }
}
