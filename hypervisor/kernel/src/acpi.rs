//! Platform discovery from ACPI: CPUs and IOAPICs (MADT) and ECAM windows (MCFG) through the
//! `acpi` crate, and the raw DMAR table for the project's own parser (`moat-dmar`).

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::mcfg::Mcfg;
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiHandler, AcpiTable, AcpiTables, PhysicalMapping};
use moat_boot::info::AcpiRoot;
use spin::Mutex;

use crate::arch::cpu::MAX_CPUS;

/// Most IOAPICs / ECAM windows / recorded table ranges kept.
const MAX_IOAPICS: usize = 8;
const MAX_ECAM: usize = 8;
const MAX_TABLE_RANGES: usize = 64;

/// Every physical range the ACPI code touched (to reserve and map them).
static TABLE_RANGES: Mutex<([(u64, u64); MAX_TABLE_RANGES], usize)> =
    Mutex::new(([(0, 0); MAX_TABLE_RANGES], 0));

/// ACPI tables are identity mapped; mapping only records the range.
#[derive(Clone, Copy)]
struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let mut r = TABLE_RANGES.lock();
        let exists = r.0[..r.1]
            .iter()
            .any(|&(s, e)| s <= phys as u64 && phys as u64 + size as u64 <= e);
        if !exists && r.1 < MAX_TABLE_RANGES {
            let n = r.1;
            r.0[n] = (phys as u64, phys as u64 + size as u64);
            r.1 += 1;
        }
        // SAFETY: firmware tables are identity mapped (the boot map covers 4 GiB and the
        // kernel map covers every recorded range); a null address is never produced by a
        // well-formed RSDT, and the acpi crate validates headers before use.
        unsafe {
            PhysicalMapping::new(
                phys,
                NonNull::new(phys as *mut T).unwrap_or(NonNull::dangling()),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The DMAR table, as far as the `acpi` crate is concerned: a header and opaque bytes.
#[repr(C, packed)]
struct DmarSdt {
    header: SdtHeader,
}

// SAFETY: DmarSdt starts with the SDT header and claims the DMAR signature.
unsafe impl AcpiTable for DmarSdt {
    const SIGNATURE: Signature = Signature::DMAR;
    fn header(&self) -> &SdtHeader {
        &self.header
    }
}

/// A processor from the MADT.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuEntry {
    /// Local APIC (or x2APIC) id.
    pub apic_id: u32,
    /// ACPI processor UID.
    pub uid: u32,
}

/// An IOAPIC from the MADT.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoApic {
    /// IOAPIC id.
    pub id: u8,
    /// MMIO address.
    pub address: u32,
    /// First global system interrupt.
    pub gsi_base: u32,
}

/// An ECAM window from the MCFG.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ecam {
    /// Physical base (bus 0 of the window's segment).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus.
    pub bus_start: u8,
    /// Last bus.
    pub bus_end: u8,
}

/// What ACPI told us about the platform.
#[derive(Debug, Clone)]
pub struct Platform {
    cpus: [CpuEntry; MAX_CPUS],
    cpu_count: usize,
    /// Usable processors the MADT listed beyond [`MAX_CPUS`].
    pub cpus_dropped: usize,
    /// Local APIC MMIO address.
    pub lapic_address: u64,
    ioapics: [IoApic; MAX_IOAPICS],
    ioapic_count: usize,
    ecam: [Ecam; MAX_ECAM],
    ecam_count: usize,
    /// Physical address and length of the DMAR table, if present.
    pub dmar: Option<(u64, usize)>,
}

impl Platform {
    /// Usable processors (enabled or online-capable), in MADT order.
    pub fn cpus(&self) -> &[CpuEntry] {
        &self.cpus[..self.cpu_count]
    }
    /// IOAPICs.
    pub fn ioapics(&self) -> &[IoApic] {
        &self.ioapics[..self.ioapic_count]
    }
    /// ECAM windows.
    pub fn ecam(&self) -> &[Ecam] {
        &self.ecam[..self.ecam_count]
    }
    /// The raw DMAR bytes.
    pub fn dmar_bytes(&self) -> Option<&'static [u8]> {
        // SAFETY: the table is identity mapped firmware memory that is never freed or written.
        self.dmar
            .map(|(p, l)| unsafe { core::slice::from_raw_parts(p as *const u8, l) })
    }
}

/// Errors from discovery.
#[derive(Debug)]
pub enum AcpiError {
    /// The boot loader passed no RSDP.
    NoRsdp,
    /// The `acpi` crate rejected the root table.
    Root(acpi::AcpiError),
    /// No MADT.
    NoMadt(acpi::AcpiError),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => f.write_str("the boot loader passed no RSDP (multiboot2 tags 14/15)"),
            Self::Root(e) => write!(f, "bad RSDT/XSDT: {e:?}"),
            Self::NoMadt(e) => write!(f, "no usable MADT: {e:?}"),
        }
    }
}

/// Reads MADT, MCFG and the location of DMAR.
pub fn discover(root: Option<AcpiRoot>) -> Result<Platform, AcpiError> {
    let (address, revision) = match root.ok_or(AcpiError::NoRsdp)? {
        AcpiRoot::Rsdt(a) => (a, 0),
        AcpiRoot::Xsdt { address, revision } => (address, revision),
    };
    // SAFETY: the address comes from the firmware's RSDP (copied by GRUB) and is identity mapped.
    let tables = unsafe { AcpiTables::from_rsdt(IdentityHandler, revision, address as usize) }
        .map_err(AcpiError::Root)?;
    let mut p = Platform {
        cpus: [CpuEntry::default(); MAX_CPUS],
        cpu_count: 0,
        cpus_dropped: 0,
        lapic_address: 0xFEE0_0000,
        ioapics: [IoApic::default(); MAX_IOAPICS],
        ioapic_count: 0,
        ecam: [Ecam::default(); MAX_ECAM],
        ecam_count: 0,
        dmar: None,
    };
    let madt = tables.find_table::<Madt>().map_err(AcpiError::NoMadt)?;
    p.lapic_address = madt.get().local_apic_address as u64;
    for e in madt.get().entries() {
        let cpu = match e {
            // flags bit 0: enabled, bit 1: online capable
            MadtEntry::LocalApic(l) if l.flags & 0b11 != 0 => Some(CpuEntry {
                apic_id: l.apic_id as u32,
                uid: l.processor_id as u32,
            }),
            MadtEntry::LocalX2Apic(l) if l.flags & 0b11 != 0 => Some(CpuEntry {
                apic_id: l.x2apic_id,
                uid: l.processor_uid,
            }),
            MadtEntry::IoApic(io) => {
                if p.ioapic_count < MAX_IOAPICS {
                    p.ioapics[p.ioapic_count] = IoApic {
                        id: io.io_apic_id,
                        address: io.io_apic_address,
                        gsi_base: io.global_system_interrupt_base,
                    };
                    p.ioapic_count += 1;
                }
                None
            }
            _ => None,
        };
        if let Some(c) = cpu {
            if p.cpu_count < MAX_CPUS {
                p.cpus[p.cpu_count] = c;
                p.cpu_count += 1;
            } else {
                p.cpus_dropped += 1;
            }
        }
    }
    match tables.find_table::<Mcfg>() {
        Ok(mcfg) => {
            for e in mcfg.entries() {
                if p.ecam_count < MAX_ECAM {
                    p.ecam[p.ecam_count] = Ecam {
                        base: e.base_address,
                        segment: e.pci_segment_group,
                        bus_start: e.bus_number_start,
                        bus_end: e.bus_number_end,
                    };
                    p.ecam_count += 1;
                }
            }
        }
        Err(e) => log::warn!("no MCFG ({e:?}): PCI enumeration over ECAM unavailable"),
    }
    match tables.find_table::<DmarSdt>() {
        Ok(d) => {
            let len = d.get().header.length as usize;
            p.dmar = Some((d.physical_start() as u64, len));
        }
        Err(acpi::AcpiError::TableMissing(_)) => {}
        Err(e) => log::warn!("DMAR table rejected by the ACPI layer: {e:?}"),
    }
    Ok(p)
}

/// Physical ranges of every ACPI structure read so far.
pub fn table_ranges(mut f: impl FnMut(u64, u64)) {
    let r = TABLE_RANGES.lock();
    for &(s, e) in &r.0[..r.1] {
        f(s, e);
    }
}
