//! MSI-X of assigned devices, host side. The guest sees the device's MSI-X capability through
//! the configuration filter (Enable and Function Mask virtual, [`moat_pci::MsixUpdate`]); the
//! pages holding the table and the pending-bit array (PBA) are left out of its second stage,
//! so each access there is a nested page fault that [`super::guest`] decodes and hands to
//! [`DeviceMsix::access`], which emulates it against the guest's virtual table
//! ([`VirtualMsixTable`]).
//!
//! The device's own table belongs to the hypervisor. Every entry is masked unless the guest's
//! entry is live (MSI-X enabled, function not masked, entry not masked) with a valid message:
//! then the entry gets a [`HostRoute`] of its own (a host vector and an IRTE, allocated the
//! first time and kept until the guest stops; at most [`MAX_ROUTES`] per function), aimed at the vCPU the guest's address names,
//! and the device's entry is programmed with the IRTE's remappable-format address and
//! unmasked. While the guest's entry is masked the device's is too, so the device records a
//! pending bit in its own PBA, which the guest reads through (its unmask then lets the
//! device deliver it). Guest writes to the PBA are ignored (it is read only); accesses other
//! than an aligned dword or qword to the table or PBA are ignored (writes dropped, reads all
//! ones) with a rate-limited line, as Xen does. Other registers of the device that share the
//! trapped pages are forwarded to the device (aligned dwords and qwords).

use moat_config::GuestName;
use moat_pci::{
    msix_dwords, Bars, Bdf, MsixAccess, MsixCapability, TrappedRange, VirtualMsixControl,
    VirtualMsixTable, ENTRY_SIZE, MAX_VECTORS,
};
use moat_vtd::intremap::remappable_msi;

use super::pci::Ecams;
use super::route::{HostRoute, Masker, Refused};
use super::virq::VirtualInterrupts;
use crate::mm::mmio::Mmio;
use crate::mm::PhysAddr;
use crate::ratelimit::{RateLimit, Verdict};
use crate::sync::IrqMutex;

/// Rate limit of the MSI-X programming lines (a guest reprograms at will).
static PROGRAM_LOG: RateLimit = RateLimit::new();
/// Rate limit of the ignored-access lines.
static IGNORED_LOG: RateLimit = RateLimit::new();

/// Vector control: the entry's mask bit.
const MASKED: u32 = 1;
/// Entries of one function that may hold a host vector at once: the host's 32 device
/// vectors are shared by every guest, so one function cannot take them all.
pub const MAX_ROUTES: usize = 8;

/// Where a guest's access went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read, with the value read (the access's width).
    Read(u64),
    /// A write, done.
    Written,
    /// Not emulated (see the module text): a read returns all ones.
    Ignored,
}

/// The guest's side of one device's MSI-X and the routes of its live entries.
struct State {
    control: VirtualMsixControl,
    table: VirtualMsixTable,
    routes: [Option<HostRoute>; MAX_VECTORS],
}

/// Who the guest's entries may target: its vCPUs' pending sets and the APIC id of the CPU
/// each runs on.
pub struct Targets<'a> {
    /// The guest's vCPUs (leaked with the guest).
    pub virqs: &'a [VirtualInterrupts],
    /// APIC id of the CPU running vCPU i.
    pub apic_of: &'a dyn Fn(usize) -> u32,
}

/// One assigned function's MSI-X, as the hypervisor holds it.
pub struct DeviceMsix {
    guest: GuestName,
    bdf: Bdf,
    unit: u64,
    cap: MsixCapability,
    bars: Bars,
    trapped: [Option<TrappedRange>; 2],
    /// Physical address of the device's table and PBA (identity-mapped uncached).
    table: PhysAddr,
    pba: PhysAddr,
    ecams: Ecams,
    state: IrqMutex<State>,
}

impl DeviceMsix {
    /// Takes over `bdf`'s MSI-X on the unit at `unit` (which remaps interrupts): its table
    /// and PBA pages mapped for the hypervisor, every device entry masked, MSI-X off. No
    /// host vector or IRTE is taken until the guest makes an entry live. `None` when the
    /// table or PBA lies outside the memory BARs or cannot be mapped.
    pub fn new(
        guest: GuestName,
        bdf: Bdf,
        cap: MsixCapability,
        bars: &Bars,
        unit: u64,
        ecams: Ecams,
    ) -> Option<DeviceMsix> {
        let trapped = cap.trapped(bars)?;
        for r in trapped.iter().flatten() {
            crate::mm::space::map_mmio(PhysAddr::new(r.start), r.len).ok()?;
        }
        let base = |bir: u8| bars.get(usize::from(bir)).map(|b| b.address);
        let d = DeviceMsix {
            guest,
            bdf,
            unit,
            cap,
            bars: *bars,
            trapped,
            table: PhysAddr::new(base(cap.table.bir)? + u64::from(cap.table.offset)),
            pba: PhysAddr::new(base(cap.pba.bir)? + u64::from(cap.pba.offset)),
            ecams,
            state: IrqMutex::new(State {
                control: VirtualMsixControl::default(),
                table: VirtualMsixTable::new(&cap),
                routes: [const { None }; MAX_VECTORS],
            }),
        };
        cap.disable(&ecams, bdf);
        for i in 0..cap.entries {
            d.mask_entry(i);
        }
        Some(d)
    }

    /// The function.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The ranges left out of the guest's second stage.
    pub fn trapped(&self) -> impl Iterator<Item = TrappedRange> + '_ {
        self.trapped.iter().flatten().copied()
    }

    /// Whether guest-physical `gpa` lies in the trapped pages.
    pub fn contains(&self, gpa: u64) -> bool {
        self.trapped().any(|r| r.contains(gpa))
    }

    fn table_mmio(&self) -> Mmio {
        // SAFETY: the device's table (entries * 16 bytes inside its BAR, checked by
        // `trapped`), mapped uncached by `new`; the hypervisor alone programs it.
        unsafe { Mmio::new(self.table, self.cap.table_len() as usize) }
    }

    fn mask_entry(&self, i: u16) {
        self.table_mmio()
            .write32(usize::from(i) * ENTRY_SIZE as usize + 12, MASKED);
    }

    /// The guest changed its message control: the device's MSI-X follows Enable (with the
    /// function never masked at the device: its entries are), every entry is re-evaluated.
    pub fn set_control(&self, control: VirtualMsixControl, t: &Targets<'_>) {
        let mut st = self.state.lock();
        st.control = control;
        if control.enabled {
            self.cap.set_control(&self.ecams, self.bdf, true, false);
        }
        for i in 0..st.table.len() {
            self.sync(&mut st, i, t);
        }
        if !control.enabled {
            self.cap.disable(&self.ecams, self.bdf);
        }
    }

    /// Makes the device's entry `i` follow the guest's: masked while it changes, then
    /// programmed and unmasked if the guest's entry is live with a valid message.
    fn sync(&self, st: &mut State, i: u16, t: &Targets<'_>) {
        self.mask_entry(i);
        let Some(e) = st.table.entry(i) else {
            return;
        };
        let c = st.control;
        if !c.enabled || c.function_masked || e.masked {
            return;
        }
        // A message that cannot be followed takes no host vector.
        let target = st.table.target(i, &c);
        let held = st.routes.iter().flatten().count();
        let slot = &mut st.routes[usize::from(i)];
        if slot.is_none() && target.is_some() && held < MAX_ROUTES {
            *slot = HostRoute::new(self.bdf, self.unit);
        }
        let result = match (slot, target) {
            (route, None) => {
                // The entry's earlier route, if any, stops delivering.
                if let Some(r) = route {
                    r.clear();
                }
                Err(Refused::BadMessage)
            }
            (Some(route), msg) => {
                let vc = self.table + u64::from(i) * u64::from(ENTRY_SIZE) + 12;
                route
                    .aim(msg, t.virqs, t.apic_of, Masker::MsixEntry(self.bdf, vc))
                    .map(|(vcpu, vector)| (vcpu, vector, route.host_vector(), route.irte()))
            }
            (None, Some(_)) => Err(Refused::Exhausted),
        };
        if let Ok((_, _, _, irte)) = result {
            let m = remappable_msi(irte);
            let table = self.table_mmio();
            let at = usize::from(i) * ENTRY_SIZE as usize;
            table.write32(at, m.address as u32);
            table.write32(at + 4, (m.address >> 32) as u32);
            table.write32(at + 8, m.data);
            table.write32(at + 12, 0);
        }
        let Verdict::Log { suppressed, .. } = PROGRAM_LOG.event() else {
            return;
        };
        if suppressed != 0 {
            log::info!(
                "guest {}: {suppressed} MSI-X programming line(s) not logged",
                self.guest
            );
        }
        match result {
            Ok((vcpu, vector, host, irte)) => log::info!(
                "guest {}: {}: MSI-X entry {i}: vector {vector:#x} -> vcpu{vcpu} (host vector {host:#x} on APIC {}, IRTE {irte})",
                self.guest,
                self.bdf,
                (t.apic_of)(vcpu)
            ),
            Err(why) => log::warn!(
                "guest {}: {}: MSI-X entry {i} address {:#x} data {:#x} refused ({why:?}): the device's entry stays masked",
                self.guest,
                self.bdf,
                e.address,
                e.data
            ),
        }
    }

    /// Emulates the guest's access of `size` bytes at guest-physical `gpa` (in the trapped
    /// pages): a write of `write`'s value, else a read.
    pub fn access(&self, gpa: u64, size: u8, write: Option<u64>, t: &Targets<'_>) -> Access {
        let what = match self.cap.classify(&self.bars, gpa) {
            Some(MsixAccess::Table(off)) => match msix_dwords(off, size) {
                Some((first, n)) => {
                    let mut st = self.state.lock();
                    let mut value = 0u64;
                    let mut ok = true;
                    for k in 0..n {
                        let at = first + 4 * k;
                        match write {
                            Some(v) => match st.table.write(at, (v >> (32 * k)) as u32) {
                                Ok(Some(i)) => self.sync(&mut st, i, t),
                                Ok(None) => {}
                                Err(_) => ok = false,
                            },
                            None => match st.table.read(at) {
                                Ok(d) => value |= u64::from(d) << (32 * k),
                                Err(_) => ok = false,
                            },
                        }
                    }
                    if ok {
                        return if write.is_some() {
                            Access::Written
                        } else {
                            Access::Read(value)
                        };
                    }
                    "past the entries the guest sees"
                }
                None => "not an aligned dword or qword",
            },
            Some(MsixAccess::Pba(off)) => match (write, msix_dwords(off, size)) {
                (Some(_), _) => "a write to the pending-bit array (read only)",
                (None, Some((first, n))) => {
                    // SAFETY: the device's PBA, mapped uncached by `new`; reads have no
                    // side effects.
                    let pba = unsafe { Mmio::new(self.pba, self.cap.pba_len() as usize) };
                    let st = self.state.lock();
                    let mut value = 0u64;
                    for k in 0..n {
                        let at = first + 4 * k;
                        let real = pba.read32(at as usize);
                        value |= u64::from(st.table.read_pba(at, real).unwrap_or(0)) << (32 * k);
                    }
                    return Access::Read(value);
                }
                (None, None) => "not an aligned dword or qword",
            },
            Some(MsixAccess::Other(_))
                if matches!(size, 4 | 8) && gpa.is_multiple_of(u64::from(size)) =>
            {
                return self.forward(gpa, size, write);
            }
            Some(MsixAccess::Other(_)) => "not an aligned dword or qword (device register)",
            None => "outside the table, the PBA and their BAR",
        };
        if let Verdict::Log { suppressed, .. } = IGNORED_LOG.event() {
            log::warn!(
                "guest {}: {}: MSI-X page access of {size} byte(s) at {gpa:#x} ({}) ignored: {what} ({suppressed} earlier line(s) not logged)",
                self.guest,
                self.bdf,
                if write.is_some() { "write" } else { "read" }
            );
        }
        Access::Ignored
    }

    /// A device register that shares the trapped pages: the access goes to the device.
    fn forward(&self, gpa: u64, size: u8, write: Option<u64>) -> Access {
        let Some(r) = self.trapped().find(|r| r.contains(gpa)) else {
            return Access::Ignored;
        };
        // SAFETY: the trapped pages of the device's BAR, mapped uncached by `new`; the guest
        // may access these registers of its own device (they are not the table or PBA);
        // `gpa` is aligned to `size` (checked by the caller).
        let m = unsafe { Mmio::new(PhysAddr::new(r.start), r.len as usize) };
        let off = (gpa - r.start) as usize;
        match (size, write) {
            (8, Some(v)) => m.write64(off, v),
            (_, Some(v)) => m.write32(off, v as u32),
            (8, None) => return Access::Read(m.read64(off)),
            (_, None) => return Access::Read(u64::from(m.read32(off))),
        }
        Access::Written
    }

    /// Interrupts taken and storms seen over all entries' routes, and routes allocated.
    pub fn counts(&self) -> (u64, u64, usize) {
        let st = self.state.lock();
        st.routes.iter().flatten().fold((0, 0, 0), |(t, s, n), r| {
            let (a, b) = r.counts();
            (t + a, s + b, n + 1)
        })
    }

    /// Masks every device entry, turns MSI-X off, frees every IRTE and host vector (the
    /// guest stopped).
    pub fn release(&self) {
        for i in 0..self.cap.entries {
            self.mask_entry(i);
        }
        self.cap.disable(&self.ecams, self.bdf);
        let mut st = self.state.lock();
        for r in st.routes.iter_mut() {
            if let Some(route) = r.take() {
                route.release();
            }
        }
    }
}
