//! NVMe scenarios: the test guest drives an assigned QEMU NVMe controller (`moat-nvme`) with
//! every buffer mapped through the PV DMA hypercalls. The checks name what the guest found
//! in its memory (bytes read back equal to what was written, a buffer left untouched), the
//! statuses the controller returned, the hypervisor's counters and its leak check.

use crate::checks::{boot_complete, forbid_line, need_line};
use crate::dma::no_leak;
use crate::guests::{find_line, number_after};
use crate::{BootModule, Exit, Machine, Scenario, Variant, TEST_GUEST};

/// Bytes of the scenarios' NVMe disk image (a sparse file).
pub const DISK_BYTES: u64 = 16 << 20;
/// The image's file name in a scenario's directory.
pub const DISK_FILE: &str = "nvme.img";
/// Where the NVMe controller sits.
pub const NVME_BDF: &str = "00:04.0";

/// The QEMU arguments that add an NVMe controller at 00:04.0 backed by `image`.
pub fn nvme_device(image: &str) -> (String, Vec<String>) {
    (
        "nvme,drive=nvm,serial=moat-nvme-0,addr=0x4".into(),
        vec![
            "-drive".into(),
            format!("file={image},if=none,id=nvm,format=raw"),
        ],
    )
}

/// A machine with the NVMe controller (and no edu), its disk the scenario's image.
pub fn machine() -> Machine {
    let (dev, extra) = nvme_device(&format!("@FILE:{DISK_FILE}"));
    Machine {
        devices: vec![dev],
        extra,
        ..Machine::default()
    }
}

fn scenario(
    on: Variant,
    name: &str,
    about: &'static str,
    policy: &str,
    cpus: u32,
    tests: &str,
    check: crate::Check,
) -> Scenario {
    let mut s = on.scenario(
        name,
        about,
        machine(),
        &format!("guest=name=g0,mem=64M,cpus={cpus},dev={NVME_BDF},policy={policy}"),
        Exit::Success,
        check,
    );
    s.modules = vec![BootModule {
        file: TEST_GUEST,
        cmdline: format!("g0 {tests}"),
    }];
    with_disk(s)
}

/// `s` with the NVMe disk image and the NVMe scenarios' time limit.
pub fn with_disk(mut s: Scenario) -> Scenario {
    s.disks.push((DISK_FILE, DISK_BYTES));
    s.timeout_secs = s.timeout_secs.max(180);
    s
}

/// The NVMe scenarios on `on`'s machine.
pub fn scenarios(on: Variant) -> Vec<Scenario> {
    let mut v = Vec::new();
    for policy in ["passthrough", "strict", "batched", "deferred"] {
        for cpus in [1u32, 2] {
            v.push(scenario(
                on,
                &format!("nvme-pattern-{policy}-{cpus}vcpu"),
                "a pattern written through NVMe (PRP1, PRP2, PRP lists, bursts of 32) on every vCPU's own queue pair and read back equal, then written and read back again through pipelined cycles (buffers mapped one cycle ahead); unmaps batched per burst under batched; no leak",
                policy,
                cpus,
                "nvme-pattern",
                Box::new(move |log| {
                    boot_complete(log)?;
                    need_line(log, &["g0> nvme: controller 1b36 model `QEMU NVMe Ctrl` serial `moat-nvme-0`", &format!("{cpus} I/O queue pair(s) granted")])?;
                    for k in 0..cpus {
                        need_line(log, &[&format!("g0> nvme-pattern: policy {policy} vcpu {k} of {cpus}:"), "read back 768 KiB in one burst of 12: 0 byte(s) differ"])?;
                    }
                    invalidations_match_policy(log, policy, cpus)?;
                    pipelined_matches_policy(log, policy, cpus)?;
                    need_line(log, &["g0> PASS nvme-pattern"])?;
                    need_line(log, &["g0> nvme: after teardown:", "live mappings 0, live pages 0"])?;
                    no_leak(log)
                }),
            ));
        }
    }
    for policy in ["strict", "batched"] {
        v.push(scenario(
            on,
            &format!("nvme-fault-{policy}"),
            "crafted READs at buffers the driver unmapped: the IOMMU records the fault and the buffer keeps its bytes (the same command into the mapped buffer delivered the disk's bytes); through an unmapped PRP list page the command fails with Data Transfer Error; a completion unmapped in the same call that maps the next read is unreachable when the call returns",
            policy,
            1,
            "nvme-faults",
            Box::new(move |log| {
                boot_complete(log)?;
                need_line(log, &[&format!("g0> nvme-faults: policy {policy}: crafted READ into the mapped buffer"), "Ok(()), the disk's bytes arrived: true"])?;
                // QEMU 7.2's nvme completes a READ whose data write the IOMMU refused (its
                // DMA helpers drop the write): the fault and the untouched buffer are the
                // effect; a PRP list page the controller cannot fetch fails the command.
                need_line(log, &[&format!("g0> nvme-faults: policy {policy}: the same READ after UNMAP:"), "buffer untouched: true", "for IOVA", ": true (direction 2 reason"])?;
                need_line(log, &[&format!("g0> nvme-faults: policy {policy}: a READ whose PRP list page"), "= Some(DataTransferError); faults counted", "data buffer untouched: true"])?;
                // A completion's unmap and the next burst's map in one cycle: the device no
                // longer reaches the completed buffer when the call returned (under batched:
                // one MULTICALL, a fault at the old IOVA; under strict the IOVA may already
                // be the next buffer's).
                let reuse = [&format!("g0> nvme-faults: policy {policy}: completion reused in one cycle (Ok(Cycle {{ completed: 1, submitted: 1 }})"), "A's bytes arrived: true", "A untouched: true", "B's bytes arrived: true"];
                need_line(log, &reuse)?;
                if policy == "batched" {
                    need_line(log, &[reuse[0], "1 MULTICALL(s)", "IOVA given to B: false; fault recorded: true"])?;
                }
                forbid_line(log, &["nvme-faults:", "faults counted 0"])?;
                need_line(log, &["g0> PASS nvme-faults"])?;
                need_line(log, &["g0> nvme: after teardown:", "live mappings 0, live pages 0"])?;
                no_leak(log)
            }),
        ));
    }
    v.push(scenario(
        on,
        "nvme-errors",
        "controller errors (read past the end, unknown opcode) and timeouts (a held admin command, a read on a stopped controller) come back as errors; nothing stays mapped",
        "strict",
        1,
        "nvme-errors",
        Box::new(|log| {
            boot_complete(log)?;
            need_line(log, &["g0> nvme-errors: read at LBA", "= Some(LbaOutOfRange)"])?;
            need_line(log, &["g0> nvme-errors: opcode 0x7e:", "= Some(InvalidOpcode)"])?;
            need_line(log, &["g0> nvme-errors: Asynchronous Event Request with a 200 ms limit: Err(Timeout(Admin))", "a read afterwards: Ok(())"])?;
            need_line(log, &["g0> nvme-errors: read on a stopped controller with a 300 ms limit: Err(Timeout(Io))", "(Ok(1))"])?;
            need_line(log, &["g0> PASS nvme-errors"])?;
            need_line(log, &["g0> nvme: after teardown:", "live mappings 0, live pages 0"])?;
            no_leak(log)
        }),
    ));
    v
}

/// The pipelined cycles' run on every vCPU: every byte read back equal, buffers really
/// mapped ahead (at least one request staged), nothing left staged or outstanding (the job
/// fails otherwise); 144 buffers per vCPU mapped and unmapped (passthrough: none), with an
/// invalidation wait per unmap under strict and fewer waits than unmaps (one per cycle with
/// completions) under batched and deferred (besides the waits for maps in caching mode).
fn pipelined_matches_policy(log: &str, policy: &str, cpus: u32) -> Result<(), String> {
    for k in 0..cpus {
        let l = find_line(
            log,
            &[
                &format!("g0> nvme-pipeline: policy {policy} vcpu {k} of {cpus}:"),
                "read back 1536 KiB",
                ": 0 byte(s) differ",
            ],
        )?;
        if number_after(l, "at most ").is_none_or(|n| n < 1) {
            return Err(format!("nothing was mapped ahead: {l:?}"));
        }
    }
    let l = find_line(
        log,
        &[&format!("g0> nvme-pipeline: policy {policy}:"), "unmaps"],
    )?;
    let n = |key: &str| number_after(l, key).ok_or(format!("no `{key}` in {l:?}"));
    let (maps, unmaps, waits) = (n(&format!("policy {policy}:"))?, n("maps,")?, n("unmaps,")?);
    let buffers = 144 * u64::from(cpus);
    // A unit in caching mode also waits once per map (see `invalidations_match_policy`).
    let caching_mode = find_line(log, &["vtd: unit 0:", "CM="])?.contains("CM=true");
    let map_waits = if caching_mode { maps } else { 0 };
    let ok = match policy {
        "passthrough" => maps == 0 && unmaps == 0,
        "strict" => maps == buffers && unmaps == buffers && waits >= unmaps,
        _ => maps == buffers && unmaps == buffers && waits.saturating_sub(map_waits) < unmaps,
    };
    if !ok {
        return Err(format!(
            "pipelined counters do not match the {policy} policy: {l:?}"
        ));
    }
    Ok(())
}

/// The hypervisor's counters over the pattern's I/O: 57 data buffers per vCPU mapped and
/// unmapped (passthrough: none, IOVA = GPA); strict: a DMA_UNMAP call and an invalidation
/// wait per unmap; batched: the unmaps of a completion burst in one MULTICALL (8 bursts per
/// vCPU: 5 single commands, 3 bursts; more calls only if the hypervisor preempted one) and
/// one wait per unmap MULTICALL; deferred: fewer waits than unmaps. A unit in caching mode
/// (`CM=true` in the hypervisor's VT-d line, the --matrix machine) also waits once per map.
fn invalidations_match_policy(log: &str, policy: &str, cpus: u32) -> Result<(), String> {
    let l = find_line(
        log,
        &[
            &format!("g0> nvme-pattern: policy {policy}:"),
            "invalidations",
        ],
    )?;
    let n = |key: &str| number_after(l, key).ok_or(format!("no `{key}` in {l:?}"));
    let maps = n(&format!("policy {policy}:"))?;
    let unmaps = n("maps,")?;
    let waits = n("invalidations,")?;
    let unmap_calls = n("map and")?;
    let buffers = 57 * u64::from(cpus);
    let bursts = 8 * u64::from(cpus);
    let caching_mode = find_line(log, &["vtd: unit 0:", "CM="])?.contains("CM=true");
    let map_waits = if caching_mode { maps } else { 0 };
    let ok = match policy {
        "passthrough" => maps == 0 && unmaps == 0,
        "strict" => {
            maps == buffers
                && unmaps == buffers
                && waits >= unmaps + map_waits
                && unmap_calls == unmaps
        }
        "batched" => {
            maps == buffers
                && unmaps == buffers
                && (bursts..bursts + 8).contains(&unmap_calls)
                && waits == unmap_calls + map_waits
        }
        _ => maps == buffers && unmaps == buffers && waits.saturating_sub(map_waits) < unmaps,
    };
    if !ok {
        return Err(format!("counters do not match the {policy} policy: {l:?}"));
    }
    Ok(())
}
