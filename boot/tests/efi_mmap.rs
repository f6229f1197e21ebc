//! A UEFI memory map with many entries, as real firmware gives it: hundreds of descriptors,
//! a descriptor size larger than the structure (48 or 56 bytes, not 40). Kept in order up to
//! `MAX_REGIONS`, the rest counted as dropped, each type mapped to its kind.

use moat_boot::info::MAX_REGIONS;
use moat_boot::{BootInfo, MemoryKind};
use multiboot2::{BootInformation, BootInformationHeader, Builder, EFIMemoryMapTag};
use proptest::prelude::*;

/// UEFI memory types and the kind each must become.
const TYPES: [(u32, MemoryKind); 9] = [
    (0, MemoryKind::Reserved),        // EfiReservedMemoryType
    (1, MemoryKind::Usable),          // LoaderCode
    (2, MemoryKind::Usable),          // LoaderData
    (3, MemoryKind::Usable),          // BootServicesCode
    (4, MemoryKind::Usable),          // BootServicesData
    (5, MemoryKind::Reserved),        // RuntimeServicesCode
    (7, MemoryKind::Usable),          // ConventionalMemory
    (9, MemoryKind::AcpiReclaimable), // ACPIReclaimMemory
    (10, MemoryKind::AcpiNvs),        // ACPIMemoryNVS
];

fn boot_info(descs: &[(u32, u64, u64)], desc_size: usize) -> BootInfo {
    let mut bytes = Vec::new();
    for &(ty, start, pages) in descs {
        let mut d = vec![0u8; desc_size];
        d[0..4].copy_from_slice(&ty.to_le_bytes());
        d[8..16].copy_from_slice(&start.to_le_bytes());
        d[24..32].copy_from_slice(&pages.to_le_bytes());
        d[32..40].copy_from_slice(&0xfu64.to_le_bytes());
        // Padding past the structure: firmware may put anything there.
        for b in d.iter_mut().skip(40) {
            *b = 0xa5;
        }
        bytes.extend_from_slice(&d);
    }
    let tag = EFIMemoryMapTag::new_from_map(desc_size as u32, 1, &bytes);
    let built = Box::leak(Builder::new().efi_mmap(tag).build());
    let ptr = built as *const _ as *const u8 as *const BootInformationHeader;
    // SAFETY: leaked (lives forever), produced by the builder.
    let info: BootInformation<'static> = unsafe { BootInformation::load(ptr).unwrap() };
    BootInfo::from_info(&info).unwrap()
}

proptest! {
    #[test]
    fn many_entries(
        entries in proptest::collection::vec((0usize..TYPES.len(), 0u64..64), 1..400),
        desc_size in prop::sample::select(vec![40usize, 48, 56]),
    ) {
        // Consecutive ranges; a page count of 0 is a zero-length region (skipped, not kept).
        let mut at = 0u64;
        let descs: Vec<(u32, u64, u64)> = entries
            .iter()
            .map(|&(t, pages)| {
                let d = (TYPES[t].0, at, pages);
                at += pages * 4096 + 4096;
                d
            })
            .collect();
        let bi = boot_info(&descs, desc_size);
        prop_assert!(bi.efi_memory_map);
        let nonempty: Vec<_> = entries.iter().zip(&descs).filter(|(e, _)| e.1 > 0).collect();
        let kept = nonempty.len().min(MAX_REGIONS);
        prop_assert_eq!(bi.memory_map().len(), kept);
        prop_assert_eq!(bi.regions_dropped, nonempty.len() - kept);
        for (r, ((t, pages), d)) in bi.memory_map().iter().zip(&nonempty) {
            prop_assert_eq!(r.start, d.1);
            prop_assert_eq!(r.len, pages * 4096);
            prop_assert_eq!(r.kind, TYPES[*t].1);
        }
    }
}
