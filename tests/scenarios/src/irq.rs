//! Interrupt scenarios (`irq-*`, `msi-*`): what an assigned device can make the host take, and
//! the interrupts a guest gets from its device. Checks name the hypervisor's own counts and
//! what the guest observed, not only that something printed.

use crate::checks::{boot_complete, forbid_line, need_line};
use crate::{BootModule, Exit, Machine, Scenario, Variant, TEST_GUEST};

fn module(cmdline: &str) -> Vec<BootModule> {
    vec![BootModule {
        file: TEST_GUEST,
        cmdline: cmdline.to_string(),
    }]
}

/// An edu that can reach the interrupt window (32-bit DMA mask), at 00:05.0.
fn edu32() -> Machine {
    Machine {
        devices: vec!["edu,addr=0x5,dma_mask=0xffffffff".into()],
        ..Machine::default()
    }
}

/// The number in the hypervisor's `interrupts: vector V: N taken without a handler` line.
fn unowned(log: &str, vector: u32) -> u64 {
    let key = format!("interrupts: vector {vector}: ");
    log.lines()
        .find_map(|l| l.split(key.as_str()).nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// What `irq-host-vectors` must show: the guest wrote every vector, the hypervisor took the
/// exception-range ones as ignored external interrupts, never as exceptions.
fn host_vectors_check(log: &str, rounds: u64) -> Result<(), String> {
    boot_complete(log)?;
    remapping_on(log)?;
    for v in ["0x8", "0xe", "0x11", "0x12", "0x40", "0x99"] {
        need_line(
            log,
            &[&format!(
                "g0> irq-host-vectors: wrote MSI data {v} to 0xfee00000 {rounds} time(s)"
            )],
        )?;
    }
    need_line(log, &["g0> PASS irq-host-vectors"])?;
    need_line(log, &["vm: all guests stopped"])?;
    forbid_line(log, &["moat: exit Failure"])?;
    forbid_line(log, &["FATAL exception"])?;
    // QEMU 7.2's interrupt remapping lets compatibility-format writes through (blocking them
    // with CFI clear came in QEMU 8.0), so every write arrives at the host: each one must
    // have been counted as an ignored interrupt on its vector.
    for v in [8, 14, 17, 18, 0x99] {
        let n = unowned(log, v);
        if n != rounds {
            return Err(format!(
                "vector {v}: {n} counted as ignored interrupts, {rounds} sent"
            ));
        }
    }
    Ok(())
}

/// The hypervisor turned interrupt remapping on for the (only) unit.
fn remapping_on(log: &str) -> Result<(), String> {
    need_line(
        log,
        &[
            "vtd: unit 0: interrupt remapping enabled (xAPIC destinations",
            "CFI clear",
        ],
    )
}

/// The interrupt scenarios on `on`'s machine.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v = Vec::new();
    let no_ir = || Machine {
        iommu: Some("intel-iommu,intremap=off".into()),
        ..Machine::default()
    };
    let mut s = on.scenario(
        "irq-no-remapping-refused",
        "a guest assigned a device whose IOMMU unit does not remap interrupts (intremap=off) is refused with a clear line; the other guest runs",
        no_ir(),
        "guest=name=g0,mem=8M,dev=00:05.0 guest=name=g1,mem=8M",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["vtd: unit 0: no interrupt remapping (ECAP.IR clear)"])?;
            need_line(log, &["guest g0: not started: device 00:05.0: its IOMMU unit does not remap interrupts", "refused"])?;
            forbid_line(log, &["g0> "])?;
            need_line(log, &["g1> PASS hello"])?;
            need_line(log, &["vm: all guests stopped (1 started of 2 configured)"])
        }),
    );
    s.modules = vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: "g0 hello edu-bar".into(),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 hello".into(),
        },
    ];
    v.push(s);
    let mut s = on.scenario(
        "irq-unsafe-interrupts",
        "with `unsafe-interrupts` the same guest starts, and the risk is logged at boot and at assignment",
        no_ir(),
        "unsafe-interrupts guest=name=g0,mem=8M,dev=00:05.0",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["vtd: RISK: unsafe-interrupts on the command line"])?;
            need_line(log, &["guest g0: RISK: device 00:05.0 assigned although its IOMMU unit does not remap interrupts"])?;
            need_line(log, &["g0> PASS edu-bar"])?;
            need_line(log, &["guest g0 vcpu0: exited with code 0"])
        }),
    );
    s.modules = module("g0 edu-bar");
    v.push(s);
    let rounds = 3;
    let mut s = on.scenario(
        "irq-host-vectors",
        "a device DMAs MSI data naming host exception vectors (8, 14, 17, 18), the IOMMU's fault vector and an unused one to 0xFEE00000: counted and ignored, never fatal",
        edu32(),
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict",
        Exit::Success,
        Box::new(move |log| host_vectors_check(log, rounds)),
    );
    s.modules = module(&format!("g0 irq-host-vectors={rounds}"));
    v.push(s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unowned_count_is_read_from_its_line() {
        let log =
            "[ 1.0] INFO  cpu0 idt: interrupts: vector 8: 3 taken without a handler (ignored)";
        assert_eq!(unowned(log, 8), 3);
        assert_eq!(unowned(log, 18), 0);
    }
}
