//! The serial console (COM1 through `uart_16550`) and the `log` facade on top of it.
//!
//! Every line is prefixed with a TSC timestamp (seconds since boot, once the TSC is
//! calibrated), the level and the CPU index: `[    0.012345] INFO  cpu0 smp: ...`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use uart_16550::backend::PioBackend;
use uart_16550::Uart16550Tty;

use crate::sync::IrqMutex;

/// COM1; an interrupt-safe lock because interrupt handlers log (the VT-d fault path).
static COM1: IrqMutex<Option<Uart16550Tty<PioBackend>>> = IrqMutex::new(None);
static PRESENT: AtomicBool = AtomicBool::new(false);

/// Initialises COM1 (0x3f8, 115200 8N1). Without a working UART the console stays silent.
pub fn init() {
    // SAFETY: 0x3f8..0x3ff is COM1, used only through this module.
    let uart = unsafe { Uart16550Tty::new_port(0x3f8, uart_16550::Config::default()) };
    if let Ok(u) = uart {
        *COM1.lock() = Some(u);
        PRESENT.store(true, Ordering::SeqCst);
    }
}

/// Writes formatted text to the console.
pub fn print(args: fmt::Arguments<'_>) {
    if !PRESENT.load(Ordering::Relaxed) {
        return;
    }
    if let Some(u) = COM1.lock().as_mut() {
        let _ = u.write_fmt(args);
    }
}

/// Writes formatted text even if another CPU holds the console lock (fatal paths only).
pub fn print_emergency(args: fmt::Arguments<'_>) {
    if !PRESENT.load(Ordering::Relaxed) {
        return;
    }
    if COM1.is_locked() {
        // SAFETY: only used on the way to halting/exiting, where a garbled line is better than
        // a deadlock on a lock whose holder may have faulted.
        unsafe { COM1.force_unlock() };
    }
    print(args);
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let us = crate::arch::tsc::micros_since_boot();
        let target = r.target().strip_prefix("moat::").unwrap_or(r.target());
        print(format_args!(
            "[{:5}.{:06}] {:<5} cpu{} {}: {}\n",
            us / 1_000_000,
            us % 1_000_000,
            r.level(),
            crate::arch::cpu::current_index(),
            target,
            r.args()
        ));
        // Warnings and errors on screen too (machines without a serial port).
        if r.level() <= log::Level::Warn {
            crate::fbcon::line(
                r.level() == log::Level::Warn,
                format_args!("{:<5} {}: {}", r.level(), target, r.args()),
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`.
pub fn init_log(level: log::LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

impl fmt::Write for Emergency {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        print_emergency(format_args!("{s}"));
        Ok(())
    }
}

/// A writer for fatal paths (see [`print_emergency`]).
pub struct Emergency;
