//! Brute-force enumeration of every function on a range of buses.

use core::fmt;
use core::iter::FusedIterator;
use core::ops::RangeInclusive;

use crate::bdf::{Bdf, Ecam, MAX_DEVICE, MAX_FUNCTION};
use crate::config::{ConfigAccess, Header};

/// A function found by enumeration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: Bdf,
    /// Its header, read during the scan.
    pub header: Header,
}

impl fmt::Display for PciFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        write!(
            f,
            "{} {:04x}:{:04x} class {} ({})",
            self.bdf,
            h.vendor_id,
            h.device_id,
            h.class,
            h.class.name()
        )
    }
}

/// Iterator over every function present on a range of buses, in
/// bus/device/function order. For each device, function 0 is read first: when
/// it is absent the device is skipped; functions 1..=7 are scanned only when
/// function 0's header has the multi-function bit.
#[derive(Debug)]
pub struct Functions<'a, C: ?Sized> {
    cfg: &'a C,
    segment: u16,
    bus: u8,
    last_bus: u8,
    device: u8,
    function: u8,
    multi_function: bool,
    done: bool,
}

/// Enumerates `segment`'s functions on `buses` (an MCFG entry's
/// start..=end bus).
pub fn enumerate<C: ConfigAccess + ?Sized>(
    cfg: &C,
    segment: u16,
    buses: RangeInclusive<u8>,
) -> Functions<'_, C> {
    Functions {
        cfg,
        segment,
        bus: *buses.start(),
        last_bus: *buses.end(),
        device: 0,
        function: 0,
        multi_function: false,
        done: buses.is_empty(),
    }
}

/// Enumerates every function an ECAM region decodes.
pub fn enumerate_ecam<'a, C: ConfigAccess + ?Sized>(cfg: &'a C, ecam: &Ecam) -> Functions<'a, C> {
    enumerate(cfg, ecam.segment, ecam.start_bus..=ecam.end_bus)
}

impl<C: ?Sized> Functions<'_, C> {
    fn next_device(&mut self) {
        self.function = 0;
        self.multi_function = false;
        if self.device < MAX_DEVICE {
            self.device += 1;
        } else if self.bus < self.last_bus {
            self.device = 0;
            self.bus += 1;
        } else {
            self.done = true;
        }
    }

    fn advance(&mut self) {
        if self.function == 0 && !self.multi_function || self.function == MAX_FUNCTION {
            self.next_device();
        } else {
            self.function += 1;
        }
    }
}

impl<C: ConfigAccess + ?Sized> Iterator for Functions<'_, C> {
    type Item = PciFunction;

    fn next(&mut self) -> Option<PciFunction> {
        while !self.done {
            let Some(bdf) = Bdf::with_segment(self.segment, self.bus, self.device, self.function)
            else {
                // Unreachable: device and function stay in range by construction.
                self.done = true;
                break;
            };
            let header = Header::read(self.cfg, bdf);
            if self.function == 0 {
                match header {
                    None => {
                        self.next_device();
                        continue;
                    }
                    Some(h) => self.multi_function = h.header_type.multi_function(),
                }
            }
            self.advance();
            if let Some(header) = header {
                return Some(PciFunction { bdf, header });
            }
        }
        None
    }
}

impl<C: ConfigAccess + ?Sized> FusedIterator for Functions<'_, C> {}

/// Enumerates into `out` without allocating; returns how many functions were
/// stored and how many were found in all (more than `out.len()` when it was
/// too small).
pub fn enumerate_into<C: ConfigAccess + ?Sized>(
    cfg: &C,
    segment: u16,
    buses: RangeInclusive<u8>,
    out: &mut [Option<PciFunction>],
) -> (usize, usize) {
    let mut found = 0;
    for f in enumerate(cfg, segment, buses) {
        if let Some(slot) = out.get_mut(found) {
            *slot = Some(f);
        }
        found += 1;
    }
    (found.min(out.len()), found)
}
