//! Text on a linear framebuffer, for machines without a serial port: the hypervisor mirrors
//! its warnings, errors and final result there (the multiboot2 framebuffer tag gives the
//! mode).
//!
//! - [`Format`]: a direct-colour 32-bit pixel format (8-bit red, green, blue at any byte
//!   position), checked once; colours are packed for it.
//! - [`Surface`]: where pixels go (the kernel's is the mapped framebuffer; tests use memory).
//! - [`TextGrid`]: 8x8 glyphs (the public-domain `font8x8` basic set, printable ASCII; any
//!   other byte is drawn as `?`) in cells of [`CELL_W`] x [`CELL_H`] pixels, a cursor, line
//!   wrap at the right edge, and at the bottom a wrap to the top row (each row is cleared
//!   before it is written, so the newest lines are always readable; there is no scrolling,
//!   which would read back the framebuffer, slow on real video memory).
#![no_std]
#![forbid(unsafe_code)]

/// Glyph cell width in pixels.
pub const CELL_W: u32 = 8;
/// Glyph cell height in pixels (8 font rows and 2 blank rows between lines).
pub const CELL_H: u32 = 10;

/// A direct-colour pixel format with 32 bits per pixel and 8 bits per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    red: u8,
    green: u8,
    blue: u8,
}

/// Why a framebuffer mode cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatError {
    /// Not 32 bits per pixel.
    Depth(u8),
    /// A channel is not 8 bits wide at a byte boundary within the pixel.
    Channel,
    /// Smaller than one text cell, or a pitch shorter than a line of pixels.
    Geometry,
}

impl Format {
    /// The format with red, green and blue at bit `(position, size)` each, for `bpp` bits
    /// per pixel.
    pub const fn new(
        bpp: u8,
        red: (u8, u8),
        green: (u8, u8),
        blue: (u8, u8),
    ) -> Result<Format, FormatError> {
        if bpp != 32 {
            return Err(FormatError::Depth(bpp));
        }
        if !byte_channel(red) || !byte_channel(green) || !byte_channel(blue) {
            return Err(FormatError::Channel);
        }
        Ok(Format {
            red: red.0,
            green: green.0,
            blue: blue.0,
        })
    }

    /// The pixel value of colour `(r, g, b)`.
    pub const fn pack(self, r: u8, g: u8, b: u8) -> u32 {
        (r as u32) << self.red | (g as u32) << self.green | (b as u32) << self.blue
    }
}

/// An 8-bit channel on a byte boundary of a 32-bit pixel.
const fn byte_channel(c: (u8, u8)) -> bool {
    c.1 == 8 && c.0.is_multiple_of(8) && c.0 <= 24
}

/// Where pixels are written: a `width` x `height` grid of 32-bit pixels.
pub trait Surface {
    /// Pixels per line.
    fn width(&self) -> u32;
    /// Lines.
    fn height(&self) -> u32;
    /// Writes pixel `(x, y)` (inside the surface: the grid never writes outside).
    fn put(&mut self, x: u32, y: u32, pixel: u32);
}

/// The 8 rows of `byte`'s glyph (bit 0 of each row is the leftmost pixel); `?` for anything
/// that is not printable ASCII.
pub fn glyph(byte: u8) -> [u8; 8] {
    let b = if (0x20..0x7f).contains(&byte) {
        byte
    } else {
        b'?'
    };
    font8x8::legacy::BASIC_LEGACY[b as usize]
}

/// The character drawn in cell `(col, row)` in foreground `fg`, read back through `pixel(x,
/// y)`: the printable ASCII byte whose glyph matches exactly, or `None`.
pub fn read_cell(pixel: impl Fn(u32, u32) -> u32, col: u32, row: u32, fg: u32) -> Option<u8> {
    let mut rows = [0u8; 8];
    for (dy, bits) in rows.iter_mut().enumerate() {
        for dx in 0..8 {
            if pixel(col * CELL_W + dx, row * CELL_H + dy as u32) == fg {
                *bits |= 1 << dx;
            }
        }
    }
    (0x20u8..0x7f).find(|&b| glyph(b) == rows)
}

/// A text grid over a [`Surface`].
pub struct TextGrid<S: Surface> {
    surface: S,
    cols: u32,
    rows: u32,
    col: u32,
    row: u32,
    fg: u32,
    bg: u32,
    /// Whether the current row was cleared since the cursor entered it.
    fresh: bool,
}

impl<S: Surface> TextGrid<S> {
    /// A grid over `surface` drawing `fg` on `bg` (packed pixels), the cursor at the top
    /// left. `Err(Geometry)` when not one cell fits.
    pub fn new(surface: S, fg: u32, bg: u32) -> Result<Self, FormatError> {
        let (cols, rows) = (surface.width() / CELL_W, surface.height() / CELL_H);
        if cols == 0 || rows == 0 {
            return Err(FormatError::Geometry);
        }
        Ok(TextGrid {
            surface,
            cols,
            rows,
            col: 0,
            row: 0,
            fg,
            bg,
            fresh: false,
        })
    }

    /// Columns and rows of text.
    pub fn size(&self) -> (u32, u32) {
        (self.cols, self.rows)
    }

    /// The cursor (column, row).
    pub fn cursor(&self) -> (u32, u32) {
        (self.col, self.row)
    }

    /// Sets the foreground colour (packed) for what follows.
    pub fn set_fg(&mut self, fg: u32) {
        self.fg = fg;
    }

    /// The surface (tests read it back).
    pub fn surface(&self) -> &S {
        &self.surface
    }

    fn clear_row(&mut self) {
        let y0 = self.row * CELL_H;
        for y in y0..y0 + CELL_H {
            for x in 0..self.cols * CELL_W {
                self.surface.put(x, y, self.bg);
            }
        }
        self.fresh = true;
    }

    fn newline(&mut self) {
        self.col = 0;
        self.row = (self.row + 1) % self.rows;
        self.fresh = false;
    }

    /// Draws `byte` at the cursor and advances it (`\n`: next line; `\r`: ignored).
    pub fn put_byte(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                if !self.fresh {
                    self.clear_row();
                }
                self.newline();
                return;
            }
            b'\r' => return,
            _ => {}
        }
        if !self.fresh {
            self.clear_row();
        }
        let g = glyph(byte);
        let (x0, y0) = (self.col * CELL_W, self.row * CELL_H);
        for (dy, bits) in g.iter().enumerate() {
            for dx in 0..8 {
                let on = bits >> dx & 1 != 0;
                self.surface
                    .put(x0 + dx, y0 + dy as u32, if on { self.fg } else { self.bg });
            }
        }
        self.col += 1;
        if self.col == self.cols {
            self.newline();
        }
    }
}

impl<S: Surface> core::fmt::Write for TextGrid<S> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            self.put_byte(b);
        }
        Ok(())
    }
}
