//! The durable store of demonstration sets: few-shot example sets a client registers once under
//! an id and names in later requests.
//!
//! The server keeps the sets it uses in memory; this module only persists their definitions and
//! reads them back. Several server replicas may share one directory (a shared volume), so a
//! replica reads the store when a set is not in its memory, every write is atomic, and every
//! file is verified when it is read.
//!
//! # Layout
//!
//! ```text
//! <dir>/demonstrations/
//!     demo-<24 hex>.json        one file per set, named by its id
//!     .tmp-<id>-<pid>-<random>  a write in progress (or left by a crash); never read
//! ```
//!
//! A set's file is JSON:
//!
//! ```text
//! {"format": 1, "id": "demo-…", "name": "…", "created": <unix seconds>,
//!  "examples": <the examples as the server normalised them>,
//!  "blobs": {"<sha256 hex of the bytes>": "<the bytes in standard base64>", …}}
//! ```
//!
//! # Guarantees
//!
//! - **Content ids.** A set's id is derived from its content ([`content_id`]: the name, the
//!   examples in a canonical JSON encoding, the blobs), not from the replica or the moment it was
//!   registered (`created` is not part of it). Replicas that register the same set agree on its
//!   id, writing it twice is harmless, and an id can never name two different sets.
//! - **Atomic writes.** [`Store::put`] writes a temporary file in the same directory, syncs it to
//!   disk, renames it over `<id>.json` and syncs the directory. A reader on any replica sees
//!   either no file or a whole one, never a partial `<id>.json`, even if the writer crashes; a
//!   crash leaves at most a `.tmp-*` file, which is ignored.
//! - **Verification on read.** [`Store::load`] and [`Store::scan`] check every file: it must
//!   parse, have a known format version, hold the id its name says, have every blob match its
//!   sha256 key and the whole content hash to the id. Anything else is
//!   [`StoreError::Corrupt`], never a set (and never a panic): a torn, truncated, edited or
//!   renamed file is refused, and a good one next to it still loads.
//! - **Safe ids.** Only ids of the exact form `demo-` + 24 lowercase hex digits
//!   ([`is_valid_id`]) reach the file system, so an id can never name a path outside the
//!   directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The prefix of every set id.
pub const ID_PREFIX: &str = "demo-";

/// The number of hex digits after [`ID_PREFIX`] in a set id.
pub const ID_HEX_DIGITS: usize = 24;

/// The version of the file format written (and the only one read).
pub const FORMAT_VERSION: u64 = 1;

/// The subdirectory of the store's base directory that holds the set files.
const SUBDIR: &str = "demonstrations";

/// The prefix of temporary files (a write in progress, or left by a crash).
const TMP_PREFIX: &str = ".tmp-";

/// Separates the content-id hash from any other use of SHA-256 over similar fields.
const ID_DOMAIN: &[u8] = b"flamingo demonstration set v1\0";

/// Why a set could not be built, stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not of the form `demo-` + 24 lowercase hex digits; refused before touching the disk.
    #[error("invalid demonstration set id `{0}` (expected `demo-` and 24 lowercase hex digits)")]
    InvalidId(String),

    /// A filesystem error, with the path involved (the directory, or the set's `<id>.json`).
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    /// A file that does not verify: it is never returned as a set.
    #[error("{}: corrupt demonstration set file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// A blob whose key is not the lowercase sha256 hex of its bytes.
    #[error("blob `{key}` is not keyed by the lowercase sha256 hex of its bytes")]
    InvalidBlob { key: String },

    /// A set given to [`Store::put`] that would not read back as itself (its fields were changed
    /// after [`StoredSet::new`] so that its id no longer matches its content, or a blob its key).
    #[error("demonstration set `{id}` is inconsistent: {reason}")]
    Inconsistent { id: String, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// A demonstration set's definition, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSet {
    /// Derived from the content ([`content_id`]).
    pub id: String,
    /// The name the client gave it.
    pub name: String,
    /// When it was first registered, in unix seconds (not part of the id).
    pub created: u64,
    /// The examples as the server normalised them (opaque here).
    pub examples: Value,
    /// Media bytes by their lowercase sha256 hex ([`blob_key`]).
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl StoredSet {
    /// Builds a set with its id computed from its content; checks that every blob's key is the
    /// sha256 hex of its bytes.
    ///
    /// A floating-point number in `examples` that serde_json would not read back exactly from the
    /// text it writes is replaced by its nearest neighbour (at fewer significant digits) that it
    /// does, so the id computed here is the one recomputed when the file is read.
    pub fn new(name: String, created: u64, examples: Value, blobs: BTreeMap<String, Vec<u8>>) -> Result<Self, StoreError> {
        if let Some(key) = blobs.iter().find(|(key, bytes)| **key != blob_key(bytes)).map(|(key, _)| key) {
            return Err(StoreError::InvalidBlob { key: key.clone() });
        }
        let examples = settle_numbers(examples);
        let id = content_id(&name, &examples, &blobs);
        Ok(StoredSet { id, name, created, examples, blobs })
    }

    /// The approximate size in memory, in bytes: the blobs, their keys, the name and the examples
    /// as compact JSON.
    pub fn bytes(&self) -> usize {
        let blobs: usize = self.blobs.iter().map(|(key, bytes)| key.len() + bytes.len()).sum();
        let mut examples = CountingWriter(0);
        // Writing a `Value` to a counter cannot fail; were it to, the count so far is still an estimate.
        let _ = serde_json::to_writer(&mut examples, &self.examples);
        blobs + examples.0 + self.name.len() + self.id.len()
    }
}

/// Counts the bytes written to it.
struct CountingWriter(usize);

impl io::Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The key of a blob: the lowercase sha256 hex of its bytes.
pub fn blob_key(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `demo-` + the first 24 hex digits of a SHA-256 over a canonical encoding of `(name,
/// examples, blobs)`.
///
/// Deterministic whatever the key order of JSON objects in `examples`: they are encoded
/// canonically (object keys sorted recursively, compact, serde_json's number formatting). Every
/// field is length-prefixed, so no two different contents collide by concatenation.
pub fn content_id(name: &str, examples: &Value, blobs: &BTreeMap<String, Vec<u8>>) -> String {
    let mut h = Sha256::new();
    h.update(ID_DOMAIN);
    let field = |h: &mut Sha256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(&mut h, name.as_bytes());
    let mut canonical = String::new();
    write_canonical(examples, &mut canonical);
    field(&mut h, canonical.as_bytes());
    h.update((blobs.len() as u64).to_le_bytes());
    for (key, bytes) in blobs {
        field(&mut h, key.as_bytes());
        field(&mut h, bytes);
    }
    let digest = h.finalize();
    format!("{ID_PREFIX}{}", hex(&digest[..ID_HEX_DIGITS / 2]))
}

/// Whether `id` is exactly `demo-` + 24 lowercase hex digits (and so safe as a file name).
pub fn is_valid_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX)
        .is_some_and(|hex| hex.len() == ID_HEX_DIGITS && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Writes `v` as canonical JSON: compact, object keys sorted (by their UTF-8 bytes) at every
/// level, numbers as serde_json formats them.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(key, out);
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
    }
}

/// Writes `s` as a JSON string, escaped as serde_json escapes it.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Replaces each floating-point number in `v` that would not read back exactly from the JSON
/// text written for it by one that does (see [`settle_float`]), so the content id survives a trip
/// through a file. Integers, strings and the structure are untouched.
fn settle_numbers(v: Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => {
            let settled = n.as_f64().and_then(|x| serde_json::Number::from_f64(settle_float(x)));
            Value::Number(settled.unwrap_or(n))
        }
        Value::Array(items) => Value::Array(items.into_iter().map(settle_numbers).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(key, value)| (key, settle_numbers(value))).collect()),
        other => other,
    }
}

/// `x` if it reads back exactly from the text serde_json writes for it, else the nearest value
/// that does among `x` rounded to 17, 16, … 1 significant digits.
///
/// Without serde_json's `float_roundtrip` feature (which this crate does not ask for) its parser
/// may read the shortest representation of a float one unit in the last place off, and parsing
/// and writing again can drift for many rounds, so a value is settled once here rather than
/// re-parsed until it stops moving. A value with no such neighbour (none was found in a million
/// random bit patterns) is kept, and [`Store::put`] refuses the set.
fn settle_float(x: f64) -> f64 {
    if reads_back(x) {
        return x;
    }
    (0..17usize).rev().filter_map(|digits| format!("{x:.digits$e}").parse::<f64>().ok()).find(|&y| reads_back(y)).unwrap_or(x)
}

/// Whether `x` is written by serde_json as a text that it parses back to the same float, bit for bit.
fn reads_back(x: f64) -> bool {
    let Some(n) = serde_json::Number::from_f64(x) else { return false };
    match serde_json::from_str::<Value>(&n.to_string()) {
        Ok(Value::Number(back)) => back.is_f64() && back.as_f64().is_some_and(|y| y.to_bits() == x.to_bits()),
        _ => false,
    }
}

/// A set's file, as written.
#[derive(Serialize)]
struct FileOut<'a> {
    format: u64,
    id: &'a str,
    name: &'a str,
    created: u64,
    examples: &'a Value,
    blobs: BTreeMap<&'a str, String>,
}

/// A set's file, as read (after its format version was checked).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    #[allow(dead_code)]
    format: u64,
    id: String,
    name: String,
    created: u64,
    examples: Value,
    blobs: BTreeMap<String, String>,
}

/// Encodes a set as its file's bytes.
fn encode(set: &StoredSet) -> Result<Vec<u8>, serde_json::Error> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let file = FileOut {
        format: FORMAT_VERSION,
        id: &set.id,
        name: &set.name,
        created: set.created,
        examples: &set.examples,
        blobs: set.blobs.iter().map(|(key, bytes)| (key.as_str(), b64.encode(bytes))).collect(),
    };
    serde_json::to_vec(&file)
}

/// Decodes and verifies the bytes of the file for set `id`. The error is the reason it is corrupt.
fn decode(bytes: &[u8], id: &str) -> Result<StoredSet, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    match value.get("format") {
        Some(Value::Number(n)) if n.as_u64() == Some(FORMAT_VERSION) => {}
        Some(other) => return Err(format!("unknown format version {other} (this server reads version {FORMAT_VERSION})")),
        None if value.is_object() => return Err("no format version".to_string()),
        None => return Err("not a JSON object".to_string()),
    }
    let file: FileIn = serde_json::from_value(value).map_err(|e| format!("invalid contents: {e}"))?;
    if file.id != id {
        return Err(format!("the file holds set `{}`, not the `{id}` its name says", file.id));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut blobs = BTreeMap::new();
    for (key, text) in file.blobs {
        let bytes = b64.decode(text.as_bytes()).map_err(|e| format!("blob `{key}`: invalid base64: {e}"))?;
        if blob_key(&bytes) != key {
            return Err(format!("blob `{key}`: its bytes do not hash to its key"));
        }
        blobs.insert(key, bytes);
    }
    let computed = content_id(&file.name, &file.examples, &blobs);
    if computed != file.id {
        return Err(format!("its content hashes to `{computed}`, not to its id `{}`", file.id));
    }
    Ok(StoredSet { id: file.id, name: file.name, created: file.created, examples: file.examples, blobs })
}

/// The directory of set files under a base directory (the files live in `<dir>/demonstrations/`).
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// A store in `<dir>/demonstrations/`. Does not touch the disk (the directory is created by the
    /// first [`put`](Store::put)).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into().join(SUBDIR) }
    }

    /// The directory holding the set files: `<dir>/demonstrations`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> Result<PathBuf, StoreError> {
        if is_valid_id(id) {
            Ok(self.dir.join(format!("{id}.json")))
        } else {
            Err(StoreError::InvalidId(id.to_string()))
        }
    }

    /// Writes a set atomically: a temporary file in the same directory (a unique name starting
    /// with `.tmp-`), written whole and synced, renamed over `<id>.json`, then the directory
    /// synced. Creates the directory (and its parents) if missing.
    ///
    /// Writing a set whose file already exists and verifies is a no-op success (the file, and
    /// its `created`, are kept); a file that does not verify is replaced. Never leaves a partial
    /// `<id>.json`: on failure the temporary file is removed and the error names the path
    /// ([`StoreError::Io`]: the directory when it cannot be created or synced, otherwise
    /// `<id>.json`). Should only the final directory sync fail, the file is in place but may not
    /// survive a power loss.
    ///
    /// The set must read back as itself: its id must be valid ([`StoreError::InvalidId`]) and
    /// match its content ([`StoreError::Inconsistent`]), as [`StoredSet::new`] makes it.
    pub fn put(&self, set: &StoredSet) -> Result<(), StoreError> {
        let path = self.path(&set.id)?;
        let inconsistent = |reason: String| StoreError::Inconsistent { id: set.id.clone(), reason };
        let bytes = encode(set).map_err(|e| inconsistent(e.to_string()))?;
        // The bytes go through the very check a reader applies, so what is written always loads.
        decode(&bytes, &set.id).map_err(inconsistent)?;

        match self.load(&set.id) {
            Ok(Some(_)) => {
                tracing::debug!(id = %set.id, "demonstration set already stored");
                return Ok(());
            }
            Ok(None) => {}
            Err(e @ StoreError::Corrupt { .. }) => tracing::warn!(error = %e, "replacing a corrupt demonstration set file"),
            // Unreadable: try the write, which reports its own error.
            Err(_) => {}
        }

        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let (tmp, mut file) = self.create_temp(&set.id)?;
        let written = file.write_all(&bytes).and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
            // Best effort: the error that matters is the one above.
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&path)(e));
        }
        sync_dir(&self.dir)?;
        tracing::debug!(id = %set.id, path = %path.display(), "demonstration set stored");
        Ok(())
    }

    /// Creates a new temporary file for a write of set `id`.
    fn create_temp(&self, id: &str) -> Result<(PathBuf, fs::File), StoreError> {
        let mut attempt = 0;
        loop {
            let tmp = self.dir.join(format!("{TMP_PREFIX}{id}-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(file) => return Ok((tmp, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(io_err(&self.dir)(e)),
            }
        }
    }

    /// Reads and verifies one set: `Ok(None)` if there is no file; [`StoreError::Corrupt`] if it
    /// does not parse, its format version is unknown, the id in the file differs from the file
    /// name, the content id recomputed differs, or a blob's hash differs from its key.
    pub fn load(&self, id: &str) -> Result<Option<StoredSet>, StoreError> {
        let path = self.path(id)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        decode(&bytes, id).map(Some).map_err(|reason| StoreError::Corrupt { path, reason })
    }

    /// Whether a file for set `id` exists (not verified: [`load`](Store::load) verifies). False
    /// for an invalid id, without touching the disk.
    pub fn exists(&self, id: &str) -> bool {
        self.path(id).is_ok_and(|path| fs::metadata(path).is_ok_and(|m| m.is_file()))
    }

    /// Every `<id>.json` in the directory (temporary files and other names are ignored), in id
    /// order, each loaded and verified; corrupt or unreadable ones are returned as errors naming
    /// their path, never as sets. A missing directory is an empty store.
    pub fn scan(&self) -> Vec<Result<StoredSet, StoreError>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => return vec![Err(io_err(&self.dir)(e))],
        };
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => {
                    let name = entry.file_name();
                    if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")).filter(|id| is_valid_id(id)) {
                        ids.push(id.to_string());
                    }
                }
                Err(e) => out.push(Err(io_err(&self.dir)(e))),
            }
        }
        ids.sort();
        for id in ids {
            match self.load(&id) {
                Ok(Some(set)) => out.push(Ok(set)),
                // Removed (by another replica) since the directory was listed.
                Ok(None) => {}
                Err(e) => out.push(Err(e)),
            }
        }
        out
    }

    /// Removes the set's file; `Ok(false)` if there was none.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let path = self.path(id)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&path)(e)),
        }
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

/// Syncs a directory, so that a rename or removal in it is durable. File systems that cannot
/// sync a directory are let be.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        match fs::File::open(dir).and_then(|d| d.sync_all()) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot sync the directory");
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The per-user default base directory: `$XDG_DATA_HOME/flamingo`, else
/// `$HOME/.local/share/flamingo`, else `./flamingo-data`.
pub fn default_dir() -> PathBuf {
    default_dir_from(std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME"))
}

/// [`default_dir`] from the values of `XDG_DATA_HOME` and `HOME`. A relative `XDG_DATA_HOME` is
/// ignored, as the XDG specification asks; empty values count as unset.
fn default_dir_from(xdg_data_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    if let Some(xdg) = xdg_data_home.map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("flamingo");
    }
    if let Some(home) = home.filter(|h| !h.is_empty()) {
        return PathBuf::from(home).join(".local/share/flamingo");
    }
    PathBuf::from("flamingo-data")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("flamingo-store-{tag}-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn blobs(items: &[&[u8]]) -> BTreeMap<String, Vec<u8>> {
        items.iter().map(|b| (blob_key(b), b.to_vec())).collect()
    }

    fn sample(name: &str) -> StoredSet {
        let image: &[u8] = b"\x89PNG fake image bytes";
        let examples = json!([
            {"role": "user", "content": [{"type": "image", "sha256": blob_key(image)}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A red square.", "score": 0.1, "n": 3},
        ]);
        StoredSet::new(name.to_string(), 1_700_000_000, examples, blobs(&[image, b"second blob"])).unwrap()
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    fn write_json(path: &Path, v: &Value) {
        fs::write(path, serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn assert_corrupt(r: Result<Option<StoredSet>, StoreError>, expected_path: &Path) -> String {
        match r {
            Err(StoreError::Corrupt { path, reason }) => {
                assert_eq!(path, expected_path);
                reason
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip() {
        let tmp = TempDir::new("roundtrip");
        let store = Store::new(&tmp.0);
        assert_eq!(store.dir(), tmp.0.join("demonstrations"));
        let set = sample("shapes");
        assert!(is_valid_id(&set.id));
        assert!(set.bytes() > set.blobs.values().map(Vec::len).sum::<usize>());

        assert!(!store.dir().exists(), "Store::new does not touch the disk");
        assert_eq!(store.load(&set.id).unwrap(), None);
        assert!(!store.exists(&set.id));
        assert!(store.scan().is_empty());

        store.put(&set).unwrap();
        assert!(store.exists(&set.id));
        assert_eq!(store.load(&set.id).unwrap().as_ref(), Some(&set));
        let scanned: Vec<StoredSet> = store.scan().into_iter().map(Result::unwrap).collect();
        assert_eq!(scanned, vec![set.clone()]);
        assert_eq!(file_names(store.dir()), vec![format!("{}.json", set.id)], "no temp file left");

        let file = read_json(&store.dir().join(format!("{}.json", set.id)));
        assert_eq!(file["format"], json!(1));
        assert_eq!(file["id"], json!(set.id));
        let key = blob_key(b"second blob");
        assert_eq!(file["blobs"][&key], json!(base64::engine::general_purpose::STANDARD.encode(b"second blob")));

        // A second put of the same content (even with another `created`) keeps the file.
        let again = StoredSet { created: 5, ..set.clone() };
        store.put(&again).unwrap();
        assert_eq!(store.load(&set.id).unwrap().unwrap().created, set.created);

        assert!(store.remove(&set.id).unwrap());
        assert!(!store.remove(&set.id).unwrap());
        assert_eq!(store.load(&set.id).unwrap(), None);
        assert!(store.scan().is_empty());
    }

    #[test]
    fn empty_set_and_floats_round_trip() {
        let tmp = TempDir::new("floats");
        let store = Store::new(&tmp.0);
        let empty = StoredSet::new(String::new(), 0, json!([]), BTreeMap::new()).unwrap();
        store.put(&empty).unwrap();
        assert_eq!(store.load(&empty.id).unwrap(), Some(empty));

        let floats: Vec<f64> = (0..200).map(|i| f64::from_bits(0x3ff0_0000_0000_0000 ^ (rand::random::<u64>() >> 12) ^ i)).collect();
        let set = StoredSet::new("floats".into(), 1, json!({"v": floats, "tiny": 5e-324, "big": 1.7976931348623157e308}), BTreeMap::new())
            .unwrap();
        store.put(&set).unwrap();
        assert_eq!(store.load(&set.id).unwrap(), Some(set));

        // Whatever the float, the settled value reads back exactly; one that already does is kept.
        for _ in 0..20_000 {
            let x = f64::from_bits(rand::random::<u64>());
            if x.is_finite() {
                let y = settle_float(x);
                assert!(reads_back(y), "{x:e} -> {y:e}");
                if reads_back(x) {
                    assert_eq!(y.to_bits(), x.to_bits());
                }
            }
        }
    }

    #[test]
    fn id_is_content_derived() {
        let a: Value = serde_json::from_str(r#"[{"a": 1, "b": {"x": [1, 2], "y": "z"}}]"#).unwrap();
        let b: Value = serde_json::from_str(r#"[{"b": {"y": "z", "x": [1, 2]}, "a": 1}]"#).unwrap();
        let none = BTreeMap::new();
        assert_eq!(content_id("n", &a, &none), content_id("n", &b, &none), "key order does not matter");

        let base = content_id("n", &a, &blobs(&[b"one"]));
        assert!(is_valid_id(&base));
        assert_ne!(base, content_id("m", &a, &blobs(&[b"one"])), "the name matters");
        assert_ne!(base, content_id("n", &json!([{"a": 2, "b": {"x": [1, 2], "y": "z"}}]), &blobs(&[b"one"])), "examples matter");
        assert_ne!(base, content_id("n", &json!([{"a": 1, "b": {"x": [2, 1], "y": "z"}}]), &blobs(&[b"one"])), "array order matters");
        assert_ne!(base, content_id("n", &a, &blobs(&[b"two"])), "blob bytes matter");
        assert_ne!(base, content_id("n", &a, &blobs(&[b"one", b"two"])), "extra blobs matter");
        assert_ne!(base, content_id("n", &a, &none));
        // Length prefixes: moving bytes between fields changes the id.
        assert_ne!(content_id("ab", &json!("c"), &none), content_id("a", &json!("bc"), &none));
        assert_ne!(content_id("", &json!(null), &blobs(&[b"xy"])), content_id("", &json!(null), &blobs(&[b"x", b"y"])));
        // Escapes: distinct strings stay distinct.
        assert_ne!(content_id("", &json!("a\"b"), &none), content_id("", &json!("a\\\"b"), &none));

        let early = StoredSet::new("n".into(), 1, a.clone(), blobs(&[b"one"])).unwrap();
        let late = StoredSet::new("n".into(), 2_000_000_000, b, blobs(&[b"one"])).unwrap();
        assert_eq!(early.id, late.id, "`created` is not part of the id");
        assert_eq!(early.id, base);
    }

    #[test]
    fn canonical_encoding() {
        let v: Value = serde_json::from_str(r#"{"b": [1, 2.5, -0.0, "x\n\u0001é"], "a": {"d": null, "c": true}}"#).unwrap();
        let mut s = String::new();
        write_canonical(&v, &mut s);
        assert_eq!(s, r#"{"a":{"c":true,"d":null},"b":[1,2.5,-0.0,"x\n\u0001é"]}"#);
        // Strings escape as serde_json escapes them.
        for text in ["plain", "q\"b\\s", "\u{0}\u{1f}\t\r\u{8}\u{c}", "ünï€😀"] {
            let mut s = String::new();
            write_json_string(text, &mut s);
            assert_eq!(s, serde_json::to_string(text).unwrap());
        }
    }

    #[test]
    fn new_checks_blob_keys() {
        let mut bad = blobs(&[b"one"]);
        bad.insert(blob_key(b"two"), b"not two".to_vec());
        assert!(matches!(StoredSet::new("n".into(), 0, json!([]), bad), Err(StoreError::InvalidBlob { key }) if key == blob_key(b"two")));

        let upper: BTreeMap<String, Vec<u8>> = [(blob_key(b"one").to_uppercase(), b"one".to_vec())].into();
        assert!(matches!(StoredSet::new("n".into(), 0, json!([]), upper), Err(StoreError::InvalidBlob { .. })));
    }

    #[test]
    fn put_refuses_inconsistent_sets() {
        let tmp = TempDir::new("inconsistent");
        let store = Store::new(&tmp.0);
        let mut edited = sample("a");
        edited.name = "b".into();
        assert!(matches!(store.put(&edited), Err(StoreError::Inconsistent { .. })));
        let mut tampered = sample("a");
        if let Some(bytes) = tampered.blobs.values_mut().next() {
            bytes.push(0);
        }
        assert!(matches!(store.put(&tampered), Err(StoreError::Inconsistent { .. })));
        let mut bad_id = sample("a");
        bad_id.id = "../escape".into();
        assert!(matches!(store.put(&bad_id), Err(StoreError::InvalidId(_))));
        assert!(!store.dir().exists(), "nothing written");
    }

    #[test]
    fn torn_file_is_corrupt_and_good_sibling_loads() {
        let tmp = TempDir::new("torn");
        let store = Store::new(&tmp.0);
        let good = sample("good");
        let torn = sample("torn");
        store.put(&good).unwrap();
        store.put(&torn).unwrap();

        let torn_path = store.dir().join(format!("{}.json", torn.id));
        let bytes = fs::read(&torn_path).unwrap();
        fs::write(&torn_path, &bytes[..bytes.len() / 2]).unwrap();

        let reason = assert_corrupt(store.load(&torn.id), &torn_path);
        assert!(reason.contains("not valid JSON"), "{reason}");
        assert_eq!(store.load(&good.id).unwrap(), Some(good.clone()));

        let scanned = store.scan();
        assert_eq!(scanned.len(), 2);
        let sets: Vec<&StoredSet> = scanned.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(sets, vec![&good]);
        let errors: Vec<&StoreError> = scanned.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(matches!(errors.as_slice(), [StoreError::Corrupt { path, .. }] if *path == torn_path), "{errors:?}");
        assert!(errors[0].to_string().contains(&torn.id));

        // Putting the set again repairs its file.
        store.put(&torn).unwrap();
        assert_eq!(store.load(&torn.id).unwrap(), Some(torn));
    }

    #[test]
    fn tampered_files_are_corrupt() {
        let tmp = TempDir::new("tampered");
        let store = Store::new(&tmp.0);
        let set = sample("s");
        store.put(&set).unwrap();
        let path = store.dir().join(format!("{}.json", set.id));
        let original = read_json(&path);
        let b64 = base64::engine::general_purpose::STANDARD;
        let key = blob_key(b"second blob");

        // A blob's bytes changed under its key.
        let mut v = original.clone();
        v["blobs"][&key] = json!(b64.encode(b"other bytes"));
        write_json(&path, &v);
        let reason = assert_corrupt(store.load(&set.id), &path);
        assert!(reason.contains("do not hash"), "{reason}");

        // A blob replaced consistently (new key, new bytes): the content id no longer matches.
        let mut v = original.clone();
        let blobs = v["blobs"].as_object_mut().unwrap();
        blobs.remove(&key);
        blobs.insert(blob_key(b"other bytes"), json!(b64.encode(b"other bytes")));
        write_json(&path, &v);
        let reason = assert_corrupt(store.load(&set.id), &path);
        assert!(reason.contains("hashes to"), "{reason}");

        // Invalid base64.
        let mut v = original.clone();
        v["blobs"][&key] = json!("not base64 !!");
        write_json(&path, &v);
        assert_corrupt(store.load(&set.id), &path);

        // Edited examples.
        let mut v = original.clone();
        v["examples"][1]["content"] = json!("A blue circle.");
        write_json(&path, &v);
        let reason = assert_corrupt(store.load(&set.id), &path);
        assert!(reason.contains("hashes to"), "{reason}");

        // Edited name.
        let mut v = original.clone();
        v["name"] = json!("renamed");
        write_json(&path, &v);
        assert_corrupt(store.load(&set.id), &path);

        // Missing and unknown fields.
        let mut v = original.clone();
        v.as_object_mut().unwrap().remove("created");
        write_json(&path, &v);
        assert_corrupt(store.load(&set.id), &path);
        let mut v = original.clone();
        v["extra"] = json!(1);
        write_json(&path, &v);
        assert_corrupt(store.load(&set.id), &path);

        // Not an object at all.
        write_json(&path, &json!([1, 2, 3]));
        assert_corrupt(store.load(&set.id), &path);
        fs::write(&path, b"").unwrap();
        assert_corrupt(store.load(&set.id), &path);

        // A file renamed (or copied) to another id.
        write_json(&path, &original);
        assert_eq!(store.load(&set.id).unwrap(), Some(set.clone()));
        let other_id = sample("other").id;
        let other_path = store.dir().join(format!("{other_id}.json"));
        fs::rename(&path, &other_path).unwrap();
        let reason = assert_corrupt(store.load(&other_id), &other_path);
        assert!(reason.contains("not the"), "{reason}");
        assert_eq!(store.load(&set.id).unwrap(), None);
        assert!(matches!(store.scan().as_slice(), [Err(StoreError::Corrupt { path, .. })] if *path == other_path));

        // A file whose id and name agree but whose content is another set's.
        let mut v = original.clone();
        v["id"] = json!(other_id);
        write_json(&other_path, &v);
        let reason = assert_corrupt(store.load(&other_id), &other_path);
        assert!(reason.contains("hashes to"), "{reason}");
    }

    #[test]
    fn unknown_format_version_is_corrupt() {
        let tmp = TempDir::new("format");
        let store = Store::new(&tmp.0);
        let set = sample("s");
        store.put(&set).unwrap();
        let path = store.dir().join(format!("{}.json", set.id));
        let original = read_json(&path);
        for format in [json!(2), json!(0), json!("1"), json!(1.5), json!(null)] {
            let mut v = original.clone();
            v["format"] = format.clone();
            write_json(&path, &v);
            let reason = assert_corrupt(store.load(&set.id), &path);
            assert!(reason.contains("unknown format version"), "{format}: {reason}");
        }
        let mut v = original.clone();
        v.as_object_mut().unwrap().remove("format");
        write_json(&path, &v);
        let reason = assert_corrupt(store.load(&set.id), &path);
        assert!(reason.contains("no format version"), "{reason}");
        assert!(matches!(store.scan().as_slice(), [Err(StoreError::Corrupt { .. })]));
    }

    #[test]
    fn scan_ignores_temp_files_and_other_names() {
        let tmp = TempDir::new("scan");
        let store = Store::new(&tmp.0);
        let a = sample("a");
        let b = sample("b");
        store.put(&b).unwrap();
        store.put(&a).unwrap();
        let dir = store.dir();
        let a_bytes = fs::read(dir.join(format!("{}.json", a.id))).unwrap();
        // Leftovers of interrupted writes, half-written or whole, and unrelated names.
        fs::write(dir.join(format!(".tmp-{}-1-0000000000000000", a.id)), &a_bytes[..10]).unwrap();
        fs::write(dir.join(format!(".tmp-{}.json", sample("c").id)), &a_bytes).unwrap();
        fs::write(dir.join("README"), b"hello").unwrap();
        fs::write(dir.join("demo-XYZ.json"), b"{").unwrap();
        fs::write(dir.join(format!("{}.json.bak", a.id)), b"{").unwrap();
        fs::write(dir.join(format!("{}.JSON", a.id)), b"{").unwrap();
        fs::create_dir(dir.join("subdir")).unwrap();

        let mut expected = vec![a, b];
        expected.sort_by(|x, y| x.id.cmp(&y.id));
        let scanned: Vec<StoredSet> = store.scan().into_iter().map(Result::unwrap).collect();
        assert_eq!(scanned, expected);
    }

    #[test]
    fn stores_on_one_directory_share_sets() {
        let tmp = TempDir::new("shared");
        let one = Store::new(&tmp.0);
        let two = Store::new(&tmp.0);
        let set = sample("shared");
        assert_eq!(two.load(&set.id).unwrap(), None);
        one.put(&set).unwrap();
        assert!(two.exists(&set.id));
        assert_eq!(two.load(&set.id).unwrap(), Some(set.clone()));
        assert_eq!(two.scan().len(), 1);
        // The other replica registers the same content: same id, no-op.
        let same = StoredSet::new(set.name.clone(), 42, set.examples.clone(), set.blobs.clone()).unwrap();
        assert_eq!(same.id, set.id);
        two.put(&same).unwrap();
        assert!(two.remove(&set.id).unwrap());
        assert!(!one.exists(&set.id));
        assert_eq!(one.load(&set.id).unwrap(), None);
        assert!(one.scan().is_empty());
        assert!(!one.remove(&set.id).unwrap());
    }

    #[test]
    fn put_into_unwritable_location_is_io_error() {
        let tmp = TempDir::new("unwritable");
        let blocker = tmp.0.join("a-regular-file");
        fs::write(&blocker, b"not a directory").unwrap();
        let store = Store::new(blocker.join("sub"));
        let set = sample("s");
        match store.put(&set) {
            Err(e @ StoreError::Io { .. }) => {
                let StoreError::Io { path, .. } = &e else { unreachable!() };
                assert!(path.starts_with(&blocker), "{}", path.display());
                assert!(e.to_string().contains(&blocker.display().to_string()), "{e}");
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(fs::read(&blocker).unwrap(), b"not a directory");
        assert_eq!(file_names(&tmp.0), vec!["a-regular-file".to_string()], "nothing left behind");
        assert!(store.scan().iter().all(Result::is_err), "a store under a file lists nothing");
        assert!(!store.exists(&set.id));
    }

    #[test]
    fn failed_rename_removes_the_temp_file() {
        let tmp = TempDir::new("rename");
        let store = Store::new(&tmp.0);
        let set = sample("s");
        // A non-empty directory where the file should go: the rename fails, even as root.
        let target = store.dir().join(format!("{}.json", set.id));
        fs::create_dir_all(target.join("inside")).unwrap();
        match store.put(&set) {
            Err(StoreError::Io { path, .. }) => assert_eq!(path, target),
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(file_names(store.dir()), vec![format!("{}.json", set.id)], "the temp file was removed");
        assert!(!store.exists(&set.id));
        assert!(matches!(store.scan().as_slice(), [Err(StoreError::Io { .. })]));
    }

    #[test]
    fn invalid_ids_are_refused_without_touching_the_disk() {
        let tmp = TempDir::new("ids");
        let store = Store::new(&tmp.0);
        // What `../x` would name, were it joined to the directory.
        let outside = tmp.0.join("x.json");
        fs::write(&outside, serde_json::to_vec(&json!({"format": 1})).unwrap()).unwrap();
        let valid = sample("s").id;
        let bad = [
            "../x".to_string(),
            "demo-XYZ".to_string(),
            "demo-abc".to_string(),
            format!("demo-{}", "A".repeat(24)),
            format!("demo-{}", "0".repeat(25)),
            format!("demo-{}", "0".repeat(23)),
            format!("demo-{}", "g".repeat(24)),
            format!("{valid}.json"),
            format!("../{valid}"),
            format!("Demo-{}", &valid[5..]),
            format!("demo-{}/", &valid[5..28]),
            String::new(),
            "demo-".to_string(),
        ];
        for id in &bad {
            assert!(!is_valid_id(id), "{id}");
            assert!(matches!(store.load(id), Err(StoreError::InvalidId(ref i)) if i == id), "{id}");
            assert!(matches!(store.remove(id), Err(StoreError::InvalidId(_))), "{id}");
            assert!(!store.exists(id), "{id}");
        }
        assert!(is_valid_id(&valid));
        assert!(is_valid_id(&format!("demo-{}", "0123456789abcdef01234567")));
        assert!(outside.exists(), "remove(\"../x\") did not remove ../x.json");
        assert!(!store.dir().exists(), "the store directory was never created");
        assert_eq!(file_names(&tmp.0), vec!["x.json".to_string()]);
    }

    #[test]
    fn default_dir_order() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(default_dir_from(some("/data"), some("/home/u")), PathBuf::from("/data/flamingo"));
        assert_eq!(default_dir_from(some("relative"), some("/home/u")), PathBuf::from("/home/u/.local/share/flamingo"));
        assert_eq!(default_dir_from(some(""), some("/home/u")), PathBuf::from("/home/u/.local/share/flamingo"));
        assert_eq!(default_dir_from(None, some("/home/u")), PathBuf::from("/home/u/.local/share/flamingo"));
        assert_eq!(default_dir_from(None, some("")), PathBuf::from("flamingo-data"));
        assert_eq!(default_dir_from(None, None), PathBuf::from("flamingo-data"));
        assert!(default_dir().ends_with("flamingo") || default_dir().ends_with("flamingo-data"));
    }
}
