//! Reports what the platform has for DMA remapping (DMAR) and on the PCI bus, and hands the
//! results to the rest of the hypervisor.

use alloc::vec::Vec;

use moat_config::{Config, Dump};
use moat_dmar::Dmar;
use moat_pci::{probe_bars, ConfigAccess, Ecam};

use x86_64::instructions::port::Port;

use crate::acpi::Platform;
use crate::mm::mmio::Mmio;
use crate::mm::space;
use crate::mm::PhysAddr;

/// Parses and reports the DMAR table. `None` (with a clear log line) when there is none or it is
/// malformed: the hypervisor then goes on without DMA remapping.
pub fn report_dmar(platform: &Platform, config: &Config) -> Option<Dmar<'static>> {
    let Some(bytes) = platform.dmar_bytes() else {
        log::warn!("dmar: no DMAR table: no DMA remapping hardware, going on without remapping");
        return None;
    };
    if config.dump == Dump::Dmar {
        dump_hex("DMAR", platform.dmar.map_or(0, |d| d.0), bytes);
    }
    let dmar = match Dmar::parse(bytes) {
        Ok(d) => d,
        Err(e) => {
            log::error!("dmar: malformed DMAR table rejected: {e}; going on WITHOUT DMA remapping");
            return None;
        }
    };
    log::info!(
        "dmar: host address width {} bits, flags {:?}",
        dmar.host_address_width(),
        dmar.flags()
    );
    for (i, u) in dmar.drhds().enumerate() {
        log::info!(
            "dmar: DRHD unit {} base={:#x} segment={} flags={}{}",
            i,
            u.register_base(),
            u.segment(),
            if u.include_pci_all() {
                "INCLUDE_PCI_ALL"
            } else {
                "0"
            },
            ScopeList(u.scopes())
        );
    }
    for r in dmar.rmrrs() {
        log::info!(
            "dmar: RMRR [{:#x}-{:#x}] segment={}{}",
            r.base(),
            r.limit(),
            r.segment(),
            ScopeList(r.scopes())
        );
    }
    for a in dmar.atsrs() {
        log::info!(
            "dmar: ATSR segment={} all_ports={}{}",
            a.segment(),
            a.all_ports(),
            ScopeList(a.scopes())
        );
    }
    Some(dmar)
}

struct ScopeList<'a>(moat_dmar::DeviceScopes<'a>);
impl core::fmt::Display for ScopeList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for s in self.0.clone().flatten() {
            write!(f, " scope={:?}@{:02x}", s.scope_type(), s.start_bus())?;
            for p in s.path() {
                write!(f, "/{:02x}.{}", p.device, p.function)?;
            }
        }
        Ok(())
    }
}

fn dump_hex(name: &str, phys: u64, bytes: &[u8]) {
    crate::println!("dump {name} at {phys:#x} length {}", bytes.len());
    for (i, chunk) in bytes.chunks(16).enumerate() {
        crate::print!("dump {name} {:04x}:", i * 16);
        for b in chunk {
            crate::print!(" {b:02x}");
        }
        crate::println!();
    }
}

/// PCI configuration access over identity-mapped ECAM windows.
#[derive(Clone, Copy)]
pub struct EcamAccess<'a> {
    windows: &'a [crate::acpi::Ecam],
}

/// A PCI function found at boot.
#[derive(Debug, Clone, Copy)]
pub struct PciDevice {
    /// Address.
    pub bdf: moat_pci::Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Its BARs as probed.
    pub bars: moat_pci::Bars,
}

impl<'a> EcamAccess<'a> {
    /// Access through `windows`.
    ///
    /// # Safety
    ///
    /// `windows` are the platform's ECAM windows (from the ACPI MCFG), already mapped
    /// uncached by [`report_pci`]; the hypervisor owns PCI configuration space (guests reach
    /// it only through the filtered accessors of `vm::pci`). No window (no MCFG): the legacy
    /// ports are the platform's configuration mechanism (as [`PortIoAccess::new`] requires).
    pub unsafe fn new(windows: &'a [crate::acpi::Ecam]) -> Self {
        Self { windows }
    }
}

impl EcamAccess<'_> {
    /// The window holding `bdf`, and the offset in it of the dword holding `offset`.
    fn locate(&self, bdf: moat_pci::Bdf, offset: u16) -> Option<(Mmio, usize)> {
        self.windows.iter().find_map(|w| {
            let e = to_pci(w);
            let address = e.address(bdf, offset & !3)?;
            let start = window_start(&e);
            // SAFETY: by `new`'s contract (or, in `report_pci`, just mapped) the window
            // `[start, start + size)` is ECAM from the MCFG, mapped uncached, ours.
            let window = unsafe { Mmio::new(start, e.size() as usize) };
            Some((window, (address - start.as_u64()) as usize))
        })
    }
}

/// The host-physical address of the first mapped bus of the ECAM window `e` (the MCFG's base
/// names bus 0).
fn window_start(e: &Ecam) -> PhysAddr {
    PhysAddr::new(e.base + ((e.start_bus as u64) << 20))
}

fn to_pci(w: &crate::acpi::Ecam) -> Ecam {
    Ecam {
        base: w.base,
        segment: w.segment,
        start_bus: w.bus_start,
        end_bus: w.bus_end,
    }
}

/// Without any ECAM window (no MCFG) configuration space is reached through the legacy
/// ports, as [`report_pci`] enumerated it: segment 0, the first 256 bytes of each function.
const NO_ECAM: PortIoAccess = PortIoAccess(());

impl ConfigAccess for EcamAccess<'_> {
    fn read32(&self, bdf: moat_pci::Bdf, offset: u16) -> u32 {
        if self.windows.is_empty() {
            return NO_ECAM.read32(bdf, offset);
        }
        match self.locate(bdf, offset) {
            Some((window, at)) => window.read32(at),
            None => u32::MAX,
        }
    }

    fn write32(&self, bdf: moat_pci::Bdf, offset: u16, value: u32) {
        if self.windows.is_empty() {
            return NO_ECAM.write32(bdf, offset, value);
        }
        if let Some((window, at)) = self.locate(bdf, offset) {
            window.write32(at, value)
        }
    }
}

/// PCI configuration space through the legacy ports `0xCF8`/`0xCFC` (configuration mechanism
/// #1): segment 0, the first 256 bytes of each function. For platforms whose firmware gives no
/// MCFG (Bochs's i440fx; old chipsets). The address/data pair is one critical section.
pub struct PortIoAccess(());

static PORT_IO_LOCK: spin::Mutex<()> = spin::Mutex::new(());

impl PortIoAccess {
    /// The access.
    ///
    /// # Safety
    ///
    /// Ports `0xCF8`/`0xCFC` are the platform's configuration mechanism (no MCFG describes
    /// ECAM instead) and the hypervisor owns PCI configuration space.
    pub unsafe fn new() -> Self {
        Self(())
    }

    fn with<T>(
        &self,
        bdf: moat_pci::Bdf,
        offset: u16,
        f: impl FnOnce(&mut Port<u32>) -> T,
    ) -> Option<T> {
        let address = moat_pci::port_io_address(bdf, offset)?;
        let _held = PORT_IO_LOCK.lock();
        let mut a = Port::<u32>::new(moat_pci::PORT_IO_ADDRESS);
        let mut d = Port::<u32>::new(moat_pci::PORT_IO_DATA);
        // SAFETY: by `new`'s contract these are the configuration ports and ours; the lock
        // keeps the address and the data access together.
        unsafe { a.write(address) };
        Some(f(&mut d))
    }
}

impl ConfigAccess for PortIoAccess {
    fn read32(&self, bdf: moat_pci::Bdf, offset: u16) -> u32 {
        // SAFETY: the data port after the address was set (see `with`).
        self.with(bdf, offset, |d| unsafe { d.read() })
            .unwrap_or(u32::MAX)
    }

    fn write32(&self, bdf: moat_pci::Bdf, offset: u16, value: u32) {
        // SAFETY: as in `read32`.
        let _ = self.with(bdf, offset, |d| unsafe { d.write(value) });
    }
}

/// Maps the ECAM windows and lists every PCI function with its BARs and, when there is a DMAR,
/// the remapping unit responsible for it. Without ECAM (no MCFG) segment 0 is enumerated
/// through the legacy ports instead. Returns the functions found.
pub fn report_pci(platform: &Platform, dmar: Option<&Dmar<'_>>) -> Vec<PciDevice> {
    let mut found = Vec::new();
    if platform.ecam().is_empty() {
        log::warn!(
            "pci: no ECAM window (MCFG): enumerating segment 0 through ports 0xcf8/0xcfc (256-byte configuration space)"
        );
        // SAFETY: no MCFG describes ECAM, so mechanism #1 is the platform's way; the
        // hypervisor owns configuration space.
        let cfg = unsafe { PortIoAccess::new() };
        let count = report_functions(
            &cfg,
            moat_pci::enumerate(&cfg, 0, 0..=255),
            dmar,
            &mut found,
        );
        log::info!("pci: {count} functions (port I/O)");
        return found;
    }
    for w in platform.ecam() {
        let e = to_pci(w);
        let start = window_start(&e);
        if let Err(err) = space::map_mmio(start, e.size()) {
            log::error!("pci: cannot map ECAM {start:#x}: {err:?}");
            return found;
        }
        log::info!(
            "pci: ECAM segment {} buses {:02x}-{:02x} at {:#x}",
            e.segment,
            e.start_bus,
            e.end_bus,
            e.base
        );
    }
    // The windows were all mapped above: `EcamAccess::new`'s contract holds.
    let cfg = EcamAccess {
        windows: platform.ecam(),
    };
    let mut count = 0;
    for w in platform.ecam() {
        count += report_functions(
            &cfg,
            moat_pci::enumerate_ecam(&cfg, &to_pci(w)),
            dmar,
            &mut found,
        );
    }
    log::info!("pci: {count} functions");
    found
}

/// Logs and records every function `functions` yields, with its BARs; returns how many.
fn report_functions<C: ConfigAccess>(
    cfg: &C,
    functions: moat_pci::Functions<'_, C>,
    dmar: Option<&Dmar<'_>>,
    found: &mut Vec<PciDevice>,
) -> usize {
    let mut count = 0;
    for f in functions {
        count += 1;
        log::info!("pci: {f}");
        let bars = probe_bars(cfg, f.bdf).unwrap_or_default();
        for b in bars.iter() {
            log::info!("pci:   {} {b}", f.bdf);
        }
        found.push(PciDevice {
            bdf: f.bdf,
            vendor: f.header.vendor_id,
            device: f.header.device_id,
            bars,
        });
        if let Some(d) = dmar {
            report_unit(d, f.bdf);
        }
    }
    count
}

fn report_unit(dmar: &Dmar<'_>, bdf: moat_pci::Bdf) {
    let f = moat_dmar::PciFunction::new(bdf.segment(), bdf.bus(), bdf.device(), bdf.function());
    match dmar.find_drhd(f, &moat_dmar::NoBridges) {
        Some(u) => {
            let index = dmar
                .drhds()
                .position(|d| d.offset() == u.offset())
                .unwrap_or(0);
            log::info!(
                "dmar: {bdf} -> DRHD unit {index} ({:#x})",
                u.register_base()
            );
        }
        None => log::warn!("dmar: {bdf} -> no DRHD unit: its DMA is not remapped"),
    }
}
