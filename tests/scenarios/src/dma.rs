//! Paravirtual DMA scenarios: a guest with the edu device maps its own pages through the PV
//! DMA hypercalls (`moat-pvdma` in the test guest) and drives edu's DMA through the IOVAs; the
//! checks name what the guest measured in its memory (bytes delivered, bytes not delivered
//! after UNMAP), the statuses the hypervisor returned, and the hypervisor's leak check.

use crate::checks::{boot_complete, need_line};
use crate::guests::{find_line, number_after, two_edus};
use crate::{Machine, Scenario, Spec, Variant};

/// One guest with 64 MiB and the edu at 00:05.0 under `policy`.
fn g0(policy: &str) -> String {
    format!("guest=name=g0,mem=64M,dev=00:05.0,policy={policy}")
}

/// The hypervisor's leak check after the guest stopped: nothing held, table pages back to
/// the domain's baseline, no IOVA live.
pub(crate) fn no_leak(log: &str) -> Result<(), String> {
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

/// Without an IOMMU, MAP returns the host-physical address of the guest's pages: the IOVA on
/// the guest's line (`{guest}> {prefix}` ... `{gpa_key}` GPA ... `{iova_key}` IOVA) equals the
/// partition's host base (the hypervisor's `guest {guest}: N MiB at host 0x...` line) plus
/// the GPA, and differs from the GPA.
pub(crate) fn iova_is_host_address(
    log: &str,
    guest: &str,
    prefix: &str,
    gpa_key: &str,
    iova_key: &str,
) -> Result<(), String> {
    let host_line = find_line(log, &[&format!("guest {guest}: "), "MiB at host"])?;
    let host = number_after(host_line, "MiB at host").ok_or("no host address")?;
    let line = find_line(log, &[&format!("{guest}> {prefix}"), iova_key])?;
    let gpa = number_after(line, gpa_key).ok_or("no GPA on the MAP line")?;
    let iova = number_after(line, iova_key).ok_or("no IOVA on the MAP line")?;
    if host == 0 || iova != host + gpa {
        return Err(format!(
            "MAP returned IOVA {iova:#x} for GPA {gpa:#x}, the partition is at host {host:#x}: not the host-physical address"
        ));
    }
    Ok(())
}

/// The PV DMA scenarios on `on`'s machine: each checks first that the boot ran to the end.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v: Vec<Spec> = Vec::new();
    for (policy, after_unmap) in [
        ("strict", "blocked"),
        ("batched", "blocked"),
        ("deferred", ""),
        ("passthrough", "landed"),
    ] {
        v.push(Spec {
            name: format!("dma-{policy}"),
            about: "edu DMA through PV mappings both ways; what the device reaches after UNMAP; invalidations per batch; no leak",
            cmdline: g0(policy),
            modules: &["g0 dma-edu dma-batch=64"],
            then: Some(Box::new(move |log| {
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
            })),
            ..Spec::default()
        });
    }
    v.extend([
        Spec {
            name: "dma-fault-ring".into(),
            about: "a DMA the IOMMU blocks is delivered to the guest's fault ring: IOVA, source id, direction, reason",
            cmdline: g0("strict"),
            modules: &["g0 dma-faults"],
            need: &[
                &["g0> dma-faults: ring of 126 records:", "source 0x0028 (edu 0x0028) direction 2 reason 5 seq 0; dropped 0; MAP of the ring page: Some(Perm)"],
                &["g0> dma-faults: batch area over the fault ring: Some(Exist)"],
                &["g0> PASS dma-faults"],
            ],
            then: Some(Box::new(no_leak)),
            ..Spec::default()
        },
        Spec {
            name: "dma-batch-race".into(),
            about: "another vCPU flips MAP entries' GPA in and out of the guest during the MULTICALL: every OK entry maps its in-guest page (DMA lands there), every other is FAULT and creates nothing",
            cmdline: "guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy=batched".into(),
            modules: &["g0 dma-race"],
            need: &[&["g0> PASS dma-race"]],
            then: Some(Box::new(|log| {
                race_check(log)?;
                no_leak(log)
            })),
            ..Spec::default()
        },
        Spec {
            name: "dma-passthrough-no-iommu".into(),
            about: "iommu=off: passthrough still works, MAP returns the host-physical address and edu DMA through it delivers the bytes both ways; the assignment needs unsafe-interrupts and logs the risk",
            cmdline: "iommu=off unsafe-interrupts guest=name=g0,mem=64M,dev=00:05.0,policy=passthrough".into(),
            modules: &["g0 dma-edu"],
            need: &[
                &["vtd: iommu=off on the command line"],
                &["guest g0: RISK: device 00:05.0 assigned with no IOMMU"],
                &["guest g0: DMA: policy Passthrough WITHOUT an IOMMU"],
                &["g0> dma-edu: source", "round trip delivered the bytes"],
                &["g0> PASS dma-edu"],
                &["guest g0: no IOMMU: its device(s) cannot be blocked at stop"],
            ],
            then: Some(Box::new(|log| {
                iova_is_host_address(log, "g0", "dma-edu: source", "source", "-> IOVA")
            })),
            ..Spec::default()
        },
        Spec {
            name: "dma-no-iommu-refused".into(),
            about: "iommu=off: a guest asking strict for its device is refused (the policy needs an IOMMU), one asking passthrough without unsafe-interrupts too; a guest without devices runs",
            machine: two_edus(),
            cmdline: "iommu=off guest=name=g0,mem=8M,dev=00:05.0,policy=strict guest=name=g1,mem=8M,dev=00:06.0,policy=passthrough guest=name=g2,mem=8M".into(),
            modules: &["g0 hello", "g1 hello", "g2 hello"],
            need: &[
                &["guest g0: not started: DMA: policy strict needs an IOMMU", "00:05.0 is not behind an enabled VT-d unit"],
                &["guest g1: not started: device 00:06.0: no IOMMU translates it", "refused"],
                &["g2> PASS hello"],
                &["vm: all guests stopped (1 started of 3 configured)"],
            ],
            forbid: &[&["g0> "], &["g1> "]],
            ..Spec::default()
        },
        Spec {
            name: "dma-bad-input".into(),
            about: "every bad PV DMA input gets its exact status and changes nothing",
            cmdline: g0("strict"),
            modules: &["g0 dma-bad"],
            need: &[
                &["g0> dma-bad: unknown flag: Some(Inval)"],
                &["g0> dma-bad: zero length: Some(Inval)"],
                &["g0> dma-bad: overflowing length: Some(Range)"],
                &["g0> dma-bad: gpa outside the guest: Some(Fault)"],
                &["g0> dma-bad: GPA 0x200000 (the hypervisor's host-physical load address): MAP Ok, a DMA through it read the guest's own page: true ok"],
                &["g0> dma-bad: unmap at 0xfee00000 (past a 28-bit IOVA width): Some(Range)"],
                &["g0> dma-bad: overlap with a live mapping: Some(Exist)"],
                &["g0> dma-bad: unmap never mapped: Some(Noent)"],
                &["g0> dma-bad: partial unmap: Some(Inval)"],
                &["g0> dma-bad: batch area outside the guest: Some(Fault)"],
                &["g0> dma-bad: batch count"],
                &["g0> dma-bad: entry with a reserved field set: Some(Inval)"],
                &["g0> dma-bad: entry with an unknown op"],
                &["g0> dma-bad: map of the batch area: Some(Perm)"],
                &["g0> dma-bad: batch area whose end overflows: Some(Fault)"],
                &["g0> dma-bad: fault ring whose end overflows: Some(Fault)"],
                &["g0> dma-bad: errors counted for the"],
                &["g0> dma-bad: refused MULTICALL with cursor 0x100000005: Some(Noent) RDX 0x100000005 stop 3 ok"],
                &["g0> dma-bad: STATS RESET:"],
                &["g0> dma-bad: double unmap: NOENT ok"],
                &["g0> PASS dma-bad"],
            ],
            then: Some(Box::new(|log| {
                no_wrong_line(log, "g0> dma-bad:", "wrong status")?;
                no_leak(log)
            })),
            ..Spec::default()
        },
        Spec {
            name: "dma-two-guests".into(),
            about: "two guests with their own edu: neither can map the other's memory nor reach any IOVA the other holds with its device",
            machine: two_edus(),
            cmdline: "guest=name=g0,mem=16M,dev=00:05.0,policy=strict guest=name=g1,mem=16M,dev=00:06.0,policy=strict".into(),
            modules: &["g0 dma-foreign=1000", "g1 dma-hold=4000"],
            need: &[
                &["g0> dma-foreign: own IOVA", "reached its own page: true", "Some(Fault)"],
                &["g1> dma-hold:", "the pages are intact"],
                &["g0> PASS dma-foreign"],
                &["g1> PASS dma-hold"],
                &["guest g0: dma leak check: at stop 0 mapping(s), 0 pending, 0 pinned page(s)"],
                &["guest g1: dma leak check: at stop 0 mapping(s), 0 pending, 0 pinned page(s)"],
            ],
            then: Some(Box::new(two_guests_check)),
            ..Spec::default()
        },
        Spec {
            name: "dma-smp".into(),
            about: "4 vCPUs of one guest map IOVAs and the next vCPU unmaps them: IOVAs move between vCPUs, none held twice, no leak",
            machine: Machine { smp: 4, ..Machine::default() },
            cmdline: "guest=name=g0,mem=64M,cpus=4,dev=00:05.0,policy=batched".into(),
            modules: &["g0 dma-smp=100"],
            need: &[
                &["g0> vcpu 1: dma-smp worker done, 0 duplicate IOVA(s) seen"],
                &["g0> vcpu 2: dma-smp worker done, 0 duplicate IOVA(s) seen"],
                &["g0> vcpu 3: dma-smp worker done, 0 duplicate IOVA(s) seen"],
                &["g0> PASS dma-smp"],
            ],
            then: Some(Box::new(|log| {
                smp_check(log)?;
                no_leak(log)
            })),
            ..Spec::default()
        },
    ]);

    // The hot path without shared locks, under load: 2 vCPUs mapping and unmapping at full
    // speed (half of each vCPU's mappings unmapped on the other vCPU), while vCPU 0 probes
    // with edu that a page is unreachable once its UNMAP returned.
    for policy in ["strict", "batched"] {
        v.push(Spec {
            name: format!("dma-concurrent-2vcpu-{policy}"),
            about: "2 vCPUs map and unmap at full speed (single calls and MULTICALLs, cross-vCPU unmaps): no IOVA live twice, the hypervisor's accounting exact at every sync point, edu cannot reach a page after its UNMAP returned, no leak",
            machine: Machine { smp: 2, ..Machine::default() },
            cmdline: format!("guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy={policy}"),
            modules: &["g0 dma-concurrent=48"],
            need: &[&["g0> vcpu 1: dma-concurrent worker done"], &["g0> PASS dma-concurrent"]],
            then: Some(Box::new(move |log| {
                concurrent_check(log, policy)?;
                if let Some(l) = log.lines().find(|l| l.contains("refused by the allocator")) {
                    return Err(format!("the IOVA allocator refused a free: {l:?}"));
                }
                no_leak(log)
            })),
            ..Spec::default()
        });
    }

    // A 32-bit device (e1000e): the MSI window lies inside its IOVA space.
    v.push(Spec {
        name: "dma-msi-window".into(),
        about: "a guest with a 32-bit device (e1000e): QUERY lists the MSI window, UNMAP there is PERM, MAP never hands it out",
        machine: Machine {
            devices: vec!["e1000e,addr=0x4".into()],
            extra: vec!["-nic".into(), "none".into()],
            ..Machine::default()
        },
        cmdline: "guest=name=g0,mem=16M,dev=00:04.0,policy=strict".into(),
        modules: &["g0 dma-msi"],
        need: &[
            &["pci: 00:04.0 8086:10d3"],
            &["g0> dma-msi: policy strict IOVA width 32"],
            &["g0> dma-msi: QUERY lists the MSI window [0xfee00000, 0xfef00000): true ok"],
            &["g0> dma-msi: UNMAP first page of the MSI window", "Some(Perm) (want Some(Perm)) ok"],
            &["g0> dma-msi: UNMAP last page of the MSI window", "Some(Perm) (want Some(Perm)) ok"],
            &["g0> dma-msi: UNMAP range reaching into the MSI window", "Some(Perm) (want Some(Perm)) ok"],
            &["g0> dma-msi: MAP returned IOVA", "inside the width: true ok"],
            &["g0> PASS dma-msi"],
        ],
        then: Some(Box::new(|log| {
            no_wrong_line(log, "g0> dma-msi:", "wrong answer")?;
            no_leak(log)
        })),
        ..Spec::default()
    });
    let mut v: Vec<Scenario> = v
        .into_iter()
        .map(|spec| spec.on(on, boot_complete))
        .collect();

    for (name, policy, about) in [
        (
            "dma-deferred-bound",
            "deferred",
            "worst stale window after UNMAP with real edu DMA (plain, entry 0 of a long MULTICALL, during MULTICALL storms): writes land, never later than the bound",
        ),
        (
            "dma-strict-bound",
            "strict",
            "the same measurement under strict: no device write lands after UNMAP returned",
        ),
    ] {
        // Deterministic virtual time (instruction counting): the device's timer, the
        // hypervisor's timer and the TSC all advance with the instructions executed, so a
        // vCPU thread descheduled by a busy host cannot make a device write look late (or
        // early). Without it, this measures the host's scheduler as much as the hypervisor.
        // (Strict needs no clock: no write may land after UNMAP returned, whatever the time.)
        // `shift=3`: 8 ns of virtual time per instruction, fine enough that the other vCPU's
        // round-robin slice does not distort the guest's measurement (it starts the clock
        // before the UNMAP call, so the window it reports is never shorter than the true
        // one); coarser shifts let the measurement exceed the bound while the hypervisor's
        // own record (the `dma stats` line) shows its flushes were on time.
        let machine = Machine {
            extra: if policy == "deferred" {
                vec!["-icount".into(), "shift=3,sleep=off".into()]
            } else {
                vec![]
            },
            ..Machine::default()
        };
        let mut s = Spec {
            name: name.into(),
            about,
            machine,
            cmdline: format!("guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy={policy}"),
            modules: &["g0 dma-stale=12"],
            need: &[&["g0> PASS dma-stale"]],
            then: Some(Box::new(move |log| {
                stale_check(log, policy == "deferred")?;
                if policy == "deferred" {
                    // The hypervisor's own record: the oldest unmap's age when each
                    // time-bound flush completed stayed within the bound QUERY gave.
                    let line = crate::guests::find_line(log, &["guest g0: dma stats:"])?;
                    let age = number_after(line, "oldest unmap at most ")
                        .ok_or("no deferred flush age in the dma stats line")?;
                    if age > 10_000 {
                        return Err(format!(
                            "a deferred flush completed {age} us after its oldest unmap (bound 10000 us): {line}"
                        ));
                    }
                }
                no_leak(log)
            })),
            ..Spec::default()
        }
        .on(on, boot_complete);
        // Instruction counting runs the vCPUs round-robin on one host thread: slow in wall
        // time (about a minute; two on the 4-CPU matrix machine on a busy host).
        s.timeout_secs = s.timeout_secs.max(360);
        v.push(s);
    }

    v.extend(
        [
            Spec {
                name: "dma-stop-blocks-device".into(),
                about: "a guest stops with an edu DMA into its memory still pending: the device is blocked at stop and its DMA faults",
                cmdline: "guest=name=g0,mem=16M,dev=00:05.0,policy=passthrough guest=name=g1,mem=8M".into(),
                modules: &["g0 dma-stop", "g1 spin=25"],
                need: &[&["g1> PASS spin"], &["vm: all guests stopped"]],
                then: Some(Box::new(|log| {
                    let started = line_index(log, &["g0> dma-stop: DMA to IOVA", "started"])?;
                    let stopped = line_index(log, &["guest g0 vcpu0: exited with code 0"])?;
                    let fault = line_index(log, &["vtd: fault after guest stop: unit", "source 00:05.0"])?;
                    if !(started < stopped && stopped < fault) {
                        return Err(format!(
                            "order: DMA started on line {started}, guest stopped on line {stopped}, fault on line {fault}"
                        ));
                    }
                    Ok(())
                })),
                ..Spec::default()
            },
            Spec {
                name: "dma-capacity".into(),
                about: "the guest holds exactly the mappings QUERY promises (then NOMEM), although its other vCPU's magazines cache IOVAs and it makes no call",
                cmdline: "guest=name=g0,mem=112M,cpus=2,dev=00:05.0,policy=batched".into(),
                modules: &["g0 dma-capacity"],
                need: &[
                    &["g0> dma-capacity: vCPU 1 mapped and unmapped 2000 pages; now idle"],
                    &["g0> dma-capacity:", "(1 NOMEM, 0 other error(s)), 0 IOVA(s) twice; unmapped with 0 failure(s); live mappings after: 0"],
                    &["g0> PASS dma-capacity"],
                ],
                then: Some(Box::new(|log| {
                    let line = find_line(log, &["g0> dma-capacity: QUERY max_mappings"])
                        .map_err(|_| "no dma-capacity result line")?;
                    let promised: u64 = number_after(line, "max_mappings ").ok_or("no max_mappings")?;
                    let mapped: u64 = number_after(line, "mapped ").ok_or("no mapped count")?;
                    if promised == 0 || mapped != promised {
                        return Err(format!("mapped {mapped} of the {promised} promised: {line}"));
                    }
                    no_leak(log)
                })),
                ..Spec::default()
            },
            Spec {
                name: "dma-register-race".into(),
                about: "two vCPUs race BATCH_REGISTER, FAULT_RING_REGISTER and MAP of the same page: never do both succeed",
                cmdline: "guest=name=g0,mem=64M,cpus=2,dev=00:05.0,policy=strict".into(),
                modules: &["g0 dma-register-race"],
                need: &[
                    &["g0> dma-register-race: BATCH_REGISTER vs BATCH_REGISTER:", "both succeeded 0 time(s)"],
                    &["g0> dma-register-race: BATCH_REGISTER vs FAULT_RING_REGISTER:", "both succeeded 0 time(s)"],
                    &["g0> dma-register-race: BATCH_REGISTER vs MAP:", "both succeeded 0 time(s)"],
                    &["g0> PASS dma-register-race"],
                ],
                then: Some(Box::new(no_leak)),
                ..Spec::default()
            },
        ]
        .map(|spec| spec.on(on, boot_complete)),
    );
    v
}

/// No line starting with `prefix` says WRONG.
fn no_wrong_line(log: &str, prefix: &str, what: &str) -> Result<(), String> {
    match log
        .lines()
        .find(|l| l.contains(prefix) && l.contains("WRONG"))
    {
        Some(l) => Err(format!("{what}: {l}")),
        None => Ok(()),
    }
}

fn line_index(log: &str, parts: &[&str]) -> Result<usize, String> {
    log.lines()
        .position(|l| parts.iter().all(|p| l.contains(p)))
        .ok_or_else(|| format!("no line containing all of {parts:?}"))
}

/// `dma-race`'s summary: rewrites happened during a MULTICALL, every OK entry's DMA reached
/// its own page and was unmapped once, FAULT entries left their pages untouched, nothing
/// else.
fn race_check(log: &str) -> Result<(), String> {
    let l = find_line(log, &["g0> dma-race:", "MAP entries while vCPU 1 flipped"])?;
    let n = |key: &str| number_after(l, key).ok_or(format!("no `{key}` in {l:?}"));
    let overlap = n("rewrites,")?;
    let ok = n(";")?;
    let landed = n("reached the entry's own page:")?;
    let unmapped = n("unmapped once:")?;
    let fault = n("),")?;
    let untouched = n("their pages untouched:")?;
    if overlap == 0 || ok == 0 || fault == 0 {
        return Err(format!("the race was not exercised: {l:?}"));
    }
    if landed != ok || unmapped != ok || untouched != fault {
        return Err(format!("entries inconsistent with their status: {l:?}"));
    }
    for want in [
        "live mappings matched: true",
        "0 other; live mappings after: 0",
    ] {
        if !l.contains(want) {
            return Err(format!("`{want}` missing in {l:?}"));
        }
    }
    Ok(())
}

/// `dma-foreign` wrote to three IOVAs; `dma-hold` in the other guest held each of them at
/// the time, and each write faulted in the writer's domain.
fn two_guests_check(log: &str) -> Result<(), String> {
    let held_line = find_line(log, &["g1> dma-hold: pages mapped at IOVAs"])?;
    let list = &held_line[held_line.find("IOVAs").unwrap_or(0) + 5..];
    let held: Vec<u64> = list
        .split(';')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    let writes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("g0> dma-foreign: write to IOVA"))
        .collect();
    if writes.len() != 3 {
        return Err(format!("{} foreign write line(s), want 3", writes.len()));
    }
    for w in writes {
        let iova = number_after(w, "write to IOVA").ok_or(format!("no IOVA in {w:?}"))?;
        if !held.contains(&iova) {
            return Err(format!(
                "{iova:#x} was not held by the other guest (it held {held:x?})"
            ));
        }
        if number_after(w, &format!("{iova:#x}:")).unwrap_or(0) == 0 {
            return Err(format!("the write did not fault: {w:?}"));
        }
    }
    Ok(())
}

/// `dma-concurrent`'s summary: enough work on both vCPUs and across them, every accounting
/// check exact, no IOVA live twice, every probe made and none reached the page.
fn concurrent_check(log: &str, policy: &str) -> Result<(), String> {
    let l = find_line(
        log,
        &[&format!("g0> dma-concurrent: policy {policy}, 2 vCPUs,")],
    )?;
    let n = |key: &str| number_after(l, key).ok_or(format!("no `{key}` in {l:?}"));
    let ops = n("2 vCPUs,")?;
    let cross = n("operations (")?;
    let checks = n("other vCPU),")?;
    let mismatches = n("exact,")?;
    let dups = n("live twice:")?;
    let probes = n("returned:")?;
    let reachable = n("reachable:")?;
    let live = n("live mappings after:")?;
    // 48 rounds: 8 maps per round and vCPU, half of them handed to the other vCPU; a sync
    // point every 8 rounds and 2 at the end; a probe every 4 rounds.
    if ops < 2 * 48 * 6 || cross < 48 || checks != 8 || probes != 12 {
        return Err(format!("too little work or checks: {l:?}"));
    }
    if mismatches != 0 || dups != 0 || reachable != 0 || live != 0 {
        return Err(format!(
            "IOVA live twice, accounting off or page reachable: {l:?}"
        ));
    }
    Ok(())
}

/// `dma-smp`'s summary: IOVAs moved between vCPUs, none held twice, nothing left.
fn smp_check(log: &str) -> Result<(), String> {
    let l = find_line(log, &["g0> dma-smp: 4 vCPUs, 1600 map+unmap operations"])?;
    let cross =
        number_after(l, "IOVAs reused across vCPUs:").ok_or(format!("no reuse count in {l:?}"))?;
    if cross == 0 {
        return Err(format!("no IOVA reused across vCPUs: {l:?}"));
    }
    if !l.contains(
        "IOVA held by two vCPUs at once: 0 time(s); slots still held: 0; live mappings after: 0",
    ) {
        return Err(format!("IOVA held twice or left: {l:?}"));
    }
    Ok(())
}

/// `dma-stale`'s summary: `deferred`: at least 30 UNMAPs, some writes landed after UNMAP,
/// none later than the bound; otherwise none landed.
fn stale_check(log: &str, deferred: bool) -> Result<(), String> {
    let l = find_line(
        log,
        &["g0> dma-stale:", "unmaps,", "landed, worst stale window"],
    )?;
    let n = |key: &str| number_after(l, key).ok_or(format!("no `{key}` in {l:?}"));
    let unmaps = n("dma-stale:")?;
    let landed = n("unmaps,")?;
    let worst = n("worst stale window")?;
    let bound = n("(bound")?;
    if unmaps < 30 {
        return Err(format!("only {unmaps} UNMAPs measured: {l:?}"));
    }
    if deferred {
        if bound == 0 {
            return Err(format!("no deferred bound reported: {l:?}"));
        }
        if landed == 0 {
            return Err(format!(
                "no write landed after UNMAP: the test cannot see stale translations: {l:?}"
            ));
        }
        if worst > bound {
            return Err(format!(
                "a write landed {worst} us after UNMAP, bound {bound} us: {l:?}"
            ));
        }
    } else if landed != 0 {
        return Err(format!("writes landed after UNMAP under strict: {l:?}"));
    }
    Ok(())
}

fn capitalise(p: &str) -> String {
    let mut c = p.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}
