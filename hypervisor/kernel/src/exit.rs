//! How a run of the hypervisor ends: on QEMU through `isa-debug-exit` (port 0xf4, QEMU exits
//! with `(code << 1) | 1`), elsewhere by halting.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::x86;

/// Exit codes written to `isa-debug-exit`. QEMU's process status is `(code << 1) | 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Everything the run was asked to do succeeded (QEMU status 33).
    Success = 0x10,
    /// A check failed (QEMU status 35).
    Failure = 0x11,
    /// The hypervisor panicked (QEMU status 37).
    Panic = 0x12,
    /// An unexpected CPU exception in the hypervisor (QEMU status 39).
    Exception = 0x13,
}

static QEMU_EXIT: AtomicBool = AtomicBool::new(false);

/// Chooses whether [`exit`] leaves QEMU through `isa-debug-exit` (`exit=qemu`).
pub fn set_qemu_exit(on: bool) {
    QEMU_EXIT.store(on, Ordering::SeqCst);
}

/// Ends the run. Never returns.
pub fn exit(code: ExitCode) -> ! {
    let read_back = crate::fbcon::result_line(format_args!(
        "moat: exit {:?} (code {:#x})",
        code, code as u32
    ));
    if let Some(text) = read_back {
        crate::println!("fbcon: result line read back from the framebuffer: `{text}`");
    }
    crate::println!("moat: exit {:?} (code {:#x})", code, code as u32);
    if QEMU_EXIT.load(Ordering::SeqCst) {
        // SAFETY: port 0xf4 is QEMU's isa-debug-exit, configured by the runner; exit=qemu is
        // only given when running under it.
        unsafe { x86::outl(0xf4, code as u32) };
    }
    crate::println!("moat: halted");
    x86::halt_forever()
}
