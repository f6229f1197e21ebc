//! Little-endian field reads that never panic.
//!
//! Every structure is length-checked before its fields are read, so these helpers
//! are only ever called in bounds; should a caller get it wrong they return 0
//! instead of panicking or reading out of bounds.

/// Reads a `u8` at `off`, or 0 when out of bounds.
pub(crate) fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// Reads `N` bytes at `off`, or `None` when out of bounds.
fn array_at<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..)?.get(..N)?.try_into().ok()
}

/// Reads a little-endian `u16` at `off`, or 0 when out of bounds.
pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    array_at(b, off).map_or(0, u16::from_le_bytes)
}

/// Reads a little-endian `u32` at `off`, or 0 when out of bounds.
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    array_at(b, off).map_or(0, u32::from_le_bytes)
}

/// Reads a little-endian `u64` at `off`, or 0 when out of bounds.
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    array_at(b, off).map_or(0, u64::from_le_bytes)
}

/// Copies `N` bytes at `off`, or zeroes when out of bounds.
pub(crate) fn bytes_at<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    array_at(b, off).unwrap_or([0; N])
}

/// One step of a walk over length-prefixed records that ends at the first error.
///
/// `split` checks the record at the front of `bytes` (at table offset `offset`) and returns
/// it with the bytes after it; the walk then moves past it. On an error `bytes` is emptied,
/// so the next step ends the walk: every step consumes at least one byte or ends.
pub(crate) fn next_record<'a, T, E>(
    bytes: &mut &'a [u8],
    offset: &mut usize,
    split: impl FnOnce(&'a [u8], usize) -> Result<(T, &'a [u8]), E>,
) -> Option<Result<T, E>> {
    if bytes.is_empty() {
        return None;
    }
    Some(match split(bytes, *offset) {
        Ok((record, rest)) => {
            *offset += bytes.len() - rest.len();
            *bytes = rest;
            Ok(record)
        }
        Err(e) => {
            *bytes = &[];
            Err(e)
        }
    })
}
