//! The ELF64 images guests are loaded from, read through the `elf` crate (no_std, no alloc):
//! the file header and the `PT_LOAD` program headers, each checked against the file; the
//! section headers are never read.

use elf::abi::{EI_NIDENT, EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::{parse_ident, Class, FileHeader, ELF64_EHDR_TAILSIZE};
use elf::segment::SegmentTable;
use elf::ParseError;

/// Size of an ELF64 program header.
const PHENT_SIZE: usize = 56;

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than its headers say.
    Truncated,
    /// Not `\x7fELF` version 1, not 64-bit little-endian, not x86_64, or not an executable.
    NotX86_64Executable,
    /// A program header table entry size other than 56.
    BadProgramHeaders,
    /// A segment whose file size exceeds its memory size, or whose range overflows.
    BadSegment,
    /// No loadable segment.
    NoSegments,
}

impl core::fmt::Display for ElfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Truncated => "truncated ELF image",
            Self::NotX86_64Executable => "not an x86_64 ELF64 executable",
            Self::BadProgramHeaders => "bad ELF program header table",
            Self::BadSegment => "bad ELF segment (file size > memory size or overflowing range)",
            Self::NoSegments => "no loadable ELF segment",
        })
    }
}

impl From<ParseError> for ElfError {
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

/// A parsed image.
pub struct Elf<'a> {
    bytes: &'a [u8],
    /// Entry point.
    pub entry: u64,
    phdrs: SegmentTable<'a, LittleEndian>,
}

impl<'a> Elf<'a> {
    /// Checks the file header and that the program header table lies inside the file. The
    /// section headers are not read: loading needs only the segments.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let ident = bytes.get(..EI_NIDENT).ok_or(ElfError::Truncated)?;
        // Magic, version 1, class, little-endian.
        let ident = parse_ident::<LittleEndian>(ident)?;
        if ident.1 != Class::ELF64 {
            return Err(ElfError::NotX86_64Executable);
        }
        let tail = bytes
            .get(EI_NIDENT..EI_NIDENT + ELF64_EHDR_TAILSIZE)
            .ok_or(ElfError::Truncated)?;
        let h = FileHeader::parse_tail(ident, tail)?;
        if h.e_type != ET_EXEC || h.e_machine != EM_X86_64 {
            return Err(ElfError::NotX86_64Executable);
        }
        if usize::from(h.e_phentsize) != PHENT_SIZE {
            return Err(ElfError::BadProgramHeaders);
        }
        let phoff = usize::try_from(h.e_phoff).map_err(|_| ElfError::Truncated)?;
        let table_end = usize::from(h.e_phnum)
            .checked_mul(PHENT_SIZE)
            .and_then(|n| n.checked_add(phoff))
            .ok_or(ElfError::BadProgramHeaders)?;
        let table = bytes.get(phoff..table_end).ok_or(ElfError::Truncated)?;
        Ok(Elf {
            bytes,
            entry: h.e_entry,
            phdrs: SegmentTable::new(h.endianness, Class::ELF64, table),
        })
    }

    /// The `PT_LOAD` segments, each checked against the file.
    pub fn segments(&self) -> impl Iterator<Item = Result<Segment, ElfError>> + '_ {
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
                    return Err(ElfError::BadSegment);
                }
                Ok(s)
            })
    }

    /// The file bytes of `s` (checked by [`Elf::segments`]).
    pub fn data(&self, s: &Segment) -> &'a [u8] {
        let start = s.file_offset as usize;
        self.bytes
            .get(start..start + s.file_len as usize)
            .unwrap_or(&[])
    }
}
