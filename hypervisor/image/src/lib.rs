//! Guest images: the ELF64 executables guests are loaded from, read through the `elf` crate
//! (no_std, no alloc), and the load plan a partition accepts.
//!
//! [`Elf::parse`] checks the file header (magic, version 1, 64-bit little-endian, x86_64,
//! `ET_EXEC`) and that the program header table lies inside the file; [`Elf::segments`] checks
//! each `PT_LOAD` segment against the file. [`Image::load`] adds the partition's rules: every
//! segment inside the loadable range, at least one segment, the entry point inside one. The
//! section headers are never read. Nothing here touches memory: the kernel copies
//! [`Image::segments`] (file bytes from [`Image::data`], the rest zero) into the partition.
//!
//! ```
//! use moat_image::{Image, ImageError};
//! assert_eq!(Image::load(b"not an ELF", 0x10_0000..0x80_0000).err(), Some(ImageError::Truncated));
//! ```
#![forbid(unsafe_code)]
#![no_std]

use core::ops::Range;

use elf::abi::{EI_NIDENT, EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::{parse_ident, Class, FileHeader, ELF64_EHDR_TAILSIZE};
use elf::segment::SegmentTable;
use elf::ParseError;

/// Size of an ELF64 program header.
pub const PHENT_SIZE: usize = 56;

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than its headers say.
    Truncated,
    /// Not `\x7fELF` version 1, not 64-bit little-endian, not x86_64, or not an executable.
    NotX86_64Executable,
    /// A program header table entry size other than 56, or a table size that overflows.
    BadProgramHeaders,
    /// A segment whose file size exceeds its memory size, or whose range overflows or lies
    /// past the end of the file.
    BadSegment,
    /// No loadable segment.
    NoSegments,
    /// A segment falls outside the loadable range of the partition.
    SegmentOutside {
        /// Its guest-physical start.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// The entry point is not inside a loaded segment.
    EntryOutside(u64),
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated => f.write_str("truncated ELF image"),
            Self::NotX86_64Executable => f.write_str("not an x86_64 ELF64 executable"),
            Self::BadProgramHeaders => f.write_str("bad ELF program header table"),
            Self::BadSegment => {
                f.write_str("bad ELF segment (file size > memory size or overflowing range)")
            }
            Self::NoSegments => f.write_str("no loadable ELF segment"),
            Self::SegmentOutside { start, end } => write!(
                f,
                "ELF segment [{start:#x}-{end:#x}) outside the loadable guest memory"
            ),
            Self::EntryOutside(e) => write!(f, "entry point {e:#x} outside the loaded image"),
        }
    }
}

impl From<ParseError> for ImageError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::SliceReadError(_) => Self::Truncated,
            _ => Self::NotX86_64Executable,
        }
    }
}

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical load address (`p_paddr`).
    pub paddr: u64,
    /// Bytes in memory (the tail past `file_len` is zero).
    pub mem_len: u64,
    /// Offset of the bytes in the file.
    pub file_offset: u64,
    /// Bytes in the file.
    pub file_len: u64,
}

impl Segment {
    /// Its guest-physical range (checked not to overflow by [`Elf::segments`]).
    pub fn range(&self) -> Range<u64> {
        self.paddr..self.paddr.saturating_add(self.mem_len)
    }
}

/// A parsed ELF64 image: file header and program header table checked.
pub struct Elf<'a> {
    bytes: &'a [u8],
    /// Entry point.
    pub entry: u64,
    phdrs: SegmentTable<'a, LittleEndian>,
}

impl<'a> Elf<'a> {
    /// Checks the file header and that the program header table lies inside the file. The
    /// section headers are not read: loading needs only the segments.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let ident = bytes.get(..EI_NIDENT).ok_or(ImageError::Truncated)?;
        // Magic, version 1, class, little-endian.
        let ident = parse_ident::<LittleEndian>(ident)?;
        if ident.1 != Class::ELF64 {
            return Err(ImageError::NotX86_64Executable);
        }
        let tail = bytes
            .get(EI_NIDENT..EI_NIDENT + ELF64_EHDR_TAILSIZE)
            .ok_or(ImageError::Truncated)?;
        let h = FileHeader::parse_tail(ident, tail)?;
        if h.e_type != ET_EXEC || h.e_machine != EM_X86_64 {
            return Err(ImageError::NotX86_64Executable);
        }
        if usize::from(h.e_phentsize) != PHENT_SIZE {
            return Err(ImageError::BadProgramHeaders);
        }
        let phoff = usize::try_from(h.e_phoff).map_err(|_| ImageError::Truncated)?;
        let table_end = usize::from(h.e_phnum)
            .checked_mul(PHENT_SIZE)
            .and_then(|n| n.checked_add(phoff))
            .ok_or(ImageError::BadProgramHeaders)?;
        let table = bytes.get(phoff..table_end).ok_or(ImageError::Truncated)?;
        Ok(Elf {
            bytes,
            entry: h.e_entry,
            phdrs: SegmentTable::new(h.endianness, Class::ELF64, table),
        })
    }

    /// The `PT_LOAD` segments, each checked against the file.
    pub fn segments(&self) -> impl Iterator<Item = Result<Segment, ImageError>> + '_ {
        let len = self.bytes.len() as u64;
        self.phdrs
            .iter()
            .filter(|p| p.p_type == PT_LOAD)
            .map(move |p| {
                let s = Segment {
                    file_offset: p.p_offset,
                    paddr: p.p_paddr,
                    file_len: p.p_filesz,
                    mem_len: p.p_memsz,
                };
                let file_end = s.file_offset.checked_add(s.file_len);
                if s.file_len > s.mem_len
                    || s.paddr.checked_add(s.mem_len).is_none()
                    || file_end.is_none_or(|e| e > len)
                {
                    return Err(ImageError::BadSegment);
                }
                Ok(s)
            })
    }

    /// The file bytes of `s` (empty unless `s` came from [`Elf::segments`] of this image).
    pub fn data(&self, s: &Segment) -> &'a [u8] {
        let bytes = self.bytes;
        usize::try_from(s.file_offset)
            .ok()
            .zip(usize::try_from(s.file_len).ok())
            .and_then(|(start, len)| bytes.get(start..start.checked_add(len)?))
            .unwrap_or(&[])
    }
}

/// An image accepted for a partition: every segment checked against the file and inside the
/// loadable range, the entry point inside a segment.
pub struct Image<'a> {
    elf: Elf<'a>,
}

impl<'a> Image<'a> {
    /// Parses `bytes` and checks its segments against the loadable guest-physical range `load`
    /// (the first error in program header order, then no segment, then the entry point).
    /// Segments may overlap: they are copied in program header order, a later one over an
    /// earlier one.
    pub fn load(bytes: &'a [u8], load: Range<u64>) -> Result<Self, ImageError> {
        let elf = Elf::parse(bytes)?;
        let mut any = false;
        let mut entry_ok = false;
        for s in elf.segments() {
            let r = s?.range();
            if r.start < load.start || r.end > load.end {
                return Err(ImageError::SegmentOutside {
                    start: r.start,
                    end: r.end,
                });
            }
            any = true;
            entry_ok |= r.contains(&elf.entry);
        }
        if !any {
            return Err(ImageError::NoSegments);
        }
        if !entry_ok {
            return Err(ImageError::EntryOutside(elf.entry));
        }
        Ok(Image { elf })
    }

    /// Entry point (inside a segment).
    pub fn entry(&self) -> u64 {
        self.elf.entry
    }

    /// The segments to copy, in program header order (all checked by [`Image::load`]).
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        self.elf.segments().flatten()
    }

    /// The file bytes of `s`, to copy at `s.paddr`; the remaining `s.mem_len - data.len()`
    /// bytes are zero.
    pub fn data(&self, s: &Segment) -> &'a [u8] {
        self.elf.data(s)
    }
}
