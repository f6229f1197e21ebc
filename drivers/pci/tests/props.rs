//! Property test: for any layout of BARs the model can express, probing finds
//! exactly that layout, never writes a BAR with decode on, and leaves every
//! register as it was.

mod common;

use common::*;
use moat_pci::*;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Spec {
    None,
    Io {
        size_log2: u32,
        port: u16,
    },
    Mem32 {
        size_log2: u32,
        addr: u32,
        prefetch: bool,
    },
    Mem64 {
        size_log2: u32,
        addr: u64,
        prefetch: bool,
    },
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        Just(Spec::None),
        (2u32..=8, any::<u16>()).prop_map(|(size_log2, port)| Spec::Io { size_log2, port }),
        (4u32..=31, any::<u32>(), any::<bool>()).prop_map(|(size_log2, addr, prefetch)| {
            Spec::Mem32 {
                size_log2,
                addr,
                prefetch,
            }
        }),
        (4u32..=63, any::<u64>(), any::<bool>()).prop_map(|(size_log2, addr, prefetch)| {
            Spec::Mem64 {
                size_log2,
                addr,
                prefetch,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn probing_finds_the_modelled_bars(
        specs in prop::collection::vec(spec(), 6),
        command in 0u32..0x800,
    ) {
        let at = bdf(0, 8, 0);
        let mut f = FakeFunction::endpoint(0x1234, 0x5678, 0xff, 0, 0).command(command);
        let mut expected: Vec<Bar> = Vec::new();
        let mut i = 0;
        while i < 6 {
            match specs[i] {
                Spec::None => {}
                Spec::Io { size_log2, port } => {
                    let size = 1u32 << size_log2;
                    let port = port & !(size as u16 - 1);
                    f = f.io_bar(i, port, size);
                    expected.push(Bar { index: i as u8, kind: BarKind::Io, prefetchable: false, address: u64::from(port), size: u64::from(size) });
                }
                Spec::Mem32 { size_log2, addr, prefetch } => {
                    let size = 1u32 << size_log2;
                    let addr = addr & !(size - 1);
                    f = f.mem32_bar(i, addr, size, prefetch);
                    expected.push(Bar { index: i as u8, kind: BarKind::Memory32, prefetchable: prefetch, address: u64::from(addr), size: u64::from(size) });
                }
                Spec::Mem64 { size_log2, addr, prefetch } if i < 5 => {
                    let size = 1u64 << size_log2;
                    let addr = addr & !(size - 1);
                    f = f.mem64_bar(i, addr, size, prefetch);
                    expected.push(Bar { index: i as u8, kind: BarKind::Memory64, prefetchable: prefetch, address: addr, size });
                    i += 1;
                }
                Spec::Mem64 { .. } => {}
            }
            i += 1;
        }
        let cfg = FakeSpace::new().with(at, f);
        let before = cfg.function(at);
        let bars = probe_bars(&cfg, at).unwrap();
        prop_assert_eq!(bars.iter().collect::<Vec<_>>(), expected);
        prop_assert_eq!(cfg.violations.get(), 0);
        let after = cfg.function(at);
        for off in (0..0x40).step_by(4) {
            prop_assert_eq!(after.reg(off), before.reg(off));
        }
    }
}
