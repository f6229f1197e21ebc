//! Images built byte by byte: a valid one, and each way a malformed one is refused.

use moat_image::{Elf, Image, ImageError, Segment, PHENT_SIZE};
use proptest::prelude::*;

const LOAD: core::ops::Range<u64> = 0x10_0000..0x7f_0000;

/// One program header to emit.
#[derive(Clone, Copy)]
struct Ph {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn load(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Ph {
    Ph {
        kind: 1,
        offset,
        paddr,
        filesz,
        memsz,
    }
}

/// An ELF64 image builder: header fields and program headers, then file bytes.
struct Builder {
    class: u8,
    data: u8,
    ident_version: u8,
    kind: u16,
    machine: u16,
    entry: u64,
    phoff: u64,
    phentsize: u16,
    phnum: Option<u16>,
    phdrs: Vec<Ph>,
    len: usize,
}

impl Builder {
    /// A valid image: one segment of 0x100 file bytes (0x200 in memory) at 0x20_0000.
    fn new() -> Self {
        Builder {
            class: 2,
            data: 1,
            ident_version: 1,
            kind: 2,
            machine: 62,
            entry: 0x20_0010,
            phoff: 64,
            phentsize: PHENT_SIZE as u16,
            phnum: None,
            phdrs: vec![load(0x1000, 0x20_0000, 0x100, 0x200)],
            len: 0x1100,
        }
    }

    fn build(&self) -> Vec<u8> {
        let phnum = self.phnum.unwrap_or(self.phdrs.len() as u16);
        let mut b = vec![0u8; self.len.max(64 + self.phdrs.len() * PHENT_SIZE)];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = self.class;
        b[5] = self.data;
        b[6] = self.ident_version;
        b[16..18].copy_from_slice(&self.kind.to_le_bytes());
        b[18..20].copy_from_slice(&self.machine.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&self.entry.to_le_bytes());
        b[32..40].copy_from_slice(&self.phoff.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&self.phentsize.to_le_bytes());
        b[56..58].copy_from_slice(&phnum.to_le_bytes());
        for (i, p) in self.phdrs.iter().enumerate() {
            let at = 64 + i * PHENT_SIZE;
            let h = &mut b[at..at + PHENT_SIZE];
            h[0..4].copy_from_slice(&p.kind.to_le_bytes());
            h[4..8].copy_from_slice(&5u32.to_le_bytes());
            h[8..16].copy_from_slice(&p.offset.to_le_bytes());
            h[16..24].copy_from_slice(&p.paddr.to_le_bytes());
            h[24..32].copy_from_slice(&p.paddr.to_le_bytes());
            h[32..40].copy_from_slice(&p.filesz.to_le_bytes());
            h[40..48].copy_from_slice(&p.memsz.to_le_bytes());
            h[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        // Recognisable segment bytes.
        for (i, x) in b.iter_mut().enumerate().skip(0x1000) {
            *x = i as u8;
        }
        b
    }

    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

fn refused(b: Builder) -> ImageError {
    Image::load(&b.build(), LOAD).err().expect("image accepted")
}

#[test]
fn valid_image_gives_its_segments_entry_and_bytes() {
    let bytes = Builder::new().build();
    let image = Image::load(&bytes, LOAD).unwrap();
    assert_eq!(image.entry(), 0x20_0010);
    let segs: Vec<Segment> = image.segments().collect();
    assert_eq!(
        segs,
        [Segment {
            paddr: 0x20_0000,
            mem_len: 0x200,
            file_offset: 0x1000,
            file_len: 0x100,
        }]
    );
    assert_eq!(segs[0].range(), 0x20_0000..0x20_0200);
    assert_eq!(image.data(&segs[0]), &bytes[0x1000..0x1100]);
}

#[test]
fn non_load_segments_are_skipped() {
    let b = Builder::new().with(|b| {
        b.phdrs.insert(
            0,
            Ph {
                kind: 4,
                ..load(0, 0, 0x10, 0x10)
            },
        ); // PT_NOTE at GPA 0
        b.phdrs.push(load(0x1000, 0x30_0000, 0, 0x1000)); // bss only
    });
    let bytes = b.build();
    let image = Image::load(&bytes, LOAD).unwrap();
    let segs: Vec<Segment> = image.segments().collect();
    assert_eq!(segs.len(), 2);
    assert_eq!(image.data(&segs[1]), &[] as &[u8]);
}

#[test]
fn segments_at_the_bounds_of_the_loadable_range_are_accepted() {
    let b = Builder::new().with(|b| {
        b.phdrs = vec![
            load(0x1000, LOAD.start, 0x10, 0x10),
            load(0x1000, LOAD.end - 0x10, 0x10, 0x10),
        ];
        b.entry = LOAD.end - 1;
    });
    assert!(Image::load(&b.build(), LOAD).is_ok());
}

#[test]
fn overlapping_segments_are_accepted_in_order() {
    // Today's behaviour: copied in program header order, the later one over the earlier one.
    let b = Builder::new().with(|b| b.phdrs.push(load(0x1080, 0x20_0100, 0x80, 0x100)));
    let bytes = b.build();
    let image = Image::load(&bytes, LOAD).unwrap();
    let starts: Vec<u64> = image.segments().map(|s| s.paddr).collect();
    assert_eq!(starts, [0x20_0000, 0x20_0100]);
}

#[test]
fn truncated_images_are_refused() {
    let bytes = Builder::new().build();
    for len in [0, 4, 15, 16, 63] {
        assert_eq!(
            Elf::parse(&bytes[..len]).err(),
            Some(ImageError::Truncated),
            "{len}"
        );
    }
    // Header complete, program header table cut.
    assert_eq!(
        Elf::parse(&bytes[..64 + 10]).err(),
        Some(ImageError::Truncated)
    );
    // Program headers complete, segment bytes cut.
    assert_eq!(
        Image::load(&bytes[..0x1080], LOAD).err(),
        Some(ImageError::BadSegment)
    );
    // Program header table past the end of the file.
    assert_eq!(
        refused(Builder::new().with(|b| b.phoff = 0x2000)),
        ImageError::Truncated
    );
    assert_eq!(
        refused(Builder::new().with(|b| b.phoff = u64::MAX)),
        ImageError::BadProgramHeaders
    );
}

#[test]
fn other_kinds_of_file_are_refused() {
    let not = ImageError::NotX86_64Executable;
    let mut magic = Builder::new().build();
    magic[1] = b'e';
    assert_eq!(Image::load(&magic, LOAD).err(), Some(not));
    assert_eq!(refused(Builder::new().with(|b| b.class = 1)), not, "ELF32");
    assert_eq!(refused(Builder::new().with(|b| b.class = 3)), not);
    assert_eq!(
        refused(Builder::new().with(|b| b.data = 2)),
        not,
        "big-endian"
    );
    assert_eq!(refused(Builder::new().with(|b| b.ident_version = 0)), not);
    assert_eq!(refused(Builder::new().with(|b| b.ident_version = 2)), not);
    assert_eq!(refused(Builder::new().with(|b| b.kind = 3)), not, "ET_DYN");
    assert_eq!(refused(Builder::new().with(|b| b.kind = 1)), not, "ET_REL");
    assert_eq!(refused(Builder::new().with(|b| b.machine = 3)), not, "i386");
    assert_eq!(
        refused(Builder::new().with(|b| b.machine = 183)),
        not,
        "aarch64"
    );
}

#[test]
fn bad_program_header_tables_are_refused() {
    assert_eq!(
        refused(Builder::new().with(|b| b.phentsize = 32)),
        ImageError::BadProgramHeaders
    );
    assert_eq!(
        refused(Builder::new().with(|b| b.phnum = Some(u16::MAX))),
        ImageError::Truncated
    );
    // No program headers at all: nothing to load.
    assert_eq!(
        refused(Builder::new().with(|b| b.phdrs.clear())),
        ImageError::NoSegments
    );
}

#[test]
fn bad_segments_are_refused() {
    let bad = ImageError::BadSegment;
    let seg = |p: Ph| refused(Builder::new().with(|b| b.phdrs = vec![p]));
    assert_eq!(
        seg(load(0x1000, 0x20_0000, 0x100, 0x80)),
        bad,
        "filesz > memsz"
    );
    assert_eq!(
        seg(load(0x1000, 0x20_0000, 0x200, 0x200)),
        bad,
        "past the file"
    );
    assert_eq!(
        seg(load(u64::MAX, 0x20_0000, 1, 1)),
        bad,
        "offset overflows"
    );
    assert_eq!(
        seg(load(0x1000, u64::MAX - 8, 0, 0x10)),
        bad,
        "range overflows"
    );
    assert_eq!(seg(load(0x1000, 0x20_0000, u64::MAX, u64::MAX)), bad);
    // The first bad segment is reported even after a good one.
    let b = Builder::new().with(|b| b.phdrs.push(load(0x1000, 0x30_0000, 2, 1)));
    assert_eq!(refused(b), bad);
}

#[test]
fn segments_outside_the_partition_are_refused() {
    let outside = |paddr: u64, memsz: u64| {
        refused(Builder::new().with(|b| {
            b.phdrs = vec![load(0x1000, paddr, 0, memsz)];
            b.entry = paddr;
        }))
    };
    assert_eq!(
        outside(0, 0x1000),
        ImageError::SegmentOutside {
            start: 0,
            end: 0x1000
        }
    );
    assert_eq!(
        outside(LOAD.start - 1, 0x10),
        ImageError::SegmentOutside {
            start: LOAD.start - 1,
            end: LOAD.start + 0xf
        }
    );
    assert_eq!(
        outside(LOAD.end - 0x10, 0x11),
        ImageError::SegmentOutside {
            start: LOAD.end - 0x10,
            end: LOAD.end + 1
        }
    );
    // An empty segment at the very end is inside, but no entry point can be in it.
    assert_eq!(outside(LOAD.end, 0), ImageError::EntryOutside(LOAD.end));
}

#[test]
fn entry_outside_every_segment_is_refused() {
    for entry in [0, 0x1f_ffff, 0x20_0200, u64::MAX] {
        assert_eq!(
            refused(Builder::new().with(|b| b.entry = entry)),
            ImageError::EntryOutside(entry)
        );
    }
    // Inside the second segment is enough.
    let b = Builder::new().with(|b| {
        b.phdrs.push(load(0x1000, 0x30_0000, 0, 0x100));
        b.entry = 0x30_00ff;
    });
    assert!(Image::load(&b.build(), LOAD).is_ok());
}

#[test]
fn errors_read_clearly() {
    assert_eq!(ImageError::Truncated.to_string(), "truncated ELF image");
    assert_eq!(
        ImageError::SegmentOutside {
            start: 0x1000,
            end: 0x2000
        }
        .to_string(),
        "ELF segment [0x1000-0x2000) outside the loadable guest memory"
    );
    assert_eq!(
        ImageError::EntryOutside(0x42).to_string(),
        "entry point 0x42 outside the loaded image"
    );
}

proptest! {
    /// Whatever bytes are changed, parsing and loading never panic, and an accepted image
    /// keeps every promise: segments inside the file and the range, the entry in one.
    #[test]
    fn mutations_never_panic(
        edits in prop::collection::vec((0usize..0x1100, any::<u8>()), 0..16),
        cut in 0usize..=0x1100,
    ) {
        let mut bytes = Builder::new().with(|b| {
            b.phdrs.push(load(0x1080, 0x30_0000, 0x80, 0x1000));
        }).build();
        for (at, v) in edits {
            bytes[at] = v;
        }
        bytes.truncate(cut);
        if let Ok(elf) = Elf::parse(&bytes) {
            for s in elf.segments().flatten() {
                prop_assert_eq!(elf.data(&s).len() as u64, s.file_len);
            }
        }
        if let Ok(image) = Image::load(&bytes, LOAD) {
            let mut entry_ok = false;
            for s in image.segments() {
                prop_assert!(s.file_len <= s.mem_len);
                prop_assert!(s.range().start >= LOAD.start && s.range().end <= LOAD.end);
                prop_assert_eq!(image.data(&s).len() as u64, s.file_len);
                entry_ok |= s.range().contains(&image.entry());
            }
            prop_assert!(entry_ok);
        }
    }

    /// Random header fields in an otherwise valid image never panic.
    #[test]
    fn random_program_headers_never_panic(
        offset in any::<u64>(), paddr in any::<u64>(), filesz in any::<u64>(),
        memsz in any::<u64>(), entry in any::<u64>(), phoff in any::<u64>(), phnum in any::<u16>(),
    ) {
        let b = Builder::new().with(|b| {
            b.phdrs = vec![load(offset, paddr, filesz, memsz)];
            b.entry = entry;
        });
        let _ = Image::load(&b.build(), LOAD);
        let b = b.with(|b| { b.phoff = phoff; b.phnum = Some(phnum); });
        let _ = Image::load(&b.build(), LOAD);
    }
}
