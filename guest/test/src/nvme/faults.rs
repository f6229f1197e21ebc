//! `nvme-faults`: a crafted command points the controller at a buffer the driver unmapped;
//! `nvme-errors`: a controller error status and command timeouts come back as errors.

use core::sync::atomic::{AtomicBool, Ordering::SeqCst};

use moat_nvme::command::{admin, Command};
use moat_nvme::{regs, Buffer, Done, Error, Platform, Request, StatusKind, Wait};
use moat_pvdma::FaultRingArea;

use super::{bytes, data, setup, Setup};
use crate::abi::BootInfo;
use crate::{println, Outcome};

const PAGE: u64 = 4096;

#[repr(C, align(4096))]
struct Ring([u8; 4096]);
static mut RING: Ring = Ring([0; 4096]);
static RING_USED: AtomicBool = AtomicBool::new(false);

/// One command on queue 0, waited for: its result (or the wait's error).
fn one(s: &mut Setup, cmd: Option<Command>, req: Option<Request>) -> Result<(), Error> {
    let q = s.queues[0].as_mut().ok_or(Error::QueueFull)?;
    match (cmd, req) {
        (Some(c), _) => {
            q.submit_raw(&mut s.p, c, 7)?;
        }
        (None, Some(r)) => q.submit(&mut s.p, &mut s.m, &[r])?,
        _ => return Ok(()),
    }
    let mut result = Ok(());
    let n = q.wait(&mut s.p, &mut s.m, &mut |d: Done| result = d.result)?;
    if n != 1 {
        return Err(Error::BadCompletion);
    }
    result
}

/// The DMA faults the hypervisor has counted for this guest so far.
fn faults_counted(s: &mut Setup) -> Result<u64, &'static str> {
    let stats = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
    Ok(stats.faults.get())
}

/// The controller's status kind when `r` is a controller error.
fn controller_status(r: &Result<(), Error>) -> Option<StatusKind> {
    match r {
        Err(Error::Controller(st)) => Some(st.kind()),
        _ => None,
    }
}

/// Maps `[gpa, gpa + len)` for the controller (written by it when `device_writes`): its IOVA.
fn map_one(s: &mut Setup, gpa: u64, len: u64, device_writes: bool) -> Result<u64, ()> {
    let mut iova = [0u64];
    let buf = Buffer {
        gpa,
        len,
        device_writes,
    };
    s.m.map_burst(&[buf], &mut iova).map_err(|_| ())?;
    Ok(iova[0])
}

/// A one-page read of `lba` into `gpa`, tagged `tag`.
fn read_page(lba: u64, gpa: u64, tag: u64) -> Request {
    Request {
        write: false,
        lba,
        gpa,
        len: PAGE,
        tag,
    }
}

/// `nvme-faults`: a READ the driver builds by hand, first into a buffer mapped for it (the
/// control: the disk's bytes arrive), then, after the driver unmapped that buffer, into the
/// same IOVA: the command must fail, the IOMMU must record the fault, the buffer must keep
/// its bytes. For `strict` and `batched` (under `passthrough` and `deferred` the device may
/// reach an unmapped buffer by design).
pub fn faults(info: &BootInfo) -> Outcome {
    let mut s = setup(info)?;
    let r = crafted(&mut s);
    let td = s.teardown();
    r.and(td)
}

fn crafted(s: &mut Setup) -> Outcome {
    let policy = crate::dma::policy_name(s.m.pvdma().info().policy);
    if RING_USED.swap(true, SeqCst) {
        return Err("nvme-faults runs once per boot");
    }
    s.m.pvdma()
        .attach_fault_ring(FaultRingArea {
            gpa: core::ptr::addr_of!(RING) as u64,
            pages: 1,
            vector: 0,
        })
        .map_err(|_| "FAULT_RING_REGISTER failed")?;
    let ns = s.ctrl.namespace();
    let blocks = (PAGE / u64::from(ns.block_size)) as u32;
    let lba = (4 << 20) / u64::from(ns.block_size);
    let disk = data(0);
    let x = data(0) + (1 << 20);
    // The disk's bytes: a pattern written through the driver.
    for (i, b) in bytes(disk, PAGE).iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ 0xa5;
    }
    let w = Request {
        write: true,
        lba,
        gpa: disk,
        len: PAGE,
        tag: 1,
    };
    one(s, None, Some(w)).map_err(|e| {
        println!("nvme-faults: writing the pattern: {e}");
        "writing the pattern failed"
    })?;
    let disk_bytes = |b: &[u8]| {
        b.iter()
            .enumerate()
            .all(|(i, &v)| v == (i as u8).wrapping_mul(7) ^ 0xa5)
    };
    // Control: the crafted READ into a mapped buffer delivers the disk's bytes.
    bytes(x, PAGE).fill(0x5a);
    let iova = map_one(s, x, PAGE, true).map_err(|_| "MAP failed")?;
    let read = Command::rw(false, ns.nsid, lba, blocks).with_prps(iova, 0);
    let control = one(s, Some(read), None);
    let delivered = disk_bytes(bytes(x, PAGE));
    s.m.unmap_burst(&[(iova, PAGE)])
        .map_err(|_| "UNMAP failed")?;
    println!(
        "nvme-faults: policy {policy}: crafted READ into the mapped buffer at IOVA {iova:#x}: {control:?}, the disk's bytes arrived: {delivered}"
    );
    if control.is_err() || !delivered {
        return Err("the crafted command did not work on a mapped buffer");
    }
    // The same command after the driver unmapped the buffer.
    bytes(x, PAGE).fill(0x5a);
    let f0 = faults_counted(s)?;
    let stale = one(s, Some(read), None);
    let untouched = bytes(x, PAGE).iter().all(|&b| b == 0x5a);
    let f1 = faults_counted(s)?;
    let mut record = None;
    let mut records = 0;
    s.m.pvdma()
        .poll_faults(&mut |r| {
            records += 1;
            if r.iova.get() == iova && record.is_none() {
                record = Some(r);
            }
        })
        .map_err(|_| "fault ring poll failed")?;
    let _ = s.m.pvdma().detach_fault_ring();
    let status = controller_status(&stale);
    let (direction, reason) = record.map_or((0, 0), |r| (r.direction, r.reason));
    println!(
        "nvme-faults: policy {policy}: the same READ after UNMAP: {stale:?} ({status:?}); buffer untouched: {untouched}; faults counted {}; fault ring: {records} record(s), for IOVA {iova:#x}: {} (direction {direction} reason {reason})",
        f1 - f0,
        record.is_some()
    );
    // QEMU 7.2's nvme completes such a READ with success: its DMA helpers drop a write
    // the IOMMU refuses (the fault above) without failing the command. The device-visible
    // failure is checked with a PRP list page instead, which the controller itself reads.
    if !untouched {
        return Err("the device wrote into the buffer after its UNMAP returned");
    }
    if f1 == f0 || record.is_none() {
        return Err("no DMA fault was recorded for the unmapped IOVA");
    }
    list_page(s, policy, lba, x)?;
    reuse(s, policy, lba, &disk_bytes)
}

/// A 3-page READ whose PRP list page is a page the driver mapped and unmapped: the
/// controller cannot fetch the list and fails the command; the data buffer (mapped) stays
/// untouched.
fn list_page(s: &mut Setup, policy: &str, lba: u64, x: u64) -> Outcome {
    let ns = s.ctrl.namespace();
    let list = x + 16 * PAGE;
    let datab = x + 32 * PAGE;
    for (k, b) in bytes(list, 16).chunks_exact_mut(8).enumerate() {
        b.copy_from_slice(&(datab + (k as u64 + 1) * PAGE).to_le_bytes());
    }
    let l = map_one(s, list, PAGE, false).map_err(|_| "MAP of the list page failed")?;
    s.m.unmap_burst(&[(l, PAGE)])
        .map_err(|_| "UNMAP of the list page failed")?;
    bytes(datab, 3 * PAGE).fill(0x5a);
    let d = map_one(s, datab, 3 * PAGE, true).map_err(|_| "MAP of the data buffer failed")?;
    let blocks = (3 * PAGE / u64::from(ns.block_size)) as u32;
    let f0 = faults_counted(s)?;
    let r = one(
        s,
        Some(Command::rw(false, ns.nsid, lba, blocks).with_prps(d, l)),
        None,
    );
    let f1 = faults_counted(s)?;
    let untouched = bytes(datab, 3 * PAGE).iter().all(|&b| b == 0x5a);
    s.m.unmap_burst(&[(d, 3 * PAGE)])
        .map_err(|_| "UNMAP of the data buffer failed")?;
    let kind = controller_status(&r);
    println!(
        "nvme-faults: policy {policy}: a READ whose PRP list page (IOVA {:#x}) the driver unmapped: {r:?} = {kind:?}; faults counted {}; data buffer untouched: {untouched}",
        l,
        f1 - f0
    );
    if kind != Some(StatusKind::DataTransferError) || f1 == f0 || !untouched {
        return Err("the READ through an unmapped PRP list page did not fail with a DMA fault");
    }
    Ok(())
}

/// A completion's buffer reused in the cycle that reaps it: a READ into buffer A completes;
/// one [`moat_nvme::IoQueue::cycle`] takes it and submits the next READ (into buffer B) with
/// ONE call that unmaps A's IOVA and maps B (under `batched` one MULTICALL, the unmap
/// first); right after that call a crafted READ at A's old IOVA must fault and leave A
/// untouched, although the controller translated that IOVA a moment before (an IOTLB entry
/// the unmap must have invalidated before the call returned), while B gets the disk's bytes.
fn reuse(s: &mut Setup, policy: &str, lba: u64, disk_bytes: &dyn Fn(&[u8]) -> bool) -> Outcome {
    let ns = s.ctrl.namespace();
    let blocks = (PAGE / u64::from(ns.block_size)) as u32;
    let (a, b) = (data(0) + (2 << 20) - 2 * PAGE, data(0) + (2 << 20) - PAGE);
    bytes(b, PAGE).fill(0x5a);
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    q.submit(&mut s.p, &mut s.m, &[read_page(lba, a, 1)])
        .map_err(|_| "submitting the READ into A failed")?;
    let t0 = s.p.now_us();
    while q.ready(&mut s.p) == 0 {
        if s.p.now_us() - t0 > 5_000_000 {
            return Err("the READ into A did not complete");
        }
        core::hint::spin_loop();
    }
    let a_bytes = disk_bytes(bytes(a, PAGE));
    let m0 = s.m.stats();
    let mut done_a = None;
    let cycle = q.cycle(
        &mut s.p,
        &mut s.m,
        moat_nvme::MAX_DEPTH,
        &mut |tags: &[u64], reqs: &mut [Request]| {
            if tags != [1] || reqs.is_empty() {
                return 0;
            }
            reqs[0] = read_page(lba, b, 2);
            1
        },
        &mut |d: Done| done_a = Some(d),
    );
    let m1 = s.m.stats();
    let Some(done_a) = done_a.filter(|d| d.result.is_ok() && d.tag == 1) else {
        println!("nvme-faults: policy {policy}: the cycle: {cycle:?}, A's completion {done_a:?}");
        return Err("the cycle did not report A's READ as done");
    };
    // At once (B may still be running): the crafted READ at A's old IOVA.
    bytes(a, PAGE).fill(0x5a);
    let f0 = faults_counted(s)?;
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    let read = Command::rw(false, ns.nsid, lba, blocks).with_prps(done_a.iova, 0);
    q.submit_raw(&mut s.p, read, 3)
        .map_err(|_| "submitting the crafted READ failed")?;
    // Both posted before anything is reaped: no later unmap (and its invalidation) runs
    // before the controller translated the crafted READ's IOVA.
    let t0 = s.p.now_us();
    while q.ready(&mut s.p) < 2 {
        if s.p.now_us() - t0 > 5_000_000 {
            return Err("B and the crafted READ did not complete");
        }
        core::hint::spin_loop();
    }
    let (mut got, mut crafted, mut b_iova) = (0, None, None);
    while got < 2 {
        got += q
            .wait(&mut s.p, &mut s.m, &mut |d: Done| match d.tag {
                3 => crafted = Some(d.result),
                2 => b_iova = Some(d.iova),
                _ => {}
            })
            .map_err(|_| "waiting for B and the crafted READ failed")?;
    }
    let f1 = faults_counted(s)?;
    let untouched = bytes(a, PAGE).iter().all(|&x| x == 0x5a);
    let b_bytes = disk_bytes(bytes(b, PAGE));
    // Under strict the hypervisor frees A's IOVA at once (its invalidation done) and may
    // hand it to B in the same call: then the READ at it lands in B, legitimately.
    let reused = b_iova == Some(done_a.iova);
    let faulted = f1 > f0;
    let multicalls = m1.multicalls - m0.multicalls;
    println!(
        "nvme-faults: policy {policy}: completion reused in one cycle ({cycle:?}; {} map and {} unmap hypercall(s), {multicalls} MULTICALL(s)): A's bytes arrived: {a_bytes}; a READ at A's old IOVA {:#x} right after the cycle: {crafted:?}; IOVA given to B: {reused}; fault recorded: {faulted}; A untouched: {untouched}; B's bytes arrived: {b_bytes}",
        m1.map_calls - m0.map_calls,
        m1.unmap_calls - m0.unmap_calls,
        done_a.iova,
    );
    let one_call = multicalls == 1 || policy != "batched";
    if !a_bytes || !b_bytes || !one_call || cycle.map(|c| (c.completed, c.submitted)) != Ok((1, 1))
    {
        return Err("the cycle did not unmap A and submit B in one call");
    }
    if !untouched || !(faulted || reused) {
        return Err("the device reached a buffer whose unmap had returned in the cycle's call");
    }
    Ok(())
}

/// `nvme-errors`: a read past the namespace's end and an unknown opcode come back as
/// controller errors (the read's buffer unmapped again); an admin command the controller
/// holds (Asynchronous Event Request) times out and the controller still serves reads; a
/// controller that stops (CC.EN cleared behind the driver) makes an outstanding read time
/// out, and the driver gives the buffer back.
pub fn errors(info: &BootInfo) -> Outcome {
    let mut s = setup(info)?;
    let r = error_cases(info, &mut s);
    let td = s.teardown();
    r.and(td)
}

fn error_cases(info: &BootInfo, s: &mut Setup) -> Outcome {
    let ns = s.ctrl.namespace();
    let buf = data(0);
    let live = |s: &mut Setup| s.m.pvdma().stats(false).map(|x| x.live_mappings.get());
    let l0 = live(s).map_err(|_| "STATS failed")?;
    // 1. A read past the end of the namespace.
    let past = read_page(ns.blocks, buf, 1);
    let r = one(s, None, Some(past));
    let l1 = live(s).map_err(|_| "STATS failed")?;
    let kind = controller_status(&r);
    println!("nvme-errors: read at LBA {} (the namespace has {}): {r:?} = {kind:?}; live mappings before {l0}, after {l1}", ns.blocks, ns.blocks);
    if kind != Some(StatusKind::LbaOutOfRange) || l1 != l0 {
        return Err(
            "a read past the end was not reported as LBA Out of Range, or its buffer stayed mapped",
        );
    }
    // 2. An opcode the NVM command set does not define.
    let bad = Command::new(0x7e).with_prps(0, 0);
    let r = one(
        s,
        Some(Command {
            nsid: ns.nsid,
            ..bad
        }),
        None,
    );
    let kind = controller_status(&r);
    println!("nvme-errors: opcode 0x7e: {r:?} = {kind:?}");
    if kind != Some(StatusKind::InvalidOpcode) {
        return Err("an unknown opcode was not reported as Invalid Command Opcode");
    }
    // 3. An admin command the controller keeps (it completes only when an event happens).
    let t0 = crate::abi::rdtsc();
    let r = s
        .ctrl
        .admin_within(&mut s.p, Command::new(admin::ASYNC_EVENT), 200_000);
    let ms = (crate::abi::rdtsc() - t0) / info.tsc_khz.get().max(1);
    let after = one(s, None, Some(read_page(0, buf, 2)));
    println!("nvme-errors: Asynchronous Event Request with a 200 ms limit: {r:?} after {ms} ms; a read afterwards: {after:?}");
    if r != Err(Error::Timeout(Wait::Admin)) || after.is_err() {
        return Err(
            "the held admin command did not time out, or the controller stopped serving reads",
        );
    }
    // 4. The controller stops (CC.EN cleared behind the driver): an outstanding read times out.
    let cc = s.p.read32(regs::CC);
    s.p.write32(regs::CC, cc & !1);
    let t1 = s.p.now_us();
    while regs::Csts(s.p.read32(regs::CSTS)).ready() && s.p.now_us() - t1 < 1_000_000 {
        core::hint::spin_loop();
    }
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    q.timeout_us = 300_000;
    let t0 = crate::abi::rdtsc();
    let r = q
        .submit(&mut s.p, &mut s.m, &[read_page(0, buf, 3)])
        .and_then(|()| q.wait(&mut s.p, &mut s.m, &mut |_| {}));
    let ms = (crate::abi::rdtsc() - t0) / info.tsc_khz.get().max(1);
    let held = live(s).map_err(|_| "STATS failed")?;
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    let abandoned = q.abandon(&mut s.m);
    let l2 = live(s).map_err(|_| "STATS failed")?;
    println!(
        "nvme-errors: read on a stopped controller with a 300 ms limit: {r:?} after {ms} ms; live mappings while outstanding {held}, after the driver gave it up ({abandoned:?}) {l2}"
    );
    if r != Err(Error::Timeout(Wait::Io)) || held != l0 + 1 || abandoned != Ok(1) || l2 != l0 {
        return Err("the read on a stopped controller did not time out cleanly");
    }
    Ok(())
}
