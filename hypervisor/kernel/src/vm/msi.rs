//! MSIs of assigned devices, host side: every assigned function with an MSI capability on a
//! unit that remaps interrupts gets a [`HostRoute`] (a host vector and an IRTE the
//! hypervisor owns). When the guest programs its virtual MSI capability (intercepted by the
//! configuration filter, [`moat_pci::MsiUpdate`]), the hypervisor aims the route at the vCPU
//! the guest named and programs the device with the remappable-format address of that IRTE.
//! A storm turns the device's MSI off until the guest programs it again.

use moat_pci::{Bdf, MsiCapability, MsiUpdate};
use moat_vtd::intremap::remappable_msi;

use super::pci::Ecams;
use super::route::{HostRoute, Masker, Refused};
use super::virq::VirtualInterrupts;

/// One assigned function's MSI, as the hypervisor holds it.
pub struct DeviceMsi {
    bdf: Bdf,
    cap: MsiCapability,
    route: HostRoute,
}

impl DeviceMsi {
    /// Sets up `bdf`'s MSI on the unit at `unit` (which remaps interrupts): a host vector
    /// and an IRTE, both unused until the guest programs the device. `None` when the
    /// vectors or IRTEs are exhausted.
    pub fn new(bdf: Bdf, cap: MsiCapability, unit: u64) -> Option<DeviceMsi> {
        Some(DeviceMsi {
            bdf,
            cap,
            route: HostRoute::new(bdf, unit)?,
        })
    }

    /// The function.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// The host vector.
    pub fn host_vector(&self) -> u8 {
        self.route.host_vector()
    }

    /// The IRTE index.
    pub fn irte(&self) -> u16 {
        self.route.irte()
    }

    /// Interrupts taken and storms seen on this device's vector.
    pub fn counts(&self) -> (u64, u64) {
        self.route.counts()
    }

    /// Follows the guest's MSI programming `u`: enabled with a valid message, the route
    /// targets the vCPU the message names and the device gets the IRTE's remappable
    /// address; otherwise the device's MSI is off and the IRTE not present. Returns the vCPU
    /// and vector routed, or why not.
    pub fn program(
        &self,
        ecams: &Ecams,
        u: &MsiUpdate,
        targets: &[VirtualInterrupts],
        apic_of: &dyn Fn(usize) -> u32,
    ) -> Result<Option<(usize, u8)>, Refused> {
        // Off first: the device raises nothing while the route changes.
        self.cap.disable(ecams, self.bdf);
        if !u.state.enabled {
            self.route.clear();
            return Ok(None);
        }
        let masker = Masker::Msi(*ecams, self.bdf, self.cap);
        let routed = self.route.aim(u.state.target(), targets, apic_of, masker)?;
        if !u.state.masked {
            let m = remappable_msi(self.route.irte());
            self.cap
                .program(ecams, self.bdf, m.address, m.data as u16, true);
        }
        Ok(Some(routed))
    }

    /// Turns the device's MSI off, frees the IRTE and the host vector (the guest stopped).
    pub fn release(&self, ecams: &Ecams) {
        self.cap.disable(ecams, self.bdf);
        self.route.release();
    }
}
