//! PCI configuration access through ports 0xCF8/0xCFC (the hypervisor filters them).

use core::arch::asm;

fn address(bus: u8, dev: u8, func: u8, offset: u8) -> u32 {
    1 << 31 | (bus as u32) << 16 | (dev as u32) << 11 | (func as u32) << 8 | (offset as u32 & 0xfc)
}

/// Reads a configuration dword.
pub fn read32(bus: u8, dev: u8, func: u8, offset: u8) -> u32 {
    let v: u32;
    // SAFETY: configuration ports; the hypervisor intercepts them.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address(bus, dev, func, offset), options(nomem, nostack));
        asm!("in eax, dx", in("dx") 0xcfcu16, out("eax") v, options(nomem, nostack));
    }
    v
}

/// Writes a configuration dword.
pub fn write32(bus: u8, dev: u8, func: u8, offset: u8, value: u32) {
    // SAFETY: as in read32.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address(bus, dev, func, offset), options(nomem, nostack));
        asm!("out dx, eax", in("dx") 0xcfcu16, in("eax") value, options(nomem, nostack));
    }
}

/// Writes a configuration word (through port 0xCFC + (offset & 2)).
pub fn write16(bus: u8, dev: u8, func: u8, offset: u8, value: u16) {
    // SAFETY: as in read32.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address(bus, dev, func, offset), options(nomem, nostack));
        asm!("out dx, ax", in("dx") 0xcfcu16 + (offset as u16 & 2), in("ax") value, options(nomem, nostack));
    }
}

/// Writes one byte of configuration space.
pub fn write8(bus: u8, dev: u8, func: u8, offset: u8, value: u8) {
    // SAFETY: as in read32.
    unsafe {
        asm!("out dx, eax", in("dx") 0xcf8u16, in("eax") address(bus, dev, func, offset), options(nomem, nostack));
        asm!("out dx, al", in("dx") 0xcfcu16 + (offset as u16 & 3), in("al") value, options(nomem, nostack));
    }
}

/// A function that answered.
#[derive(Clone, Copy)]
pub struct Function {
    /// Bus.
    pub bus: u8,
    /// Device.
    pub dev: u8,
    /// Function.
    pub func: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
}

/// Calls `f` for every function on bus 0 that answers.
pub fn scan(mut f: impl FnMut(Function)) {
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let id = read32(0, dev, func, 0);
            if id & 0xffff == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            f(Function {
                bus: 0,
                dev,
                func,
                vendor: id as u16,
                device: (id >> 16) as u16,
            });
            let header = (read32(0, dev, 0, 0x0c) >> 16) as u8;
            if func == 0 && header & 0x80 == 0 {
                break;
            }
        }
    }
}
