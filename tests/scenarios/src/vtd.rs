//! VT-d scenarios: the hypervisor owns the remapping unit and drives edu DMA through it
//! (`selftest=vtd`). The checks name the effects the kernel measured: bytes compared after DMA,
//! fault records read back from the unit (source, address, direction, reason), translations
//! walked in the tables, frames counted before and after.

use crate::checks::need_line;
use crate::{Exit, Machine, Scenario, Variant};

const SUITE: &[&str] = &[
    "vtd-test attach: PASS",
    "vtd-test dma-both-directions: PASS",
    "vtd-test fault-unmapped-write: PASS fault source=00:05.0 address=0x300000 access=Write",
    "vtd-test fault-unmapped-read: PASS fault source=00:05.0 address=0x300000 access=Read",
    "vtd-test fault-write-to-read-only: PASS fault source=00:05.0 address=0x700000 access=Write reason=WriteDenied",
    "vtd-test fault-interrupt: PASS",
    "vtd-test fault-interrupt-while-locked: PASS event taken with the unit lock held: true",
    "vtd-test stale-iotlb-before-flush: PASS",
    "vtd-test fault-after-unmap-and-flush: PASS flush released 0x200000: true; then fault source=00:05.0 address=0x200000 access=Write",
    "vtd-test superpage-2m: PASS",
    "vtd-test outside-domain-blocked: PASS",
    "vtd-test unattached-device-blocked: PASS 00:06.0 (not attached)",
    "vtd-test second-domain-dma: PASS",
    "vtd-test other-domain-iova-blocked: PASS",
    "vtd-test teardown-no-leak: PASS",
];

fn two_edus(iommu: &str) -> Machine {
    Machine {
        iommu: Some(iommu.into()),
        devices: vec!["edu,addr=0x5".into(), "edu,addr=0x6".into()],
        ..Machine::default()
    }
}

fn suite_check(levels: u8, caching: &'static str) -> crate::Check {
    Box::new(move |log| {
        need_line(
            log,
            &["vtd: unit 0: translation enabled (queued invalidation"],
        )?;
        need_line(log, &[&format!("vtd-test setup: 2 edu device(s), unit 0xfed90000, {levels}-level tables, caching mode {caching}")])?;
        for line in SUITE {
            need_line(log, &[line])?;
        }
        need_line(log, &["vtd-test summary:", "passed, 0 failed"])
    })
}

/// What the demo run must show of VT-d: the unit translating and edu DMA through it.
pub fn demo_check(log: &str) -> Result<(), String> {
    need_line(log, &["vtd: unit 0: translation enabled"])?;
    need_line(log, &["vtd-test dma-both-directions: PASS"])?;
    need_line(log, &["vtd-test summary:", "passed, 0 failed"])
}

/// The VT-d scenarios on `on`'s machine. On the second machine (`--matrix`) the suite runs
/// once: that machine already has aw-bits=48 (4-level tables) and caching mode on.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v = vec![];
    if on == Variant::Matrix {
        v.push(on.scenario(
            "vtd-dma",
            "the VT-d suite on the second machine: 4-level tables, caching mode on, OVMF, EPYC",
            two_edus("intel-iommu,intremap=on,eim=off"),
            "selftest=vtd",
            Exit::Success,
            suite_check(4, "on"),
        ));
    } else {
        v.extend([
            on.scenario(
                "vtd-dma",
                "edu DMA through VT-d (3-level, CM off): data both ways, faults decoded, stale IOTLB until flush, superpage, isolation, no leak",
                two_edus("intel-iommu,intremap=on,eim=off"),
                "selftest=vtd",
                Exit::Success,
                suite_check(3, "off"),
            ),
            on.scenario(
                "vtd-aw48",
                "the same suite with aw-bits=48: 4-level tables",
                two_edus("intel-iommu,intremap=on,eim=off,aw-bits=48"),
                "selftest=vtd",
                Exit::Success,
                suite_check(4, "off"),
            ),
            on.scenario(
                "vtd-caching-mode",
                "the same suite with caching-mode=on (flush on not-present -> present)",
                two_edus("intel-iommu,intremap=on,eim=off,caching-mode=on"),
                "selftest=vtd",
                Exit::Success,
                suite_check(3, "on"),
            ),
        ]);
    }
    let mut storm = on.scenario(
        "vtd-fault-storm",
        "four edu devices DMA to unmapped IOVAs: every record the unit made drained, faults it could not record seen as overflows (PFO observations, a lower bound of the lost faults), hypervisor alive, DMA works after",
        Machine {
            devices: (5..9).map(|d| format!("edu,addr={d:#x}")).collect(),
            ..Machine::default()
        },
        "selftest=vtd-storm",
        Exit::Success,
        Box::new(|log| {
            need_line(log, &["vtd-test storm-attach: PASS 4 devices"])?;
            need_line(log, &["vtd-test storm-records-drained: PASS"])?;
            need_line(log, &["vtd-test storm-overflows-observed: PASS"])?;
            need_line(log, &["vtd-test storm-interrupt-path: PASS"])?;
            need_line(log, &["vtd-test storm-then-dma-works: PASS"])?;
            need_line(log, &["vtd-test summary:", "passed, 0 failed"])
        }),
    );
    storm.timeout_secs = storm.timeout_secs.max(180);
    v.push(storm);
    v
}
