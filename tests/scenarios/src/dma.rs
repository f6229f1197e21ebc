//! Paravirtual DMA scenarios: a guest with the edu device maps its own pages through the PV
//! DMA hypercalls (`moat-pvdma` in the test guest) and drives edu's DMA through the IOVAs; the
//! checks name what the guest measured in its memory (bytes delivered, bytes not delivered
//! after UNMAP), the statuses the hypervisor returned, and the hypervisor's leak check.

use crate::checks::{boot_complete, need_line};
use crate::{scenario, BootModule, Exit, Machine, Scenario, TEST_GUEST};

fn guest(policy: &str, tests: &str) -> (String, Vec<BootModule>) {
    (
        format!("guest=name=g0,mem=64M,dev=00:05.0,policy={policy}"),
        vec![BootModule {
            file: TEST_GUEST,
            cmdline: format!("g0 {tests}"),
        }],
    )
}

/// The hypervisor's leak check after the guest stopped: nothing held, table pages back to
/// the domain's baseline, no IOVA live.
fn no_leak(log: &str) -> Result<(), String> {
    let line = log
        .lines()
        .find(|l| l.contains("guest g0: dma leak check:"))
        .ok_or("no leak-check line")?;
    for want in [
        "at stop 0 mapping(s), 0 pending, 0 pinned page(s)",
        "after teardown (ok) 0 mapping(s), 0 pending, 0 pinned page(s), 0 IOVA page(s) live",
    ] {
        if !line.contains(want) {
            return Err(format!("leak check: `{want}` missing in {line:?}"));
        }
    }
    let tables = |key: &str| -> Option<u64> {
        let i = line.find(key)? + key.len();
        line[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    match (tables("live, "), tables("(baseline ")) {
        (Some(a), Some(b)) if a == b => Ok(()),
        other => Err(format!(
            "table pages not back to the baseline: {other:?} in {line:?}"
        )),
    }
}

/// The PV DMA scenarios.
pub fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    for (policy, after_unmap) in [
        ("strict", "blocked"),
        ("batched", "blocked"),
        ("deferred", ""),
        ("passthrough", "landed"),
    ] {
        let (cmd, modules) = guest(policy, "dma-edu dma-batch=64");
        let mut s = scenario(
            format!("dma-{policy}"),
            "edu DMA through PV mappings both ways; what the device reaches after UNMAP; invalidations per batch; no leak",
            Machine::default(),
            &cmd,
            Exit::Success,
            Box::new(move |log| {
                boot_complete(log)?;
                need_line(log, &[&format!("guest g0: DMA: policy {}", capitalise(policy))])?;
                need_line(log, &[&format!("g0> dma-edu: policy {policy}")])?;
                need_line(log, &["g0> dma-edu: source", "round trip delivered the bytes"])?;
                if !after_unmap.is_empty() {
                    need_line(log, &["g0> dma-edu: DMA to IOVA", &format!("right after UNMAP returned: {after_unmap}")])?;
                } else {
                    need_line(log, &["g0> dma-edu:", "us after UNMAP (bound 10000 us, no exits in between) the DMA is blocked"])?;
                }
                need_line(log, &["g0> PASS dma-edu"])?;
                need_line(log, &[&format!("g0> dma-batch: policy {policy} batch 64: maps 64 ok")])?;
                need_line(log, &["g0> PASS dma-batch"])?;
                need_line(log, &["g0> moat-test-guest: 2 passed, 0 failed"])?;
                no_leak(log)
            }),
        );
        s.modules = modules;
        v.push(s);
    }
    let (cmd, modules) = guest("strict", "dma-faults");
    let mut s = scenario(
        "dma-fault-ring",
        "a DMA the IOMMU blocks is delivered to the guest's fault ring: IOVA, source id, direction, reason",
        Machine::default(),
        &cmd,
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> dma-faults: ring of 126 records:", "source 0x0028 (edu 0x0028) direction 2 reason 5 seq 0; dropped 0; MAP of the ring page: Some(Perm)"])?;
            need_line(log, &["g0> dma-faults: batch area over the fault ring: Some(Exist)"])?;
            need_line(log, &["g0> PASS dma-faults"])?;
            no_leak(log)
        }),
    );
    s.modules = modules;
    v.push(s);
    let mut s = scenario(
        "dma-batch-race",
        "another vCPU rewrites the batch entries during the MULTICALL: every OK entry is exactly one mapping, nothing else exists",
        Machine::default(),
        "guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy=batched",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> dma-race: 64 entries while vCPU 1 rewrote them", "other; live mappings after: 0"])?;
            need_line(log, &["g0> PASS dma-race"])?;
            no_leak(log)
        }),
    );
    s.modules = vec![BootModule {
        file: TEST_GUEST,
        cmdline: "g0 dma-race".into(),
    }];
    v.push(s);
    let (cmd, modules) = guest("strict", "dma-bad");
    let mut s = scenario(
        "dma-bad-input",
        "every bad PV DMA input gets its exact status and changes nothing",
        Machine::default(),
        &cmd,
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            if let Some(l) = log
                .lines()
                .find(|l| l.contains("g0> dma-bad:") && l.contains("WRONG"))
            {
                return Err(format!("wrong status: {l}"));
            }
            for row in [
                "unknown flag: Some(Inval)",
                "zero length: Some(Inval)",
                "overflowing length: Some(Range)",
                "gpa outside the guest: Some(Fault)",
                "hypervisor memory (host-physical 2 MiB): Some(Fault)",
                "overlap with a live mapping: Some(Exist)",
                "unmap never mapped: Some(Noent)",
                "partial unmap: Some(Inval)",
                "batch area outside the guest: Some(Fault)",
                "batch count",
                "entry with a reserved field set: Some(Inval)",
                "entry with an unknown op",
                "map of the batch area: Some(Perm)",
                "double unmap: NOENT ok",
            ] {
                need_line(log, &[&format!("g0> dma-bad: {row}")])?;
            }
            need_line(log, &["g0> PASS dma-bad"])?;
            no_leak(log)
        }),
    );
    s.modules = modules;
    v.push(s);

    let mut s = scenario(
        "dma-two-guests",
        "two guests with their own edu: neither can map the other's memory nor reach it with its device",
        Machine { devices: vec!["edu,addr=0x5".into(), "edu,addr=0x6".into()], ..Machine::default() },
        "guest=name=g0,mem=16M,dev=00:05.0,policy=strict guest=name=g1,mem=16M,dev=00:06.0,policy=strict",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g1> dma-hold: pages mapped at IOVAs 0x100000 0x101000 0x102000"])?;
            need_line(log, &["g0> dma-foreign: own IOVA 0x101000 reached its own page: true", "faulted 3 time(s) in this guest's domain", "Some(Fault)"])?;
            need_line(log, &["g1> dma-hold:", "the pages are intact"])?;
            need_line(log, &["g0> PASS dma-foreign"])?;
            need_line(log, &["g1> PASS dma-hold"])?;
            for g in ["g0", "g1"] {
                need_line(log, &[&format!("guest {g}: dma leak check: at stop 0 mapping(s), 0 pending, 0 pinned page(s)")])?;
            }
            Ok(())
        }),
    );
    s.modules = vec![
        BootModule {
            file: TEST_GUEST,
            cmdline: "g0 dma-foreign=1000".into(),
        },
        BootModule {
            file: TEST_GUEST,
            cmdline: "g1 dma-hold=4000".into(),
        },
    ];
    v.push(s);

    let mut s = scenario(
        "dma-smp",
        "4 vCPUs of one guest map and unmap concurrently: no IOVA held by two vCPUs at once, no leak",
        Machine { smp: 4, ..Machine::default() },
        "guest=name=g0,mem=64M,cpus=4,dev=00:05.0,policy=batched",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> dma-smp: 4 vCPUs, 1600 map+unmap operations, IOVA held by two vCPUs at once: 0 time(s); live mappings after: 0"])?;
            for k in 1..4 {
                need_line(log, &[&format!("g0> vcpu {k}: dma-smp worker done, 0 duplicate IOVA(s) seen")])?;
            }
            need_line(log, &["g0> PASS dma-smp"])?;
            no_leak(log)
        }),
    );
    s.modules = vec![BootModule {
        file: TEST_GUEST,
        cmdline: "g0 dma-smp=100".into(),
    }];
    v.push(s);

    let mut s = scenario(
        "dma-capacity",
        "the guest holds exactly the mappings QUERY promises (then NOMEM), although its other vCPU's magazines cache IOVAs and it makes no call",
        Machine::default(),
        "guest=name=g0,mem=112M,cpus=2,dev=00:05.0,policy=batched",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> dma-capacity: vCPU 1 mapped and unmapped 2000 pages; now idle"])?;
            let line = log
                .lines()
                .find(|l| l.contains("g0> dma-capacity: QUERY max_mappings"))
                .ok_or("no dma-capacity result line")?;
            let promised: u64 = number_after(line, "max_mappings ").ok_or("no max_mappings")?;
            let mapped: u64 = number_after(line, "mapped ").ok_or("no mapped count")?;
            if promised == 0 || mapped != promised {
                return Err(format!("mapped {mapped} of the {promised} promised: {line}"));
            }
            need_line(log, &["g0> dma-capacity:", "(1 NOMEM, 0 other error(s)), 0 IOVA(s) twice; unmapped with 0 failure(s); live mappings after: 0"])?;
            need_line(log, &["g0> PASS dma-capacity"])?;
            no_leak(log)
        }),
    );
    s.modules = vec![BootModule {
        file: TEST_GUEST,
        cmdline: "g0 dma-capacity".into(),
    }];
    v.push(s);

    let mut s = scenario(
        "dma-register-race",
        "two vCPUs race BATCH_REGISTER, FAULT_RING_REGISTER and MAP of the same page: never do both succeed",
        Machine::default(),
        "guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy=strict",
        Exit::Success,
        Box::new(|log| {
            boot_complete(log)?;
            for what in [
                "BATCH_REGISTER vs BATCH_REGISTER",
                "BATCH_REGISTER vs FAULT_RING_REGISTER",
                "BATCH_REGISTER vs MAP",
            ] {
                need_line(log, &[&format!("g0> dma-register-race: {what}:"), "both succeeded 0 time(s)"])?;
            }
            need_line(log, &["g0> PASS dma-register-race"])?;
            no_leak(log)
        }),
    );
    s.modules = vec![BootModule {
        file: TEST_GUEST,
        cmdline: "g0 dma-register-race".into(),
    }];
    v.push(s);
    v
}

/// The decimal number right after `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let i = line.find(key)? + key.len();
    line[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn capitalise(p: &str) -> String {
    let mut c = p.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}
