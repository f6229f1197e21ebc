//! [`BootInfo`]: what the hypervisor needs from the multiboot2 information, copied into fixed
//! capacity arrays so the rest of the boot does not depend on the multiboot2 crate.

use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

/// Most memory-map entries kept (QEMU gives ~8, large servers ~100).
pub const MAX_REGIONS: usize = 160;
/// Most boot modules kept.
pub const MAX_MODULES: usize = 16;

/// Kind of a memory-map region, independent of firmware flavour (e820 or EFI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// RAM free for the hypervisor.
    Usable,
    /// Reserved by firmware or hardware.
    Reserved,
    /// RAM holding ACPI tables; reusable once they are no longer needed.
    AcpiReclaimable,
    /// ACPI non-volatile storage: never touch.
    AcpiNvs,
    /// Defective RAM.
    Defective,
}

/// One memory-map region `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the firmware says the region is.
    pub kind: MemoryKind,
}

impl MemoryRegion {
    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// A boot module (e.g. a guest kernel) loaded by GRUB at `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The module's command line (the words after the path in `module2`).
    pub cmdline: &'static str,
}

/// Where the ACPI root table is, from multiboot2 tag 14 (RSDP 1.0) or 15 (RSDP 2.0+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiRoot {
    /// ACPI 1.0: RSDT address.
    Rsdt(u64),
    /// ACPI 2.0+: XSDT address (preferred), with the RSDP revision.
    Xsdt {
        /// XSDT physical address.
        address: u64,
        /// RSDP revision (2 or more).
        revision: u8,
    },
}

/// A linear framebuffer from the multiboot2 framebuffer tag (type 8), when the loader set a
/// direct-colour (RGB) graphics mode. Indexed-colour and EGA text modes are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framebuffer {
    /// Physical address of the first pixel.
    pub address: u64,
    /// Bytes per scan line.
    pub pitch: u32,
    /// Pixels per line.
    pub width: u32,
    /// Lines.
    pub height: u32,
    /// Bits per pixel.
    pub bpp: u8,
    /// Bit position and size of red, green, blue in a pixel.
    pub red: (u8, u8),
    /// Green (position, size).
    pub green: (u8, u8),
    /// Blue (position, size).
    pub blue: (u8, u8),
}

/// Errors building [`BootInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// `EAX` did not hold the multiboot2 magic.
    BadMagic(u32),
    /// The multiboot2 information is malformed.
    Malformed,
    /// No memory map tag (neither e820-style nor EFI).
    NoMemoryMap,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(m) => write!(f, "bad multiboot2 magic {m:#x}"),
            Self::Malformed => f.write_str("malformed multiboot2 information"),
            Self::NoMemoryMap => f.write_str("multiboot2 information has no memory map"),
        }
    }
}

/// The boot information the hypervisor uses.
#[derive(Debug, Clone)]
pub struct BootInfo {
    regions: [MemoryRegion; MAX_REGIONS],
    region_count: usize,
    /// Regions dropped because [`MAX_REGIONS`] was exceeded (reported, never silently).
    pub regions_dropped: usize,
    modules: [Module; MAX_MODULES],
    module_count: usize,
    /// Modules dropped because [`MAX_MODULES`] was exceeded.
    pub modules_dropped: usize,
    /// The kernel command line (empty if none).
    pub cmdline: &'static str,
    /// The boot loader's name (empty if none).
    pub bootloader: &'static str,
    /// ACPI root, if the loader passed an RSDP.
    pub acpi: Option<AcpiRoot>,
    /// Physical range of the multiboot2 information itself.
    pub mbi: (u64, u64),
    /// Whether the memory map came from the EFI memory map tag.
    pub efi_memory_map: bool,
    /// The loader's direct-colour framebuffer, if it set one up.
    pub framebuffer: Option<Framebuffer>,
}

const EMPTY_REGION: MemoryRegion = MemoryRegion {
    start: 0,
    len: 0,
    kind: MemoryKind::Reserved,
};
const EMPTY_MODULE: Module = Module {
    start: 0,
    end: 0,
    cmdline: "",
};

/// Extends a string borrowed from a multiboot2 tag to `'static`.
///
/// `BootInformation<'static>` is a view of a buffer that lives for `'static`; the tag strings
/// point into that buffer, not into the view, so they live as long as the buffer.
fn tag_str(s: &str) -> &'static str {
    // SAFETY: see above: `s` points into the 'static multiboot2 buffer.
    unsafe { &*(s as *const str) }
}

impl BootInfo {
    /// Parses the multiboot2 information at physical (= virtual) address `mbi`.
    ///
    /// # Safety
    /// `mbi` must point to a multiboot2 information structure that stays valid and unmodified
    /// for the rest of the program (the hypervisor reserves its frames).
    pub unsafe fn from_multiboot2(magic: u32, mbi: usize) -> Result<Self, BootInfoError> {
        if magic != crate::entry::MULTIBOOT2_BOOTLOADER_MAGIC {
            return Err(BootInfoError::BadMagic(magic));
        }
        // SAFETY: guaranteed by the caller.
        let info = unsafe { BootInformation::load(mbi as *const BootInformationHeader) }
            .map_err(|_| BootInfoError::Malformed)?;
        Self::from_info(&info)
    }

    /// Builds a [`BootInfo`] from parsed multiboot2 information that lives for `'static`.
    pub fn from_info(info: &BootInformation<'static>) -> Result<Self, BootInfoError> {
        let mut bi = BootInfo {
            regions: [EMPTY_REGION; MAX_REGIONS],
            region_count: 0,
            regions_dropped: 0,
            modules: [EMPTY_MODULE; MAX_MODULES],
            module_count: 0,
            modules_dropped: 0,
            cmdline: "",
            bootloader: "",
            acpi: None,
            mbi: (info.start_address() as u64, info.end_address() as u64),
            efi_memory_map: false,
            framebuffer: None,
        };
        if let Some(mmap) = info.memory_map_tag() {
            for area in mmap.memory_areas() {
                let kind = match area.typ() {
                    MemoryAreaType::Available => MemoryKind::Usable,
                    MemoryAreaType::AcpiAvailable => MemoryKind::AcpiReclaimable,
                    MemoryAreaType::ReservedHibernate => MemoryKind::AcpiNvs,
                    MemoryAreaType::Defective => MemoryKind::Defective,
                    _ => MemoryKind::Reserved,
                };
                bi.push_region(area.start_address(), area.size(), kind);
            }
        } else if let Some(efi) = info.efi_memory_map_tag() {
            use multiboot2::EFIMemoryAreaType as T;
            bi.efi_memory_map = true;
            for d in efi.memory_areas() {
                let kind = match d.ty {
                    T::CONVENTIONAL
                    | T::LOADER_CODE
                    | T::LOADER_DATA
                    | T::BOOT_SERVICES_CODE
                    | T::BOOT_SERVICES_DATA => MemoryKind::Usable,
                    T::ACPI_RECLAIM => MemoryKind::AcpiReclaimable,
                    T::ACPI_NON_VOLATILE => MemoryKind::AcpiNvs,
                    T::UNUSABLE => MemoryKind::Defective,
                    _ => MemoryKind::Reserved,
                };
                bi.push_region(d.phys_start, d.page_count.saturating_mul(4096), kind);
            }
        } else {
            return Err(BootInfoError::NoMemoryMap);
        }
        for m in info.module_tags() {
            if bi.module_count == MAX_MODULES {
                bi.modules_dropped += 1;
                continue;
            }
            bi.modules[bi.module_count] = Module {
                start: m.start_address() as u64,
                end: m.end_address() as u64,
                cmdline: tag_str(m.cmdline().unwrap_or("")),
            };
            bi.module_count += 1;
        }
        if let Some(c) = info.command_line_tag() {
            bi.cmdline = tag_str(c.cmdline().unwrap_or(""));
        }
        if let Some(b) = info.boot_loader_name_tag() {
            bi.bootloader = tag_str(b.name().unwrap_or(""));
        }
        if let Some(Ok(fb)) = info.framebuffer_tag()
            && let Ok(multiboot2::FramebufferType::RGB { red, green, blue }) = fb.buffer_type()
        {
            bi.framebuffer = Some(Framebuffer {
                address: fb.address(),
                pitch: fb.pitch(),
                width: fb.width(),
                height: fb.height(),
                bpp: fb.bpp(),
                red: (red.position, red.size),
                green: (green.position, green.size),
                blue: (blue.position, blue.size),
            });
        }
        bi.acpi = if let Some(v2) = info.rsdp_v2_tag() {
            Some(AcpiRoot::Xsdt {
                address: v2.xsdt_address() as u64,
                revision: v2.revision(),
            })
        } else {
            info.rsdp_v1_tag()
                .map(|v1| AcpiRoot::Rsdt(v1.rsdt_address() as u64))
        };
        Ok(bi)
    }

    fn push_region(&mut self, start: u64, len: u64, kind: MemoryKind) {
        if len == 0 {
            return;
        }
        if self.region_count == MAX_REGIONS {
            self.regions_dropped += 1;
            return;
        }
        self.regions[self.region_count] = MemoryRegion { start, len, kind };
        self.region_count += 1;
    }

    /// The memory map, in the loader's order.
    pub fn memory_map(&self) -> &[MemoryRegion] {
        &self.regions[..self.region_count]
    }

    /// The boot modules, in the loader's order.
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }

    /// Highest address of any usable RAM.
    pub fn top_of_ram(&self) -> u64 {
        self.memory_map()
            .iter()
            .filter(|r| r.kind == MemoryKind::Usable)
            .map(|r| r.end())
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use multiboot2::{Builder, CommandLineTag, MemoryArea, MemoryMapTag, ModuleTag, RsdpV1Tag};

    fn build(with_mmap: bool) -> BootInformation<'static> {
        let mut b = Builder::new()
            .cmdline(CommandLineTag::new("log=debug smp=2"))
            .add_module(ModuleTag::new(0x40_0000, 0x48_0000, "guest0 mem=64M"))
            .rsdpv1(RsdpV1Tag::new(*b"BOCHS ", 0, 0x7fe_2345));
        if with_mmap {
            b = b.mmap(MemoryMapTag::new(&[
                MemoryArea::new(0, 0x9fc00, MemoryAreaType::Available),
                MemoryArea::new(0x9fc00, 0x400, MemoryAreaType::Reserved),
                MemoryArea::new(0x10_0000, 0x7ee_0000, MemoryAreaType::Available),
                MemoryArea::new(0x7fe_0000, 0x2_0000, MemoryAreaType::Reserved),
                MemoryArea::new(0x8000_0000, 0, MemoryAreaType::Available),
            ]));
        }
        let built = std::boxed::Box::leak(b.build());
        let ptr = built as *const _ as *const u8 as *const BootInformationHeader;
        // SAFETY: the structure is leaked (lives forever) and was produced by the builder.
        unsafe { BootInformation::load(ptr).unwrap() }
    }

    #[test]
    fn parses_memory_map_modules_cmdline_rsdp() {
        let bi = BootInfo::from_info(&build(true)).unwrap();
        assert_eq!(bi.memory_map().len(), 4, "zero-length region dropped");
        assert_eq!(bi.memory_map()[2].start, 0x10_0000);
        assert_eq!(bi.memory_map()[2].kind, MemoryKind::Usable);
        assert_eq!(bi.memory_map()[3].kind, MemoryKind::Reserved);
        assert_eq!(bi.top_of_ram(), 0x7fe_0000);
        assert_eq!(bi.cmdline, "log=debug smp=2");
        assert_eq!(bi.modules().len(), 1);
        assert_eq!(bi.modules()[0].start, 0x40_0000);
        assert_eq!(bi.modules()[0].cmdline, "guest0 mem=64M");
        assert_eq!(bi.acpi, Some(AcpiRoot::Rsdt(0x7fe_2345)));
        assert!(bi.mbi.1 > bi.mbi.0);
    }

    fn with_framebuffer(t: multiboot2::FramebufferType<'_>) -> BootInformation<'static> {
        let b = Builder::new()
            .mmap(MemoryMapTag::new(&[MemoryArea::new(
                0x10_0000,
                0x100_0000,
                MemoryAreaType::Available,
            )]))
            .framebuffer(multiboot2::FramebufferTag::new(
                0xfd00_0000,
                4096,
                1024,
                768,
                32,
                t,
            ));
        let built = std::boxed::Box::leak(b.build());
        let ptr = built as *const _ as *const u8 as *const BootInformationHeader;
        // SAFETY: the structure is leaked (lives forever) and was produced by the builder.
        unsafe { BootInformation::load(ptr).unwrap() }
    }

    #[test]
    fn parses_an_rgb_framebuffer() {
        use multiboot2::{FramebufferField as F, FramebufferType};
        let info = with_framebuffer(FramebufferType::RGB {
            red: F {
                position: 16,
                size: 8,
            },
            green: F {
                position: 8,
                size: 8,
            },
            blue: F {
                position: 0,
                size: 8,
            },
        });
        let fb = BootInfo::from_info(&info).unwrap().framebuffer.unwrap();
        assert_eq!(
            fb,
            Framebuffer {
                address: 0xfd00_0000,
                pitch: 4096,
                width: 1024,
                height: 768,
                bpp: 32,
                red: (16, 8),
                green: (8, 8),
                blue: (0, 8),
            }
        );
    }

    #[test]
    fn text_mode_and_no_tag_give_no_framebuffer() {
        let info = with_framebuffer(multiboot2::FramebufferType::Text);
        assert_eq!(BootInfo::from_info(&info).unwrap().framebuffer, None);
        assert_eq!(BootInfo::from_info(&build(true)).unwrap().framebuffer, None);
    }

    #[test]
    fn missing_memory_map_is_an_error() {
        assert_eq!(
            BootInfo::from_info(&build(false)).unwrap_err(),
            BootInfoError::NoMemoryMap
        );
    }

    #[test]
    fn bad_magic_is_rejected() {
        // SAFETY: the magic check fails before the pointer is used.
        let r = unsafe { BootInfo::from_multiboot2(0x2BADB002, 0) };
        assert_eq!(r.unwrap_err(), BootInfoError::BadMagic(0x2BADB002));
    }
}
