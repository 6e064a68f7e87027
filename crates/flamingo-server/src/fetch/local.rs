//! Media that needs no network: `data:` URLs (base64, size-capped before decoding) and
//! `file://` URLs confined to the configured directory.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

use super::{clip, FetchError, DATA_URL_MEDIA_TYPES};

/// `file_dir` resolved once at construction.
#[derive(Debug)]
pub(super) struct FileRoot {
    /// Absolute form of the configured path (may contain symlinks).
    pub(super) absolute: PathBuf,
    /// Fully canonicalized path.
    pub(super) canonical: PathBuf,
}

/// Resolves `file_dir` to absolute and canonical forms; it must be an existing directory.
pub(super) fn resolve_file_root(dir: &Path) -> Result<FileRoot, FetchError> {
    let bad = |why: &str| FetchError::Config(format!("file_dir `{}` {why}", dir.display()));
    let absolute = std::path::absolute(dir).map_err(|_| bad("cannot be made absolute"))?;
    let canonical = std::fs::canonicalize(dir).map_err(|_| bad("does not exist"))?;
    if !canonical.is_dir() {
        return Err(bad("is not a directory"));
    }
    Ok(FileRoot { absolute, canonical })
}

/// Reads `path` if its canonical form lies inside `root_canon`, capped at `limit` bytes.
///
/// The directory is assumed to be operator-controlled: a concurrent symlink swap between the
/// canonicalization and the open is not defended against.
pub(super) fn read_confined(root_abs: &Path, root_canon: &Path, path: &Path, limit: usize) -> Result<Vec<u8>, FetchError> {
    let canonical = match std::fs::canonicalize(path) {
        Ok(p) => p,
        // Do not reveal whether paths outside the directory exist.
        Err(_) if !(path.starts_with(root_abs) || path.starts_with(root_canon)) => return Err(FetchError::FileOutsideDir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FetchError::FileNotFound),
        Err(_) => return Err(FetchError::FileRead),
    };
    if !canonical.starts_with(root_canon) {
        return Err(FetchError::FileOutsideDir);
    }
    let file = std::fs::File::open(&canonical).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => FetchError::FileNotFound,
        _ => FetchError::FileRead,
    })?;
    let meta = file.metadata().map_err(|_| FetchError::FileRead)?;
    if !meta.is_file() {
        return Err(FetchError::NotAFile);
    }
    if meta.len() > limit as u64 {
        return Err(FetchError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` guards against the file growing after the metadata check.
    file.take(limit as u64 + 1).read_to_end(&mut bytes).map_err(|_| FetchError::FileRead)?;
    if bytes.len() > limit {
        return Err(FetchError::TooLarge { limit });
    }
    Ok(bytes)
}

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
/// Standard alphabet, padding optional.
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
/// URL-safe alphabet, padding optional.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Decodes the part of a `data:` URL after `data:` (`<mediatype>[;params];base64,<payload>`).
pub(super) fn decode_data_url(rest: &str, limit: usize) -> Result<Vec<u8>, FetchError> {
    let (header, payload) = rest.split_once(',').ok_or(FetchError::InvalidDataUrl("missing ',' before the payload"))?;
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !media_type.is_empty() && !DATA_URL_MEDIA_TYPES.contains(&media_type.as_str()) {
        return Err(FetchError::UnsupportedMediaType(clip(&media_type)));
    }
    if !params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(FetchError::DataNotBase64);
    }

    // Size check on the encoded length, before any decoding work or allocation.
    let significant = payload.bytes().filter(|b| !b.is_ascii_whitespace()).count();
    if significant > limit.div_ceil(3).saturating_mul(4) {
        return Err(FetchError::TooLarge { limit });
    }
    if significant == 0 {
        return Err(FetchError::InvalidDataUrl("empty payload"));
    }
    let encoded: Cow<'_, [u8]> = if significant == payload.len() {
        Cow::Borrowed(payload.as_bytes())
    } else {
        Cow::Owned(payload.bytes().filter(|b| !b.is_ascii_whitespace()).collect())
    };
    let engine = if encoded.iter().any(|&b| b == b'-' || b == b'_') { &URL_SAFE_LENIENT } else { &STANDARD_LENIENT };
    let bytes = engine.decode(&encoded).map_err(|_| FetchError::InvalidBase64)?;
    if bytes.len() > limit {
        return Err(FetchError::TooLarge { limit });
    }
    Ok(bytes)
}
