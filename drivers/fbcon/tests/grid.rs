//! The text grid against an in-memory surface.

use core::fmt::Write;
use moat_fbcon::{glyph, Format, FormatError, Surface, TextGrid, CELL_H, CELL_W};
use proptest::prelude::*;

struct Mem {
    w: u32,
    h: u32,
    px: Vec<u32>,
}

impl Mem {
    fn new(w: u32, h: u32) -> Self {
        Mem {
            w,
            h,
            px: vec![0xdead_beef; (w * h) as usize],
        }
    }
    fn at(&self, x: u32, y: u32) -> u32 {
        self.px[(y * self.w + x) as usize]
    }
}

impl Surface for Mem {
    fn width(&self) -> u32 {
        self.w
    }
    fn height(&self) -> u32 {
        self.h
    }
    fn put(&mut self, x: u32, y: u32, pixel: u32) {
        assert!(
            x < self.w && y < self.h,
            "write outside the surface at ({x}, {y})"
        );
        self.px[(y * self.w + x) as usize] = pixel;
    }
}

const FG: u32 = 0x00ff_ffff;
const BG: u32 = 0x0000_0000;

/// The glyph read back from cell (col, row): 8 rows, bit 0 the leftmost pixel.
fn read_cell(m: &Mem, col: u32, row: u32) -> [u8; 8] {
    let mut g = [0u8; 8];
    for (dy, bits) in g.iter_mut().enumerate() {
        for dx in 0..8 {
            let p = m.at(col * CELL_W + dx, row * CELL_H + dy as u32);
            assert!(p == FG || p == BG, "pixel {p:#x} neither colour");
            if p == FG {
                *bits |= 1 << dx;
            }
        }
    }
    g
}

#[test]
fn formats() {
    let f = Format::new(32, (16, 8), (8, 8), (0, 8)).unwrap();
    assert_eq!(f.pack(0x12, 0x34, 0x56), 0x0012_3456);
    let bgr = Format::new(32, (0, 8), (8, 8), (16, 8)).unwrap();
    assert_eq!(bgr.pack(0x12, 0x34, 0x56), 0x0056_3412);
    assert_eq!(
        Format::new(24, (16, 8), (8, 8), (0, 8)),
        Err(FormatError::Depth(24))
    );
    assert_eq!(
        Format::new(32, (11, 5), (5, 6), (0, 5)),
        Err(FormatError::Channel)
    );
}

#[test]
fn glyphs_are_the_font_and_unknown_bytes_are_a_question_mark() {
    assert_eq!(glyph(b' '), [0; 8]);
    assert_ne!(glyph(b'A'), [0; 8]);
    assert_ne!(glyph(b'A'), glyph(b'B'));
    assert_eq!(glyph(0x01), glyph(b'?'));
    assert_eq!(glyph(0xc3), glyph(b'?'));
}

#[test]
fn text_lands_in_its_cells_and_wraps() {
    let mut t = TextGrid::new(Mem::new(4 * CELL_W + 3, 2 * CELL_H + 5), FG, BG).unwrap();
    assert_eq!(t.size(), (4, 2));
    write!(t, "ERROR\nok").unwrap();
    let m = t.surface();
    // "ERRO" fills row 0, "R" wrapped to row 1, then the newline wrapped to row 0 again,
    // which was cleared before "ok" was written.
    assert_eq!(read_cell(m, 0, 0), glyph(b'o'));
    assert_eq!(read_cell(m, 1, 0), glyph(b'k'));
    assert_eq!(read_cell(m, 2, 0), [0; 8]);
    assert_eq!(read_cell(m, 0, 1), glyph(b'R'));
    assert_eq!(t.cursor(), (2, 0));
    // Pixels right of the last column and below the last row are never touched.
    assert_eq!(m.at(4 * CELL_W, 0), 0xdead_beef);
    assert_eq!(m.at(0, 2 * CELL_H), 0xdead_beef);
}

#[test]
fn text_reads_back() {
    let mut t = TextGrid::new(Mem::new(40 * CELL_W, 3 * CELL_H), FG, BG).unwrap();
    write!(t, "x\nmoat: exit Success (code 0x10)").unwrap();
    let m = t.surface();
    let line: String = (0..40)
        .map_while(|c| moat_fbcon::read_cell(|x, y| m.at(x, y), c, 1, FG))
        .map(char::from)
        .collect();
    assert_eq!(line.trim_end(), "moat: exit Success (code 0x10)");
}

#[test]
fn too_small_is_refused() {
    assert!(TextGrid::new(Mem::new(7, 100), FG, BG).is_err());
    assert!(TextGrid::new(Mem::new(100, CELL_H - 1), FG, BG).is_err());
}

proptest! {
    /// Any text on any grid: never a write outside the surface, and the last character
    /// written is read back from the cell before the cursor.
    #[test]
    fn any_text_stays_inside(w in 8u32..200, h in 10u32..120, text in proptest::collection::vec(any::<u8>(), 1..400)) {
        let mut t = TextGrid::new(Mem::new(w, h), FG, BG).unwrap();
        for &b in &text {
            t.put_byte(b);
        }
        let last = *text.last().unwrap();
        if last != b'\n' && last != b'\r' {
            let (cols, rows) = t.size();
            let (c, r) = t.cursor();
            let (pc, pr) = if c == 0 { (cols - 1, (r + rows - 1) % rows) } else { (c - 1, r) };
            prop_assert_eq!(read_cell(t.surface(), pc, pr), glyph(last));
        }
    }
}
