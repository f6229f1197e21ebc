//! The framebuffer console: on a machine without a serial port the loader's linear
//! framebuffer (multiboot2 framebuffer tag, direct colour, 32 bpp) shows the warnings, the
//! errors and the run's result line. Drawn by `moat-fbcon`; writes never wait for the lock
//! (a line another CPU is drawing meanwhile is skipped: the serial log has every line).

use core::fmt;

use moat_fbcon::{Format, Surface, TextGrid};

use crate::sync::IrqMutex;

/// The mapped framebuffer.
struct Vram {
    base: u64,
    pitch: u32,
    width: u32,
    height: u32,
}

impl Vram {
    fn at(&self, x: u32, y: u32) -> *mut u32 {
        (self.base + u64::from(y) * u64::from(self.pitch) + u64::from(x) * 4) as *mut u32
    }

    fn get(&self, x: u32, y: u32) -> u32 {
        // SAFETY: (x, y) lies inside the framebuffer (the grid reads only its own cells),
        // which `init` mapped uncached and owns from then on.
        unsafe { core::ptr::read_volatile(self.at(x, y)) }
    }
}

impl Surface for Vram {
    fn width(&self) -> u32 {
        self.width
    }
    fn height(&self) -> u32 {
        self.height
    }
    fn put(&mut self, x: u32, y: u32, pixel: u32) {
        // SAFETY: as in `get`; the grid writes only inside its width and height.
        unsafe { core::ptr::write_volatile(self.at(x, y), pixel) }
    }
}

/// The console and the foreground colours it uses: (warning, error/result).
static FB: IrqMutex<Option<(TextGrid<Vram>, u32, u32)>> = IrqMutex::new(None);

/// Takes the loader's framebuffer, if it is a 32-bpp direct-colour one, and says so.
pub fn init(fb: Option<moat_boot::Framebuffer>) {
    let Some(fb) = fb else {
        log::info!("fbcon: no direct-colour framebuffer from the loader: serial console only");
        return;
    };
    let format = match Format::new(fb.bpp, fb.red, fb.green, fb.blue) {
        Ok(f) => f,
        Err(e) => {
            log::info!(
                "fbcon: framebuffer {}x{} {} bpp not usable ({e:?}): serial console only",
                fb.width,
                fb.height,
                fb.bpp
            );
            return;
        }
    };
    if u64::from(fb.pitch) < u64::from(fb.width) * 4 {
        log::warn!(
            "fbcon: framebuffer pitch {} shorter than a line: not used",
            fb.pitch
        );
        return;
    }
    let len = u64::from(fb.pitch) * u64::from(fb.height);
    if let Err(e) = crate::mm::space::map_mmio(crate::mm::PhysAddr::new(fb.address), len) {
        log::warn!(
            "fbcon: cannot map the framebuffer at {:#x}: {e:?}",
            fb.address
        );
        return;
    }
    let vram = Vram {
        base: fb.address,
        pitch: fb.pitch,
        width: fb.width,
        height: fb.height,
    };
    let (warn, error) = (format.pack(0xff, 0xd0, 0x40), format.pack(0xff, 0xff, 0xff));
    let Ok(grid) = TextGrid::new(vram, error, format.pack(0x10, 0x10, 0x40)) else {
        return;
    };
    let (cols, rows) = grid.size();
    *FB.lock() = Some((grid, warn, error));
    log::info!(
        "fbcon: {}x{} framebuffer at {:#x} ({cols}x{rows} characters): warnings, errors and the result are shown there",
        fb.width,
        fb.height,
        fb.address
    );
}

/// Draws a line (a warning when `warning`, else an error or the result), if there is a
/// framebuffer console and nobody else is drawing.
pub fn line(warning: bool, args: fmt::Arguments<'_>) {
    let Some(mut g) = FB.try_lock() else {
        return;
    };
    if let Some((grid, warn, error)) = g.as_mut() {
        grid.set_fg(if warning { *warn } else { *error });
        let _ = fmt::Write::write_fmt(grid, format_args!("{args}\n"));
    }
}

/// Draws the run's result line and reads it back from video memory: the line as decoded
/// from the framebuffer's pixels (None without a framebuffer console).
pub fn result_line(args: fmt::Arguments<'_>) -> Option<alloc::string::String> {
    let mut g = FB.try_lock()?;
    let (grid, _, error) = g.as_mut()?;
    grid.set_fg(*error);
    let (_, row) = grid.cursor();
    let _ = fmt::Write::write_fmt(grid, format_args!("{args}\n"));
    let (cols, _) = grid.size();
    let vram = grid.surface();
    let text: alloc::string::String = (0..cols)
        .map_while(|c| moat_fbcon::read_cell(|x, y| vram.get(x, y), c, row, *error))
        .map(char::from)
        .collect();
    Some(alloc::string::String::from(text.trim_end()))
}
