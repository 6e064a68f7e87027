//! A guard in front of candle's PyTorch-checkpoint reader (`candle_core::pickle`), which trusts
//! the file: a string's length, a tensor's shape and its storage are allocated as the file says,
//! and a pickle can copy one object into many (its memo). A checkpoint is checked here first,
//! so a truncated, corrupt or hostile one is an error naming the file (and the tensor), never an
//! allocation sized by an unchecked header, an exhausted memory or a panic:
//!
//! - every `data.pkl` in the zip is read (at most [`MAX_PICKLE`] bytes) and its opcodes walked
//!   as candle's reader walks them: each length must fit in the pickle, and the objects the memo
//!   copies may add up to at most [`COPY_BUDGET`] times the pickle's size;
//! - every tensor's bytes (from its storage offset, its elements in its dtype) must lie in its
//!   storage entry, which must be stored uncompressed (as `torch.save` writes it) and fit in the
//!   file.
//!
//! A panic inside candle's reader that gets past these checks is caught and reported as an error
//! naming the file ([`read`]).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::PthTensors;

use crate::error::{Error, Result};

/// The largest `data.pkl` read (real checkpoints' are well under 1 MiB).
pub const MAX_PICKLE: u64 = 64 << 20;

/// Objects the memo may copy, per byte of pickle (real checkpoints copy a few small ones:
/// classes and shared tuples).
pub const COPY_BUDGET: u64 = 64;

fn corrupt(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::file(path, format!("not a readable PyTorch checkpoint: {msg}"))
}

/// Opens a PyTorch checkpoint (its state dict, or the one under `key`) after checking it.
pub fn read(path: &Path, key: Option<&str>) -> Result<PthTensors> {
    let file_len = std::fs::metadata(path).map_err(|e| Error::file(path, e))?.len();
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| corrupt(path, e))?;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| corrupt(path, e))?;
        let name = entry.name().map_err(|e| corrupt(path, e))?.into_owned();
        if !name.ends_with("data.pkl") {
            continue;
        }
        let mut pickle = Vec::new();
        entry.take(MAX_PICKLE + 1).read_to_end(&mut pickle).map_err(|e| corrupt(path, format!("{name}: {e}")))?;
        if pickle.len() as u64 > MAX_PICKLE {
            return Err(corrupt(path, format!("{name} is larger than {MAX_PICKLE} bytes")));
        }
        check_pickle(&pickle).map_err(|e| corrupt(path, format!("{name}: {e}")))?;
    }
    let pth = std::panic::catch_unwind(|| PthTensors::new(path, key))
        .map_err(|_| corrupt(path, "the reader failed on it"))?
        .map_err(|e| corrupt(path, e))?;
    for (name, info) in pth.tensor_infos() {
        let entry = zip.by_name(&info.path).map_err(|e| corrupt(path, format!("tensor `{name}`: storage {}: {e}", info.path)))?;
        let dims = info.layout.shape().dims();
        let needed = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64))
            // (candle's layout has the storage offset in bytes)
            .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
        let stored = entry.compression() == zip::CompressionMethod::Stored && entry.size() <= file_len;
        if !stored {
            return Err(corrupt(path, format!("tensor `{name}`: its storage {} is compressed or larger than the file", info.path)));
        }
        if needed.is_none_or(|n| n > entry.size()) {
            return Err(corrupt(
                path,
                format!(
                    "tensor `{name}`: shape {dims:?} at byte {} needs more bytes than its storage's {}",
                    info.layout.start_offset(),
                    entry.size()
                ),
            ));
        }
    }
    Ok(pth)
}

/// One stack entry while walking a pickle: an object (how many objects it holds, itself
/// included) or a mark.
#[derive(Clone, Copy)]
enum Item {
    Object(u64),
    Mark,
}

/// Walks a pickle's opcodes as candle's reader does (the opcodes it knows; any other is an
/// error there too), checking that every argument fits and that the memo's copies stay within
/// the budget.
pub fn check_pickle(data: &[u8]) -> std::result::Result<(), String> {
    let budget = (data.len() as u64).saturating_mul(COPY_BUDGET).saturating_add(1 << 16);
    let mut copied: u64 = 0;
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: HashMap<u32, u64> = HashMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let end = at.checked_add(n).filter(|&e| e <= data.len()).ok_or_else(|| format!("truncated at byte {at}"))?;
        let s = &data[*at..end];
        *at = end;
        Ok(s)
    };
    fn pop(stack: &mut Vec<Item>) -> std::result::Result<u64, String> {
        match stack.pop() {
            Some(Item::Object(n)) => Ok(n),
            Some(Item::Mark) => Err("a mark where an object was expected".into()),
            None => Err("the stack is empty".into()),
        }
    }
    fn pop_to_mark(stack: &mut Vec<Item>) -> std::result::Result<u64, String> {
        let mut n = 0u64;
        loop {
            match stack.pop() {
                Some(Item::Object(m)) => n = n.saturating_add(m),
                Some(Item::Mark) => return Ok(n),
                None => return Err("no mark".into()),
            }
        }
    }
    fn grow_top(stack: &mut [Item], by: u64) -> std::result::Result<(), String> {
        match stack.last_mut() {
            Some(Item::Object(n)) => {
                *n = n.saturating_add(by);
                Ok(())
            }
            _ => Err("no object to add to".into()),
        }
    }
    loop {
        let op = take(&mut at, 1)?[0];
        match op {
            0x80 => drop(take(&mut at, 1)?),
            b'c' => {
                for _ in 0..2 {
                    let rest = &data[at..];
                    let line = rest.iter().position(|&b| b == b'\n').ok_or("a GLOBAL without its newline")?;
                    at += line + 1;
                }
                stack.push(Item::Object(1));
            }
            b'q' | b'r' => {
                let id = if op == b'q' { u32::from(take(&mut at, 1)?[0]) } else { u32::from_le_bytes(arr4(take(&mut at, 4)?)) };
                let n = match stack.last() {
                    Some(Item::Object(n)) => *n,
                    _ => return Err("nothing to memoize".into()),
                };
                copied = copied.saturating_add(n);
                memo.insert(id, n);
            }
            b'h' | b'j' => {
                let id = if op == b'h' { u32::from(take(&mut at, 1)?[0]) } else { u32::from_le_bytes(arr4(take(&mut at, 4)?)) };
                let n = *memo.get(&id).ok_or_else(|| format!("memo {id} is not set"))?;
                copied = copied.saturating_add(n);
                stack.push(Item::Object(n));
            }
            b'X' => {
                let len = u32::from_le_bytes(arr4(take(&mut at, 4)?)) as usize;
                std::str::from_utf8(take(&mut at, len)?).map_err(|_| "a string that is not UTF-8")?;
                stack.push(Item::Object(1));
            }
            0x8a => {
                let len = usize::from(take(&mut at, 1)?[0]);
                take(&mut at, len)?;
                stack.push(Item::Object(1));
            }
            // Numbers of a fixed size: BININT, BININT1, BININT2, BINFLOAT.
            b'J' | b'K' | b'M' | b'G' => {
                take(
                    &mut at,
                    match op {
                        b'K' => 1,
                        b'M' => 2,
                        b'J' => 4,
                        _ => 8,
                    },
                )?;
                stack.push(Item::Object(1));
            }
            b')' | b'}' | b'd' | b']' | b'N' | 0x88 | 0x89 => stack.push(Item::Object(1)),
            b'(' => stack.push(Item::Mark),
            b't' => {
                let n = pop_to_mark(&mut stack)?;
                stack.push(Item::Object(n.saturating_add(1)));
            }
            0x85..=0x87 => {
                let mut n = 1u64;
                for _ in 0..(op - 0x84) {
                    n = n.saturating_add(pop(&mut stack)?);
                }
                stack.push(Item::Object(n));
            }
            b'Q' => {
                let n = pop(&mut stack)?;
                stack.push(Item::Object(n.saturating_add(1)));
            }
            b'R' | 0x81 => {
                let (args, callable) = (pop(&mut stack)?, pop(&mut stack)?);
                stack.push(Item::Object(args.saturating_add(callable).saturating_add(1)));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                grow_top(&mut stack, state)?;
            }
            b's' => {
                let (v, k) = (pop(&mut stack)?, pop(&mut stack)?);
                grow_top(&mut stack, v.saturating_add(k))?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                grow_top(&mut stack, v)?;
            }
            b'u' | b'e' => {
                let n = pop_to_mark(&mut stack)?;
                grow_top(&mut stack, n)?;
            }
            b'.' => return Ok(()),
            other => return Err(format!("unsupported opcode 0x{other:02x} at byte {}", at - 1)),
        }
        if copied > budget {
            return Err(format!("its memo copies more than {budget} objects (a pickle bomb?)"));
        }
    }
}

fn arr4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::check_pickle;

    /// Regression (found by the `weights` fuzz target): a string whose length prefix says
    /// 1.7 GB in a pickle of a few hundred bytes made the reader allocate that much.
    #[test]
    fn a_length_past_the_end_is_refused_before_anything_is_allocated() {
        let mut p = vec![0x80, 2, b'X'];
        p.extend_from_slice(&0x6900_0006u32.to_le_bytes());
        p.extend_from_slice(b"abc.");
        assert!(check_pickle(&p).unwrap_err().contains("truncated"));
    }

    /// A memo bomb: a list memoized, then appended copies of itself and memoized again, 40
    /// times (3^40 objects for candle's reader, which copies on every memo put and get).
    #[test]
    fn a_memo_bomb_is_refused() {
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            p.extend_from_slice(&[b'h', 0, b'a', b'h', 0, b'a', b'q', 0]);
        }
        p.push(b'.');
        let e = check_pickle(&p).unwrap_err();
        assert!(e.contains("bomb"), "{e}");
    }

    #[test]
    fn a_small_state_dict_pickle_passes() {
        // {"w": 1, "b": (2, 3)} with a memoized key, as protocol 2 writes it.
        let p = [
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'w', b'q', 1, b'K', 1, b'X', 1, 0, 0, 0, b'b', b'K', 2, b'K', 3, 0x86, b'u',
            b'.',
        ];
        check_pickle(&p).unwrap();
    }
}
