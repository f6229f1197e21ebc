//! The panic handler: report on the emergency console and end the run with
//! [`ExitCode::Panic`](crate::exit::ExitCode::Panic).

use crate::exit::{self, ExitCode};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::console::print_emergency(format_args!(
        "\nmoat: PANIC on cpu{}: {}\n",
        crate::arch::cpu::current_index(),
        info
    ));
    exit::exit(ExitCode::Panic)
}
