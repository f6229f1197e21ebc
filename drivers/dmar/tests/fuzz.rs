//! Property tests: arbitrary corruptions of the real QEMU table never make the
//! parser panic, read out of bounds or loop, and whatever it accepts is
//! internally consistent.

mod common;

use std::fmt::Write;

use common::*;
use moat_dmar::*;
use proptest::prelude::*;

/// Uses every accessor on whatever the parser accepted.
fn exercise(bytes: &[u8]) {
    let mut out = String::new();
    let header = Dmar::parse_header(bytes);
    let full = Dmar::parse(bytes);
    if full.is_ok() {
        assert!(header.is_ok());
    }
    let Ok(dmar) = header else { return };
    assert!(dmar.as_bytes().len() <= bytes.len());
    let _ = (dmar.host_address_width(), dmar.flags(), dmar.revision());
    let mut steps = 0;
    for s in dmar.structures() {
        steps += 1;
        assert!(
            steps <= bytes.len() / 4 + 1,
            "structure walk does not advance"
        );
        match s {
            Ok(s) => {
                let _ = write!(out, "{s}");
                for scope in s.scopes() {
                    match scope {
                        Ok(scope) => {
                            let _ = write!(out, "{scope}");
                            let _ = scope.resolve(0, &|_| {
                                Some(BusRange {
                                    secondary: 1,
                                    subordinate: 9,
                                })
                            });
                        }
                        Err(e) => {
                            assert!(full.is_err());
                            let _ = write!(out, "{e}");
                        }
                    }
                }
            }
            Err(e) => {
                // validate() may have stopped earlier, at a scope error.
                assert!(full.is_err());
                let _ = write!(out, "{e}");
            }
        }
    }
    if let Err(e) = full {
        let _ = write!(out, "{e}");
    }
    let f = PciFunction::new(0, 0, 1, 0);
    let _ = dmar.find_drhd(f, &NoBridges);
    let _ = dmar.rmrrs_for(f, &NoBridges).count();
    let _ = dmar.find_ioapic(0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn mutated_real_table(
        edits in prop::collection::vec((0usize..200, any::<u8>()), 0..8),
        cut in 0usize..=200,
        extra in prop::collection::vec(any::<u8>(), 0..64),
        fix in any::<bool>(),
    ) {
        let mut t = QEMU_DMAR_ATS.to_vec();
        t.extend_from_slice(&extra);
        for (i, b) in edits {
            if let Some(slot) = t.get_mut(i) {
                *slot = b;
            }
        }
        t.truncate(cut);
        // Fixing the header makes the corruption reach the structure walk.
        if fix && t.len() >= 48 {
            fix_header(&mut t);
        }
        exercise(&t);
    }

    #[test]
    fn random_bodies(body in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut t = QEMU_DMAR[..48].to_vec();
        t.extend_from_slice(&body);
        fix_header(&mut t);
        exercise(&t);
    }
}
