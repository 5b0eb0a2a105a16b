//! The one error type of `x2v-models`. Every variant names the component it concerns and, where
//! there is one, the file or checkpoint key at fault; [`Error::kind`] maps it into the workspace's
//! closed [`x2v_core::ErrorKind`].

use std::fmt;
use std::path::{Path, PathBuf};

use x2v_core::ErrorKind;

/// The part of a model an error concerns, as users know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Transformer,
    TextEncoder,
    ImageEncoder,
    ImageProcessor,
    Vae,
    Scheduler,
    /// The encoder stage pipeline (prompts, image, geometry).
    Encode,
    /// The sampling loop.
    Denoise,
    /// The decoder stage pipeline.
    Decode,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Transformer => "DiT",
            Component::TextEncoder => "text encoder",
            Component::ImageEncoder => "image encoder",
            Component::ImageProcessor => "image processor",
            Component::Vae => "VAE",
            Component::Scheduler => "scheduler",
            Component::Encode => "encode",
            Component::Denoise => "denoise",
            Component::Decode => "decode",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why model code failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("checkpoint file {0} does not exist")]
    MissingFile(PathBuf),
    #[error(
        "no safetensors checkpoint in {0} (looked for *.safetensors and *.safetensors.index.json)"
    )]
    NoCheckpoint(PathBuf),
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("bad shard index {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("checkpoint {source_desc} is missing key `{key}`")]
    MissingKey { key: String, source_desc: String },
    #[error("checkpoint {source_desc} has unexpected key `{key}` (not a parameter of the model)")]
    UnexpectedKey { key: String, source_desc: String },
    #[error("key `{key}` has shape {got:?} in {source_desc}, the model expects {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<i64>, got: Vec<i64>, source_desc: String },
    #[error("key `{key}` appears in more than one shard of {source_desc}")]
    DuplicateKey { key: String, source_desc: String },
    /// A config file that cannot be read, or values x2v does not support.
    #[error("{component} config{}: {message}", at(.path))]
    Config { component: Component, path: Option<PathBuf>, message: String },
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("model directory {dir} lacks the {what}: expected {expected}")]
    MissingPart { dir: PathBuf, what: &'static str, expected: String },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: String, message: String },
    #[error("tokenizer {path} has no `{token}` token")]
    MissingToken { path: String, token: &'static str },
    #[error("cannot tokenize prompt {prompt:?}: {message}")]
    Tokenize { prompt: String, message: String },
    #[error("no prompts to tokenize")]
    NoPrompts,
    /// The caller's tensors or settings do not fit the model (the client's fault when served).
    #[error("invalid {component} input: {message}")]
    Input { component: Component, message: String },
    #[error("this VAE was loaded without its {0} (VaeParts::{1})")]
    NotLoaded(&'static str, &'static str),
    #[error("cancelled after {completed} of {total} steps")]
    Cancelled { completed: usize, total: usize },
    #[error("scheduler stepped {0} times, past the end of its {0}-step grid")]
    SchedulerFinished(usize),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("cannot build the demo {what}: {message}")]
    DemoBuild { what: &'static str, message: String },
    /// A LoRA adapter that cannot be read or does not fit the model.
    #[error("LoRA adapter `{adapter}`: {message}")]
    Lora { adapter: String, message: String },
}

fn at(path: &Option<PathBuf>) -> String {
    path.as_deref().map(|p| format!(" {}", p.display())).unwrap_or_default()
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Input { .. }
            | Error::Lora { .. }
            | Error::Tokenize { .. }
            | Error::NoPrompts
            | Error::MissingKey { .. }
            | Error::UnexpectedKey { .. }
            | Error::ShapeMismatch { .. }
            | Error::DuplicateKey { .. }
            | Error::MissingFile(_)
            | Error::NoCheckpoint(_)
            | Error::Read { .. }
            | Error::Index { .. } => ErrorKind::InvalidRequest,
            Error::Config { component, .. } => match component {
                Component::Transformer | Component::Scheduler => ErrorKind::InvalidRequest,
                _ => ErrorKind::Internal,
            },
            Error::NotADirectory(_) | Error::MissingPart { .. } => ErrorKind::NotFound,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::TokenizerLoad { .. }
            | Error::MissingToken { .. }
            | Error::NotLoaded(..)
            | Error::SchedulerFinished(_)
            | Error::Write { .. }
            | Error::DemoBuild { .. } => ErrorKind::Internal,
        }
    }

    /// An invalid-input error of `component`.
    pub fn input(component: Component, message: impl Into<String>) -> Self {
        Error::Input { component, message: message.into() }
    }

    /// A config error of `component`, at `path` when the config came from a file.
    pub fn config(component: Component, path: Option<&Path>, message: impl Into<String>) -> Self {
        Error::Config { component, path: path.map(Path::to_owned), message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_component_and_the_file() {
        let e = Error::config(Component::Vae, Some(Path::new("/m/vae/config.json")), "bad z_dim");
        assert_eq!(e.to_string(), "VAE config /m/vae/config.json: bad z_dim");
        assert_eq!(e.kind(), ErrorKind::Internal);
        let e = Error::config(Component::Transformer, None, "num_layers must be positive");
        assert_eq!(e.to_string(), "DiT config: num_layers must be positive");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
        let e = Error::input(Component::Denoise, "needs image_embeds");
        assert_eq!(e.to_string(), "invalid denoise input: needs image_embeds");
        assert_eq!(e.kind(), ErrorKind::InvalidRequest);
    }
}
