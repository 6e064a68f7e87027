//! The allocator of the fuzz targets and their replay test: the system allocator, except that
//! one allocation larger than [`CAP`] aborts the process (a finding: an allocation sized by
//! something the input controls, unchecked). The targets' configured limits keep every honest
//! allocation far below it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// The largest single allocation allowed: 256 MiB.
pub const CAP: usize = 256 << 20;

pub struct Capped;

fn check(size: usize) {
    if size > CAP {
        // No allocation here: the message is written piece by piece to unbuffered stderr.
        let mut digits = [0u8; 20];
        let mut n = size;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut err = std::io::stderr();
        let _ = err.write_all(b"flamingo-fuzz: an allocation of ");
        let _ = err.write_all(&digits[i..]);
        let _ = err.write_all(b" bytes, over the 256 MiB cap\n");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; `check` only reads the size.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
