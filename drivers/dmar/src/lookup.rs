//! Which remapping unit and which reserved regions apply to a PCI device.
//!
//! Rules (VT-d spec, "DMA Remapping Hardware Unit Definition Structure"):
//! a device belongs to the DRHD of its segment whose device scope names it,
//! either as an endpoint or by being the named bridge or below it; only when no
//! unit names it explicitly does it belong to the segment's INCLUDE_PCI_ALL unit.
//! Scope paths of more than one hop cross bridges, whose secondary bus numbers
//! live in PCI config space: a [`BridgeTopology`] supplies them.

use core::fmt;

use crate::scope::{DeviceScope, DeviceScopes, ScopeType};
use crate::structures::{Drhd, Rmrr};
use crate::table::Dmar;

/// A PCI function: segment, bus, device, function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciFunction {
    /// PCI segment (ECAM domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl PciFunction {
    /// Builds a function address.
    pub const fn new(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        Self {
            segment,
            bus,
            device,
            function,
        }
    }
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

/// The buses behind a PCI-PCI bridge: secondary..=subordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// The bus directly behind the bridge.
    pub secondary: u8,
    /// The highest bus number behind the bridge.
    pub subordinate: u8,
}

impl BusRange {
    /// Whether `bus` is behind the bridge.
    pub const fn contains(&self, bus: u8) -> bool {
        self.secondary <= bus && bus <= self.subordinate
    }
}

/// Answers "is this function a bridge, and which buses are behind it" (from its
/// type 1 config header). The kernel implements it over ECAM.
pub trait BridgeTopology {
    /// The bus range behind the bridge at `f`, or `None` when `f` is not a bridge
    /// (or absent).
    fn bridge_buses(&self, f: PciFunction) -> Option<BusRange>;
}

/// A topology without bridges: scopes resolve only when their path has one hop.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBridges;

impl BridgeTopology for NoBridges {
    fn bridge_buses(&self, _: PciFunction) -> Option<BusRange> {
        None
    }
}

impl<F: Fn(PciFunction) -> Option<BusRange>> BridgeTopology for F {
    fn bridge_buses(&self, f: PciFunction) -> Option<BusRange> {
        self(f)
    }
}

impl DeviceScope<'_> {
    /// Follows the path from the start bus through the bridges it names and
    /// returns the function of the last hop, or `None` when an intermediate hop
    /// is not a bridge according to `topology`.
    pub fn resolve(&self, segment: u16, topology: &impl BridgeTopology) -> Option<PciFunction> {
        let mut path = self.path();
        let first = path.next()?;
        let mut at = PciFunction::new(segment, self.start_bus(), first.device, first.function);
        for hop in path {
            let behind = topology.bridge_buses(at)?;
            at = PciFunction::new(segment, behind.secondary, hop.device, hop.function);
        }
        Some(at)
    }

    /// Whether this scope covers PCI function `f` (of the structure's
    /// `segment`): an endpoint scope names exactly `f`; a sub-hierarchy scope
    /// names a bridge and covers it and everything behind it. I/O APIC, HPET and
    /// ACPI namespace scopes cover no PCI function.
    pub fn covers(&self, segment: u16, f: PciFunction, topology: &impl BridgeTopology) -> bool {
        if segment != f.segment {
            return false;
        }
        let kind = self.scope_type();
        if !matches!(kind, ScopeType::PciEndpoint | ScopeType::PciSubHierarchy) {
            return false;
        }
        let Some(named) = self.resolve(segment, topology) else {
            return false;
        };
        if named == f {
            return true;
        }
        kind == ScopeType::PciSubHierarchy
            && topology
                .bridge_buses(named)
                .is_some_and(|range| range.contains(f.bus))
    }
}

/// Whether one of `scopes`, listed by a structure of `segment`, covers `f`.
fn scopes_cover(
    segment: u16,
    scopes: DeviceScopes<'_>,
    f: PciFunction,
    topology: &impl BridgeTopology,
) -> bool {
    scopes
        .map_while(Result::ok)
        .any(|s| s.covers(segment, f, topology))
}

impl<'a> Drhd<'a> {
    /// Whether one of this unit's explicit device scopes covers `f`
    /// (INCLUDE_PCI_ALL is not considered).
    pub fn scope_covers(&self, f: PciFunction, topology: &impl BridgeTopology) -> bool {
        scopes_cover(self.segment(), self.scopes(), f, topology)
    }
}

impl<'a> Rmrr<'a> {
    /// Whether this region is used by `f`.
    pub fn applies_to(&self, f: PciFunction, topology: &impl BridgeTopology) -> bool {
        scopes_cover(self.segment(), self.scopes(), f, topology)
    }
}

impl<'a> Dmar<'a> {
    /// The remapping unit responsible for PCI function `f`: a unit of its segment
    /// whose explicit scope covers it, else the segment's INCLUDE_PCI_ALL unit,
    /// else `None` (the device is not behind any remapping hardware).
    pub fn find_drhd(&self, f: PciFunction, topology: &impl BridgeTopology) -> Option<Drhd<'a>> {
        self.drhds()
            .filter(|d| d.segment() == f.segment && !d.include_pci_all())
            .find(|d| d.scope_covers(f, topology))
            .or_else(|| {
                self.drhds()
                    .find(|d| d.segment() == f.segment && d.include_pci_all())
            })
    }

    /// The reserved memory regions PCI function `f` uses (to be identity-mapped
    /// in its domain).
    pub fn rmrrs_for<'t, T: BridgeTopology>(
        &self,
        f: PciFunction,
        topology: &'t T,
    ) -> impl Iterator<Item = Rmrr<'a>> + 't + use<'a, 't, T>
    where
        'a: 't,
    {
        self.rmrrs().filter(move |r| r.applies_to(f, topology))
    }

    /// The unit whose scope lists the I/O APIC with id `ioapic_id`, with that
    /// scope (its start bus and path give the I/O APIC's interrupt source id).
    pub fn find_ioapic(&self, ioapic_id: u8) -> Option<(Drhd<'a>, DeviceScope<'a>)> {
        self.drhds().find_map(|d| {
            d.scopes()
                .map_while(Result::ok)
                .find(|s| s.scope_type() == ScopeType::IoApic && s.enumeration_id() == ioapic_id)
                .map(|s| (d, s))
        })
    }
}
