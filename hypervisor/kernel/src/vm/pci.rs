//! PCI configuration filtering for guests: the guest's `0xCF8`/`0xCFC` accesses (intercepted)
//! reach only the functions assigned to it, at their real BDF. The rules (what the guest reads
//! and may write, BAR sizing, the `0xCF8` decoding) are `moat_pci`'s filter, host-tested; this
//! is the glue to the ECAM windows, the guest's address latch and its device list.

use core::sync::atomic::{AtomicU32, Ordering};

pub use moat_pci::{AssignError, AssignedDevice};
use moat_pci::{ConfigPort, ConfigUpdate, MsiUpdate, MsixUpdate, Target};
use spin::Mutex;

/// Configuration access over the ECAM windows ACPI reported (the PCI discovery accessor).
pub type Ecams = crate::discovery::EcamAccess<'static>;

/// A guest's `IN` of `size` bytes from `port`: `None` when `port` is not a configuration port.
/// The data ports give the value shifted down to the accessed bytes (the caller masks it).
pub fn port_read(
    ecams: &Ecams,
    devices: &Mutex<alloc::vec::Vec<AssignedDevice>>,
    cf8: &AtomicU32,
    port: u16,
    size: u8,
) -> Option<u32> {
    Some(match ConfigPort::decode(port, size)? {
        ConfigPort::Address => cf8.load(Ordering::SeqCst),
        ConfigPort::Data { byte } => match Target::decode(cf8.load(Ordering::SeqCst), byte) {
            Some(t) => t.read(ecams, &devices.lock()),
            None => u32::MAX,
        },
    })
}

/// What a guest's `OUT` to a port did.
pub enum PortWrite {
    /// Not a configuration port.
    NotConfig,
    /// Handled.
    Done,
    /// Handled, and the function's virtual MSI changed: the hypervisor must follow it.
    Msi(MsiUpdate),
    /// Handled, and the function's virtual MSI-X control changed: the hypervisor must
    /// follow it.
    Msix(MsixUpdate),
}

/// A guest's `OUT` of `size` bytes to `port`.
pub fn port_write(
    ecams: &Ecams,
    devices: &Mutex<alloc::vec::Vec<AssignedDevice>>,
    cf8: &AtomicU32,
    port: u16,
    size: u8,
    value: u32,
) -> PortWrite {
    match ConfigPort::decode(port, size) {
        Some(ConfigPort::Address) => cf8.store(value, Ordering::SeqCst),
        Some(ConfigPort::Data { byte }) => {
            if let Some(t) = Target::decode(cf8.load(Ordering::SeqCst), byte)
                && let Some(u) = t.write(ecams, &mut devices.lock(), size, value)
            {
                return match u {
                    ConfigUpdate::Msi(u) => PortWrite::Msi(u),
                    ConfigUpdate::Msix(u) => PortWrite::Msix(u),
                };
            }
        }
        None => return PortWrite::NotConfig,
    }
    PortWrite::Done
}
