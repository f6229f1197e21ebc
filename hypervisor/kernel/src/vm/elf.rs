//! A bounds-checked reader of the ELF64 images guests are loaded from: the file header and the
//! `PT_LOAD` program headers, nothing else.

/// Why an image was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than its headers say.
    Truncated,
    /// Not `\x7fELF`, not 64-bit little-endian, not x86_64, or not an executable.
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
    phoff: usize,
    phnum: usize,
}

fn u16_at(b: &[u8], o: usize) -> Result<u16, ElfError> {
    let s = b.get(o..o + 2).ok_or(ElfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], o: usize) -> Result<u32, ElfError> {
    let s = b.get(o..o + 4).ok_or(ElfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], o: usize) -> Result<u64, ElfError> {
    let s = b.get(o..o + 8).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

const PT_LOAD: u32 = 1;
const PHENT_SIZE: usize = 56;

impl<'a> Elf<'a> {
    /// Checks the file header.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ElfError> {
        let ident = bytes.get(..16).ok_or(ElfError::Truncated)?;
        // class 2 = 64-bit, data 1 = little-endian; type 2 = EXEC; machine 62 = x86_64.
        if &ident[..4] != b"\x7fELF"
            || ident[4] != 2
            || ident[5] != 1
            || u16_at(bytes, 16)? != 2
            || u16_at(bytes, 18)? != 62
        {
            return Err(ElfError::NotX86_64Executable);
        }
        let entry = u64_at(bytes, 24)?;
        let phoff = usize::try_from(u64_at(bytes, 32)?).map_err(|_| ElfError::Truncated)?;
        if usize::from(u16_at(bytes, 54)?) != PHENT_SIZE {
            return Err(ElfError::BadProgramHeaders);
        }
        let phnum = usize::from(u16_at(bytes, 56)?);
        let table_end = phnum
            .checked_mul(PHENT_SIZE)
            .and_then(|n| n.checked_add(phoff))
            .ok_or(ElfError::BadProgramHeaders)?;
        if table_end > bytes.len() {
            return Err(ElfError::Truncated);
        }
        Ok(Elf {
            bytes,
            entry,
            phoff,
            phnum,
        })
    }

    /// The `PT_LOAD` segments, each checked against the file.
    pub fn segments(&self) -> impl Iterator<Item = Result<Segment, ElfError>> + '_ {
        (0..self.phnum).filter_map(move |i| {
            let o = self.phoff + i * PHENT_SIZE;
            let seg = (|| {
                if u32_at(self.bytes, o)? != PT_LOAD {
                    return Ok(None);
                }
                let s = Segment {
                    file_offset: u64_at(self.bytes, o + 8)?,
                    paddr: u64_at(self.bytes, o + 24)?,
                    file_len: u64_at(self.bytes, o + 32)?,
                    mem_len: u64_at(self.bytes, o + 40)?,
                };
                let file_end = s.file_offset.checked_add(s.file_len);
                if s.file_len > s.mem_len
                    || s.paddr.checked_add(s.mem_len).is_none()
                    || file_end.is_none_or(|e| e > self.bytes.len() as u64)
                {
                    return Err(ElfError::BadSegment);
                }
                Ok(Some(s))
            })();
            seg.transpose()
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
